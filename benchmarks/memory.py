"""Memory of a long watched run: resident memory growth over 2,000 steps (every=1, small LSTM).

Resident memory is read from /proc/self/status (VmRSS) after a warm-up of 200 steps and at the
end; the history gradscope keeps is also sized directly. Writes the "memory" section of
benchmarks/RESULTS.md. Run: python benchmarks/memory.py [--steps N]
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import machine, write_section  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def history_bytes(scope) -> int:
    return scope._history.nbytes()


def main(argv=None):
    import gradscope

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = nn.LSTM(8, 32)
    head = nn.Linear(32, 1)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=1e-3)
    x = torch.randn(50, 16, 8)
    y = torch.randn(16, 1)
    marks = {}
    with gradscope.watch(model, every=1) as scope:
        for i in range(args.steps):
            out, _ = model(x)
            loss = (head(out[-1]) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i + 1 == args.warmup:
                gc.collect()
                marks["warm"] = (rss_mb(), history_bytes(scope))
        gc.collect()
        marks["end"] = (rss_mb(), history_bytes(scope))
        rec = scope.recording
    grow = marks["end"][0] - marks["warm"][0]
    hist = (marks["end"][1] - marks["warm"][1]) / 2 ** 20
    body = "\n".join([
        "## Memory of a long watched run (`python benchmarks/memory.py`)",
        "",
        f"Machine: {machine()}. nn.LSTM(8→32), T 50, B 16, every=1, {args.steps} steps "
        f"(default max_steps=10 000, so every step is kept).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| resident memory growth after a {args.warmup}-step warm-up | **{grow:.2f} MB** "
        f"({grow * 1024 / (args.steps - args.warmup):.2f} kB/step) | < 5 MB |",
        f"| of which the recorded history (numpy arrays, grown by doubling) | {hist:.2f} MB | — |",
        f"| recorded steps / sites | {len(rec)} / {len(rec.sites)} | — |",
    ])
    print(body)
    write_section("memory", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
