"""Reload when the policy, secret or TLS files change on disk, as SIGHUP does.

Kubernetes updates a mounted ConfigMap or Secret in place: it writes the new files into a
fresh hidden directory and swaps the ``..data`` symlink to it in one rename, so every file
changes at once; git-sync swaps its worktree the same way. Polling (``os.stat`` through the
symlinks plus ``realpath``) notices either, on any filesystem, without an inotify
dependency: every ``interval`` seconds the fingerprint of the watched files is compared with
the last one, and a change is acted on once it has held still for one more interval (the
debounce: a writer that is halfway through is not caught mid-way).

The reload is :meth:`proxy.gate.runtime.Runtime.reload`, all-or-nothing: a broken update keeps
the last good policy serving and is counted (``tracegate_policy_loads_total{result="failed"}``);
it is not retried until the files change again. Files a SIGHUP reload has just read are not
reloaded a second time.

Watched: every policy file (and which ones exist), every secret file the serving policy
names (``{file: …}`` references), and the TLS certificate, key and client CA.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

from proxy.gate.runtime import Runtime
from proxy.policy.loader import policy_files
from proxy.policy.model import credential_refs

log = logging.getLogger("tracegate")

#: One file's identity: where its symlinks lead, and that target's inode, mtime and size.
Stamp = tuple[str, int, int, int] | None
Fingerprint = tuple[tuple[str, Stamp], ...]


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size


def watched_files(runtime: Runtime) -> list[str]:
    """The files whose change should reload: policies, the policy's secret files, TLS."""
    paths = [str(p) for p in policy_files(runtime.settings.policies)]
    policy = runtime.gate.policy
    refs = [ref for a in policy.service_accounts.values() for ref in credential_refs(a)]
    refs += [ref for hook in policy.webhooks for ref in hook.secret_refs]
    paths += [ref.name for ref in refs if ref.kind == "file"]
    tls = runtime.settings.tls
    if tls is not None:
        paths += [str(p) for p in (tls.cert, tls.key, tls.client_ca) if p is not None]
    return sorted(set(paths))


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    return tuple((p, _stamp(p)) for p in paths)


class FileWatch:
    def __init__(self, runtime: Runtime, interval: float) -> None:
        self._runtime = runtime
        self._interval = interval

    async def _fingerprint(self) -> Fingerprint:
        """The watched files' stamps; a policy directory that cannot be listed is a stamp of
        its own (a change, which the reload then reports as the policy's problem)."""
        try:
            return await asyncio.to_thread(lambda: fingerprint(watched_files(self._runtime)))
        except OSError as exc:
            return ((str(self._runtime.settings.policies), ("unreadable", 0, 0, len(type(exc).__name__))),)

    async def run(self) -> None:
        """Poll until cancelled. Never raises: a file that cannot be read is a change (its
        stamp becomes None), and the reload decides whether that is an error."""
        # Read ``reload_attempts`` before each baseline fingerprint, never after: a SIGHUP that
        # starts in between then shows as a change of attempts, and the baseline is retaken.
        attempts = self._runtime.reload_attempts
        seen = await self._fingerprint()
        pending: Fingerprint | None = None
        while True:
            await asyncio.sleep(self._interval)
            now = await self._fingerprint()
            if self._runtime.reload_attempts != attempts:  # a SIGHUP read these files already
                attempts, pending = self._runtime.reload_attempts, None
                seen = await self._fingerprint()  # taken now: ``now`` may predate what it read
                continue
            if now == seen:
                pending = None
                continue
            if now != pending:  # changed since the last look: wait for it to hold still
                pending = now
                continue
            log.info("policy, secret or TLS files changed; reloading")
            await self._runtime.reload()
            attempts, pending = self._runtime.reload_attempts, None
            seen = await self._fingerprint()
