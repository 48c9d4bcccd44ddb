"""Split GGUF models: the ``split.*`` metadata checked at verification, and the header check.

llama.cpp (``gguf-split``, ``gguf.GGUFWriter(split_max_*)``) writes a large model as
``<name>-00001-of-00003.gguf``, ``-00002-of-...``: every shard is a GGUF file whose key/value
header holds ``split.no`` (0-based) and ``split.count``, and the loader is given the first
shard and opens the others beside it. A set is complete when it has exactly ``split.count``
shards, shard ``i`` saying ``split.no = i``.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from kernel.errors import PermanentError

__all__ = ["check_gguf_header", "check_split", "read_split"]

MAX_KV = 1 << 20  # more keys than any real header: a corrupt file, not a model
# Sizes of the fixed-width GGUF value types, by type id; 8 = string, 9 = array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (1, 2, 3)


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("its header ends early")
    return data


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _skip_string(f: BinaryIO, size: int) -> None:
    length = _u64(f)
    if length > size:
        raise ValueError("a string in its header is longer than the file")
    f.seek(length, os.SEEK_CUR)


def _skip_value(f: BinaryIO, kind: int, size: int) -> None:
    if kind in _FIXED:
        f.seek(_FIXED[kind], os.SEEK_CUR)
    elif kind == 8:
        _skip_string(f, size)
    elif kind == 9:
        item = int(struct.unpack("<I", _read(f, 4))[0])
        count = _u64(f)
        if count > size:
            raise ValueError("an array in its header is longer than the file")
        if item in _FIXED:
            f.seek(_FIXED[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, item, size)
    else:
        raise ValueError(f"its header has a value of unknown type {kind}")


def read_split(path: str) -> tuple[int, int] | None:
    """``(split.no, split.count)`` from a GGUF file's header; None when it has neither
    (a model in one file). Raises ValueError for a header that cannot be read. Blocking."""
    size = os.path.getsize(path)
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise ValueError("bad magic number")
        version = int(struct.unpack("<I", _read(f, 4))[0])
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        _u64(f)  # tensor count
        kv_count = _u64(f)
        if kv_count > MAX_KV:
            raise ValueError(f"its header claims {kv_count} keys")
        for _ in range(kv_count):
            length = _u64(f)
            if length > 65535:
                raise ValueError("a key in its header is too long")
            key = _read(f, length).decode("utf-8", "replace")
            kind = int(struct.unpack("<I", _read(f, 4))[0])
            if key in ("split.no", "split.count") and kind in _INT_FORMATS:
                fmt = _INT_FORMATS[kind]
                found[key] = int(struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0])
                if len(found) == 2:
                    break
            else:
                _skip_value(f, kind, size)
    if not found:
        return None
    if len(found) != 2:
        raise ValueError("it has only one of split.no and split.count")
    return found["split.no"], found["split.count"]


def check_split(paths: list[str]) -> None:
    """Check that ``paths`` (in shard order) are exactly the shards of one split model.
    Raises PermanentError naming the missing, extra or misplaced shard. Blocking."""
    names = [os.path.basename(p) for p in paths]
    for index, path in enumerate(paths):
        try:
            split = read_split(path)
        except (OSError, ValueError) as exc:
            raise PermanentError(
                f"Cannot read the split metadata of shard {names[index]}: {exc}."
            ) from exc
        if split is None:
            if len(paths) == 1:
                return
            raise PermanentError(
                f"Shard {names[index]} has no split.count / split.no metadata: it is not a "
                f"shard of a split GGUF model, so the set of {len(paths)} files is not one model."
            )
        no, count = split
        if count != len(paths):
            more = "missing" if count > len(paths) else "extra"
            raise PermanentError(
                f"The model is split into {count} shards (split.count in {names[index]}) but "
                f"the download has {len(paths)} ({', '.join(names)}): "
                f"{abs(count - len(paths))} shard(s) {more}."
            )
        if no != index:
            raise PermanentError(
                f"Shard {names[index]} says it is shard {no + 1} of {count} (split.no = {no}), "
                f"not shard {index + 1}: the shards do not belong together."
            )


def check_gguf_header(path: str) -> None:
    """The file at ``path`` starts like a GGUF model (magic and a known version); raises
    PermanentError saying why not. Blocking."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        problem = "bad magic number"
    elif int.from_bytes(head[4:8], "little") not in GGUF_VERSIONS:
        problem = f"unsupported GGUF version {int.from_bytes(head[4:8], 'little')}"
    else:
        return
    raise PermanentError(f"The downloaded file is not a valid GGUF model ({problem}).")
