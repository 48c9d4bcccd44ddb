"""modelkernel: a plugin-based model-management microkernel.

Plugins import only these public names: :data:`hookimpl`, :mod:`kernel.types`,
:mod:`kernel.errors` (and :mod:`kernel.config` for the Settings they are handed).
"""

from __future__ import annotations

from kernel.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
__version__ = "0.1.0"
