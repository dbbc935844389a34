"""Secrets kept in AWS Secrets Manager or Vault's KV v2: read, held, and followed as they rotate.

The runtime resolves ``{aws_secret: …}`` and ``{vault: …}`` references (proxy/secrets.py) with
the policy, at start and on every reload, in :meth:`SecretStores.environ`. Every
``TRACEGATE_SECRET_REFRESH_SECONDS`` (default 300; 0: only start and reloads), less up to a tenth
at random so that replicas do not read in step, each reference the serving policy names is read
again; a changed value makes the runtime reload the policy with the values just read (not a
second read), so new requests carry a rotated value within one interval and the previous value
is no longer held. A store that cannot be read keeps the last good value serving: a warning
says how stale, ``tracegate_secret_age_seconds{kind, service_account}`` grows and
``tracegate_secret_reads_total{kind, result="failed"}`` counts. No label holds a secret's name.
A reference never read well fails the load: at start-up, one ``tracegate:`` line naming it.

Credentials come from each provider's own chain. AWS: botocore's default chain (AWS_* variables,
passed in from the injected environment; web identity for IRSA and EKS pod identity; the
container and instance-profile endpoints); region from the reference, its ARN, AWS_REGION or
AWS_DEFAULT_REGION; endpoint AWS_ENDPOINT_URL_SECRETS_MANAGER or AWS_ENDPOINT_URL. Vault at
VAULT_ADDR (VAULT_NAMESPACE, VAULT_CACERT) by ``TRACEGATE_VAULT_AUTH``: ``token`` (VAULT_TOKEN, used
as is: renew it outside), ``kubernetes`` or ``approle`` (see :class:`StoreSettings`); a login's
token is replaced by a new login when Vault refuses it.

Blocking: boto3 and hvac are synchronous; every read runs in a worker thread (the loader's, or
``asyncio.to_thread`` for a refresh), never on the event loop, bounded by
``TRACEGATE_SECRET_STORE_TIMEOUT`` seconds (default 10) per attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.errors import ConfigError
from proxy.secrets import Secret, SecretEnviron, SecretRef, SecretUnavailable, checked, resolve
from proxy.settings.values import non_negative, positive, secret_ref

log = logging.getLogger("tracegate")

#: How much of an interval a refresh may come early by (never late: a rotation is followed
#: within one interval).
JITTER = 0.1
VAULT_AUTHS = ("token", "kubernetes", "approle")
K8S_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path, not a secret
Reader = Callable[[SecretRef], Secret]


@dataclass(frozen=True)
class StoreSettings:
    """``TRACEGATE_SECRET_*`` and ``TRACEGATE_VAULT_*``: Kubernetes auth logs in as role
    ``vault_role`` with the pod's service-account token (``TRACEGATE_VAULT_KUBERNETES_TOKEN``);
    AppRole with role id ``vault_role`` and the secret id ``TRACEGATE_VAULT_SECRET_ID``
    (``env:NAME`` or ``file:/path``); either at ``TRACEGATE_VAULT_AUTH_MOUNT`` (default: its name)."""

    refresh: float = 300.0
    timeout: float = 10.0
    vault_auth: str = "token"
    vault_role: str = ""
    vault_auth_mount: str = ""
    vault_k8s_token: str = K8S_TOKEN
    vault_secret_id: SecretRef | None = None

    @classmethod
    def load(cls, environ: Mapping[str, str]) -> StoreSettings:
        """Raises ConfigError naming the setting, its value and what is allowed."""

        def parsed(name: str, parse: Callable[[str], Any], default: Any) -> Any:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw[:60]!r}: {exc}") from None

        def auth(value: str) -> str:
            if value not in VAULT_AUTHS:
                raise ValueError(f"expected one of {', '.join(VAULT_AUTHS)}")
            return value

        settings = cls(
            refresh=parsed("TRACEGATE_SECRET_REFRESH_SECONDS", non_negative, 300.0),
            timeout=parsed("TRACEGATE_SECRET_STORE_TIMEOUT", positive(float), 10.0),
            vault_auth=parsed("TRACEGATE_VAULT_AUTH", auth, "token"),
            vault_role=environ.get("TRACEGATE_VAULT_ROLE", ""),
            vault_auth_mount=environ.get("TRACEGATE_VAULT_AUTH_MOUNT", "").strip("/"),
            vault_k8s_token=environ.get("TRACEGATE_VAULT_KUBERNETES_TOKEN") or K8S_TOKEN,
            vault_secret_id=parsed("TRACEGATE_VAULT_SECRET_ID", secret_ref, None),
        )
        if settings.vault_auth != "token" and not settings.vault_role:
            what = "the Kubernetes auth role" if settings.vault_auth == "kubernetes" else "the AppRole role id"
            raise ConfigError(f"TRACEGATE_VAULT_AUTH={settings.vault_auth} needs TRACEGATE_VAULT_ROLE: {what}")
        if settings.vault_auth == "approle" and settings.vault_secret_id is None:
            raise ConfigError("TRACEGATE_VAULT_AUTH=approle needs TRACEGATE_VAULT_SECRET_ID=env:NAME or file:/path")
        return settings


class AwsSecretsManager:
    """Reads ``{aws_secret: …}`` with boto3 (blocking), one client per region."""

    def __init__(self, settings: StoreSettings, environ: Mapping[str, str]) -> None:
        self._settings = settings
        self._environ = environ
        self._clients: dict[str | None, Any] = {}
        self._lock = threading.Lock()

    def _client(self, region: str | None) -> Any:
        with self._lock:
            if region not in self._clients:
                import boto3  # only when a policy names a secret in AWS
                from botocore.config import Config

                env, t = self._environ, self._settings.timeout
                static = {
                    "aws_access_key_id": env.get("AWS_ACCESS_KEY_ID"),
                    "aws_secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"),
                    "aws_session_token": env.get("AWS_SESSION_TOKEN"),
                }
                keys = static if static["aws_access_key_id"] and static["aws_secret_access_key"] else {}
                session = boto3.session.Session(**keys)  # else the default chain: web identity, instance role…
                self._clients[region] = session.client(
                    "secretsmanager",
                    region_name=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                    endpoint_url=env.get("AWS_ENDPOINT_URL_SECRETS_MANAGER") or env.get("AWS_ENDPOINT_URL"),
                    config=Config(connect_timeout=t, read_timeout=t, retries={"max_attempts": 2, "mode": "standard"}),
                )
            return self._clients[region]

    def __call__(self, ref: SecretRef) -> Secret:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

        try:
            answer = self._client(ref.region).get_secret_value(SecretId=ref.name)
        except ClientError as exc:
            raise _unreadable(ref, "AWS Secrets Manager", exc.response.get("Error", {}).get("Code", "error")) from None
        except NoRegionError:
            raise _unreadable(ref, "AWS Secrets Manager", "no region: write region: or set AWS_REGION") from None
        except NoCredentialsError:
            raise _unreadable(ref, "AWS Secrets Manager", "no AWS credentials in the default chain") from None
        except BotoCoreError as exc:
            raise _unreadable(ref, "AWS Secrets Manager", type(exc).__name__) from None
        text = answer.get("SecretString")
        if text is None:
            try:
                text = bytes(answer.get("SecretBinary", b"")).decode("utf-8")
            except UnicodeDecodeError:
                raise SecretUnavailable(f"{ref}: its binary value is not UTF-8 text") from None
        return checked(ref, _field(ref, text) if ref.key else text)


def _field(ref: SecretRef, text: str) -> str:
    """The string field ``ref.key`` of a JSON object (the errors never show the text)."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise SecretUnavailable(f"{ref}: the secret is not a JSON object, so it has no field {ref.key}")
    return _string_field(ref, document)


