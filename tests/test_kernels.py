"""The optional compiled LSTM kernel: modes, background build, failures, and that watch() uses it."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.capture import kernels


@pytest.fixture
def fresh(monkeypatch):
    """Kernel state as in a new process (restored afterwards)."""
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(kernels, "_thread", None)
    return monkeypatch


class _Fake:
    """Stands in for the compiled module in tests of the build logic."""


def _fake_compile(release: threading.Event):
    def compile_():
        release.wait(10)
        with kernels._lock:
            kernels._module = _Fake()
    return compile_


@pytest.mark.parametrize("raw,want", [("", "auto"), ("auto", "auto"), ("1", "auto"), ("ON", "auto"),
                                      ("0", "off"), ("off", "off"), ("false", "off"), ("sync", "sync")])
def test_mode_from_environment(raw, want, monkeypatch):
    monkeypatch.setenv("GRADSCOPE_KERNELS", raw)
    assert kernels.mode() == want


def test_bad_mode_is_a_clear_error_at_watch_time(monkeypatch):
    monkeypatch.setenv("GRADSCOPE_KERNELS", "fast")
    with pytest.raises(GradscopeError, match=r"GRADSCOPE_KERNELS='fast' is not understood; expected auto"):
        kernels.mode()
    with pytest.raises(GradscopeError, match="GRADSCOPE_KERNELS"):
        gradscope.watch(nn.LSTM(2, 3))
    assert kernels.get() is None  # inside a forward pass it never raises


def test_auto_mode_builds_in_the_background_and_python_runs_meanwhile(fresh):
    fresh.setenv("GRADSCOPE_KERNELS", "auto")
    release = threading.Event()
    fresh.setattr(kernels, "_compile", _fake_compile(release))
    assert "not built yet" in kernels.status()
    assert kernels.get() is None  # starts the build, does not wait
    assert kernels.status().startswith("building in the background")
    assert kernels.get() is None
    release.set()
    kernels._thread.join(10)
    assert isinstance(kernels.get(), _Fake)
    assert kernels.status().startswith("ready")


def test_sync_mode_waits_for_the_build(fresh):
    fresh.setenv("GRADSCOPE_KERNELS", "sync")
    release = threading.Event()
    release.set()
    fresh.setattr(kernels, "_compile", _fake_compile(release))
    assert isinstance(kernels.get(), _Fake)


def test_off_mode_never_uses_a_built_kernel(fresh):
    fresh.setattr(kernels, "_module", _Fake())
    fresh.setenv("GRADSCOPE_KERNELS", "off")
    assert kernels.get() is None
    assert kernels.status().startswith("off")


def test_failed_build_is_remembered_reported_and_the_python_replay_still_runs(fresh):
    import torch.utils.cpp_extension as ext

    def no_compiler(*a, **k):
        raise RuntimeError("Error building extension: c++: command not found")

    fresh.setattr(ext, "load_inline", no_compiler)
    fresh.setenv("GRADSCOPE_KERNELS", "auto")
    with pytest.raises(GradscopeError, match=r"could not be built \(RuntimeError: .*command not found\).*"
                                             r"pip install ninja.*GRADSCOPE_KERNELS=off"):
        kernels.build(wait=True)
    assert kernels.get() is None
    assert kernels.status().startswith("unavailable: RuntimeError")
    m = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(m) as scope:
        m(x)[0].sum().backward()
    assert np.isfinite(scope.recording.grad_norms("l0")).all()


def test_usable_only_for_cpu_float32_and_float64():
    assert kernels.usable(torch.ones(1)) and kernels.usable(torch.ones(1, dtype=torch.float64))
    assert not kernels.usable(torch.ones(1, dtype=torch.bfloat16))


def test_watch_uses_the_compiled_kernel_and_records_the_same_norms(native_lstm):
    # Same model, same batches: the recording through the kernel equals the pure-Python one.
    torch.manual_seed(5)
    m = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3).double()
    xs = [torch.randn(7, 3, 4, dtype=torch.float64) for _ in range(3)]

    def run(use_kernel):
        model = __import__("copy").deepcopy(m)
        get = kernels.get
        if not use_kernel:
            kernels.get = lambda: None
        try:
            with gradscope.watch(model) as scope:
                for x in xs:
                    model.zero_grad()
                    out, (h, c) = model(x)
                    (out.pow(2).sum() + c.sum()).backward()
        finally:
            kernels.get = get
        return scope.recording, [p.grad for p in model.parameters()]

    n_before = len(native_lstm)
    rec_k, g_k = run(True)
    assert len(native_lstm) > n_before
    rec_p, g_p = run(False)
    assert rec_k.sites == rec_p.sites
    for site in rec_k.sites:
        for state in ("h", "c"):
            np.testing.assert_allclose(rec_k.grad_norms(site, state), rec_p.grad_norms(site, state), rtol=1e-12)
    for a, b in zip(g_k, g_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- C++ state hooks
@pytest.mark.parametrize("s", [0.5, 1.0, 1.1])
def test_cpp_state_hooks_linear_cell_norms_are_exact(s, device, native_lstm):
    import test_watch

    test_watch.test_linear_cell_gradient_norms_are_exact(s, device)


@pytest.mark.parametrize("cell_cls,lstm", [(nn.RNNCell, False), (nn.GRUCell, False), (nn.LSTMCell, True)])
def test_cpp_state_hooks_equal_python_hooks(cell_cls, lstm, monkeypatch, native_kernel):
    # The same cell loop recorded through C++ hooks (kernel built) and Python hooks (kernel off).
    import test_watch

    torch.manual_seed(4)
    model = test_watch.CellLoop(cell_cls(3, 6), 6, lstm=lstm).double()
    xs = [torch.randn(7, 2, 3, dtype=torch.float64) for _ in range(3)]

    def run(kernel):
        monkeypatch.setattr(kernels, "get", lambda: kernel)
        with gradscope.watch(model) as scope:
            for x in xs:
                model.zero_grad()
                model(x).pow(2).sum().backward()
        assert bool(scope._cpp) == (kernel is not None)
        return scope.recording

    a, b = run(native_kernel), run(None)
    for state in a.site_info("cell")["states"]:
        np.testing.assert_allclose(a.grad_norms("cell", state), b.grad_norms("cell", state), rtol=1e-12)


def test_cpp_state_hooks_are_removed_with_the_pass(native_lstm):
    # States kept alive by the user and a graph kept for a second backward: once the step is
    # recorded (and after close) the C++ hooks are gone, so a later backward records nothing.
    import test_watch

    model = test_watch.CellLoop(nn.RNNCell(3, 4), 4)
    kept = []
    model.cell.register_forward_hook(lambda m, a, out: kept.append(out))
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model) as scope:
        model(x).sum().backward()                 # discovery pass (Python hooks)
        kept.clear()
        out = model(x)                            # C++ hooks on every state
        out.sum().backward(retain_graph=True)
        assert scope._cpp is not None and len(scope.recording) == 2
        out.sum().backward()                      # same graph again: no hook left to fire
        assert scope._cpp.take(scope._cpp_sink[1]) == (None, [])
        assert not scope._cpp_keys
    assert len(kept) == 5 and all(k.requires_grad for k in kept)


def test_cpp_state_hooks_under_autocast_and_nonfinite(monkeypatch, native_kernel):
    import test_watch

    torch.manual_seed(6)
    model = test_watch.CellLoop(nn.LSTMCell(3, 5), 5, lstm=True)
    x = torch.randn(6, 2, 3)

    def run(kernel):
        monkeypatch.setattr(kernels, "get", lambda: kernel)
        with gradscope.watch(model) as scope:
            for scale in (1.0, 1.0, float("nan")):
                model.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = model(x)
                (y.float().pow(2).sum() * scale).backward()
            assert bool(scope._cpp) == (kernel is not None)
        return scope.recording

    a, b = run(native_kernel), run(None)
    for state in ("h", "c"):
        np.testing.assert_allclose(a.grad_norms("cell", state)[:2], b.grad_norms("cell", state)[:2], rtol=1e-6)
        assert np.isfinite(a.grad_norms("cell", state)[:2]).all()
    kinds = {(e["kind"], e.get("site"), e["step"]) for e in a.events}
    assert ("nonfinite", "cell", 2) in kinds
    assert [e for e in a.events if e.get("site") == "cell"] == [e for e in b.events if e.get("site") == "cell"]



# ----------------------------------------------------------------------------- C++ cell taps
@pytest.fixture
def python_calls(monkeypatch):
    """The time steps of the cell calls that reach Scope._record_call (the Python path)."""
    from gradscope.capture.scope import Scope

    ts = []
    record = Scope._record_call
    monkeypatch.setattr(Scope, "_record_call", lambda self, *a: (ts.append(a[1]), record(self, *a))[1])
    return ts


def _watched_steps(monkeypatch, kernel, model, x, n=3):
    """The recording of ``n`` steps of ``model`` on ``x`` under watch, with ``kernel`` (or None)."""
    monkeypatch.setattr(kernels, "get", lambda: kernel)
    with gradscope.watch(model) as scope:
        for _ in range(n):
            model.zero_grad()
            model(x).pow(2).sum().backward()
        assert not scope._cpp_blocks and not scope._cpp_keys  # dropped with their passes
    return scope.recording


def test_cell_calls_go_through_the_cpp_tap_with_no_python_per_call(monkeypatch, native_kernel, python_calls):
    # After the discovery pass a user cell's forward is the kernel's CellTap for each scheduled
    # pass: it hooks the states itself, Scope._record_call (Python) never runs, and the norms equal
    # the Python hooks' and the retain_grad oracle's.
    import test_watch

    torch.manual_seed(8)
    forwards = []

    class Loop(test_watch.CellLoop):
        def forward(self, x):
            forwards.append(self.cell.__dict__.get("forward"))  # the cell's forward in this pass
            return super().forward(x)

    model = Loop(nn.LSTMCell(3, 5), 5, lstm=True).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    model.readout = None

    def run(kernel):
        forwards.clear()
        return _watched_steps(monkeypatch, kernel, model, x)

    a = run(native_kernel)
    assert [type(f).__name__ for f in forwards] == ["NoneType", "CellTap", "CellTap"]
    assert python_calls == []
    assert "forward" not in model.cell.__dict__
    b = run(None)
    assert python_calls == list(range(6)) * 2  # the Python wrapper, two passes after discovery
    for state in ("h", "c"):
        np.testing.assert_allclose(a.grad_norms("cell", state), b.grad_norms("cell", state), rtol=1e-12)
    # oracle: the unrolled loop with retain_grad
    states = {"h": [], "c": []}
    h = c = torch.zeros(2, 5, dtype=torch.float64)
    for t in range(6):
        h, c = model.cell(x[t], (h, c))
        for k, v in (("h", h), ("c", c)):
            v.retain_grad()
            states[k].append(v)
    h.pow(2).sum().backward()
    for k in ("h", "c"):
        want = [v.grad.norm().item() if v.grad is not None else 0.0 for v in states[k]]
        np.testing.assert_allclose(a.grad_norms("cell", k)[-1], want, rtol=1e-12)


def test_cpp_tap_kept_after_its_pass_records_nothing(native_lstm):
    import test_watch

    taps = []

    class Loop(test_watch.CellLoop):
        def forward(self, x):
            taps.append(self.cell.__dict__.get("forward"))
            return super().forward(x)

    model = Loop(nn.RNNCell(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model) as scope:
        for _ in range(2):
            model(x).sum().backward()
        tap = taps[-1]
        assert type(tap).__name__ == "CellTap" and tap.calls == 5
        h = tap(x[0], torch.zeros(2, 4))                       # the user calls it again later
        h.sum().backward()
        assert scope._cpp.take(scope._cpp_sink[1]) == (None, [])
        assert len(scope.recording) == 2


class ListCell(nn.Module):
    """A user cell whose output is a list: the C++ tap hands such calls to Python."""

    def __init__(self, n=4):
        super().__init__()
        self.lin = nn.Linear(3 + n, n)

    def forward(self, x, state):
        return [torch.tanh(self.lin(torch.cat([x, state[0]], -1)))]


class ListLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = ListCell()

    def forward(self, x):
        state = [x.new_zeros(x.shape[1], 4)]
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        return state[0]


def test_cpp_tap_hands_unusual_outputs_to_python_with_the_right_time_step(monkeypatch, native_kernel, python_calls):
    torch.manual_seed(9)
    model = ListLoop().double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    ts = python_calls

    def run(kernel):
        ts.clear()
        return _watched_steps(monkeypatch, kernel, model, x), list(ts)

    (a, ts_a), (b, ts_b) = run(native_kernel), run(None)
    assert ts_a == ts_b == list(range(6)) * 2  # via the tap's slow path / the Python wrapper
    assert a.grad_norms("cell").shape == (3, 6)
    np.testing.assert_allclose(a.grad_norms("cell"), b.grad_norms("cell"), rtol=1e-12)
    states = []
    s = [torch.zeros(2, 4, dtype=torch.float64)]
    for t in range(6):
        s = model.cell(x[t], s)
        s[0].retain_grad()
        states.append(s[0])
    s[0].pow(2).sum().backward()
    np.testing.assert_allclose(a.grad_norms("cell")[-1], [v.grad.norm().item() for v in states], rtol=1e-12)


@pytest.mark.parametrize("name", ["test_forward_that_raises_in_a_scheduled_pass_leaves_no_cell_wrapper_active",
                                  "test_cell_wrapper_restores_a_user_instance_forward",
                                  "test_cell_with_its_own_forward_hook_is_recorded_through_a_hook",
                                  "test_failed_discovery_pass_does_not_log_calls_twice"])
def test_cell_wrapper_cases_hold_with_cpp_taps(name, native_lstm):
    import test_watch

    getattr(test_watch, name)()


@pytest.mark.parametrize("every", [3, 7])
def test_steps_counted_alike_with_cpp_state_hooks(every, native_lstm):
    import test_watch

    test_watch.test_steps_counted_alike_on_and_off_schedule(every)


def test_attention_only_model_never_starts_a_build(fresh):
    fresh.setenv("GRADSCOPE_KERNELS", "auto")
    started = []
    fresh.setattr(kernels, "_compile", lambda: started.append(1))
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    x = torch.randn(5, 2, 8)
    with gradscope.watch(layer) as scope:
        for _ in range(3):
            layer(x).sum().backward()
    assert len(scope.recording) == 3
    assert kernels._thread is None and not started


# ----------------------------------------------------------------------------- C++ root tap
@pytest.fixture
def root_tap(monkeypatch, native_lstm):
    """Watches use the compiled kernel, hence the C++ root tap once a scheduled step has run;
    yields the list of scopes that installed it and checks that one did."""
    from gradscope.capture.scope import Scope

    installed = []
    install = Scope._install_root_tap

    def spy(self):
        install(self)
        if self._root_tap is not None:
            installed.append(self)

    monkeypatch.setattr(Scope, "_install_root_tap", spy)
    yield installed
    assert installed, "the root tap was never installed"


@pytest.mark.parametrize("name,args", [
    ("test_steps_counted_alike_on_and_off_schedule", (1,)),
    ("test_steps_counted_alike_on_and_off_schedule", (3,)),
    ("test_steps_counted_alike_on_and_off_schedule", (7,)),
    ("test_every_schedule_and_step_count", (torch.device("cpu"),)),
    ("test_gradient_accumulation_counts_each_backward", (torch.device("cpu"),)),
    ("test_history_bounded_by_max_steps_keeps_whole_span", ()),
    ("test_history_thinning_keeps_rows_exact_with_varying_lengths", (torch.device("cpu"),)),
    ("test_probe_every_measures_on_scheduled_training_batches", (torch.device("cpu"),)),
])
def test_step_counting_holds_with_the_root_tap(name, args, root_tap):
    import test_watch

    getattr(test_watch, name)(*args)


def test_root_tap_replaces_the_root_hooks_and_goes_on_close(root_tap):
    import test_watch

    model = test_watch.Seq(nn.LSTM(3, 4), 4)
    calls = []
    own = model.forward

    def user_forward(*a, **k):  # an instance forward of the user's: kept under the tap, restored
        calls.append(1)
        return own(*a, **k)

    model.forward = user_forward
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=4) as scope:
        assert model._forward_pre_hooks and model._forward_hooks  # before the kernel is used
        model(x).sum().backward()                              # step 0 (scheduled): tap installed
        assert scope._root_tap is not None
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert model.__dict__["forward"] is not user_forward
        for _ in range(5):
            model(x).sum().backward()
        kept = model(x)                                        # a pass still waiting for its backward
        assert scope._root_tap.n_pending == 1
        tap = scope._root_tap
    assert model.__dict__["forward"] is user_forward and len(calls) == 7
    del model.__dict__["forward"]
    conftest_assert_no_hooks(model)
    assert tap.n_pending == 0 and tap.closed                   # its C++ hook was removed with it
    kept.sum().backward()                                      # nothing left to count it
    assert scope.step == 6 and list(scope.recording.steps) == [0, 4]


def test_steps_off_schedule_run_no_python_of_gradscope(root_tap):
    # Under the root tap the model's forward is a C type and nothing of gradscope's is hooked
    # between scheduled steps: no Python function of the package runs in a step off the schedule.
    import os
    import sys

    import test_watch

    pkg = os.path.dirname(gradscope.__file__)
    model = test_watch.Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    with gradscope.watch(model, every=10) as scope:
        step()  # step 0: scheduled, the tap goes in at its end
        seen = []

        def profile(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(pkg):
                seen.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            for _ in range(3):
                step()
        finally:
            sys.setprofile(None)
        assert seen == []
        assert scope.step == 4
    assert list(scope.recording.steps) == [0]


def test_recording_counts_the_steps_the_root_tap_saw(root_tap):
    # The recording's total_steps is read before anything else settles the tap's count.
    import test_watch

    model = test_watch.Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=10) as scope:
        for _ in range(5):
            model(x).sum().backward()
        assert scope._root_tap is not None
        assert scope.recording.meta["total_steps"] == 5
        assert scope.step == 5


def conftest_assert_no_hooks(model):
    from conftest import assert_no_hooks

    assert_no_hooks(model)


class _Ckpt(nn.Module):
    """An LSTM under reentrant activation checkpointing: its backward runs a nested backward call."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        out = checkpoint(lambda t: self.rnn(t)[0], x, use_reentrant=True)
        return self.head(out)


