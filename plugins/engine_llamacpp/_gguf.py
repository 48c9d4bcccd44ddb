"""What a GGUF file says about itself, read with the ``gguf`` package before llama.cpp loads it.

The header tells us whether the file is GGUF at all, the architecture, the parameter count,
the quantisation, the training context length, the embedding length, and whether the model
is an embedding model (a pooling type, non-causal attention, or an encoder-only architecture).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import msgspec

from kernel.errors import EngineError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField

__all__ = ["ENCODER_ARCHITECTURES", "GgufInfo", "find_model_file", "infer_model_type", "read_gguf"]

GGUF_MAGIC = b"GGUF"

# Architectures that only encode (no text generation): their GGUFs are embedding or rerank
# models. Names as gguf-py spells them (MODEL_ARCH_NAMES).
ENCODER_ARCHITECTURES = frozenset(
    {
        "bert",
        "modern-bert",
        "nomic-bert",
        "nomic-bert-moe",
        "neo-bert",
        "jina-bert-v2",
        "jina-bert-v3",
        "eurobert",
        "t5encoder",
    }
)

# llama.cpp's enum llama_pooling_type
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


class GgufInfo(msgspec.Struct, kw_only=True):
    """The header facts the engine records (and ``GET /v1/models/{id}`` shows)."""

    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None = None
    parameter_count: int = 0
    quantization: str | None = None
    context_length: int | None = None
    embedding_length: int | None = None
    block_count: int | None = None
    vocab_size: int | None = None
    pooling_type: str | None = None  # None: the file does not say
    causal_attention: bool | None = None  # None: the file does not say
    # tokenizer.chat_template, and the text of the BOS and EOS tokens the template refers to
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def metadata_model_type(self) -> str | None:
        """``embedding`` or ``llm`` when the metadata decides, None when it is silent."""
        if self.architecture in ENCODER_ARCHITECTURES:
            return "embedding"
        if self.pooling_type is not None and self.pooling_type != "none":
            return "embedding"
        if self.causal_attention is False:
            return "embedding"
        return None


def find_model_file(path: str) -> str:
    """``path`` itself, or for a directory the first ``.gguf`` file in it (as Kolosal does)."""
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise EngineError(f"Model file {path} does not exist.")
        return path
    candidates = sorted(
        entry.path
        for entry in os.scandir(path)
        if entry.is_file() and entry.name.lower().endswith(".gguf")
    )
    if not candidates:
        raise EngineError(f"No .gguf model file found in directory {path}.")
    return candidates[0]


def infer_model_type(info: GgufInfo, requested: str | None, model_id: str) -> str:
    """The request's type when it gave one; else the metadata's; else Kolosal's name heuristic
    ("embed" in the file name or model id means an embedding model)."""
    if requested in ("llm", "embedding"):
        return requested
    decided = info.metadata_model_type()
    if decided is not None:
        return decided
    names = (os.path.basename(info.path).lower(), model_id.lower())
    return "embedding" if any("embed" in name for name in names) else "llm"


def read_gguf(path: str) -> GgufInfo:
    """Read the header of ``path``; EngineError with a clear reason when it is not GGUF or the
    header is damaged. Blocking: call it in a worker thread."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise EngineError(
            f"{os.path.basename(path)} is not a GGUF file (it starts with {magic!r}, not "
            "b'GGUF'); the llama-cpp engine loads GGUF models only."
        )
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise EngineError(
            "The gguf package is not installed: pip install 'modelkernel[llamacpp]'"
        ) from exc
    try:
        reader = GGUFReader(path, "r")
        return _info(reader, path)
    except EngineError:
        raise
    except Exception as exc:  # a damaged header raises anything from numpy or gguf
        raise EngineError(
            f"{os.path.basename(path)} has a GGUF magic but its header is unreadable: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _info(reader: GGUFReader, path: str) -> GgufInfo:
    fields = reader.fields
    arch = _str(fields.get("general.architecture"))
    if not arch:
        raise EngineError(f"{os.path.basename(path)} has no general.architecture key.")
    version = _scalar(fields.get("GGUF.version"))
    causal = _scalar(fields.get(f"{arch}.attention.causal"))
    pooling = _scalar(fields.get(f"{arch}.pooling_type"))
    tokens = fields.get("tokenizer.ggml.tokens")
    template = _str(fields.get("tokenizer.chat_template"))
    return GgufInfo(
        path=path,
        file_size=os.path.getsize(path),
        gguf_version=int(version) if version is not None else 0,
        architecture=arch,
        name=_str(fields.get("general.name")),
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        quantization=_quantization(reader),
        context_length=_int(fields.get(f"{arch}.context_length")),
        embedding_length=_int(fields.get(f"{arch}.embedding_length")),
        block_count=_int(fields.get(f"{arch}.block_count")),
        vocab_size=len(tokens.data) if tokens is not None else None,
        pooling_type=POOLING_NAMES.get(int(pooling), str(pooling)) if pooling is not None else None,
        causal_attention=bool(causal) if causal is not None else None,
        chat_template=template or None,
        bos_token=_token(tokens, _int(fields.get("tokenizer.ggml.bos_token_id"))),
        eos_token=_token(tokens, _int(fields.get("tokenizer.ggml.eos_token_id"))),
    )


def _token(tokens: ReaderField | None, token_id: int | None) -> str:
    """The text of token ``token_id`` in the vocabulary, or "" when either is missing."""
    if tokens is None or token_id is None or not 0 <= token_id < len(tokens.data):
        return ""
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


def _quantization(reader: GGUFReader) -> str | None:
    """``general.file_type`` by name (``Q4_K_M``, ``F16``); without it, the commonest type
    among the 2-D tensors."""
    from gguf import GGMLQuantizationType, LlamaFileType

    file_type = _scalar(reader.fields.get("general.file_type"))
    if file_type is not None:
        try:
            name = LlamaFileType(int(file_type)).name
        except ValueError:
            return f"file_type {int(file_type)}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        if len(tensor.shape) >= 2:
            kind = GGMLQuantizationType(tensor.tensor_type).name
            counts[kind] = counts.get(kind, 0) + int(tensor.n_elements)
    return max(counts, key=lambda k: counts[k]) if counts else None


def _scalar(field: ReaderField | None) -> Any:
    """A numeric or boolean value, or None when the key is absent or not a scalar."""
    from gguf import GGUFValueType

    if (
        field is None
        or not field.types
        or field.types[0] in (GGUFValueType.ARRAY, GGUFValueType.STRING)
    ):
        return None
    return field.parts[field.data[0]][0].item()


def _int(field: ReaderField | None) -> int | None:
    value = _scalar(field)
    return int(value) if value is not None else None


def _str(field: ReaderField | None) -> str | None:
    from gguf import GGUFValueType

    if field is None or not field.types or field.types[0] != GGUFValueType.STRING:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
