"""Shard names of split GGUF models, as llama.cpp writes them: ``<name>-00001-of-00003.gguf``.

hf_source reads them to pull a whole shard set from a repository listing; the engine that
loads the model (engine_llamacpp) checks the set itself once it is downloaded.
"""

from __future__ import annotations

import re

__all__ = ["ShardName", "shard_name"]

_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class ShardName:
    """What a shard's file name says: ``prefix-NNNNN-of-MMMMM.gguf`` (``no`` is 1-based)."""

    __slots__ = ("count", "no", "prefix")

    def __init__(self, prefix: str, no: int, count: int) -> None:
        self.prefix, self.no, self.count = prefix, no, count


def shard_name(path: str) -> ShardName | None:
    """The shard a path names (its last component), or None for any other file."""
    match = _SHARD.match(path.rsplit("/", 1)[-1])
    if match is None:
        return None
    no, count = int(match["no"]), int(match["count"])
    if not 1 <= no <= count:
        return None
    prefix = path[: len(path) - len(match.group(0))] + match["prefix"]
    return ShardName(prefix, no, count)
