"""``gradscope demo``: gradscope's call before training beside what training did, and a remedy proven.

The task is the recall task of the trainability benchmark (:func:`gradscope.zoo.recall_problem`):
report the first of T = 20 tokens, the only signal 19 steps back. Under the benchmark's protocol
(Adam 1e-3, batch 64, gradient clipping 1.0, at most 1 500 steps, success = accuracy ≥ 0.9 on 2 000
held-out sequences) an Elman RNN with recurrent weights 0.5·orthogonal failed in both benchmark
seeds and an LSTM with forget-gate bias 3 learned in both (``benchmarks/RESULTS.md``). The demo
probes each model before training, trains it (watched), and then lets ``try_remedies`` train
remedied copies of the failing RNN for 100 steps and trains the top one under the protocol.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from ._format import fmt
from .analysis.diagnose import Diagnosis, diagnose
from .analysis.trials import try_remedies
from .measure.probe import probe
from .capture.watch import watch
from .errors import GradscopeError
from .zoo import RECALL_TOKENS, recall_problem

HIDDEN, BATCH, EVAL_N, EVAL_EVERY, LR, CLIP = 64, 64, 2000, 250, 1e-3, 1.0
REMEDY_STEPS = 100


class Classifier(nn.Module):
    """A recurrent layer read out at its last step: ``[B, T, 8]`` → ``[B, 8]`` logits."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(HIDDEN, RECALL_TOKENS)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _elman(gain: float) -> nn.Module:
    rnn = nn.RNN(RECALL_TOKENS, HIDDEN, batch_first=True)
    with torch.no_grad():
        nn.init.orthogonal_(rnn.weight_hh_l0, gain=gain)
    return Classifier(rnn)


def _lstm(forget_bias: float) -> nn.Module:
    rnn = nn.LSTM(RECALL_TOKENS, HIDDEN, batch_first=True)
    with torch.no_grad():   # effective forget bias b_ih + b_hh (gate order i, f, g, o)
        rnn.bias_ih_l0[HIDDEN:2 * HIDDEN] = forget_bias
        rnn.bias_hh_l0[HIDDEN:2 * HIDDEN] = 0.0
    return Classifier(rnn)


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


def _train(model: nn.Module, batches: Callable[[], Tuple], held, max_steps: int, seed: int):
    """Protocol training, watched; returns (learned, steps, accuracy)."""
    xe, ye = held
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    acc, step = 0.0, 0
    with watch(model, every=50):
        for step in range(1, max_steps + 1):
            x, y = batches()
            loss = _loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            if step % EVAL_EVERY == 0 or step == max_steps:
                with torch.no_grad():
                    acc = float((model(xe).argmax(-1) == ye).float().mean())
                if acc >= 0.9:
                    return True, step, acc
    return False, step, acc


def _call(diag: Diagnosis) -> str:
    t = diag.trainability
    return f"{t.verdict} ({t.confidence:.2f}) reach 10^{t.evidence.get('reach', float('nan')):.2g}"


def _outcome(learned: bool, steps: int, acc: float) -> str:
    return f"{'learned' if learned else 'failed'}: accuracy {acc:.2f}, {steps} steps"


def run_demo(out: Path, seq_len: int = 20, steps: int = 1500, seed: int = 0, **_ignored) -> int:
    """Probe, train and remedy; print the comparison; write report.html and dashboard.png."""
    for name, v, lo in (("seq_len", seq_len, 2), ("steps", steps, 1)):
        if v < lo:
            raise GradscopeError(f"{name}= must be at least {lo}, got {v}.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradscopeError(f"cannot create the output folder {str(out)!r}: {e.strerror}.") from None
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    models = {"Elman RNN, W_hh 0.5·orth.": _elman(0.5), "LSTM, forget bias 3": _lstm(3.0)}
    held = recall_problem(EVAL_N, seq_len, seed=seed + 20_000)
    first = recall_problem(BATCH, seq_len, seed=seed + 1)
    print(f"gradscope demo — recall the first of T={seq_len} tokens (8 classes, chance 0.12);")
    print(f"Adam {LR:g}, batch {BATCH}, clip {CLIP:g}, at most {steps} steps, success = accuracy ≥ 0.9\n")
    print(f"  {'model':<28}{'gradscope before training':<33}after training")
    rows: Dict[str, Diagnosis] = {}
    for i, (name, model) in enumerate(models.items()):
        diag = diagnose(probe(model, first[0], target=first[1], loss_fn=_loss, k=4))
        rows[name] = diag
        gen = torch.Generator().manual_seed(seed + 100 + i)
        res = _train(model, lambda: recall_problem(BATCH, seq_len, generator=gen), held, steps, seed)
        print(f"  {name:<28}{_call(diag):<33}{_outcome(*res)}")
    rnn_name = next(iter(models))
    torch.manual_seed(seed)
    fresh = _elman(0.5)
    gen = torch.Generator().manual_seed(seed + 200)
    n = min(REMEDY_STEPS, steps)
    data: List[Tuple] = [recall_problem(BATCH, seq_len, generator=gen) for _ in range(n)]
    trials = try_remedies(fresh, data, loss_fn=_loss, train_steps=n, seed=seed, progress=False)
    print(f"\ntry_remedies on the untrained RNN: each remedy on a copy, trained {n} steps, ranked by loss")
    for r in trials.results[:3]:
        ch = r.changes[0]
        print(f"  {r.remedy:<18} final loss {r.training.final_loss:.3f}   "
              f"horizon {fmt(ch.horizon_before)} → {fmt(ch.horizon_after)} of {seq_len}")
    print(f"  (the original, trained the same way: final loss {trials.baseline.final_loss:.3f})")
    if trials.results:
        top = trials.results[0]
        diag = diagnose(probe(top.model, first[0], target=first[1], loss_fn=_loss, k=4))
        gen = torch.Generator().manual_seed(seed + 100)
        res = _train(top.model, lambda: recall_problem(BATCH, seq_len, generator=gen), held, steps, seed)
        print(f"  {'RNN + ' + top.remedy:<28}{_call(diag):<33}{_outcome(*res)}")
    html, png = out / "report.html", out / "dashboard.png"
    rows[rnn_name].to_html(html)
    _dashboard(rows[rnn_name], png)
    print(f"\nthe RNN before training — report: {html}")
    print(f"dashboard: {png}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.stdout.flush()
    return 0


def _dashboard(diag: Diagnosis, path: Path) -> None:
    import matplotlib.pyplot as plt

    from .plot import dashboard
    fig = dashboard(diag)
    fig.savefig(path, dpi=80)
    plt.close(fig)
