"""Bad input raises ShapeError/GradscopeError naming what arrived and what was expected; NaN/inf
inside the recurrence becomes NaN in the result with a NonFiniteWarning naming the lags; user steps
that resist vmap or forward-mode AD still get exact answers; progress bars obey ``progress``."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradscope.errors import GradscopeError, NonFiniteWarning, ShapeError
from gradscope.estimators import (ElmanStep, decay_rate, hidden_spectrum, jacobian_norms,
                                  lyapunov_spectrum, step_from_module, step_jacobians)

F64 = torch.float64  # (conftest.py runs the suite on one torch thread)


ESTIMATORS = [step_jacobians, jacobian_norms, lyapunov_spectrum]


def _tanh_step(N=4, I=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=g, dtype=F64) / math.sqrt(N)
    U = torch.randn(N, I, generator=g, dtype=F64)
    return lambda h, x: torch.tanh(h @ W.T + x @ U.T)


@pytest.mark.parametrize("fn", ESTIMATORS)
def test_batch_mismatch_names_both_shapes(fn):
    with pytest.raises(ShapeError, match=r"h0 has batch size 2 \[2, 4\] but inputs \[5, 3, 3\] has "
                                         r"batch size 3"):
        fn(_tanh_step(), torch.zeros(2, 4, dtype=F64), torch.zeros(5, 3, 3, dtype=F64))


def test_batch_first_inputs_get_a_hint():
    with pytest.raises(ShapeError, match=r"looks batch-first; pass inputs.transpose\(0, 1\)"):
        jacobian_norms(_tanh_step(), torch.zeros(2, 4, dtype=F64), torch.zeros(2, 5, 3, dtype=F64))


@pytest.mark.parametrize("fn", ESTIMATORS)
def test_non_floating_inputs_and_state(fn):
    with pytest.raises(ShapeError, match=r"inputs must be a floating-point tensor, got dtype "
                                         r"torch.int64 \[5, 2, 3\]"):
        fn(_tanh_step(), torch.zeros(2, 4, dtype=F64), torch.zeros(5, 2, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"h0 must be a floating-point tensor, got dtype torch.int32"):
        fn(_tanh_step(), torch.zeros(2, 4, dtype=torch.int32), torch.zeros(5, 2, 3, dtype=F64))


def test_inputs_must_be_time_major_and_non_empty():
    with pytest.raises(ShapeError, match=r"inputs must be \[T, B, \.\.\.\] \(time-major\), got \[5\]"):
        jacobian_norms(_tanh_step(), torch.zeros(2, 4, dtype=F64), torch.zeros(5, dtype=F64))
    with pytest.raises(ShapeError, match=r"inputs has no time steps: got \[0, 2, 3\]"):
        jacobian_norms(_tanh_step(), torch.zeros(2, 4, dtype=F64), torch.zeros(0, 2, 3, dtype=F64))
    with pytest.raises(ShapeError, match=r"every component of h0 must be 2-D \[B, N\], got \[4\]"):
        jacobian_norms(_tanh_step(), torch.zeros(4, dtype=F64), torch.zeros(5, 2, 3, dtype=F64))


def test_built_in_steps_check_state_and_input_sizes():
    lstm = step_from_module(nn.LSTM(3, 5, proj_size=2).double())
    x = torch.zeros(4, 2, 3, dtype=F64)
    with pytest.raises(ShapeError, match=r"an LSTM step takes the state \(h, c\) with shapes "
                                         r"\(\[B, 2\], \[B, 5\]\), got a Tensor \[2, 7\]"):
        jacobian_norms(lstm, torch.zeros(2, 7, dtype=F64), x)
    with pytest.raises(ShapeError, match=r"h0 has shape \(\[2, 5\], \[2, 5\]\), expected "
                                         r"\(\[2, 2\], \[2, 5\]\)"):
        jacobian_norms(lstm, (torch.zeros(2, 5, dtype=F64), torch.zeros(2, 5, dtype=F64)), x)
    with pytest.raises(ShapeError, match=r"inputs has shape \[4, 2, 6\], expected \[T, B, I\] = "
                                         r"\[T, 2, 3\]"):
        jacobian_norms(lstm, None, torch.zeros(4, 2, 6, dtype=F64))
    gru = step_from_module(nn.GRUCell(3, 5).double())
    with pytest.raises(ShapeError, match=r"a gru step takes a Tensor state \[B, 5\], got a tuple"):
        jacobian_norms(gru, (torch.zeros(2, 5, dtype=F64),), x)
    with pytest.raises(ShapeError, match=r"h0 has shape \[2, 4\], expected \[2, 5\]"):
        jacobian_norms(gru, torch.zeros(2, 4, dtype=F64), x)


def test_step_returning_another_structure_is_refused():
    x = torch.zeros(3, 2, 1, dtype=F64)
    h = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ShapeError, match=r"takes a Tensor state \[2, 4\] but returned a tuple "
                                         r"\(\[2, 4\], \[2, 4\]\)"):
        jacobian_norms(lambda h, x: (h, h), h, x)
    with pytest.raises(ShapeError, match=r"takes a tuple state \(\[2, 4\], \[2, 4\]\) but returned a "
                                         r"Tensor \[2, 4\]"):
        jacobian_norms(lambda s, x: s[0], (h, h), x)
    with pytest.raises(ShapeError, match=r"takes a state of 2 tensors .* but returned 3"):
        lyapunov_spectrum(lambda s, x: (s[0], s[1], s[0]), (h, h), x)
    with pytest.raises(ShapeError, match=r"returned a state of shape \[2, 3\] for a state of shape "
                                         r"\[2, 4\]"):
        step_jacobians(lambda h, x: h[:, :3], h, x)
    with pytest.raises(ShapeError, match=r"h0=None works only for the built-in steps"):
        jacobian_norms(lambda h, x: h, None, x)


def test_step_that_fails_after_the_dtype_cast_says_why():
    W = torch.randn(4, 4)                                    # float32, closed over
    with pytest.raises(GradscopeError, match=r"cannot cast the weights a plain function closes over"):
        jacobian_norms(lambda h, x: h @ W, torch.zeros(1, 4), torch.zeros(3, 1, 1),
                       dtype=torch.float64)


def test_modules_are_cast_on_a_copy():
    cell = nn.RNNCell(3, 4)                                   # float32
    # Small inputs: a saturated tanh makes 1 − h'² lose digits in float32 (autograd's too).
    x = 0.2 * torch.randn(6, 2, 3)
    n64 = jacobian_norms(cell, torch.zeros(2, 4), x, dtype=torch.float64)
    n32 = jacobian_norms(cell, torch.zeros(2, 4), x)
    assert cell.weight_hh.dtype == torch.float32 and cell.weight_hh.requires_grad
    np.testing.assert_allclose(n32, n64, rtol=1e-5)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, h, x):
            return torch.tanh(self.lin(h) + x.sum(-1, keepdim=True))

    c = Custom()
    a = jacobian_norms(c, torch.zeros(2, 4, dtype=F64), x.double())     # cast to h0's dtype
    assert c.lin.weight.dtype == torch.float32
    b = jacobian_norms(c, torch.zeros(2, 4), x)
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_multilayer_modules_need_an_explicit_layer():
    with pytest.raises(GradscopeError, match=r"step_from_module\(module, layer=\.\.\., reverse=\.\.\.\)"):
        jacobian_norms(nn.GRU(3, 4, num_layers=2), None, torch.zeros(3, 1, 3))
    with pytest.raises(GradscopeError, match=r"step must be a callable"):
        jacobian_norms(42, torch.zeros(1, 4), torch.zeros(3, 1, 3))


@pytest.mark.parametrize("k", [0, 5, -1, 2.0])
def test_k_out_of_range(k):
    with pytest.raises(ShapeError, match=r"k must be an integer with 1 <= k <= N = 4 \(the state "
                                         r"size\), got " + str(k)):
        lyapunov_spectrum(_tanh_step(), torch.zeros(1, 4, dtype=F64), torch.zeros(5, 1, 3, dtype=F64),
                          k=k)


def test_bad_options():
    h, x = torch.zeros(1, 4, dtype=F64), torch.zeros(5, 1, 3, dtype=F64)
    with pytest.raises(GradscopeError, match=r"ord must be 2 \(spectral\) or 'fro'"):
        jacobian_norms(_tanh_step(), h, x, ord=1)
    with pytest.raises(GradscopeError, match=r"method must be one of \('auto', 'probes'\) for "
                                             r"ord='fro', got 'svd'"):
        jacobian_norms(_tanh_step(), h, x, ord="fro", method="svd")
    with pytest.raises(GradscopeError, match=r"probes must be a positive integer, got 0"):
        jacobian_norms(_tanh_step(), h, x, ord="fro", method="probes", probes=0)
    with pytest.raises(GradscopeError, match=r"warmup must be an integer in \[0, T\) = \[0, 5\)"):
        lyapunov_spectrum(_tanh_step(), h, x, warmup=5)
    with pytest.raises(GradscopeError, match=r"reorth_every must be a positive integer, got 0"):
        lyapunov_spectrum(_tanh_step(), h, x, reorth_every=0)


def test_hidden_spectrum_and_decay_rate_errors():
    with pytest.raises(ShapeError, match=r"states must be \[T, B, H\] or \[M, H\], got shape \[5\]"):
        hidden_spectrum(np.zeros(5))
    with pytest.raises(ShapeError, match=r"states must be floating point, got torch.int64"):
        hidden_spectrum(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"states is empty: got \[0, 4\]"):
        hidden_spectrum(np.zeros((0, 4)))
    with pytest.raises(ShapeError, match=r"norms must be \[T\+1\] or \[B, T\+1\] with T\+1 >= 2 lags, "
                                         r"got shape \[1\]"):
        decay_rate(np.ones(1))
    with pytest.raises(ShapeError, match=r"norms must be non-negative"):
        decay_rate(np.array([1.0, -0.5]))
    with pytest.raises(GradscopeError, match=r"threshold must be in \(0, 1\), got 2"):
        decay_rate(np.ones(4), threshold=2)


# ---------------------------------------------------------------------------------------------
# Non-finite numbers inside the recurrence
# ---------------------------------------------------------------------------------------------

def _blowup_problem():
    """h' = relu(h) + x; sample 1 receives inf at step t = 6 (input index 5) of T = 10."""
    step = lambda h, x: torch.relu(h) + x
    x = torch.zeros(10, 2, 3, dtype=F64)
    x[5, 1, 0] = float("inf")
    return step, torch.ones(2, 3, dtype=F64), x


