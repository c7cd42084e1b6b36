"""A block's call: which argument is its hidden state, and that state as ``[B, P, features]``.

Used by the attention capture (to measure the gradient at a block's input) and by the depth
Jacobians of :mod:`gradscope.measure.depth` (to re-run a block on a perturbed input). An argument
is addressed as ``("a", position)`` or ``("k", keyword)``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor

__all__ = ["block_view", "hidden_index", "call_arg", "replace_arg"]

_HIDDEN_KEYS = ("hidden_states", "src", "tgt", "x", "query", "input", "inputs", "inputs_embeds")


def block_view(t: Tensor, batch_first: bool) -> Optional[Tensor]:
    """A block input/output as ``[B, P, features]``."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() < 2:
        return None
    if not batch_first:
        t = t.transpose(0, 1)
    return t.flatten(2) if t.dim() > 3 else t


def hidden_index(args, kwargs) -> Optional[Tuple[str, Any]]:
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("a", i)
    for k in _HIDDEN_KEYS:
        v = kwargs.get(k)
        if isinstance(v, Tensor) and v.is_floating_point():
            return ("k", k)
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            return ("k", k)
    return None


def call_arg(args, kwargs, idx):
    """The argument at ``idx`` (``("a", position)`` or ``("k", name)``) of a recorded call."""
    return args[idx[1]] if idx[0] == "a" else kwargs[idx[1]]


def replace_arg(args, kwargs, old, new):
    """Every argument that *is* ``old`` becomes ``new`` (keeps q is k is v identities)."""
    return (tuple(new if a is old else a for a in args),
            {k: (new if v is old else v) for k, v in kwargs.items()})
