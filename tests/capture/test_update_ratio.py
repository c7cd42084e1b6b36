"""watch(update_ratio=True): ‖Δw‖/‖w‖ per parameter, against an independent computation."""
import gc
import json
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import gradscope
from gradscope import GradscopeError, RecordingFormatError


class Net(nn.Module):
    """An LSTM with a readout, and a parameter left out of the optimizer (``spare``)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, dtype=dtype)
        self.head = nn.Linear(5, 1, dtype=dtype)
        self.spare = nn.Linear(5, 1, dtype=dtype)   # used in forward, never stepped
        self.fixed = nn.Linear(1, 1, dtype=dtype)   # requires_grad=False: not a watched parameter
        self.fixed.requires_grad_(False)

    def forward(self, x):
        h = self.lstm(x)[0]
        return self.head(h) + 0.0 * self.spare(h)

    def trained(self):
        return list(self.lstm.parameters()) + list(self.head.parameters())


def _batches(n, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(7, 4, 3, generator=g, dtype=dtype) for _ in range(n)]


def _sgd_step(model, opt, x):
    """One training step: backward of the loss, the optimizer's step, gradients cleared."""
    _loss(model, x).backward()
    opt.step()
    opt.zero_grad()


def _loss(model, x):
    return (model(x) - x[..., :1]).pow(2).mean()


@pytest.mark.parametrize("every", [1, 3])
def test_sgd_ratio_is_lr_times_grad_over_weight(every):
    # plain SGD without momentum: Δw = −η g exactly, so ‖Δw‖/‖w‖ = η ‖g‖/‖w‖ with g and w read
    # here from p.grad and the parameter before the step
    lr = 0.05
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=lr)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    w_init = model.head.weight.norm().item()
    expected = []
    with gradscope.watch(model, every=every, probe_every=None) as scope:
        for x in _batches(7):
            w = {n: p.detach().clone() for n, p in model.named_parameters()}
            _loss(model, x).backward()
            expected.append({n: lr * p.grad.norm().item() / w[n].norm().item()
                             for n, p in model.named_parameters() if n in names and n.startswith(("lstm", "head"))})
            opt.step()
            opt.zero_grad()
    rec = scope.recording
    ratios = rec.update_ratios()
    assert list(ratios) == names
    assert list(rec.steps) == list(range(0, 7, every))
    for row, step in enumerate(rec.steps):
        for n, want in expected[step].items():
            assert ratios[n][row] == pytest.approx(want, rel=1e-6), (n, step)
        assert ratios["spare.weight"][row] == 0.0 and ratios["spare.bias"][row] == 0.0
    assert "fixed.weight" not in ratios
    # the stored parts: ‖w‖ at the step's forward, ‖Δw‖ = η ‖g‖
    assert rec.weight_norms()["head.weight"][0] == pytest.approx(w_init, rel=1e-12)
    np.testing.assert_allclose(rec.update_norms()["head.weight"],
                               ratios["head.weight"] * rec.weight_norms()["head.weight"], rtol=1e-12)


def test_step_without_optimizer_step_gives_zero_and_accumulation():
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for i, x in enumerate(_batches(6)):
            _loss(model, x).backward()
            if i % 2 == 1:   # gradient accumulation over two backward passes
                opt.step()
                opt.zero_grad()
    r = scope.recording.update_ratios()["lstm.weight_hh_l0"]
    assert list(r[0::2]) == [0.0, 0.0, 0.0]
    assert np.all(r[1::2] > 0)


def test_last_step_is_measured_when_the_watch_closes():
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in _batches(3):
            _sgd_step(model, opt, x)
        before_close = scope.recording.update_ratios()["head.weight"]
    after = scope.recording.update_ratios()["head.weight"]
    assert np.all(np.isfinite(before_close[:2])) and np.isnan(before_close[2])   # not measured yet
    assert np.all(np.isfinite(after)) and np.all(after > 0)


