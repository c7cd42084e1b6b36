"""Norms of the state-to-state Jacobian ∂h_T/∂h_{T−k} for every lag k at once.

Index letters: T sequence length, B batch, N state size, k lag, m probes, r block size.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import GradscopeError
from ._util import State, finite_rows, is_int, prepare, progress_iter, warn_nonfinite
from .jacobians import Linearizer

__all__ = ["jacobian_norms"]

# Above this state size the spectral norm of each lag comes from warm-started subspace iteration;
# at or below it a dense SVD per lag is cheap enough.
_SVD_MAX_N = 64
# Block size of the subspace iteration: large enough that σ_{r+1}/σ_1 is small for the
# Jacobian products met in practice, small enough that one iteration costs ≪ one N³ product.
_BLOCK = 16
_MAX_ITER = 12
# Bytes of normalised products kept for one batched SVD call (method="svd").
_SVD_CHUNK_BYTES = 1 << 27


@torch.no_grad()
def jacobian_norms(step, h0: Optional[State], inputs: Tensor, *, ord: Union[int, str] = 2,
                   dtype: Optional[torch.dtype] = None, log: bool = False, method: str = "auto",
                   probes: int = 64, seed: int = 0, rtol: Optional[float] = None,
                   progress: Optional[bool] = None) -> np.ndarray:
    """‖∂h_T/∂h_{T−k}‖ for every lag k = 0..T and every sample, in one backward sweep.

    The products P_k = ∂h_T/∂h_{T−k} = P_{k−1} J_{T−k+1} are accumulated from the end (one
    N×N product per step, batched over B; closed-form Jacobians for the built-in steps, a batch
    of vector-Jacobian products for any other step). After every step P is divided by its
    Frobenius norm and the logarithm of that scale is summed in float64, so norms far below the
    dtype's range (1e-200 in float32, below 1e-308 with ``log=True``) come out with full relative
    accuracy and the products never turn denormal (entries below ``tiny/eps`` of the normalised
    product, which cannot affect any result above rounding error, are set to zero).

    Spectral norms (``ord=2``) of the normalised products come from one of:

    - ``method="svd"``: a dense SVD of every lag (batched ``torch.linalg.matrix_norm``); cost
      ≈ 10 N³ per lag on top of the N³ product.
    - ``method="subspace"``: block subspace iteration on P Pᵀ (block of 16, warm-started from the
      previous lag, whose leading left singular vectors change little from lag to lag), stopped
      when the residual bound on the top Ritz value is below ``rtol``; a lag that does not
      converge in 12 iterations falls back to the SVD. Typically 1–3 iterations of cost 4·16·N²
      per lag.
    - ``method="auto"`` (default): ``"svd"`` for N ≤ 64, else ``"subspace"``.

    Frobenius norms (``ord="fro"``) are exact at no extra cost (they are the scales). With
    ``method="probes"`` they are estimated instead from ``probes`` Gaussian cotangents u at h_T:
    E‖uᵀ P_k‖² = ‖P_k‖_F², relative s.d. ≤ √(2/probes). This needs ``probes`` vector-Jacobian
    products per step instead of N: the cheap route for large user steps.

    Args:
        step: ``step(h, x) -> h_next`` or a built-in step / recurrent module (see
            :func:`step_jacobians`).
        h0: Initial state, a Tensor ``[B, N]`` or a tuple of them; ``None``: zeros (built-ins).
        inputs: ``[T, B, ...]``, time-major.
        ord: ``2`` (spectral) or ``"fro"`` (Frobenius). Lag 0 is the identity: 1, or √N for
            ``"fro"``.
        dtype: Compute dtype (default: that of ``h0``). The log scale is float64 whatever it is.
        log: Return natural-log norms (exact zeros give ``-inf``).
        method: ``"auto" | "svd" | "subspace"`` for ``ord=2``; ``"auto" | "probes"`` for
            ``"fro"``.
        probes: Number of random cotangents for ``method="probes"``.
        seed: Seed of the random start block (``"subspace"``) or probes.
        rtol: Relative accuracy asked of the subspace iteration (default 1e-6 in float32,
            1e-12 in float64).
        progress: ``tqdm`` bar over the steps; ``None``: only when stderr is a terminal and the
            work is long.

    Returns:
        ndarray ``[B, T+1]``, float64: entry ``[b, k]`` is ‖∂h_T/∂h_{T−k}‖ of sample b (its
        natural log if ``log``). Lags whose product meets NaN or inf are NaN, with a
        :class:`~gradscope.errors.NonFiniteWarning` naming them.

    Raises:
        ShapeError: ``h0``, ``inputs`` and the step's output do not fit together.
        GradscopeError: an unknown ``ord`` or ``method``.

    Example:
        >>> W = 0.5 * torch.eye(3)
        >>> step = lambda h, x: h @ W.T + x
        >>> jacobian_norms(step, torch.zeros(1, 3), torch.zeros(4, 1, 3)).round(4)
        array([[1.    , 0.5   , 0.25  , 0.125 , 0.0625]])
    """
    if ord not in (2, "fro"):
        raise GradscopeError(f"jacobian_norms: ord must be 2 (spectral) or 'fro' (Frobenius), "
                             f"got {ord!r}.")
    allowed = ("auto", "svd", "subspace") if ord == 2 else ("auto", "probes")
    if method not in allowed:
        raise GradscopeError(f"jacobian_norms: method must be one of {allowed} for ord={ord!r}, "
                             f"got {method!r}.")
    if method == "probes" and (not is_int(probes) or probes < 1):
        raise GradscopeError(f"jacobian_norms: probes must be a positive integer, got {probes!r}.")
    prob = prepare(step, h0, inputs, dtype, "jacobian_norms")
    lin = Linearizer(prob)
    T, B, N, dt = prob.T, prob.B, prob.N, prob.dtype
    dev = prob.h0.device
    if method == "auto":
        method = ("svd" if N <= _SVD_MAX_N else "subspace") if ord == 2 else "exact"
    if rtol is None:
        rtol = 1e-12 if dt == torch.float64 else 1e-6
    gen = torch.Generator(device="cpu").manual_seed(seed)

    out = torch.empty(B, T + 1, dtype=torch.float64, device=dev)
    if method == "probes":
        P = torch.randn(B, int(probes), N, generator=gen, dtype=torch.float64).to(dtype=dt, device=dev)
        # E‖uᵀ P_k‖² over m probes is ‖P_k‖_F²; lag 0 is known exactly, √N.
        log_fix = -0.5 * math.log(probes)
    else:
        P = torch.eye(N, dtype=dt, device=dev).expand(B, N, N).clone()
        log_fix = 0.0
    logscale = torch.zeros(B, dtype=torch.float64, device=dev)
    if method == "probes":
        s0 = torch.linalg.vector_norm(P, dim=(-2, -1))
        P = P / s0[:, None, None]
        logscale += s0.double().log()
    out[:, 0] = 0.0 if ord == 2 else 0.5 * math.log(N)

    finfo = torch.finfo(dt)
    tiny = finfo.tiny / finfo.eps
    bad = ~finite_rows(lin.states[T])                     # lag 0 needs h_T alone
    bad_lag = torch.zeros(B, T + 1, dtype=torch.bool, device=dev)
    bad_lag[:, 0] = bad
    spec = _Spectral(method, B, N, dt, dev, gen, rtol) if ord == 2 else None

    rows = P.shape[1]
    cost = T * B * rows * N * N * (1 if prob.kind else 3)
    for k in progress_iter(range(1, T + 1), T, progress, cost, "Jacobian norms"):
        t = T - k + 1
        P = lin.at(t).rmul(P)
        s = torch.linalg.vector_norm(P, dim=(-2, -1))
        bad = bad | ~lin.finite[t] | ~torch.isfinite(s)
        bad_lag[:, k] = bad
        # A sample that met NaN/inf carries on with finite garbage: all its later lags are NaN
        # in the result anyway, and NaN would make the SVD or eigen-solver raise.
        s = torch.where(bad, torch.zeros_like(s), s)
        P = P.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        P = P.div_(torch.where(s > 0, s, torch.ones_like(s))[:, None, None])
        # hardshrink zeroes |entries| < tiny in one pass (a boolean mask costs far more).
        P = torch.nn.functional.hardshrink(P, tiny)
        logscale = logscale + s.double().log()
        if spec is None:
            out[:, k] = logscale + log_fix
        else:
            spec.push(k, P, logscale)
    if spec is not None:
        spec.finish(out)
    out[bad_lag] = float("nan")

    if bad_lag.any():
        first = {}
        for b in range(B):
            idx = torch.nonzero(bad_lag[b].cpu()).flatten()
            if len(idx):
                first[b] = int(idx[0])
        warn_nonfinite("jacobian_norms", first,
                       lambda k0: f"lags {k0}..{T}" if k0 < T else f"lag {T}")
    res = out.cpu().numpy()
    return res if log else np.exp(res)


class _Spectral:
    """Spectral norms of the normalised products, lag by lag (subspace) or in chunks (svd)."""

    def __init__(self, method, B, N, dtype, device, gen, rtol):
        self.method = method
        self.rtol = rtol
        self.B, self.N = B, N
        self.pending = []          # (k, P̃, logscale) awaiting a batched SVD
        self.chunk = max(1, _SVD_CHUNK_BYTES // max(1, B * N * N * torch.finfo(dtype).bits // 8))
        self.results = {}
        if method == "subspace":
            r = min(_BLOCK, N)
            X = torch.randn(B, N, r, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
            self.X = torch.linalg.qr(X).Q

    def push(self, k: int, P: Tensor, logscale: Tensor) -> None:
        if self.method == "svd":
            self.pending.append((k, P, logscale))
            if len(self.pending) >= self.chunk:
                self._flush()
        else:
            sigma, self.X = top_singular_value(P, self.X, self.rtol, _MAX_ITER)
            self.results[k] = logscale + sigma.double().log()

    def _flush(self) -> None:
        if not self.pending:
            return
        stack = torch.stack([p for _, p, _ in self.pending])
        sig = torch.linalg.matrix_norm(stack, ord=2)           # [C, B]
        for (k, _, ls), s in zip(self.pending, sig):
            self.results[k] = ls + s.double().log()
        self.pending = []

    def finish(self, out: Tensor) -> None:
        self._flush()
        for k, v in self.results.items():
            out[:, k] = v


def top_singular_value(P: Tensor, X: Tensor, rtol: float, max_iter: int):
    """σ₁ of each ``P [B, N, N]`` by block subspace iteration on P Pᵀ from the block ``X [B, N, r]``.

    Returns ``(sigma [B], X_next)``; ``X_next`` spans the current leading left singular vectors and
    warm-starts the next lag. Stopping rule, on θ₁ (the top Ritz value of G = P Pᵀ, a lower bound
    of σ₁²) with residual ρ = ‖G y − θ₁ y‖ and Ritz gap δ = θ₁ − θ₂: ρ ≤ 2·rtol·θ₁ or
    ρ²/δ ≤ 2·rtol·θ₁ (the quadratic residual bound). Samples that do not converge in
    ``max_iter`` iterations get an SVD.
    """
    B = P.shape[0]
    tol = 2 * rtol
    done = torch.zeros(B, dtype=torch.bool, device=P.device)
    theta = torch.zeros(B, dtype=P.dtype, device=P.device)
    for _ in range(max_iter):
        Y = torch.matmul(P.mT, X)
        Z = torch.matmul(P, Y)                               # G X
        M = torch.matmul(Y.mT, Y)                            # Xᵀ G X, symmetric [B, r, r]
        M = 0.5 * (M + M.mT)
        th, S = torch.linalg.eigh(M)                         # ascending
        t1 = th[:, -1].clamp_min(0)
        s1 = S[:, :, -1:]
        res = torch.linalg.vector_norm(torch.matmul(Z, s1) - torch.matmul(X, s1) * t1[:, None, None],
                                       dim=(-2, -1))
        conv = res <= tol * t1
        if th.shape[-1] > 1:
            gap = t1 - th[:, -2]
            conv |= (gap > 0) & (res * res <= tol * t1 * gap)
        conv |= t1 == 0
        theta = t1  # Ritz values only improve: keep the latest for every sample
        done |= conv
        X = torch.linalg.qr(Z).Q
        if bool(done.all()):
            break
        # Z has rank < r when P does (e.g. dead ReLU units): QR still returns an orthonormal X.
    sigma = theta.sqrt()
    if not bool(done.all()):
        idx = torch.nonzero(~done).flatten()
        sigma[idx] = torch.linalg.matrix_norm(P[idx], ord=2)
    return sigma, X
