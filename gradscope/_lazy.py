"""Names loaded on first use (PEP 562), for a package whose names live in heavier modules.

``import gradscope.analysis.remedies`` must work without torch, and importing one estimator must not
import every one; so packages list where each public name lives and load it when it is first read.
No imports but the standard library.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Dict, Iterable, Tuple

__all__ = ["lazy_names"]


def lazy_names(package: str, names: Dict[str, str],
               submodules: Iterable[str] = ()) -> Tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to the module (relative
    to the package) that defines it; ``submodules`` are loaded as attributes of their own name. A
    loaded value is stored in the package, so the lookup runs once per name.

    Example:
        >>> get, _ = lazy_names("json", {"JSONEncoder": ".encoder"})
        >>> get("JSONEncoder").__name__
        'JSONEncoder'
        >>> get("nope")
        Traceback (most recent call last):
        ...
        AttributeError: module 'json' has no attribute 'nope'
    """
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif name in subs:
            value = importlib.import_module("." + name, package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list:
        mod = sys.modules[package]
        return sorted(set(vars(mod)) | set(getattr(mod, "__all__", ())))

    return __getattr__, __dir__
