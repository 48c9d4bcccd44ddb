"""http_source: fetches ``http://`` and ``https://`` URLs: probes with httpx, bodies on the
fast path (a blocking socket read by the kernel's byte loop in a worker thread).

Reads ``downloads.stall_timeout_s`` (the read timeout: no byte for that long is a transient
fault), ``network.ca_bundle`` (the CAs trusted for https, see kernel/tls.py) and the
destination policy ``network.allow`` / ``network.deny`` / ``network.deny_private``
(kernel/netpolicy.py), checked on every connection. Redirects are
followed; resumes use ``Range`` + ``If-Range``; HTTPS_PROXY/HTTP_PROXY/NO_PROXY are honoured.
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.config import Settings
from kernel.httpclient import HttpSource
from kernel.netpolicy import NetPolicy
from kernel.types import Source

__all__ = ["HttpSource", "resolve_source"]


@hookimpl
def resolve_source(ref: str, settings: Settings) -> Source | None:
    if not ref.lower().startswith(("http://", "https://")):
        return None
    policy = NetPolicy(settings.network)
    return HttpSource(
        ref,
        stall_timeout_s=settings.downloads.stall_timeout_s,
        ca_bundle=settings.network.ca_bundle,
        policy=policy,
    )
