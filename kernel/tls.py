"""Which certificates the downloader trusts, and what a failed TLS check says.

The trust store, first match wins:

1. ``network.ca_bundle`` in the config: a PEM file, or a directory of hashed certificates
   (``c_rehash``), used instead of any other store;
2. ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` in the environment (the convention of OpenSSL, curl and
   requests), likewise instead of any other store;
3. the system's trust store through ``truststore`` (the operating system's verifier on macOS
   and Windows, the distribution's CA bundle on Linux), when it is installed and the system
   has a store;
4. certifi's copy of Mozilla's CA bundle.

One context per trust configuration is built and shared by every connection (loading a CA
bundle costs milliseconds and about a megabyte). A certificate that fails verification is a
:class:`~kernel.errors.PermanentError` naming the host and the reason (expired, not yet valid,
unknown issuer, name mismatch): retrying cannot fix it.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping

import certifi

from kernel.errors import PermanentError

__all__ = ["describe_tls_failure", "tls_context", "tls_failure", "trust_source"]

_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, BSDs
)

# X509_V_ERR_* codes, as OpenSSL reports them in SSLCertVerificationError.verify_code.
_REASONS = {
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "a self-signed certificate in the chain is not trusted (unknown CA)",
    20: "the certificate's issuer is not trusted (unknown CA)",
    21: "the certificate's issuer is not trusted (unknown CA)",
    62: "the certificate does not name this host (name mismatch)",
    64: "the certificate does not name this address (name mismatch)",
}
_UNKNOWN_CA = (18, 19, 20, 21)
_HINT = (
    " If the server uses a private CA, point SSL_CERT_FILE (or the network.ca_bundle setting) "
    "at a PEM bundle that includes it."
)


def trust_source(ca_bundle: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Where trust comes from, in words (for logs and error messages)."""
    env = os.environ if environ is None else environ
    if ca_bundle:
        return f"network.ca_bundle ({ca_bundle})"
    if env.get("SSL_CERT_FILE") or env.get("SSL_CERT_DIR"):
        named = [f"{k}={env[k]}" for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if env.get(k)]
        return " ".join(named)
    if _truststore_usable():
        return "the system trust store"
    return "certifi's CA bundle"


def tls_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """The shared verifying client context for the current trust configuration."""
    env = os.environ
    return _context(ca_bundle or None, env.get("SSL_CERT_FILE") or None,
                    env.get("SSL_CERT_DIR") or None)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _context(ca_bundle: str | None, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    if ca_bundle:
        if os.path.isdir(ca_bundle):
            return _verifying(capath=ca_bundle)
        return _verifying(cafile=ca_bundle)
    if cert_file or cert_dir:
        return _verifying(cafile=cert_file, capath=cert_dir)
    if _truststore_usable():
        import truststore

        ctx = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _tune(ctx)
        return ctx
    return _verifying(cafile=certifi.where())


def _verifying(*, cafile: str | None = None, capath: str | None = None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        where = cafile or capath
        raise PermanentError(f"Cannot load the CA certificates from {where}: {exc}.") from exc
    _tune(ctx)
    return ctx


def _tune(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])


@functools.cache
def _truststore_usable() -> bool:
    """truststore is installed, and on Linux there is a system bundle for it to read."""
    try:
        import truststore  # noqa: F401
    except ImportError:
        return False
    if os.name != "posix" or os.uname().sysname != "Linux":
        return True
    paths = ssl.get_default_verify_paths()
    candidates = (*_SYSTEM_BUNDLES, paths.cafile or "", paths.openssl_cafile)
    return any(c and os.path.isfile(c) for c in candidates)


def describe_tls_failure(exc: BaseException) -> str | None:
    """Why a certificate was refused, in words; None when ``exc`` is no certificate failure."""
    found = _cert_error(exc)
    if found is None:
        return None
    code = getattr(found, "verify_code", 0)
    reason = _REASONS.get(code) or (getattr(found, "verify_message", "") or str(found))
    return reason + (_HINT if code in _UNKNOWN_CA else "")


def tls_failure(exc: BaseException, host: str) -> PermanentError | None:
    """The permanent error for a refused certificate (or a TLS handshake the server broke off
    with a protocol error); None when ``exc`` is something else (a network fault)."""
    reason = describe_tls_failure(exc)
    if reason is not None:
        return PermanentError(f"TLS certificate check failed for {host}: {reason}")
    proto = _handshake_error(exc)
    if proto is not None:
        return PermanentError(f"TLS handshake with {host} failed: {proto}")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen and len(seen) < 10:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    for node in _chain(exc):
        if isinstance(node, ssl.SSLCertVerificationError):
            return node
    return None


def _handshake_error(exc: BaseException) -> str | None:
    """An SSLError that is about the protocol (wrong version, no shared cipher, an alert),
    not a connection that dropped (EOF, reset), which is worth a retry."""
    for node in _chain(exc):
        if isinstance(node, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
            return None
        if isinstance(node, ssl.SSLError):
            reason = getattr(node, "reason", None) or str(node)
            return str(reason).replace("_", " ").lower()
    return None
