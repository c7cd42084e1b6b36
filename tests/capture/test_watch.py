"""watch(): true per-timestep gradients, safety of the user's run, bad input."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradscope
from gradscope import GradscopeError

from conftest import assert_no_hooks


# ----------------------------------------------------------------------------- models as data
class LinearCell(nn.Module):
    """h_{t+1} = W h_t + U x_t."""

    def __init__(self, n, i, W=None):
        super().__init__()
        dtype = W.dtype if W is not None else None  # no float32 round trip of an exact W
        self.W = nn.Linear(n, n, bias=False, dtype=dtype)
        self.U = nn.Linear(i, n, bias=False, dtype=dtype)
        if W is not None:
            with torch.no_grad():
                self.W.weight.copy_(W)

    def forward(self, x, h):
        return self.W(h) + self.U(x)


class CellLoop(nn.Module):
    """A user loop over a cell; the cell may return a tensor or an (h, c) tuple."""

    def __init__(self, cell, n, lstm=False, readout=None):
        super().__init__()
        self.cell, self.n, self.lstm = cell, n, lstm
        self.readout = readout

    def forward(self, x):
        B = x.shape[1]
        h = x.new_zeros(B, self.n)
        state = (h, x.new_zeros(B, self.n)) if self.lstm else h
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        h = state[0] if self.lstm else state
        return self.readout(h) if self.readout is not None else h


class Seq(nn.Module):
    def __init__(self, rnn, out):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(out, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1] if not self.rnn.batch_first else out[:, -1])


def orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def train_steps(model, x, n=1, loss=lambda y: y.pow(2).mean()):
    for _ in range(n):
        loss(model(x)).backward()


# ----------------------------------------------------------------------------- exact answers
@pytest.mark.parametrize("s", [0.5, 1.0, 1.1])
def test_linear_cell_gradient_norms_are_exact(s, device):
    # L = ½‖h_T‖², ∂L/∂h_t = (W^{T-t})ᵀ h_T, W = s·Q  =>  ‖∂L/∂h_t‖ = s^{T-t} ‖h_T‖.
    N, T = 12, 30
    model = CellLoop(LinearCell(N, 3, s * orthogonal(N)).double(), N).to(device)
    x = torch.randn(T, 4, 3, dtype=torch.float64).to(device)
    with gradscope.watch(model, every=1) as scope:
        for _ in range(2):  # the first pass also discovers the cell; the second is a plain one
            hT = model(x)
            (0.5 * hT.pow(2).sum()).backward()
    rec = scope.recording
    assert rec.sites == ("cell",)
    t = np.arange(1, T + 1)  # column t-1 holds h_t
    want = s ** (T - t) * hT.detach().norm().item()
    for got in rec.grad_norms("cell"):
        np.testing.assert_allclose(got, want, rtol=1e-12)  # the issue asks 1e-6


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """The LSTM cell written out op by op: c_t feeds h_t through its own graph node, so retain_grad
    on c_t sees the total ∂L/∂c_t on every device (CUDA's fused nn.LSTMCell kernel computes h_t
    inside the node that makes c_t, hiding that path from c_t's gradient)."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _unrolled_lstm_norms(lstm, x, loss_fn):
    """Independent reference: an LSTM cell per layer and direction, retain_grad on every state."""
    T, B, _ = x.shape
    D = 2 if lstm.bidirectional else 1
    H = lstm.hidden_size
    states = {}
    layer_in = x
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(lstm, p + sfx).detach().clone().requires_grad_(True)
                 for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h, c = x.new_zeros(B, H), x.new_zeros(B, H)
            seq = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h, c = _lstm_cell(layer_in[t], h, c, *w)
                h.retain_grad(), c.retain_grad()
                states[(layer, d, t)] = (h, c)
                seq[t] = h
            outs.append(torch.stack(seq))
        layer_in = torch.cat(outs, -1) if D == 2 else outs[0]
    loss_fn(layer_in).backward()
    return {k: (h.grad.norm().item(), c.grad.norm().item()) for k, (h, c) in states.items()}


def test_bidirectional_two_layer_lstm_matches_unrolled_cells(device):
    torch.manual_seed(3)
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True).double().to(device)
    x = torch.randn(11, 3, 5, dtype=torch.float64).to(device)
    loss_fn = lambda out: (out[-1].pow(2).sum() + out[0].sum() * 0.3)  # noqa: E731
    ref = _unrolled_lstm_norms(lstm, x, loss_fn)
    with gradscope.watch(lstm, every=1) as scope:
        out, _ = lstm(x)
        loss_fn(out).backward()
    rec = scope.recording
    for layer in range(2):
        for d in range(2):
            site = f"l{layer}" + ("_reverse" if d else "")
            for si, state in enumerate("hc"):
                got = rec.grad_norms(site, state)[0]
                want = np.array([ref[(layer, d, t)][si] for t in range(11)])
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)  # the issue asks 1e-5


# ----------------------------------------------------------------------------- sites
def test_fused_sites_named_by_layer_and_direction(device):
    model = Seq(nn.GRU(3, 4, num_layers=3, bidirectional=True), 8).to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, torch.randn(5, 2, 3).to(device))
    assert scope.recording.sites == ("rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse",
                                     "rnn.l2", "rnn.l2_reverse")
    info = scope.recording.site_info("rnn.l1_reverse")
    assert info["kind"] == "gru" and info["layer"] == 1 and info["direction"] == "reverse"


@pytest.mark.parametrize("cell_cls,lstm", [(nn.RNNCell, False), (nn.GRUCell, False), (nn.LSTMCell, True)])
def test_builtin_cells_are_found(cell_cls, lstm, device):
    model = CellLoop(cell_cls(3, 6), 6, lstm=lstm).to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, torch.randn(9, 2, 3).to(device))
    rec = scope.recording
    assert rec.sites == ("cell",)
    assert rec.states("cell") == (("h", "c") if lstm else ("h",))
    assert rec.grad_norms("cell").shape == (1, 9)
    assert np.all(rec.grad_norms("cell") > 0)


def test_reused_modules_that_are_not_cells_are_ignored(device):
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)  # applied to two unrelated inputs
            self.act = nn.Tanh()

        def forward(self, x):
            a = self.act(self.shared(x[0]))
            b = self.act(self.shared(x[1]))
            return a + b

    model = TwoTowers().to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, torch.randn(2, 3, 4).to(device))
    rec = scope.recording
    assert rec.sites == ()
    assert any("no recurrent" in n for n in rec.notes)
    assert set(rec.param_grad_norms()) == {"shared.weight", "shared.bias"}
    assert np.all(np.isfinite(rec.param_grad_norms()["shared.weight"]))


