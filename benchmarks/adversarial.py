"""Adversarial run for issue 18: hostile and malformed files through `report` / `show`, diverged and
half-precision checkpoints, gradient checkpointing, non-finite values inside `watch`, interrupts.

Each case runs in its own subprocess (a timeout and a memory measure per case) against the gradscope
found on ``--tree`` (default: this checkout), so the same cases can be run on an older commit:

    git worktree add /tmp/before <commit>
    python benchmarks/adversarial.py --tree /tmp/before --label before
    python benchmarks/adversarial.py --label after

and classified as

    clean          the documented behaviour (for training: the same parameters as unwatched, NaN/inf
                   pattern exact, values to float32 rounding of the fused replay, rtol 1e-5): exit 0/1/2 as documented, one line on stderr for 2, the
                   check of the result holds;
    crashed        a traceback, "unexpected …", a Python exception out of the API, a wrong exit code;
    silently wrong it ran, but the result is wrong (a finding missing, training changed, a message that
                   misleads, RuntimeWarnings on stderr);
    hang           over the case's time limit (60 s; bombs also over 1 GiB of memory count here).

Results are appended to ``benchmarks/data/adversarial.jsonl`` (one row per case and label); the counts
are printed and go to RESULTS.md by hand. Cases that need an optional package (safetensors) are skipped
when it is missing. Run with one torch thread: ``OMP_NUM_THREADS=1``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "adversarial.jsonl"
TIMEOUT = 60

# --------------------------------------------------------------------------------------------------
# Files: each builder writes into the case directory (plain torch / numpy, no gradscope needed).

MAKE = textwrap.dedent('''
    import collections, io, json, os, pickle, sys, zipfile
    import numpy as np, torch, torch.nn as nn
    sys.path.insert(0, {tests!r})
    torch.manual_seed(0)
    sd = nn.LSTM(8, 16, num_layers=2).state_dict()
    def save(obj, name): torch.save(obj, name)
    d = dict(sd); d["weight_hh_l0"] = d["weight_hh_l0"].clone(); d["weight_hh_l0"][0, 0] = float("nan")
    save(d, "nan.pt")
    save({{k: torch.full_like(v, float("inf")) for k, v in sd.items()}}, "inf.pt")
    save({{k: v.half() for k, v in sd.items()}}, "fp16.pt")
    save({{k: v.bfloat16() for k, v in sd.items()}}, "bf16.pt")
    d = dict(sd); d["weight_hh_l0"] = d["weight_hh_l0"].to_sparse(); save(d, "sparse.pt")
    save(sd, "good.pt")
    try:
        from safetensors.torch import save_file
        d = {{k: v.contiguous() for k, v in sd.items()}}; d["weight_hh_l1"] = d["weight_hh_l1"].clone()
        d["weight_hh_l1"][1, 1] = float("nan"); save_file(d, "nan.safetensors")
    except ImportError:
        pass
    # a 200-level nested dict with the weights at the bottom
    obj = dict(sd)
    for i in range(200):
        obj = {{"level": obj}}
    save(obj, "nested.pt")
    with open("proto0.pkl", "wb") as f:
        pickle.dump({{k: v.tolist() for k, v in nn.RNN(2, 3).state_dict().items()}}, f, protocol=0)
    os.mkfifo("fifo.pt")
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    save({{"weight_hh_l0": torch.zeros(3, 3), "x": Boom()}}, "hostile.pt")
    import hostile, gradscope
    hostile.torch_zip_bomb("bomb.pt", 8 << 30)
    good = hostile.good_recording("good.npz")
    hostile.npz_bomb("bomb.npz", 1 << 30, good)
    m = hostile.npz_members(good)
    hostile.write_npz("tib.npz", dict(m, **{{"steps.npy": hostile.npy_with_header((1 << 40,), "<i8")}}))
    meta = hostile.recording_meta(m)
    hostile.write_npz("meta_list.npz", hostile.with_meta(m, dict(meta, sites=[1, 2])))
    hostile.write_npz("meta_str.npz", hostile.with_meta(m, dict(meta, index="x")))
    steps = np.load(io.BytesIO(m["steps.npy"]))
    hostile.write_npz("steps2d.npz", dict(m, **{{"steps.npy": hostile.npy_bytes(steps.reshape(1, -1))}}))
    neg = {{k: v for k, v in m.items()}}
    name = "g0.npy"
    neg[name] = hostile.npy_bytes(-np.abs(np.load(io.BytesIO(m[name]))) - 1)
    hostile.write_npz("negative.npz", neg)
    raw = open("good.pt", "rb").read()
    off, _ = hostile.stored_member_offset("good.pt", "data/0")
    open("flipped.pt", "wb").write(hostile.flip_bytes(raw, off, 64))
    open("truncated.pt", "wb").write(raw[: len(raw) // 2])
    torch.save(nn.RNN(4096, 4096).state_dict(), "big_rnn.pt")
    torch.save(torch.randn(7, 3), "wrong_inputs.pt")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), "scripted.jit")
    open("whole_main.py", "w").write(
        "import torch\\nclass Net(torch.nn.Module):\\n    def __init__(self):\\n"
        "        super().__init__(); self.rnn = torch.nn.LSTM(3, 4)\\ntorch.save(Net(), 'whole.pt')\\n")
''')


def _cli(*args, rc=(0, 1), out_has=(), out_lacks=(), err_has=(), err_lacks=(), mem_gib=None):
    return {"cli": list(args), "rc": list(rc), "out_has": list(out_has), "out_lacks": list(out_lacks),
            "err_has": list(err_has), "err_lacks": list(err_lacks), "mem_gib": mem_gib}


NONFINITE = ("NaN", "non-finite", "nonfinite")
CASES = {
    # diverged, half-precision and sparse checkpoints
    "report NaN weight": _cli("report", "nan.pt", out_has=("critical",)),
    "report NaN weight --fail-on nonfinite": _cli("report", "nan.pt", "--fail-on", "nonfinite", rc=(1,)),
    "report NaN weight json": _cli("report", "nan.pt", "--format", "json", out_has=("nonfinite",)),
    "report NaN weight html": _cli("report", "nan.pt", "--format", "html", out_has=("nonfinite",)),
    "report NaN weight --no-probe": _cli("report", "nan.pt", "--no-probe", out_has=("critical",)),
    "report NaN weight safetensors": _cli("report", "nan.safetensors", out_has=("critical",)),
    "report all-inf weights": _cli("report", "inf.pt", out_has=("critical",), err_lacks=("Warning",)),
    "report fp16 weights": _cli("report", "fp16.pt", out_has=("float16",), err_lacks=("Warning",)),
    "report bf16 weights": _cli("report", "bf16.pt", out_has=("bfloat16",), err_lacks=("Warning",)),
    "report sparse weight_hh": _cli("report", "sparse.pt", rc=(0, 1, 2), err_lacks=("unexpected",)),
    # bombs, lying headers, corruption
    "report 8 GiB torch zip bomb": _cli("report", "bomb.pt", rc=(2,), mem_gib=1.0),
    "show 1 GiB npz bomb": _cli("show", "bomb.npz", rc=(2,), mem_gib=1.0),
    "show npy header of 8 TiB": _cli("show", "tib.npz", rc=(2,), mem_gib=1.0),
    "report flipped bytes (bad CRC)": _cli("report", "flipped.pt", rc=(2,)),
    "report truncated zip": _cli("report", "truncated.pt", rc=(2,)),
    # malformed recordings
    "show metadata sites a list": _cli("show", "meta_list.npz", rc=(2,), err_has=("sites",)),
    "show metadata index a string": _cli("show", "meta_str.npz", rc=(2,), err_has=("index",)),
    "show 2-D steps": _cli("show", "steps2d.npz", rc=(2,), err_has=("steps",)),
    "show negative norms": _cli("show", "negative.npz", rc=(2,), err_has=("negative",)),
    "show a torch checkpoint": _cli("show", "good.pt", rc=(2,), err_lacks=("npz file",),
                                    err_has=("checkpoint",)),
    "show a directory": _cli("show", ".", rc=(2,)),
    "show a missing file": _cli("show", "missing.npz", rc=(2,)),
    # size and options
    "report H=4096 RNN, limit 20 s": _cli("report", "big_rnn.pt", "--max-probe-seconds", "20",
                                          rc=(0, 1, 2)),
    "report bad --k, before probing": _cli("report", "big_rnn.pt", "--k", "0", rc=(2,)),
    "report bad --threshold": _cli("report", "good.pt", "--threshold", "7", rc=(2,)),
    "report --batch 1e8": _cli("report", "good.pt", "--batch", "1e8", rc=(2,)),
    "report --inputs of the wrong shape": _cli("report", "good.pt", "--model", "torch.nn:LSTM",
                                               "--model-args", '{"input_size": 8, "hidden_size": 16, '
                                               '"num_layers": 2}', "--inputs", "wrong_inputs.pt",
                                               rc=(2,)),
    "report unknown --fail-on kind": _cli("report", "good.pt", "--fail-on", "vanishng", rc=(2,)),
    # messages
    "report 200-level nested dict": _cli("report", "nested.pt", rc=(0, 1, 2),
                                         err_lacks=("holds no tensors at all",)),
    "report protocol-0 pickle": _cli("report", "proto0.pkl", rc=(0, 1, 2), err_lacks=("text file",)),
    "report a FIFO": _cli("report", "fifo.pt", rc=(2,), err_lacks=("no such file",)),
    "report hostile pickle, no opt-in": _cli("report", "hostile.pt", rc=(2,), err_has=("unsafe",)),
    "report TorchScript, no opt-in": _cli("report", "scripted.jit", rc=(2,), err_has=("TorchScript",)),
    "report TorchScript --unsafe-load": _cli("report", "scripted.jit", "--unsafe-load", rc=(0, 1)),
    "report whole model from __main__": _cli("report", "whole.pt", "--unsafe-load", rc=(2,),
                                             err_lacks=("PYTHONPATH",), err_has=("state_dict",)),
}

# Python cases: a script that prints "OK" when the behaviour holds (anything else: silently wrong).
PY_COMMON = textwrap.dedent('''
    import torch, torch.nn as nn, gradscope, warnings
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    def train(model, x, steps=3, watched=False, **kw):
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = None
        def loop():
            for _ in range(steps):
                opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward(); opt.step()
        if watched:
            with gradscope.watch(model, every=1, **kw) as scope:
                loop()
            rec = scope.recording
        else:
            loop()
        return [p.detach().clone() for p in model.parameters()], rec
    def same(a, b):
        # watched = unwatched: NaN/inf pattern exact, values to the fused replay's float32 rounding
        return all(torch.equal(u.isnan(), v.isnan()) and torch.equal(u.isinf(), v.isinf()) and
                   torch.allclose(torch.nan_to_num(u, 0.0, 0.0, 0.0), torch.nan_to_num(v, 0.0, 0.0, 0.0),
                                  rtol=1e-5, atol=1e-7) for u, v in zip(a, b))
    class Ck(nn.Module):
        def __init__(self, rnn, reentrant):
            super().__init__(); self.rnn, self.reentrant = rnn, reentrant
        def forward(self, x):
            return checkpoint(lambda t: self.rnn(t)[0], x, use_reentrant=self.reentrant)
    import copy
    class Out(nn.Module):
        def __init__(self, rnn):
            super().__init__(); self.rnn = rnn
        def forward(self, x):
            return self.rnn(x)[0]
    def nonfinite_case(rnn, where, value):
        x = torch.randn(6, 2, 3); x[where] = value
        pa, _ = train(Out(copy.deepcopy(rnn)), x, steps=1)
        pb, _ = train(Out(copy.deepcopy(rnn)), x, steps=1, watched=True)
        print("OK" if same(pa, pb) else "WRONG")
    def ck_case(kind, reentrant):
        rnn = getattr(nn, kind)(4, 8)
        a, b = Ck(copy.deepcopy(rnn), reentrant), Ck(copy.deepcopy(rnn), reentrant)
        x = torch.randn(10, 3, 4, requires_grad=reentrant)
        pa, _ = train(a, x); pb, rec = train(b, x, watched=True)
        recorded = bool(rec.sites) and all(
            rec.grad_norms(s).size > 0 and rec.grad_norms(s).shape[-1] > 0 for s in rec.sites)
        ok = same(pa, pb) and (recorded or any("checkpoint" in n for n in rec.notes))
        print("OK" if ok else f"WRONG same={same(pa, pb)} recorded={recorded}")
''')

PY_CASES = {
    "checkpoint(use_reentrant=False) around LSTM": "ck_case('LSTM', False)",
    "checkpoint(use_reentrant=True) around LSTM": "ck_case('LSTM', True)",
    "checkpoint(use_reentrant=False) around GRU": "ck_case('GRU', False)",
    "checkpoint(use_reentrant=True) around GRU": "ck_case('GRU', True)",
    "ReLU RNN with NaN pre-activation: watched = unwatched":
        "nonfinite_case(nn.RNN(3, 5, nonlinearity='relu'), (2, 0, 1), float('nan'))",
    "LSTM with inf input: watched = unwatched": "nonfinite_case(nn.LSTM(3, 5), (1, 1, 0), float('inf'))",
    "GRU with NaN input: watched = unwatched": "nonfinite_case(nn.GRU(3, 5), (3, 0, 2), float('nan'))",
    "probe on a module with a NaN weight": textwrap.dedent('''
        m = nn.LSTM(3, 5)
        with torch.no_grad(): m.weight_hh_l0[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            d = gradscope.diagnose(gradscope.probe(m, torch.randn(8, 2, 3)))
        print("OK" if any(f.kind == "nonfinite" and f.severity == "critical" for f in d.findings) else "WRONG")'''),
    "probe on a float16 module": textwrap.dedent('''
        m = nn.LSTM(3, 5).half()
        rec = gradscope.probe(m, torch.randn(8, 2, 3).half())
        d = gradscope.diagnose(rec)
        print("OK" if not any(f.kind == "nonfinite" for f in d.findings) else "WRONG")'''),
    "finite gradient whose float32 norm overflows": textwrap.dedent('''
        torch.manual_seed(0); m = nn.RNN(8, 64)
        nn.init.orthogonal_(m.weight_hh_l0, gain=3.0)
        class W(nn.Module):
            def __init__(s, m): super().__init__(); s.m = m
            def forward(s, t): return s.m(t)[0]
        w = W(m); x = torch.randn(200, 4, 8)
        with gradscope.watch(w, every=1) as scope:
            loss = (w(x)[-1] * 1e18).sum(); loss.backward()
        finite = all(bool(p.grad.isfinite().all()) for p in w.parameters())
        big = max(float(p.grad.abs().max()) for p in w.parameters())
        norm32 = float(torch.stack([p.grad.norm() for p in w.parameters()]).norm())
        flagged = any(f.kind == "nonfinite" for f in scope.diagnose().findings)
        print(f"finite={finite} largest={big:.3g} float32 norm={norm32}")
        print("OK" if flagged == (not finite) else "WRONG")'''),
    "KeyboardInterrupt during watch setup": textwrap.dedent('''
        m = nn.LSTM(3, 5)
        import unittest.mock as um
        calls = {"n": 0}
        real = nn.Module.register_forward_hook
        def interrupt(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # between two registrations
            return real(self, *a, **k)
        try:
            with um.patch.object(nn.Module, "register_forward_hook", interrupt):
                with gradscope.watch(m):
                    pass
        except KeyboardInterrupt:
            pass
        clean = not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
        with gradscope.watch(m, every=1):
            m(torch.randn(4, 2, 3))[0].sum().backward()
        print("OK" if clean and not m._forward_hooks and not m._forward_pre_hooks else "WRONG")'''),
    "exception inside watch removes every hook": textwrap.dedent('''
        m = nn.LSTM(3, 5)
        try:
            with gradscope.watch(m, every=1):
                m(torch.randn(4, 2, 3))[0].sum().backward(); raise ValueError("user")
        except ValueError:
            pass
        ok = not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
        print("OK" if ok else "WRONG")'''),
}


def _run(cmd, cwd, env, timeout):
    """(exit code or None on timeout, stdout, stderr, seconds, peak memory in GiB of the case)."""
    t0 = time.time()
    memfile = Path(cwd) / ".maxrss"
    wrapper = ("import os, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "open(os.environ['MEMFILE'], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss)); sys.exit(r.returncode)")
    try:
        r = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, env=dict(env, MEMFILE=str(memfile)),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", "", time.time() - t0, None
    mem = int(memfile.read_text()) / 2**20 if memfile.exists() else None  # ru_maxrss is in KiB
    return r.returncode, r.stdout, r.stderr, time.time() - t0, mem


def classify_cli(spec, rc, out, err, secs, mem):
    if rc is None:
        return "hang", f"over {TIMEOUT} s"
    if spec["mem_gib"] is not None and mem is not None and mem > spec["mem_gib"]:
        return "hang", f"{mem:.1f} GiB of memory"
    if "Traceback" in err or "unexpected" in err:
        lines = err.strip().splitlines()
        return "crashed", next((ln for ln in lines if "gradscope:" in ln), lines[-1])[:200]
    if rc not in spec["rc"]:
        return ("crashed" if rc not in (0, 1, 2) else "silently wrong"), f"exit {rc}: {err.strip()[:200]}"
    if rc == 2 and len(err.strip().splitlines()) != 1:
        return "silently wrong", f"{len(err.strip().splitlines())} lines on stderr"
    for s in spec["out_has"]:
        if s.lower() not in out.lower():
            return "silently wrong", f"report lacks {s!r}"
    for s in spec["out_lacks"]:
        if s.lower() in out.lower():
            return "silently wrong", f"report has {s!r}"
    for s in spec["err_has"]:
        if s.lower() not in err.lower():
            return "silently wrong", f"stderr lacks {s!r}: {err.strip()[:200]}"
    for s in spec["err_lacks"]:
        if s.lower() in err.lower():
            return "silently wrong", f"stderr has {s!r}: {err.strip()[:200]}"
    return "clean", (err.strip()[:200] or f"exit {rc}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="checkout whose gradscope is tested")
    ap.add_argument("--label", default="after")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--report", action="store_true", help="only count the saved rows (the latest per case)")
    args = ap.parse_args()
    if args.report:
        return report()
    tree = args.tree.resolve()
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rc, _, err, _, _ = _run([sys.executable, "-c", MAKE.format(tests=str(HERE.parent / "tests"))], d,
                                dict(env, PYTHONPATH=str(HERE.parent)), 600)
        if rc != 0:
            sys.exit(f"building the files failed:\n{err}")
        subprocess.run([sys.executable, "whole_main.py"], cwd=d, env=env, check=True)
        for name, spec in CASES.items():
            if args.only not in name:
                continue
            files = [a for a in spec["cli"] if a.endswith((".pt", ".npz", ".safetensors", ".jit", ".pkl"))]
            if any(not (Path(d) / f).exists() and f != "missing.npz" for f in files):
                rows.append({"case": name, "status": "skipped", "detail": "optional package missing"})
                continue
            rc, out, err, secs, mem = _run([sys.executable, "-m", "gradscope", *spec["cli"]], d, env, TIMEOUT)
            status, detail = classify_cli(spec, rc, out, err, secs, mem)
            if name.startswith("report hostile") and (Path(d) / "pwned").exists():
                status, detail = "silently wrong", "the hostile pickle ran code"
            rows.append({"case": name, "status": status, "detail": detail, "secs": round(secs, 1),
                         "mem_gib": None if mem is None else round(mem, 2)})
            print(f"{status:15s} {secs:5.1f}s  {name}: {detail[:110]}", flush=True)
        for name, body in PY_CASES.items():
            if args.only not in name:
                continue
            code = PY_COMMON + "\n" + textwrap.dedent(body)
            rc, out, err, secs, mem = _run([sys.executable, "-c", code], d, env, TIMEOUT)
            if rc is None:
                status, detail = "hang", f"over {TIMEOUT} s"
            elif rc != 0:
                status, detail = "crashed", (err.strip().splitlines() or [""])[-1][:200]
            elif out.strip().endswith("OK"):
                status, detail = "clean", ""
            else:
                status, detail = "silently wrong", out.strip()[-200:]
            rows.append({"case": name, "status": status, "detail": detail, "secs": round(secs, 1)})
            print(f"{status:15s} {secs:5.1f}s  {name}: {detail[:110]}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("clean", "crashed", "silently wrong", "hang",
                                                               "skipped")}
    tried = len(rows) - counts["skipped"]
    print(f"\n{args.label} ({commit}): tried {tried}, " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not args.no_save:
        OUT.parent.mkdir(exist_ok=True)
        with OUT.open("a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, label=args.label, commit=commit)) + "\n")


def report():
    """Counts per label from the saved rows, the latest row of each case (a case rerun replaces it)."""
    latest = {}
    for line in OUT.read_text().splitlines():
        r = json.loads(line)
        latest[(r["label"], r["case"])] = r
    for label in dict.fromkeys(k[0] for k in latest):
        rows = [r for (lab, _), r in latest.items() if lab == label]
        n = {s: sum(r["status"] == s for r in rows) for s in ("clean", "crashed", "silently wrong", "hang")}
        commits = sorted({r.get("commit", "?") for r in rows})
        print(f"{label} ({', '.join(commits)}): tried {sum(n.values())}, "
              + ", ".join(f"{k} {v}" for k, v in n.items()))
        for r in rows:
            if r["status"] != "clean":
                print(f"    {r['status']:15s} {r['case']}")


if __name__ == "__main__":
    main()
