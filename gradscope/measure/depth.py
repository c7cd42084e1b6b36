"""Depth Jacobians of attention stacks: how a perturbation of a block's input reaches later blocks.

The blocks of a stack are composed as a recurrence over depth (block ℓ is step ℓ), with the calls
recorded in one forward pass, and :func:`~gradscope.estimators.jacobian_norms` measures the RMS gain
‖∂x_L/∂x_{L−k}‖_F/√N for every lag k. :class:`~gradscope.capture.watch.Scope` runs it on its probe
schedule (through the attention capture, which holds the recorded calls).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from ..capture.attention.calls import block_view, call_arg
from ..capture.attention.hf import without_cache
from ..capture.attention.layout import AttentionLayout, Block
from ..capture.sites import flatten_tensors
from ..estimators import decay_rate, jacobian_norms

__all__ = ["depth_jacobians", "block_chain_jacobians"]

_EXACT_MAX_N, _PROBES = 512, 64  # exact Frobenius up to this state size P·E, else probes
# masks shaped [T, S], shared by every sample of the batch
_SQUARE_MASKS = frozenset({"src_mask", "tgt_mask", "memory_mask", "attn_mask", "mask"})


@torch.no_grad()
def depth_jacobians(layout: AttentionLayout, wanted_blocks: Dict[str, Block], calls_by_site: Dict[str, Dict[str, Any]],
                    *, jacobians: bool = True, jacobian_samples: int = 4, threshold: float = 1e-3,
                    progress=None, **_other) -> Tuple[Dict[Tuple[str, str], np.ndarray], Dict[str, Any], List[str]]:
    """Depth Jacobians ‖∂x_L/∂x_{L−k}‖ of every stack whose blocks are all wanted, on one pass's batch.

    Args:
        layout: the model's attention layout (stacks of blocks).
        wanted_blocks: block name -> block, the blocks being watched.
        calls_by_site: block site -> its recorded call in the probed pass (``x``, ``y``, ``args``,
            ``kwargs``, ``idx``, ``bf``, ``pad``).
        jacobians, jacobian_samples, threshold, progress: as in :func:`gradscope.probe` (the other
            probe options, ``lyapunov`` and ``k``, do not apply to depth).

    Returns:
        ``(measures {(stack, "depth_jacobian_norms"): [S, L+1]}, meta {stack: {"depth_jacobian": …}}, notes)``.
    """
    notes: List[str] = []
    measures: Dict[Tuple[str, str], np.ndarray] = {}
    meta: Dict[str, Any] = {}
    if not jacobians:
        return measures, meta, notes
    for stack, names in layout.stacks.items():
        blks = [layout.blocks[b] for b in names if b in wanted_blocks]
        if not blks or len(blks) != len(names):
            continue
        calls = [calls_by_site.get(b.site) for b in blks]
        label = stack or "(model)"
        if any(c is None for c in calls):
            missing = [b.site for b, c in zip(blks, calls) if c is None]
            notes.append(f"attention stack {label!r}: blocks {missing} did not run with gradients in the "
                         f"probed pass; no depth Jacobians.")
            continue
        chained = all(calls[i + 1]["x"] is calls[i]["y"] or
                      (calls[i]["y"] is not None and calls[i + 1]["x"].shape == calls[i]["y"].shape and
                       torch.equal(calls[i + 1]["x"].detach(), calls[i]["y"].detach()))
                      for i in range(len(calls) - 1))
        if not all(bool(torch.isfinite(t).all()) for b in blks
                   for t in list(b.module.parameters()) + list(b.module.buffers()) + [calls[0]["x"]]
                   if t.is_floating_point()):
            notes.append(f"attention stack {label!r}: not measured: its weights or inputs hold NaN or inf; "
                         f"depth Jacobians need finite values.")
            continue
        try:
            arr, info = block_chain_jacobians(blks, calls, jacobian_samples, progress)
        except Exception as e:  # noqa: BLE001 - the user's run goes on
            notes.append(f"attention stack {label!r}: depth Jacobians failed ({type(e).__name__}: {e}).")
            continue
        fit = decay_rate(arr, threshold=threshold)
        info.update({"rate": fit.rate, "horizon": fit.horizon, "explosion_lag": fit.explosion_lag,
                     "threshold": threshold, "chained": bool(chained)})
        if info.get("stored_dtype"):
            notes.append(f"attention stack {label!r}: weights stored in {info['stored_dtype']}; depth "
                         f"Jacobians measured in {info['working_dtype']}.")
        if not chained:
            notes.append(f"attention stack {label!r}: something runs between its blocks (block ℓ+1 does "
                         f"not receive block ℓ's output), so the depth Jacobians compose the blocks alone.")
        measures[(stack, "depth_jacobian_norms")] = arr
        meta[stack] = {"depth_jacobian": info}
    return measures, meta, notes


def block_chain_jacobians(blks: List[Block], calls: List[Dict[str, Any]], samples: int, progress):
    """RMS gains ‖J‖_F/√N of the blocks' chained map over depth lags, on ``samples`` samples: ``([S, L+1], info)``."""

    first = calls[0]
    bf = first["bf"]
    x0 = block_view(first["x"].detach(), bf)
    # half-precision blocks run from float32 copies of their weights (the modules are left as they
    # are): products of Jacobians need float32's range and resolution
    low = (torch.float16, torch.bfloat16)
    stored = next((t.dtype for b in blks for t in list(b.module.parameters()) + [x0] if t.dtype in low), None)
    params32 = None
    if stored is not None:
        params32 = [{n: (t.detach().float() if t.dtype in low else t)
                     for n, t in list(b.module.named_parameters()) + list(b.module.named_buffers())}
                    for b in blks]
        x0 = x0.float()
    B, P = x0.shape[0], x0.shape[1]
    feat = x0.shape[2:]
    nb = max(1, min(B, samples, 2))
    N = int(P * int(np.prod(feat)))
    pad = first["pad"]
    if pad is not None and not bool(pad[:nb].any()):  # the probe may synchronise; the step may not
        pad = None
    keep = None if pad is None else (~pad[:nb]).to(x0.dtype)[:, :, None]           # [nb, P, 1]
    modes = [(m, m.training) for b in blks for m in b.module.modules()]
    for b in blks:
        b.module.eval()

    def fit_batch(obj, r, name=""):
        """Slice an argument to the probed samples and repeat it for the folded batch."""
        if isinstance(obj, Tensor) and params32 is not None and obj.dtype in low:
            obj = obj.float()
        if isinstance(obj, Tensor) and obj.dim() >= 1:
            if obj.dim() == 2 and name in _SQUARE_MASKS:
                return obj  # [T, S] masks shared by every sample
            dim = 1 if (not bf and obj.dim() == 3 and obj.shape[1] == B) else 0
            if obj.shape[dim] != B:
                return obj
            o = obj.narrow(dim, 0, nb)
            return o.repeat_interleave(r, dim=dim) if r > 1 else o
        if isinstance(obj, tuple):
            return tuple(fit_batch(o, r) for o in obj)
        if isinstance(obj, list):
            return [fit_batch(o, r) for o in obj]
        return obj

    def step(h: Tensor, x: Tensor) -> Tensor:
        layer = int(x.reshape(-1)[0].item())
        c = calls[layer]
        r = h.shape[0] // nb
        xb = h.reshape(h.shape[0], P, *feat)
        xin = xb if bf else xb.transpose(0, 1)
        if first["x"].dim() == 2:
            xin = xb[0]
        args, kwargs = without_cache(c["args"], c["kwargs"])
        args = tuple(fit_batch(a, r) for a in args)
        kwargs = {k: fit_batch(v, r, k) for k, v in kwargs.items()}
        idx = c["idx"]
        old = call_arg(c["args"], c["kwargs"], idx)
        if idx[0] == "a":
            args = tuple(xin if (i == idx[1] or c["args"][i] is old) else a for i, a in enumerate(args))
        else:
            kwargs = {k: (xin if (k == idx[1] or c["kwargs"][k] is old) else v) for k, v in kwargs.items()}
        if params32 is None:
            out = blks[layer].module(*args, **kwargs)
        else:
            from torch.func import functional_call
            out = functional_call(blks[layer].module, params32[layer], tuple(args), dict(kwargs))
        y = [t for t in flatten_tensors(out) if t.is_floating_point()][0]
        yb = block_view(y, bf)
        if keep is not None:
            k = keep.repeat_interleave(r, dim=0) if r > 1 else keep
            yb = yb * k + (yb * (1 - k)).detach()  # padding rows carry no derivative
        return yb.reshape(h.shape[0], -1)

    inputs = torch.arange(len(blks), dtype=x0.dtype, device=x0.device).view(-1, 1, 1).expand(-1, nb, 1)
    h0 = x0[:nb].reshape(nb, -1)
    try:
        # RMS gain ‖J‖_F/√N = √(mean σᵢ²): exact up to N = 512, from 64 random probes above.
        if N <= _EXACT_MAX_N:
            arr = jacobian_norms(step, h0, inputs, ord="fro", progress=progress)
            info = {"norm": "rms", "exact": True, "samples": nb, "state_size": N}
        else:
            arr = jacobian_norms(step, h0, inputs, ord="fro", method="probes", probes=_PROBES, progress=progress)
            info = {"norm": "rms", "exact": False, "probes": _PROBES, "samples": nb, "state_size": N}
        arr = arr / math.sqrt(N)
        if stored is not None:
            info.update(stored_dtype=str(stored).replace("torch.", ""), working_dtype="float32")
    finally:
        for m, t in modes:
            m.training = t
    return arr, info
