"""GradscopeTrainerCallback: the Hugging Face Trainer on a tiny LSTM model and a tiny BERT, on the CPU."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from conftest import assert_no_hooks
from gradscope import GradscopeError

transformers = pytest.importorskip("transformers", reason='pip install "gradscope[trainer]"')
pytest.importorskip("accelerate", reason='pip install "gradscope[trainer]"')
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradscope.integrations.transformers import GradscopeTrainerCallback  # noqa: E402

T, B, STEPS = 12, 4, 4


class LSTMRegressor(nn.Module):
    """Returns a dict with "loss", as the Trainer expects of a model without compute_loss."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x, labels=None):
        if self.calls == self.fail_at:
            raise RuntimeError("boom in forward")
        self.calls += 1
        out, _ = self.lstm(x)
        pred = self.head(out[:, -1])
        return {"loss": nn.functional.mse_loss(pred, labels), "pred": pred}


def _lstm_data(n=B * STEPS):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(T, 4, generator=g), "labels": torch.randn(1, generator=g)} for _ in range(n)]


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def _bert_data(n=B * STEPS):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (T,), generator=g),
             "attention_mask": torch.ones(T, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=g)} for _ in range(n)]


class Capture(TrainerCallback):
    """Sees every logs dict, as a report_to integration does."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))

    def gradscope(self):
        return [{k: v for k, v in log.items() if k.startswith("gradscope/")} for log in self.logs
                if any(k.startswith("gradscope/") for k in log)]


def _args(tmp_path, **kw):
    kw = {"output_dir": str(tmp_path), "max_steps": STEPS, "per_device_train_batch_size": B, "logging_steps": 1,
          "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, **kw}
    return TrainingArguments(**kw)


def _check_logs(logs, site):
    assert len(logs) == STEPS  # one per logging step; the end-of-training log adds nothing new
    for log in logs:
        assert all(isinstance(v, float) and math.isfinite(v) for v in log.values())
        for name in (f"grad_first_over_last/{site}", f"grad_norm_mean/{site}", "param_grad_norm",
                     "findings", "severity"):
            assert "gradscope/" + name in log, name


def test_lstm_model_is_recorded_logged_and_released(tmp_path):
    model = LSTMRegressor()
    cb = GradscopeTrainerCallback(probe_every=2, probe_options={"k": 2})
    capture = Capture()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_lstm_data(), callbacks=[capture])
    assert cb.attach(trainer) is cb
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("GradscopeTrainerCallback") == names.index("DefaultFlowCallback") + 1
    assert names.index("GradscopeTrainerCallback") < names.index("Capture")
    trainer.train()

    rec = cb.recording
    assert rec.sites == ("lstm.l0",)
    assert len(rec) == STEPS
    for state in ("h", "c"):
        g = rec.grad_norms("lstm.l0", state=state)
        assert g.shape == (STEPS, T) and np.isfinite(g).all() and (g > 0).all()
    assert list(rec.measure("lstm.l0", "probe_steps")) == [0, 2]
    assert isinstance(cb.diagnosis, gradscope.Diagnosis) and cb.diagnosis.sites == ("lstm.l0",)
    assert cb.scope is None

    logs = capture.gradscope()  # a callback after ours, like a report_to integration once attached
    _check_logs(logs, "lstm.l0")
    assert "gradscope/lambda1/lstm.l0" in logs[-1] and "gradscope/regime/lstm.l0" in logs[-1]
    assert logs[-1]["gradscope/findings"] == len(cb.diagnosis.findings)
    hist = [h for h in trainer.state.log_history if "gradscope/param_grad_norm" in h]
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    assert_no_hooks(model)


def test_bert_from_config(tmp_path):
    model = _bert()
    cb = GradscopeTrainerCallback()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_bert_data(), callbacks=[cb])
    trainer.train()

    rec = cb.recording
    assert len(rec) == STEPS
    sites = [s for s in rec.sites if rec.site_info(s).get("kind") == "attention"]
    assert len(sites) == 2, rec.sites  # one per encoder layer
    for s in sites:
        g = rec.grad_norms(s)
        assert g.shape == (STEPS, T) and np.isfinite(g).all()
    assert cb.diagnosis is not None
    # given in callbacks=[...]: after the reporters, so the scalars land in log_history
    hist = [h for h in trainer.state.log_history if any(k.startswith("gradscope/") for k in h)]
    _check_logs([{k: v for k, v in h.items() if k.startswith("gradscope/")} for h in hist], sites[0])
    assert_no_hooks(model)


def test_exception_in_training_leaves_no_hook_with_the_context_manager(tmp_path):
    model = LSTMRegressor(fail_at=2)
    with pytest.raises(RuntimeError, match="boom in forward"):
        with GradscopeTrainerCallback() as cb:
            Trainer(model=model, args=_args(tmp_path), train_dataset=_lstm_data(), callbacks=[cb]).train()
    assert_no_hooks(model)
    assert cb.scope is None and len(cb.recording) == 2 and cb.diagnosis is not None


def test_a_watch_left_by_a_failed_run_is_replaced_by_the_next(tmp_path):
    model = LSTMRegressor(fail_at=1)
    cb = GradscopeTrainerCallback()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_lstm_data(), callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert cb.scope is not None  # no Trainer event for a failed run ...
    model.fail_at = None
    trainer.train()  # ... but the next run closes it before watching again
    assert len(cb.recording) == STEPS and cb.scope is None
    assert_no_hooks(model)


def test_report_to_without_attach_warns(tmp_path):
    pytest.importorskip("tensorboard")
    model = LSTMRegressor()
    cb = GradscopeTrainerCallback()
    trainer = Trainer(model=model, args=_args(tmp_path, report_to=["tensorboard"], max_steps=1),
                      train_dataset=_lstm_data(), callbacks=[cb])
    with pytest.warns(UserWarning, match=r"report_to integrations \['tensorboard'\] before it.*"
                                         r"cb\.attach\(trainer\)"):
        trainer.train()
    assert_no_hooks(model)


def test_non_module_is_refused():
    cb = GradscopeTrainerCallback()
    with pytest.raises(GradscopeError, match=r"on_train_begin received NoneType \(None\) where it expects the "
                                             r"Trainer's model \(a torch.nn.Module\)"):
        cb.on_train_begin(None, None, None, model=None)
    with pytest.raises(GradscopeError, match="received the class LSTMRegressor instead of a model"):
        cb.on_train_begin(None, None, None, model=LSTMRegressor)
    with pytest.raises(GradscopeError, match="attach\\(\\) expects a transformers Trainer.*got str"):
        cb.attach("trainer")
    assert cb.scope is None


def test_missing_transformers_raises_with_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    path = Path(gradscope.__file__).parent / "integrations" / "transformers.py"
    spec = importlib.util.spec_from_file_location("gradscope.integrations._transformers_absent", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the module itself imports without transformers
    with pytest.raises(GradscopeError, match=r'GradscopeTrainerCallback needs transformers.*'
                                             r'pip install "gradscope\[trainer\]"'):
        mod.GradscopeTrainerCallback()


@pytest.mark.parametrize("kw, msg", [({"every": 0}, "every must be a positive integer"),
                                     ({"probe_every": -1}, "probe_every must be a positive integer")])
def test_bad_watch_options_are_refused_when_the_callback_is_made(kw, msg):
    with pytest.raises(GradscopeError, match=msg):
        GradscopeTrainerCallback(**kw)
