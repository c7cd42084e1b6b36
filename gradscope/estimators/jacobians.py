"""Per-step state-to-state Jacobians J_t = ∂h_t/∂h_{t−1} along a trajectory.

Closed forms for the built-in steps (Elman tanh/relu, LSTM with and without projection, GRU), as
written in SCIENCE.md; autograd for any other step. Besides the dense matrix, each
step's Jacobian is offered as the two products the estimators need, so that they never pay more
than necessary:

- ``rmul(P)`` = P J_t for P ``[B, R, N]`` (cumulative products from the end, cotangent probes),
- ``mul(V)``  = J_t V for V ``[B, N, k]`` (tangent vectors for Lyapunov exponents).

For an LSTM, ``rmul`` exploits the block structure (∂c'/∂c and, without projection, ∂h'/∂c are
diagonal), which halves the N³ cost of a dense product. For a user step, ``rmul`` is a batch of
vector-Jacobian products (one backward pass of the step on R stacked copies of the state) and
``mul`` a batch of Jacobian-vector products (reverse-over-reverse on k stacked copies), so k
tangents cost about 3k steps, never the N backward passes of a dense Jacobian.

Index letters: T sequence, B batch, N state size, H hidden units, P projection size (LSTM with
``proj_size``; its state is (h [B, P], c [B, H]) so N = P + H), R rows, k tangent vectors.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from ._util import (Problem, State, flatten_state, prepare, progress_iter, ranges,
                    unflatten_state, warn_nonfinite)

__all__ = ["step_jacobians"]


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------

def _col(a: Tensor) -> Tensor:
    """``[B, H] -> [B, H, 1]``: a per-row factor for ``[B, H, k]`` tangents."""
    return a.unsqueeze(-1)


class _ElmanJac:
    """J = diag(φ'(a)) W_hh with φ' = 1 − h'² (tanh) or 1[a > 0] (relu)."""

    def __init__(self, step, h: Tensor, xw: Tensor, h_next: Optional[Tensor] = None):
        if h_next is None:
            h_next = step.recur(h, xw)
        self.next_flat = h_next
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

    ``mul`` never forms A or Mh: one product W_hh V_h and elementwise work, O(k·step).
    """

    def __init__(self, step, state, xw: Tensor):
        h, c = state
        i, f, g, o = step.gate_values(h, xw)
        c_next = f * c + i * g
        tc = torch.tanh(c_next)
        self.W = step.weight_hh
        self.H = int(c.shape[-1])
        self.P = int(h.shape[-1])
        # Gate-wise diagonal factors of A and Mh, in gate order (i, f, g, o).
        self.a_i, self.a_f, self.a_g = g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)
        self.a_o = tc * o * (1 - o)
        self.dtc = o * (1 - tc * tc)
        self.mc = self.dtc * f
        self.f = f
        self.Wr = step.weight_hr
        m = o * tc
        h_next = m if self.Wr is None else torch.matmul(m, self.Wr.mT)
        self.next_flat = torch.cat([h_next, c_next], dim=-1)
        self._MA = None

    @property
    def MA(self) -> Tensor:
        """[Mh; A] ``[B, 2H, P]`` in one buffer, so that P J needs a single batched matmul for
        the h columns; built on first use with in-place accumulation (few passes over H×P)."""
        if self._MA is None:
            H = self.H
            W_i, W_f, W_g, W_o = self.W.chunk(4, dim=0)
            lead = self.f.shape[:-1]
            MA = torch.empty(*lead, 2 * H, self.P, dtype=self.f.dtype, device=self.f.device)
            Mh, A = MA[..., :H, :], MA[..., H:, :]
            torch.mul(W_f, self.a_f.unsqueeze(-1), out=A)
            A.addcmul_(W_i, self.a_i.unsqueeze(-1))
            A.addcmul_(W_g, self.a_g.unsqueeze(-1))
            torch.mul(W_o, self.a_o.unsqueeze(-1), out=Mh)
            Mh.addcmul_(A, self.dtc.unsqueeze(-1))
            self._MA = MA
        return self._MA

    def dense(self) -> Tensor:
        H = self.H
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
        P = self.P
        Vh, Vc = V[..., :P, :], V[..., P:, :]
        vi, vf, vg, vo = torch.matmul(self.W, Vh).chunk(4, dim=-2)     # W_h· V_h, [B, H, k]
        dc = _col(self.a_f) * vf + _col(self.a_i) * vi + _col(self.a_g) * vg + _col(self.f) * Vc
        dm = _col(self.a_o) * vo + _col(self.dtc) * dc
        dh = dm if self.Wr is None else torch.matmul(self.Wr, dm)
        return torch.cat([dh, dc], dim=-2)


class _GRUJac:
    """J = diag(z) + diag((h−n) z(1−z)) W_hz + diag((1−z)(1−n²)) [diag(r) W_hn + diag(u r(1−r)) W_hr].

    ``dense``/``rmul`` build J once (three diagonal scalings, O(H²)); ``mul`` applies the closed
    form without forming it: one product W_hh V and elementwise work, O(k·step).
    """

    def __init__(self, step, h: Tensor, xw: Tensor):
        r, z, n, u = step.gate_values(h, xw)
        self.W = step.weight_hh
        self.z = z
        self.alpha = (h - n) * z * (1 - z)                  # row factor of W_hz
        beta = (1 - z) * (1 - n * n)
        self.beta_r = beta * r                              # row factor of W_hn
        self.gamma = beta * u * r * (1 - r)                 # row factor of W_hr (reset gate)
        self.next_flat = (1 - z) * n + z * h
        self._J = None

    def dense(self) -> Tensor:
        if self._J is None:
            W_r, W_z, W_n = self.W.chunk(3, dim=0)
            J = (self.alpha.unsqueeze(-1) * W_z + self.beta_r.unsqueeze(-1) * W_n
                 + self.gamma.unsqueeze(-1) * W_r)
            J.diagonal(dim1=-2, dim2=-1).add_(self.z)
            self._J = J
        return self._J

    def rmul(self, P: Tensor) -> Tensor:
        return torch.matmul(P, self.dense())

    def mul(self, V: Tensor) -> Tensor:
        ur, uz, un = torch.matmul(self.W, V).chunk(3, dim=-2)        # [B, H, k] each
        return (_col(self.z) * V + _col(self.alpha) * uz + _col(self.beta_r) * un
                + _col(self.gamma) * ur)


# --------------------------------------------------------------------------------------------
# Autograd for any other step
# --------------------------------------------------------------------------------------------

# The autograd engine behind torch.autograd.grad. Calling it directly skips grad()'s Python-side
# argument checks (symbolic shape comparisons), which cost ~25 µs a call: as much as a small
# step's backward pass, and the tangent loop makes two calls per step. The arguments are built
# here with matching shapes and dtypes; if the private signature ever changes, _grad falls back
# to the public function for good.
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def _grad(out: Tensor, inp: Tensor, cot: Tensor, create_graph: bool = False) -> Optional[Tensor]:
    """``torch.autograd.grad(out, inp, cot, create_graph=..., allow_unused=True)[0]``."""
    global _ENGINE
    if cot.dtype != out.dtype:
        cot = cot.to(out.dtype)
    if _ENGINE is not None:
        try:
            return _ENGINE.run_backward((out,), (cot,), create_graph, create_graph, (inp,), True,
                                        False)[0]
        except (TypeError, AttributeError):
            _ENGINE = None
    return torch.autograd.grad(out, inp, cot, create_graph=create_graph, allow_unused=True)[0]


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
        if r == 1:
            return self.h.detach(), self.x
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
                g = _grad(out, hr, P.reshape(B * R, N)) if out.requires_grad else None
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
        return self.mul_next(V)[1]

    def mul_next(self, V: Tensor):
        """``(h_next [B, N], J V [B, N, k])``: the next state comes free with the products.

        J V by reverse-over-reverse: g(u) = uᵀJ is linear in u, so ∂⟨g(u), v⟩/∂u = J v. Two
        backward passes of the folded step; in torch 2.13 this is several times faster than
        forward-mode AD (whose elementwise ops pay a large per-call overhead) and needs only
        ordinary backward formulas. Falls back to forward mode, then to the dense Jacobian.
        """
        o = self.o
        B, N, k = V.shape
        Vf = V[..., 0] if k == 1 else V.transpose(1, 2).reshape(B * k, N)
        if o.dbl_ok:
            try:
                hr, xr = self._folded(k)
                with torch.enable_grad():
                    hr.requires_grad_(True)
                    out = self._f(hr, xr)
                    nxt = out.detach() if k == 1 else out.detach()[::k]
                    if not out.requires_grad:         # the next state ignores the state
                        return nxt, torch.zeros_like(V)
                    u = o.zeros_like(out)
                    g = _grad(out, hr, u, create_graph=True)
                    if g is None:
                        return nxt, torch.zeros_like(V)
                    if not g.requires_grad:
                        # uᵀJ lost track of u (a backward that is not differentiable): we cannot
                        # tell J = 0 from an untracked J, so take another route.
                        raise RuntimeError("backward of the step is not differentiable")
                    z = _grad(g, u, Vf)
                if z is None:
                    return nxt, torch.zeros_like(V)
                return nxt, (z.unsqueeze(-1) if k == 1 else z.reshape(B, k, N).transpose(1, 2))
            except _FALLBACK_ERRORS:
                o.dbl_ok = False
        if o.jvp_ok:
            _load_jvp_decompositions()
            try:
                hr, xr = self._folded(k)
                with fwAD.dual_level():
                    dual = fwAD.make_dual(hr, Vf)
                    res = fwAD.unpack_dual(self._f(dual, xr))
                nxt = res.primal[::k]
                if res.tangent is None:  # the output does not depend on the state
                    return nxt, torch.zeros_like(V)
                return nxt, res.tangent.reshape(B, k, N).transpose(1, 2)
            except _FALLBACK_ERRORS:
                # Forward-mode AD lacks formulas for some ops; the dense Jacobian always works.
                o.jvp_ok = False
        with torch.no_grad():
            nxt = self._f(self.h, self.x)
        return nxt, torch.matmul(self.dense(), V)


_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError)


# --------------------------------------------------------------------------------------------
# Trajectory
# --------------------------------------------------------------------------------------------

class Linearizer:
    """The Jacobians J_t of a prepared problem along its trajectory h_0..h_T.

    With ``store=True`` the trajectory is computed up front (``states [T+1, B, N]``, and
    ``finite [T+1, B]``: step t of sample b saw only finite numbers in h_{t−1}, h_t and x_t; index 0
    is h_0 alone), as backward sweeps need it. With ``store=False`` nothing is kept: forward sweeps
    call :meth:`tangent_step`, which returns the next state along with the tangents.
    """

    def __init__(self, prob: Problem, store: bool = True):
        self.prob = prob
        self.vmap_ok = self.vjp_ok = self.jvp_ok = self.dbl_ok = True
        self._u = None
        step, spec = prob.step, prob.spec
        with torch.no_grad():
            # Built-in steps: the input projection of every step in one matmul.
            self.xw = step.project_inputs(prob.inputs) if prob.kind else None
        T = prob.T
        xfin = torch.isfinite(prob.inputs.reshape(T, prob.B, -1)).all(dim=-1)     # [T, B]
        self.x_finite = xfin
        self.states = None
        self.finite = None
        if not store:
            return
        with torch.no_grad():
            states = [prob.h0]
            h = unflatten_state(prob.h0, spec)
            for t in range(T):
                h = step.recur(h, self.xw[t]) if prob.kind else step(h, prob.inputs[t])
                if isinstance(h, list):
                    h = tuple(h)
                states.append(flatten_state(h))
        self.states = torch.stack(states)              # [T+1, B, N]
        sfin = torch.isfinite(self.states).all(dim=-1)  # [T+1, B]
        self.finite = torch.cat([sfin[:1], sfin[:-1] & sfin[1:] & xfin])

    def at(self, t: int, h: Optional[Tensor] = None):
        """The Jacobian J_t = ∂h_t/∂h_{t−1} (t = 1..T) as a structured object, at the stored
        state h_{t−1} or at ``h`` if given."""
        p = self.prob
        stored = h is None
        if stored:
            h = self.states[t - 1]
        with torch.no_grad():
            if p.kind in ("rnn_tanh", "rnn_relu"):
                return _ElmanJac(p.step, h, self.xw[t - 1], self.states[t] if stored else None)
            if p.kind == "lstm":
                return _LSTMJac(p.step, unflatten_state(h, p.spec), self.xw[t - 1])
            if p.kind == "gru":
                return _GRUJac(p.step, h, self.xw[t - 1])
        return _AutogradJac(self, h, p.inputs[t - 1])

    def zeros_like(self, out: Tensor) -> Tensor:
        """A zero cotangent that requires grad, reused from step to step (autograd never
        writes into it)."""
        u = self._u
        if u is None or u.shape != out.shape or u.dtype != out.dtype or u.device != out.device:
            u = self._u = torch.zeros_like(out, requires_grad=True)
        return u

    def tangent_step(self, t: int, h: Tensor, V: Tensor):
        """``(h_t [B, N], J_t V [B, N, k])`` from h = h_{t−1} and tangents ``V [B, N, k]``."""
        if self.prob.kind is None:
            return _AutogradJac(self, h, self.prob.inputs[t - 1]).mul_next(V)
        jac = self.at(t, h)
        with torch.no_grad():
            return jac.next_flat, jac.mul(V)

    def chunk_tangents(self, t0: int, t1: int, h: Tensor, V: Tensor):
        """``(h_{t1}, J_{t1}⋯J_{t0+1} V, sums)`` for a user step, or None if it cannot be done.

        One forward pass through the steps t0+1..t1 on k stacked copies of the state, then
        reverse-over-reverse through the whole unrolled piece: two autograd calls per chunk
        instead of two per step, which for small steps removes most of the per-step overhead.
        No renormalisation happens inside the chunk, so the caller keeps chunks short enough for
        the tangents to stay in range. ``sums [t1−t0, B]`` (float64) are the row sums of the
        states h_{t0+1..t1}, non-finite iff a state is.
        """
        if not self.dbl_ok:
            return None
        p = self.prob
        B, N, k = V.shape
        n = t1 - t0
        try:
            hr = h.detach() if k == 1 else h.repeat_interleave(k, dim=0)
            xs = p.inputs[t0:t1] if k == 1 else p.inputs[t0:t1].repeat_interleave(k, dim=1)
            sums = torch.empty(n, B, dtype=torch.float64, device=h.device)
            with torch.enable_grad():
                hr.requires_grad_(True)
                cur = hr
                for i in range(n):
                    out = p.step(unflatten_state(cur, p.spec), xs[i])
                    cur = flatten_state(tuple(out) if isinstance(out, list) else out)
                    torch.sum(cur.detach()[::k], dim=-1, dtype=torch.float64, out=sums[i])
                nxt = cur.detach()[::k]
                if not cur.requires_grad:
                    return nxt, torch.zeros_like(V), sums
                u = self.zeros_like(cur)
                g = _grad(cur, hr, u, create_graph=True)
                if g is None:
                    return nxt, torch.zeros_like(V), sums
                if not g.requires_grad:
                    raise RuntimeError("backward of the step is not differentiable")
                Vf = V[..., 0] if k == 1 else V.transpose(1, 2).reshape(B * k, N)
                z = _grad(g, u, Vf)
        except _FALLBACK_ERRORS:
            self.dbl_ok = False
            return None
        if z is None:
            return nxt, torch.zeros_like(V), sums
        return nxt, (z.unsqueeze(-1) if k == 1 else z.reshape(B, k, N).transpose(1, 2)), sums

    def first_bad_steps(self, finite: Optional[Tensor] = None) -> dict:
        """``{b: first step t with a non-finite number}`` for the samples that have one."""
        bad = (~(self.finite if finite is None else finite)).cpu()
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
    bad = ~lin.finite[1:] | ~torch.isfinite(out.reshape(T, B, -1)).all(dim=-1)     # [T, B]
    if bad.any():
        out[bad] = float("nan")
        steps = {}
        for b in range(B):
            idx = torch.nonzero(bad[:, b].cpu()).flatten()
            if len(idx):
                steps[b] = [int(i) + 1 for i in idx]
        warn_nonfinite("step_jacobians", steps, lambda ts: f"J_t is NaN for t = {ranges(ts)}")
    return out
