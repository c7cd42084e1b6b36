"""gradscope.integrations.wandb: a real W&B run in offline mode (no network)."""
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError

wandb = pytest.importorskip("wandb")


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = wandb.init(project="gradscope-test", dir=str(tmp_path), settings=wandb.Settings(console="off"))
    logged = []
    real = r.log

    def spy(data, *args, **kwargs):
        logged.append(dict(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(r, "log", spy)
    yield r, logged
    r.finish()


def _watched_recording():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 8, batch_first=True)
    opt = torch.optim.SGD(rnn.parameters(), lr=0.01)
    with gradscope.watch(rnn, every=1, probe_every=2) as scope:
        for _ in range(4):
            out, _ = rnn(torch.randn(4, 20, 3))
            out[:, -1].sum().backward()
            opt.step()
            opt.zero_grad()
    return scope.recording


def test_scalars_images_and_report_reach_an_offline_run(run):
    from gradscope.integrations.wandb import recording_to_wandb

    r, logged = run
    rec = _watched_recording()
    summary = recording_to_wandb(rec, r)
    steps = [row["gradscope/step"] for row in logged if "gradscope/grad_norm_mean/l0" in row]
    assert steps == [int(s) for s in rec.steps]
    probe_rows = [row for row in logged if "gradscope/lambda1/l0" in row]
    assert [row["gradscope/step"] for row in probe_rows] == [int(s) for s in rec.measure("l0", "probe_steps")]
    media = logged[-1]
    assert isinstance(media["gradscope/heatmap/l0"], wandb.Image)
    assert isinstance(media["gradscope/report"], wandb.Html)
    diag = gradscope.diagnose(rec)
    assert summary["gradscope/regime_name/l0"] == diag.regime("l0")
    assert summary["gradscope/trainability"] == diag.trainability.verdict
    assert r.summary["gradscope/findings"] == len(diag.findings)


def test_uses_the_active_run_and_needs_one(run, monkeypatch):
    from gradscope.integrations.wandb import recording_to_wandb

    r, logged = run
    rec = gradscope.probe(nn.RNN(2, 4), torch.randn(10, 2, 2))
    recording_to_wandb(rec, images=False)
    assert any("gradscope/horizon/l0" in row or "gradscope/lambda1/l0" in row for row in logged)
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(GradscopeError, match=r"call wandb.init\(...\) first"):
        recording_to_wandb(rec)


def test_missing_wandb_says_how_to_install(monkeypatch):
    import sys

    from gradscope.integrations import wandb as gw
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(GradscopeError, match=r'pip install "gradscope\[wandb\]"'):
        gw.recording_to_wandb(gradscope.probe(nn.RNN(2, 4), torch.randn(5, 1, 2)))
