"""Lyapunov exponents of a recurrence along a trajectory (Benettin's QR method).

Index letters: T sequence length, B batch, N state size, k number of exponents.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import GradscopeError
from ._util import State, check_k, prepare, progress_iter, warn_nonfinite
from .jacobians import Linearizer

__all__ = ["lyapunov_spectrum"]


@torch.no_grad()
def lyapunov_spectrum(step, h0: Optional[State], inputs: Tensor, *, k: Optional[int] = None,
                      warmup: int = 0, reorth_every: int = 1, dtype: Optional[torch.dtype] = None,
                      seed: int = 0, progress: Optional[bool] = None) -> np.ndarray:
    """The top-k Lyapunov exponents λ₁ ≥ … ≥ λ_k of the recurrence along the trajectory from ``h0``.

    Benettin's method: k orthonormal tangent vectors Q (random, from ``seed``) are pushed through
    the step Jacobians, Z = J_t Q, and re-orthonormalised by QR with diag(R) made positive;
    λ_i = (1/(T − warmup)) Σ ln R_ii, summed in float64 whatever the compute dtype. The first
    ``warmup`` steps evolve Q (so it aligns with the leading directions) without being counted.

    Full Jacobians are never formed: tangents move by Jacobian-vector products, in closed form for
    the built-in steps and by ``torch.func.jvp`` vmapped over the k tangents for any other step,
    so the cost is O(T·(k·C + N·k²)) with C one step's cost; k ≪ N is cheap.

    Re-orthonormalising only every ``reorth_every`` = Δ steps saves QRs but lets the tangents
    align and grow between them: keep (λ₁ − λ_k)·Δ ≲ 10 and |λ₁|·Δ well inside the dtype's range.

    Args:
        step: ``step(h, x) -> h_next`` or a built-in step / recurrent module.
        h0: Initial state, a Tensor ``[B, N]`` or a tuple of them; ``None``: zeros (built-ins).
        inputs: ``[T, B, ...]``, time-major; drives the trajectory (use zeros for the autonomous map).
        k: Number of exponents, 1 ≤ k ≤ N (default N).
        warmup: Steps that evolve the tangents before exponents accumulate, 0 ≤ warmup < T.
        reorth_every: QR every this many steps (and always at the end of the warm-up and at T).
        dtype: Compute dtype of states and tangents (default: that of ``h0``); the sums of
            ln R_ii are float64 regardless.
        seed: Seed of the random initial tangents.
        progress: ``tqdm`` bar over the steps; ``None``: only when stderr is a terminal and the
            work is long.

    Returns:
        ndarray ``[B, k]``, float64, natural log per step, descending in each row. ``-inf`` where
        the Jacobian product is exactly singular (e.g. dead ReLU units). A row whose trajectory
        meets NaN or inf is NaN, with a :class:`~gradscope.errors.NonFiniteWarning`.

    Raises:
        ShapeError: shapes do not fit, or k is not in [1, N].
        GradscopeError: ``warmup`` or ``reorth_every`` out of range.

    Example:
        >>> W = torch.diag(torch.tensor([0.5, 0.25], dtype=torch.float64))
        >>> step = lambda h, x: h @ W.T
        >>> lam = lyapunov_spectrum(step, torch.ones(1, 2, dtype=torch.float64),
        ...                         torch.zeros(100, 1, 1, dtype=torch.float64), warmup=60)
        >>> np.exp(lam).round(6)
        array([[0.5 , 0.25]])
    """
    prob = prepare(step, h0, inputs, dtype, "lyapunov_spectrum")
    T, B, N, dt = prob.T, prob.B, prob.N, prob.dtype
    k = check_k(k, N, "lyapunov_spectrum")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < T:
        raise GradscopeError(f"lyapunov_spectrum: warmup must be an integer in [0, T) = [0, {T}) "
                             f"so that some steps are counted, got {warmup!r}.")
    if isinstance(reorth_every, bool) or not isinstance(reorth_every, int) or reorth_every < 1:
        raise GradscopeError(f"lyapunov_spectrum: reorth_every must be a positive integer, got "
                             f"{reorth_every!r}.")
    lin = Linearizer(prob)
    dev = prob.h0.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(B, N, k, generator=gen, dtype=torch.float64)
    Q = torch.linalg.qr(Q).Q.to(dtype=dt, device=dev)
    acc = torch.zeros(B, k, dtype=torch.float64, device=dev)

    cost = T * B * (k * N * N * (4 if prob.kind else 8) + 4 * N * k * k)
    for t in progress_iter(range(1, T + 1), T, progress, cost, "Lyapunov"):
        Q = lin.at(t).mul(Q)
        if t % reorth_every == 0 or t == warmup or t == T:
            Q, R = torch.linalg.qr(Q)
            d = R.diagonal(dim1=-2, dim2=-1)
            # diag(R) > 0 makes the QR unique, so the tangents do not flip sign from step to step.
            sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
            Q = Q * sign.unsqueeze(-2)
            if t > warmup:
                acc += d.abs().double().log()
            if not torch.isfinite(Q).all():
                # NaN would make the next QR raise; its samples are flagged below.
                Q = torch.nan_to_num(Q, nan=0.0, posinf=0.0, neginf=0.0)
    lam = acc / (T - warmup)
    lam = torch.sort(lam, dim=-1, descending=True).values

    bad = ~lin.finite.all(dim=0)                          # [B]
    if bad.any():
        lam[bad] = float("nan")
        first = lin.first_bad_steps()
        warn_nonfinite("lyapunov_spectrum", first,
                       lambda t0: f"first non-finite number at step {t0}; all exponents are NaN")
    return lam.cpu().numpy()
