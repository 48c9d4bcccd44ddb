"""Tiny GGUF models for engine tests, written with ``gguf.GGUFWriter``.

A llama-architecture model with random weights (about 330 KB): 2 blocks, 64-wide embeddings,
a SentencePiece ("llama") vocabulary of <unk>/<s>/</s>, the 256 byte-fallback tokens and a
hundred word pieces. The output rows of the special and byte tokens are zero and the word rows
large, so generation always emits words (never an instant end-of-text or a stray byte) and a
completion is non-empty text. The LLM carries a small chat template (``CHAT_TEMPLATE``) in
``tokenizer.chat_template`` unless ``chat_template=None``. The embedding variant is the same
network with ``llama.pooling_type = mean`` and non-causal attention, which is how llama.cpp
(and the engine) tells an embedding model from an LLM.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

__all__ = [
    "CHAT_TEMPLATE",
    "EMBEDDING_LENGTH",
    "corrupt_gguf_bytes",
    "tiny_embedding_bytes",
    "tiny_llama_bytes",
    "tiny_split_llama",
    "token_id",
    "token_ids",
    "write_tiny_model",
]

EMBEDDING_LENGTH = 64
CONTEXT_LENGTH = 256
N_LAYERS = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128

# "<s>user: hi\nassistant:" -- plain words, as the tiny vocabulary has no chat tokens
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
_WORDS = (  # noqa: SIM905 - a sentence of words reads better than 120 quoted strings
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "hello world model kernel"
).split()


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + word for word in dict.fromkeys(_WORDS)]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    # SentencePiece scores: higher wins when merging; longer pieces first.
    scores = [0.0] * (3 + 256) + [-100.0 + len(p) for p in pieces]
    return tokens, scores, types


N_TENSORS = 1 + 9 * N_LAYERS + 2


def token_id(word: str) -> int:
    """The id of the word piece ``"\u2581" + word``, one token of generated text (the
    tokenizer itself never merges letters into words: text tokenizes letter by letter)."""
    return _vocab()[0].index("\u2581" + word)


def token_ids(text: str) -> list[int]:
    """What llama.cpp tokenizes ``text`` (lower-case letters and spaces) to: BOS, then a
    "\u2581" for the leading space and each space, and one token per letter."""
    vocab = _vocab()[0]
    return [1] + [vocab.index(c) for c in ("\u2581" + text).replace(" ", "\u2581")]


def write_tiny_model(
    path: Path,
    *,
    embedding: bool = False,
    seed: int = 7,
    split_max_tensors: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    context_length: int = CONTEXT_LENGTH,
    width: int = EMBEDDING_LENGTH,
) -> Path:
    """Write a tiny llama GGUF (an embedding variant with ``embedding=True``) to ``path``.
    With ``split_max_tensors`` gguf's split writer makes shards beside it instead
    (``<stem>-00001-of-0000N.gguf``...; each with ``split.no`` / ``split.count``).
    ``context_length`` and ``width`` (the embedding length) make larger, slower ones."""
    import gguf

    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = width // N_HEAD

    def matrix(rows: int, cols: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float16)

    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny-embed" if embedding else "tiny-llama")
    writer.add_context_length(context_length)
    writer.add_embedding_length(width)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF * width // EMBEDDING_LENGTH)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if embedding:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
        writer.add_causal_attention(False)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None and not embedding:
        writer.add_chat_template(chat_template)

    n_ff = N_FF * width // EMBEDDING_LENGTH
    ones = np.ones(width, dtype=np.float32)
    writer.add_tensor("token_embd.weight", matrix(n_vocab, width, 1.0))
    kv = N_HEAD_KV * head_dim
    for i in range(N_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(width, width))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv, width))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv, width))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(width, width))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, width))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, width))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(width, n_ff))
    writer.add_tensor("output_norm.weight", ones)
    output = matrix(n_vocab, width, 3.0)
    output[: 3 + 256 + 1] = 0  # special, byte and bare-space tokens never win: words do
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_split_llama(tmp_dir: Path, stem: str, shards: int = 3, seed: int = 7) -> dict[str, bytes]:
    """The tiny llama split into ``shards`` GGUF files by gguf's writer: name -> bytes, in
    shard order (``<stem>-00001-of-00003.gguf``, ...)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    per_shard = -(-N_TENSORS // shards)
    write_tiny_model(tmp_dir / f"{stem}.gguf", seed=seed, split_max_tensors=per_shard)
    names = [f"{stem}-{i:05d}-of-{shards:05d}.gguf" for i in range(1, shards + 1)]
    return {name: (tmp_dir / name).read_bytes() for name in names}


def tiny_llama_bytes(tmp_dir: Path) -> bytes:
    return write_tiny_model(tmp_dir / "tiny-llama.gguf").read_bytes()


def tiny_embedding_bytes(tmp_dir: Path) -> bytes:
    return write_tiny_model(tmp_dir / "tiny-embed.gguf", embedding=True).read_bytes()


def corrupt_gguf_bytes() -> bytes:
    """The GGUF magic and version 3, then a header that claims a 200-byte key in 30 bytes."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    return header + struct.pack("<Q", 200) + b"general.architecture" + b"\x00" * 10
