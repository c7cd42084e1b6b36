"""A labelled zoo: models whose regime follows from theory, classified at T = 50 and T = 500.

Each entry is data: a factory, and the expected regime at each length with the reason. The
analyzer must classify every site of every model correctly (probe + diagnose).
"""

import pytest
import torch
from torch import nn

import gradscope

H = 16


def orth(n, gain, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return gain * q * torch.sign(torch.diagonal(r))


def elman(nl, gain, identity=False):
    def make():
        m = nn.RNN(2, H, nonlinearity=nl).double()
        with torch.no_grad():
            m.weight_hh_l0.copy_(torch.eye(H, dtype=torch.float64) if identity else orth(H, gain))
            m.bias_hh_l0.zero_()
            m.bias_ih_l0.fill_(1.0 if identity else 0.0)  # IRNN: a positive drive keeps every unit active
        return m
    return make


def lstm(bf, layers=1, bidirectional=False):
    """Near-zero weights, effective forget bias bf split over both bias vectors: f ≈ σ(bf)."""
    def make():
        m = nn.LSTM(2, H, num_layers=layers, bidirectional=bidirectional).double()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.mul_(0.01)
                if name.startswith("bias"):
                    p[H:2 * H] = bf / 2
        return m
    return make


def gru(bz, layers=1, bidirectional=False):
    """Near-zero weights, update-gate bias bz: h' ≈ σ(bz) h + (1 − σ(bz)) n."""
    def make():
        m = nn.GRU(2, H, num_layers=layers, bidirectional=bidirectional).double()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.mul_(0.01)
                if name.startswith("bias"):
                    p[H:2 * H] = bz / 2
        return m
    return make


class CellLoop(nn.Module):
    def __init__(self, gain, act):
        super().__init__()
        self.cell = _Cell(gain, act)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], H)
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(h)
        return torch.stack(outs)


class _Cell(nn.Module):
    def __init__(self, gain, act):
        super().__init__()
        self.W = nn.Linear(H, H, bias=False).double()
        self.U = nn.Linear(2, H, bias=False).double()
        self.act = act
        with torch.no_grad():
            self.W.weight.copy_(orth(H, gain))
            self.U.weight.mul_(0.1)

    def forward(self, x, h):
        a = self.W(h) + self.U(x)
        return torch.tanh(a) if self.act == "tanh" else a


def cell(gain, act):
    return lambda: CellLoop(gain, act)


# (id, factory, expected at T=50, expected at T=500, reason)
ZOO = [
    ("tanh-gain0.3", elman("tanh", 0.3), "vanishing", "vanishing", "‖J‖ ≤ 0.3: horizon ≤ 6"),
    ("tanh-gain0.5", elman("tanh", 0.5), "vanishing", "vanishing", "‖J‖ ≤ 0.5: horizon ≤ 10"),
    ("tanh-gain3", elman("tanh", 3.0), "exploding", "exploding", "chaotic: χ = g² E[φ'²] > 1, λ₁ > 0"),
    ("relu-gain0.5", elman("relu", 0.5), "vanishing", "vanishing", "‖J‖ ≤ 0.5"),
    ("relu-gain3", elman("relu", 3.0), "exploding", "exploding", "half the units active: ‖J v‖ ≈ 3·√½ = 2.1 ‖v‖ per step"),
    ("irnn-identity", elman("relu", 1.0, identity=True), "stable", "stable", "J = diag(active) I: norm 1 (Le 2015)"),
    ("lstm-bf-3", lstm(-3.0), "vanishing", "vanishing", "τ = −1/ln σ(−3) = 0.05"),
    ("lstm-bf0", lstm(0.0), "vanishing", "vanishing", "τ = 1.44: horizon ≈ 10"),
    ("lstm-bf3", lstm(3.0), "stable", "vanishing", "τ = 20.6: horizon ≈ 142"),
    ("lstm-bf5", lstm(5.0), "stable", "stable", "τ = 149: horizon ≈ 1030"),
    ("gru-bz-4", gru(-4.0), "vanishing", "vanishing", "z ≈ 0.018: the carry path is cut"),
    ("gru-bz+4", gru(4.0), "stable", "vanishing", "z ≈ 0.982: τ = 55, horizon ≈ 380"),
    ("lstm-2layer-bi-bf-3", lstm(-3.0, layers=2, bidirectional=True), "vanishing", "vanishing", "every layer and direction as lstm-bf-3"),
    ("lstm-2layer-bf5", lstm(5.0, layers=2), "stable", "stable", "every layer as lstm-bf5"),
    ("gru-2layer-bi-bz+4", gru(4.0, layers=2, bidirectional=True), "stable", "vanishing", "every layer and direction as gru-bz+4"),
    ("cell-linear-0.5", cell(0.5, "linear"), "vanishing", "vanishing", "J = 0.5 Q: horizon 10"),
    ("cell-linear-1.0", cell(1.0, "linear"), "stable", "stable", "J = Q orthogonal: norm 1 at every lag"),
    ("cell-linear-1.1", cell(1.1, "linear"), "exploding", "exploding", "J = 1.1 Q: λ₁ = ln 1.1 > 0"),
    ("cell-tanh-0.5", cell(0.5, "tanh"), "vanishing", "vanishing", "‖J‖ ≤ 0.5"),
]


@pytest.mark.parametrize("T", [50, 500])
@pytest.mark.parametrize("name,make,exp50,exp500,why", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_regime(name, make, exp50, exp500, why, T, device):
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.randn(T, 2, 2, dtype=torch.float64).to(device)
    rec = gradscope.probe(model, x, jacobian_samples=2, k=2)
    diag = gradscope.diagnose(rec)
    expected = exp50 if T == 50 else exp500
    assert diag.sites, "no site found"
    got = {s: diag.regime(s) for s in diag.sites}
    assert all(r == expected for r in got.values()), (
        f"{name} at T={T}: expected {expected} ({why}), got {got}; "
        + "; ".join(f"{s}: {diag.site_summary(s)['evidence']}" for s in diag.sites))
