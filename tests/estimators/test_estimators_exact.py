"""Estimators against answers known in closed form (DESIGN.md, "Ground truths the tests stand on")."""
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradscope.estimators import (ElmanStep, LSTMStep, decay_rate, hidden_spectrum, jacobian_norms,
                                  lyapunov_spectrum, step_jacobians)
from gradscope.estimators.attention import (entropy_sums, normalized_entropy, qk_spectral_norms, rank_residual,
                                            token_cosine, token_sums)
from gradscope.estimators.gates import bias_of_memory_time, memory_time, memory_time_of_keep

F64 = torch.float64  # (conftest.py runs the suite on one torch thread)


def _orthogonal(n, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def _linear(W):
    """h' = W h + x: ∂h_T/∂h_{T−k} = W^k exactly."""
    return lambda h, x: h @ W.T + x


def _rotation_blocks(moduli, seed=1):
    """Block-diagonal 2×2 scaled rotations: eigenvalues r_j e^{±iθ_j}, so |eig| = r_j twice."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * len(moduli)
    D = torch.zeros(n, n, dtype=F64)
    for j, r in enumerate(moduli):
        th = float(torch.rand(1, generator=g)) * math.pi
        c, s = math.cos(th), math.sin(th)
        D[2 * j:2 * j + 2, 2 * j:2 * j + 2] = r * torch.tensor([[c, -s], [s, c]], dtype=F64)
    return D


# ---------------------------------------------------------------------------------------------
# Linear recurrences: every norm known exactly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.9, 1.0, 1.1])
@pytest.mark.parametrize("method", ["svd", "subspace"])
def test_scaled_orthogonal_gives_s_to_the_k(s, method, device):
    N, T, B = 8, 30, 2
    W = (s * _orthogonal(N)).to(device)
    x = torch.randn(T, B, N, dtype=F64, device=device)
    h0 = torch.randn(B, N, dtype=F64, device=device)
    k = np.arange(T + 1)
    spec = jacobian_norms(_linear(W), h0, x, method=method)
    np.testing.assert_allclose(spec, np.broadcast_to(s ** k, (B, T + 1)), rtol=1e-8)
    fro = jacobian_norms(_linear(W), h0, x, ord="fro")
    np.testing.assert_allclose(fro, np.broadcast_to(math.sqrt(N) * s ** k, (B, T + 1)), rtol=1e-8)


def test_diagonal_gives_largest_modulus_to_the_k():
    d = torch.tensor([0.3, -0.8, 0.5, 0.65, -0.1], dtype=F64)
    T = 40
    norms = jacobian_norms(_linear(torch.diag(d)), torch.zeros(1, 5, dtype=F64),
                           torch.zeros(T, 1, 5, dtype=F64))
    np.testing.assert_allclose(norms[0], 0.8 ** np.arange(T + 1), rtol=1e-8)
    fro = jacobian_norms(_linear(torch.diag(d)), torch.zeros(1, 5, dtype=F64),
                         torch.zeros(T, 1, 5, dtype=F64), ord="fro")
    ref = np.sqrt(((d.numpy()[:, None] ** 2) ** np.arange(T + 1)).sum(0))
    np.testing.assert_allclose(fro[0], ref, rtol=1e-8)


def test_float32_products_reach_1e_minus_200_without_loss_or_slowdown():
    """W = 0.1·Q, T = 200: ‖W^200‖ = 1e-200, far below float32's range; the log scale keeps it."""
    N, T = 64, 200
    W = 0.1 * _orthogonal(N, dtype=torch.float32)
    x = torch.zeros(T, 1, N)
    for method in ("svd", "subspace"):
        t0 = time.perf_counter()
        ln = jacobian_norms(_linear(W), torch.zeros(1, N), x, log=True, method=method)
        elapsed = time.perf_counter() - t0
        ref = np.arange(T + 1) * math.log(0.1)
        np.testing.assert_allclose(ln[0, 1:], ref[1:], rtol=1e-5)
        assert ln[0, 0] == 0.0
        assert elapsed < 10, f"{method}: {elapsed:.1f} s for N=64, T=200"
    norms = jacobian_norms(_linear(W), torch.zeros(1, N), x)
    np.testing.assert_allclose(norms[0, 200], 1e-200, rtol=1e-3)


def test_log_norms_go_below_the_float64_range():
    W = 1e-3 * torch.eye(3, dtype=F64)
    ln = jacobian_norms(_linear(W), torch.zeros(1, 3, dtype=F64), torch.zeros(150, 1, 3, dtype=F64),
                        log=True)
    np.testing.assert_allclose(ln[0], np.arange(151) * math.log(1e-3), rtol=1e-12)
    assert ln[0, -1] < math.log(1e-308)          # 1e-450: only the log can hold it


def test_exactly_zero_jacobian_gives_zero_norm_not_nan():
    """ReLU with every unit off: J = 0, the norm is exactly 0 (log −inf), not a non-finite warning."""
    H = 4
    step = ElmanStep(torch.zeros(H, 1, dtype=F64), torch.eye(H, dtype=F64), None,
                     -torch.ones(H, dtype=F64), nonlinearity="relu")
    norms = jacobian_norms(step, torch.zeros(2, H, dtype=F64), torch.zeros(5, 2, 1, dtype=F64))
    np.testing.assert_array_equal(norms[:, 0], 1.0)
    np.testing.assert_array_equal(norms[:, 1:], 0.0)
    lam = lyapunov_spectrum(step, torch.zeros(2, H, dtype=F64), torch.zeros(5, 2, 1, dtype=F64))
    assert np.all(lam == -np.inf)


# ---------------------------------------------------------------------------------------------
# Lyapunov exponents: ln|eig W|
# ---------------------------------------------------------------------------------------------

MODULI = [1.05, 0.97, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]     # N = 20


def test_lyapunov_of_a_linear_map_is_log_eigenvalue_moduli():
    """A non-normal W = S D S⁻¹ with D block rotations: exponents are ln r_j, each twice."""
    D = _rotation_blocks(MODULI)
    g = torch.Generator().manual_seed(5)
    S = torch.eye(20, dtype=F64) + 0.3 * torch.randn(20, 20, generator=g, dtype=F64) / math.sqrt(20)
    W = S @ D @ torch.linalg.inv(S)
    lam = lyapunov_spectrum(_linear(W), torch.zeros(1, 20, dtype=F64),
                            torch.zeros(3000, 1, 20, dtype=F64), warmup=200)
    ref = np.sort(np.repeat(np.log(MODULI), 2))[::-1]
    np.testing.assert_allclose(lam[0], ref, atol=1e-3)
    top = lyapunov_spectrum(_linear(W), torch.zeros(1, 20, dtype=F64),
                            torch.zeros(3000, 1, 20, dtype=F64), k=3, warmup=200)
    np.testing.assert_allclose(top[0], ref[:3], atol=1e-3)


def test_lyapunov_of_a_contracting_tanh_rnn_is_log_eigenvalue_moduli():
    """Zero input, ‖W‖₂ < 1: the state goes to 0, the Jacobian to W, exponents to ln|eig W|."""
    moduli = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3]
    Q = _orthogonal(20, seed=3)
    W = Q @ _rotation_blocks(moduli) @ Q.T                 # normal: ‖W‖₂ = 0.95
    assert torch.linalg.matrix_norm(W, ord=2) < 1
    step = ElmanStep(torch.zeros(20, 1, dtype=F64), W)
    h0 = 0.5 * torch.randn(1, 20, dtype=F64)
    lam = lyapunov_spectrum(step, h0, torch.zeros(3000, 1, 1, dtype=F64), warmup=200)
    ref = np.sort(np.repeat(np.log(moduli), 2))[::-1]
    np.testing.assert_allclose(lam[0], ref, atol=1e-3)