@pytest.mark.parametrize("every", [1, 2])
def test_reentrant_checkpointing_counts_one_step_per_backward(every, monkeypatch, native_kernel):
    def run(kernel):
        monkeypatch.setattr(kernels, "get", lambda: kernel)
        torch.manual_seed(3)
        model = _Ckpt()
        x = torch.randn(6, 2, 3, requires_grad=True)
        with gradscope.watch(model, every=every) as scope:
            for _ in range(5):
                model(x).pow(2).sum().backward()
            assert (scope._root_tap is not None) == (kernel is not None)
        return scope

    a, b = run(native_kernel), run(None)
    assert a.step == b.step == 5
    assert list(a.recording.steps) == list(b.recording.steps) == list(range(0, 5, every))


def test_root_tap_outputs_of_any_structure_and_no_grad_passes(root_tap):
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4)

        def forward(self, x, kind="dict"):
            out, h = self.rnn(x)
            if kind == "dict":
                return {"out": out, "meta": [h, "text", None]}
            if kind == "nested":
                return ((out, None), [h])
            return out.detach()  # nothing requires grad

    model = DictOut()
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=3) as scope:
        for kind in ["dict", "nested", "dict", "nested", "dict", "nested", "dict"]:
            y = model(x, kind=kind)
            out = y["out"] if kind == "dict" else y[0][0]
            out.sum().backward()
        model(x, kind="none")                 # no output requires grad: no pass, no step
        with torch.no_grad():
            model(x)
        assert scope._root_tap is not None and scope._root_tap.n_pending == 0
    assert scope.step == 7 and list(scope.recording.steps) == [0, 3, 6]