def test_cell_found_through_dropout_between_calls(device):
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(3, 5)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            h = x.new_zeros(x.shape[1], 5)
            for t in range(x.shape[0]):
                h = self.drop(self.cell(x[t], h))
            return h

    model = Loop().to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, torch.randn(6, 2, 3).to(device))
    assert scope.recording.sites == ("cell",)


def test_sites_selects_and_adds(device):
    model = Seq(nn.LSTM(3, 4, num_layers=2), 4).to(device)
    with gradscope.watch(model, every=1, sites=["rnn.l1", "head"]) as scope:
        train_steps(model, torch.randn(5, 2, 3).to(device))
    rec = scope.recording
    assert rec.sites == ("rnn.l1", "head")
    assert rec.grad_norms("rnn.l1", "c").shape == (1, 5)
    assert rec.grad_norms("head").shape == (1, 1)  # called once: one "time step"


def test_sites_module_name_selects_all_layers():
    model = Seq(nn.LSTM(3, 4, num_layers=2, bidirectional=True), 8)
    with gradscope.watch(model, every=1, sites=["rnn"]) as scope:
        train_steps(model, torch.randn(5, 2, 3))
    assert len(scope.recording.sites) == 4


def test_unknown_site_suggests_the_closest_name():
    model = Seq(nn.LSTM(3, 4, num_layers=2), 4)
    with pytest.raises(GradscopeError, match=r"unknown site 'rnn.l3'.*Did you mean 'rnn.l\d'"):
        gradscope.watch(model, every=1, sites=["rnn.l3"])
    with pytest.raises(GradscopeError, match="Did you mean 'head'"):
        gradscope.watch(model, sites=["haed"])  # the default schedule: the step counter's hook too
    assert_no_hooks(model)


def test_packed_sequence_and_variable_lengths(device):
    lstm = nn.LSTM(3, 4, bidirectional=True, batch_first=True).to(device)
    with gradscope.watch(lstm, every=1) as scope:
        for T in (8, 5):
            x = torch.randn(3, T, 3).to(device)  # the lengths stay on the CPU, as torch requires
            packed = pack_padded_sequence(x, torch.tensor([T, 2, T - 1]), batch_first=True, enforce_sorted=False)
            out, (h, c) = lstm(packed)
            (out.data.pow(2).sum() + h.sum()).backward()
    rec = scope.recording
    g = rec.grad_norms("l0")
    assert g.shape == (2, 8)
    assert list(rec.seq_lens("l0")) == [8, 5]
    assert np.all(np.isfinite(g[0])) and np.all(np.isnan(g[1, 5:])) and np.all(np.isfinite(g[1, :5]))


# ----------------------------------------------------------------------------- schedule and history
def test_every_schedule_and_step_count(device):
    model = Seq(nn.RNN(3, 4), 4).to(device)
    x = torch.randn(5, 2, 3).to(device)
    with gradscope.watch(model, every=3) as scope:
        train_steps(model, x, n=10)
    rec = scope.recording
    assert scope.step == 10
    assert list(rec.steps) == [0, 3, 6, 9]
    assert rec.meta["total_steps"] == 10


def test_history_bounded_by_max_steps_keeps_whole_span():
    model = Seq(nn.RNN(3, 4), 4)
    x = torch.randn(4, 2, 3)
    with gradscope.watch(model, every=1, max_steps=8) as scope:
        train_steps(model, x, n=40)
    steps = scope.recording.steps
    assert len(steps) < 8
    assert steps[0] == 0 and steps[-1] >= 32
    assert np.all(np.diff(steps) == steps[1] - steps[0])  # evenly thinned


