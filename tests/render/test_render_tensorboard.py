"""Recording/Scope.to_tensorboard: written and read back from the event file."""
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError

pytest.importorskip("tensorboard", reason='pip install "gradscope[tensorboard]"')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def _read(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scope_to_tensorboard_round_trip(tmp_path):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, bidirectional=True)
    with gradscope.watch(lstm, every=1, probe_every=2, probe_options={"k": 2}) as scope:
        for _ in range(4):
            out, _ = lstm(torch.randn(8, 2, 3))
            out[-1].pow(2).sum().backward()
        writer = SummaryWriter(log_dir=str(tmp_path))
        scope.to_tensorboard(writer)
        writer.close()
    acc = _read(tmp_path)
    tags = acc.Tags()
    assert "gradscope/grad_first_over_last/l0" in tags["scalars"]
    assert "gradscope/param_grad_norm" in tags["scalars"]
    assert "gradscope/lambda1/l0" in tags["scalars"]
    assert [e.step for e in acc.Scalars("gradscope/lambda1/l0")] == [0, 2]
    assert [e.step for e in acc.Scalars("gradscope/param_grad_norm")] == [0, 1, 2, 3]
    want = scope.recording.param_grad_norms()
    tot = sum(v[0] ** 2 for v in want.values()) ** 0.5
    assert acc.Scalars("gradscope/param_grad_norm")[0].value == pytest.approx(tot, rel=1e-5)
    assert {"gradscope/heatmap/l0", "gradscope/heatmap/l0_reverse"} <= set(tags["images"])
    img = acc.Images("gradscope/heatmap/l0")[0]
    assert img.width > 100 and img.height > 100 and img.step == 4
    assert any(t.startswith("gradscope/diagnosis") for t in tags["tensors"])


def test_to_tensorboard_rejects_a_non_writer():
    rec = gradscope.probe(nn.RNN(2, 3), torch.randn(5, 1, 2), lyapunov=False)
    with pytest.raises(GradscopeError, match="needs a SummaryWriter.*without add_scalar"):
        rec.to_tensorboard(object())