def test_root_tap_forward_that_raises_off_schedule_counts_nothing(root_tap):
    import test_watch

    model = test_watch.Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()                     # step 0, tap installed
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7))               # off schedule (step 1) through the tap
        model(x).sum().backward()                     # step 1
        model(x).sum().backward()                     # step 2 (scheduled)
    assert scope.step == 3 and list(scope.recording.steps) == [0, 2]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_one_backward_over_an_off_schedule_and_a_scheduled_pass_is_one_step(use_kernel, monkeypatch, native_kernel):
    # A pass kept from an off-schedule step and a scheduled pass consumed by one backward call:
    # one step (recorded), and the older pass is not counted again later.
    import test_watch

    monkeypatch.setattr(kernels, "get", lambda: native_kernel if use_kernel else None)
    model = test_watch.Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()          # step 0 (scheduled; the tap goes in after it)
        a = model(x)                       # step 1, off schedule, kept
        model(x).sum().backward()          # step 1
        c = model(x)                       # step 2, scheduled
        (a.sum() + c.sum()).backward()     # step 2: reaches both passes
        assert scope.step == 3
        model(x).sum().backward()          # step 3
        model(x).sum().backward()          # step 4
        assert (scope._root_tap is not None) == use_kernel
    assert scope.step == 5 and list(scope.recording.steps) == [0, 2, 4]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_scheduled_pass_that_raises_leaves_nothing_for_later_steps(use_kernel, monkeypatch, native_kernel):
    # A scheduled forward raises; an older pass's backward then moves the count on, so the next
    # forward runs off schedule: nothing of the failed pass (per-pass forwards, parameter hooks)
    # may record into a later step. Same batch and weights throughout: step 4 equals step 0.
    import test_watch

    monkeypatch.setattr(kernels, "get", lambda: native_kernel if use_kernel else None)
    torch.manual_seed(4)
    model = test_watch.Seq(nn.LSTM(3, 4), 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()                           # step 0 (scheduled)
        a = model(x)                                        # a step-1 pass, kept
        model(x).sum().backward()                           # step 1
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7, dtype=torch.float64))  # step 2 (scheduled) fails
        a.sum().backward()                                  # step 2 (off-schedule pass)
        model(x).sum().backward()                           # step 3
        model(x).sum().backward()                           # step 4 (scheduled)
        assert (scope._root_tap is not None) == use_kernel
    rec = scope.recording
    assert list(rec.steps) == [0, 4]
    for state in ("h", "c"):
        np.testing.assert_allclose(rec.grad_norms("rnn.l0", state)[1], rec.grad_norms("rnn.l0", state)[0], rtol=1e-10)
    for name, v in rec.param_grad_norms().items():
        assert v[1] == pytest.approx(v[0], rel=1e-10), name


