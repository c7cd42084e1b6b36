"""Per-step state-to-state Jacobians J_t = ∂h_t/∂h_{t−1} along a trajectory.

Closed forms for the built-in steps (Elman tanh/relu, LSTM with and without projection, GRU), as
written in SCIENCE.md; autograd (``torch.func``) for any other step. Besides the dense matrix, each
step's Jacobian is offered as the two products the estimators need, so that they never pay more
than necessary:

- ``rmul(P)`` = P J_t for P ``[B, R, N]`` (cumulative products from the end, cotangent probes),
- ``mul(V)``  = J_t V for V ``[B, N, k]`` (tangent vectors for Lyapunov exponents).

For an LSTM, ``rmul`` exploits the block structure (∂c'/∂c and, without projection, ∂h'/∂c are
diagonal), which halves the N³ cost of a dense product. For a user step, ``rmul`` is a batch of
vector-Jacobian products and ``mul`` a batch of Jacobian-vector products (``torch.func.vjp`` /
``jvp`` under ``vmap``), so k tangents cost k steps, not N.

Index letters: T sequence, B batch, N state size, H hidden units, P projection size (LSTM with
``proj_size``; its state is (h [B, P], c [B, H]) so N = P + H), R rows, k tangent vectors.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._util import (Problem, State, finite_rows, flatten_state, prepare, progress_iter,
                    unflatten_state, warn_nonfinite)

__all__ = ["step_jacobians"]


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------

class _ElmanJac:
    """J = diag(φ'(a)) W_hh with φ' = 1 − h'² (tanh) or 1[a > 0] (relu)."""

    def __init__(self, step, h: Tensor, xw: Tensor, h_next: Tensor):
        if step.nonlinearity == "tanh":
            self.d = 1 - h_next * h_next
        else:
            # relu(a) > 0 exactly when a > 0; autograd uses the same convention at a = 0.
            self.d = (h_next > 0).to(h_next.dtype)
        self.W = step.weight_hh

    def dense(self) -> Tensor:
        return self.d.unsqueeze(-1) * self.W

    def rmul(self, P: Tensor) -> Tensor:
        return (P * self.d.unsqueeze(-2)) @ self.W

    def mul(self, V: Tensor) -> Tensor:
        return self.d.unsqueeze(-1) * torch.matmul(self.W, V)


class _LSTMJac:
    """Blocks of ∂(h', c')/∂(h, c) for c' = f⊙c + i⊙g, m = o⊙tanh(c'), h' = m or W_hr m.

    A = ∂c'/∂h = diag(c f(1−f)) W_hf + diag(g i(1−i)) W_hi + diag(i(1−g²)) W_hg   [B, H, P]
    Mh = ∂m/∂h = diag(tanh(c') o(1−o)) W_ho + diag(o(1−tanh²c')) A               [B, H, P]
    mc = ∂m/∂c = o(1−tanh²c') f  (diagonal),  ∂c'/∂c = f (diagonal)
    ∂h'/∂· = W_hr ∂m/∂· with projection (W_hr on the left of the h rows), ∂m/∂· without.
    """

    def __init__(self, step, state, xw: Tensor):
        h, c = state
        i, f, g, o = step.gate_values(h, xw)
        c_next = f * c + i * g
        tc = torch.tanh(c_next)
        W_i, W_f, W_g, W_o = step.weight_hh.chunk(4, dim=0)
        H = int(c.shape[-1])
        # [Mh; A] is written into one buffer so that P J needs a single batched matmul for the
        # h columns; in-place accumulation keeps the number of passes over H×P blocks small.
        MA = torch.empty(*h.shape[:-1], 2 * H, h.shape[-1], dtype=h.dtype, device=h.device)
        Mh, A = MA[..., :H, :], MA[..., H:, :]
        torch.mul(W_f, (c * f * (1 - f)).unsqueeze(-1), out=A)
        A.addcmul_(W_i, (g * i * (1 - i)).unsqueeze(-1))
        A.addcmul_(W_g, (i * (1 - g * g)).unsqueeze(-1))
        dtc = o * (1 - tc * tc)
        torch.mul(W_o, (tc * o * (1 - o)).unsqueeze(-1), out=Mh)
        Mh.addcmul_(A, dtc.unsqueeze(-1))
        self.MA = MA                                   # [B, 2H, P]
        self.H = H
        self.P = int(h.shape[-1])
        self.mc = dtc * f
        self.f = f
        self.Wr = step.weight_hr

    def dense(self) -> Tensor:
        H, P = self.H, self.P
        Mh, A = self.MA[..., :H, :], self.MA[..., H:, :]
        if self.Wr is None:
            Jhh, Jhc = Mh, torch.diag_embed(self.mc)
        else:
            Jhh, Jhc = torch.matmul(self.Wr, Mh), self.Wr * self.mc.unsqueeze(-2)
        top = torch.cat([Jhh, Jhc], dim=-1)
        bottom = torch.cat([A, torch.diag_embed(self.f)], dim=-1)
        return torch.cat([top, bottom], dim=-2)

    def rmul(self, Pm: Tensor) -> Tensor:
        P = self.P
        Ph, Pc = Pm[..., :P], Pm[..., P:]
        out = torch.empty_like(Pm)
        out_h, out_c = out[..., :P], out[..., P:]
        if self.Wr is None:
            U = Ph                                                      # rows in m-space
            torch.matmul(Pm, self.MA, out=out_h)                        # Ph Mh + Pc A
        else:
            U = torch.matmul(Ph, self.Wr)
            torch.matmul(torch.cat([U, Pc], dim=-1), self.MA, out=out_h)
        torch.mul(Pc, self.f.unsqueeze(-2), out=out_c)                  # diagonal blocks
        out_c.addcmul_(U, self.mc.unsqueeze(-2))
        return out

    def mul(self, V: Tensor) -> Tensor:
        P, H = self.P, self.H
        Vh, Vc = V[..., :P, :], V[..., P:, :]
        MAV = torch.matmul(self.MA, Vh)                                 # [B, 2H, k]
        dm = MAV[..., :H, :] + self.mc.unsqueeze(-1) * Vc
        dh = dm if self.Wr is None else torch.matmul(self.Wr, dm)
        dc = MAV[..., H:, :] + self.f.unsqueeze(-1) * Vc
        return torch.cat([dh, dc], dim=-2)


class _GRUJac:
    """J = diag(z) + diag((h−n) z(1−z)) W_hz + diag((1−z)(1−n²)) [diag(r) W_hn + diag(u r(1−r)) W_hr].

    Built densely: the three diagonal scalings cost O(H²), against 3 H² k for applying the
    three blocks to k vectors separately.
    """

    def __init__(self, step, h: Tensor, xw: Tensor):
        r, z, n, u = step.gate_values(h, xw)
        W_r, W_z, W_n = step.weight_hh.chunk(3, dim=0)
        beta = (1 - z) * (1 - n * n)
        J = (((h - n) * z * (1 - z)).unsqueeze(-1) * W_z + (beta * r).unsqueeze(-1) * W_n
             + (beta * u * r * (1 - r)).unsqueeze(-1) * W_r)
        J.diagonal(dim1=-2, dim2=-1).add_(z)
        self.J = J

    def dense(self) -> Tensor:
        return self.J

    def rmul(self, P: Tensor) -> Tensor:
        return torch.matmul(P, self.J)

    def mul(self, V: Tensor) -> Tensor:
        return torch.matmul(self.J, V)


class _DenseJac:
    def __init__(self, J: Tensor):
        self.J = J

    def dense(self) -> Tensor:
        return self.J

    def rmul(self, P: Tensor) -> Tensor:
        return torch.matmul(P, self.J)

    def mul(self, V: Tensor) -> Tensor:
        return torch.matmul(self.J, V)


# --------------------------------------------------------------------------------------------
# Autograd for any other step
# --------------------------------------------------------------------------------------------

_JVP_READY = False


def _load_jvp_decompositions() -> None:
    """Trigger torch's one-time import of its forward-AD decompositions, quietly.

    In torch 2.13 that import calls the deprecated ``torch.jit.script`` and so emits a
    DeprecationWarning from inside torch on the first ``torch.func.jvp``; under
    ``-W error`` (or pytest's ``filterwarnings = error``) it would abort the first JVP.
    """
    global _JVP_READY
    if _JVP_READY:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        x = torch.zeros(1)
        torch.func.jvp(torch.sin, (x,), (x,))
    _JVP_READY = True


class _AutogradJac:
    """Jacobian of a user step at (h [B, N], x) by autograd.

    ``dense`` is ``torch.func.jacrev`` vmapped over the batch. ``rmul``/``mul`` fold their R rows
    (k columns) into the batch: the step runs once on ``[B·R, N]`` copies of the state, and one
    backward pass (one forward-mode pass) gives all R vector-Jacobian (Jacobian-vector)
    products. That needs no ``vmap`` over the user's code and avoids ``torch.func``'s per-call
    overhead, which dominates for small steps. Each route falls back to a plainer one if the step
    does not support it (e.g. ``vmap`` with data-dependent control flow, a missing forward-mode
    formula). Samples of the batch are assumed independent (no batch statistics in the step), as
    for any recurrent cell.
    """

    def __init__(self, owner: "Linearizer", h: Tensor, x: Tensor):
        self.o = owner
        self.h = h
        self.x = x

    def _f(self, hf: Tensor, x: Tensor) -> Tensor:
        out = self.o.prob.step(unflatten_state(hf, self.o.prob.spec), x)
        return flatten_state(tuple(out) if isinstance(out, list) else out)

    def _folded(self, r: int):
        """State and input repeated r times per sample: ``[B·r, N]``, ``[B·r, ...]``."""
        return self.h.repeat_interleave(r, dim=0), self.x.repeat_interleave(r, dim=0)

    def dense(self) -> Tensor:
        o = self.o
        if o.vmap_ok:
            try:
                return self._dense_vmap()
            except _FALLBACK_ERRORS:
                # Not every user step runs under vmap (.item(), data-dependent control flow);
                # the routes below need only plain autograd.
                o.vmap_ok = False
        if o.vjp_ok:
            B, N = self.h.shape
            eye = torch.eye(N, dtype=self.h.dtype, device=self.h.device).expand(B, N, N)
            J = self._rmul_folded(eye)
            if J is not None:
                return J
        return self._dense_loop()

    def _dense_vmap(self) -> Tensor:
        spec, step = self.o.prob.spec, self.o.prob.step

        def one(h1: Tensor, x1: Tensor) -> Tensor:
            # Each sample is run as a batch of one, as the step expects [B, ...] tensors.
            out = step(unflatten_state(h1.unsqueeze(0), spec), x1.unsqueeze(0))
            return flatten_state(tuple(out) if isinstance(out, list) else out).squeeze(0)

        return torch.func.vmap(torch.func.jacrev(one), in_dims=(0, 0))(self.h, self.x)

    def _dense_loop(self) -> Tensor:
        with torch.enable_grad():
            hf = self.h.detach().requires_grad_(True)
            out = self._f(hf, self.x)
            N = out.shape[-1]
            rows = []
            for i in range(N):
                (g,) = torch.autograd.grad(out[:, i].sum(), hf, retain_graph=i < N - 1,
                                           allow_unused=True)
                rows.append(torch.zeros_like(hf) if g is None else g)
        return torch.stack(rows, dim=1).detach()

    def _rmul_folded(self, P: Tensor) -> Optional[Tensor]:
        B, R, N = P.shape
        try:
            hr, xr = self._folded(R)
            with torch.enable_grad():
                hr.requires_grad_(True)
                out = self._f(hr, xr)
                (g,) = torch.autograd.grad(out, hr, P.reshape(B * R, N), allow_unused=True)
        except _FALLBACK_ERRORS:
            self.o.vjp_ok = False
            return None
        return torch.zeros_like(P) if g is None else g.reshape(B, R, N)

    def rmul(self, P: Tensor) -> Tensor:
        if self.o.vjp_ok:
            res = self._rmul_folded(P)
            if res is not None:
                return res
        return torch.matmul(P, self.dense())

    def mul(self, V: Tensor) -> Tensor:
        o = self.o
        if o.jvp_ok:
            _load_jvp_decompositions()
            B, N, k = V.shape
            try:
                hr, xr = self._folded(k)
                with fwAD.dual_level():
                    dual = fwAD.make_dual(hr, V.transpose(1, 2).reshape(B * k, N))
                    tangent = fwAD.unpack_dual(self._f(dual, xr)).tangent
                if tangent is None:  # the output does not depend on the state
                    return torch.zeros_like(V)
                return tangent.reshape(B, k, N).transpose(1, 2)
            except _FALLBACK_ERRORS:
                # Forward-mode AD lacks formulas for some ops; the dense Jacobian always works.
                o.jvp_ok = False
        return torch.matmul(self.dense(), V)


_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError)


