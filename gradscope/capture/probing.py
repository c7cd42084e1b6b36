"""Probes on the watch's schedule: Jacobians, exponents, spectra and gate statistics on one step's batch.

A probe pass is a scheduled pass whose module calls were kept (``Pass.calls``); at the end of its
forward — before the backward and the optimizer step, so with the weights and inputs this step
uses — :func:`gradscope.measure.sites.measure_sites` measures the recurrent sites and
:func:`gradscope.measure.depth.depth_jacobians` the attention blocks. This is the one module of
capture that imports :mod:`gradscope.measure` (never :mod:`gradscope.measure.probe`, which drives
a watch: imports run one way, tests/test_imports.py).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..measure.depth import depth_jacobians
from ..measure.sites import measure_sites
from .alerts import Notes
from .catalog import SiteTable
from .passes import Pass

__all__ = ["Probes", "SUMMARY_KEYS"]

#: the per-probe numbers kept for every probe of a site (``rec.measure(site, "probe_" + key)``)
SUMMARY_KEYS = ("horizon", "rate", "lambda1", "memory_time")


class Probes:
    """Runs the probes of a watch and keeps their results.

    Args:
        table: the watched sites.
        attn: the watch's attention capture, or None.
        notes: where the probes' notes go.
        options: keywords for the measurements (``watch(probe_options=...)``).
        max_steps: the summary history is halved when it reaches this length.

    Attributes:
        latest: ``(step, measures, meta)`` of the last probe, or None.
        history: ``(step, {site: {key: value}})`` per probe, keys :data:`SUMMARY_KEYS`.
        running: True while a probe runs (its module calls start no new pass).
    """

    def __init__(self, table: SiteTable, attn, notes: Notes, options: Dict[str, Any], max_steps: int):
        self.table, self.attn, self.notes = table, attn, notes
        self.options, self.max_steps = options, max_steps
        self.latest: Optional[Tuple[int, Dict, Dict]] = None
        self.history: List[Tuple[int, Dict[str, Dict[str, float]]]] = []
        self.running = False

    def run(self, p: Pass, step: int) -> None:
        """Measure on pass ``p``'s batch (no grad), for step ``step``."""
        sites = self.table.sites
        wanted = {n for n in sites if self.table.wanted(n) and sites[n].kind != "attention"}
        with torch.no_grad():
            measures, meta, notes = measure_sites(dict(self.table.model.named_modules()), sites, wanted,
                                                  p.calls, order=list(sites), **self.options)
        p.calls = {}
        if self.attn is not None:
            self.running = True  # the depth Jacobians call blocks, maybe the model itself: no new pass
            try:
                with torch.no_grad():
                    notes = list(notes) + self.attn.run_probe(p, step, depth_jacobians, **self.options)
            finally:
                self.running = False
        for n in notes:
            self.notes.add(("probe", n), n)
        self.latest = (step, measures, meta)
        summary = {site: {"horizon": m.get("jacobian", {}).get("horizon", math.nan),
                          "rate": m.get("jacobian", {}).get("rate", math.nan),
                          "lambda1": m.get("lyapunov", {}).get("lambda1", math.nan),
                          "memory_time": m.get("gates", {}).get("memory_time", math.nan)}
                   for site, m in meta.items()}
        self.history.append((step, summary))
        if len(self.history) >= self.max_steps:
            self.history = self.history[::2]
