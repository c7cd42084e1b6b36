"""Every estimator against a slow, independent oracle: ``torch.autograd.functional.jacobian`` on the
unrolled recurrence, one lag at a time, and ``numpy.linalg`` (float64).

Problems are data: each factory builds (step, h0, inputs, spec); every recurrent variant (Elman tanh
and relu, LSTM with and without projection, GRU, with and without bias, and user cells with Tensor and
tuple states) meets every check.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradscope.estimators import (ElmanStep, GRUStep, LSTMStep, jacobian_norms, lyapunov_spectrum,
                                  step_from_module, step_jacobians)
from gradscope.estimators.jacobians import Linearizer
from gradscope.estimators._util import prepare

F64 = torch.float64  # (conftest.py runs the suite on one torch thread)


def _rand(*shape, scale=1.0):
    return scale * torch.randn(*shape, dtype=F64)


class UserCell(nn.Module):
    """A user cell with a tuple state (h, v): a damped, driven oscillator with a tanh coupling."""

    def __init__(self, n=4, i=3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n, n) / math.sqrt(n))
        self.U = nn.Parameter(torch.randn(n, i))
        self.a = nn.Parameter(torch.rand(n))

    def forward(self, state, x):
        h, v = state
        v_next = torch.sigmoid(self.a) * v + torch.tanh(h @ self.W.T + x @ self.U.T)
        return h + 0.5 * v_next * torch.cos(h), v_next


def _gated(h, x, W=None):
    """A plain-function user step with a Tensor state (a minimal gated unit with fixed weights)."""
    Wg, Wh = _gated.Wg.to(h.device), _gated.Wh.to(h.device)  # the weights follow the state's device
    g = torch.sigmoid(h @ Wg.T + x.sum(-1, keepdim=True))
    return g * h + (1 - g) * torch.tanh(h @ Wh.T + x[..., :1])


_gen = torch.Generator().manual_seed(1234)
_gated.Wg = torch.randn(5, 5, generator=_gen, dtype=F64) / math.sqrt(5)
_gated.Wh = 1.5 * torch.randn(5, 5, generator=_gen, dtype=F64) / math.sqrt(5)


def _elman(nl, bias):
    def make():
        H, I = 6, 3
        step = ElmanStep(_rand(H, I), _rand(H, H, scale=1.2 / math.sqrt(H)),
                         _rand(H) if bias else None, _rand(H) if bias else None, nonlinearity=nl)
        h0 = _rand(2, H, scale=0.5)
        if nl == "relu":
            h0 = h0.abs()
        return step, h0, _rand(7, 2, I), None
    return make


def _lstm(proj, bias):
    def make():
        H, I, P = 5, 3, proj or 5
        w_hr = _rand(P, H) / math.sqrt(H) if proj else None
        step = LSTMStep(_rand(4 * H, I), _rand(4 * H, P, scale=1.5 / math.sqrt(P)),
                        _rand(4 * H) if bias else None, _rand(4 * H) if bias else None, weight_hr=w_hr)
        return step, (_rand(2, P, scale=0.5), _rand(2, H)), _rand(7, 2, I), [P, H]
    return make


def _gru(bias):
    def make():
        H, I = 6, 3
        step = GRUStep(_rand(3 * H, I), _rand(3 * H, H, scale=1.5 / math.sqrt(H)),
                       _rand(3 * H) if bias else None, _rand(3 * H) if bias else None)
        return step, _rand(2, H, scale=0.5), _rand(7, 2, I), None
    return make


def _module(mod_fn, spec):
    def make():
        mod = mod_fn().double()
        step = step_from_module(mod)
        sizes = step.state_sizes
        h0 = tuple(_rand(2, s, scale=0.5) for s in sizes) if len(sizes) == 2 else _rand(2, sizes[0])
        return step, h0, _rand(7, 2, step.input_size), spec
    return make


def _user_cell():
    cell = UserCell().double()
    return cell, (_rand(2, 4), _rand(2, 4)), _rand(7, 2, 3), [4, 4]


def _user_fn():
    return _gated, _rand(2, 5), _rand(7, 2, 2), None


def _on(problem, device):
    """A problem ``(step, h0, inputs, spec)`` built on the CPU (same numbers everywhere), on ``device``."""
    step, h0, x, spec = problem
    if isinstance(step, nn.Module):
        step = step.to(device)
    elif hasattr(step, "weight_hh"):  # a built-in step
        step = step.to(device=device)
    h0 = tuple(h.to(device) for h in h0) if isinstance(h0, tuple) else h0.to(device)
    return step, h0, x.to(device), spec


PROBLEMS = [
    pytest.param(_elman("tanh", True), id="elman-tanh"),
    pytest.param(_elman("tanh", False), id="elman-tanh-nobias"),
    pytest.param(_elman("relu", True), id="elman-relu"),
    pytest.param(_elman("relu", False), id="elman-relu-nobias"),
    pytest.param(_lstm(0, True), id="lstm"),
    pytest.param(_lstm(0, False), id="lstm-nobias"),
    pytest.param(_lstm(3, True), id="lstm-proj"),
    pytest.param(_lstm(3, False), id="lstm-proj-nobias"),
    pytest.param(_gru(True), id="gru"),
    pytest.param(_gru(False), id="gru-nobias"),
    pytest.param(_module(lambda: nn.LSTM(3, 4, proj_size=2), [2, 4]), id="nn.LSTM-proj"),
    pytest.param(_module(lambda: nn.GRUCell(3, 4), None), id="nn.GRUCell"),
    pytest.param(_user_cell, id="user-cell-tuple"),
    pytest.param(_user_fn, id="user-fn"),
]


# ---------------------------------------------------------------------------------------------
# The slow oracle
# ---------------------------------------------------------------------------------------------

def _flat(h):
    return torch.cat(h, -1) if isinstance(h, tuple) else h


def _unflat(z, spec):
    return tuple(torch.split(z, spec, -1)) if spec else z


def _trajectory(step, h0, x):
    hs, h = [h0], h0
    with torch.no_grad():
        for t in range(x.shape[0]):
            h = step(h, x[t])
            hs.append(h)
    return hs


def oracle_product(step, hs, x, spec, b, t0, t1):
    """∂h_{t1}/∂h_{t0} of sample b ([N, N] ndarray) by autograd through the unrolled steps."""
    z0 = _flat(hs[t0])[b:b + 1].detach()
    if t1 == t0:
        return np.eye(z0.shape[1])

    def f(z):
        s = _unflat(z, spec)
        for t in range(t0, t1):
            s = step(s, x[t, b:b + 1])
        return _flat(s)

    return torch.autograd.functional.jacobian(f, z0)[0, :, 0].detach().cpu().numpy()


def oracle_norms(step, h0, x, spec, ord):
    hs = _trajectory(step, h0, x)
    T, B = x.shape[0], x.shape[1]
    out = np.zeros((B, T + 1))
    for b in range(B):
        for k in range(T + 1):
            M = oracle_product(step, hs, x, spec, b, T - k, T)
            out[b, k] = np.linalg.svd(M, compute_uv=False)[0] if ord == 2 else np.linalg.norm(M)
    return out


def _autograd_version(step):
    """The same step hidden behind a lambda, so gradscope must use its autograd route."""
    return lambda h, x: step(h, x)


# ---------------------------------------------------------------------------------------------
# Per-step Jacobians
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", PROBLEMS)
def test_step_jacobians_equal_oracle(make, device):
    step, h0, x, spec = _on(make(), device)
    J = step_jacobians(step, h0, x).cpu().numpy()
    J_ag = step_jacobians(_autograd_version(step), h0, x).cpu().numpy()
    hs = _trajectory(step, h0, x)
    for t in range(1, x.shape[0] + 1):
        for b in range(x.shape[1]):
            ref = oracle_product(step, hs, x, spec, b, t - 1, t)
            np.testing.assert_allclose(J[t - 1, b], ref, rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(J_ag[t - 1, b], ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("make", PROBLEMS)
def test_structured_products_equal_dense(make, device):
    """The fast routes P·J_t (cumulative products) and J_t·V (tangents) equal the dense matrix."""
    step, h0, x, spec = _on(make(), device)
    for s in (step, _autograd_version(step)):
        lin = Linearizer(prepare(s, h0, x, None, "test"))
        N = lin.prob.N
        for t in (1, x.shape[0]):
            jac = lin.at(t)
            D = jac.dense()
            P = _rand(2, 3, N).to(device)
            V = _rand(2, N, 4).to(device)
            torch.testing.assert_close(jac.rmul(P), P @ D, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(jac.mul(V), D @ V, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(jac.mul(V[..., :1]), D @ V[..., :1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Norms of Jacobian products
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", PROBLEMS)
def test_jacobian_norms_equal_oracle(make, device):
    step, h0, x, spec = _on(make(), device)
    ref2 = oracle_norms(step, h0, x, spec, 2)
    reff = oracle_norms(step, h0, x, spec, "fro")
    for method in ("svd", "subspace"):
        np.testing.assert_allclose(jacobian_norms(step, h0, x, method=method), ref2, rtol=1e-6)
    np.testing.assert_allclose(jacobian_norms(_autograd_version(step), h0, x), ref2, rtol=1e-6)
    np.testing.assert_allclose(jacobian_norms(step, h0, x, ord="fro"), reff, rtol=1e-6)
    np.testing.assert_allclose(jacobian_norms(step, h0, x, log=True), np.log(ref2), rtol=1e-6,
                               atol=1e-9)


def test_subspace_iteration_on_a_large_state_equals_svd(device):
    """N = 96 (> the SVD cut-off): the default route is subspace iteration; it must equal the SVD."""
    lstm = nn.LSTM(4, 48).double().to(device)
    x = _rand(40, 3, 4).to(device)
    fast = jacobian_norms(lstm, None, x, log=True)
    exact = jacobian_norms(lstm, None, x, method="svd", log=True)
    np.testing.assert_allclose(fast, exact, rtol=1e-10, atol=1e-10)
    fast32 = jacobian_norms(lstm, None, x.float(), dtype=torch.float32, log=True)
    np.testing.assert_allclose(fast32, exact, rtol=0, atol=2e-5)


def test_probe_estimate_of_frobenius_norms(device):
    """E‖uᵀ P_k‖² = ‖P_k‖_F²: with m probes the relative s.d. of the squared norm is ≤ √(2/m)."""
    step, h0, x, spec = _on(_gru(True)(), device)
    exact = jacobian_norms(step, h0, x, ord="fro")
    est = jacobian_norms(step, h0, x, ord="fro", method="probes", probes=2000, seed=3)
    # √(2/2000) ≈ 3.2% on the square, 1.6% on the norm: 5% is > 3 s.d.
    np.testing.assert_allclose(est, exact, rtol=0.05)
    est_user = jacobian_norms(_autograd_version(step), h0, x, ord="fro", method="probes",
                              probes=2000, seed=3)
    np.testing.assert_allclose(est_user, est, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Lyapunov exponents
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", PROBLEMS)
def test_lyapunov_sum_equals_mean_log_determinant(make, device):
    """With k = N the exponents sum to (1/(T−w)) Σ_{t>w} ln|det J_t|, exactly (QR preserves volume)."""
    step, h0, x, spec = _on(make(), device)
    w = 2
    lam = lyapunov_spectrum(step, h0, x, warmup=w)
    lam_ag = lyapunov_spectrum(_autograd_version(step), h0, x, warmup=w)
    hs = _trajectory(step, h0, x)
    T = x.shape[0]
    for b in range(x.shape[1]):
        logdet = [np.linalg.slogdet(oracle_product(step, hs, x, spec, b, t - 1, t))[1]
                  for t in range(w + 1, T + 1)]
        ref = np.mean(logdet)
        if np.isfinite(ref):
            np.testing.assert_allclose(lam[b].sum(), ref, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(lam_ag[b], lam[b], rtol=1e-8, atol=1e-10)
        else:  # dead ReLU units: a singular step Jacobian, exactly −inf
            assert lam[b].min() == -np.inf
    assert np.all(lam[:, :-1] >= lam[:, 1:]), "exponents must be descending"


@pytest.mark.parametrize("make", [PROBLEMS[0], PROBLEMS[4], PROBLEMS[6], PROBLEMS[8], PROBLEMS[12]])
def test_lyapunov_top_k_equals_full_spectrum_top_k(make, device):
    """Long driven trajectory: top-k with k < N agrees with the top k of the k = N run."""
    step, h0, x, spec = _on(make(), device)
    x = torch.cat([x, _rand(593, x.shape[1], x.shape[2]).to(device)])
    full = lyapunov_spectrum(step, h0, x, warmup=100)
    N = full.shape[1]
    for k in (1, 2):
        top = lyapunov_spectrum(step, h0, x, k=k, warmup=100, seed=7)
        np.testing.assert_allclose(top, full[:, :k], atol=2e-3)
    assert N > 2


def test_lyapunov_reorth_every_does_not_change_a_well_separated_spectrum(device):
    step, h0, x, spec = _on(_gru(True)(), device)
    x = torch.cat([x, _rand(300, 2, 3).to(device)])
    a = lyapunov_spectrum(step, h0, x, k=2, warmup=50)
    b = lyapunov_spectrum(step, h0, x, k=2, warmup=50, reorth_every=5)
    np.testing.assert_allclose(a, b, rtol=1e-8)  # QR of a product: diag(R) multiplies exactly


@pytest.mark.parametrize("make", [PROBLEMS[0], PROBLEMS[4], PROBLEMS[6], PROBLEMS[8]])
def test_user_step_chunks_equal_the_closed_form_step_by_step(make, device):
    """A built-in step hidden behind a lambda goes through autograd in chunks (k = 1, or k > 1
    with reorth_every > 1); the closed form goes step by step. Same numbers."""
    step, h0, x, spec = _on(make(), device)
    x = torch.cat([x, _rand(120, x.shape[1], x.shape[2]).to(device)])
    for k, every in ((1, 1), (1, 3), (2, 4), (3, 1)):
        a = lyapunov_spectrum(step, h0, x, k=k, warmup=10, reorth_every=every)
        b = lyapunov_spectrum(_autograd_version(step), h0, x, k=k, warmup=10, reorth_every=every)
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
