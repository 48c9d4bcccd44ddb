"""Kolosal ``loading_parameters`` -> ``llama_cpp.Llama`` keyword arguments.

Kolosal accepts llama.cpp's whole ``common_params`` set; llama-cpp-python exposes a subset.
Mapped names are type-checked at request time (a bad value is a 400 naming the field). Names
llama-cpp-python has no equivalent for (``n_keep``, ``n_parallel``, ``cont_batching``,
``warmup``, ...) are accepted and ignored, as are any others, so a Kolosal config works as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kernel.errors import InvalidRequest

__all__ = ["IGNORED", "MAPPED", "check_parameters", "llama_kwargs"]

# Kolosal name -> (llama_cpp.Llama keyword, expected type)
MAPPED: dict[str, tuple[str, type]] = {
    "n_ctx": ("n_ctx", int),
    "n_batch": ("n_batch", int),
    "n_ubatch": ("n_ubatch", int),
    "n_gpu_layers": ("n_gpu_layers", int),
    "split_mode": ("split_mode", int),
    "use_mmap": ("use_mmap", bool),
    "use_mlock": ("use_mlock", bool),
    "n_threads": ("n_threads", int),
    "n_threads_batch": ("n_threads_batch", int),
    "seed": ("seed", int),
    "rope_scaling_type": ("rope_scaling_type", int),
    "rope_freq_base": ("rope_freq_base", float),
    "rope_freq_scale": ("rope_freq_scale", float),
    "yarn_ext_factor": ("yarn_ext_factor", float),
    "yarn_attn_factor": ("yarn_attn_factor", float),
    "yarn_beta_fast": ("yarn_beta_fast", float),
    "yarn_beta_slow": ("yarn_beta_slow", float),
    "yarn_orig_ctx": ("yarn_orig_ctx", int),
    "flash_attn": ("flash_attn", bool),
    "pooling_type": ("pooling_type", int),
    "swa_full": ("swa_full", bool),
    "no_perf": ("no_perf", bool),
    "logits_all": ("logits_all", bool),  # keeps every token's logits: needed for logprobs
    "cache_type_k": ("type_k", int),
    "cache_type_v": ("type_v", int),
}
# Kolosal names whose meaning is inverted in llama-cpp-python.
INVERTED: dict[str, str] = {"no_kv_offload": "offload_kqv", "no_op_offload": "op_offload"}
# Kolosal parameters with no llama-cpp-python equivalent: accepted, documented, ignored.
IGNORED = frozenset(
    {
        "n_keep",
        "n_parallel",
        "cont_batching",
        "warmup",
        "n_sequences",
        "n_chunks",
        "grp_attn_n",
        "grp_attn_w",
        "defrag_thold",
        "check_tensors",
        "kv_unified",
        "ctx_shift",
        "no_extra_bufts",
        "embedding",
        "main_gpu",
    }
)

DEFAULT_N_CTX = 4096  # Kolosal's default; capped at the model's training context
DEFAULT_N_GPU_LAYERS = -1  # Kolosal's default: offload every layer a GPU build can
SPLIT_MODE_NONE = 0  # the whole model on main_gpu, so main_gpu_id takes effect
SPLIT_MODE_LAYER = 1


def _check(name: str, value: Any, kind: type) -> Any:
    param = f"loading_parameters.{name}"
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise InvalidRequest(
            f"loading_parameters.{name} must be {kind.__name__}, got {value!r}.", param=param
        )
    return kind(value)


def check_parameters(params: Mapping[str, Any], *, prefix: str = "") -> None:
    """Type-check the parameters this engine maps; InvalidRequest names the field."""
    try:
        llama_kwargs(params, main_gpu=0, embedding=False, context_length=None)
    except InvalidRequest as exc:
        exc.param = prefix + (exc.param or "loading_parameters")
        raise


def llama_kwargs(
    params: Mapping[str, Any], *, main_gpu: int, embedding: bool, context_length: int | None
) -> dict[str, Any]:
    """The keyword arguments for ``llama_cpp.Llama`` (before dropping ones it lacks)."""
    # n_ctx 0 is passed through: llama.cpp then uses the model's training context.
    n_ctx = DEFAULT_N_CTX if context_length is None else min(DEFAULT_N_CTX, context_length)
    kwargs: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_gpu_layers": DEFAULT_N_GPU_LAYERS,
        "split_mode": SPLIT_MODE_NONE,
        "main_gpu": max(main_gpu, 0),
        "embedding": embedding,
        "verbose": False,
    }
    for name, value in params.items():
        if name in MAPPED:
            target, kind = MAPPED[name]
            kwargs[target] = _check(name, value, kind)
        elif name in INVERTED:
            kwargs[INVERTED[name]] = not _check(name, value, bool)
        elif name == "tensor_split":
            if not isinstance(value, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise InvalidRequest(
                    "loading_parameters.tensor_split must be a list of numbers.",
                    param="loading_parameters.tensor_split",
                )
            kwargs["tensor_split"] = [float(v) for v in value] or None
        elif name == "chat_template":
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequest(
                    "loading_parameters.chat_template must be a non-empty Jinja2 template.",
                    param="loading_parameters.chat_template",
                )  # used by the engine for /v1/chat/completions, not passed to llama.cpp
        elif name in ("cpuparams", "cpuparams_batch") and isinstance(value, dict):
            threads = value.get("n_threads")
            if threads is not None and _check(f"{name}.n_threads", threads, int) > 0:
                kwargs["n_threads" if name == "cpuparams" else "n_threads_batch"] = threads
    if "tensor_split" in kwargs and "split_mode" not in params:
        kwargs["split_mode"] = SPLIT_MODE_LAYER  # a split asked for: spread layers over GPUs
    return kwargs