def test_user_forward_hook_on_the_watched_model_still_applies_under_the_root_tap(monkeypatch, native_kernel):
    import test_watch

    def run(kernel):
        monkeypatch.setattr(kernels, "get", lambda: kernel)
        torch.manual_seed(5)
        model = test_watch.Seq(nn.LSTM(3, 4), 4).double()
        model.register_forward_hook(lambda m, a, out: out * 2)  # changes what the loss sees
        x = torch.randn(5, 2, 3, dtype=torch.float64)
        outs = []
        with gradscope.watch(model, every=2) as scope:
            for _ in range(5):
                y = model(x)
                outs.append(y.detach())
                y.pow(2).sum().backward()
            assert (scope._root_tap is not None) == (kernel is not None)
        return scope, outs, model

    (a, ya, _), (b, yb, _) = run(native_kernel), run(None)
    torch.manual_seed(5)
    plain = test_watch.Seq(nn.LSTM(3, 4), 4).double()  # same weights and batch, unwatched, no hook
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert a.step == b.step == 5 and list(a.recording.steps) == list(b.recording.steps) == [0, 2, 4]
    for u, v in zip(ya, yb):  # the two replays agree to rounding on scheduled steps
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-15)
    for y in ya:  # no optimizer step: every output is the plain one, doubled by the hook
        torch.testing.assert_close(y, plain(x).detach() * 2, rtol=1e-12, atol=1e-15)
    for state in ("h", "c"):
        np.testing.assert_allclose(a.recording.grad_norms("rnn.l0", state), b.recording.grad_norms("rnn.l0", state),
                                   rtol=1e-12)


