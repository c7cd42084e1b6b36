"""Write one named section of benchmarks/RESULTS.md, leaving the other sections as they are."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("# gradscope benchmark results\n\n"
          "Every row is a ratio measured in one run against a baseline in the same run. "
          "Each section is rewritten by the script named in its heading.\n")


def machine() -> str:
    """One line naming the machine and versions the numbers come from."""
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


OVERHEAD_HEAD = ["| model | schedule | plain median ms | watched median ms | median ratio | mean ratio | ratio | target "
                 "| deep passes / probes / steps | realised overhead (meta) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]


def machine_for(device) -> str:
    """:func:`machine`, plus the accelerator's name when ``device`` is not the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda}, " + machine()
    return machine()


def bench_args(doc: str, argv=None):
    """The overhead scripts' command line: ``(args, device, on_gpu)`` from ``--quick``/``--device``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--only", default="", help="regular expression: only rows whose 'name schedule' matches")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    return args, dev, dev.type != "cpu"


def watched_copy(plain):
    """A deep copy of ``plain`` to watch; fused RNN weights rejoined into cuDNN's flat buffer (a deep
    copy splits it, and cuDNN would then compact the weights on every call)."""
    import copy

    watched = copy.deepcopy(plain)
    for m in watched.modules():
        if isinstance(m, torch.nn.RNNBase):
            m.flatten_parameters()
    return watched


def interleaved_times(plain, watched, step, *, every: int, steps: int, warmup: int = 3, device="cpu"):
    """Per-step seconds of the plain and the watched step, run in alternation, warm-up steps dropped.

    Two halves of ``steps // 2`` timed steps each: in the first ``watched`` is watched
    (``gradscope.watch(every=every)``) and ``plain`` is not, in the second the roles swap, so a
    difference between the two model instances themselves cancels (two identical unwatched copies
    differed by up to ~0.4 ms of a 3 ms step on this machine). Within a half the order alternates
    (ABBA): the step that runs right after the other model's backward pays a penalty of its own.
    On CUDA each timed step ends with a device synchronisation, so a step's time includes its
    kernels. Returns ``(plain_times, watched_times)``."""
    import time

    import gradscope

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a, b = [], []

    def timed(model, i):
        sync()
        t0 = time.perf_counter()
        step(model, i)
        sync()
        return time.perf_counter() - t0

    half = max(1, steps // 2)
    if every is None:       # the default watch(): overhead budget for deep passes and probes
        opts = {}
    elif every == "off":    # every step after the first off the schedule: hooks and counting only
        opts = {"every": 10 ** 9, "probe_every": None}
    else:                   # a fixed schedule, no probes: the cost of the deep passes alone
        opts = {"every": every, "probe_every": None}
    scheds = []
    for unwatched, w in ((plain, watched), (watched, plain)):
        with gradscope.watch(w, **opts) as scope:
            for i in range(warmup + half):
                if i % 2 == 0:
                    ta = timed(unwatched, i)
                    tb = timed(w, i)
                else:
                    tb = timed(w, i)
                    ta = timed(unwatched, i)
                if i >= warmup:
                    a.append(ta)
                    b.append(tb)
        assert len(scope.recording) > 0, "the watched copy recorded nothing"
        scheds.append(scope.recording.meta["schedule"])
    sched = {"deep_passes": sum(s["deep_passes"] for s in scheds), "probes": sum(s["probes"] for s in scheds),
             "steps": 2 * (warmup + half),
             "realised_overhead": [s["realised_overhead"] for s in scheds]}
    return a, b, sched


def overhead_row(name: str, every, a, b, target: str, sched=None) -> str:
    """One results row: median ratio for every=1, mean ratio (scheduled work amortised) otherwise;
    with ``sched`` (from :func:`interleaved_times`) the passes run and the realised overhead the
    watches' own accounting gave (both halves)."""
    import statistics

    med = statistics.median(b) / statistics.median(a)
    mean = statistics.fmean(b) / statistics.fmean(a)
    ratio = med if every == 1 else mean
    extra = ""
    if sched is not None:
        real = " / ".join("—" if r is None else f"{r:.1%}" for r in sched["realised_overhead"])
        extra = f" {sched['deep_passes']} / {sched['probes']} / {sched['steps']} | {real} |"
    label = "default" if every is None else every
    return (f"| {name} | {label} | {statistics.median(a) * 1e3:.2f} | {statistics.median(b) * 1e3:.2f} "
            f"| {med:.3f} | {mean:.3f} | **{ratio:.3f}×** | {target} |" + extra)
