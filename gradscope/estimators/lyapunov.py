"""Lyapunov exponents of a recurrence along a trajectory (Benettin's QR method).

Index letters: T sequence length, B batch, N state size, k number of exponents.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import GradscopeError
from ._util import State, check_k, is_int, prepare, progress_bar, warn_nonfinite
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
    the built-in steps (one product with W_hh per step) and for any other step by
    reverse-over-reverse autograd on k stacked copies of the state, so the cost is
    O(T·(k·C + N·k²)) with C one step's cost; k ≪ N is cheap. User steps run in chunks of
    several steps per pair of autograd calls where that leaves the result unchanged (one tangent,
    or k > 1 with ``reorth_every`` > 1), which removes most of autograd's per-call overhead.

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
    if not is_int(warmup) or not 0 <= warmup < T:
        raise GradscopeError(f"lyapunov_spectrum: warmup must be an integer in [0, T) = [0, {T}) "
                             f"so that some steps are counted, got {warmup!r}.")
    if not is_int(reorth_every) or reorth_every < 1:
        raise GradscopeError(f"lyapunov_spectrum: reorth_every must be a positive integer, got "
                             f"{reorth_every!r}.")
    warmup, reorth_every = int(warmup), int(reorth_every)
    # Forward sweep: nothing stored, the next state comes with the tangents.
    lin = Linearizer(prob, store=False)
    dev = prob.h0.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(B, N, k, generator=gen, dtype=torch.float64)
    Q = torch.linalg.qr(Q).Q.to(dtype=dt, device=dev)
    acc = torch.zeros(B, k, dtype=torch.float64, device=dev)
    # Per-step bookkeeping is kept to single kernels writing into preallocated buffers, since for
    # small steps it costs as much as the arithmetic: diag(R) goes into a buffer whose logs are
    # summed in float64 every `chunk` QRs, and the state's row sums in float64 (non-finite iff
    # some entry is, short of a sum beyond 1e308) into `state_sums`.
    chunk = 256
    rbuf = torch.empty(chunk, B, k, dtype=dt, device=dev)
    nbuf = 0
    state_sums = torch.empty(T + 1, B, dtype=torch.float64, device=dev)
    h = prob.h0
    torch.sum(h, dim=-1, dtype=torch.float64, out=state_sums[0])
    finfo = torch.finfo(dt)

    def reorth(Q):
        """(Q, diag R ≥ 0) with diag(R) made positive; for one column, its normalisation."""
        if k == 1:
            # A zero column stays zero (and contributes ln 0 = −inf). Few kernels: this can run
            # every step.
            d = torch.linalg.vector_norm(Q, dim=-2)                         # [B, 1]
            return Q / d.clamp_min(finfo.tiny).unsqueeze(-1), d
        Q, R = torch.linalg.qr(Q)
        d = R.diagonal(dim1=-2, dim2=-1)
        # diag(R) > 0 makes the QR unique, so tangents do not flip sign from step to step.
        Q = Q * torch.where(d < 0, -1.0, 1.0).to(d.dtype).unsqueeze(-2)
        return Q, d.abs()

    def is_qr_step(t):
        return t % reorth_every == 0 or t == warmup or t == T

    # User steps go in chunks (see Linearizer.chunk_tangents) where that changes nothing: for one
    # tangent, renormalising at chunk ends instead of every step gives the same sum of logs, and
    # for k > 1 with reorth_every > 1 the chunks are exactly the stretches between QRs. The chunk
    # length for one tangent adapts so that its growth stays below e^20 (float32 holds e^88); a
    # chunk that leaves that range anyway is redone step by step.
    chunked = prob.kind is None and (k == 1 or reorth_every > 1)
    C = 8
    cost = T * B * (k * N * N * (4 if prob.kind else 8) + 4 * N * k * k)
    bar = progress_bar(T, progress, cost, "Lyapunov")
    t = 0
    while t < T:
        if chunked and k == 1:
            e = min(t + C, T, warmup if t < warmup else T)
        else:
            e = t + 1
            while not is_qr_step(e):
                e += 1
        res = lin.chunk_tangents(t, e, h, Q) if chunked else None
        if res is not None:
            h_e, Z, sums = res
            Qn, d = reorth(Z)
            if k == 1:
                ok_state = torch.isfinite(sums).all(dim=0)
                lo, hi = finfo.tiny / finfo.eps ** 2, finfo.max * finfo.eps ** 2
                out_of_range = ~torch.isfinite(d) | (d < lo) | (d > hi)
                if bool((out_of_range[:, 0] & ok_state).any()):
                    res = None                                   # redo this chunk step by step
                    C = 1
                else:
                    # Longest next chunk keeping the growth below e^20, from this chunk's rate.
                    rate = float((d.double().log().abs() / (e - t)).nan_to_num(0.0, 0.0, 0.0).max())
                    C = int(min(64, max(1, 20.0 / max(rate, 1e-6))))
            if res is not None:
                h, Q = h_e, Qn
                state_sums[t + 1:e + 1] = sums
                if e > warmup:
                    rbuf[nbuf] = d
                    nbuf += 1
        if res is None:
            for s in range(t + 1, e + 1):
                h, Q = lin.tangent_step(s, h, Q)
                torch.sum(h, dim=-1, dtype=torch.float64, out=state_sums[s])
                if k == 1 or is_qr_step(s):
                    Q, d = reorth(Q)
                    if s > warmup:
                        rbuf[nbuf] = d
                        nbuf += 1
                        if nbuf == chunk:
                            acc += rbuf.double().log().sum(dim=0)
                            nbuf = 0
        if nbuf == chunk:
            acc += rbuf.double().log().sum(dim=0)
            nbuf = 0
        # A sample with NaN/inf keeps NaN tangents: batched QR treats samples independently,
        # and its row is replaced by NaN below.
        bar.update(e - t)
        t = e
    bar.close()
    acc += rbuf[:nbuf].double().log().sum(dim=0)
    lam = acc / (T - warmup)
    lam = torch.sort(lam, dim=-1, descending=True).values

    state_finite = torch.isfinite(state_sums)
    finite = torch.cat([state_finite[:1], state_finite[:-1] & state_finite[1:] & lin.x_finite])
    bad = ~finite.all(dim=0)                              # [B]
    if bad.any():
        lam[bad] = float("nan")
        warn_nonfinite("lyapunov_spectrum", lin.first_bad_steps(finite),
                       lambda t0: f"first non-finite number at step {t0}; all exponents are NaN")
    return lam.cpu().numpy()
