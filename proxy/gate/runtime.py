"""What a running tracegate holds: the current policy and what is derived from it.

The policy, its token verifier and its issuers' key sources are swapped as one
:class:`Gate` on reload (SIGHUP), by a single assignment: a request sees either the old
gate or the new one, never a mix. A policy that fails to load leaves the old gate serving;
the failure is logged (each problem with file:line) and counted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import cast

import aiohttp

from proxy.backends.profiles import Defaults, Signal, build_backend
from proxy.errors import ConfigError, PolicyLoadError
from proxy.gate.quota import Quotas, build_quotas
from proxy.gate.quota_pg import SharedQuotas, is_postgres
from proxy.identity.identify import Identity, TokenVerifier
from proxy.identity.keys import KeySource
from proxy.observe.audit import AuditLog
from proxy.observe.metrics import Metrics
from proxy.policy import Decision, Policy, decide, load_policy
from proxy.policy.memo import DecisionBook
from proxy.policy.model import credential_refs
from proxy.secrets import Secret, SecretRef
from proxy.settings import tls
from proxy.settings.config import Settings
from proxy.settings.secret_stores import SecretStores
from proxy.upstream.forward import Forwarder
from proxy.upstream.headers import HeaderPolicy
from proxy.upstream.pool import UpstreamPool

log = logging.getLogger("tracegate")


@dataclass(frozen=True)
class Gate:
    policy: Policy
    verifier: TokenVerifier
    #: The verifier numbers each token's decisions in this book (None: decided per request).
    book: DecisionBook | None = None
    #: The policy's quotas (proxy/gate/quota.py; None: it sets no limits).
    quotas: Quotas | None = None

    def decide(self, identity: Identity, signal: str | None) -> Decision:
        """The policy's decision for a verified identity: made once, when its token was
        verified (proxy/policy/memo.py); a signal without a slot is decided now."""
        if self.book is not None:
            found = self.book.decision(identity.decisions, signal)
            if found is not None:
                return found
        return decide(self.policy, identity.issuer, identity.claims, signal)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        metrics: Metrics,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.audit = audit or AuditLog()
        self.environ = environ
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.draining = False
        self.started_at = monotonic()
        self.header_policy = HeaderPolicy(settings.forward_headers)
        self._gate: Gate | None = None
        self._key_session: aiohttp.ClientSession | None = None
        self.forwarder: Forwarder | None = None
        self._upstream_session: aiohttp.ClientSession | None = None
        self._upstream_pool: UpstreamPool | None = None
        self._sources: dict[str, KeySource] = {}
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._reload_lock = asyncio.Lock()
        #: The listeners' TLS context (None: plain HTTP); its certificate is reloaded in place.
        self.tls_context: ssl.SSLContext | None = None
        #: The gRPC listener: None when off, else whether it is taking calls (``/readyz``),
        #: and the address it is bound to (the port chosen when 0 was asked for).
        self.grpc_serving: bool | None = None
        self.grpc_address: tuple[str, int] | None = None
        #: Called after the TLS certificate reloaded (the gRPC listener's credentials).
        self.tls_reload_hooks: list[Callable[[], None]] = []
        #: Reloads attempted so far (SIGHUP or file watch), so the watch knows its files were read.
        self.reload_attempts = 0
        #: Secrets kept in AWS Secrets Manager or Vault: read with each load, refreshed between.
        self.secret_stores = SecretStores(environ, registry=metrics.registry, clock=monotonic)
        self._secret_refresh: asyncio.Task[None] | None = None
        #: Where the limits are shared fleet-wide: the PostgreSQL outbox's database (quota_pg.py).
        self.shared_quotas: SharedQuotas | None = None
        if is_postgres(settings.outbox_path):
            self.shared_quotas = SharedQuotas(
                Secret(settings.outbox_path),
                clock=lambda: self.clock(),  # read at each use: tests move the clocks after start
                monotonic=lambda: self.monotonic(),
                registry=metrics.registry,
            )

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("tracegate runtime used before start()")
        return self._gate

    def load(self, *, fresh_secrets: bool = True) -> Policy:
        """Load the policy directory with secrets resolved (blocking: file and store reads).
        ``fresh_secrets=False``: store references as last read (a refresh has just read them)."""
        return load_policy(self.settings.policies, environ=self.secret_stores.environ(fresh=fresh_secrets))

    async def start(self, policy: Policy) -> None:
        """Open the shared sessions and serve ``policy``. Never waits for an issuer."""
        self.started_at = self.monotonic()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, enable_cleanup_closed=True)
        upstream = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
        pool = UpstreamPool(connect_timeout=min(self.settings.upstream_timeout, 10.0))
        self.forwarder = Forwarder(
            upstream,
            self.header_policy,
            self.metrics,
            upstream=self.settings.upstream,
            paths=self.settings.paths,
            timeout=self.settings.upstream_timeout,
            max_body=self.settings.max_body,
            body_timeout=self.settings.body_timeout,
            pool=pool,
            grpc_upstream=self.settings.grpc_upstream,
        )
        self._upstream_session = upstream
        self._upstream_pool = pool
        self._key_session = aiohttp.ClientSession()
        self._install(policy)
        if self.shared_quotas is not None:
            await self.shared_quotas.started()
        self._loaded()
        if self.secret_stores.settings.refresh > 0:
            rotated = self.secret_stores.run(lambda: self.reload(fresh_secrets=False))
            self._secret_refresh = asyncio.get_running_loop().create_task(rotated)

    def _loaded(self) -> None:
        self.metrics.policy_loads.labels("ok").inc()
        self.metrics.policy_loaded.set(1)
        self.metrics.policy_last_load.set(self.clock())

    async def close(self) -> None:
        self.audit.flush()
        if self._secret_refresh is not None:
            self._secret_refresh.cancel()
            await asyncio.gather(self._secret_refresh, return_exceptions=True)
        for task in self._source_tasks.values():
            task.cancel()
        await asyncio.gather(*self._source_tasks.values(), return_exceptions=True)
        self._source_tasks.clear()
        await asyncio.gather(*(source.close() for source in self._sources.values()))
        if self.shared_quotas is not None:
            await self.shared_quotas.close()
        if self._key_session is not None:
            await self._key_session.close()
        if self._upstream_session is not None:
            await self._upstream_session.close()
        if self._upstream_pool is not None:
            await self._upstream_pool.close()

    def _install(self, policy: Policy) -> None:
        if self._key_session is None:
            raise RuntimeError("start() first")
        for name in list(self._sources):
            if policy.issuers.get(name) != self._sources[name].issuer:
                self._source_tasks.pop(name).cancel()
                del self._sources[name]
        for name, issuer in policy.issuers.items():
            if name not in self._sources:
                source = KeySource(
                    issuer,
                    self._key_session,
                    self.metrics,
                    clock=self.monotonic,
                    min_refetch_interval=self.settings.jwks_min_refetch,
                )
                self._sources[name] = source
                self._source_tasks[name] = asyncio.get_running_loop().create_task(source.run())
        policy = with_routes(policy, backend_defaults(self.settings))
        book = DecisionBook(policy)
        verifier = TokenVerifier(
            policy,
            dict(self._sources),
            self.metrics,
            clock=self.clock,
            leeway=self.settings.leeway,
            cache_size=self.settings.token_cache_size,
            decisions=book.numbers,
        )
        self.secret_stores.serving(store_users(policy))
        previous = self._gate.quotas if self._gate is not None else None
        quotas = build_quotas(policy, self.monotonic(), previous, self.shared_quotas)
        self._gate = Gate(policy, verifier, book, quotas)

    def _reload_tls(self) -> None:
        files = self.settings.tls
        if files is None or self.tls_context is None:
            return
        try:
            tls.load(self.tls_context, files)
        except ConfigError as exc:
            log.error("TLS certificate reload failed; the previous certificate keeps serving: %s", exc)
            self.metrics.tls_reloads.labels("failed").inc()
            return
        for hook in self.tls_reload_hooks:
            try:
                hook()
            except ConfigError as exc:
                log.error("TLS certificate reload failed for a listener; it keeps its certificate: %s", exc)
                self.metrics.tls_reloads.labels("failed").inc()
                return
        self.metrics.tls_reloads.labels("ok").inc()

    def issuers_without_keys(self) -> list[str]:
        return sorted(name for name, source in self._sources.items() if not source.ready)

    async def reload(self, *, fresh_secrets: bool = True) -> bool:
        """Reload policies, secrets (files and stores) and the TLS certificate. True if the new
        policy now serves. Each part is all-or-nothing: a failed part keeps what it had."""
        async with self._reload_lock:
            self.reload_attempts += 1
            self._reload_tls()
            try:
                policy = await asyncio.to_thread(self.load, fresh_secrets=fresh_secrets)
            except PolicyLoadError as exc:
                for problem in exc.problems:
                    log.error("policy reload failed; the previous policy keeps serving: %s", problem)
                self.metrics.policy_loads.labels("failed").inc()
                self.metrics.policy_loaded.set(0)
                return False
            self._install(policy)
            self._loaded()
            log.info("policy reloaded from %d file(s)", len(policy.files))
            return True


def store_users(policy: Policy) -> dict[SecretRef, str]:
    """Each secret-store reference of ``policy`` and the service account it is counted under."""
    users = {ref: hook.service_account for hook in policy.webhooks for ref in hook.secret_refs}
    users |= {ref: name for name, account in policy.service_accounts.items() for ref in credential_refs(account)}
    return {ref: user for ref, user in users.items() if ref.in_store}


def backend_defaults(settings: Settings) -> Defaults:
    """What the ``lightstep`` profile honours: TRACEGATE_UPSTREAM, its paths, the gRPC upstream."""
    return Defaults(settings.upstream, cast(Mapping[Signal, str], settings.paths), settings.grpc_upstream)


def with_routes(policy: Policy, defaults: Defaults) -> Policy:
    """The policy with each account's routes built (its backend profile, resolved credentials
    and the settings' defaults), once per load, so that no request builds one."""
    accounts = {
        name: replace(account, routes=build_backend(account.backend, account.credentials, defaults))
        if account.backend is not None and account.credentials is not None
        else account
        for name, account in policy.service_accounts.items()
    }
    return replace(policy, service_accounts=accounts)
