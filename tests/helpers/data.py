"""Test payloads: deterministic bytes that no two (size, seed) pairs share."""

from __future__ import annotations

import hashlib

__all__ = ["blob"]


def blob(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed (no run of zeros a bug could
    hide in, and a distinct file per seed)."""
    return hashlib.shake_256(f"modelkernel-{seed}".encode()).digest(size)