def _string_field(ref: SecretRef, document: Mapping[str, Any]) -> str:
    value = document.get(ref.key or "")
    if value is None:
        raise SecretUnavailable(f"{ref}: the secret has no field {ref.key}")
    if not isinstance(value, str):
        raise SecretUnavailable(f"{ref}: field {ref.key} is not a string")
    return value


class VaultKV:
    """Reads ``{vault: …}`` from KV v2 with hvac (blocking), logging in again when refused."""

    def __init__(self, settings: StoreSettings, environ: Mapping[str, str]) -> None:
        self._settings = settings
        self._environ = environ
        self._client: Any = None
        self._lock = threading.Lock()

    def _login(self) -> Any:
        import hvac  # only when a policy names a secret in Vault

        env, s = self._environ, self._settings
        address = env.get("VAULT_ADDR")
        if not address:
            raise SecretUnavailable("VAULT_ADDR is not set")
        token = env.get("VAULT_TOKEN", "") if s.vault_auth == "token" else ""
        if s.vault_auth == "token" and not token:
            raise SecretUnavailable("VAULT_TOKEN is not set (or set TRACEGATE_VAULT_AUTH=kubernetes or approle)")
        client = hvac.Client(
            url=address,
            token=token,  # never None: hvac would read VAULT_TOKEN or ~/.vault-token itself
            namespace=env.get("VAULT_NAMESPACE") or None,
            verify=env.get("VAULT_CACERT") or True,
            timeout=s.timeout,
        )
        mount = s.vault_auth_mount or s.vault_auth
        if s.vault_auth == "kubernetes":
            jwt = resolve(SecretRef("file", s.vault_k8s_token), env)
            client.auth.kubernetes.login(role=s.vault_role, jwt=jwt.reveal(), mount_point=mount)
        elif s.vault_auth == "approle" and s.vault_secret_id is not None:
            secret_id = resolve(s.vault_secret_id, env)
            client.auth.approle.login(role_id=s.vault_role, secret_id=secret_id.reveal(), mount_point=mount)
        return client

    def __call__(self, ref: SecretRef) -> Secret:
        import hvac.exceptions
        import requests

        for attempt in (1, 2):
            try:
                with self._lock:
                    if self._client is None:
                        self._client = self._login()
                    client = self._client
                answer = client.secrets.kv.v2.read_secret_version(
                    path=ref.name, mount_point=ref.mount or "secret", raise_on_deleted_version=True
                )
                data = answer["data"]["data"]
                break
            except SecretUnavailable as exc:
                raise _unreadable(ref, "Vault", str(exc)) from None
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
                with self._lock:
                    self._client = None  # a login's token expired or was revoked: log in again
                if attempt == 2 or self._settings.vault_auth == "token":
                    raise _unreadable(ref, "Vault", f"{type(exc).__name__}: permission denied") from None
            except hvac.exceptions.InvalidPath:
                raise _unreadable(ref, "Vault", "no such secret (or its version is deleted)") from None
            except (hvac.exceptions.VaultError, requests.RequestException, ValueError, KeyError, TypeError) as exc:
                raise _unreadable(ref, "Vault", type(exc).__name__) from None
        if not isinstance(data, dict):
            raise SecretUnavailable(f"{ref}: Vault answered without a KV v2 secret (is {ref.mount} a KV v2 mount?)")
        return checked(ref, _string_field(ref, data))


