"""Diverged, low-precision and sparse checkpoints (issue 18, item 2): NaN/inf weights are a critical
finding naming the tensors, one per site (never "unexpected", never a RuntimeWarning, never a table of
nan); half-precision weights are measured in float32 and say so; sparse weights are made dense
(checkpoints) or refused in one line (probe of a live module)."""
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.cli import main


def _flat(text):
    """Report text with its wrapping undone (phrases may break across lines at 100 columns)."""
    return " ".join(text.split())


def lstm_state(**kw):
    torch.manual_seed(0)
    return nn.LSTM(4, 8, **kw).state_dict()


def with_nan(sd, key="weight_hh_l0"):
    sd = dict(sd)
    sd[key] = sd[key].clone()
    sd[key][3, 2] = float("nan")
    return sd


CASES = {
    "nan": lambda: with_nan(lstm_state()),
    "inf": lambda: {k: torch.full_like(v, float("inf")) for k, v in lstm_state().items()},
    "fp16": lambda: {k: v.half() for k, v in lstm_state().items()},
    "bf16": lambda: {k: v.bfloat16() for k, v in lstm_state().items()},
    "sparse": lambda: dict(lstm_state(), weight_hh_l0=lstm_state()["weight_hh_l0"].to_sparse()),
}


def report(path, capfd, *extra):
    """Run ``gradscope report`` in-process: exit code, stdout, stderr; fails on any warning or crash."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["report", str(path), "--seq-len", "20", *map(str, extra)])
    out, err = capfd.readouterr()   # file-descriptor level: also what C libraries print (MKL, LAPACK)
    assert not [w for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))], \
        [str(w.message) for w in caught]
    assert "unexpected" not in err and "Traceback" not in err and "Warning" not in err, err
    assert "MKL" not in out + err and "DLASCL" not in out + err
    return code, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_never_crashes_on_diverged_or_low_precision_weights(tmp_path, capfd, case):
    path = tmp_path / f"{case}.pt"
    torch.save(CASES[case](), path)
    code, out, err = report(path, capfd, "--fail-on", "nonfinite")
    bad = case in ("nan", "inf")
    assert code == (1 if bad else 0), err
    assert err == ("gradscope: failing on nonfinite (--fail-on)\n" if bad else "")
    assert ("[critical] nonfinite at l0" in out) == bad
    assert out.count("[critical] nonfinite") == (1 if bad else 0)   # one finding for the site, not one per event
    if bad:
        assert "l0    lstm  unmeasured" in out and "site 'l0': not measured: its weights hold NaN or inf" in _flat(out)
        assert " nan " not in out.split("gradscope diagnosis")[1]   # no table of nan numbers
        assert "non-finite  non-finite" in out   # the static table says so instead of printing nan
    if case == "nan":
        assert "weight_hh_l0 holds 1 NaN (of 256 values)" in _flat(out)
    if case == "inf":
        for key in ("weight_ih_l0 holds 128 inf", "weight_hh_l0 holds 256 inf", "bias_ih_l0 holds 32 inf",
                    "bias_hh_l0 holds 32 inf"):
            assert key in _flat(out)
    if case in ("fp16", "bf16"):
        stored = {"fp16": "float16", "bf16": "bfloat16"}[case]
        assert f"site 'l0': weights stored in {stored}; measured in float32." in _flat(out)
        assert f"weights stored in {stored}, measured in float32" in " ".join(out.split("\n\n")[2].split())   # the measured-on line
        assert "l0    lstm  vanishing" in out or "l0    lstm  stable" in out
    if case == "sparse":
        assert "sparse tensors made dense before analysis: weight_hh_l0" in _flat(out)
        assert "l0    lstm  vanishing" in out or "l0    lstm  stable" in out
    code, out, err = report(path, capfd)   # without --fail-on: exit 0 whatever was found
    assert code == 0 and err == ""


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "no-probe"])
@pytest.mark.parametrize("fmt", ["text", "markdown", "json", "html"])
def test_every_format_carries_the_critical_finding(tmp_path, capfd, fmt, probe):
    torch.save(CASES["nan"](), tmp_path / "nan.pt")
    code, out, err = report(tmp_path / "nan.pt", capfd, "--format", fmt, "--fail-on", "nonfinite",
                            *([] if probe else ["--no-probe"]))
    assert code == 1
    assert "weight_hh_l0 holds 1 NaN (of 256 values)" in _flat(out)
    if fmt == "json":
        d = json.loads(out)
        assert [(f["kind"], f["site"], f["severity"]) for f in d["findings"]] == [("nonfinite", "l0", "critical")]
        assert [s["regime"] for s in d["sites"]] == ["unmeasured"]
    elif fmt == "markdown":
        assert "critical: nonfinite at `l0`" in out
    elif fmt == "html":
        assert "critical" in out and "nonfinite" in out and "<html" in out.lower()


def test_safetensors_checkpoint_with_nan(tmp_path, capfd):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.contiguous() for k, v in with_nan(lstm_state()).items()}, str(tmp_path / "nan.safetensors"))
    for extra in ([], ["--no-probe"]):
        code, out, err = report(tmp_path / "nan.safetensors", capfd, "--fail-on", "nonfinite", *extra)
        assert code == 1 and "[critical] nonfinite at l0" in _flat(out) and "weight_hh_l0 holds 1 NaN" in _flat(out)


def test_nonfinite_json_and_nan_outside_the_recurrent_modules(tmp_path, capfd):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(3, 5, num_layers=2)
            self.head = nn.Linear(5, 2)

    torch.manual_seed(0)
    sd = Net().state_dict()
    sd["head.weight"] = torch.full_like(sd["head.weight"], float("nan"))
    sd = with_nan(sd, "enc.weight_ih_l1")
    torch.save(sd, tmp_path / "gru.pt")
    code, out, err = report(tmp_path / "gru.pt", capfd, "--format", "json", "--fail-on", "nonfinite")
    assert code == 1
    d = json.loads(out)
    crit = {f["site"]: f for f in d["findings"] if f["kind"] == "nonfinite"}
    assert set(crit) == {"enc.l1", "(model)"} and all(f["severity"] == "critical" for f in crit.values())
    assert "enc.weight_ih_l1 holds 1 NaN (of 75 values)" in crit["enc.l1"]["explanation"]
    assert "head.weight holds 10 NaN (of 10 values)" in crit["(model)"]["explanation"]
    regimes = {s["name"]: s["regime"] for s in d["sites"]}
    assert regimes["enc.l1"] == "unmeasured" and regimes["enc.l0"] != "unmeasured"
    # without a probe the findings are still there: per static site, the rest for the checkpoint
    code, out, err = report(tmp_path / "gru.pt", capfd, "--no-probe", "--fail-on", "nonfinite")
    assert code == 1 and "[critical] nonfinite at enc.l1" in out and "[critical] nonfinite at (checkpoint)" in out
    assert "head.weight holds 10 NaN (of 10 values)" in _flat(out)


def test_report_subprocess_has_a_clean_stderr(tmp_path):
    torch.save(CASES["inf"](), tmp_path / "inf.pt")
    r = subprocess.run([sys.executable, "-W", "error", "-m", "gradscope", "report", str(tmp_path / "inf.pt"),
                        "--seq-len", "20", "--fail-on", "nonfinite"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "gradscope: failing on nonfinite (--fail-on)\n", r.stderr
    assert "MKL" not in r.stdout and "[critical] nonfinite at l0" in r.stdout


def test_sparse_tensor_too_large_once_dense_is_refused_in_one_line(tmp_path, capfd):
    sd = lstm_state()
    sd["emb"] = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (100_000, 100_000),
                                        check_invariants=True)
    torch.save(sd, tmp_path / "big.pt")
    code = main(["report", str(tmp_path / "big.pt"), "--max-load-bytes", "100000000"])
    out, err = capfd.readouterr()
    assert code == 2 and err.count("\n") == 1 and "sparse tensor 'emb'" in err and "--max-load-bytes" in err


# ----------------------------------------------------------------------------------- Python API
def test_probe_and_diagnose_name_nonfinite_weights():
    torch.manual_seed(0)
    m = nn.LSTM(4, 8, num_layers=2)
    with torch.no_grad():
        m.weight_hh_l0[3, 2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = gradscope.probe(m, torch.randn(20, 2, 4))
        diag = gradscope.diagnose(rec)
        text = str(diag)
    assert rec.meta["nonfinite_weights"] == [{"name": "weight_hh_l0", "nan": 1, "inf": 0, "numel": 256}]
    assert rec.measure_meta["l0"]["skipped"] == "its weights hold NaN or inf"
    assert "inputs or initial state hold NaN or inf" in rec.measure_meta["l1"]["skipped"]  # fed by l0
    assert [(f.kind, f.site, f.severity) for f in diag.findings] == [("nonfinite", "l0", "critical")]
    assert "weight_hh_l0 holds 1 NaN (of 256 values)" in diag.findings[0].explanation
    assert diag.regime("l0") == diag.regime("l1") == "unmeasured"
    assert "unmeasured in 2/2 site(s)" in text
    assert "NaN/inf weights or inputs" in str(diag.trainability)
    assert torch.isnan(m.weight_hh_l0).sum() == 1   # the model is left as it was


def test_probe_of_all_inf_weights_warns_nothing():
    m = nn.GRU(3, 6)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diag = gradscope.diagnose(gradscope.probe(m, torch.randn(15, 2, 3)))
    assert diag.regime("l0") == "unmeasured"
    assert [(f.kind, f.site) for f in diag.findings] == [("nonfinite", "l0")]
    assert "weight_hh_l0 holds 108 inf" in diag.findings[0].explanation


def test_nonfinite_events_are_still_findings_without_nonfinite_weights():
    """The probe's events are folded into the weights finding only when the weights are to blame."""
    rnn = nn.RNN(2, 3)
    x = torch.randn(5, 1, 2)
    x[2, 0, 0] = float("nan")
    diag = gradscope.diagnose(gradscope.probe(rnn, x))
    assert any(f.kind == "nonfinite" and "appeared in the state" in f.explanation for f in diag.findings)
    assert "nonfinite_weights" not in diag.recording.meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_probe_measures_half_precision_in_float32(dtype):
    torch.manual_seed(0)
    ref = nn.LSTM(4, 8)
    half = nn.LSTM(4, 8).to(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same (rounded) weights
    x = torch.randn(20, 2, 4)
    rec = gradscope.probe(half, x.to(dtype))
    name = str(dtype).replace("torch.", "")
    assert rec.meta["precision"] == {"stored": name, "measured": "float32"}
    assert rec.measure_meta["l0"]["stored_dtype"] == name
    assert f"site 'l0': weights stored in {name}; measured in float32." in rec.notes
    jn_half, jn_ref = rec.jacobian_norms("l0"), gradscope.probe(ref, x.to(dtype).float()).jacobian_norms("l0")
    assert jn_half.dtype == np.float64 and np.all(np.isfinite(jn_half))
    # the states were computed in half precision, the Jacobian products in float32
    np.testing.assert_allclose(jn_half[:, :6], jn_ref[:, :6], rtol=0.1)
    diag = gradscope.diagnose(rec)
    assert f"weights stored in {name}, measured in float32" in diag.meta["measured_on"]
    assert half.weight_hh_l0.dtype == dtype


class _Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4 + 8, 8)

    def forward(self, x, h):
        return torch.tanh(self.lin(torch.cat([x, h], -1)))