@pytest.mark.parametrize("bare", [False, True])
def test_copies_of_a_model_under_the_root_tap_run_unwatched_with_their_own_weights(bare, root_tap):
    # e.g. `best = copy.deepcopy(model)` or torch.save(model) in the middle of a watched run
    import copy
    import pickle

    import test_watch

    torch.manual_seed(6)
    model = nn.LSTM(3, 4) if bare else test_watch.Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)

    def y(m):
        out = m(x)
        return out[0] if bare else out

    with gradscope.watch(model, every=2) as scope:
        y(model).sum().backward()
        assert scope._root_tap is not None
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            with torch.no_grad():
                for p in twin.parameters():
                    p.mul_(0.5)
            want = y(twin)  # through the copy
            with torch.no_grad():
                for p, q in zip(twin.parameters(), model.parameters()):
                    torch.testing.assert_close(p, q * 0.5)
            # the copy computes with its own (halved) weights, like a fresh unwatched module
            ref = copy.deepcopy(twin)
            ref.__dict__.pop("forward", None)
            torch.testing.assert_close(want, y(ref))
            want.sum().backward()
            assert all(p.grad is not None for p in twin.parameters())
        assert scope.step == 1                          # the copies' backward calls are not steps
        y(model).sum().backward()
    assert scope.step == 2 and "forward" not in model.__dict__


