"""The seed article's three models (gradscope.zoo): they run, train, are watched, probed and diagnosed;
the article's own GRU and self-attention code fails as printed."""
import pytest
import numpy as np
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError, zoo
from gradscope.analysis.diagnose import diagnose

from conftest import assert_no_hooks


# --- the seed article's code, verbatim (§4.2 and §4.3) -------------------------------------------
class SeedGRU(nn.Module):
    def __init__(self, input_size, hidden_size, num_layers, output_size):
        super(SeedGRU, self).__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.gru = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x.device)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size).to(x.device)
        out, _ = self.gru(x, (h0, c0))
        out = self.fc(out[:, -1, :])
        return out


class SeedSelfAttention(nn.Module):
    def __init__(self, input_size, hidden_size):
        super(SeedSelfAttention, self).__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.linear1 = nn.Linear(input_size, hidden_size)
        self.linear2 = nn.Linear(hidden_size, hidden_size)
        self.linear3 = nn.Linear(hidden_size, input_size)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        h = torch.tanh(self.linear1(x))
        h = self.linear2(h)
        attn_scores = self.softmax(h)
        attn_weights = torch.bmm(attn_scores.unsqueeze(2), h.unsqueeze(1))
        out = torch.bmm(attn_weights, h)
        out = self.linear3(out)
        return out


def test_seed_gru_fails_as_printed_and_ours_runs():
    x = torch.randn(3, 7, 10)
    with pytest.raises((AttributeError, RuntimeError, TypeError), match=r"tuple|hx|hidden"):
        SeedGRU(10, 20, 2, 5)(x)
    assert zoo.SequenceGRU(10, 20, 2, 5)(x).shape == (3, 5)


def test_seed_self_attention_fails_as_printed_and_ours_runs():
    x = torch.randn(3, 7, 10)
    with pytest.raises(RuntimeError, match=r"3D"):
        SeedSelfAttention(10, 20)(x)
    blk = zoo.SelfAttentionBlock(10, 20)
    y, A = blk(x, return_attention=True)
    assert y.shape == (3, 7, 10) and A.shape == (3, 7, 7)
    assert torch.allclose(A.sum(-1), torch.ones(3, 7))          # softmax over the keys
    # every output position depends on every input position (direct paths)
    xg = x.clone().requires_grad_(True)
    blk(xg)[:, 0].sum().backward()
    assert (xg.grad.abs().sum(-1) > 0).all()
    with pytest.raises(GradscopeError, match=r"expects input \[B, T, 10\], got shape \[7, 10\]"):
        blk(torch.randn(7, 10))


def _train_watched(model, x, y, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, every=1) as scope:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert_no_hooks(model)
    return scope.recording


@pytest.mark.parametrize("cls,sites", [(zoo.SequenceLSTM, ("lstm.l0", "lstm.l1")),
                                       (zoo.SequenceGRU, ("gru.l0", "gru.l1"))], ids=["lstm", "gru"])
def test_recurrent_seed_models_watched_probed_diagnosed(cls, sites):
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(8, 30, 10), torch.randn(8, 5)
    rec = _train_watched(model, x, y)
    assert rec.sites == sites and len(rec) == 3
    assert rec.grad_norms(sites[0]).shape == (3, 30)
    d_watch = diagnose(rec)
    assert set(d_watch.sites) == set(sites)
    prec = gradscope.probe(model, x, target=y, k=2)
    diag = diagnose(prec)
    for s in sites:
        summary = diag.site_summary(s)
        assert summary["regime"] in ("vanishing", "stable", "exploding")
        assert summary["seq_len"] == 30 and summary["lambda1"] < 0
        # PyTorch's default gate biases (≈ 0): memory time ≈ 1.4 steps, so these models forget fast
        assert rec is not prec and prec.gate_stats(s)["memory_time"] < 3
    kinds = {f.kind for f in diag.findings}
    assert "short_memory" in kinds
    assert_no_hooks(model)


def test_self_attention_block_watched_probed_diagnosed():
    torch.manual_seed(0)
    model = zoo.SelfAttentionBlock()
    x = torch.randn(4, 12, 10)
    rec = _train_watched(model, x, torch.randn(4, 12, 10))
    # a user attention module (found by its class name): one attention site, measured per step
    assert rec.sites == ("attention",) and rec.site_info("attention")["kind"] == "attention"
    assert rec.param_grad_norms()["query.weight"].shape == (3,)
    ent = rec.attention_entropy("attention")
    assert ent.shape[0] == 3 and np.all((ent >= 0) & (ent <= 1 + 1e-6))
    assert rec.grad_norms("attention").shape == (3, 12)
    diag = diagnose(gradscope.probe(model, x))
    assert diag.sites == ("attention",)
    assert diag.regime("attention") in ("vanishing", "exploding", "stable")


def test_adding_problem():
    x, y = zoo.adding_problem(64, 40, seed=3)
    assert x.shape == (64, 40, 2) and y.shape == (64, 1) and x.dtype == torch.float32
    m = x[..., 1]
    assert torch.equal(m.sum(1), torch.full((64,), 2.0))
    first, second = m[:, :20].sum(1), m[:, 20:].sum(1)
    assert torch.equal(first, torch.ones(64)) and torch.equal(second, torch.ones(64))
    assert torch.allclose(y[:, 0], (x[..., 0] * m).sum(1))
    assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()
    x2, y2 = zoo.adding_problem(64, 40, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    state = torch.random.get_rng_state()
    zoo.adding_problem(4, 10, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())    # private generator
    assert not torch.equal(zoo.adding_problem(4, 10, seed=1)[0], zoo.adding_problem(4, 10, seed=2)[0])
    with pytest.raises(GradscopeError, match=r"adding_problem: T must be an integer >= 2, got 1"):
        zoo.adding_problem(4, 1)
    with pytest.raises(GradscopeError, match=r"adding_problem: n must be an integer >= 1, got 2.5"):
        zoo.adding_problem(2.5, 10)