class _Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = _Cell()

    def forward(self, x):
        h = x.new_zeros(x.shape[1], 8)
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return h


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_user_cell_is_measured_in_float32(dtype):
    torch.manual_seed(0)
    half = _Loop().to(dtype)
    ref = _Loop()
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(20, 2, 4).to(dtype)
    rec = gradscope.probe(half, x)
    name = str(dtype).replace("torch.", "")
    assert rec.measure_meta["cell"]["stored_dtype"] == name
    # float32 copies of the same weights, from the same (half-precision) inputs: the same Jacobians
    np.testing.assert_allclose(rec.jacobian_norms("cell"), gradscope.probe(ref, x.float()).jacobian_norms("cell"),
                               rtol=1e-5)
    assert half.cell.lin.weight.dtype == dtype


def test_probe_refuses_sparse_parameters():
    m = nn.LSTM(4, 8)
    m.weight_hh_l0 = nn.Parameter(m.weight_hh_l0.detach().to_sparse())
    with pytest.raises(GradscopeError, match=r"parameter 'weight_hh_l0' is a sparse tensor \(torch.sparse_coo\)"
                                             r".*nn.Parameter\(p.to_dense\(\)\)"):
        gradscope.probe(m, torch.randn(5, 2, 4))


def test_load_and_static_analysis_make_sparse_weights_dense(tmp_path):
    from gradscope.checkpoint import find_modules, load_checkpoint, static_analysis
    sd = lstm_state()
    sparse = dict(sd, weight_hh_l0=sd["weight_hh_l0"].to_sparse())
    found = find_modules(sparse)[0]
    assert found.build().weight_hh_l0.layout == torch.strided
    assert static_analysis(found, sparse) == static_analysis(find_modules(sd)[0], sd)
    torch.save(sparse, tmp_path / "sparse.pt")
    ckpt = load_checkpoint(tmp_path / "sparse.pt")
    assert ckpt.state_dict["weight_hh_l0"].layout == torch.strided
    assert torch.equal(ckpt.state_dict["weight_hh_l0"], sd["weight_hh_l0"])
    assert "sparse tensors made dense before analysis: weight_hh_l0" in ckpt.notes


