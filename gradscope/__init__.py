"""gradscope: see how far back your gradient reaches in PyTorch sequence models."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import GradscopeError

__all__ = ["GradscopeError", "__version__"]
