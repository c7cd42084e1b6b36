"""probe(): step functions of real sites, estimators on real models, model left untouched."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.estimators import jacobian_norms, step_from_module

from conftest import assert_no_hooks


def orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


class Loop(nn.Module):
    def __init__(self, cell, n, lstm=False, drop=False):
        super().__init__()
        self.cell, self.n, self.lstm = cell, n, lstm
        self.drop = nn.Dropout(0.5) if drop else None

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.n)
        s = (h, h.clone()) if self.lstm else h
        for t in range(x.shape[0]):
            s = self.cell(x[t], s)
            if self.drop is not None:
                s = self.drop(s)
        return s[0] if self.lstm else s


class TanhCell(nn.Module):
    def __init__(self, n, i):
        super().__init__()
        self.W = nn.Linear(n, n)
        self.U = nn.Linear(i, n)

    def forward(self, x, h):
        return torch.tanh(self.W(h) + self.U(x))


@pytest.mark.parametrize("make,sites", [
    (lambda: nn.RNN(3, 6), ["l0"]),
    (lambda: nn.RNN(3, 6, nonlinearity="relu"), ["l0"]),
    (lambda: nn.GRU(3, 6, num_layers=2), ["l0", "l1"]),
    (lambda: nn.LSTM(3, 6, bidirectional=True, proj_size=2), ["l0", "l0_reverse"]),
    (lambda: Loop(nn.LSTMCell(3, 6), 6, lstm=True), ["cell"]),
    (lambda: Loop(TanhCell(6, 3), 6), ["cell"]),
], ids=["rnn", "relu", "gru2", "lstm-bi-proj", "lstmcell", "usercell"])
def test_probe_measures_every_site(make, sites, device):
    model = make().double().to(device)
    T, B = 15, 3
    rec = gradscope.probe(model, torch.randn(T, B, 3, dtype=torch.float64).to(device), k=4)
    assert list(rec.sites) == sites
    for s in sites:
        jn = rec.jacobian_norms(s)
        assert jn.shape == (3, T + 1) and np.allclose(jn[:, 0], 1.0)
        assert rec.lyapunov(s).shape == (3, 4)
        ly = rec.lyapunov(s)
        assert np.all(ly[:, :-1] >= ly[:, 1:] - 1e-12)  # descending (-inf allowed: dead ReLU units)
        hs = rec.hidden_spectrum(s)
        assert 1.0 <= hs["effective_rank"] <= 6.0 + 1e-9
        assert rec.grad_norms(s).shape == (1, T)
        m = rec.site_measures(s)
        assert m["seq_len"] == T and "rate" in m["jacobian"] and "lambda1" in m["lyapunov"]


def test_probe_jacobians_of_a_real_rnn_are_exact(device):
    # nn.RNN with zero input weights and biases, h0 = 0: the state stays 0, every step Jacobian
    # is W_hh, and ‖∂h_T/∂h_{T-k}‖₂ = ‖W_hh^k‖₂ exactly.
    N, T = 8, 25
    rnn = nn.RNN(2, N, bias=False).double()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(N, N, generator=g, dtype=torch.float64) * 0.4
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
        rnn.weight_hh_l0.copy_(W)
    rec = gradscope.probe(rnn.to(device), torch.randn(T, 2, 2, dtype=torch.float64).to(device))
    want = [np.linalg.norm(np.linalg.matrix_power(W.numpy(), k), 2) for k in range(T + 1)]
    np.testing.assert_allclose(rec.jacobian_norms("l0")[0], want, rtol=1e-8)
    # and Lyapunov exponents approach ln|eig W| (finite T: loose)
    eig = np.sort(np.log(np.abs(np.linalg.eigvals(W.numpy()))))[::-1]
    assert rec.lyapunov("l0")[0, 0] == pytest.approx(eig[0], abs=0.15)
    assert rec.site_measures("l0")["weights"]["spectral_radius"] == pytest.approx(np.exp(eig[0]), rel=1e-9)


def test_probe_site_jacobians_equal_direct_estimator_on_the_layer(device):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2).double().to(device)
    x = torch.randn(12, 2, 3, dtype=torch.float64).to(device)
    rec = gradscope.probe(lstm, x, lyapunov=False)
    with torch.no_grad():
        out0, _ = nn.LSTM.forward(lstm, x)  # layer 1 consumes layer 0's output
        layer0 = nn.LSTM(3, 5).double().to(device)
        layer0.load_state_dict({k.replace("_l0", "_l0"): v for k, v in lstm.state_dict().items() if k.endswith("_l0")})
        out_l0, _ = layer0(x)
    direct = jacobian_norms(step_from_module(lstm, 1), None, out_l0)
    np.testing.assert_allclose(rec.jacobian_norms("l1"), direct, rtol=1e-10)


def test_probe_lstm_memory_time_from_forget_bias(device):
    # Near-zero weights: f ≈ σ(b_f) with b_f the sum of both forget biases; τ = −1/ln σ(b_f).
    lstm = nn.LSTM(2, 4)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(1e-4)
        H = 4
        lstm.bias_ih_l0[H:2 * H] = 1.0
        lstm.bias_hh_l0[H:2 * H] = 1.0
    rec = gradscope.probe(lstm.to(device), torch.randn(30, 2, 2).to(device), lyapunov=False)
    tau = -1 / math.log(1 / (1 + math.exp(-2.0)))
    assert rec.gate_stats("l0")["memory_time"] == pytest.approx(tau, rel=1e-2)
    assert rec.gate_stats("l0")["keep_gate"] == "forget"


def test_probe_dead_relu_units(device):
    rnn = nn.RNN(2, 4, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
        rnn.weight_hh_l0.zero_()
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.copy_(torch.tensor([1.0, -1.0, -2.0, 0.5]))  # units 1 and 2 never fire
    rec = gradscope.probe(rnn.to(device), torch.randn(10, 3, 2).to(device), lyapunov=False)
    assert rec.gate_stats("l0")["dead_units"] == pytest.approx(0.5)


def test_probe_leaves_the_model_untouched(device):
    torch.manual_seed(0)
    model = Loop(nn.GRUCell(3, 5), 5).to(device)
    rnn = nn.LSTM(3, 4).to(device)
    for m in (model, rnn):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        ps = list(m.parameters())
        ps[0].grad = torch.ones_like(ps[0])
        m.train()
        gradscope.probe(m, torch.randn(6, 2, 3).to(device))
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        assert torch.equal(ps[0].grad, torch.ones_like(ps[0])) and all(p.grad is None for p in ps[1:])
        assert m.training
        assert_no_hooks(m)
        with gradscope.watch(m, every=1):  # no watch left behind
            pass


def test_probe_user_cell_without_direct_state_flow_is_reported(device):
    model = Loop(TanhCell(4, 3), 4, drop=True).to(device)
    rec = gradscope.probe(model, torch.randn(6, 2, 3).to(device))
    assert rec.sites == ("cell",)
    assert any("does not enter its next call unchanged" in n for n in rec.notes)
    with pytest.raises(gradscope.MissingMeasureError, match="no 'jacobian_norms' for site 'cell'"):
        rec.jacobian_norms("cell")


def test_probe_losses_and_targets(device):
    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 6, batch_first=True)
            self.out = nn.Linear(6, 4)

        def forward(self, x):
            o, h = self.rnn(x)
            return self.out(o), h  # tuple output: the first tensor is the prediction

    model = Clf().to(device)
    x = torch.randn(2, 9, 3).to(device)
    y_int = torch.randint(0, 4, (2, 9)).to(device)
    rec = gradscope.probe(model, x, target=y_int, jacobians=False, lyapunov=False)
    want = nn.functional.cross_entropy(model(x)[0].reshape(-1, 4), y_int.reshape(-1)).item()
    assert rec.meta["loss"] == pytest.approx(want, rel=1e-5)
    rec = gradscope.probe(model, x, loss_fn=lambda out: out[1].sum(), jacobians=False, lyapunov=False)
    assert rec.meta["loss"] == pytest.approx(model(x)[1].sum().item(), rel=1e-5)
    with pytest.raises(GradscopeError, match="integer target of shape \\(2, 8\\)"):
        gradscope.probe(model, x, target=torch.zeros(2, 8, dtype=torch.long, device=device))
    with pytest.raises(GradscopeError, match="loss must be a scalar tensor"):
        gradscope.probe(model, x, loss_fn=lambda out: out[0])
    assert_no_hooks(model)


def test_probe_recording_round_trips_with_measures(tmp_path):
    rec = gradscope.probe(nn.LSTM(3, 4, num_layers=2), torch.randn(10, 2, 3))
    back = gradscope.load(rec.save(tmp_path / "p.npz"))
    for s in rec.sites:
        np.testing.assert_array_equal(back.jacobian_norms(s), rec.jacobian_norms(s))
        np.testing.assert_array_equal(back.lyapunov(s), rec.lyapunov(s))
        assert back.gate_stats(s) == pytest.approx(rec.gate_stats(s)) or back.gate_stats(s) == rec.gate_stats(s)


def test_probe_rejects_k_larger_than_state(device):
    with pytest.raises(GradscopeError, match="k=50 exceeds the state size 4"):
        gradscope.probe(nn.RNN(3, 4).to(device), torch.randn(6, 2, 3).to(device), k=50)
