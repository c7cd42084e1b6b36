"""Checks that only make sense on an accelerator (GRADSCOPE_TEST_DEVICE=cuda).

* a watched training step costs at most one device→host synchronisation more than the same
  unwatched step (the one copy of the step's norms to the host);
* watch and probe on the device give the numbers they give on the CPU (float64, same weights and
  inputs);
* the Recording of a device run holds plain numpy and Python values, no torch object.

On the CPU every test here is skipped with its reason; the rest of the suite runs on the device
through the ``device`` fixture (tests/conftest.py).
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope

from conftest import DEVICE

needs_cuda = pytest.mark.skipif(
    DEVICE.type != "cuda",
    reason=f"needs GRADSCOPE_TEST_DEVICE=cuda (the test device is {DEVICE}): counts CUDA synchronisations "
           f"with torch.cuda.set_sync_debug_mode")
needs_accelerator = pytest.mark.skipif(
    DEVICE.type == "cpu",
    reason="compares a device run with a CPU run: needs GRADSCOPE_TEST_DEVICE set to an accelerator "
           "(e.g. cuda)")

SYNC_MESSAGE = "called a synchronizing CUDA operation"


# ----------------------------------------------------------------------------- models as data
class Seq(nn.Module):
    """A fused recurrent module and a linear read-out of every position."""

    def __init__(self, rnn, out):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(out, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class CellLoop(nn.Module):
    """A user loop over a cell (tensor state, or (h, c) for nn.LSTMCell)."""

    def __init__(self, cell, n, lstm=False):
        super().__init__()
        self.cell, self.n, self.lstm = cell, n, lstm
        self.head = nn.Linear(n, 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.n)
        state = (h, x.new_zeros(x.shape[1], self.n)) if self.lstm else h
        outs = []
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
            outs.append(state[0] if self.lstm else state)
        return self.head(torch.stack(outs))


class TanhCell(nn.Module):
    """A hand-written cell: h' = tanh(W h + U x)."""

    def __init__(self, i, n):
        super().__init__()
        self.W = nn.Linear(n, n)
        self.U = nn.Linear(i, n)

    def forward(self, x, h):
        return torch.tanh(self.W(h) + self.U(x))


def encoder(E=8, H=2, L=2):
    layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, L, enable_nested_tensor=False)


# (id, model factory, input shape) — dropout-free, so a CPU and a GPU run see the same function
MODELS = {
    "lstm-2layer-bi": (lambda: Seq(nn.LSTM(4, 6, num_layers=2, bidirectional=True), 12), (9, 3, 4)),
    "gru-2layer": (lambda: Seq(nn.GRU(4, 6, num_layers=2), 6), (9, 3, 4)),
    "lstmcell-loop": (lambda: CellLoop(nn.LSTMCell(4, 6), 6, lstm=True), (9, 3, 4)),
    "user-cell": (lambda: CellLoop(TanhCell(4, 6), 6), (9, 3, 4)),
    "transformer-encoder": (encoder, (3, 5, 8)),
}


