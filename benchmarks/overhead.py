"""Overhead of watch(): a plain training step vs the same step under watch, interleaved in one run.

Two identical copies of each model train on the same batches; one is watched for the whole run.
Steps alternate (plain, watched, plain, …) so drifts of a shared machine hit both alike. Ratios:
median over steps for every=1; for every=50 the *mean* (the scheduled step is amortised over the
other 49, which the median would hide). Writes the "overhead" section of benchmarks/RESULTS.md.

Run: python benchmarks/overhead.py [--quick] [--device cuda]   (CUDA rows go to "overhead-cuda")
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import (OVERHEAD_HEAD, bench_args, interleaved_times, machine_for, overhead_row,  # noqa: E402
                      watched_copy, write_section)


class FusedModel(nn.Module):
    def __init__(self, cls, inp, hidden):
        super().__init__()
        self.rnn = cls(inp, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


class CellModel(nn.Module):
    """The same network written as a user loop over nn.LSTMCell."""

    def __init__(self, inp, hidden):
        super().__init__()
        self.cell = nn.LSTMCell(inp, hidden)
        self.head = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.hidden)
        c = torch.zeros_like(h)
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return self.head(torch.stack(outs)).squeeze(-1)


def timed_steps(make, size, every, steps, warmup=3, device="cpu"):
    """Interleaved per-step times (seconds) of the plain and the watched copy."""
    T, B, I, H = size
    torch.manual_seed(0)
    plain = make(I, H).to(device)
    watched = watched_copy(plain)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (plain, watched)]
    opt_of = {id(plain): opts[0], id(watched): opts[1]}
    xs = [torch.randn(T, B, I, device=device) for _ in range(4)]
    ys = [torch.randn(T, B, device=device) for _ in range(4)]

    def step(model, i):
        opt = opt_of[id(model)]
        opt.zero_grad()
        loss = (model(xs[i % 4]) - ys[i % 4]).pow(2).mean()
        loss.backward()
        opt.step()

    return interleaved_times(plain, watched, step, every=every, steps=steps, warmup=warmup, device=device)


NOTES = """How the rows are timed: each row runs two halves, the watched and the plain instance swapping
roles halfway, and within a half the two alternate in ABBA order (two identical unwatched copies
differ by a few percent of a step, and the step that runs right after the other model's backward
pays a penalty of its own). Timings on this shared 2-core machine vary by ±5–10% between runs.