def test_jacobian_norms_nan_lags_and_warning():
    step, h0, x = _blowup_problem()
    with pytest.warns(NonFiniteWarning, match=r"jacobian_norms: NaN or inf inside the recurrence; "
                                              r"sample 1: lags 0\.\.10"):
        norms = jacobian_norms(step, h0, x)
    # The inf persists in h from t = 6 to T = 10, so even lag 0 (h_T itself) is affected.
    assert np.isnan(norms[1]).all()
    np.testing.assert_allclose(norms[0], 1.0)


def test_non_finite_only_in_the_middle_marks_the_lags_that_cross_it():
    """A NaN input at step 4 whose effect the step then forgets: lags k ≥ T − 4 + 1 = 7 are NaN."""
    def step(h, x):
        y = h * 0.5 + x
        return torch.where(torch.isfinite(y), y, torch.zeros_like(y))   # the state recovers

    x = torch.zeros(10, 2, 3, dtype=F64)
    x[3, 0, 1] = float("nan")
    with pytest.warns(NonFiniteWarning, match=r"sample 0: lags 7\.\.10"):
        norms = jacobian_norms(step, torch.ones(2, 3, dtype=F64), x)
    assert np.isnan(norms[0, 7:]).all()
    np.testing.assert_allclose(norms[0, :7], 0.5 ** np.arange(7))
    np.testing.assert_allclose(norms[1], 0.5 ** np.arange(11))


