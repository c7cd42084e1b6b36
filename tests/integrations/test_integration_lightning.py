"""GradscopeCallback: a tiny LightningModule with an LSTM trained a few steps on the CPU."""
import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from conftest import assert_no_hooks
from gradscope import GradscopeError

pl = pytest.importorskip("lightning.pytorch", reason='pip install "gradscope[lightning]"')
from lightning.pytorch.loggers import Logger  # noqa: E402

from gradscope.integrations.lightning import GradscopeCallback  # noqa: E402

# Lightning 2.6's CombinedLoader builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates;
# the warning comes from Lightning's own code on every fit (nothing here can avoid it).
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    # these tests train on the CPU on purpose; on a GPU machine Lightning says a GPU goes unused
    pytest.mark.filterwarnings("ignore:GPU available but not used"),
]

T, B, STEPS = 12, 4, 6


class LitLSTM(pl.LightningModule):
    """Calls its submodules directly in training_step (no self(...)), as Lightning's examples do."""

    def __init__(self, fail_at=None, via_forward=False):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.fail_at = fail_at
        self.via_forward = via_forward

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        if self.via_forward:
            pred = self(x)
        else:
            out, _ = self.lstm(x)
            pred = self.head(out[:, -1])
        return nn.functional.mse_loss(pred, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ManualLSTM(LitLSTM):
    def __init__(self):
        super().__init__(via_forward=True)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class MemoryLogger(Logger):
    """Keeps every log_metrics call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def gradscope(self):
        return [(s, {k: v for k, v in m.items() if k.startswith("gradscope/")}) for s, m in self.calls
                if any(k.startswith("gradscope/") for k in m)]


class Batches:
    """A re-iterable sequence of ready batches. Not a DataLoader, so Lightning's num_workers advice
    does not apply; not a list, which Lightning would take for several dataloaders."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.randn(B, T, 4, generator=g), torch.randn(B, 1, generator=g)) for _ in range(n)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def _fit(model, cb, tmp_path, logger=None, max_steps=STEPS):
    logger = logger if logger is not None else MemoryLogger()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[cb], default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=Batches(max_steps))
    return trainer, logger


@pytest.mark.parametrize("via_forward", [False, True], ids=["submodules", "self_call"])
def test_fit_records_logs_and_removes_hooks(tmp_path, via_forward):
    model = LitLSTM(via_forward=via_forward)
    cb = GradscopeCallback(probe_every=3, probe_options={"k": 2, "lyapunov": True})
    trainer, logger = _fit(model, cb, tmp_path)

    rec = cb.recording
    assert isinstance(rec, gradscope.Recording)
    assert rec.sites == ("lstm.l0",)
    assert rec.meta["model"] == "LitLSTM"
    assert len(rec) == STEPS and rec.meta["total_steps"] == STEPS
    for state in ("h", "c"):
        g = rec.grad_norms("lstm.l0", state=state)
        assert g.shape == (STEPS, T) and np.isfinite(g).all() and (g > 0).all()
    assert set(rec.param_grad_norms()) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0",
                                           "lstm.bias_hh_l0", "head.weight", "head.bias"}
    assert list(rec.measure("lstm.l0", "probe_steps")) == [0, 3]
    assert isinstance(cb.diagnosis, gradscope.Diagnosis) and cb.diagnosis.sites == ("lstm.l0",)
    assert cb.scope is None

    logged = logger.gradscope()
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))  # log_every_n_steps=1, once per step
    last = logged[-1][1]
    for name in ("grad_first_over_last/lstm.l0", "grad_norm_mean/lstm.l0", "rate/lstm.l0",
                 "lambda1/lstm.l0", "regime/lstm.l0", "param_grad_norm", "findings", "severity"):
        assert "gradscope/" + name in last, name
    # the horizon is logged where it is finite (∞: no crossing of the threshold within the sequence)
    horizon = cb.diagnosis.site_summary("lstm.l0")["horizon"]
    assert ("gradscope/horizon/lstm.l0" in last) == math.isfinite(horizon)
    assert last["gradscope/lambda1/lstm.l0"] == pytest.approx(cb.diagnosis.site_summary("lstm.l0")["lambda1"])
    assert all(isinstance(v, float) and math.isfinite(v) for _, m in logged for v in m.values())
    g = rec.grad_norms("lstm.l0")[-1]
    assert last["gradscope/grad_first_over_last/lstm.l0"] == pytest.approx(g[0] / g[-1])
    assert last["gradscope/findings"] == len(cb.diagnosis.findings)

    assert_no_hooks(model)
    assert "training_step" not in model.__dict__
    # the module is free again: a plain watch works after fit
    gradscope.watch(model, every=1).close()