def test_attention_with_nan_weights_is_unmeasured_not_stable(tmp_path, capfd):
    torch.manual_seed(0)
    sd = {"attn." + k: v for k, v in nn.MultiheadAttention(16, 2).state_dict().items()}
    sd["attn.in_proj_weight"] = sd["attn.in_proj_weight"].clone()
    sd["attn.in_proj_weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "mha.pt")
    code, out, err = report(tmp_path / "mha.pt", capfd, "--format", "json", "--seq-len", "12")
    d = json.loads(out)
    assert code == 0 and [s["regime"] for s in d["sites"]] == ["unmeasured"]
    assert [(f["kind"], f["site"]) for f in d["findings"]] == [("nonfinite", "attn")]
    assert "attn.in_proj_weight holds 1 NaN (of 768 values)" in d["findings"][0]["explanation"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_attention_stack_depth_jacobians_in_float32(dtype):
    def enc():
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    torch.manual_seed(0)
    half = enc().to(dtype)
    ref = enc()
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = torch.randn(2, 10, 16).to(dtype)
    rec = gradscope.probe(half, x)
    name = str(dtype).replace("torch.", "")
    assert rec.meta["precision"] == {"stored": name, "measured": "float32"}
    assert f"attention stack 'layers': weights stored in {name}; depth Jacobians measured in float32." in rec.notes
    key = ("layers", "depth_jacobian_norms")
    np.testing.assert_allclose(rec.measures()[key], gradscope.probe(ref, x.float()).measures()[key], rtol=1e-5)
    assert half.layers[0].self_attn.in_proj_weight.dtype == dtype


def test_saved_recording_keeps_the_finding_through_show(tmp_path, capfd):
    m = nn.LSTM(4, 8)
    with torch.no_grad():
        m.weight_hh_l0[3, 2] = float("nan")
    gradscope.probe(m, torch.randn(20, 2, 4)).save(tmp_path / "rec.npz")
    rec = gradscope.load(tmp_path / "rec.npz")
    assert rec.meta["nonfinite_weights"] == [{"name": "weight_hh_l0", "nan": 1, "inf": 0, "numel": 256}]
    code = main(["show", str(tmp_path / "rec.npz"), "--format", "json", "--fail-on", "nonfinite"])
    out, err = capfd.readouterr()
    d = json.loads(out)
    assert code == 1 and [(f["kind"], f["site"]) for f in d["findings"]] == [("nonfinite", "l0")]
    assert [s["regime"] for s in d["sites"]] == ["unmeasured"]
