"""watch() and probe() under activation checkpointing (torch.utils.checkpoint, both kinds).

Checkpointing runs a region's forward again inside the backward pass. Watched training must equal
unwatched training, the recomputation must be no step of its own, and the per-timestep gradients
must be recorded — checked here against an unrolled reference (an autograd graph of explicit cells,
``retain_grad`` on every state), in float64.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope

from conftest import assert_no_hooks
from test_watch import LinearCell, _lstm_cell

T, B, I, H = 6, 2, 3, 4
STEPS = 3
RTOL = 1e-10  # float64 (the replay tests' float64 tolerance)


# ----------------------------------------------------------------------------- references
def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    r_i, z_i, n_i = (x @ w_ih.T + b_ih).chunk(3, dim=-1)
    r_h, z_h, n_h = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
    n = torch.tanh(n_i + r * n_h)
    return (1 - z) * n + z * h


def _rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    return torch.tanh(x @ w_ih.T + b_ih + h @ w_hh.T + b_hh)


def _unrolled_fused_norms(rnn, x, loss_fn):
    """{(layer, reverse, t): (‖∂L/∂h_t‖, ‖∂L/∂c_t‖ or None)} from explicit cells, ``x`` [T, B, I]."""
    D = 2 if rnn.bidirectional else 1
    lstm = isinstance(rnn, nn.LSTM)
    cell = _lstm_cell if lstm else _gru_cell if isinstance(rnn, nn.GRU) else _rnn_cell
    states, layer_in = {}, x
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(rnn, p + sfx) for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h = c = x.new_zeros(x.shape[1], rnn.hidden_size)
            seq = [None] * x.shape[0]
            for t in (range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])):
                if lstm:
                    h, c = cell(layer_in[t], h, c, *w)
                    c.retain_grad()
                else:
                    h = cell(layer_in[t], h, *w)
                h.retain_grad()
                states[(layer, bool(d), t)] = (h, c if lstm else None)
                seq[t] = h
            outs.append(torch.stack(seq))
        layer_in = torch.cat(outs, -1) if D == 2 else outs[0]
    loss_fn(layer_in).backward()
    return {k: (h.grad.norm().item(), None if c is None else c.grad.norm().item())
            for k, (h, c) in states.items()}


# ----------------------------------------------------------------------------- models as data
class FusedCkpt(nn.Module):
    """input projection → checkpoint(fused module) → head; loss on every position."""

    def __init__(self, rnn, reentrant):
        super().__init__()
        self.inp = nn.Linear(I, I)  # the checkpoint's input requires grad (reentrant needs one)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 1)
        self.reentrant = reentrant

    def body(self, u):
        return self.rnn(u)[0]

    def forward(self, x):
        u = self.inp(x)
        out = self.body(u) if self.reentrant is None else checkpoint(self.body, u, use_reentrant=self.reentrant)
        return self.head(out)

    def reference(self, x):
        """Unrolled ∂L/∂h_t per site name and state, for the loss of :func:`_loss`."""
        ref = _unrolled_fused_norms(self.rnn, self.inp(x).detach(), lambda out: _loss(self.head(out)))
        D = 2 if self.rnn.bidirectional else 1
        out = {}
        for layer in range(self.rnn.num_layers):
            for d in range(D):
                site = f"rnn.l{layer}" + ("_reverse" if d else "")
                out[(site, "h")] = [ref[(layer, bool(d), t)][0] for t in range(x.shape[0])]
                if isinstance(self.rnn, nn.LSTM):
                    out[(site, "c")] = [ref[(layer, bool(d), t)][1] for t in range(x.shape[0])]
        return out


class CellCkpt(nn.Module):
    """A user cell loop: checkpointed as a whole (``chunk=None``) or ``chunk`` steps at a time."""

    def __init__(self, cell, lstm, reentrant, chunk=None):
        super().__init__()
        self.inp = nn.Linear(I, I)
        self.cell, self.lstm, self.reentrant, self.chunk = cell, lstm, reentrant, chunk
        self.head = nn.Linear(H, 1)
        self.trace = None  # reference runs: every state, retain_grad on

    def run(self, xs, *state):
        state = state if self.lstm else state[0]
        outs = []
        for t in range(xs.shape[0]):
            state = self.cell(xs[t], state)
            h = state[0] if self.lstm else state
            if self.trace is not None:
                for s in (state if self.lstm else (state,)):
                    s.retain_grad()
                self.trace.append(state)
            outs.append(h)
        return (torch.stack(outs),) + (tuple(state) if self.lstm else (state,))

    def forward(self, x):
        u = self.inp(x)
        state = (u.new_zeros(B, H),) * (2 if self.lstm else 1)
        if self.reentrant is None:
            return self.head(self.run(u, *state)[0])
        step = self.chunk or x.shape[0]
        outs = []
        for t0 in range(0, x.shape[0], step):
            out, *state = checkpoint(self.run, u[t0:t0 + step], *state, use_reentrant=self.reentrant)
            outs.append(out)
        return self.head(torch.cat(outs))

    def reference(self, x):
        plain = copy.deepcopy(self)
        plain.reentrant, plain.trace = None, []
        _loss(plain(x)).backward()
        names = ("h", "c") if self.lstm else ("h",)
        return {("cell", n): [(s[i] if self.lstm else s).grad.norm().item() for s in plain.trace]
                for i, n in enumerate(names)}


def _loss(y):
    return y.pow(2).sum()


def _fused(cls, **kw):
    return lambda r: FusedCkpt(cls(I, H, **kw), r)


PROBLEMS = {
    "lstm": _fused(nn.LSTM),
    "gru": _fused(nn.GRU),
    "rnn": _fused(nn.RNN),
    "lstm-2layer-bidirectional": _fused(nn.LSTM, num_layers=2, bidirectional=True),
    "linear-cell": lambda r: CellCkpt(LinearCell(H, I), False, r),
    "linear-cell-chunks": lambda r: CellCkpt(LinearCell(H, I), False, r, chunk=2),
    "lstmcell-chunks": lambda r: CellCkpt(nn.LSTMCell(I, H), True, r, chunk=4),
}


def _train(model, xs, watch=None):
    """STEPS optimizer steps; per step the parameter gradients (and, watched, the references)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads, refs = [], []
    for x in xs:
        if watch is not None:
            refs.append(model.reference(x))
        opt.zero_grad()
        _loss(model(x)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if watch is not None:  # what a recomputation needs is removed when the backward ends
            assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]
        opt.step()
    return grads, refs


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_checkpointed_training_is_unchanged_and_recorded(problem, reentrant):
    torch.manual_seed(0)
    model = PROBLEMS[problem](reentrant).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64) for _ in range(STEPS)]
    want_grads, _ = _train(plain, xs)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        got_grads, refs = _train(model, xs, watch=scope)
        assert scope.step == STEPS  # recomputations inside backward are no steps
    assert_no_hooks(model)
    for g, w in zip(got_grads, want_grads):  # training unchanged
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    rec = scope.recording
    assert list(rec.steps) == list(range(STEPS))
    assert not rec.notes
    expected_sites = sorted({site for site, _ in refs[0]})
    assert sorted(rec.sites) == expected_sites
    for (site, state), _ in refs[0].items():
        got = rec.grad_norms(site, state)
        assert got.shape == (STEPS, T)
        want = np.array([r[(site, state)] for r in refs])
        assert np.all(want > 0)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-300)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_steps_off_schedule_and_on_schedule_under_checkpointing(reentrant):
    # every=2: recomputations of off-schedule passes run the module's own kernel (as their first
    # forward did); only scheduled steps are rows; the count is one per backward.
    torch.manual_seed(1)
    model = PROBLEMS["lstm"](reentrant).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64) for _ in range(5)]
    want_grads, _ = _train(plain, xs)
    with gradscope.watch(model, every=2, probe_every=None) as scope:
        got_grads, _ = _train(model, xs)
    assert scope.step == 5 and list(scope.recording.steps) == [0, 2, 4]
    assert np.all(scope.recording.grad_norms("rnn.l0") > 0)
    for g, w in zip(got_grads, want_grads):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    assert_no_hooks(model)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_around_the_whole_model_from_the_training_loop(reentrant):
    torch.manual_seed(2)
    model = CellCkpt(LinearCell(H, I), False, None).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64, requires_grad=True) for _ in range(STEPS)]
    refs, got, want = [], [], []
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for x in xs:
            refs.append(model.reference(x))
            model.zero_grad()
            _loss(checkpoint(model, x, use_reentrant=reentrant)).backward()
            got.append([p.grad.clone() for p in model.parameters()])
            plain.zero_grad()
            _loss(plain(x)).backward()
            want.append([p.grad.clone() for p in plain.parameters()])
    assert scope.step == STEPS and list(scope.recording.steps) == list(range(STEPS))
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(scope.recording.grad_norms("cell"), np.array([r[("cell", "h")] for r in refs]),
                               rtol=RTOL)
    assert_no_hooks(model)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_whole_model_checkpointed_off_schedule_steps_are_counted_by_the_sentinel(reentrant):
    # every=2: the step counter's sentinel parameter lies inside the checkpointed region; under
    # reentrant checkpointing its gradient arrives in an inner backward call of the step's own.
    torch.manual_seed(7)
    model = CellCkpt(LinearCell(H, I), False, None).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    with gradscope.watch(model, every=2, probe_every=None) as scope:
        assert scope.passes.sentinel is not None
        for x in xs:
            model.zero_grad()
            _loss(checkpoint(model, x, use_reentrant=reentrant)).backward()
            plain.zero_grad()
            _loss(plain(x)).backward()
            for a, b in zip(model.parameters(), plain.parameters()):
                torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=1e-12)
        assert scope.passes.sentinel is not None  # never had to fall back
    assert scope.step == 5 and list(scope.recording.steps) == [0, 2, 4] and not scope.recording.notes
    assert_no_hooks(model)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("problem", ["lstm", "linear-cell-chunks"])
