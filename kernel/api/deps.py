"""Typed dependency markers for handlers: ``downloads: Downloads``, ``kernel: KernelDep``."""

from __future__ import annotations

from typing import TypeAlias

from litestar.di import NamedDependency

from kernel.core import Kernel
from kernel.downloads import DownloadManager

__all__ = ["Downloads", "KernelDep"]

Downloads: TypeAlias = NamedDependency[DownloadManager]
KernelDep: TypeAlias = NamedDependency[Kernel]
