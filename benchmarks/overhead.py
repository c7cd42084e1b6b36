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
differed by up to ~0.4 ms of a 3 ms step, and the step that runs right after the other model's
backward pays a penalty of its own). The every=50 rows of the small models time 1000 steps (20
scheduled ones), so their mean does not hang on a few scheduled steps. Timings on this shared
2-core machine still vary by ±5–10% between runs, and the machine switches between states (the
plain small-LSTM step took 2.4–4.6 ms in this session's runs, the plain LSTMCell loop 137–204 ms
in the previous session's).

The LSTM replay. A scheduled step of a fused `nn.LSTM` back-propagates with a hand-written BPTT
loop (one `[B, 4H] @ [4H, H]` product and the cell arithmetic per step) that yields the total
∂L/∂h_t and ∂L/∂c_t; weight gradients are then a few large products. On the CPU both loops run in a
small C++ extension compiled on first use (`gradscope.capture.kernels`): per step one ATen product
and one pass of cell arithmetic that computes the five sigmoids itself (a Cephes-style expf that
the compiler vectorises; built for AVX-512, AVX2 and the baseline, picked at load time), so a
step no longer pays two ATen sigmoid calls and three passes. For H 64, T 50 this took the
forward loop from 1.09 to 0.72–0.75 ms and the BPTT loop from 0.86 to 0.63–0.64 ms (the small
LSTM's every=1 row from 1.41× to 1.21×). Without a compiler the *Python replay* rows apply.

Steps off the schedule. Once the extension is in use, the watched model's forward is its
`RootForward`, a C type: nn.Module's call reaches the compiled `RootTap` with no Python frame. The
tap counts steps (the autograd graph task of the first backward call that reaches each forward
pass's output, noted by a C++ tensor hook) and hands only scheduled passes to Python. Measured on a
tiny RNN step (260 µs) it costs 6.3 µs over no forward of ours at all (12.5 µs with the earlier
Python wrapper and pybind11 call; the root module's Python hooks had cost 60–110 µs of a small-LSTM
step). A second, older cost is gone too: removing gradscope's parameter hooks after a scheduled
step left torch's Python hook wrapper on every parameter (an emptied `_backward_hooks` dict), which
entered Python for each parameter in every later backward (~0.75 µs each) — now dropped with the
hooks. What every=50 still pays is mostly its scheduled step, amortised (0.7–1.1 ms over the plain
step for the small LSTM, ~0.4 of a plain step; ~0.8–0.9% of the mean), and ~0.1–0.7% on the steps
off the schedule (the tap, and the step right after a scheduled one runs ~0.1 ms slower).
The small LSTM at every=50 read 1.009–1.021 in 17 single-row runs (16 at or under 1.02; the
median ratio, i.e. the steps off the schedule, 1.001–1.016), 1.011–1.043 before these changes.

User cells. On a scheduled pass a user cell's forward is the extension's `CellTap`: it calls the
cell and hooks the states among its outputs itself (no Python per time step; outputs other than a
tensor or a tuple of tensors go to Python), and each hook computes the gradient's norm by a
float64 loop over its memory (no tensor allocated in the backward pass). This took the LSTMCell
loop (H 256, T 200) from 1.02–1.07× (a Python wrapper per call, an ATen norm per hook) to
0.97–1.04× (1.026, 1.038 and 1.034 in three full runs of the previous session, 1.030 in this
table); the small loop from 1.18× to 1.08–1.12×.

GRU replays cost 1.1–1.3× at H 256 and run below the plain step at H 64 (torch's own CPU GRU is
the slower one there); Elman RNN replays are at or below the plain step."""

NOTES_CUDA = """On CUDA every timed step ends with `torch.cuda.synchronize()`; the watched copy's fused weights
are re-flattened after the deep copy (else cuDNN compacts them on every call). The targets were set
for the CPU and are missed here at every=1: the plain fused step is one cuDNN call per layer and
direction, while a scheduled watched step runs cuDNN's forward and then a Python-driven BPTT loop
of about five small kernels per time step (GRU: more), so it is bound by kernel launches (T × ~5
launches of a few µs each), not by arithmetic: 3.1× for the LSTM at T 200, 4–5× for the small
LSTM and the GRUs. The user LSTMCell loop pays 2.4–2.5×: on scheduled device passes the cell runs op
by op (8 kernels instead of one fused cell) so that ∂L/∂c_t is the total gradient, plus two tensor
hooks per step. Attention blocks pay 2.7–2.8× for the recomputed probabilities, entropy, rank and
depth flow of every block. Off schedule a step costs 1.02–1.04× (median), and every=50 amortises a
scheduled step to 1.02–1.12× (mean). On a GPU, use every=50 or more to leave gradscope on."""


def _kernel_line(dev) -> str:
    """Build (or load) the compiled LSTM kernel before timing; say which LSTM replay the rows use."""
    import os
    import time

    from gradscope.capture import kernels

    if dev.type != "cpu":
        return "The compiled LSTM kernel is CPU-only; these rows use the Python replay."
    if kernels.mode() == "off":
        return "GRADSCOPE_KERNELS=off: the LSTM rows use the pure-Python replay."
    t0 = time.perf_counter()
    try:
        kernels.build(wait=True)
    except Exception as e:  # report, and time the Python replay instead
        os.environ["GRADSCOPE_KERNELS"] = "off"
        return f"Compiled LSTM kernel unavailable ({e}); the LSTM rows use the pure-Python replay."
    return (f"Fused LSTM rows use the compiled CPU kernel (`gradscope.capture.kernels`, built or loaded "
            f"in {time.perf_counter() - t0:.1f} s before timing); rows marked *Python replay* run "
            f"with `GRADSCOPE_KERNELS=off`.")


class _NoKernel:
    """Context: the pure-Python LSTM replay (GRADSCOPE_KERNELS=off) for one row."""

    def __enter__(self):
        import os

        self.old = os.environ.get("GRADSCOPE_KERNELS")
        os.environ["GRADSCOPE_KERNELS"] = "off"

    def __exit__(self, *exc):
        import os

        if self.old is None:
            os.environ.pop("GRADSCOPE_KERNELS", None)
        else:
            os.environ["GRADSCOPE_KERNELS"] = self.old


def main(argv=None):
    import contextlib

    args, dev, gpu = bench_args(__doc__, argv)
    kernel_line = _kernel_line(dev)
    large, small = (200, 32, 32, 256), (50, 32, 32, 64)
    python_rows = [] if gpu else [
        ("fused nn.LSTM 32→256, B 32, T 200, *Python replay*", lambda i, h: FusedModel(nn.LSTM, i, h), large, 1, "—"),
        ("fused nn.LSTM 32→64, B 32, T 50, *Python replay*", lambda i, h: FusedModel(nn.LSTM, i, h), small, 1, "—"),
    ]
    cases = [
        ("fused nn.LSTM 32→256, B 32, T 200", lambda i, h: FusedModel(nn.LSTM, i, h), large, 1, "≤ 1.5×"),
        ("fused nn.LSTM 32→256, B 32, T 200", lambda i, h: FusedModel(nn.LSTM, i, h), large, 50, "≤ 1.02×"),
        ("fused nn.LSTM 32→64, B 32, T 50", lambda i, h: FusedModel(nn.LSTM, i, h), small, 1, "≤ 1.5×"),
        ("fused nn.LSTM 32→64, B 32, T 50", lambda i, h: FusedModel(nn.LSTM, i, h), small, 50, "≤ 1.02×"),
        ("fused nn.GRU 32→256, B 32, T 200", lambda i, h: FusedModel(nn.GRU, i, h), large, 1, "≤ 1.5×"),
        ("fused nn.GRU 32→64, B 32, T 50", lambda i, h: FusedModel(nn.GRU, i, h), small, 1, "≤ 1.5×"),
        ("user loop nn.LSTMCell 32→256, B 32, T 200", CellModel, large, 1, "≤ 1.05×"),
        ("user loop nn.LSTMCell 32→256, B 32, T 200", CellModel, large, 50, "—"),
        ("user loop nn.LSTMCell 32→64, B 32, T 50", CellModel, small, 1, "≤ 1.5×"),
        ("user loop nn.LSTMCell 32→64, B 32, T 50", CellModel, small, 50, "—"),
    ]
    rows = []
    for name, make, size, every, target in cases + python_rows:
        # every=50: the mean carries a scheduled step per 50, so many steps (20 scheduled ones
        # for the small models) keep it from hanging on a few of them
        n = (20 if size is large else 60) if every == 1 else (100 if size is large else 1000)
        if gpu and every == 1:
            n *= 3  # GPU steps are short: more of them for a stable median
        if args.quick:
            n = 3 if every == 1 else 51
        with _NoKernel() if "Python replay" in name else contextlib.nullcontext():
            a, b = timed_steps(make, size, every, n, device=dev)
        rows.append(overhead_row(name, every, a, b, target))
        print(rows[-1], flush=True)
    title = ("## watch() overhead on CUDA (`python benchmarks/overhead.py --device cuda`)" if gpu
             else "## watch() overhead (`python benchmarks/overhead.py`)")
    body = "\n".join([
        title,
        "",
        f"Machine: {machine_for(dev)}. Plain and watched copies of the same model train in alternation "
        f"(SGD step included); ratio = median (every=1) or mean (every=50, the scheduled step "
        f"amortised) of watched / plain step time. {kernel_line}",
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
