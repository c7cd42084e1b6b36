"""The remedies catalogue: coverage of SCIENCE.md's table, numbers in the text, snippets that compile
and run, ranking, errors, folklore verdicts, and importability without torch."""
import io
import json
import math
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn

from gradscope import GradscopeError
from gradscope.analysis import remedies as R
from gradscope.analysis.remedies import (FOLKLORE, REMEDY_NAMES, UNTESTABLE, Remedy, folklore_verdicts,
                                         forget_bias_plan, get_remedy, module_expr, remedies_for)

ROOT = Path(__file__).resolve().parents[2]

# One catalogue name per remedy in SCIENCE.md's table ("Remedies, the signal that calls for each").
SCIENCE_TABLE = {
    "exploding": ["clip_grad_norm", "lower_lr"],
    "vanishing, Elman RNN": ["orthogonal_init", "irnn", "critical_init", "switch_to_lstm", "switch_to_gru"],
    "LSTM memory too short": ["forget_bias", "chrono_init"],
    "saturated gates": ["layernorm_cell", "lower_lr"],
    "dead ReLU units": ["leaky_relu", "lower_lr", "reinit_dead"],
    "sequence too long for float precision": ["truncated_bptt", "gating"],
    "attention entropy collapse": ["sigma_reparam", "warmup", "lower_lr", "qk_layernorm"],
    "rank collapse": ["residual_scaling", "pre_ln"],
    "Post-LN instability": ["warmup", "pre_ln"],
}

FULL = {"seq_len": 100.0, "rate": -0.79, "horizon": 10.0, "explosion_lag": math.inf, "lambda1": -0.8,
        "w_hh_norm": 0.5, "spectral_radius": 0.5, "memory_time": 0.33, "forget_bias": -3.0,
        "keep_mean": 0.047, "saturated": 0.33, "dead_units": 0.25, "grad_norm_median": 0.08,
        "grad_norm_max": 3.1, "hidden_size": 20.0, "num_layers": 2.0, "grad_ratio": 1e-9}
EVIDENCE = {
    "full": FULL,
    "empty": {},
    "nonfinite": {k: (math.nan if i % 2 else math.inf) for i, k in enumerate(FULL)},
    "neg-inf": {k: -math.inf for k in FULL},
    "junk": {"seq_len": "long", "lambda1": None, "forget_bias": object(), "hidden_size": -3},
    "exploding": {"seq_len": 50.0, "lambda1": 0.3, "explosion_lag": 12.0, "horizon": math.inf,
                  "w_hh_norm": 2.5, "grad_norm_median": 1.0, "grad_norm_max": 900.0},
    "zeros": {k: 0.0 for k in FULL},
    "tiny-T": {"seq_len": 1.0, "lambda1": -5.0, "forget_bias": 20.0},
}
PLACES = [  # (site, module, site_kind)
    ("encoder.lstm.l1_reverse", "encoder.lstm", "lstm"),
    ("l0", "", "rnn_tanh"),
    ("layers.0.rnn.l0", "layers.0.rnn", "rnn_relu"),
    ("gru.l2", "", "gru"),
    ("decoder.cell", "decoder.cell", "cell"),
    ("blocks.3.attn", "blocks.3.attn", "attention"),
    ("(model)", "", "cell"),
    ("", "", ""),
]


def _names_in_code(code):
    """Python NAME tokens of a snippet (comments excluded)."""
    return {t.string for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type == tokenize.NAME}


def test_catalogue_covers_every_row_of_the_science_table():
    for row, names in SCIENCE_TABLE.items():
        for n in names:
            assert n in REMEDY_NAMES, f"{row}: {n} missing"
    assert set(REMEDY_NAMES) - {n for v in SCIENCE_TABLE.values() for n in v} == set(R.FOLKLORE_CHECKS)
    for kind in R.FINDING_KINDS:
        assert remedies_for(kind, "")


@pytest.mark.parametrize("ev_id", list(EVIDENCE))
@pytest.mark.parametrize("place", PLACES, ids=lambda p: p[0] or "none")
def test_every_snippet_compiles_and_has_no_nonfinite_literal(ev_id, place):
    site, module, site_kind = place
    ev = EVIDENCE[ev_id]
    remedies = [get_remedy(n, ev, site=site, module=module, site_kind=site_kind) for n in REMEDY_NAMES]
    for kind in R.FINDING_KINDS:
        remedies += remedies_for(kind, site_kind, ev, site=site, module=module)
    for r in remedies:
        assert isinstance(r, Remedy) and r.title and r.why and r.reference
        compile(r.code, f"<remedy {r.name}>", "exec")
        assert not _names_in_code(r.code) & {"nan", "inf", "NaN", "Infinity"}, (r.name, r.code)
        assert "'(model)'" not in r.code
        assert r.testable == (r.name not in UNTESTABLE)