# --------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------

class Linearizer:
    """The trajectory h_0..h_T of a prepared problem and the Jacobian J_t at each step."""

    def __init__(self, prob: Problem):
        self.prob = prob
        self.vmap_ok = self.vjp_ok = self.jvp_ok = True
        step, spec = prob.step, prob.spec
        with torch.no_grad():
            # Built-in steps: the input projection of every step in one matmul.
            self.xw = step.project_inputs(prob.inputs) if prob.kind else None
            states = [prob.h0]
            h = unflatten_state(prob.h0, spec)
            for t in range(prob.T):
                h = step.recur(h, self.xw[t]) if prob.kind else step(h, prob.inputs[t])
                if isinstance(h, list):
                    h = tuple(h)
                states.append(flatten_state(h))
        self.states = torch.stack(states)              # [T+1, B, N]
        # finite[t, b]: step t (1..T) of sample b saw only finite numbers (state before, after,
        # and input); index 0 is h_0 alone.
        fin = [finite_rows(self.states[0])]
        for t in range(1, prob.T + 1):
            fin.append(finite_rows(self.states[t - 1], self.states[t], prob.inputs[t - 1]))
        self.finite = torch.stack(fin)                  # [T+1, B]

    def at(self, t: int):
        """The Jacobian J_t = ∂h_t/∂h_{t−1} (t = 1..T) as a structured object."""
        p = self.prob
        h = self.states[t - 1]
        with torch.no_grad():
            if p.kind in ("rnn_tanh", "rnn_relu"):
                return _ElmanJac(p.step, h, self.xw[t - 1], self.states[t])
            if p.kind == "lstm":
                return _LSTMJac(p.step, unflatten_state(h, p.spec), self.xw[t - 1])
            if p.kind == "gru":
                return _GRUJac(p.step, h, self.xw[t - 1])
        return _AutogradJac(self, h, p.inputs[t - 1])

    def first_bad_steps(self) -> dict:
        """``{b: first step t with a non-finite number}`` for the samples that have one."""
        bad = (~self.finite).cpu()
        out = {}
        for b in range(bad.shape[1]):
            idx = torch.nonzero(bad[:, b]).flatten()
            if len(idx):
                out[b] = int(idx[0])
        return out


