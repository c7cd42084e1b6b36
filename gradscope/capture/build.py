"""From collected values to history rows, and from the history to a :class:`~gradscope.Recording`.

At the end of a scheduled step :meth:`Builder.end_step` takes the step's values off the device
(:meth:`~.collector.Collector.take`: one host copy per device), turns squared sums into
‖∂L/∂h_t‖ rows per site state and parameter norms, checks them for non-finite values
(:class:`~.alerts.Events`) and appends a row to the bounded :class:`~.history.History`.
:meth:`Builder.recording` freezes the history, the probes' results and the watch's metadata into a
Recording. Under ``DistributedDataParallel`` the parameter norms are read after the all-reduce
(:meth:`~.params.ParamGrads.read_grads`) and the ranks' recordings are merged by
:func:`~.distributed.gather_recording`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ..recording import Recording
from .alerts import Events, Notes
from .catalog import SiteTable
from .collector import Collector, sum_squares
from .history import History
from .params import ParamGrads
from .passes import Pass
from .probing import SUMMARY_KEYS, Probes
from .schedule import Schedule

__all__ = ["Builder"]


class Builder:
    """The recorded history of a watch, and the Recording made from it.

    Args:
        table: the watched sites.
        collector: this step's values.
        params: the watched parameters and their gradient hooks.
        notes: the watch's notes.
        events: the watch's events (non-finite checks and alert delivery).
        attn: the watch's attention capture, or None.
        schedule: thinned with the history when it reaches ``max_steps``.
        max_steps: the history stays below this many rows.
        history: the rows so far (shared with ``updates``, which writes its results into it).
        updates: the watch's update-ratio measurement, or None (no update ratios recorded).

    Attributes:
        history: one row per recorded step.
    """

    def __init__(self, table: SiteTable, collector: Collector, params: ParamGrads, notes: Notes,
                 events: Events, attn, schedule: Schedule, max_steps: int, history: History, updates=None):
        self.table, self.collector, self.params = table, collector, params
        self.notes, self.events, self.attn = notes, events, attn
        self.schedule, self.max_steps = schedule, max_steps
        self.history, self.updates = history, updates

    def end_step(self, step: int, passes: List[Pass]) -> None:
        """Turn the values of step ``step`` (scheduled ``passes``) into a history row; deliver alerts."""
        self.collector.flush()
        if self.attn is not None:  # values measured during the forward, and the Q/K/V hooks end
            self.attn.add_pass_values(passes)
            self.attn.end_step()
        self.params.remove()
        items = self.collector.take()  # one host copy per device
        if self.updates is not None:  # an earlier recorded step's update ratio, copied with these values
            self.updates.receive(items)

        seq_len: Dict[str, int] = {}
        for p in passes:
            for s, n in p.seq_len.items():
                seq_len[s] = max(seq_len.get(s, 0), n)
        sumsq, fired_sites, params, got_param, attn_items = sum_squares(items, seq_len, len(self.params.params))
        grads = {}
        for site, spec in self.table.sites.items():
            if not self.table.wanted(site):
                continue
            n = seq_len.get(site, 0)
            if n and site not in fired_sites:
                self.notes.add(("nograd", site), f"site {site!r} ran but no gradient reached its states "
                                                 f"(first at step {step}); its norms are recorded as 0.")
            for sname in spec.states:
                row = np.zeros(n)
                a = sumsq.get((site, sname))
                if a is not None:
                    row[:len(a)] = a
                grads[(site, sname)] = np.sqrt(row)
        params = np.sqrt(params)
        self.events.check_finite(step, grads, params, got_param, self.params.names)
        params[~got_param] = np.nan  # NaN: the parameter received no gradient in this step
        attn_row = self.attn.finalize_row(step, attn_items, grads) if self.attn is not None else {}
        if any(p.deep for p in passes):  # else a probe's step off the recording schedule: no history row
            self.history.append(step, grads, seq_len, params, attn_row)
        self.events.deliver()  # last: an alert raised here leaves the step fully recorded
        if self.history.n >= self.max_steps:
            self.history.thin()
            self.schedule.thin()

    def recording(self, meta: Dict[str, Any], probes: Probes, discovered: bool) -> Recording:
        """A frozen Recording of the history so far, the latest probe and ``meta``.

        Args:
            meta: the watch's metadata (``attention`` is added here).
            probes: the watch's probes.
            discovered: whether cell discovery has run (else "no site" is not said yet).
        """
        h = self.history
        S = h.n
        table = self.table
        sites = {n: s.to_dict() for n, s in table.sites.items() if table.wanted(n)}
        grads, seq = {}, {}
        for name, spec in table.sites.items():
            if name not in sites:
                continue
            lens = h.seq[name][:S].copy() if name in h.seq else np.zeros(S, dtype=np.int64)
            T = int(lens.max()) if S else 0
            seq[name] = lens
            for sname in spec.states:
                a = np.full((S, T), np.nan)
                stored = h.grads.get((name, sname))
                if stored is not None:
                    w = min(T, stored.shape[1])
                    a[:, :w] = stored[:S, :w]
                grads[(name, sname)] = a
        names = self.params.names
        params = {n: h.params[:S, i].copy() for i, n in enumerate(names)}
        upd, wn = {}, {}
        if self.updates is not None:
            upd = {n: h.upd[:S, i].copy() for i, n in enumerate(names)}
            wn = {n: h.wn[:S, i].copy() for i, n in enumerate(names)}
        rows = h.rows() if self.attn is not None else None
        notes = list(self.notes.lines)
        if not sites and discovered and not any("no recurrent" in n for n in notes):
            notes.append("no recurrent or attention site found; parameter gradient norms are still recorded.")
        meta = dict(meta)
        measures: Dict[Tuple[str, str], np.ndarray] = {}
        mmeta: Dict[str, Any] = {}
        if probes.latest is not None:
            step, measures, mmeta = probes.latest
            measures = {k: v for k, v in measures.items() if k[0] in sites}
            mmeta = {k: dict(v, probe_step=step) for k, v in mmeta.items() if k in sites}
            hist_steps = np.array([ph[0] for ph in probes.history], dtype=np.float64)
            for site in mmeta:
                measures[(site, "probe_steps")] = hist_steps
                for key in SUMMARY_KEYS:
                    measures[(site, "probe_" + key)] = np.array(
                        [ph[1].get(site, {}).get(key, np.nan) for ph in probes.history], dtype=np.float64)
        if self.attn is not None:  # per-step attention measures, depth flow and depth Jacobians
            measures = dict(measures)
            measures.update(self.attn.recording_measures(rows, grads))
            if self.attn.latest_probe is not None:
                pstep, pm, pmeta = self.attn.latest_probe
                measures.update(pm)
                mmeta = dict(mmeta)
                mmeta.update({k: dict(v, probe_step=pstep) for k, v in pmeta.items()})
            meta["attention"] = self.attn.meta()
        return Recording(sites=sites, steps=h.steps[:S].copy(), grads=grads, seq_lens=seq,
                         params=params, events=self.events.events,
                         unsupported=table.unsupported,
                         notes=notes, meta=meta, measures=measures, measure_meta=mmeta,
                         update_norms=upd, weight_norms=wn)