def test_remedy_is_frozen_plain_data():
    r = get_remedy("orthogonal_init", FULL, site="rnn.l0", site_kind="rnn_tanh")
    with pytest.raises(AttributeError):
        r.name = "x"
    d = r.to_dict()
    assert set(d) == {"name", "title", "why", "code", "reference", "testable"}
    json.dumps(d)


def test_import_without_torch_or_numpy():
    # The package __init__ imports torch (capture); the catalogue module itself must not. Load it
    # with stub parent packages so only remedies.py and errors.py execute.
    prog = f"""
import sys, types
sys.modules["torch"] = None
sys.modules["numpy"] = None
root = {str(ROOT / "gradscope")!r}
for name, path in (("gradscope", root), ("gradscope.analysis", root + "/analysis")):
    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m
import gradscope.analysis.remedies as R
rs = R.remedies_for("short_memory", "lstm", {{"seq_len": 200, "forget_bias": -2.0}}, site="enc.lstm.l0")
assert rs[0].name == "forget_bias" and "model.enc.lstm.bias_ih_l0" in rs[0].code, rs[0].code
for n in R.REMEDY_NAMES:
    compile(R.get_remedy(n).code, n, "exec")
assert len(R.folklore_verdicts({{"lambda1": -0.5}})) == len(R.FOLKLORE)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("b,tau", [(0.0, 1.44), (1.0, 3.16), (2.0, 7.9), (3.0, 20.6)])
def test_memory_time_table_of_science_md(b, tau):
    p = forget_bias_plan({"forget_bias": b, "seq_len": 10})
    assert p["tau_now"] == pytest.approx(tau, abs=0.05)


def test_forget_bias_arithmetic_reaches_the_sequence():
    p = forget_bias_plan({"seq_len": 100, "forget_bias": -3.0})
    assert p["tau_target"] == pytest.approx(100.0)               # τ ≥ T: the memory spans the sequence
    sig = 1 / (1 + math.exp(-p["b_new"]))
    assert sig ** 100 == pytest.approx(math.exp(-1), rel=1e-9)  # cell path keeps exactly e⁻¹ over T
    assert p["delta"] == pytest.approx(p["b_new"] + 3.0)
    r = get_remedy("forget_bias", {"seq_len": 100, "forget_bias": -3.0}, site="enc.lstm.l0", site_kind="lstm")
    for number in ("-3", "0.328", "τ ≥ 100", "4.6", "7.6"):
        assert number in r.why, number
    half = (p["b_new"] + 3.0) / 2
    assert f"model.enc.lstm.bias_ih_l0[H:2 * H] += {half:.4g}" in r.code
    assert f"model.enc.lstm.bias_hh_l0[H:2 * H] += {half:.4g}" in r.code
    # the weaker horizon threshold is still available to callers that ask for it
    assert forget_bias_plan({"seq_len": 100}, threshold=1e-3)["tau_target"] == pytest.approx(100 / math.log(1000))
    # already long memory: +1 (Jozefowicz); short sequences: at least 1
    assert forget_bias_plan({"seq_len": 100, "forget_bias": 5.0})["b_new"] == pytest.approx(6.0)
    assert forget_bias_plan({"seq_len": 3, "forget_bias": -1.0})["b_new"] == pytest.approx(1.0)


def test_forget_bias_defaults_are_stated():
    p = forget_bias_plan({})
    assert p["b_now"] == 0.0 and p["seq_len"] == 100
    r = get_remedy("forget_bias", {}, site="lstm.l0", site_kind="lstm")
    assert "forget bias unknown, 0 assumed" in r.why and "sequence length unknown, 100 assumed" in r.why
    # bias recovered from the mean gate value when the bias itself is missing
    assert forget_bias_plan({"keep_mean": 0.5})["b_now"] == pytest.approx(0.0)
    assert forget_bias_plan({"memory_time": -1 / math.log(1 / (1 + math.exp(-1.0)))})["b_now"] == pytest.approx(1.0)
    # GRU reads update_bias
    assert forget_bias_plan({"update_bias": 2.0, "forget_bias": -9}, key="update_bias")["b_now"] == 2.0


def test_numbers_of_other_remedies():
    clip = get_remedy("clip_grad_norm", {"grad_norm_median": 0.25, "grad_norm_max": 40.0})
    assert "max_norm=0.5)" in clip.code and "160× the median" in clip.why and "Pascanu" in clip.reference
    assert "max_norm=1.0)" in get_remedy("clip_grad_norm", {}).code
    tb = get_remedy("truncated_bptt", {"lambda1": -0.8, "seq_len": 100}, site="rnn.l0")
    assert tb.code.startswith("K = 7 ") and "19.9" in tb.why                   # 5/0.8, 15.9/0.8
    assert get_remedy("truncated_bptt", {"lambda1": -0.01, "seq_len": 30}).code.startswith("K = 30 ")
    ch = get_remedy("chrono_init", {"seq_len": 250}, site="lstm.l0", site_kind="lstm")
    assert "T_max = model.lstm.hidden_size, 250" in ch.code
    crit = get_remedy("critical_init", {"lambda1": -0.8, "w_hh_norm": 0.5}, site="rnn.l0", site_kind="rnn_tanh")
    assert "gain=1.11)" in crit.code and "0.202" in crit.why
    assert "gain=1.0)" in get_remedy("critical_init", {}, site="rnn.l0").code
    assert "gain=3.0)" in get_remedy("critical_init", {"lambda1": -3.0, "w_hh_norm": 1.0}).code
    rs = get_remedy("residual_scaling", {"num_layers": 16})
    assert "L = 16" in rs.code and "0.25" in rs.why


def test_module_paths():
    assert module_expr("encoder.lstm") == "model.encoder.lstm"
    assert module_expr("layers.0.rnn") == "model.get_submodule('layers.0.rnn')"
    assert module_expr("") == "model"
    assert module_expr("net.lambda") == "model.get_submodule('net.lambda')"
    r = get_remedy("orthogonal_init", site="layers.0.rnn.l1_reverse", site_kind="rnn_tanh")
    assert "model.get_submodule('layers.0.rnn').weight_hh_l1_reverse" in r.code
    r = get_remedy("switch_to_gru", site="layers.0.l0", site_kind="rnn_tanh")
    assert "setattr(model.layers, '0', new)" in r.code
    r = get_remedy("forget_bias", module="enc.lstm", site_kind="lstm")  # layer unknown: every layer
    assert "for k in range(model.enc.lstm.num_layers)" in r.code


# ------------------------------------------------------------------------------ snippets run
class _Enc(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x, h0=None):
        out, _ = self.rnn(x, h0)
        return self.fc(out)


def _ns(model):
    x = torch.randn(3, 12, 4)
    return {"model": model, "x": x, "y": torch.randn(3, 12, 1) if isinstance(model, _Enc) else None,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "INPUT_SIZE": 4, "HIDDEN_SIZE": 8,
            "loss_fn": lambda out, y: out.pow(2).mean()}


def _run(code, ns):
    exec(compile(code, "<remedy>", "exec"), ns)
    return ns


@pytest.mark.parametrize("name", ["orthogonal_init", "irnn", "critical_init", "switch_to_lstm",
                                  "switch_to_gru", "reinit_dead", "leaky_relu", "layernorm_cell",
                                  "truncated_bptt", "gating", "relu_nonlinearity", "xavier_init",
                                  "he_init", "clip_grad_norm", "lower_lr", "warmup"])
def test_elman_snippets_run(name):
    model = _Enc(nn.RNN(4, 8, num_layers=2, batch_first=True, nonlinearity="relu"))
    ns = _ns(model)
    if name == "clip_grad_norm":
        model(ns["x"]).pow(2).mean().backward()
    r = get_remedy(name, FULL, site="rnn.l1", site_kind="rnn_relu")
    ns = _run(r.code, ns)
    m = ns["model"]
    out = m(ns["x"]) if name not in ("truncated_bptt",) else None
    if out is not None:
        assert out.shape == (3, 12, 1)
    if name == "switch_to_lstm":
        assert isinstance(m.rnn.lstm, nn.LSTM)
        assert m(ns["x"], torch.zeros(2, 3, 8)).shape == (3, 12, 1)       # h0 still accepted
        assert torch.all(m.rnn.lstm.bias_ih_l0[8:16] == 1.0)
    if name == "irnn":
        assert m.rnn.mode == "RNN_RELU" and torch.equal(m.rnn.weight_hh_l1, torch.eye(8))
    if name == "orthogonal_init":
        W = m.rnn.weight_hh_l1.detach()
        assert torch.allclose(W @ W.T, torch.eye(8), atol=1e-5)
    if name == "lower_lr":
        assert ns["optimizer"].param_groups[0]["lr"] == pytest.approx(0.03)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("name", ["forget_bias", "chrono_init", "orthogonal_init", "gating", "layernorm_cell"])
def test_gated_snippets_run(kind, name):
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    model = nn.Module()
    model.enc = nn.Module()
    model.enc.rnn = cls(4, 8, num_layers=2, batch_first=True)
    H = 8
    before = (model.enc.rnn.bias_ih_l1[H:2 * H] + model.enc.rnn.bias_hh_l1[H:2 * H]).detach().clone()
    ev = dict(FULL, forget_bias=float(before.mean()), update_bias=float(before.mean()))
    r = get_remedy(name, ev, site="enc.rnn.l1", site_kind=kind)
    ns = _run(r.code, _ns(model))
    after = (model.enc.rnn.bias_ih_l1[H:2 * H] + model.enc.rnn.bias_hh_l1[H:2 * H]).detach()
    if name == "forget_bias":
        plan = forget_bias_plan(ev, key="update_bias" if kind == "gru" else "forget_bias")
        assert float(after.mean()) == pytest.approx(plan["b_new"], abs=2e-3)   # 4 digits in the snippet
        assert torch.allclose(after - before, torch.full_like(before, plan["delta"]), atol=2e-3)
    if name == "chrono_init":
        assert float(after.min()) >= 0.0 and float(after.max()) <= math.log(99) + 1e-6
        if kind == "lstm":
            b_i = model.enc.rnn.bias_ih_l1[:H] + model.enc.rnn.bias_hh_l1[:H]
            assert torch.allclose(b_i, -after)
    if name == "layernorm_cell":
        cell = ns["cell"]
        assert cell(torch.randn(3, 8), (torch.zeros(3, 8), torch.zeros(3, 8)))[0].shape == (3, 8)  # layer 1: input 8


def test_attention_snippets_run():
    attn = nn.Module()
    attn.q, attn.k, attn.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].attn = attn
    model.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    ns = _ns(model)
    for name in ("sigma_reparam", "qk_layernorm", "residual_scaling", "pre_ln", "warmup"):
        _run(get_remedy(name, {}, site="blocks.0.attn", site_kind="attention").code, ns)
    assert type(attn.q).__name__ == "SigmaReparam"
    y = attn.q(torch.randn(2, 8))
    assert y.shape == (2, 8)
    assert model.enc.norm_first and hasattr(attn, "q_norm")


# ------------------------------------------------------------------------------ ranking
def test_ranking_is_specific():
    names = lambda *a, **k: [r.name for r in remedies_for(*a, **k)]  # noqa: E731
    van = names("vanishing", "rnn_tanh", FULL)
    assert van[:3] == ["orthogonal_init", "irnn", "switch_to_lstm"]
    assert "truncated_bptt" not in van and "clip_grad_norm" not in van
    assert names("short_memory", "lstm", FULL)[0] == "forget_bias"
    assert names("exploding", "rnn_tanh", FULL)[0] == "clip_grad_norm"
    assert names("dead_units", "rnn_relu", FULL)[0] == "reinit_dead"
    assert names("precision_underflow", "rnn_tanh", FULL)[0] == "truncated_bptt"
    assert names("attention_entropy_collapse", "attention", {})[0] == "sigma_reparam"
    assert names("postln_instability", "attention", {}) == ["pre_ln", "warmup"]
    assert names("exploding", "cell", FULL, site="(model)") == ["clip_grad_norm", "lower_lr"]
    # not applicable to the site kind: filtered out
    assert "forget_bias" not in names("vanishing", "rnn_tanh", FULL)
    assert "irnn" not in names("vanishing", "lstm", FULL)
    assert not set(R.FOLKLORE_CHECKS) & {n for k in R.FINDING_KINDS for s in R.SITE_KINDS
                                         for n in names(k, s, FULL)}


def test_why_quotes_the_evidence_and_the_site():
    rs = remedies_for("vanishing", "rnn_tanh", FULL, site="enc.rnn.l0")
    orth = rs[0]
    assert "0.5" in orth.why and "-0.8" in orth.why and "10 of 100" in orth.why and "'enc.rnn.l0'" in orth.why
    assert "model.enc.rnn.weight_hh_l0" in orth.code


# ------------------------------------------------------------------------------ errors
def test_unknown_remedy_suggests_the_nearest():
    with pytest.raises(GradscopeError, match=r"unknown remedy 'orthogonal'.*Did you mean 'orthogonal_init'\?"):
        get_remedy("orthogonal")
    with pytest.raises(GradscopeError, match=r"unknown remedy 'zzz'; known remedies: clip_grad_norm"):
        get_remedy("zzz")


def test_unknown_kinds_suggest_the_nearest():
    with pytest.raises(GradscopeError, match=r"unknown finding kind 'vanishng'.*Did you mean 'vanishing'\?"):
        remedies_for("vanishng", "rnn_tanh", {})
    with pytest.raises(GradscopeError, match=r"unknown site kind 'lstmm'.*Did you mean 'lstm'\?"):
        remedies_for("vanishing", "lstmm", {})
    with pytest.raises(GradscopeError, match=r"unknown site kind 'rnn'"):
        get_remedy("irnn", site_kind="rnn")
    with pytest.raises(GradscopeError, match=r"unknown finding kind 'explode'.*Did you mean 'exploding'"):
        get_remedy("irnn", kind="explode")


# ------------------------------------------------------------------------------ folklore
def test_folklore_covers_the_seed_articles_advice():
    assert {"relu", "xavier_he", "batch_norm", "dropout", "adam", "lstm_gru", "attention",
            "learning_rate"} <= set(FOLKLORE)
    from gradscope.analysis.trials import TESTABLE
    for key, e in FOLKLORE.items():
        assert {"claim", "verdict", "why", "testable", "test"} <= set(e), key
        assert e["testable"] == bool(e["test"]), key
        assert all(t in TESTABLE for t in e["test"]), key
    assert FOLKLORE["dropout"]["verdict"] == "does not address it"
    assert FOLKLORE["batch_norm"]["verdict"] == "does not address it"
    assert "Cooijmans" in FOLKLORE["batch_norm"]["why"] and "LayerNorm" in FOLKLORE["batch_norm"]["why"]
    assert "IRNN" in FOLKLORE["relu"]["why"] and "O(T²)" in FOLKLORE["attention"]["why"]
    assert "Π diag(f)" in FOLKLORE["lstm_gru"]["why"]


def test_folklore_verdicts_use_the_evidence():
    v = {d["key"]: d for d in folklore_verdicts({"lambda1": -0.8, "seq_len": 100, "w_hh_norm": 0.5},
                                               site_kind="rnn_tanh")}
    assert list(v) == list(FOLKLORE)
    assert "19.9" in v["adam"]["evidence"]                  # 15.9/0.8 steps to float32 epsilon
    assert "still vanishing" in v["relu"]["evidence"]
    assert v["learning_rate"]["verdict"] == "does not address it"
    assert v["lstm_gru"]["verdict"] == "true"
    g = {d["key"]: d for d in folklore_verdicts({"memory_time": 0.33, "seq_len": 100}, site_kind="lstm")}
    assert g["lstm_gru"]["verdict"].startswith("already applied") and "0.33" in g["lstm_gru"]["evidence"]
    assert g["lstm_gru"]["test"] == ["forget_bias", "chrono_init"]
    e = {d["key"]: d for d in folklore_verdicts({"explosion_lag": 12, "seq_len": 50, "w_hh_norm": 2.0})}
    assert e["learning_rate"]["verdict"] == "true (with clipping)"
    assert "exploding risk" in e["relu"]["evidence"]
    assert folklore_verdicts({}, site_kind="rnn_relu")[0]["verdict"] == "already applied"
    # the catalogue is not mutated by a call
    assert FOLKLORE["lstm_gru"]["test"] == ["switch_to_lstm", "switch_to_gru"]


def test_catalogue_imports_without_torch_installed():
    # A subprocess where importing torch (or numpy) fails: the catalogue still loads and works.
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['numpy'] = None\n"
        "import gradscope.analysis.remedies as r\n"
        "assert r.remedies_for('vanishing', 'rnn_tanh', {'seq_len': 50.0, 'horizon': 9.0}, site='rnn.l0', module='rnn')\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_testable_remedy_names_an_applier_in_trials():
    """The registry names its appliers (remedies.py never imports trials): each name must resolve."""
    from gradscope.analysis import remedies as R, trials

    testable = [spec for spec in R.REMEDIES.values() if spec.testable]
    assert testable
    for spec in testable:
        assert callable(getattr(trials, spec.apply, None)), spec.name