def test_gradient_accumulation_counts_each_backward(device):
    model = Seq(nn.LSTM(3, 4), 4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=1) as scope:
        for _ in range(2):
            for micro in range(3):
                model(torch.randn(5, 2, 3).to(device)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert scope.step == 6
    assert len(scope.recording.steps) == 6


def test_two_forwards_one_backward_is_one_step(device):
    model = Seq(nn.GRU(3, 4), 4).to(device)
    with gradscope.watch(model, every=1) as scope:
        a = model(torch.randn(5, 2, 3).to(device))
        b = model(torch.randn(5, 2, 3).to(device))
        (a.sum() + b.sum()).backward()
    assert scope.step == 1
    assert scope.recording.grad_norms("rnn.l0").shape == (1, 5)


@pytest.mark.parametrize("every", [1, 3, 7])
def test_steps_counted_alike_on_and_off_schedule(every):
    # Off-schedule steps are counted lazily (from the backward call that reached each pass). The
    # rule, simulated here: a forward pass is scheduled if the step count at its start is a
    # multiple of `every`; each backward call reaching at least one pass is one step; a step is
    # recorded (under the count before it) if a scheduled pass took part.
    model = Seq(nn.LSTM(3, 4), 4)
    xs = [torch.randn(5, 2, 3) for _ in range(3)]
    count, recorded = 0, []

    def fwd(x):
        return model(x), count % every == 0

    def bwd(*passes):
        nonlocal count
        sum(out.sum() for out, _ in passes).backward()
        if any(sched for _, sched in passes):
            recorded.append(count)
        count += 1

    with gradscope.watch(model, every=every) as scope:
        for _ in range(4):
            bwd(fwd(xs[0]))                                    # 1 step
            a, b = fwd(xs[1]), fwd(xs[2])
            bwd(a, b)                                          # 1 step: one backward, two passes
            a, b = fwd(xs[1]), fwd(xs[2])
            bwd(a)
            bwd(b)                                             # 2 steps: two backward calls
            model(xs[0])                                       # no backward: no step
            out, sched = fwd(xs[0])
            bwd((out * 0, sched))                              # a zero gradient still reaches it
        mid = scope.step
        bwd(fwd(xs[0]))
    assert mid == 20 and count == 21
    assert scope.step == 21
    rec = scope.recording
    assert rec.meta["total_steps"] == 21
    assert list(rec.steps) == recorded
    if every == 1:
        assert recorded == list(range(21))


class TwoBranch(nn.Module):
    """Its first parameter (the step counter's sentinel) feeds only the first output."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(3, 1)
        self.rnn = nn.GRU(3, 4)

    def forward(self, x):
        return self.side(x).squeeze(-1), self.rnn(x)[0]


def test_off_schedule_passes_leave_no_hook_on_the_outputs():
    # Steps are counted by one hook set once on the first parameter; off the schedule the outputs
    # get no hook, except on audit passes (the first off-schedule pass and one in AUDIT_EVERY).
    from gradscope.capture.passes import AUDIT_EVERY
    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=10 ** 6, probe_every=None) as scope:
        hooked = []
        for _ in range(2 * AUDIT_EVERY + 2):
            out = model(x)
            hooked.append(out._backward_hooks is not None and len(out._backward_hooks) > 0)
            out.sum().backward()
        assert scope.passes.sentinel == "rnn.weight_ih_l0"
    assert scope.step == 2 * AUDIT_EVERY + 2
    # pass 0 scheduled; off-schedule passes 1, 2, … audited at 1, 1 + AUDIT_EVERY, …
    assert [i for i, h in enumerate(hooked) if h] == [0, 1, 1 + AUDIT_EVERY, 1 + 2 * AUDIT_EVERY]
    assert not any("counted at the model's outputs" in n for n in scope.recording.notes)


def test_backward_that_skips_the_sentinel_moves_counting_to_the_outputs():
    # The rule (gradscope.capture.passes): backward calls that skip the sentinel go uncounted until
    # an audit or scheduled pass sees one; from then on every backward reaching the outputs counts.
    from gradscope.capture.passes import AUDIT_EVERY
    model = TwoBranch()
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=10 ** 6, probe_every=None) as scope:
        a, b = model(x)
        (a.sum() + b.sum()).backward()                  # step 0, scheduled
        for _ in range(5):                              # off-schedule passes 1-5 (1: audit, passes)
            a, b = model(x)
            (a.sum() + b.sum()).backward()
        assert scope.step == 6 and scope.passes.sentinel == "side.weight"
        for i in range(6, 6 + 2 * AUDIT_EVERY):         # the loss skips the sentinel's branch
            a, b = model(x)
            b.sum().backward()
            if i < 1 + AUDIT_EVERY:
                assert scope.step == 6                  # missed until the next audit pass
        assert scope.passes.sentinel is None
    counted_after = 6 + 2 * AUDIT_EVERY - (1 + AUDIT_EVERY)  # from the audit pass on
    assert scope.step == 6 + counted_after
    assert any("counted at the model's outputs from step 6 on" in n and "'side.weight'" in n
               for n in scope.recording.notes)


def test_a_scheduled_backward_that_skips_the_sentinel_is_still_a_step():
    model = TwoBranch()
    x = torch.randn(5, 2, 3, requires_grad=True)
    with gradscope.watch(model, every=2, probe_every=None) as scope:
        torch.autograd.grad(model(x)[1].sum(), x)       # step 0, scheduled: the parameters untouched
        for _ in range(3):
            model(x)[1].sum().backward()                # steps 1-3
    assert scope.step == 4 and list(scope.recording.steps) == [0, 2]
    assert any("from step 0 on" in n for n in scope.recording.notes)


def test_freezing_the_sentinel_keeps_the_count():
    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=3, probe_every=None) as scope:
        train_steps(model, x, n=4)
        model.rnn.weight_ih_l0.requires_grad_(False)    # e.g. gradual freezing of the first layers
        train_steps(model, x, n=5)
        assert scope.step == 9
        model.rnn.weight_ih_l0.requires_grad_(True)
        train_steps(model, x, n=2)
    assert scope.step == 11 and list(scope.recording.steps) == [0, 3, 6, 9]
    assert any("from step 4 on: the parameter 'rnn.weight_ih_l0' stopped requiring gradients" in n
               for n in scope.recording.notes)


def test_sparse_parameter_gradients_are_normed():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 3, sparse=True)
            self.rnn = nn.GRU(3, 4)

        def forward(self, idx):
            return self.rnn(self.emb(idx))[0]

    model = Tagger()
    idx = torch.tensor([[1, 2], [1, 1], [3, 2]])  # repeated indices: the sparse gradient has duplicates
    with gradscope.watch(model, every=1) as scope:
        model(idx).pow(2).sum().backward()
    got = scope.recording.param_grad_norms()["emb.weight"][0]
    assert got == pytest.approx(model.emb.weight.grad.to_dense().norm().item(), rel=1e-6)


def test_no_grad_forwards_are_ignored():
    model = Seq(nn.LSTM(3, 4), 4)
    with gradscope.watch(model, every=1) as scope:
        with torch.no_grad():
            model(torch.randn(5, 2, 3))
        model.eval()
        with torch.inference_mode():
            model(torch.randn(5, 2, 3))
    assert scope.step == 0 and len(scope.recording) == 0


def test_autocast_bfloat16(device):
    # autocast on the test device: "cpu" or "cuda" (the replay takes its autograd path under both)
    model = Seq(nn.LSTM(3, 8, num_layers=2), 8).to(device)
    with gradscope.watch(model, every=1) as scope:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = model(torch.randn(6, 2, 3).to(device))
        y.float().pow(2).mean().backward()
    g = scope.recording.grad_norms("rnn.l1")
    assert g.shape == (1, 6) and np.all(np.isfinite(g)) and np.all(g > 0)


def test_nonfinite_gradients_become_events_not_exceptions(device):
    model = Seq(nn.RNN(3, 4), 4).to(device)
    with gradscope.watch(model, every=1) as scope:
        y = model(torch.randn(5, 2, 3).to(device))
        (y * float("nan")).sum().backward()
        model.zero_grad()
        train_steps(model, torch.randn(5, 2, 3).to(device))
    rec = scope.recording
    kinds = {(e.get("site"), e.get("param")) for e in rec.events}
    assert ("rnn.l0", None) in kinds
    assert any(e.get("param") == "head.weight" for e in rec.events)
    ev = next(e for e in rec.events if e.get("site") == "rnn.l0")
    assert ev["step"] == 0 and ev["t"] == 4 and ev["kind"] == "nonfinite"
    assert len(rec.steps) == 2


# ----------------------------------------------------------------------------- never harms the run
def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("every,bitwise", [(2, True), (1, False)], ids=["off-schedule", "on-schedule"])
def test_outputs_and_gradients_equal_unwatched(every, bitwise, device):
    # Off schedule the untouched module runs (cuDNN's own kernel on a GPU): bitwise. On schedule the
    # replay recomputes it: equal to the replay tolerance (float32, TF32 off in conftest.py).
    torch.manual_seed(0)
    model = Seq(nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2), 4).to(device)
    xs = [torch.randn(7, 2, 3).to(device) for _ in range(3)]
    ref_out, ref_g = [], []
    for x in xs:
        model.zero_grad()
        y = model(x)
        y.pow(2).sum().backward()
        ref_out.append(y.detach())
        ref_g.append(_grads(model))
    with gradscope.watch(model, every=every) as scope:
        for i, x in enumerate(xs):
            model.zero_grad()
            y = model(x)
            y.pow(2).sum().backward()
            off = i % every != 0
            got = [y.detach()] + _grads(model)
            want = [ref_out[i]] + ref_g[i]
            for a, b in zip(got, want):
                if bitwise and off:
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scope.step == 3


def test_hooks_removed_after_normal_exit_and_close_twice(device):
    model = CellLoop(nn.LSTMCell(3, 4), 4, lstm=True, readout=nn.Linear(4, 1)).to(device)
    model2 = Seq(nn.GRU(3, 4, bidirectional=True), 8).to(device)
    for m in (model, model2):
        scope = gradscope.watch(m, every=1)
        train_steps(m, torch.randn(5, 2, 3).to(device))
        scope.close()
        scope.close()
        assert_no_hooks(m)
        with gradscope.watch(m, every=1):  # a fresh watch is allowed after close
            pass


def test_steps_off_schedule_leave_no_python_hook_on_parameters(device):
    # Parameter hooks live for a scheduled backward only. Removing a handle only empties a
    # parameter's _backward_hooks dict, and torch's wrapper around the dict would still enter
    # Python for every parameter in every later backward: the dict must be gone between steps.
    # One parameter, the step counter's sentinel (the first), keeps one hook for the whole watch.
    model = Seq(nn.LSTM(3, 4), 4).to(device)
    x = torch.randn(5, 2, 3).to(device)

    def hooked():
        return {n: len(p._backward_hooks) for n, p in model.named_parameters() if p._backward_hooks is not None}

    with gradscope.watch(model, every=2) as scope:
        train_steps(model, x, n=3)  # steps 0 and 2 scheduled
        assert hooked() == {"rnn.weight_ih_l0": 1}
        model(x).pow(2).mean().backward()  # step 3, off schedule: no parameter hook fires
        assert hooked() == {"rnn.weight_ih_l0": 1}
        assert scope.step == 4
    assert hooked() == {}
    assert len(scope.recording) == 2


def test_a_users_parameter_hook_survives_the_watch(device):
    model = Seq(nn.GRU(3, 4), 4).to(device)
    seen = []
    handle = model.head.weight.register_hook(lambda g: seen.append(g.norm().item()))
    x = torch.randn(5, 2, 3).to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, x, n=2)
    train_steps(model, x, n=1)
    assert len(seen) == 3 and len(model.head.weight._backward_hooks) == 1
    rec = scope.recording.param_grad_norms()["head.weight"]
    np.testing.assert_allclose(rec, seen[:2], rtol=1e-6)
    handle.remove()


def test_hooks_removed_after_exception_in_block(device):
    model = Seq(nn.LSTM(3, 4), 4).to(device)
    x = torch.randn(5, 2, 3).to(device)
    with pytest.raises(ZeroDivisionError):
        with gradscope.watch(model, every=1):
            y = model(x)  # graph with state hooks pending
            1 / 0
    assert_no_hooks(model)
    y.sum().backward()  # the pending graph can still be used and nothing fires


def test_hooks_removed_when_exception_in_backward_region(device):
    model = CellLoop(nn.GRUCell(3, 4), 4).to(device)
    with pytest.raises(RuntimeError):
        with gradscope.watch(model, every=1):
            y = model(torch.randn(5, 2, 3).to(device))
            y.backward()  # non-scalar: torch raises
    assert_no_hooks(model)


def test_model_without_sites_records_parameter_norms(device):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).to(device)
    with gradscope.watch(model, every=1) as scope:
        train_steps(model, torch.randn(8, 3).to(device), n=2)
    rec = scope.recording
    assert rec.sites == ()
    assert any("no recurrent" in n for n in rec.notes)
    norms = rec.param_grad_norms()
    assert set(norms) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    np.testing.assert_allclose(norms["2.bias"][-1], model[2].bias.grad.norm().item() / 2, rtol=1e-6)


def test_parameter_norms_are_this_steps_gradient_not_the_accumulated_one(device):
    model = Seq(nn.RNN(3, 4), 4).to(device)
    x = torch.randn(5, 2, 3).to(device)
    with gradscope.watch(model, every=1) as scope:
        model(x).sum().backward()
        g1 = model.head.weight.grad.norm().item()
        model(x).sum().backward()  # no zero_grad: .grad holds twice the gradient
    np.testing.assert_allclose(scope.recording.param_grad_norms()["head.weight"], [g1, g1], rtol=1e-6)


def test_memory_of_pending_forwards_is_bounded():
    model = Seq(nn.LSTM(3, 4), 4)
    with gradscope.watch(model, every=1) as scope:
        for _ in range(40):  # grad-enabled forwards never followed by backward
            model(torch.randn(5, 2, 3))
        assert len(scope.passes.pending) <= 16


# ----------------------------------------------------------------------------- bad input
def test_watch_rejects_non_modules():
    with pytest.raises(GradscopeError, match="instantiate it first"):
        gradscope.watch(nn.LSTM, every=1)
    with pytest.raises(GradscopeError, match="expects a torch.nn.Module, got Tensor"):
        gradscope.watch(torch.randn(3), every=1)
    with pytest.raises(GradscopeError, match="expects a torch.nn.Module, got dict"):
        gradscope.watch({"weight": torch.randn(3)}, every=1)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_watch_rejects_bad_every(every):
    with pytest.raises(GradscopeError, match="every must be a positive integer"):
        gradscope.watch(nn.LSTM(2, 3), every=every)


def test_second_watch_is_refused_with_how_to_close():
    model = Seq(nn.LSTM(3, 4), 4)
    with gradscope.watch(model, every=1):
        with pytest.raises(GradscopeError, match=r"already watched.*scope.close\(\)"):
            gradscope.watch(model, every=1)
        with pytest.raises(GradscopeError, match="submodule Seq is already watched"):
            gradscope.watch(nn.Sequential(model), every=1)
        with pytest.raises(GradscopeError, match="this model is already watched"):
            gradscope.watch(model.rnn, every=1)
    assert_no_hooks(model)


def test_unsupported_modules_are_reported():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)

    model = nn.Sequential()
    model.add_module("odd", MyLSTM(3, 4))
    with gradscope.watch(model, every=1) as scope:
        out, _ = model(torch.randn(5, 2, 3))
        out.sum().backward()
    rec = scope.recording
    assert rec.unsupported and rec.unsupported[0]["module"] == "odd"
    assert "overrides forward" in rec.unsupported[0]["reason"]


def test_probe_every_measures_on_scheduled_training_batches(device):
    model = Seq(nn.LSTM(3, 6), 6).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(12, 2, 3).to(device)

    with gradscope.watch(model, every=2, probe_every=3, probe_options={"k": 2}) as scope:
        for i in range(7):
            y = model(x)
            y.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    rec = scope.recording
    assert list(rec.measure("rnn.l0", "probe_steps")) == [0, 3, 6]
    assert rec.jacobian_norms("rnn.l0").shape == (2, 13)
    assert rec.lyapunov("rnn.l0").shape == (2, 2)
    assert rec.site_measures("rnn.l0")["probe_step"] == 6
    assert rec.measure("rnn.l0", "probe_lambda1").shape == (3,)
    assert list(rec.steps) == [0, 2, 4, 6]  # the history keeps the every=2 schedule; probe 3 is no row
    diag = gradscope.diagnose(rec)
    assert "jacobian_norms" in diag.site_summary("rnn.l0")["evidence_used"]


def test_probe_every_does_not_change_results(device):
    torch.manual_seed(0)
    model = CellLoop(nn.GRUCell(3, 5), 5, readout=nn.Linear(5, 1)).double().to(device)
    x = torch.randn(8, 2, 3, dtype=torch.float64).to(device)
    y0 = model(x)
    y0.sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with gradscope.watch(model, every=1, probe_every=1):
        y1 = model(x)
        y1.sum().backward()
    assert torch.equal(y0, y1)
    for a, p in zip(g0, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=0)


def test_bad_probe_options():
    with pytest.raises(GradscopeError, match="unknown probe option\\(s\\) \\['kk'\\]"):
        gradscope.watch(nn.LSTM(2, 3), every=1, probe_every=2, probe_options={"kk": 1})
    with pytest.raises(GradscopeError, match="probe_every must be a positive integer"):
        gradscope.watch(nn.LSTM(2, 3), every=1, probe_every=0)


# Dynamo's own tracing emits UserWarning/DeprecationWarning from torch internals (not gradscope's).
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("order", ["compile-then-watch", "watch-then-compile"])
def test_torch_compile_records_what_eager_records(backend, order):
    # Dynamo breaks the graph at gradscope's hooks and runs them eagerly: the recording of a
    # compiled model equals the eager one (checked by hand with the inductor backend too).
    torch.manual_seed(0)
    model = Seq(nn.LSTM(3, 4, num_layers=2), 4)
    x = torch.randn(6, 2, 3)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        model(x).sum().backward()
    ref = scope.recording
    model.zero_grad()
    torch._dynamo.reset()
    if order == "compile-then-watch":
        compiled = torch.compile(model, backend=backend)
        scope = gradscope.watch(compiled, every=1, probe_every=None)
    else:
        scope = gradscope.watch(model, every=1, probe_every=None)
        compiled = torch.compile(model, backend=backend)
    with scope:
        compiled(x).sum().backward()
    rec = scope.recording
    assert rec.sites == ref.sites == ("rnn.l0", "rnn.l1")  # no "_orig_mod." prefix
    for site in rec.sites:
        for state in ("h", "c"):
            np.testing.assert_allclose(rec.grad_norms(site, state), ref.grad_norms(site, state), rtol=1e-6)
    assert set(rec.param_grad_norms()) == set(ref.param_grad_norms())
    assert_no_hooks(model)


def test_history_thinning_keeps_rows_exact_with_varying_lengths(device):
    torch.manual_seed(0)
    rnn = nn.GRU(2, 3).to(device)
    lengths = [6, 3, 5, 2, 6, 4, 3, 6, 2, 5, 4, 3]
    with gradscope.watch(rnn, every=1, max_steps=4) as scope:
        for T in lengths:
            out, _ = rnn(torch.randn(T, 2, 2).to(device))
            out.pow(2).sum().backward()
    rec = scope.recording
    g, lens = rec.grad_norms("l0"), rec.seq_lens("l0")
    assert len(rec) < 4
    for step, row, n in zip(rec.steps, g, lens):
        assert n == lengths[step]
        assert np.all(np.isfinite(row[:n])) and np.all(row[:n] > 0) and np.all(np.isnan(row[n:]))


@pytest.mark.parametrize("batched, given", [(True, True), (True, False), (False, True), (False, False)])
def test_op_by_op_lstm_cell_equals_nn_lstmcell(batched, given):
    # what the watch runs for nn.LSTMCell on scheduled accelerator passes (there the fused cell
    # would hide the path c_t -> h_t from a hook on c_t)
    from gradscope.capture.recurrent import lstm_cell_ops

    cell = nn.LSTMCell(3, 5).double()
    x = torch.randn(4, 3, dtype=torch.float64) if batched else torch.randn(3, dtype=torch.float64)
    shape = (4, 5) if batched else (5,)
    hx = (torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)) if given else None
    want = cell(x, hx)
    got = lstm_cell_ops(cell, x, hx)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lstmcell_runs_op_by_op_on_scheduled_passes_where_the_cell_is_fused(monkeypatch):
    # On accelerators nn.LSTMCell is fused and hides c_t -> h_t from a hook on c_t; there the watch
    # swaps in the op-by-op cell for scheduled passes only. Pretend the CPU is such a device.
    from gradscope.capture import cells as cells_mod

    model = CellLoop(nn.LSTMCell(3, 4), 4, lstm=True).double()
    plain = CellLoop(nn.LSTMCell(3, 4), 4, lstm=True).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with gradscope.watch(plain, every=2) as ref:  # the reference: the module's own cell
        for step in range(3):
            plain(x).pow(2).sum().backward()
    calls = []
    real = cells_mod.lstm_cell_ops
    monkeypatch.setattr(cells_mod, "fused_cell_device", lambda device: True)
    monkeypatch.setattr(cells_mod, "lstm_cell_ops", lambda *a: calls.append(1) or real(*a))
    with gradscope.watch(model, every=2) as scope:
        for step in range(3):
            before = len(calls)
            out = model(x)
            assert "forward" not in model.cell.__dict__  # removed again at the end of the pass
            out.pow(2).sum().backward()
            assert len(calls) - before == (6 if step % 2 == 0 else 0)  # scheduled passes only
    assert_no_hooks(model)
    for state in ("h", "c"):
        np.testing.assert_allclose(scope.recording.grad_norms("cell", state),
                                   ref.recording.grad_norms("cell", state), rtol=1e-12)
    for (n, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_state_gradients_are_normed_in_chunks_during_backward(monkeypatch):
    # long sequences must not keep every state gradient alive until the end of the backward pass
    from gradscope.capture import watch as watch_mod
    from gradscope.capture.collector import Collector

    model = CellLoop(nn.LSTMCell(3, 4), 4, lstm=True).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    with gradscope.watch(model, every=1) as ref:
        model(x).pow(2).sum().backward()
    monkeypatch.setattr(watch_mod, "NORM_CHUNK", 3)
    held = []   # gradients waiting to be normed, after each one a state hook hands over
    real = Collector.add_gradient
    monkeypatch.setattr(Collector, "add_gradient", lambda c, k, g: [real(c, k, g), held.append(len(c.kept))] and None)
    with gradscope.watch(model, every=1) as scope:
        model(x).pow(2).sum().backward()
    assert held and max(held) < 3
    for state in ("h", "c"):
        np.testing.assert_allclose(scope.recording.grad_norms("cell", state),
                                   ref.recording.grad_norms("cell", state), rtol=1e-14)


# ----------------------------------------------------------------------------- per-pass cell wrappers
def _cell_norms(model, x, **kw):
    with gradscope.watch(model, **{"every": 1, **kw}) as scope:
        for _ in range(2):
            model.zero_grad()
            model(x).pow(2).sum().backward()
    return scope.recording.grad_norms("cell")


def test_cell_with_its_own_forward_hook_is_recorded_through_a_hook():
    # A user hook may change the cell's output; the state recorded is then the one the loop uses.
    torch.manual_seed(2)
    model = CellLoop(nn.RNNCell(3, 4), 4)
    x = torch.randn(6, 2, 3)
    plain = _cell_norms(model, x)
    model.cell.register_forward_hook(lambda m, a, out: out * 0.5)
    halved = _cell_norms(model, x)
    assert halved.shape == plain.shape == (2, 6)
    assert not np.allclose(halved, plain)
    # the reference: total gradient of the hooked output, by retain_grad
    states = []
    model.cell.register_forward_hook(lambda m, a, out: (out.retain_grad(), states.append(out))[0])
    model.zero_grad()
    model(x).pow(2).sum().backward()
    np.testing.assert_allclose(halved[-1], [s.grad.norm().item() for s in states], rtol=1e-6)


def test_cell_wrapper_restores_a_user_instance_forward():
    torch.manual_seed(2)
    model = CellLoop(nn.RNNCell(3, 4), 4)
    calls = []
    own = model.cell.forward

    def user_forward(*a, **k):
        calls.append(1)
        return own(*a, **k)

    model.cell.forward = user_forward
    x = torch.randn(5, 2, 3)
    norms = _cell_norms(model, x)
    assert norms.shape == (2, 5) and np.isfinite(norms).all()
    assert model.cell.__dict__["forward"] is user_forward  # restored after every pass and on exit
    assert len(calls) == 10


def test_forward_that_raises_in_a_scheduled_pass_leaves_no_cell_wrapper_active():
    torch.manual_seed(2)
    model = CellLoop(nn.RNNCell(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()                     # step 0: discovers the cell
        model(x).sum().backward()                     # step 1: off schedule
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7))               # step 2 (scheduled) fails inside the cell
        model(x).sum().backward()                     # still step 2, scheduled
        model(x).sum().backward()                     # step 3: off schedule, records nothing
    assert "forward" not in model.cell.__dict__
    rec = scope.recording
    assert list(rec.steps) == [0, 2]
    g = rec.grad_norms("cell")
    np.testing.assert_allclose(g[1], g[0], rtol=1e-6)  # same batch and weights: same norms, none doubled


def test_cell_with_its_own_hook_after_a_failed_scheduled_pass_is_not_recorded_twice():
    torch.manual_seed(2)
    model = CellLoop(nn.RNNCell(3, 4), 4)
    model.cell.register_forward_pre_hook(lambda m, a: None)  # takes the forward-hook path
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=1) as scope:
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7))
        model(x).sum().backward()
    g = scope.recording.grad_norms("cell")
    np.testing.assert_allclose(g[1], g[0], rtol=1e-6)
    assert not model.cell._forward_hooks


def test_failed_discovery_pass_does_not_log_calls_twice():
    torch.manual_seed(2)
    model = CellLoop(nn.RNNCell(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=1) as scope:
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7))
        model(x).sum().backward()
        model(x).sum().backward()
    g = scope.recording.grad_norms("cell")
    assert g.shape == (2, 5)
    np.testing.assert_allclose(g[1], g[0], rtol=1e-6)


def test_copies_of_a_watched_model_run_unwatched_with_their_own_weights():
    # `best = copy.deepcopy(model)` mid-run must not copy the watch.
    import copy
    import pickle

    from gradscope.capture._forwards import noop_hook

    torch.manual_seed(3)
    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(h is noop_hook for h in (*twin._forward_hooks.values(), *twin._forward_pre_hooks.values()))
            with torch.no_grad():
                for p in twin.parameters():
                    p.mul_(0.5)
            ref = Seq(nn.LSTM(3, 4), 4)
            ref.load_state_dict(twin.state_dict())
            torch.testing.assert_close(twin(x), ref(x))
            twin(x).sum().backward()
        assert scope.step == 1
    assert list(scope.recording.steps) == [0]
    assert_no_hooks(model)


def test_a_finite_gradient_whose_float32_norm_overflows_is_not_nonfinite():
    """tanh RNN, orthogonal gain 3, T 200: the gradient reaching early states has entries ~1e25,
    finite, but its float32 sum of squares overflows. No 'nonfinite' event, a finite norm."""
    torch.manual_seed(0)
    rnn = nn.RNN(4, 32, batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0, gain=3.0)
        rnn.weight_ih_l0.mul_(1e-6)    # states stay small: tanh nearly linear, growth 3× per step
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    x = torch.randn(8, 200, 4)
    with gradscope.watch(rnn, every=1) as scope:
        out, _ = rnn(x)
        out[:, -1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in rnn.parameters())
    g = scope.recording.grad_norms("l0")
    assert np.isfinite(g).all() and g.max() > 1e19
    assert not [e for e in scope.recording.events if e.get("kind") == "nonfinite"]
    assert not [f for f in scope.diagnose().findings if f.kind == "nonfinite"]


def test_a_real_inf_in_the_gradient_is_still_reported():
    rnn = nn.RNN(4, 8, batch_first=True)
    x = torch.randn(2, 10, 4)
    with gradscope.watch(rnn, every=1) as scope:
        out, _ = rnn(x)
        (out[:, -1].sum() * float("inf")).backward()
    events = [e for e in scope.recording.events if e.get("kind") == "nonfinite"]
    assert events
    assert [f for f in scope.diagnose().findings if f.kind == "nonfinite" and f.severity == "critical"]


# ----------------------------------------------------------------------------- step counting
# (once also run under the compiled root tap; the pure-Python path is now the only one)
class _Ckpt(nn.Module):
    """An LSTM run under reentrant activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        out = checkpoint(lambda t: self.rnn(t)[0], x, use_reentrant=True)
        return self.head(out)


@pytest.mark.parametrize("every", [1, 2])
def test_reentrant_checkpointing_counts_one_step_per_backward(every):
    torch.manual_seed(3)
    model = _Ckpt()
    x = torch.randn(6, 2, 3, requires_grad=True)
    with gradscope.watch(model, every=every, probe_every=None) as scope:
        for _ in range(5):
            model(x).pow(2).sum().backward()
    assert scope.step == 5
    assert list(scope.recording.steps) == list(range(0, 5, every))


def test_outputs_of_any_structure_and_no_grad_passes_count_right():
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
    assert scope.step == 7 and list(scope.recording.steps) == [0, 3, 6]


def test_forward_that_raises_off_schedule_counts_nothing():
    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()                     # step 0
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7))               # off schedule (step 1)
        model(x).sum().backward()                     # step 1
        model(x).sum().backward()                     # step 2 (scheduled)
    assert scope.step == 3 and list(scope.recording.steps) == [0, 2]