@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_lyapunov_of_extreme_growth_in_float32(scale):
    """Growth 1e±4 per step: a chunk of user steps would leave float32's range, so it is redone
    step by step; the exponent stays exact."""
    W = scale * torch.eye(3)
    lam = lyapunov_spectrum(_linear(W), torch.zeros(2, 3), torch.zeros(50, 2, 3), k=1)
    np.testing.assert_allclose(lam, math.log(scale), rtol=1e-6)
    lam3 = lyapunov_spectrum(_linear(W), torch.zeros(2, 3), torch.zeros(50, 2, 3))
    np.testing.assert_allclose(lam3, math.log(scale), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# LSTM constant error carousel
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b_f", [0.0, 1.0, 2.0, 3.0])
def test_lstm_with_tiny_weights_decays_at_sigmoid_of_forget_bias(b_f):
    """Near-zero weights: the cell path carries the state, ∂c_T/∂c_{T−k} = Π diag(f) = σ(b_f)^k.

    The full (h, c) Jacobian has blocks [[Jhh ≈ 0, Jhc = diag(o(1−tanh²c')f)], [Jch ≈ 0, diag(f)]],
    so from lag 1 on its norm is f^(k−1)·‖[Jhc; diag f]‖: it decays at the same rate σ(b_f) per lag,
    which is what gradients through the whole state see. The c-block alone gives σ(b_f)^k from
    lag 0. Both are checked: the per-lag ratio of the (h, c) norms, and the c-block of the product
    of step Jacobians.
    """
    H, I, T = 8, 3, 25
    g = torch.Generator().manual_seed(2)
    tiny = lambda *s: 1e-4 * torch.randn(*s, generator=g, dtype=F64)
    b_ih = torch.zeros(4 * H, dtype=F64)
    b_hh = torch.zeros(4 * H, dtype=F64)
    b_ih[H:2 * H] = b_f / 2                                   # b_f is the sum of both biases
    b_hh[H:2 * H] = b_f / 2
    step = LSTMStep(tiny(4 * H, I), tiny(4 * H, H), b_ih, b_hh)
    x = torch.randn(T, 2, I, generator=g, dtype=F64)
    h0 = (torch.randn(2, H, generator=g, dtype=F64), torch.randn(2, H, generator=g, dtype=F64))
    f = 1 / (1 + math.exp(-b_f))

    norms = jacobian_norms(step, h0, x)
    ratios = norms[:, 2:] / norms[:, 1:-1]
    np.testing.assert_allclose(ratios, f, rtol=1e-2)
    fit = decay_rate(norms[:, 1:])
    assert fit.rate == pytest.approx(math.log(f), rel=1e-2)

    J = step_jacobians(step, h0, x)
    P = torch.eye(2 * H, dtype=F64).expand(2, -1, -1)
    for t in range(T - 1, -1, -1):
        P = P @ J[t]
    cc = torch.linalg.matrix_norm(P[:, H:, H:], ord=2).numpy()
    np.testing.assert_allclose(cc, f ** T, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Hidden-state spectra
# ---------------------------------------------------------------------------------------------

def _rank_r_states(sigma, M=60, H=10, seed=0):
    """X = U diag(σ) Vᵀ with U ⟂ 1 (so centring changes nothing) and orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    U = torch.randn(M, r, generator=g, dtype=F64)
    U = U - U.mean(0)
    U = torch.linalg.qr(U).Q
    V = torch.linalg.qr(torch.randn(H, r, generator=g, dtype=F64)).Q
    return (U * torch.tensor(sigma, dtype=F64)) @ V.T


def test_hidden_spectrum_of_a_rank_r_matrix():
    sigma = np.array([5.0, 3.0, 2.0, 0.5])
    X = _rank_r_states(sigma)
    hs = hidden_spectrum(X)
    np.testing.assert_allclose(hs.singular_values[:4], sigma, rtol=1e-12)
    assert np.all(hs.singular_values[4:] < 1e-12)
    p = sigma / sigma.sum()
    assert hs.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert hs.participation_ratio == pytest.approx((sigma ** 2).sum() ** 2 / (sigma ** 4).sum(),
                                                   rel=1e-10)
    assert hs.n_samples == 60
    np.testing.assert_allclose(hs.explained_variance_ratio[:4], sigma ** 2 / (sigma ** 2).sum(),
                               rtol=1e-10)


def test_hidden_spectrum_equal_singular_values_give_the_rank():
    hs = hidden_spectrum(_rank_r_states([2.0, 2.0, 2.0]).numpy())
    assert hs.effective_rank == pytest.approx(3.0, rel=1e-9)
    assert hs.participation_ratio == pytest.approx(3.0, rel=1e-9)


def test_hidden_spectrum_takes_time_major_batches_and_centres():
    X = _rank_r_states([4.0, 1.0], M=60)
    states = X.reshape(12, 5, 10) + 7.0                 # [T, B, H] with a mean offset
    a = hidden_spectrum(states)
    b = hidden_spectrum(X.numpy())
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-9, atol=1e-9)
    raw = hidden_spectrum(states, center=False)
    assert raw.singular_values[0] > 50                   # the mean direction dominates
    f32 = hidden_spectrum(states.float())
    np.testing.assert_allclose(f32.singular_values[:2], [4.0, 1.0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Decay rate and horizon
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.5, 0.9, 0.97])
def test_decay_rate_of_a_geometric_curve(s):
    k = np.arange(400)
    thr = 1e-3
    fit = decay_rate(s ** k, threshold=thr)
    assert fit.rate == pytest.approx(math.log(s), rel=1e-10)
    assert fit.intercept == pytest.approx(0.0, abs=1e-9)
    assert fit.horizon == math.ceil(math.log(thr) / math.log(s))
    assert fit.explosion_lag == math.inf
    assert fit.n_used == 400
    assert fit.time_constant == pytest.approx(-1 / math.log(s))
    same = decay_rate(k * math.log(s), threshold=thr, log=True)
    assert same.rate == pytest.approx(fit.rate, rel=1e-12) and same.horizon == fit.horizon


def test_decay_rate_growth_gives_explosion_lag_and_no_horizon():
    k = np.arange(100)
    fit = decay_rate(1.2 ** k, threshold=1e-3)
    assert fit.rate == pytest.approx(math.log(1.2), rel=1e-10)
    assert fit.explosion_lag == math.ceil(math.log(1e3) / math.log(1.2))
    assert fit.horizon == math.inf
    assert fit.time_constant == math.inf


def test_decay_rate_median_over_batch_ignores_nan_and_zero():
    k = np.arange(50, dtype=float)
    three = np.stack([0.8 ** k, 0.8 ** k * 4.0, 0.8 ** k * 0.5])
    fit = decay_rate(three)                              # lag by lag median: the first curve
    assert fit.rate == pytest.approx(math.log(0.8), rel=1e-9)
    assert fit.intercept == pytest.approx(0.0, abs=1e-9)
    four = np.concatenate([three, 1e6 * 0.8 ** k[None]])
    # With 4 samples the median is the mean of the middle two ln-norms: ln √(1·4) = ln 2.
    assert decay_rate(four).intercept == pytest.approx(math.log(2.0), rel=1e-9)
    four[3, 10:] = np.nan                                # a sample that went non-finite: left out
    four[0, 45:] = 0.0                                   # exact zeros (ln = −inf) stay in the median
    fit = decay_rate(four)
    assert fit.rate == pytest.approx(math.log(0.8), rel=1e-9)
    assert fit.intercept == pytest.approx(0.0, abs=1e-9)     # lags 10..44: the median is curve 0
    zeros = decay_rate(np.array([1.0, 0.5, 0.0, 0.0]))
    assert zeros.horizon == 2 and zeros.n_used == 2          # zeros: below threshold, not fitted


def test_decay_rate_is_robust_to_a_short_transient():
    k = np.arange(60, dtype=float)
    y = 0.9 ** k
    y[:5] = [1.0, 3.0, 2.0, 1.5, 1.2]                    # an initial transient
    fit = decay_rate(y)
    assert fit.rate == pytest.approx(math.log(0.9), rel=1e-6)


def test_decay_rate_takes_tensors_and_long_curves():
    k = torch.arange(5001, dtype=F64)
    fit = decay_rate(torch.exp(-0.01 * k), log=False)
    assert fit.rate == pytest.approx(-0.01, rel=1e-9)
    assert fit.n_used <= 2000


# ---------------------------------------------------------------------------------------------
# Properties over random linear maps
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, database=None)
@given(d=st.lists(st.floats(-1.5, 1.5).filter(lambda v: abs(v) > 1e-3), min_size=1, max_size=6),
       T=st.integers(1, 12))
def test_diagonal_maps_of_any_size_and_length(d, T):
    """‖diag(d)^k‖₂ = max|d|^k; Lyapunov exponents are ln|d_i| exactly (diagonal: Q stays aligned
    only asymptotically, but the sum over all exponents is exact for any T)."""
    D = torch.tensor(d, dtype=F64)
    N = len(d)
    h0, x = torch.zeros(1, N, dtype=F64), torch.zeros(T, 1, N, dtype=F64)
    norms = jacobian_norms(_linear(torch.diag(D)), h0, x, log=True)
    np.testing.assert_allclose(norms[0], np.arange(T + 1) * math.log(max(abs(v) for v in d)),
                               rtol=1e-10, atol=1e-12)
    lam = lyapunov_spectrum(_linear(torch.diag(D)), h0, x)
    assert lam[0].sum() == pytest.approx(float(torch.log(D.abs()).sum()), rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Attention measures (index letters: B samples, H heads, T queries, S keys, P tokens, E features)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 5, 17])
def test_uniform_attention_has_entropy_ln_t(T, device):
    """Uniform rows have entropy exactly ln T: normalised 1; the raw sum is ln T times the rows."""
    p = torch.full((2, 3, T, T), 1.0 / T, dtype=F64, device=device)
    torch.testing.assert_close(normalized_entropy(p), torch.ones(3, dtype=F64, device=device), rtol=1e-12, atol=0)
    s, n = entropy_sums(p)
    assert torch.equal(n, torch.full((3,), 2.0 * T, dtype=F64, device=device))
    ent = torch.special.entr(p).sum(-1)                         # un-normalised row entropy [B, H, T]
    torch.testing.assert_close(ent, torch.full_like(ent, math.log(T)), rtol=1e-12, atol=0)


def test_one_hot_attention_has_entropy_zero_and_short_rows_are_left_out(device):
    p = torch.eye(4, dtype=F64, device=device).expand(1, 2, 4, 4)   # every query attends only itself
    assert torch.equal(normalized_entropy(p), torch.zeros(2, dtype=F64, device=device))
    causal = torch.ones(4, 4, dtype=torch.bool, device=device).tril()
    uniform = causal.to(F64) / causal.sum(-1, keepdim=True)
    s, n = entropy_sums(uniform[None, None], causal)       # row 0 has one key: not counted
    assert float(n) == 3 and float(s) == pytest.approx(3.0, rel=1e-12)
    valid = torch.tensor([[True, True, False, False]], device=device)
    assert float(entropy_sums(uniform[None, None], causal, valid)[1]) == 1
    assert math.isnan(float(normalized_entropy(uniform[None, None, :1, :1])))  # no row: NaN


def test_rank_one_output_has_residual_zero(device):
    """Every token the same vector (the rank-one 1xᵀ): residual 0, cosine 1. With opposite tokens
    ±x the mean is 0, so the residual is 1 and the cosine −1."""
    x = torch.tensor([[[1.0, -2.0, 3.0, 0.5, -0.25, 4.0, 8.0, -1.0]]], dtype=F64, device=device)  # exact sums
    X = x.expand(3, 6, 8)
    assert float(rank_residual(X)) == 0.0
    assert float(token_cosine(X)) == pytest.approx(1.0, rel=1e-12)
    pm = torch.cat([x, -x], dim=1)
    assert float(rank_residual(pm)) == pytest.approx(1.0, rel=1e-12)
    assert float(token_cosine(pm)) == pytest.approx(-1.0, rel=1e-12)
    r, c, n = token_sums(torch.cat([X, torch.cat([x, -x, x, -x, x, -x], dim=1)]))
    assert float(n) == 4 and float(r) == pytest.approx(1.0, rel=1e-12)


def test_identical_tokens_have_residual_zero_and_cosine_one(device):
    X = torch.randn(1, 1, 8).expand(3, 6, 8).to(device)
    assert float(rank_residual(X)) < 1e-6
    assert abs(float(token_cosine(X)) - 1) < 1e-6
    assert rank_residual(X).device == X.device
    empty = torch.zeros(2, 3, dtype=torch.bool, device=device)  # no valid token: NaN, on the device
    assert math.isnan(float(rank_residual(X[:2, :3], empty))) and token_cosine(X[:2, :3], empty).device == X.device


def test_normalized_entropy_pure_function(device):
    p = torch.softmax(torch.randn(2, 3, 5, 5), -1).to(device)
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril().to(device)
    pc = torch.softmax(torch.randn(2, 3, 5, 5).to(device).masked_fill(~allowed, float("-inf")), -1)
    got = normalized_entropy(pc, allowed)
    ent = -(pc * pc.clamp(min=1e-30).log()).sum(-1)[:, :, 1:] / torch.log(torch.arange(2, 6.0, device=device))
    torch.testing.assert_close(got, ent.mean((0, 2)))
    assert torch.all((normalized_entropy(p) > 0) & (normalized_entropy(p) < 1))


def test_qk_spectral_norm_by_power_iteration_matches_svd(device):
    g = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(12, 16, generator=g, dtype=torch.float64), torch.randn(12, 16, generator=g, dtype=torch.float64)
    wq, wk = wq.to(device), wk.to(device)
    got, v = qk_spectral_norms(wq, wk, heads=3, scale=0.5, iters=200)
    want = [0.5 * torch.linalg.matrix_norm(wq[4 * h:4 * h + 4].T @ wk[4 * h:4 * h + 4], ord=2) for h in range(3)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=0)
    warm, _ = qk_spectral_norms(wq, wk, heads=3, scale=0.5, v0=v, iters=1)  # warm start stays converged
    torch.testing.assert_close(warm, got, rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------------------------
# Memory time τ = −1/ln σ(b) of a gate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [-20.0, -3.0, 0.0, 1.0, 2.5, 8.0])
def test_memory_time_of_sigmoid_bias_round_trips(b):
    keep = 1.0 / (1.0 + math.exp(-b))   # σ(b) (1 − σ(b) stays far above float64 rounding here)
    tau = memory_time(b)
    assert tau == pytest.approx(-1.0 / math.log(keep), rel=1e-9)
    assert bias_of_memory_time(tau) == pytest.approx(b, rel=1e-9, abs=1e-9)
    assert memory_time_of_keep(keep) == pytest.approx(tau, rel=1e-9)
    # σ(b)^τ = e^{-1}: a stored value shrinks by e over τ steps
    assert keep ** tau == pytest.approx(math.exp(-1.0), rel=1e-9)


def test_memory_time_exact_values_and_limits():
    assert memory_time(0.0) == pytest.approx(1 / math.log(2), rel=1e-15)
    assert memory_time(1000.0) == math.inf and math.isnan(memory_time(math.nan))
    assert memory_time(40.0) == pytest.approx(math.exp(40.0), rel=1e-9)          # τ ≈ e^b for large b
    np.testing.assert_allclose(memory_time(np.array([[0.0, 1.0]])), [[1 / math.log(2), memory_time(1.0)]], rtol=1e-15)
    assert memory_time_of_keep(0.5) == pytest.approx(1 / math.log(2), rel=1e-15)
    assert memory_time_of_keep(1.0) == math.inf and memory_time_of_keep(0.0) == 0.0
    keep = torch.tensor([0.5, math.exp(-0.1)], dtype=F64)
    torch.testing.assert_close(memory_time_of_keep(keep), torch.tensor([1 / math.log(2), 10.0], dtype=F64),
                               rtol=1e-12, atol=0)
