"""Cost of watch(update_ratio=True) on a small LSTM (H 64, T 50, batch 32, one CPU thread).

Three identical copies train on the same batches: unwatched, watched with the update ratio and
watched without it, in rotating order (so drifts of a shared machine hit all alike); then the
copies swap roles and it runs again. Printed: per-step median and mean time ratios for the
default watch() (budget schedule) and for every=1 (a snapshot and a measurement on every step),
and the snapshot + measurement alone, timed directly, as a share of a plain step.

Run: python benchmarks/update_ratio_overhead.py [--steps N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradscope  # noqa: E402
from gradscope.capture.updates import UpdateTracker, update_norms  # noqa: E402


class Net(nn.Module):
    def __init__(self, inp=8, hidden=64):
        super().__init__()
        self.rnn = nn.LSTM(inp, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).squeeze(-1)


def run(mode, steps, T=50, B=32, I=8):
    torch.manual_seed(0)
    base = Net(I)
    models = [copy.deepcopy(base) for _ in range(3)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    xs = [torch.randn(T, B, I) for _ in range(4)]
    ys = [torch.randn(T, B) for _ in range(4)]
    kw = {"every": 1, "probe_every": None} if mode == "every=1" else {}
    times = {"plain": [], "on": [], "off": []}
    half = steps // 2
    for roles in (("plain", "on", "off"), ("off", "plain", "on")):  # model i plays roles[i]
        scopes = {r: gradscope.watch(m, update_ratio=(r == "on"), **kw)
                  for r, m in zip(roles, models) if r != "plain"}
        try:
            for i in range(3 + half):
                order = list(range(3)) if i % 2 == 0 else list(range(3))[::-1]
                for k in order:
                    t0 = time.perf_counter()
                    opts[k].zero_grad()
                    (models[k](xs[i % 4]) - ys[i % 4]).pow(2).mean().backward()
                    opts[k].step()
                    dt = time.perf_counter() - t0
                    if i >= 3:
                        times[roles[k]].append(dt)
        finally:
            for s in scopes.values():
                s.close()
        assert scopes["on"].recording.update_ratios()
    return times


def direct(reps=300):
    """Seconds of one snapshot + measurement, and of one plain training step."""
    torch.manual_seed(0)
    m = Net()
    tr = UpdateTracker([p for p in m.parameters()])
    def once():   # snapshot, device norms, the host copy the watch makes with its other values
        tr.snapshot(0)
        _, groups = tr.measure()
        update_norms(len(tr.params), [(ok, idx, v.cpu().numpy()) for ok, idx, v in groups])

    for _ in range(10):
        once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    upd = (time.perf_counter() - t0) / reps
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.randn(50, 32, 8), torch.randn(50, 32)
    ts = []
    for i in range(60):
        t0 = time.perf_counter()
        opt.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        opt.step()
        if i >= 10:
            ts.append(time.perf_counter() - t0)
    return upd, statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    upd, step = direct()
    n_params = sum(p.numel() for p in Net().parameters())
    print(f"snapshot + measurement alone: {upd * 1e6:.0f} µs = {upd / step:.2%} of a plain step "
          f"({step * 1e3:.2f} ms; {n_params} weights)")
    for mode in ("default", "every=1"):
        t = run(mode, args.steps)
        med = {k: statistics.median(v) for k, v in t.items()}
        mean = {k: statistics.fmean(v) for k, v in t.items()}
        print(f"{mode:8s} watched/plain (median, mean): update_ratio=True {med['on'] / med['plain']:.3f}, "
              f"{mean['on'] / mean['plain']:.3f}; False {med['off'] / med['plain']:.3f}, "
              f"{mean['off'] / mean['plain']:.3f}; True/False {mean['on'] / mean['off']:.3f}")


if __name__ == "__main__":
    main()