@pytest.mark.parametrize("method", ["svd", "subspace"])
def test_non_finite_products_do_not_break_the_spectral_routes(method):
    """NaN inside P must not reach the SVD / eigen-solver of either route (N = 70 > 64)."""
    def step(h, x):
        y = 0.5 * h + x
        return torch.where(torch.isfinite(y), y, torch.zeros_like(y))   # the state recovers

    x = torch.zeros(6, 2, 70, dtype=F64)
    x[2, 1, 5] = float("nan")
    with pytest.warns(NonFiniteWarning, match=r"sample 1: lags 4\.\.6"):
        norms = jacobian_norms(step, torch.ones(2, 70, dtype=F64), x, method=method)
    np.testing.assert_allclose(norms[0], 0.5 ** np.arange(7))
    np.testing.assert_allclose(norms[1, :4], 0.5 ** np.arange(4))
    assert np.isnan(norms[1, 4:]).all()
    # A state that stays NaN: the step Jacobians themselves are NaN from there on.
    W = 0.5 * torch.eye(70, dtype=F64)
    with pytest.warns(NonFiniteWarning, match=r"sample 1: lags 0\.\.6"):
        norms = jacobian_norms(lambda h, x: torch.tanh(h @ W + x), torch.zeros(2, 70, dtype=F64),
                               x, method=method)
    assert np.isfinite(norms[0]).all() and np.isnan(norms[1]).all()


