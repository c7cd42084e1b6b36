"""Replay of fused modules equals the fused kernel: outputs, final states, parameter gradients."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradscope.capture import bptt
from gradscope.capture.replay import replay_fused

# Problems as data: every recurrent variant meets every check.
SETTINGS = []
for cls, layers, bi, bf, proj, bias, nl in itertools.product(
        [nn.RNN, nn.LSTM, nn.GRU], [1, 2], [False, True], [False, True], [0, 3], [True, False], ["tanh", "relu"]):
    if proj and cls is not nn.LSTM:
        continue
    if nl == "relu" and cls is not nn.RNN:
        continue
    kw = dict(num_layers=layers, bidirectional=bi, batch_first=bf, bias=bias)
    if proj:
        kw["proj_size"] = proj
    if cls is nn.RNN:
        kw["nonlinearity"] = nl
    SETTINGS.append(pytest.param(cls, kw, id=f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in kw.items())))

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _tol(dtype, device):
    """The replay tolerance; cuDNN's float32 kernels (TF32 off) differ from the step-by-step replay
    by up to ~3e-5 of the largest entry on these problems (2.6e-5 measured on an H100)."""
    return 1e-4 if device.type == "cuda" and dtype == torch.float32 else TOL[dtype]


def _run(module, inp, hx, forward, packed):
    module.zero_grad()
    torch.manual_seed(1234)  # same dropout draws for both paths
    out, hn = forward(module, inp, hx)
    o = out.data if packed else out
    hs = hn if isinstance(hn, tuple) else (hn,)
    # A loss touching outputs and final states with different weights per position.
    w = torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).reshape(o.shape)
    loss = (w * o).pow(2).sum() + sum(h.pow(3).sum() for h in hs)
    loss.backward()
    return [o.detach()] + [h.detach() for h in hs] + [p.grad.clone() for p in module.parameters()]


def _max_rel(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def _step(m, i, h):
    return replay_fused(m, i, h)


def _fast(m, i, h):
    return replay_fused(m, i, h, on_norms=lambda *a: None)


# The replay's implementations, each held to the fused kernel by the same test: step by step
# (autograd through every step; packed input and tensor hooks use it), the fast path (the fused
# forward, then a hand-written BPTT handing out per-step norms without hooks; dense input only —
# packed input goes step by step) and the fast path's own LSTM forward loop (CPU default from H 128).
IMPLS = {"step": (_step, True), "fast": (_fast, False), "fast-own-loop": (_fast, False)}
CASES = [pytest.param(impl, s.values[0], s.values[1], packed, id=f"{impl}-{s.id}-{'packed' if packed else 'dense'}")
         for impl, (_, packs) in IMPLS.items() for s in SETTINGS for packed in ((False, True) if packs else (False,))
         if impl != "fast-own-loop" or s.values[0] is nn.LSTM]


@pytest.fixture
def replay(request):
    """The implementation named by the test's ``replay`` parameter (indirect), as ``f(m, input, hx)``;
    ``fast-own-loop`` forces the LSTM's own forward loop (:func:`own_lstm_loop` checks it ran)."""
    if request.param == "fast-own-loop":
        request.getfixturevalue("own_lstm_loop")
    return IMPLS[request.param][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("given_h", [False, True], ids=["h0=None", "h0"])
@pytest.mark.parametrize("replay,cls,kw,packed", CASES, indirect=["replay"])
def test_replay_matches_fused(replay, cls, kw, packed, given_h, dtype, device):
    m = cls(4, 5, **kw).to(device, dtype)
    T, B = 7, 3
    D = 2 if kw["bidirectional"] else 1
    shape = (B, T, 4) if kw["batch_first"] else (T, B, 4)
    x = torch.randn(shape, dtype=dtype, device=device)
    hx = None
    if given_h:
        hout = kw.get("proj_size", 0) or 5
        h0 = torch.randn(kw["num_layers"] * D, B, hout, dtype=dtype, device=device)
        hx = (h0, torch.randn(kw["num_layers"] * D, B, 5, dtype=dtype, device=device)) if cls is nn.LSTM else h0
    inp = pack_padded_sequence(x, torch.tensor([7, 3, 5]), batch_first=kw["batch_first"],
                               enforce_sorted=False) if packed else x
    fused = _run(m, inp, hx, lambda m, i, h: type(m).forward(m, i, h), packed)
    replayed = _run(m, inp, hx, replay, packed)
    assert _max_rel(replayed, fused) <= _tol(dtype, device)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("bi", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_replay_dropout_train_mode_draws_the_same_mask(cls, bi, packed):
    # Inter-layer dropout in train mode: the replay calls torch.dropout on the same shapes in the
    # same order as the CPU kernel, so a seeded run gives the same mask and the same result.
    m = cls(4, 6, num_layers=3, dropout=0.5, bidirectional=bi).double().train()
    x = torch.randn(9, 4, 4, dtype=torch.float64)
    inp = pack_padded_sequence(x, torch.tensor([9, 2, 5, 7]), enforce_sorted=False) if packed else x
    fused = _run(m, inp, None, lambda m, i, h: type(m).forward(m, i, h), packed)
    replay = _run(m, inp, None, replay_fused, packed)
    assert _max_rel(replay, fused) <= 1e-10
    # and dropout really acted (eval mode differs)
    m.eval()
    ev = _run(m, inp, None, replay_fused, packed)
    assert _max_rel(ev, fused) > 1e-3


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("bf", [False, True])
def test_replay_unbatched_input(cls, bf, device):
    m = cls(3, 4, num_layers=2, bidirectional=True, batch_first=bf).double().to(device)
    x = torch.randn(6, 3, dtype=torch.float64).to(device)
    fused = _run(m, x, None, lambda m, i, h: type(m).forward(m, i, h), False)
    replay = _run(m, x, None, replay_fused, False)
    assert _max_rel(replay, fused) <= 1e-10


def test_replay_bad_hidden_shape_raises_the_modules_own_error():
    m = nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    bad = (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))
    with pytest.raises(RuntimeError, match="Expected hidden"):
        replay_fused(m, x, bad)


def test_replay_reports_each_state_once_per_step():
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    seen = []
    replay_fused(m, torch.randn(5, 2, 3), None, lambda l, r, t, s: seen.append((l, r, t, len(s))))
    assert sorted(seen) == sorted((l, r, t, 2) for l in range(2) for r in (False, True) for t in range(5))


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_fast_replay_dropout_and_input_gradients(cls):
    m = cls(4, 6, num_layers=3, dropout=0.3, bidirectional=True).double().train()
    x = torch.randn(8, 2, 4, dtype=torch.float64, requires_grad=True)

    def run(f):
        x.grad = None
        torch.manual_seed(7)
        out, _ = f(m, x, None)
        out.pow(2).sum().backward()
        return [out.detach(), x.grad.clone()]

    assert _max_rel(run(_fast), run(lambda m, i, h: type(m).forward(m, i, h))) <= 1e-10


@pytest.mark.parametrize("cls,kw", [(nn.LSTM, {}), (nn.LSTM, {"proj_size": 2}), (nn.GRU, {}),
                                    (nn.RNN, {}), (nn.RNN, {"nonlinearity": "relu"})])
def test_fast_norms_equal_hooked_norms(cls, kw, device):
    # The norms the fast backward hands out equal those of tensor hooks on the autograd replay.
    m = cls(3, 5, num_layers=2, bidirectional=True, **kw).double().to(device)
    x = torch.randn(6, 2, 3, dtype=torch.float64).to(device)
    hooked, fast = {}, {}

    def on_state(layer, rev, t, state):
        for name, s in zip("hc", state if isinstance(state, tuple) else (state,)):
            s.register_hook(lambda g, k=(layer, rev, name, t): hooked.__setitem__(k, g.norm().item()))

    def on_norms(layer, rev, norms):
        for name, v in norms.items():
            for t, n in enumerate(v.tolist()):
                fast[(layer, rev, name, t)] = n

    for f, kwargs in ((replay_fused, {"on_state": on_state}), (replay_fused, {"on_norms": on_norms})):
        out, _ = f(m, x, None, **kwargs)
        (out[-1].pow(2).sum() + out.sum()).backward()
    assert set(hooked) == set(fast)
    for k in hooked:
        assert fast[k] == pytest.approx(hooked[k], rel=1e-10, abs=1e-300)


@pytest.fixture
def own_lstm_loop(monkeypatch, device):
    """Force the LSTM fast path's own forward loop (used on the CPU from H >= 128) at any size;
    yields the list of calls so a test can check the loop really ran."""
    calls = []
    real = bptt._lstm_forward_loop

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(bptt, "LSTM_OWN_LOOP_MIN_HIDDEN", 0)
    monkeypatch.setattr(bptt, "_lstm_forward_loop", spy)
    yield calls
    if device.type == "cpu":
        assert calls, "the own forward loop never ran"


@pytest.fixture
def lstm_path(own_lstm_loop):
    """The LSTM fast replay's other path: its own forward loop (CPU default from H 128); the tests
    above run the default small-H path."""
    return own_lstm_loop


@pytest.mark.parametrize("kw", [{}, {"proj_size": 2}])
def test_fast_lstm_path_norms_equal_hooked_norms(kw, device, lstm_path):
    test_fast_norms_equal_hooked_norms(nn.LSTM, kw, device)


def test_fast_lstm_path_with_dropout_and_input_gradients(lstm_path):
    test_fast_replay_dropout_and_input_gradients(nn.LSTM)


@pytest.mark.parametrize("path", ["python", "own_loop"])
def test_fast_lstm_backward_twice_with_retain_graph(path, request):
    # Saved forward values must survive a backward pass: a second backward through the same graph
    # (retain_graph=True) gives the same gradients, on every LSTM path.
    if path == "own_loop":
        request.getfixturevalue("own_lstm_loop")
    m = nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    out, (hn, cn) = _fast(m, x, None)
    loss = out.pow(2).sum() + cn.sum()
    first = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *m.parameters()])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", [(nn.RNN, {"nonlinearity": "relu"}), (nn.RNN, {}), (nn.LSTM, {}),
                                    (nn.GRU, {}), (nn.LSTM, {"proj_size": 2})],
                         ids=["relu", "tanh", "lstm", "gru", "lstm-proj"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_watched_equals_unwatched_for_non_finite_values(cls, kw, bad):
    """A non-finite input (hence pre-activation) at one step of one sample: the watched model's
    gradients equal PyTorch's own backward, NaN for NaN, in every parameter and in the input."""
    import gradscope

    torch.manual_seed(0)
    m = cls(3, 4, num_layers=2, **kw).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    x[2, 0, 1] = bad
    grads = []
    for watched in (False, True):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        if watched:
            with gradscope.watch(m, every=1, probe_every=None):
                m(xi)[0].sum().backward()
        else:
            m(xi)[0].sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, equal_nan=True, rtol=1e-10, atol=1e-12)
