"""The command line: in-process and as a subprocess; one-line errors, exit codes."""
import json

import pytest
import subprocess
import sys


import gradscope
from gradscope.cli import main


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


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "gradscope", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("gradscope ")
