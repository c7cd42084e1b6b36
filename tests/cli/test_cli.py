"""The command line: in-process and as a subprocess; one-line errors, exit codes."""
import json
import warnings

import pytest
import subprocess
import sys


import gradscope
from gradscope.cli import main
from gradscope.errors import GradscopeError, NotARecordingError


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert gradscope.__version__ in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "recall task" in out and "examples:" in out
    assert main([]) == 2


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_demo_runs_and_writes_reports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "Elman RNN" in out and "LSTM" in out and "try_remedies" in out and "RNN + " in out
    lines = out.splitlines()
    assert len(lines) <= 40 and max(len(line) for line in lines if str(tmp_path) not in line) <= 100
    for verdict_line in [line for line in lines if "reach 10^" in line]:
        assert any(v in verdict_line for v in ("likely", "unlikely", "uncertain"))
        assert "learned" in verdict_line or "failed" in verdict_line
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "dashboard.png").read_bytes()[:4] == b"\x89PNG"
    assert str(tmp_path / "report.html") in out


@pytest.mark.slow
def test_demo_tells_the_story_under_the_protocol(tmp_path, capsys):
    """The default demo: the RNN is called unlikely and fails, the LSTM likely and learns, and the
    top remedy (ranked by training) makes the RNN learn."""
    assert main(["demo", "--out", str(tmp_path)]) == 0
    rows = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if "reach 10^" in line}
    rnn, lstm = rows["Elman RNN, W_hh 0.5·orth."], rows["LSTM, forget bias 3"]
    assert "unlikely" in rnn and "failed" in rnn
    assert " likely" in lstm and "learned" in lstm
    fixed = next(v for k, v in rows.items() if k.startswith("RNN + "))
    assert "learned" in fixed


def test_demo_bad_arguments_give_one_line(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gradscope: error: --steps must be at least 1, got 0."


def test_demo_library_errors_name_its_arguments(tmp_path):
    from gradscope.demo import run_demo
    with pytest.raises(GradscopeError, match=r"^steps= must be at least 1, got 0\.$"):
        run_demo(tmp_path, steps=0)
    with pytest.raises(GradscopeError, match=r"^seq_len= must be at least 2, got 1\.$"):
        run_demo(tmp_path, seq_len=1)


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "gradscope", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("gradscope ")


def _show_error(path, capsys):
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unexpected" not in err
    return err


def test_show_names_what_a_non_recording_zip_is(tmp_path, capsys):
    import zipfile

    import numpy as np
    import torch

    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "run.pt")
    err = _show_error(tmp_path / "run.pt", capsys)
    assert "PyTorch checkpoint" in err and "gradscope report" in err and "npz" not in err
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3), b=np.ones(2))
    assert "NumPy .npz archive of 2 array(s)" in _show_error(tmp_path / "arrays.npz", capsys)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as z:
        z.writestr("a.txt", "hi")
    assert "zip archive of 1 member(s)" in _show_error(tmp_path / "notes.zip", capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.jit"))
    err = _show_error(tmp_path / "m.jit", capsys)
    assert "TorchScript archive" in err and "--unsafe-load" in err
    # the library says what the file holds; the flag and the command come from the CLI
    for name, holds in (("m.jit", "torchscript"), ("run.pt", "checkpoint"), ("notes.zip", "archive")):
        with pytest.raises(NotARecordingError) as e:
            gradscope.load(tmp_path / name)
        assert e.value.holds == holds and "--" not in str(e.value) and "gradscope report" not in str(e.value)


def test_whole_model_pickled_from_main_says_what_can_help(tmp_path):
    """A class defined in the saving script's __main__ cannot be imported by any other program:
    the message says so (PYTHONPATH advice cannot help) and names the class, with and without
    --unsafe-load."""
    script = tmp_path / "save.py"
    script.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.rnn = torch.nn.LSTM(3, 4)\n"
        "torch.save(Net(), 'whole.pt')\n")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    for extra in ([], ["--unsafe-load"]):
        r = subprocess.run([sys.executable, "-m", "gradscope", "report", "whole.pt", *extra],
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip()
        assert "\n" not in err and "Traceback" not in err
        assert "__main__.Net" in err and "state_dict()" in err and "PYTHONPATH" not in err
