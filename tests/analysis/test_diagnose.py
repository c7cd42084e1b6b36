"""diagnose(): findings with evidence, rules per site and module, rendering, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.recording import Recording


def small_lstm(bf, H=8):
    m = nn.LSTM(2, H)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.mul_(0.01)
            if name.startswith("bias"):
                p[H:2 * H] = bf / 2
    return m


def test_short_memory_lstm_finding_has_numbers(device):
    rec = gradscope.probe(small_lstm(0.0).to(device), torch.randn(50, 2, 2).to(device), k=2)
    diag = gradscope.diagnose(rec)
    assert diag.regime("l0") == "vanishing"
    kinds = {f.kind: f for f in diag.findings}
    sm = kinds["short_memory"]
    assert sm.evidence["memory_time"] == pytest.approx(1 / math.log(2), rel=0.02)  # σ(0) = ½
    assert "1.44" in sm.explanation and "50" in sm.explanation
    v = kinds["vanishing"]
    assert v.severity in ("warning", "critical") and v.evidence["seq_len"] == 50
    assert math.isfinite(v.evidence["horizon"]) and v.evidence["horizon"] < 50
    assert f"{v.evidence['horizon']:.0f}" in v.explanation
    assert set(v.evidence_used) >= {"jacobian_norms", "lyapunov"}


def test_saturated_gates_and_dead_units(device):
    lstm = nn.LSTM(2, 8)
    with torch.no_grad():
        for p in lstm.parameters():
            p.mul_(40.0)
    diag = gradscope.diagnose(gradscope.probe(lstm.to(device), torch.randn(30, 2, 2).to(device), lyapunov=False))
    sat = [f for f in diag.findings if f.kind == "saturated_gates"]
    assert sat and sat[0].evidence["saturated"] > 0.3
    rnn = nn.RNN(2, 4, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
        rnn.weight_hh_l0.zero_()
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.copy_(torch.tensor([1.0, -1.0, -2.0, -3.0]))
    diag = gradscope.diagnose(gradscope.probe(rnn.to(device), torch.randn(10, 2, 2).to(device), lyapunov=False))
    dead = [f for f in diag.findings if f.kind == "dead_units"]
    assert dead and dead[0].evidence["dead_units"] == pytest.approx(0.75) and dead[0].severity == "critical"


def test_precision_underflow(device):
    rnn = nn.RNN(2, 8).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.1)
    diag = gradscope.diagnose(gradscope.probe(rnn.to(device), torch.randn(40, 2, 2, dtype=torch.float64).to(device)))
    f = next(f for f in diag.findings if f.kind == "precision_underflow")
    assert f.evidence["underflow_lag"] < 40


def test_nonfinite_events_become_critical_findings(device):
    rnn = nn.RNN(2, 4).to(device)
    with gradscope.watch(rnn, every=1) as scope:
        out, _ = rnn(torch.randn(6, 2, 2).to(device))
        (out * float("inf")).sum().backward()
    diag = scope.diagnose()
    nf = [f for f in diag.findings if f.kind == "nonfinite"]
    assert nf and all(f.severity == "critical" for f in nf)
    assert diag.findings[0].severity == "critical"  # most severe first


def test_watch_only_vanishing_from_gradient_profile(device):
    rnn = nn.RNN(2, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.2)
    rnn = rnn.to(device)
    with gradscope.watch(rnn, every=1, probe_every=None) as scope:
        for _ in range(3):
            out, _ = rnn(torch.randn(40, 2, 2).to(device))
            out[-1].pow(2).sum().backward()
    diag = scope.diagnose()
    s = diag.site_summary("l0")
    assert s["regime"] == "vanishing" and s["evidence_used"] == ["grad_norm_profile"]
    assert s["horizon"] < 40
    d = diag.to_dict()
    assert "watch-only evidence" in d["sites"][0]["caveats"][0]
    assert any("need a probe" in n for n in diag.notes)


def test_gradient_spike_is_exploding_model_wide():
    S = 30
    norms = np.ones(S)
    norms[17] = 1e4
    rec = Recording(sites={}, steps=range(S), grads={}, seq_lens={}, params={"w": norms},
                    meta={"source": "watch"})
    diag = gradscope.diagnose(rec)
    f = diag.findings[0]
    assert f.kind == "exploding" and f.site == "(model)" and f.evidence["spike_ratio"] == pytest.approx(1e4)


def test_module_summary_lines_for_multilayer_bidirectional():

    model = nn.Sequential()
    model.add_module("enc", nn.LSTM(2, 6, num_layers=2, bidirectional=True))
    rec = gradscope.probe(model, torch.randn(30, 2, 2), loss_fn=lambda out: out[0].pow(2).mean(), k=2)
    diag = gradscope.diagnose(rec)
    assert len(diag.sites) == 4
    assert len(diag.modules) == 1 and diag.modules[0]["module"] == "enc"
    assert "2 layer(s) × 2 directions" in diag.modules[0]["line"]
    assert "enc" in str(diag)


def test_rendering_text_markdown_json():
    diag = gradscope.diagnose(gradscope.probe(small_lstm(0.0), torch.randn(50, 2, 2), k=2))
    text = str(diag)
    assert "vanishing" in text and "l0" in text and "[warning]" in text or "[critical]" in text
    md = diag.to_markdown()
    assert md.startswith("# gradscope diagnosis") and "| site |" in md and "### " in md
    d = json.loads(diag.to_json())
    assert d["schema"] == 2 and d["sites"][0]["name"] == "l0" and d["sites"][0]["regime"] == "vanishing"
    assert all({"kind", "site", "severity", "evidence", "remedies"} <= set(f) for f in d["findings"])
    assert repr(diag).startswith("<Diagnosis 1 sites")


def test_stable_model_has_no_regime_findings():
    diag = gradscope.diagnose(gradscope.probe(small_lstm(5.0), torch.randn(50, 2, 2), k=2))
    assert diag.regime("l0") == "stable"
    assert not [f for f in diag.findings if f.kind in ("vanishing", "exploding")]


def test_bad_input():
    rec = gradscope.probe(nn.RNN(2, 4), torch.randn(8, 2, 2), lyapunov=False)
    with pytest.raises(GradscopeError, match="threshold must be in \\(0, 1\\)"):
        gradscope.diagnose(rec, threshold=1.5)
    with pytest.raises(GradscopeError, match="threshold must be in \\(0, 1\\)"):
        gradscope.diagnose(rec, threshold=0)
    with pytest.raises(GradscopeError, match="unknown site 'l1'.*Did you mean 'l0'"):
        gradscope.diagnose(rec).regime("l1")
    with pytest.raises(GradscopeError, match="expects a gradscope Recording"):
        gradscope.diagnose({"l0": 1})
    empty = Recording(sites={}, steps=[], grads={}, seq_lens={}, params={})
    with pytest.raises(GradscopeError, match="empty recording"):
        gradscope.diagnose(empty)
    with gradscope.watch(nn.RNN(2, 3), every=1) as scope:
        pass
    with pytest.raises(GradscopeError, match="empty recording.*at least one forward and backward"):
        scope.diagnose()


class CharLM(nn.Module):
    """A character LSTM language model: embedding → 2-layer LSTM → logits at every position."""

    def __init__(self, vocab=32, H=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, H, num_layers=2, batch_first=True)
        self.out = nn.Linear(H, vocab)

    def forward(self, x):
        return self.out(self.lstm(self.emb(x))[0])


def test_watch_and_probe_tell_one_story_on_a_char_language_model():
    """Loss at every position: the watched profile cannot show decay. By default watch probes a live
    batch on its first step, so scope.diagnose() names the same regime as diagnose(probe(...))."""
    torch.manual_seed(0)
    model = CharLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.randint(0, 32, (8, 16, 65))
    with gradscope.watch(model, every=1) as scope:
        for x in data:
            logits = model(x[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 32), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    watched = scope.diagnose()
    probed = gradscope.diagnose(gradscope.probe(model, data[0][:, :-1]))
    for site in ("lstm.l0", "lstm.l1"):
        assert watched.regime(site) == probed.regime(site) == "vanishing"
        assert "jacobian_norms" in watched.site_summary(site)["evidence_used"]
    assert watched.trainability.verdict == probed.trainability.verdict


def test_watch_only_profile_of_a_loss_at_every_position_is_inconclusive():
    torch.manual_seed(0)
    model = CharLM()
    data = torch.randint(0, 32, (3, 16, 65))
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in data:
            logits = model(x[:, :-1])
            nn.functional.cross_entropy(logits.reshape(-1, 32), x[:, 1:].reshape(-1)).backward()
    diag = scope.diagnose()
    for site in ("lstm.l0", "lstm.l1"):
        assert diag.regime(site) == "inconclusive", diag.site_summary(site)
        assert "cannot show stability" in diag.site_summary(site)["reason"]
    assert diag.trainability.verdict == "uncertain"