def _unreadable(ref: SecretRef, store: str, why: str) -> SecretUnavailable:
    return SecretUnavailable(f"{ref} could not be read from {store} ({why})")


@dataclass
class _Held:
    value: Secret
    read_at: float  # the clock's time of the last good read


class _StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.age = Gauge(
            "tracegate_secret_age_seconds",
            "Seconds since the secret-store value in use was read (the oldest of an account's of that kind); "
            "it grows while the store cannot be read.",
            ("kind", "service_account"),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.reads = Counter(
            "tracegate_secret_reads",
            "Secret-store reads by result: ok, changed, failed.",
            ("kind", "result"),
            registry=registry,
        )
        self.shown: set[tuple[str, str]] = set()


class SecretStores:
    """The values read from the stores for the serving policy, and their refresh.

    ``clock``: seconds, monotonic (ages). ``readers``: by kind, in place of the real clients.
    ``registry``: where the metrics go (created when a policy first names a store)."""

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        readers: Mapping[str, Reader] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = StoreSettings.load(environ)
        self._environ = environ
        self._readers = readers or {
            "aws_secret": AwsSecretsManager(self.settings, environ),
            "vault": VaultKV(self.settings, environ),
        }
        self._registry = registry
        self._metrics: _StoreMetrics | None = None
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - spreads refreshes in time, guards nothing
        self._held: dict[SecretRef, _Held] = {}
        #: The serving policy's store references, each with the account it is counted under.
        self._users: dict[SecretRef, str] = {}
        self._lock = threading.Lock()

    def environ(self, *, fresh: bool = True) -> SecretEnviron:
        """Where a policy load resolves its secrets: store references read now (``fresh``), or
        as last read (a reload for a value a refresh has just read)."""
        return SecretEnviron(self._environ, self.read if fresh else self.held)

    def read(self, ref: SecretRef) -> Secret:
        """The store's value now (blocking). A store that cannot be read answers with the last
        good value, logged with its age; with none, SecretUnavailable."""
        try:
            return self._read(ref)
        except SecretUnavailable as exc:
            with self._lock:
                held = self._held.get(ref)
            if held is None:
                raise
            self._stale(ref, held, exc)
            return held.value

    def held(self, ref: SecretRef) -> Secret:
        with self._lock:
            found = self._held.get(ref)
        return found.value if found is not None else self.read(ref)

    def serving(self, users: Mapping[SecretRef, str]) -> None:
        """The store references a newly installed policy names, each with the service account
        it counts under; values of any other are dropped."""
        with self._lock:
            self._users = {ref: user for ref, user in users.items() if ref.in_store}
            self._held = {ref: held for ref, held in self._held.items() if ref in self._users}
        self._show_ages()

    def next_delay(self) -> float:
        return self.settings.refresh * (1 - JITTER * self._rng.random())

    async def run(self, changed: Callable[[], Awaitable[object]]) -> None:
        """Refresh until cancelled; ``changed`` (the runtime's reload) when a value changed."""
        while True:
            await asyncio.sleep(self.next_delay())
            if not self._users:
                continue
            try:
                rotated = await asyncio.to_thread(self.refresh)
            except Exception:  # a refresher that died would leave rotation silently off: log, go on
                log.exception("secret refresh failed; the values read before keep serving")
                continue
            if rotated:
                log.info("a secret store has a new value for %s; reloading the policy with it", ", ".join(rotated))
                await changed()

    def refresh(self) -> list[str]:
        """Read every reference of the serving policy again (blocking); the ones whose value changed."""
        with self._lock:
            refs = list(self._users)
        rotated = []
        for ref in refs:
            with self._lock:
                before = self._held.get(ref)
            try:
                value = self._read(ref)
            except SecretUnavailable as exc:
                if before is not None:
                    self._stale(ref, before, exc)
                else:
                    log.warning("%s; it still has no value", exc)
                continue
            if before is None or before.value != value:
                rotated.append(str(ref))
        self._show_ages()
        return rotated

    def _read(self, ref: SecretRef) -> Secret:
        metrics = self._ensure_metrics()
        try:
            value = self._readers[ref.kind](ref)
        except SecretUnavailable:
            if metrics is not None:
                metrics.reads.labels(ref.kind, "failed").inc()
            raise
        with self._lock:
            before = self._held.get(ref)
            self._held[ref] = _Held(value, self._clock())
        changed = before is not None and before.value != value
        if metrics is not None:
            metrics.reads.labels(ref.kind, "changed" if changed else "ok").inc()
        return value

    def _stale(self, ref: SecretRef, held: _Held, exc: SecretUnavailable) -> None:
        age = self._clock() - held.read_at
        user = self._users.get(ref, "")
        extra = {"secret_kind": ref.kind, "service_account": user, "age_seconds": round(age, 1)}
        log.warning("%s; its last good value, read %.0f s ago, keeps serving", exc, age, extra=extra)
        self._show_ages()

    def _ensure_metrics(self) -> _StoreMetrics | None:
        with self._lock:  # the loader's thread and a refresh's may read at once
            if self._metrics is None and self._registry is not None:
                self._metrics = _StoreMetrics(self._registry)
            return self._metrics

    def _show_ages(self) -> None:
        """The age gauge for each (kind, account) the serving policy has; gone ones removed."""
        ages: dict[tuple[str, str], float] = {}
        with self._lock:
            now = self._clock()
            for ref, user in self._users.items():
                held = self._held.get(ref)
                if held is not None:
                    key = (str(ref.kind), user)
                    ages[key] = max(ages.get(key, 0.0), now - held.read_at)
        metrics = self._ensure_metrics() if ages else self._metrics
        if metrics is None:
            return
        for gone in metrics.shown - ages.keys():
            metrics.age.remove(*gone)
        for key, age in ages.items():
            metrics.age.labels(*key).set(age)
        metrics.shown = set(ages)
