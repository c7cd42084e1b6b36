"""The command line: in-process and as a subprocess; one-line errors, exit codes."""
import json
import subprocess
import sys


import gradscope
from gradscope.cli import main


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert gradscope.__version__ in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "adding problem" in out and "examples:" in out
    assert main([]) == 2


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_demo_runs_and_writes_reports(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--seq-len", "12", "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    assert "vanilla RNN" in out and "LSTM" in out and "regime" in out
    for name in ("rnn.md", "rnn.json", "lstm.md", "lstm.json", "rnn-watch.npz"):
        assert (tmp_path / name).exists()
    d = json.loads((tmp_path / "lstm.json").read_text())
    assert d["schema"] == 1 and d["sites"][0]["name"] == "rnn.l0"
    assert len(gradscope.load(tmp_path / "rnn-watch.npz")) > 0


def test_demo_bad_arguments_give_one_line(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gradscope: error: --steps must be at least 1, got 0."


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "gradscope", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("gradscope ")