def test_probe_of_a_checkpointed_model(problem, reentrant):
    torch.manual_seed(3)
    model = PROBLEMS[problem](reentrant).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    ref = model.reference(x)
    rec = gradscope.probe(model, x, loss_fn=_loss)
    assert_no_hooks(model)
    for (site, state), want in ref.items():
        np.testing.assert_allclose(rec.grad_norms(site, state)[0], want, rtol=RTOL)
        assert np.isfinite(rec.measure(site, "jacobian_norms")).all()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_lstmcell_where_it_is_fused_runs_op_by_op_in_the_recomputation_too(reentrant, monkeypatch):
    # On accelerators a scheduled pass runs nn.LSTMCell op by op; its recomputation must do the
    # same (non-reentrant checkpointing compares the saved tensors). Pretend the CPU is such a device.
    from gradscope.capture import cells as cells_mod

    monkeypatch.setattr(cells_mod, "fused_cell_device", lambda device: True)
    torch.manual_seed(4)
    model = PROBLEMS["lstmcell-chunks"](reentrant).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64) for _ in range(STEPS)]
    want_grads, _ = _train(plain, xs)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        got_grads, refs = _train(model, xs, watch=scope)
    assert_no_hooks(model)
    for g, w in zip(got_grads, want_grads):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    for state in ("h", "c"):
        np.testing.assert_allclose(scope.recording.grad_norms("cell", state),
                                   np.array([r[("cell", state)] for r in refs]), rtol=RTOL)


