"""try_remedies(): remedies applied to copies and measured; the user's model untouched."""
import json

import pytest
import torch
from torch import nn

from gradscope import GradscopeError
from gradscope.analysis.diagnose import diagnose
from gradscope.analysis.trials import LSTMAsRNN, RemedyTrials, TESTABLE, try_remedies
from gradscope.measure.probe import probe

from conftest import assert_no_hooks

H, T, B = 16, 100, 4


def _orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q


class Elman(nn.Module):
    """nn.RNN (tanh) with W_hh = 0.5·Q, Q orthogonal, and a linear read-out: vanishing at T = 100."""

    def __init__(self, scale=0.5):
        super().__init__()
        self.rnn = nn.RNN(4, H, batch_first=True)
        self.fc = nn.Linear(H, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(scale * _orthogonal(H))

    def forward(self, x, h0=None):
        out, h = self.rnn(x, h0)
        return self.fc(out)


def short_memory_lstm():
    """nn.LSTM with effective forget bias −3 (−1.5 on each bias): τ ≈ 0.33 steps."""
    lstm = nn.LSTM(4, H, batch_first=True)
    with torch.no_grad():
        lstm.bias_ih_l0[H:2 * H] = -1.5
        lstm.bias_hh_l0[H:2 * H] = -1.5
    return lstm


@pytest.fixture
def x():
    return torch.randn(B, T, 4, generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rng_states(device):
    """The global RNG states try_remedies must restore: the CPU's, and the GPU's when it runs there."""
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _untouched(model, snap, rng, device=torch.device("cpu")):
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k in sd:
        assert torch.equal(sd[k], snap[k]), k                       # bitwise
    assert all(p.grad is None for p in model.parameters())
    assert_no_hooks(model)
    now = _rng_states(device)
    assert torch.equal(now[0], rng[0] if isinstance(rng, list) else rng)   # global RNG restored
    if isinstance(rng, list) and len(rng) > 1:
        assert torch.equal(now[1], rng[1])                          # and the GPU's


def test_vanishing_elman_orthogonal_irnn_lstm_improve_the_horizon(x, device):
    model = Elman().to(device)
    x = x.to(device)
    snap, rng = _snapshot(model), _rng_states(device)
    trials = try_remedies(model, x)
    _untouched(model, snap, rng, device)
    assert isinstance(trials, RemedyTrials)
    assert ("vanishing", "rnn.l0", "warning") in trials.findings or \
           ("vanishing", "rnn.l0", "critical") in trials.findings
    assert trials.before["rnn.l0"]["regime"] == "vanishing"
    assert trials.before["rnn.l0"]["horizon"] < 15
    by = {r.remedy: r for r in trials.results}
    for name in ("orthogonal_init", "irnn", "switch_to_lstm", "switch_to_gru", "critical_init"):
        ch = by[name].changes[0]
        assert ch.regime_before == "vanishing"
        assert ch.horizon_after > 2 * ch.horizon_before, (name, ch)
        assert by[name].improved and by[name].score > 0
    lstm = by["switch_to_lstm"].changes[0]
    assert lstm.site_after == "rnn.lstm.l0" and lstm.kind_after == "lstm"
    assert by["orthogonal_init"].changes[0].lambda1_after > by["orthogonal_init"].changes[0].lambda1_before
    # ranked by score, and the reasons for what was not tried
    scores = [r.score for r in trials.results]
    assert scores == sorted(scores, reverse=True)
    assert trials.best() is trials.results[0]
    skipped = {s.remedy: s.reason for s in trials.skipped}
    assert "truncated_bptt" in skipped and "gating" in skipped


def test_short_memory_lstm_forget_bias_lengthens_tau_and_horizon(x, device):
    model = short_memory_lstm().to(device)
    x = x.to(device)
    snap, rng = _snapshot(model), _rng_states(device)
    trials = try_remedies(model, x)
    _untouched(model, snap, rng, device)
    assert ("short_memory", "l0", "warning") in trials.findings
    by = {r.remedy: r for r in trials.results}
    fb = by["forget_bias"]
    ch = fb.changes[0]
    assert ch.memory_time_before < 0.5 and ch.memory_time_after > 10 * ch.memory_time_before
    assert ch.horizon_after > ch.horizon_before and fb.improved
    assert "b_f -3.00 → 4.60" in fb.applied                       # the τ arithmetic for T = 100 (τ ≥ T)
    assert by["chrono_init"].changes[0].horizon_after > ch.horizon_before
    skipped = {s.remedy: s.reason for s in trials.skipped}
    assert "layernorm_cell" in skipped and "hand-written cell" in skipped["layernorm_cell"]


def test_switch_to_lstm_keeps_the_calling_pattern(x, device):
    model = Elman().to(device)
    trials = try_remedies(model, (x.to(device), torch.zeros(1, B, H, device=device)), remedies=["switch_to_lstm"])
    r = trials.results[0]
    assert r.changes[0].site_after == "rnn.lstm.l0"
    assert "LSTMAsRNN" in r.applied
    # the wrapper itself
    w = LSTMAsRNN(nn.LSTM(4, H, batch_first=True))
    out, h = w(x, torch.zeros(1, B, H))
    assert out.shape == (B, T, H) and h.shape == (1, B, H)
    assert (w.input_size, w.hidden_size, w.num_layers, w.batch_first) == (4, H, 1, True)


def test_bare_rnn_replaced_at_the_root(x):
    rnn = Elman().rnn
    trials = try_remedies(rnn, x, remedies=["switch_to_lstm", "switch_to_gru"])
    names = {r.remedy: r.changes[0].site_after for r in trials.results}
    assert names == {"switch_to_lstm": "lstm.l0", "switch_to_gru": "l0"}
    assert type(rnn) is nn.RNN


def test_named_remedies_skip_what_does_not_apply(x):
    trials = try_remedies(Elman(), x, remedies=["forget_bias", "clip_grad_norm", "relu_nonlinearity",
                                                 "xavier_init"])
    skipped = {s.remedy: s.reason for s in trials.skipped}
    assert "'rnn.l0' is rnn_tanh" in skipped["forget_bias"]
    assert "optimizer" in skipped["clip_grad_norm"]
    by = {r.remedy: r for r in trials.results}
    # folklore: ReLU with the same contractive W_hh does not fix vanishing
    relu = by["relu_nonlinearity"].changes[0]
    assert relu.regime_after == "vanishing" and not by["relu_nonlinearity"].improved
    assert by["xavier_init"].changes[0].horizon_after > by["xavier_init"].changes[0].horizon_before


def test_sites_filter_and_multilayer_bidirectional(device):
    lstm = nn.LSTM(3, 8, num_layers=2, bidirectional=True)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias"):
                p[8:16] = -2.0
    x = torch.randn(40, 2, 3, generator=torch.Generator().manual_seed(2))
    trials = try_remedies(lstm.to(device), x.to(device), remedies=["forget_bias"], sites=["l1_reverse"])
    (r,) = trials.results
    assert r.sites == ("l1_reverse",) and r.changes[0].site == "l1_reverse"
    assert "b_f -4.00" in r.applied
    assert r.changes[0].memory_time_after > r.changes[0].memory_time_before
    assert set(trials.before) == {"l1_reverse"}


def test_reinit_dead_units(device):
    rnn = nn.RNN(3, 8, nonlinearity="relu")
    with torch.no_grad():
        rnn.bias_ih_l0[:4] = -50.0                 # units 0–3 never fire
    rnn = rnn.to(device)
    x = torch.randn(30, 2, 3, generator=torch.Generator().manual_seed(3)).to(device)
    rec = probe(rnn, x, k=1)
    assert rec.gate_stats("l0")["dead_units"] == pytest.approx(0.5)
    trials = try_remedies(rnn, x, remedies=["reinit_dead"])
    (r,) = trials.results
    assert "4 dead unit(s) of 8" in r.applied
    healthy = nn.RNN(3, 8, nonlinearity="relu").to(device)
    with torch.no_grad():
        healthy.bias_ih_l0.fill_(5.0)
    t2 = try_remedies(healthy, x, remedies=["reinit_dead"])
    assert not t2.results and "no unit is dead" in t2.skipped[0].reason


def test_nothing_to_remedy_on_a_stable_model(x):
    model = Elman(scale=1.2)
    trials = try_remedies(model, x * 0.3)
    assert diagnose(probe(model, x * 0.3, k=1)).regime("rnn.l0") == "stable"
    assert trials.results == [] and trials.best() is None
    assert "found nothing to remedy" in str(trials)


def test_rendering(x):
    trials = try_remedies(short_memory_lstm(), x, remedies=["forget_bias", "orthogonal_init", "lower_lr"])
    text = str(trials)
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("remedy"))
    assert "horizon before → after" in header and "λ₁ before → after" in header
    rows = [l for l in lines if l.startswith(("forget_bias ", "orthogonal_init "))]
    assert len(rows) == 2
    col = header.index("horizon")
    assert all(len(r) > col for r in rows)                       # aligned columns
    assert "skipped:" in text and "lower_lr" in text
    md = trials.to_markdown()
    assert md.startswith("## Remedy trials") and "| remedy | site |" in md and "### Skipped" in md
    d = trials.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["best"] == "forget_bias"
    h = d["results"][0]["changes"][0]["horizon_after"]
    assert h == "inf" or isinstance(h, float)                   # non-finite numbers as strings
    assert "RemedyTrials" in repr(trials)


def test_errors(x):
    model = Elman()
    with pytest.raises(GradscopeError, match=r"unknown remedy 'orthogonal'.*Did you mean 'orthogonal_init'\?"):
        try_remedies(model, x, remedies=["orthogonal"])
    with pytest.raises(GradscopeError, match=r"remedies must be a list of names, got the string 'irnn'"):
        try_remedies(model, x, remedies="irnn")
    with pytest.raises(GradscopeError, match=r"unknown site 'rnn.l1'.*Did you mean 'rnn.l0'\?"):
        try_remedies(model, x, sites=["rnn.l1"])
    with pytest.raises(GradscopeError, match=r"sites must be a list of names, got the string 'rnn.l0'"):
        try_remedies(model, x, sites="rnn.l0")
    with pytest.raises(GradscopeError, match=r"LSTMAsRNN wraps an nn.LSTM, got GRU"):
        LSTMAsRNN(nn.GRU(2, 3))
    with pytest.raises(GradscopeError, match=r"proj_size > 0 cannot build c0 from h0"):
        LSTMAsRNN(nn.LSTM(2, 4, proj_size=2))(torch.randn(5, 1, 2), torch.zeros(1, 1, 2))
    assert_no_hooks(model)


def test_diagnose_attaches_the_catalogue(x):
    diag = diagnose(probe(Elman(), x, k=1))
    (f,) = [f for f in diag.findings if f.kind == "vanishing"]
    assert [r.name for r in f.remedies][:3] == ["orthogonal_init", "irnn", "switch_to_lstm"]
    assert "model.rnn.weight_hh_l0" in f.remedies[0].code
    assert set(TESTABLE) >= {r.name for r in f.remedies if r.testable}


# ------------------------------------------------------------------------------------------------
# remedies proven by training


class LastStep(nn.Module):
    """nn.RNN → read-out of the last step: [B, T, 2] → [B, 1]."""

    def __init__(self, scale):
        super().__init__()
        self.rnn = nn.RNN(2, H, batch_first=True)
        self.fc = nn.Linear(H, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(scale * _orthogonal(H))

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def _copy_task(n_batches, T=30, seed=0):
    """Target: the first input value, T − 1 steps back (a pure long dependency)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(16, T, 2, generator=g)
        out.append((x, x[:, 0, :1].clone()))
    return out


def _mse(out, y):
    return nn.functional.mse_loss(out, y)


def test_trained_trials_rank_by_measured_loss_and_keep_the_original():
    torch.manual_seed(0)
    model = LastStep(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _copy_task(40)
    trials = try_remedies(model, data, loss_fn=_mse, train_steps=40,
                          remedies=["orthogonal_init", "xavier_init"], progress=False)
    assert trials.ranked_by == "training"
    assert trials.baseline is not None and trials.baseline.steps == 40
    finals = [r.training.final_loss for r in trials.results]
    assert finals == sorted(finals)
    for r in trials.results:
        assert len(r.training.curve) == 40
        tail = r.training.curve[-4:]
        assert r.training.final_loss == pytest.approx(sum(tail) / 4)
        assert r.training.loss_auc == pytest.approx(sum(r.training.curve) / 40)
        assert r.improved == (r.training.final_loss < trials.baseline.final_loss * 0.98)
        assert isinstance(r.model, nn.Module) and r.model is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert_no_hooks(model)
    text = str(trials)
    assert "trained for 40 steps" in text and "final loss" in text
    d = json.loads(json.dumps(trials.to_dict()))
    assert d["ranked_by"] == "training" and d["baseline"]["steps"] == 40
    assert d["results"][0]["training"]["final_loss"] == pytest.approx(finals[0])


def test_training_runs_are_reproducible_and_match_a_hand_written_loop():
    torch.manual_seed(0)
    model = LastStep(0.3)
    data = _copy_task(10)
    t1 = try_remedies(model, data, loss_fn=_mse, train_steps=10, remedies=["orthogonal_init"], seed=3,
                      progress=False)
    t2 = try_remedies(model, data, loss_fn=_mse, train_steps=10, remedies=["orthogonal_init"], seed=3,
                      progress=False)
    assert t1.baseline.curve == t2.baseline.curve
    assert t1.results[0].training.curve == t2.results[0].training.curve
    # the baseline is the original model trained by a plain loop with Adam 1e-3 and clipping 1.0
    import copy
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    curve = []
    for x, y in data:
        loss = _mse(ref(x), y)
        curve.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    assert t1.baseline.curve == pytest.approx(curve, rel=1e-6)


def test_probe_only_ranking_is_labelled_a_prediction(x):
    trials = try_remedies(Elman(), x, remedies=["orthogonal_init"])
    assert trials.ranked_by == "prediction" and trials.baseline is None
    assert trials.results[0].training is None
    assert "a prediction from the Jacobians" in str(trials)


def test_one_batch_is_trained_on_repeatedly_with_its_target():
    model = LastStep(0.3)
    x, y = _copy_task(1)[0]
    trials = try_remedies(model, x, target=y, loss_fn=_mse, train_steps=5, remedies=["orthogonal_init"],
                          progress=False)
    assert trials.baseline.steps == 5 and len(trials.results[0].training.curve) == 5


def test_a_diverging_copy_is_ranked_last():
    model = LastStep(0.3)
    data = _copy_task(6)
    trials = try_remedies(model, data, loss_fn=_mse, train_steps=6, remedies=["orthogonal_init", "xavier_init"],
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=1e30), clip=None, progress=False)
    assert all(r.training.diverged or r.training.final_loss >= trials.results[0].training.final_loss
               for r in trials.results)


def test_train_steps_and_data_are_checked():
    with pytest.raises(GradscopeError, match="train_steps must be a non-negative integer"):
        try_remedies(LastStep(0.3), torch.randn(2, 5, 2), train_steps=-1)
    with pytest.raises(GradscopeError, match="data is an empty iterable"):
        try_remedies(LastStep(0.3), [], train_steps=3)
    with pytest.raises(GradscopeError, match="data must be a batch"):
        try_remedies(LastStep(0.3), 3.5)


def test_apply_remedy_returns_the_remedied_copy():
    import gradscope

    model = LastStep(0.3)
    x = torch.randn(4, 30, 2)
    new = gradscope.apply_remedy(model, "orthogonal_init", x)
    W = new.rnn.weight_hh_l0.detach()
    assert torch.allclose(W @ W.T, torch.eye(H), atol=1e-5)
    assert torch.allclose(model.rnn.weight_hh_l0, 0.3 * _orthogonal(H))   # the original untouched
    assert_no_hooks(model)
    trials = try_remedies(model, x, remedies=["orthogonal_init"])
    assert torch.equal(trials.best().model.rnn.weight_hh_l0, new.rnn.weight_hh_l0)   # same seed, same copy
    with pytest.raises(GradscopeError, match="unknown remedy 'orthogonal'.*Did you mean 'orthogonal_init'"):
        gradscope.apply_remedy(model, "orthogonal", x)
    with pytest.raises(GradscopeError, match="cannot be applied to a copy"):
        gradscope.apply_remedy(model, "clip_grad_norm", x)
    with pytest.raises(GradscopeError, match="unknown site 'rnn.l9'"):
        gradscope.apply_remedy(model, "orthogonal_init", x, site="rnn.l9")
    with pytest.raises(GradscopeError, match="applies to none of the model's sites"):
        gradscope.apply_remedy(model, "forget_bias", x)
