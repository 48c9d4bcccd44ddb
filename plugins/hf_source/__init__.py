"""hf_source: files of Hugging Face hub repositories.

Claims ``hf://owner/repo/path/in/repo.gguf[@revision]`` references, repository references
(``hf://owner/repo[@revision]`` plus a ``filename`` name or pattern), and resolve URLs on
huggingface.co or on the configured endpoint. It is ``tryfirst``, so hub URLs reach it before
http_source. Reads ``sources.huggingface.endpoint`` (else ``HF_ENDPOINT``, else
https://huggingface.co), ``sources.huggingface.token`` (else ``HF_TOKEN``, else the token file
of huggingface_hub), ``downloads.stall_timeout_s``, ``network.ca_bundle`` and the destination
policy (``network.allow`` / ``deny`` / ``deny_private``, for the hub and the CDN alike).
"""

from __future__ import annotations

from kernel import hookimpl
from kernel.config import Settings
from kernel.netpolicy import NetPolicy
from kernel.types import Source
from plugins.hf_source._ref import HubRef, configured_token, hub_endpoint
from plugins.hf_source.source import HubSource

__all__ = ["HubRef", "HubSource", "resolve_source"]


@hookimpl(tryfirst=True)
def resolve_source(ref: str, settings: Settings) -> Source | None:
    hub = settings.sources.huggingface
    endpoint = hub_endpoint(hub.endpoint)
    hub_ref = HubRef.parse(ref, endpoint)  # None unless ref is hf://... or a resolve URL
    if hub_ref is None:
        return None
    return HubSource(
        hub_ref,
        ref=ref,
        endpoint=endpoint,
        token=configured_token(hub.token),
        stall_timeout_s=settings.downloads.stall_timeout_s,
        ca_bundle=settings.network.ca_bundle,
        policy=NetPolicy(settings.network),
    )