Rows: *default* is `watch(model)` — the overhead budget (3%) spacing deep passes and probes by
their measured cost (its realised overhead and the passes it ran are in the last columns of the
table below); *every=1* records every step (the cost of one deep pass, with no probe);
*off schedule* is every step unrecorded after the first (`every` = the run's length, no probes):
the cost of the root hooks and the step counter alone.

The LSTM replay. A scheduled step of a fused `nn.LSTM` back-propagates with a hand-written BPTT
loop in plain PyTorch (one `[B, 4H] @ [4H, H]` product and the cell arithmetic per step) that
yields the total ∂L/∂h_t and ∂L/∂c_t; weight gradients are then a few large products. No code is
compiled at run time (an earlier C++ extension, removed, bought every=1 on the small LSTM 1.6 →
1.2× and nothing on a GPU).

Steps off the schedule. A step is counted by a hook set once on the model's first trainable
parameter (the *sentinel*, `gradscope/capture/passes.py`; checked against a hook on the outputs on
scheduled passes and one off-schedule pass in 16) instead of a hook registered on every step's
output — registering a hook on a fresh autograd node cost 39–52 µs on this CPU, whose caches the
model's own step has just evicted — and off-schedule passes share one inert pass object. The
watch's own clocked time on a plain small-LSTM step fell from 149 µs to 46 µs (`light_seconds` per
step, 1 thread, quiet machine), the off-schedule row from 1.015–1.030× (three runs of the earlier
code) to 1.002–1.010× (four runs: 1.004, 1.007, 1.002, 1.010). The default budget keeps 15% of
itself (`schedule.RESERVE`)
for what its clock cannot see — nn.Module's hooked call path and the sentinel's hook inside
backward, 0.1–0.4% of the small step by the off-schedule rows less the clocked light tier. Without
the reserve two runs of the default rows gave 1.014/1.024/1.027/1.023 and 0.991/1.019/1.031/1.028
(large LSTM, small LSTM, GRU, LSTMCell); with it the table above and, in a repeat of the default
rows, 1.006/1.022/1.024/1.024 (2026-12-04, same machine). Ratios move by about ±0.5% between runs."""

NOTES_CUDA = """On CUDA every timed step ends with `torch.cuda.synchronize()`; the watched copy's fused weights
are re-flattened after the deep copy (else cuDNN compacts them on every call). A scheduled watched
step runs cuDNN's forward and then a Python-driven BPTT loop of about five small kernels per time
step, so it is bound by kernel launches, not arithmetic: every=1 costs several times the plain
step. The default budget spaces those steps by their measured cost."""


def main(argv=None):
    args, dev, gpu = bench_args(__doc__, argv)
    if not gpu:  # one intra-op thread: on a shared 2-core machine two threads spin against each other
        torch.set_num_threads(1)
    large, small = (200, 32, 32, 256), (50, 32, 32, 64)
    lstm = lambda i, h: FusedModel(nn.LSTM, i, h)  # noqa: E731
    gru = lambda i, h: FusedModel(nn.GRU, i, h)  # noqa: E731
    D = None  # the default watch(): overhead budget
    cases = [
        ("fused nn.LSTM 32→256, B 32, T 200", lstm, large, D, "≤ 1.03×"),
        ("fused nn.LSTM 32→64, B 32, T 50", lstm, small, D, "≤ 1.03×"),
        ("fused nn.GRU 32→64, B 32, T 50", gru, small, D, "≤ 1.03×"),
        ("user loop nn.LSTMCell 32→64, B 32, T 50", CellModel, small, D, "≤ 1.03×"),
        ("fused nn.LSTM 32→64, B 32, T 50", lstm, small, "off", "≤ 1.01×"),
        ("fused nn.LSTM 32→256, B 32, T 200", lstm, large, 1, "—"),
        ("fused nn.LSTM 32→64, B 32, T 50", lstm, small, 1, "—"),
        ("fused nn.GRU 32→256, B 32, T 200", gru, large, 1, "—"),
        ("fused nn.GRU 32→64, B 32, T 50", gru, small, 1, "—"),
        ("user loop nn.LSTMCell 32→256, B 32, T 200", CellModel, large, 1, "—"),
        ("user loop nn.LSTMCell 32→64, B 32, T 50", CellModel, small, 1, "—"),
    ]
    import re
    cases = [c for c in cases if re.search(args.only, f"{c[0]} {'default' if c[3] is None else c[3]}")]
    rows = []
    for name, make, size, every, target in cases:
        if every == 1:
            n = 20 if size is large else 60
        else:  # budget and off-schedule rows: long enough for the budget to settle
            n = 120 if size is large else 1600
        if gpu and every == 1:
            n *= 3  # GPU steps are short: more of them for a stable median
        if args.quick:
            n = 3 if every == 1 else 51
        a, b, sched = timed_steps(make, size, every, n, device=dev)
        rows.append(overhead_row(name, "off schedule" if every == "off" else every, a, b, target, sched))
        print(rows[-1], flush=True)
    title = ("## watch() overhead on CUDA (`python benchmarks/overhead.py --device cuda`)" if gpu
             else "## watch() overhead (`python benchmarks/overhead.py`)")
    body = "\n".join([
        title,
        "",
        f"Machine: {machine_for(dev)}. Plain and watched copies of the same model train in alternation "
        f"(SGD step included); ratio = median (every=1) or mean (default and off-schedule rows: the "
        f"scheduled work amortised) of watched / plain step time.",
        "",
        *OVERHEAD_HEAD,
        *rows,
        "",
        NOTES_CUDA if gpu else NOTES,
    ])
    if not args.quick:
        write_section("overhead-cuda" if gpu else "overhead", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