@torch.no_grad()
def step_jacobians(step, h0: Optional[State], inputs: Tensor, *, dtype: Optional[torch.dtype] = None,
                   progress: Optional[bool] = None) -> Tensor:
    """Per-step Jacobians J_t = ∂h_t/∂h_{t−1} along the trajectory from ``h0``.

    Closed forms for the built-in steps (``ElmanStep`` tanh/relu, ``LSTMStep`` with or without
    projection, ``GRUStep``; ``nn.RNNCell``/``LSTMCell``/``GRUCell`` and single-layer fused modules
    are converted with :func:`step_from_module`); ``torch.func.jacrev`` vmapped over the batch for
    any other callable. The state of a tuple-state step is the concatenation of its components in
    tuple order (LSTM: ``(h, c)``, N = P_or_H + H).

    Args:
        step: ``step(h, x) -> h_next`` (``h`` a Tensor ``[B, N]`` or a tuple of Tensors
            ``[B, N_i]``), or a recurrent module.
        h0: Initial state, same structure as the step's state. ``None`` means zeros (built-in
            steps only).
        inputs: ``[T, B, ...]``, time-major (``[T, B, I]`` for built-in steps).
        dtype: Compute in this dtype (weights of built-in steps and of ``nn.Module`` steps are
            cast on a copy). Default: the dtype of ``h0``.
        progress: Show a ``tqdm`` bar: ``None`` only when stderr is a terminal and the work is long.

    Returns:
        Tensor ``[T, B, N, N]``; entry ``[t-1, b]`` is J_t of sample b. Steps that meet NaN or
        inf (in the state or the input) are NaN, with a :class:`~gradscope.errors.NonFiniteWarning`.

    Raises:
        ShapeError: ``h0``, ``inputs`` and the step's output do not fit together, or are not
            floating point.

    Example:
        >>> from gradscope.estimators import ElmanStep
        >>> step = ElmanStep(torch.zeros(4, 2), 0.5 * torch.eye(4))
        >>> J = step_jacobians(step, torch.zeros(1, 4), torch.zeros(3, 1, 2))
        >>> J.shape, float(J[0, 0, 0, 0])
        (torch.Size([3, 1, 4, 4]), 0.5)
    """
    prob = prepare(step, h0, inputs, dtype, "step_jacobians")
    lin = Linearizer(prob)
    T, B, N = prob.T, prob.B, prob.N
    out = torch.empty(T, B, N, N, dtype=prob.dtype, device=prob.h0.device)
    cost = T * B * N * N * (N if prob.kind is None else 4)
    for t in progress_iter(range(1, T + 1), T, progress, cost, "step Jacobians"):
        out[t - 1] = lin.at(t).dense()
    bad = ~lin.finite[1:]                                # [T, B]
    if bad.any():
        out[bad] = float("nan")
        first = {}
        for b in range(B):
            idx = torch.nonzero(bad[:, b].cpu()).flatten()
            if len(idx):
                first[b] = [int(i) + 1 for i in idx]
        from ._util import ranges
        warn_nonfinite("step_jacobians", first, lambda ts: f"J_t is NaN for t = {ranges(ts)}")
    return out