def test_one_backward_over_an_off_schedule_and_a_scheduled_pass_is_one_step():
    # A pass kept from an off-schedule step and a scheduled pass consumed by one backward call:
    # one step (recorded), and the older pass is not counted again later.
    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=2) as scope:
        model(x).sum().backward()          # step 0 (scheduled)
        a = model(x)                       # step 1, off schedule, kept
        model(x).sum().backward()          # step 1
        c = model(x)                       # step 2, scheduled
        (a.sum() + c.sum()).backward()     # step 2: reaches both passes
        assert scope.step == 3
        model(x).sum().backward()          # step 3
        model(x).sum().backward()          # step 4
    assert scope.step == 5 and list(scope.recording.steps) == [0, 2, 4]


def test_scheduled_pass_that_raises_leaves_nothing_for_later_steps():
    # A scheduled forward raises; an older pass's backward then moves the count on, so the next
    # forward runs off schedule: nothing of the failed pass (per-pass forwards, parameter hooks)
    # may record into a later step. Same batch and weights throughout: step 4 equals step 0.
    torch.manual_seed(4)
    model = Seq(nn.LSTM(3, 4), 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradscope.watch(model, every=2, probe_every=None) as scope:
        model(x).sum().backward()                           # step 0 (scheduled)
        a = model(x)                                        # a step-1 pass, kept
        model(x).sum().backward()                           # step 1
        with pytest.raises(RuntimeError, match="input_size"):
            model(torch.randn(5, 2, 7, dtype=torch.float64))  # step 2 (scheduled) fails
        a.sum().backward()                                  # step 2 (off-schedule pass)
        model(x).sum().backward()                           # step 3
        model(x).sum().backward()                           # step 4 (scheduled)
    rec = scope.recording
    assert list(rec.steps) == [0, 4]
    for state in ("h", "c"):
        np.testing.assert_allclose(rec.grad_norms("rnn.l0", state)[1], rec.grad_norms("rnn.l0", state)[0], rtol=1e-10)
    for name, v in rec.param_grad_norms().items():
        assert v[1] == pytest.approx(v[0], rel=1e-10), name


def test_user_forward_hook_on_the_watched_model_still_applies():
    torch.manual_seed(5)
    model = Seq(nn.LSTM(3, 4), 4).double()
    model.register_forward_hook(lambda m, a, out: out * 2)  # changes what the loss sees
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    outs = []
    with gradscope.watch(model, every=2) as scope:
        for _ in range(5):
            y = model(x)
            outs.append(y.detach())
            y.pow(2).sum().backward()
    torch.manual_seed(5)
    plain = Seq(nn.LSTM(3, 4), 4).double()  # same weights and batch, unwatched, no hook
    assert scope.step == 5 and list(scope.recording.steps) == [0, 2, 4]
    for y in outs:  # no optimizer step: every output is the plain one, doubled by the hook
        torch.testing.assert_close(y, plain(x).detach() * 2, rtol=1e-12, atol=1e-15)


def test_forwards_gradscope_installs_keep_the_module_signature():
    # Libraries read inspect.signature(model.forward) to route arguments (e.g. Hugging Face).
    import inspect

    class Named(Seq):
        def forward(self, x, scale: float = 1.0, *, extra=None):
            return super().forward(x) * scale

    model = Named(nn.LSTM(3, 4), 4)
    bare = nn.LSTM(3, 4)
    want_model, want_bare = inspect.signature(model.forward), inspect.signature(bare.forward)
    x = torch.randn(5, 2, 3)
    with gradscope.watch(model, every=1) as scope, gradscope.watch(bare, every=1) as scope_bare:
        model(x, scale=2.0).sum().backward()
        bare(x)[0].sum().backward()
        assert inspect.signature(model.forward) == want_model
        assert inspect.signature(bare.forward) == want_bare
    assert scope.step == scope_bare.step == 1


def test_no_code_is_compiled_and_no_c_type_replaces_a_forward():
    import gradscope.capture as capture
    import pkgutil

    names = {m.name for m in pkgutil.iter_modules(capture.__path__)}
    assert "kernels" not in names
    model = Seq(nn.LSTM(3, 4), 4)
    with gradscope.watch(model, every=2):
        for _ in range(3):
            model(torch.randn(5, 2, 3)).sum().backward()
        fwd = model.__dict__.get("forward")
        assert fwd is None or type(fwd).__module__.startswith("gradscope")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_setup_interrupted_after_hooks_are_registered_leaves_the_model_untouched(exc, monkeypatch):
    from conftest import assert_no_hooks
    from gradscope.capture.cells import Cells

    model = Seq(nn.LSTM(3, 4), 4)

    def boom(self, m, name):
        raise exc("interrupted during setup")

    monkeypatch.setattr(Cells, "patch_fused", boom)   # runs after the root hooks are registered
    with pytest.raises(exc, match="interrupted during setup"):
        gradscope.watch(model)
    assert_no_hooks(model)
    monkeypatch.undo()
    with gradscope.watch(model, every=1) as scope:   # not refused as "already watched"
        model(torch.randn(5, 2, 3)).sum().backward()
    assert scope.step == 1


# ----------------------------------------------------------------------------- live alerts
def test_on_event_gets_the_first_nonfinite_value_with_step_site_and_position():
    model = Seq(nn.LSTM(3, 4), 4)
    seen = []
    x = torch.randn(6, 2, 3)
    with gradscope.watch(model, every=1, probe_every=None, on_event=seen.append) as scope:
        model(x).sum().backward()                       # step 0: finite
        assert not seen
        bad = x.clone()
        bad[2, 0, 1] = float("nan")
        model(bad).sum().backward()                     # step 1: NaN from position 2 on
        model(bad).sum().backward()                     # step 2: the same site again, no new event
    sites = [e for e in seen if e.get("site") == "rnn.l0"]
    assert sites and sites[0]["kind"] == "nonfinite" and sites[0]["step"] == 1
    # ∂L/∂h_5 is the loss's direct term (finite); position 4 is the first the backward pass reaches
    # through a NaN step
    assert sites[0]["t"] == 4 and sites[0]["value"] == "nan"
    assert len({(e.get("site"), e.get("state"), e.get("param")) for e in seen}) == len(seen)
    assert all(e["step"] == 1 for e in seen)
    assert scope.step == 3


def test_raise_on_nonfinite_raises_from_backward_and_leaves_nothing_behind():
    from conftest import assert_no_hooks
    from gradscope.errors import GradscopeAlert

    model = Seq(nn.LSTM(3, 4), 4)
    x = torch.randn(6, 2, 3)
    x[3, 1, 0] = float("inf")
    with pytest.raises(GradscopeAlert, match=r"gradient at .* in training step 0") as info:
        with gradscope.watch(model, every=1, probe_every=None, raise_on=("nonfinite",)) as scope:
            model(x).sum().backward()
    assert info.value.event["kind"] == "nonfinite" and info.value.event["step"] == 0
    assert len(scope.recording) == 1                    # the step was recorded before the alert
    assert_no_hooks(model)


def test_raise_on_critical_finding_after_a_probe():
    from gradscope.errors import GradscopeAlert

    rnn = nn.RNN(2, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.05)                      # vanishing fast: horizon ≪ T, critical
    events = []
    with pytest.raises(GradscopeAlert, match="critical vanishing finding") as info:
        with gradscope.watch(rnn, on_event=events.append, raise_on=("critical",)):
            rnn(torch.randn(80, 2, 2))[0].sum().backward()
    assert info.value.event["finding"] == "vanishing" and info.value.event["site"] == "l0"
    assert events and events[0]["kind"] == "critical"


@pytest.mark.parametrize("kw,match", [({"on_event": 3}, "on_event must be a callable"),
                                      ({"raise_on": "nonfinite"}, r"write raise_on=\('nonfinite',\)"),
                                      ({"raise_on": ("nonfinit",)}, "unknown event kind.*Did you mean 'nonfinite'")])
def test_alert_options_are_checked(kw, match):
    with pytest.raises(GradscopeError, match=match):
        gradscope.watch(nn.RNN(2, 3), **kw)


# ----------------------------------------------------------------------------- TorchScript
# torch 2.13 deprecates torch.jit.script; models built with it are still what users bring.
pytestmark_script = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class _WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.jit.script(nn.Sequential(nn.Linear(3, 8), nn.Tanh()))
        self.rnn = nn.GRU(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(self.enc(x))[0])


@pytestmark_script
def test_a_scripted_submodule_runs_unwatched_and_is_reported():
    from conftest import assert_no_hooks

    torch.manual_seed(0)
    model = _WithScripted()
    x = torch.randn(5, 2, 3)
    plain = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    with gradscope.watch(model, every=1) as scope:
        watched = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    for a, b in zip(plain, watched):
        torch.testing.assert_close(a, b)
    rec = scope.recording
    assert rec.sites == ("rnn.l0",) and rec.grad_norms("rnn.l0").shape == (1, 5)
    assert [u["module"] for u in rec.unsupported] == ["enc"]          # once, at the scripted module
    assert any("enc (RecursiveScriptModule) is not measured: TorchScript" in n
               for n in gradscope.diagnose(rec).notes)
    assert gradscope.probe(model, x).sites == ("rnn.l0",)
    assert_no_hooks(model.rnn)


@pytestmark_script
def test_a_scriptmodule_as_the_watched_model_is_a_clear_error():
    scripted = torch.jit.script(nn.GRU(3, 4))
    with pytest.raises(GradscopeError, match="TorchScript module.*Watch \\(or probe\\) the Python module"):
        gradscope.watch(scripted)
    with pytest.raises(GradscopeError, match="TorchScript module"):
        gradscope.probe(scripted, torch.randn(5, 2, 3))


# Dynamo itself reads .grad of a non-leaf while re-tracing the second call (also unwatched, with
# warnings as errors); not gradscope's warning
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
# torch 2.11's torch._dynamo.reset() imports inductor, whose torch.utils.mkldnn uses the deprecated
# torch.jit.script_method (seen on the H200's torch 2.11.0+cu130): torch's warning, not gradscope's
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_default_probe_of_a_compiled_model_runs_eagerly():
    # Dynamo must not trace gradscope's own work (the probe's estimators took minutes to trace and
    # warned for every builtin they met); filterwarnings=error turns any such warning into a failure
    torch.manual_seed(0)
    model = Seq(nn.LSTM(3, 4, num_layers=2), 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(6, 2, 3)
    with gradscope.watch(compiled) as scope:
        for _ in range(2):
            compiled(x).sum().backward()
    sched = scope.recording.meta["schedule"]
    assert sched["probes"] == 1 and scope.step == 2
    assert "jacobian_norms" in scope.diagnose().site_summary("rnn.l0")["evidence_used"]