def test_log_every_thins_the_logging(tmp_path):
    cb = GradscopeCallback(log_every=4)
    _, logger = _fit(LitLSTM(), cb, tmp_path)
    assert [s for s, _ in logger.gradscope()] == [4, STEPS]  # the schedule, then once at the end


def test_csv_logger_receives_the_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = GradscopeCallback(every=2)
    _, logger = _fit(LitLSTM(), cb, tmp_path, logger=CSVLogger(str(tmp_path), name="csv"))
    text = Path(logger.log_dir, "metrics.csv").read_text()
    assert "gradscope/grad_first_over_last/lstm.l0" in text.splitlines()[0]
    assert len(cb.recording) == STEPS // 2


def test_manual_optimization_is_watched_through_forward(tmp_path):
    model = ManualLSTM()
    cb = GradscopeCallback()
    _, logger = _fit(model, cb, tmp_path)
    assert len(cb.recording) == STEPS
    assert np.isfinite(cb.recording.grad_norms("lstm.l0")).all()
    assert logger.gradscope()
    assert_no_hooks(model)


def test_exception_in_training_step_removes_hooks(tmp_path):
    model = LitLSTM(fail_at=3)
    cb = GradscopeCallback()
    with pytest.raises(RuntimeError, match="boom in training_step"):
        _fit(model, cb, tmp_path)
    assert_no_hooks(model)
    assert "training_step" not in model.__dict__
    assert cb.scope is None
    assert len(cb.recording) == 3  # the steps before the failure
    assert cb.diagnosis is not None


def test_exception_before_any_step_leaves_no_diagnosis(tmp_path):
    model = LitLSTM(fail_at=0)
    cb = GradscopeCallback()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(model, cb, tmp_path)
    assert_no_hooks(model)
    assert len(cb.recording) == 0 and cb.diagnosis is None


def test_a_second_fit_watches_afresh(tmp_path):
    model = LitLSTM()
    cb = GradscopeCallback()
    _fit(model, cb, tmp_path, max_steps=2)
    first = cb.recording
    _fit(model, cb, tmp_path, max_steps=3)
    assert len(first) == 2 and len(cb.recording) == 3
    assert_no_hooks(model)


def test_non_module_is_refused():
    cb = GradscopeCallback()
    with pytest.raises(GradscopeError, match=r"on_fit_start received str \('not a model'\) where it "
                                             r"expects a LightningModule.*callbacks=\[GradscopeCallback\(\)\]"):
        cb.on_fit_start(None, "not a model")
    with pytest.raises(GradscopeError, match="received the class LitLSTM instead of a model; instantiate it"):
        cb.on_fit_start(None, LitLSTM)
    assert cb.scope is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_log_every_is_refused(bad):
    with pytest.raises(GradscopeError, match=r"log_every must be a positive integer.*got " + re.escape(repr(bad))):
        GradscopeCallback(log_every=bad)


@pytest.mark.parametrize("kw, msg", [({"every": 0}, "every must be a positive integer"),
                                     ({"probe_every": 0}, "probe_every must be a positive integer"),
                                     ({"max_steps": 1}, "max_steps must be an integer >= 2"),
                                     ({"probe_options": {"kk": 2}}, r"unknown probe option\(s\) \['kk'\]")])
def test_bad_watch_options_are_refused_when_the_callback_is_made(kw, msg):
    with pytest.raises(GradscopeError, match=msg):
        GradscopeCallback(**kw)


def test_missing_lightning_raises_with_install_line(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks",
                 "pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now raises ImportError
    path = Path(gradscope.__file__).parent / "integrations" / "lightning.py"
    spec = importlib.util.spec_from_file_location("gradscope.integrations._lightning_absent", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the module itself imports without Lightning
    with pytest.raises(GradscopeError, match=r'GradscopeCallback needs PyTorch Lightning.*'
                                             r'pip install "gradscope\[lightning\]"'):
        mod.GradscopeCallback()
