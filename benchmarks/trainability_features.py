"""What gradscope measures at initialisation for every run of the trainability benchmark.

For each run in ``benchmarks/data/trainability.jsonl`` the untrained model is rebuilt (same config,
task and seed; built on the CPU) and probed on the first training batch the run saw (64 sequences
of length T) with the task's loss: ``gradscope.probe(model, x, target=y, loss_fn=…)`` and
``gradscope.diagnose``. One JSON object per run goes to ``benchmarks/data/trainability_features.jsonl``:
per site the probe's measures (Jacobian horizon and rate, ‖∂h_T/∂h_0‖₂, λ₁, gate statistics and
memory times, dead units, weight norms) and the regime the diagnosis named. Resumable; rerun with
``--redo`` after the probe or the rules change.

Run: python benchmarks/trainability_features.py [--redo]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainability as tb  # noqa: E402

import gradscope  # noqa: E402

OUT = tb.DATA.with_name("trainability_features.jsonl")


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else (None if math.isnan(v) else (1e300 if v > 0 else -1e300))


def features(task: str, config: str, T: int, seed: int) -> dict:
    model = tb.build(config, task, seed)
    gen, _ = tb.data_generators(task, T, seed)
    x, y = tb.task_batch(task, tb.PROTOCOL["batch"], T, gen)
    t0 = time.perf_counter()
    rec = gradscope.probe(model, x, target=y, loss_fn=lambda out, yy: tb.task_loss(task, out, yy),
                          jacobian_samples=8, progress=False)
    diag = gradscope.diagnose(rec)
    sites = {}
    for s in rec.sites:
        info = rec.site_info(s)
        m = rec.measure_meta.get(s, {})
        summ = diag.site_summary(s)
        d = {"kind": info.get("kind"), "regime": summ["regime"]}
        d.update({k: _num(v) for k, v in summ["evidence"].items()})
        if "jacobian" in m:
            jn = rec.jacobian_norms(s)
            with np.errstate(divide="ignore"):
                logs = np.log10(np.maximum(jn, 1e-300))
            d["log10_jn_T"] = float(np.median(logs[:, -1]))
            d["log10_jn_half"] = float(np.median(logs[:, jn.shape[1] // 2]))
            d["log10_jn_max"] = float(np.median(logs.max(1)))
        for k, v in (m.get("gates") or {}).items():
            if isinstance(v, (int, float)):
                d["gate_" + k] = _num(v)
        for k, v in (m.get("weights") or {}).items():
            d["w_" + k] = _num(v)
        sites[s] = d
    return dict(key=tb.run_key(task, config, T, seed), task=task, config=config, T=T, seed=seed,
                sites=sites, trainability=diag.trainability.to_dict(), seconds=round(time.perf_counter() - t0, 2),
                gradscope=gradscope.__version__)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redo", action="store_true", help="recompute every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    done = set() if args.redo else tb.done_keys(OUT)
    if args.redo and OUT.exists():
        OUT.unlink()
    for run in tb.load_runs():
        if run["key"] in done:
            continue
        rec = features(run["task"], run["config"], run["T"], run["seed"])
        with OUT.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(rec["key"], f"{rec['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
