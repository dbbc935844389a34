"""TLS for tracegate's listeners: one server context, built from the settings and reloaded
in place on SIGHUP.

TLS 1.2 and later only, with the standard library's default (forward-secret, AEAD) cipher
choice for TLS 1.2. With a client CA the listener asks every client for a certificate
signed by it (mTLS) and refuses the handshake without one. Reloading calls
``load_cert_chain`` on the same context: connections already open keep their session,
new handshakes present the new certificate — no listener is closed.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import ConfigError


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for ``files``. Raises ConfigError naming the file that failed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS")
    load(context, files)
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(files.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"TRACEGATE_TLS_CLIENT_CA={files.client_ca}: cannot read a CA bundle ({type(exc).__name__}); "
                "give a PEM file of the CA that signs client certificates"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load(context: ssl.SSLContext, files: TlsFiles) -> None:
    """(Re)load the certificate chain and key into ``context``. On failure the context keeps
    the chain it had, and ConfigError says which setting to fix."""
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TRACEGATE_TLS_CERT={files.cert} / TRACEGATE_TLS_KEY={files.key}: cannot load the certificate "
            f"and key ({type(exc).__name__}); give PEM files that match and that tracegate's user can read"
        ) from None