def test_forwards_gradscope_installs_keep_the_module_signature(root_tap):
    # Libraries read inspect.signature(model.forward) to route arguments (e.g. Hugging Face).
    import inspect

    import test_watch

    class Named(test_watch.Seq):
        def forward(self, x, scale: float = 1.0, *, extra=None):
            return super().forward(x) * scale

    model = Named(nn.LSTM(3, 4), 4)
    bare = nn.LSTM(3, 4)
    want_model, want_bare = inspect.signature(model.forward), inspect.signature(bare.forward)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model) as scope, gradscope.watch(bare) as scope_bare:
        model(x, scale=2.0).sum().backward()
        bare(x)[0].sum().backward()
        assert scope._root_tap is not None and scope_bare._root_tap is not None
        assert inspect.signature(model.forward) == want_model
        assert inspect.signature(bare.forward) == want_bare


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    # torch's build lock stays behind when a process dies mid-build; later loads would wait forever
    import os
    import time

    import torch.utils.cpp_extension as cpp_ext

    monkeypatch.setattr(cpp_ext, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    kernels._clear_stale_lock()
    assert lock.exists()                                   # a build may be running right now
    old = time.time() - kernels._STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    kernels._clear_stale_lock()
    assert not lock.exists()


def test_exit_waits_for_a_build_under_way(fresh):
    # a daemon build thread cut off at interpreter exit can abort the process: exit joins it
    import atexit

    registered = []
    fresh.setattr(atexit, "register", registered.append)
    fresh.setattr(kernels, "_exit_hook", False)
    release = threading.Event()
    fresh.setattr(kernels, "_compile", lambda: release.wait(0.3))
    kernels.build(wait=False)
    kernels.build(wait=False)
    assert len(registered) == 1 and kernels._thread.is_alive()
    registered[0]()                                        # what atexit runs
    assert not kernels._thread.is_alive()