def test_a_fused_module_run_without_gradients_and_never_recomputed_is_noted():
    # What cannot be recorded is said, not left as an empty row: here the fused module runs without
    # gradients inside a forward pass with them and no backward runs it again.
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(I, H)
            self.head = nn.Linear(H, 1)

        def forward(self, x):
            with torch.no_grad():
                out, _ = self.rnn(x)
            return self.head(out)

    model = Frozen()
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for _ in range(2):
            _loss(model(torch.randn(T, B, I))).backward()
    rec = scope.recording
    assert scope.step == 2 and rec.grad_norms("rnn.l0").shape == (2, 0)
    assert any("'rnn.l0' ran without gradients" in n and "checkpoint" in n for n in rec.notes), rec.notes
    assert_no_hooks(model)


class _AttnCkpt(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.reentrant = reentrant

    def forward(self, x):
        u = self.inp(x)
        return self.head(self.layer(u) if self.reentrant is None
                         else checkpoint(self.layer, u, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_attention_block_under_checkpointing_records_what_it_records_without(reentrant):
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    recs, grads = {}, {}
    for r in (None, reentrant):
        torch.manual_seed(5)
        model = _AttnCkpt(r).double()
        with gradscope.watch(model, every=1, probe_every=None) as scope:
            for _ in range(2):
                model.zero_grad()
                _loss(model(x)).backward()
        assert scope.step == 2 and not scope.recording.notes
        assert_no_hooks(model)
        recs[r], grads[r] = scope.recording, [p.grad for p in model.parameters()]
    want, got = recs[None], recs[reentrant]
    assert got.grad_norms("layer").shape == want.grad_norms("layer").shape == (2, 5)
    np.testing.assert_allclose(got.grad_norms("layer"), want.grad_norms("layer"), rtol=RTOL)
    assert set(got.measures()) == set(want.measures())
    for key in want.measures():
        np.testing.assert_allclose(got.measure(*key), want.measure(*key), rtol=1e-9, err_msg=str(key))
    for a, b in zip(grads[reentrant], grads[None]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("problem", ["gru", "lstmcell-chunks"])
def test_default_watch_with_its_probe_under_checkpointing(problem, reentrant):
    # the default schedule: a deep pass and a probe on the first step, plain steps after
    torch.manual_seed(6)
    model = PROBLEMS[problem](reentrant).double()
    plain = copy.deepcopy(model)
    xs = [torch.randn(T, B, I, dtype=torch.float64) for _ in range(3)]
    want_grads, _ = _train(plain, xs)
    with gradscope.watch(model) as scope:
        got_grads, _ = _train(model, xs)
    rec = scope.recording
    site = "rnn.l0" if problem == "gru" else "cell"
    assert scope.step == 3 and list(rec.steps) == [0] and not rec.notes
    assert np.all(rec.grad_norms(site) > 0)
    assert np.isfinite(rec.measure(site, "jacobian_norms")).all()
    for g, w in zip(got_grads, want_grads):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-12)
    assert_no_hooks(model)