def _build(name, dtype=torch.float64, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(dtype)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    return model, x


# ----------------------------------------------------------------------------- (a) synchronisations
def _count_syncs(fn) -> int:
    """Synchronising CUDA calls made by ``fn()`` (torch's sync debug mode, as warnings)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    # pytest turns warnings into errors (filterwarnings = error): record them instead, here only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    return sum(SYNC_MESSAGE in str(w.message) for w in caught)


def _train_step(model, x, opt):
    opt.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    opt.step()


SYNC_CASES = {
    "nn.LSTM 2 layers bidirectional (fused)": (
        lambda: Seq(nn.LSTM(16, 32, num_layers=2, bidirectional=True), 64), (20, 8, 16)),
    "user nn.LSTMCell loop": (lambda: CellLoop(nn.LSTMCell(16, 32), 32, lstm=True), (20, 8, 16)),
    "nn.TransformerEncoder": (lambda: encoder(E=32, H=4, L=2), (8, 20, 32)),
}


@needs_cuda
@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_watched_step_adds_at_most_one_host_sync(case):
    make, shape = SYNC_CASES[case]
    torch.manual_seed(0)
    model = make().to(DEVICE)
    x = torch.randn(*shape).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):  # warm-up: cuDNN plans, lazy initialisation, allocator
        _train_step(model, x, opt)
    plain = _count_syncs(lambda: _train_step(model, x, opt))
    with gradscope.watch(model, every=1) as scope:
        # the first watched step also discovers cells and cold-starts the Q·K power iteration
        first = _count_syncs(lambda: _train_step(model, x, opt))
        watched = [_count_syncs(lambda: _train_step(model, x, opt)) for _ in range(2)]
    assert scope.step == 3 and len(scope.recording.steps) == 3
    assert scope.recording.sites, "nothing was recorded"
    msg = (f"{case}: unwatched step {plain} synchronisation(s); watched steps {watched} "
           f"(first watched step {first}); allowed: at most {plain + 1} (one host copy per step)")
    print(msg)  # shown with pytest -rP
    assert max(watched) <= plain + 1, msg
    # the record itself is right: every state of every site got a finite gradient norm
    rec = scope.recording
    for site in rec.sites:
        for state in rec.states(site):
            g = rec.grad_norms(site, state)
            assert g.shape[0] == 3 and np.all(np.isfinite(g)), (site, state, g)


# ----------------------------------------------------------------------------- (b) device equals CPU
def _close(got, want, what, rtol=1e-8):
    """float64 agreement; the absolute floor scales with the array (entries far below its size)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    finite = want[np.isfinite(want)]
    atol = 1e-12 * float(np.max(np.abs(finite))) if finite.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def _close_tree(got, want, what):
    """Nested metadata (dicts of numbers, strings, lists): equal, numbers to rtol 1e-8."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys {sorted(map(str, got))} != {sorted(map(str, want))}"
        for k in want:
            if k != "seconds":  # wall-clock time of the estimator
                _close_tree(got[k], want[k], f"{what}[{k!r}]")
    elif isinstance(want, (list, tuple)) and not all(isinstance(v, (int, float)) for v in want):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            _close_tree(a, b, f"{what}[{i}]")
    elif isinstance(want, (int, float, np.number, list, tuple, np.ndarray)) and not isinstance(want, bool):
        _close(got, want, what)
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


# On CUDA, nn.LSTMCell runs as one fused kernel that computes h_t from c_t inside the autograd node
# that outputs c_t, so a hook on c_t alone would miss the path c_t -> h_t. The watch runs built-in
# LSTMCells op by op on scheduled device passes; the c norms must then equal the CPU's.
def _known_gaps(name):
    return set()


def _same_recording(got, want, skip=()):
    assert got.sites == want.sites
    for site in want.sites:
        for state in want.states(site):
            if (site, state) in skip:
                continue
            _close(got.grad_norms(site, state), want.grad_norms(site, state), f"grad norms {site}/{state}")
        np.testing.assert_array_equal(got.seq_lens(site), want.seq_lens(site))
    gp, wp = got.param_grad_norms(), want.param_grad_norms()
    assert set(gp) == set(wp)
    for name in wp:
        _close(gp[name], wp[name], f"parameter {name}")
    gm, wm = got.measures(), want.measures()
    assert set(gm) == set(wm), sorted(set(gm) ^ set(wm))
    for key in wm:
        _close(gm[key], wm[key], f"measure {key}")
    _close_tree(got.measure_meta, want.measure_meta, "measure_meta")
    assert [e.get("kind") for e in got.events] == [e.get("kind") for e in want.events]


def _watch_step(model, x, probe_every=None):
    with gradscope.watch(model, every=1, probe_every=probe_every, probe_options={"k": 2}) as scope:
        model(x).pow(2).mean().backward()
    return scope.recording


@needs_accelerator
@pytest.mark.parametrize("name", list(MODELS))
def test_watch_on_the_device_equals_the_cpu(name):
    model, x = _build(name)
    dev = copy.deepcopy(model).to(DEVICE)
    want = _watch_step(model, x)
    got = _watch_step(dev, x.to(DEVICE))
    assert want.sites, "the CPU run recorded no site"
    _same_recording(got, want, skip=_known_gaps(name))


@needs_cuda
def test_lstmcell_c_state_norms_on_the_device_equal_the_cpu():
    model, x = _build("lstmcell-loop")
    dev = copy.deepcopy(model).to(DEVICE)
    want = _watch_step(model, x)
    got = _watch_step(dev, x.to(DEVICE))
    _close(got.grad_norms("cell", "c"), want.grad_norms("cell", "c"), "grad norms cell/c")


@needs_accelerator
@pytest.mark.parametrize("name", list(MODELS))
def test_probe_on_the_device_equals_the_cpu(name):
    model, x = _build(name)
    dev = copy.deepcopy(model).to(DEVICE)
    want = gradscope.probe(model, x, k=3)
    got = gradscope.probe(dev, x.to(DEVICE), k=3)
    assert want.measures(), "the CPU probe measured nothing"
    _same_recording(got, want, skip=_known_gaps(name))
    assert got.meta["loss"] == pytest.approx(want.meta["loss"], rel=1e-6)  # default_loss sums in float32


@needs_accelerator
def test_watch_with_probe_every_on_the_device_equals_the_cpu():
    model, x = _build("lstm-2layer-bi")
    dev = copy.deepcopy(model).to(DEVICE)
    _same_recording(_watch_step(dev, x.to(DEVICE), probe_every=1), _watch_step(model, x, probe_every=1))


# ----------------------------------------------------------------------------- (c) no torch objects
def _torch_objects(obj, path="rec", seen=None):
    """Paths inside ``obj`` that hold a torch object (tensor, device, dtype, module, ...)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, str):  # meta["torch_version"] is torch's str subclass: text, saved as JSON
        return []
    mod = type(obj).__module__ or ""
    if isinstance(obj, torch.Tensor) or mod == "torch" or mod.startswith("torch."):
        return [f"{path}: {type(obj).__name__}"]
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [p for i, v in enumerate(obj.ravel()) for p in _torch_objects(v, f"{path}[{i}]", seen)]
        return []
    if isinstance(obj, dict):
        return [p for k, v in obj.items()
                for p in _torch_objects(k, f"{path} key {k!r}", seen) + _torch_objects(v, f"{path}[{k!r}]", seen)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [p for i, v in enumerate(obj) for p in _torch_objects(v, f"{path}[{i}]", seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [p for k, v in vars(obj).items() for p in _torch_objects(v, f"{path}.{k}", seen)]
    return []


@needs_accelerator
@pytest.mark.parametrize("name", list(MODELS))
def test_recording_of_a_device_run_holds_no_torch_objects(name, tmp_path):
    model, x = _build(name, dtype=torch.float32)
    model, x = model.to(DEVICE), x.to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradscope.watch(model, every=1, probe_every=2, probe_options={"k": 2}) as scope:
        for _ in range(3):
            _train_step(model, x, opt)
    recs = {"watch": scope.recording, "probe": gradscope.probe(model, x, k=2)}
    for what, rec in recs.items():
        bad = _torch_objects(rec)
        assert not bad, f"{what} recording of {name} on {DEVICE} holds torch objects: {bad[:10]}"
        assert isinstance(rec.steps, np.ndarray)
        for site in rec.sites:
            assert all(isinstance(rec.grad_norms(site, s), np.ndarray) for s in rec.states(site))
        back = gradscope.load(rec.save(tmp_path / f"{what}.npz"))  # plain numpy: saves and loads
        assert back.sites == rec.sites
