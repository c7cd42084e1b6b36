"""Gradient norms as capture takes them: on the gradient's device, accumulated in float64.

A finite float32 gradient with entries from about 1e19 up has a sum of squares beyond float32's
range: its float32 norm is inf although nothing is non-finite. Norms here accumulate in float64
(float32 on MPS, which has no float64), so a finite gradient always has a finite norm and only a
NaN or inf entry gives a NaN or inf norm.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

# torch._foreach_norm: the multi-tensor norm clip_grad_norm_ uses (private, present since torch 1.13)
_FOREACH_NORM = getattr(torch, "_foreach_norm", None)

__all__ = ["wide", "norm", "norms"]


def wide(device: torch.device) -> torch.dtype:
    """The dtype norms accumulate in: float64 (float32 on MPS, which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def norm(g: Tensor) -> Tensor:
    """Frobenius norm of ``g`` on its device, accumulated and returned in float64.

    Example:
        >>> n = norm(torch.full((100,), 3e37))   # the float32 norm is inf
        >>> n.dtype, f"{float(n):.3g}"
        (torch.float64, '3e+38')
    """
    return torch.linalg.vector_norm(g, dtype=wide(g.device))


def norms(ts: List[Tensor]) -> Tensor:
    """:func:`norm` of every tensor of a (non-empty) list, as one ``[len(ts)]`` tensor: one
    multi-tensor kernel where torch has one."""
    dt = wide(ts[0].device)
    if _FOREACH_NORM is not None:
        try:
            return torch.stack(_FOREACH_NORM(ts, 2, dtype=dt))
        except (TypeError, RuntimeError):   # older torch: no dtype= for _foreach_norm
            pass
    return torch.stack([torch.linalg.vector_norm(t, dtype=dt) for t in ts])