def test_lyapunov_and_step_jacobians_nan_with_warning():
    step, h0, x = _blowup_problem()
    with pytest.warns(NonFiniteWarning, match=r"lyapunov_spectrum: .*sample 1: first non-finite "
                                              r"number at step 6"):
        lam = lyapunov_spectrum(step, h0, x)
    assert np.isnan(lam[1]).all() and np.isfinite(lam[0]).all()
    with pytest.warns(NonFiniteWarning, match=r"sample 1: J_t is NaN for t = 6\.\.10"):
        J = step_jacobians(step, h0, x)
    assert torch.isnan(J[5:, 1]).all() and not torch.isnan(J[:5]).any() and not torch.isnan(J[:, 0]).any()


def test_hidden_spectrum_and_decay_rate_with_non_finite():
    X = np.ones((5, 3))
    X[2, 1] = np.nan
    with pytest.warns(NonFiniteWarning, match=r"1 of 5 state rows hold NaN or inf \(first at row 2\)"):
        hs = hidden_spectrum(X)
    assert np.isnan(hs.effective_rank) and np.isnan(hs.singular_values).all()
    with pytest.warns(NonFiniteWarning, match=r"only 1 lag\(s\) with a finite, non-zero norm"):
        fit = decay_rate(np.array([1.0, np.nan, 0.0]))
    assert math.isnan(fit.rate) and fit.horizon == 2


# ---------------------------------------------------------------------------------------------
# User steps that resist vmap or forward-mode AD
# ---------------------------------------------------------------------------------------------

W_ = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) / 2


def _data_dependent(h, x):
    # Python control flow on tensor values: vmap refuses it.
    if float(h.abs().max()) > 1e6:
        h = h / 2
    return torch.tanh(h @ W_.T + x)


class _NoForwardAD(torch.autograd.Function):
    """tanh without a forward-mode formula (jvp raises), with a correct backward."""

    @staticmethod
    def forward(ctx, a):
        y = torch.tanh(a)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def _no_forward_ad(h, x):
    return _NoForwardAD.apply(h @ W_.T + x)


@pytest.mark.parametrize("odd", [_data_dependent, _no_forward_ad])
def test_user_steps_that_resist_vmap_or_jvp_get_exact_answers(odd):
    ref = lambda h, x: torch.tanh(h @ W_.T + x)
    h0 = torch.randn(2, 4, dtype=F64)
    x = torch.randn(8, 2, 4, dtype=F64)
    torch.testing.assert_close(step_jacobians(odd, h0, x), step_jacobians(ref, h0, x))
    np.testing.assert_allclose(jacobian_norms(odd, h0, x), jacobian_norms(ref, h0, x), rtol=1e-12)
    np.testing.assert_allclose(lyapunov_spectrum(odd, h0, x), lyapunov_spectrum(ref, h0, x),
                               rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Progress bars
# ---------------------------------------------------------------------------------------------

def test_progress_true_shows_a_bar_and_false_or_small_work_does_not(capsys):
    step = ElmanStep(torch.randn(4, 2), torch.randn(4, 4))
    x = torch.randn(20, 1, 2)
    jacobian_norms(step, None, x, progress=True)
    lyapunov_spectrum(step, None, x, progress=True)
    err = capsys.readouterr().err
    assert "Jacobian norms" in err and "Lyapunov" in err
    jacobian_norms(step, None, x, progress=False)
    jacobian_norms(step, None, x)                  # small work: no bar, whatever the terminal
    assert capsys.readouterr().err == ""
