"""``gradscope demo``: a vanilla RNN and an LSTM on the adding problem, watched and diagnosed."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ._format import fmt
from .analysis.diagnose import diagnose
from .capture.probe import probe
from .capture.scope import watch
from .errors import GradscopeError
from .zoo import adding_problem


class Regressor(nn.Module):
    """A recurrent layer read out at the last step."""

    def __init__(self, rnn: nn.Module, hidden: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _train(model: nn.Module, T: int, steps: int, seed: int):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    with watch(model, every=5) as scope:
        for s in range(steps):
            x, y = adding_problem(64, T, seed=seed * 100_003 + s)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return scope.recording, losses


def run_demo(out: Path, seq_len: int = 50, steps: int = 150, hidden: int = 32, seed: int = 0) -> int:
    """Train, watch, probe and diagnose both models; print the comparison and write reports."""
    for name, v, lo in (("--seq-len", seq_len, 2), ("--steps", steps, 1), ("--hidden", hidden, 1)):
        if v < lo:
            raise GradscopeError(f"{name} must be at least {lo}, got {v}.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradscopeError(f"cannot create the output folder {str(out)!r}: {e.strerror}.") from None
    torch.manual_seed(seed)
    models = {"rnn": Regressor(nn.RNN(2, hidden, batch_first=True), hidden),
              "lstm": Regressor(nn.LSTM(2, hidden, batch_first=True), hidden)}
    results: Dict[str, dict] = {}
    x, y = adding_problem(32, seq_len, seed=seed + 7)
    for name, model in models.items():
        t0 = time.perf_counter()
        rec, losses = _train(model, seq_len, steps, seed)
        diag = diagnose(probe(model, x, target=y, k=4))
        results[name] = {"diag": diag, "watch": rec, "loss0": losses[0], "loss": sum(losses[-10:]) / min(10, len(losses)),
                         "seconds": time.perf_counter() - t0}
        (out / f"{name}.md").write_text(diag.to_markdown())
        (out / f"{name}.json").write_text(diag.to_json())
        rec.save(out / f"{name}-watch.npz")
    rows = [("", "vanilla RNN", "LSTM"),
            ("regime", *(r["diag"].regime("rnn.l0") for r in results.values())),
            ("gradient horizon (steps)", *(fmt(r["diag"].site_summary("rnn.l0")["horizon"]) for r in results.values())),
            ("sequence length", str(seq_len), str(seq_len)),
            ("decay rate per step", *(fmt(r["diag"].site_summary("rnn.l0")["rate"]) for r in results.values())),
            ("top Lyapunov exponent λ₁", *(fmt(r["diag"].site_summary("rnn.l0")["lambda1"]) for r in results.values())),
            ("memory time τ (LSTM)", "—", fmt(results["lstm"]["diag"].site_summary("rnn.l0")["evidence"].get("memory_time"))),
            ("loss: first step → last 10", *(f"{r['loss0']:.3f} → {r['loss']:.3f}" for r in results.values())),
            ("findings", *(str(len(r["diag"].findings)) for r in results.values())),
            ("seconds", *(f"{r['seconds']:.1f}" for r in results.values()))]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"gradscope demo — adding problem, T={seq_len}, {steps} training steps, hidden {hidden}\n")
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")
    for name, r in results.items():
        print(f"\n=== {name.upper()} ===")
        print(r["diag"])
    print(f"reports written to {out}/ (rnn.md, rnn.json, lstm.md, lstm.json, *-watch.npz)")
    sys.stdout.flush()
    return 0
