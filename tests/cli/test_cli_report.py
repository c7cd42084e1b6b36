"""gradscope report / show: real reports, safe loading, one-line errors with exit 2, fuzzing."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradscope
from gradscope.cli import main


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.enc(x)
        return self.head(out[-1])


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    net = Net()
    path = tmp_path / "model.pt"
    torch.save({"epoch": 7, "model_state_dict": {"module." + k: v for k, v in net.state_dict().items()},
                "optimizer": torch.optim.Adam(net.parameters()).state_dict()}, path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def test_text_report_on_wrapped_bidirectional_lstm(ckpt, capsys):
    code, out, err = run(["report", ckpt, "--seq-len", "40"], capsys)
    assert code == 0, err
    assert "found LSTM at enc" in out and "epoch=7" in out and "sha256" in out
    assert "static analysis" in out and "enc.l1_reverse" in out
    assert "gradscope diagnosis" in out and "vanishing" in out


def test_json_report_schema(ckpt, tmp_path, capsys):
    outp = tmp_path / "r.json"
    code, _, err = run(["report", ckpt, "--format", "json", "-o", outp, "--seq-len", "30"], capsys)
    assert code == 0 and "wrote" in err
    d = json.loads(outp.read_text())
    assert d["schema"] == 2 and d["gradscope_version"] == gradscope.__version__
    assert d["checkpoint"]["sha256"] and d["checkpoint"]["metadata"]["epoch"] == 7
    names = [s["name"] for s in d["sites"]]
    assert names == ["enc.l0", "enc.l0_reverse", "enc.l1", "enc.l1_reverse"]
    for s in d["sites"]:
        assert s["regime"] in ("vanishing", "exploding", "stable") and isinstance(s["evidence"], dict)
        assert "gates" in s["static"]
    remedies = {r["id"]: r for r in d["remedies"]}
    assert all({"name", "title", "code", "reference", "sites", "why"} <= set(r) for r in remedies.values())
    assert len({(r["name"], r["code"]) for r in remedies.values()}) == len(remedies)  # each code once
    for f in d["findings"]:
        assert {"kind", "site", "severity", "evidence", "remedies", "remedy_ids"} <= set(f)
        for r in f["remedies"]:  # pointers into the top-level list, without the code
            assert {"id", "name", "reference"} <= set(r) and "code" not in r
            assert remedies[r["id"]]["name"] == r["name"] and f["site"] in remedies[r["id"]]["sites"]


def test_markdown_and_fail_on(ckpt, capsys):
    code, out, _ = run(["report", ckpt, "--format", "markdown", "--seq-len", "40", "--fail-on", "vanishing"], capsys)
    assert code == 1 and out.startswith("# gradscope checkpoint report")
    code, _, _ = run(["report", ckpt, "--seq-len", "40", "--fail-on", "exploding,nonfinite"], capsys)
    assert code == 0


def test_rebuilds_cells_and_bare_modules(tmp_path, capsys):
    cell = nn.GRUCell(3, 5)
    torch.save({"net": {"decoder.cell." + k: v for k, v in cell.state_dict().items()}}, tmp_path / "c.pt")
    code, out, err = run(["report", tmp_path / "c.pt", "--seq-len", "20"], capsys)
    assert code == 0, err
    assert "decoder.cell" in out and "gru" in out.lower()
    torch.save(nn.RNN(3, 6).state_dict(), tmp_path / "bare.pt")
    code, out, err = run(["report", tmp_path / "bare.pt", "--seq-len", "20", "--rnn-nonlinearity", "relu"], capsys)
    assert code == 0, err
    assert "rnn_relu" in out


def test_user_model_spec(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, hidden=8):\n"
        "        super().__init__()\n"
        "        self.enc = nn.LSTM(4, hidden, num_layers=2, bidirectional=True)\n"
        "        self.head = nn.Linear(2 * hidden, 2)\n"
        "    def forward(self, x):\n"
        "        out, _ = self.enc(x)\n"
        "        return self.head(out[-1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(["report", ckpt, "--model", "mymodels:Net", "--model-args", '{"hidden": 8}',
                          "--seq-len", "25"], capsys)
    assert code == 0, err
    assert "enc.l0" in out
    code, _, err = run(["report", ckpt, "--model", "mymodels:Nett"], capsys)
    assert code == 2 and "Did you mean 'Net'" in err and err.count("\n") == 1
    code, _, err = run(["report", ckpt, "--model", "mymodelz:Net"], capsys)
    assert code == 2 and "mymodelz" in err and err.count("\n") == 1
    code, _, err = run(["report", ckpt, "--model", "mymodels:Net", "--model-args", "{hidden: 8"], capsys)
    assert code == 2 and "JSON" in err and err.count("\n") == 1
    code, _, err = run(["report", ckpt, "--model", "mymodels:Net", "--model-args", '{"hidden": 9}'], capsys)
    assert code == 2 and err.count("\n") == 1


def test_the_cli_names_the_flag_the_library_error_is_about(ckpt, tmp_path, capsys):
    """Library messages name keyword arguments (model spec, model arguments, unsafe=True); the CLI
    puts the flag that fixes it on the same line."""
    code, _, err = run(["report", ckpt, "--model", "no_colon.module"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "error: --model 'no_colon.module': a model spec is 'package.module:factory_or_class'" in err
    code, _, err = run(["report", ckpt, "--model", "torch.nn:GRU", "--model-args", "[4]"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "error: --model-args must be a JSON object of keyword arguments, got list" in err
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"epoch": 1}, protocol=2))
    code, _, err = run(["report", tmp_path / "plain.pkl"], capsys)
    assert code == 2 and err.count("\n") == 1 and "plain pickle" in err
    assert "--unsafe-load reads it with pickle.load" in err


def test_no_recurrent_weights(tmp_path, capsys):
    torch.save(nn.Linear(3, 4).state_dict(), tmp_path / "lin.pt")
    code, out, _ = run(["report", tmp_path / "lin.pt"], capsys)
    assert code == 0 and "no recurrent or attention weights" in out
    code, _, err = run(["report", tmp_path / "lin.pt", "--require-sites"], capsys)
    assert code == 2 and "--require-sites" in err


def test_reduce_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": nn.RNN(2, 3).state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    code, _, err = run(["report", tmp_path / "evil.pt"], capsys)
    assert code == 2 and "--unsafe-load" in err and "system" in err and err.count("\n") == 1
    assert not marker.exists()
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil()))
    code, _, err = run(["report", tmp_path / "evil.pkl"], capsys)
    assert code == 2 and not marker.exists()


@pytest.mark.parametrize("name,content", [
    ("empty.pt", b""),
    ("random.pt", os.urandom(300)),
    ("text.pt", b"hello, this is not a checkpoint\n"),
    ("data.json", b'{"weight": [1, 2, 3]}'),
], ids=["empty", "random", "text", "json"])  # fixed ids: pytest-xdist workers must collect the same names
def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    code, out, err = run(["report", p], capsys)
    assert code == 2 and err.startswith("gradscope: error: ") and err.count("\n") == 1 and out == ""


def test_missing_directory_truncated_and_inconsistent(tmp_path, ckpt, capsys):
    code, _, err = run(["report", tmp_path / "nope.pt"], capsys)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run(["report", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1
    data = ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(["report", tmp_path / "trunc.pt"], capsys)
    assert code == 2 and err.count("\n") == 1
    sd = nn.LSTM(4, 8, num_layers=2).state_dict()
    sd["weight_ih_l1"] = torch.zeros(32, 5)  # layer 1 input must be 8
    torch.save(sd, tmp_path / "bad.pt")
    code, _, err = run(["report", tmp_path / "bad.pt"], capsys)
    assert code == 2 and "weight_ih_l1" in err and err.count("\n") == 1


def test_bad_options(ckpt, capsys):
    code, _, err = run(["report", ckpt, "--format", "htm"], capsys)
    assert code == 2 and "Did you mean 'html'" in err
    code, _, err = run(["report", ckpt, "--fail-on", "vanishin"], capsys)
    assert code == 2 and "Did you mean 'vanishing'" in err
    code, _, err = run(["report", ckpt, "--seq-len", "1"], capsys)
    assert code == 2 and "--seq-len must be at least 2" in err
    code, _, err = run(["report", ckpt, "--seq-len", "abc"], capsys)
    assert code == 2 and "invalid int value" in err


def test_show_recording(tmp_path, capsys):
    rec = gradscope.probe(nn.GRU(2, 4), torch.randn(20, 2, 2))
    path = rec.save(tmp_path / "rec.npz")
    code, out, _ = run(["show", path], capsys)
    assert code == 0 and "gradscope diagnosis" in out
    code, out, _ = run(["show", path, "--format", "json"], capsys)
    assert json.loads(out)["schema"] == 2
    (tmp_path / "junk.npz").write_bytes(b"junk")
    code, _, err = run(["show", tmp_path / "junk.npz"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_report_as_subprocess(ckpt):
    r = subprocess.run([sys.executable, "-m", "gradscope", "report", str(ckpt), "--seq-len", "20",
                        "--format", "json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"] == 2
    r = subprocess.run([sys.executable, "-m", "gradscope", "report", str(ckpt) + ".missing"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fz") / "f.pt"
    p.write_bytes(data)
    _fuzz_main(["report", str(p), "--no-probe"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(min_value=0, max_value=10_000), byte=st.integers(0, 255), cut=st.booleans())
def test_fuzz_mutated_checkpoint(tmp_path_factory, pos, byte, cut):
    d = tmp_path_factory.mktemp("mut")
    torch.save({"state_dict": nn.GRU(2, 3).state_dict()}, d / "ok.pt")
    data = bytearray((d / "ok.pt").read_bytes())
    pos = pos % len(data)
    if cut:
        data = data[:pos]
    else:
        data[pos] = byte
    (d / "m.pt").write_bytes(bytes(data))
    _fuzz_main(["report", str(d / "m.pt"), "--no-probe", "--seq-len", "4"])


def _fuzz_main(argv):
    """Exit 0 or 2, and a 2 must come from a recognised bad input, not the catch-all."""
    import contextlib
    import io
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    assert code in (0, 2)
    assert not err.getvalue().startswith("gradscope: error: unexpected "), err.getvalue()  # the catch-all
    if code == 2:
        assert err.getvalue().count("\n") == 1


def test_html_report_is_self_contained(ckpt, tmp_path, capsys):
    outp = tmp_path / "r.html"
    code, _, err = run(["report", ckpt, "--format", "html", "-o", outp, "--seq-len", "30"], capsys)
    assert code == 0, err
    page = outp.read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "class='checkpoint'" in page and "sha256" in page and "enc.l1_reverse" in page
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page  # no network


def test_trials_not_improved_when_trading_vanishing_for_exploding():
    from gradscope.analysis.trials import SiteChange, _score
    import dataclasses
    fields = {f.name for f in dataclasses.fields(SiteChange)}
    base = dict.fromkeys(fields, None)
    base.update(site="l0", regime_before="vanishing", regime_after="exploding", reach_before=0.1,
                reach_after=0.6, lambda1_before=-0.5, lambda1_after=0.2)
    base = {k: v for k, v in base.items() if k in fields}
    ch = SiteChange(**{k: (v if v is not None else float("nan")) for k, v in base.items()})
    score, _, improved = _score([ch])
    assert score > 0 and not improved


def test_attention_weights_in_a_checkpoint_are_probed(tmp_path, capsys):
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4)

    torch.save({"state_dict": Enc().state_dict()}, tmp_path / "a.pt")
    code, out, err = run(["report", tmp_path / "a.pt", "--seq-len", "10", "--num-heads", "4", "--format", "json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    site = next(s for s in d["sites"] if s["name"] == "attn")
    assert site["kind"] == "attention" and site["regime"] in ("vanishing", "exploding", "stable")
    assert "qk_spectral_norm_max" in site["static"]


# ------------------------------------------------------------------------ an honest report (issue 15)
@pytest.mark.parametrize("fmt", ["text", "markdown", "json", "html"])
def test_every_format_states_the_inputs_and_the_mode(ckpt, tmp_path, capsys, fmt):
    outp = tmp_path / f"r.{fmt}"

    def page():
        text = outp.read_text()
        return json.loads(text)["measured_on"] if fmt == "json" else text

    code, _, err = run(["report", ckpt, "--format", fmt, "-o", outp, "--seq-len", "30"], capsys)
    assert code == 0, err
    assert "synthetic N(0, 1²) inputs of length 30, batch 8, seed 0" in page()
    assert "eval mode" in page()
    code, _, err = run(["report", ckpt, "--format", fmt, "-o", outp, "--seq-len", "30", "--train-mode",
                        "--input-scale", "0.5", "--seed", "3"], capsys)
    assert code == 0, err
    page = page()
    assert "synthetic N(0, 0.5²) inputs of length 30, batch 8, seed 3" in page and "train mode" in page


def test_model_is_probed_in_eval_mode_unless_asked(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "modemodels.py").write_text(
        "from torch import nn\n"
        "MODES = []\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.enc = nn.LSTM(4, 8, num_layers=2, bidirectional=True, dropout=0.5)\n"
        "        self.head = nn.Linear(16, 2)\n"
        "    def forward(self, x):\n"
        "        MODES.append(self.training)\n"
        "        out, _ = self.enc(x)\n"
        "        return self.head(out[-1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    mod = importlib.import_module("modemodels")
    code, out, err = run(["report", ckpt, "--model", "modemodels:Net", "--seq-len", "20"], capsys)
    assert code == 0, err
    assert mod.MODES and not any(mod.MODES) and "eval mode" in out
    mod.MODES.clear()
    code, out, err = run(["report", ckpt, "--model", "modemodels:Net", "--seq-len", "20", "--train-mode"], capsys)
    assert code == 0, err
    assert mod.MODES and all(mod.MODES) and "train mode" in out
    inputs = tmp_path / "x.pt"
    torch.save(torch.randn(20, 3, 4), inputs)
    code, out, err = run(["report", ckpt, "--model", "modemodels:Net", "--inputs", inputs], capsys)
    assert code == 0, err
    assert f"the inputs in {inputs}" in out and "synthetic" not in out


def test_synthetic_verdicts_are_worded_as_such_and_trained_weights_get_training_remedies_first(tmp_path, capsys):
    from gradscope.analysis.diagnose import REINITIALISING

    rnn = nn.RNN(3, 16)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.3)     # vanishing
    torch.save(rnn.state_dict(), tmp_path / "rnn.pt")
    code, out, err = run(["report", tmp_path / "rnn.pt", "--format", "json", "--seq-len", "60"], capsys)
    assert code == 0, err
    d = json.loads(out)
    van = [f for f in d["findings"] if f["kind"] == "vanishing"]
    assert van and "Measured on synthetic N(0, 1²) inputs" in van[0]["explanation"]
    for f in d["findings"]:
        if f["remedies"]:
            assert f["remedies"][0]["name"] not in REINITIALISING, f


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_recognised_and_loaded_only_with_unsafe_load(tmp_path, capsys):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(3, 6)
            self.head = nn.Linear(6, 1)

        def forward(self, x):
            return self.head(self.enc(x)[0])

    path = tmp_path / "net.jit"
    torch.jit.save(torch.jit.script(Net()), str(path))
    code, out, err = run(["report", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "TorchScript archive" in err and "--unsafe-load" in err and "runs the code" in err
    code, out, err = run(["report", path, "--unsafe-load", "--seq-len", "20"], capsys)
    assert code == 0, err
    assert "format torchscript" in out and "found GRU at enc" in out and "enc.l0" in out