def test_forward_without_backward_keeps_the_snapshot_for_its_step():
    # a second forward pass with grad before the backward (same step) must not measure yet
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in _batches(2):
            model(x)                      # e.g. a logging forward with grad on: no backward
            _sgd_step(model, opt, x)
    r = scope.recording.update_ratios()["head.weight"]
    assert r.shape == (2,) and np.all(r > 0)


def test_default_budget_schedule_measures_every_recorded_step():
    model = Net(torch.float32)
    opt = torch.optim.Adam(model.trained(), lr=1e-3)
    with gradscope.watch(model) as scope:
        for x in _batches(20, torch.float32):
            _sgd_step(model, opt, x)
    rec = scope.recording
    r = rec.update_ratios()["lstm.weight_ih_l0"]
    assert len(r) == len(rec.steps) >= 1
    assert np.all(np.isfinite(r)) and np.all(r > 0)
    # Adam's first step moves every weight by ≈ lr: ‖Δw‖ ≈ lr·√n
    n = model.lstm.weight_ih_l0.numel()
    assert rec.update_norms()["lstm.weight_ih_l0"][0] == pytest.approx(1e-3 * n ** 0.5, rel=1e-2)


def test_training_is_bitwise_equal_with_the_feature_on():
    # a model without sites (no replay), every step scheduled: bitwise equal to the unwatched run
    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    xs = [torch.randn(16, 3) for _ in range(5)]
    ref = make()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for x in xs:
        ref(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    got = make()
    opt = torch.optim.Adam(got.parameters(), lr=1e-2)
    with gradscope.watch(got, every=1, update_ratio=True) as scope:
        for x in xs:
            got(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert np.all(np.isfinite(scope.recording.update_ratios()["0.weight"]))
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


def test_lstm_training_identical_with_and_without_the_feature():
    finals = []
    for on in (True, False):
        torch.manual_seed(0)
        model = Net(torch.float32)
        opt = torch.optim.SGD(model.trained(), lr=0.1, momentum=0.9)
        with gradscope.watch(model, every=1, update_ratio=on) as scope:
            for x in _batches(4, torch.float32):
                _sgd_step(model, opt, x)
        finals.append([p.detach().clone() for p in model.parameters()])
        assert bool(scope.recording.update_ratios()) is on
    for a, b in zip(*finals):
        assert torch.equal(a, b)


class _ParameterCopies(TorchFunctionMode):
    """Weak references to every copy (``clone``) of a parameter's values made while active: the
    update tracker's snapshot, seen from outside without reading its private state."""

    def __init__(self, params):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.refs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.Tensor.clone and isinstance(args[0], torch.Tensor)
                and args[0].untyped_storage().data_ptr() in self.storages):
            self.refs.append(weakref.ref(out))
        return out

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


def test_snapshot_is_freed_after_the_step_and_on_exit():
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    xs = _batches(2)
    with gradscope.watch(model, every=2, probe_every=None) as scope:
        tracker = scope.updates.tracker
        with _ParameterCopies(model.parameters()) as first:
            _loss(model, xs[0]).backward()
        assert tracker.pending
        assert len(first.refs) == len(tracker.params) > 0 and first.alive() == len(first.refs)  # the snapshot
        opt.step()
        opt.zero_grad()
        with _ParameterCopies(model.parameters()) as off:
            _loss(model, xs[1]).backward()    # off schedule: measured at its forward, no new snapshot
        assert not tracker.pending and not off.refs
        assert first.alive() == 0
        with _ParameterCopies(model.parameters()) as second:
            _loss(model, xs[0]).backward()    # step 2: a new snapshot, freed when the watch closes
        assert len(second.refs) == len(tracker.params) and second.alive() == len(second.refs)
    assert not tracker.pending and second.alive() == 0


def test_no_tracker_when_off_and_bad_option():
    model = Net()
    with gradscope.watch(model, every=1, update_ratio=False) as scope:
        _loss(model, _batches(1)[0]).backward()
    assert scope.recording.update_ratios() == {}
    with pytest.raises(GradscopeError, match="update_ratio must be True, False or 'auto', got 'yes'"):
        gradscope.watch(model, update_ratio="yes")


def test_probe_has_no_update_ratios():
    rec = gradscope.probe(Net(), _batches(1)[0], loss_fn=lambda y: y.pow(2).mean())
    assert rec.update_ratios() == {}


# ------------------------------------------------------------------------------------ files
def _recorded():
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in _batches(3):
            _sgd_step(model, opt, x)
        return scope.recording   # read before the next forward: the last step unmeasured (NaN)


def _arrays(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(bytes(arrays["__meta__"]).decode())


def _write(path, arrays, meta):
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_save_load_round_trip(tmp_path):
    rec = _recorded()
    back = gradscope.load(rec.save(tmp_path / "run.npz"))
    assert list(back.update_ratios()) == list(rec.update_ratios())
    for n, r in rec.update_ratios().items():
        np.testing.assert_array_equal(back.update_ratios()[n], r)
        np.testing.assert_array_equal(back.weight_norms()[n], rec.weight_norms()[n])
    assert np.isnan(back.update_ratios()["head.weight"][-1])


def test_file_without_update_ratios_loads(tmp_path):
    # what gradscope wrote before update ratios: no "updates" index entry and no u*/w* arrays
    arrays, meta = _arrays(_recorded().save(tmp_path / "new.npz"))
    assert "updates" in meta["index"]
    del meta["index"]["updates"]
    arrays = {k: v for k, v in arrays.items() if not k.startswith(("u", "w"))}
    _write(tmp_path / "old.npz", arrays, meta)
    back = gradscope.load(tmp_path / "old.npz")
    assert back.update_ratios() == {} and len(back.param_grad_norms()) == 8


def test_malformed_update_entries_are_refused(tmp_path):
    arrays, meta = _arrays(_recorded().save(tmp_path / "new.npz"))
    bad = dict(arrays, u0=arrays["u0"][:2])
    _write(tmp_path / "short.npz", bad, meta)
    with pytest.raises(RecordingFormatError, match="update norms of 'lstm.weight_ih_l0'.*S = 3"):
        gradscope.load(tmp_path / "short.npz")
    bad = dict(arrays, w1=-arrays["w1"])
    _write(tmp_path / "neg.npz", bad, meta)
    with pytest.raises(RecordingFormatError, match="weight norms.*negative"):
        gradscope.load(tmp_path / "neg.npz")
    meta["index"]["updates"][0][1] = "nope"
    _write(tmp_path / "ref.npz", dict(arrays), meta)
    with pytest.raises(RecordingFormatError, match=r"index.updates\[0\].*'nope'"):
        gradscope.load(tmp_path / "ref.npz")


# ------------------------------------------------------------------------ loggers and merging
def test_scalars_log_the_model_update_ratio():
    from gradscope.integrations._scalars import summary_scalars, update_ratio_total
    from gradscope.render.tensorboard import recording_to_tensorboard

    rec = _recorded()     # last step not measured yet
    un, wn = rec.update_norms(), rec.weight_norms()
    want = np.sqrt(sum(un[n] ** 2 for n in un)) / np.sqrt(sum(wn[n] ** 2 for n in un))
    tot = update_ratio_total(rec)
    np.testing.assert_allclose(tot[:2], want[:2], rtol=1e-12)
    assert np.isnan(tot[2])
    assert summary_scalars(rec)["gradscope/update_ratio"] == pytest.approx(want[1], rel=1e-12)

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def add_image(self, *a, **k):
            pass

        def add_text(self, *a, **k):
            pass

    w = Writer()
    recording_to_tensorboard(rec, w, images=False, diagnosis=False)
    got = [(s, v) for tag, v, s in w.scalars if tag == "gradscope/update_ratio"]
    assert [s for s, _ in got] == [0, 1] and got[1][1] == pytest.approx(want[1], rel=1e-12)
    assert "gradscope/update_ratio" not in summary_scalars(gradscope.probe(
        Net(), _batches(1)[0], loss_fn=lambda y: y.pow(2).mean()))


def test_ddp_merge_keeps_the_primary_update_norms():
    from gradscope.capture.distributed import merge_recordings

    a, b = _recorded(), _recorded()
    m = merge_recordings([a, b])
    for n, r in a.update_ratios().items():
        np.testing.assert_array_equal(m.update_ratios()[n], r)


def test_no_memory_for_the_copy_stops_measuring_not_training(monkeypatch):
    from gradscope.capture.updates import UpdateTracker

    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    calls = []

    def snapshot(self, step):
        calls.append(step)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, step)

    real = UpdateTracker.snapshot
    monkeypatch.setattr(UpdateTracker, "snapshot", snapshot)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in _batches(4):
            _sgd_step(model, opt, x)
    rec = scope.recording
    r = rec.update_ratios()["head.weight"]
    assert r[0] > 0 and np.all(np.isnan(r[1:])) and calls == [0, 1] and len(rec.steps) == 4
    assert any("update-to-weight ratio not measured from step 1 on" in n for n in rec.notes)


def test_auto_skips_the_ratio_for_a_large_model_with_a_note(monkeypatch):
    """update_ratio="auto" (the default) records while the parameter copy is small; over the limit it
    records none and says how to turn it on; True records whatever the size."""
    import gradscope.capture.options as options_mod

    m = torch.nn.LSTM(3, 4)
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    x = torch.randn(5, 2, 3)
    for limit, option, expect in ((nbytes, "auto", True), (nbytes - 1, "auto", False), (nbytes - 1, True, True)):
        monkeypatch.setattr(options_mod, "UPDATE_RATIO_AUTO_BYTES", limit)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with gradscope.watch(m, every=1, probe_every=None, update_ratio=option) as scope:
            for _ in range(2):
                opt.zero_grad()
                m(x)[0].sum().backward()
                opt.step()
        rec = scope.recording
        assert bool(rec.update_ratios()) == expect
        assert any("update_ratio=True" in n for n in rec.notes) == (not expect)
    with pytest.raises(gradscope.GradscopeError, match="'auto'"):
        gradscope.watch(m, update_ratio="sometimes")


def test_update_ratio_rides_with_the_steps_one_host_copy(monkeypatch):
    """Measuring the update adds no host copy of its own: a recorded step copies its values to the
    host once (on a GPU every copy waits for the queue), update norms included."""
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        copies.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for i, x in enumerate(_batches(4)):
            if i == 2:
                monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
            _sgd_step(model, opt, x)
            if i == 2:
                monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
    assert len(copies) == 1, copies              # step 2's values and step 1's update norms together
    r = scope.recording.update_ratios()["head.weight"]
    assert np.all(np.isfinite(r)) and np.all(r > 0)   # every step measured, the last at close


def test_a_recording_read_between_recorded_steps_shows_the_measured_update():
    """The norms wait on the device for the next recorded step's host copy; reading the recording
    before that copies them (on request) instead of showing NaN, and the later copy changes nothing."""
    model = Net()
    opt = torch.optim.SGD(model.trained(), lr=0.1)
    with gradscope.watch(model, every=3, probe_every=None) as scope:
        xs = _batches(5)
        for i, x in enumerate(xs):
            _sgd_step(model, opt, x)
            if i == 1:   # step 1 (off schedule) began: step 0's update measured, not yet copied
                early = scope.recording.update_ratios()["head.weight"].copy()
    late = scope.recording.update_ratios()["head.weight"]
    assert np.isfinite(early[0]) and early[0] > 0
    assert late[0] == early[0] and np.all(np.isfinite(late))
