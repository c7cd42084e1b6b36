"""Will the model learn a dependency that spans the probed length T? A calibrated prediction.

The regime (vanishing / exploding / stable) says how far the gradient reaches **now**, on the inputs
measured. Trainability is a different question: whether training will **learn** a dependency across
the probed length T. It is a prediction, and it is checked against labelled training runs
(``benchmarks/trainability.py``; its numbers are in ``benchmarks/RESULTS.md``).

The feature
-----------
``reach = log10 ‖∂h_T/∂h_0‖₂`` — how much of a perturbation of the first state survives to the last
one, measured by the probe at the model's current weights (median over the probed samples; for a
model with several recurrent sites, the site that reaches furthest). It is the sum of the per-step
log-growth rates over the sequence: for a linear recurrence with ``W = s·Q`` it is ``T·log10 s``;
asymptotically ``T·λ₁/ln 10`` with λ₁ the top Lyapunov exponent.

In the mean-field picture of Chen, Pennington & Schoenholz (2018) a vanilla RNN is trainable over
lengths up to a few times its depth scale ξ = −1/ln χ, where χ = σ_w² E[φ'(h)²] is the mean squared
singular value of the step Jacobian (λ₁ ≈ ½ ln χ): at χ < 1 (ordered phase) a signal from T steps back
arrives scaled by about χ^{T/2}, at χ > 1 (chaotic phase) perturbations grow and the gradient is
dominated by a few exploding directions. ``reach`` measures the same product on the actual weights and
inputs, so it applies to gated and user cells too, where the mean-field χ has no closed form: a reach
far below 0 is the ordered phase over this T (the signal is lost in the product), a reach far above 0
the chaotic one, and a reach near 0 the edge of chaos, where a dependency of length T can be learned.

The rule
--------
Two boundaries on ``reach`` (``lo`` < ``hi``) and the sequence length split the runs into cells; the
verdict of a cell is the outcome of the calibration runs that fall in it: ``"likely"`` or
``"unlikely"`` when at least ``min_runs`` runs fell there and at least ``purity`` of them agreed,
``"uncertain"`` otherwise. The confidence is that agreement, Laplace-smoothed: (agreeing + 1) /
(runs + 2). The boundaries, the cells and their counts are fitted on the calibration half of the
benchmark by ``benchmarks/trainability_calibrate.py`` and stored in :mod:`._trainability_table`; the
held-out half is only used to report agreement.

What the verdict does and does not claim
----------------------------------------
It is calibrated on a task whose only signal lies T − 1 steps back (recall the first of T tokens):
gradient must cross the whole sequence from the start of training. Where shorter dependencies also
carry signal (the adding problem: the second marked value is near the end), gated units (LSTM, GRU,
gated user cells) can lengthen their memory during training by opening their gates, and learn even
when ``reach`` is far below 0 now — the benchmark shows how often, and the reasons say so for gated
sites. The verdict holds for the protocol of the benchmark (Adam 1e-3, batch 64, clipping 1.0,
1 500 steps); a longer budget learns more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .._format import fmt
from . import _trainability_table as table

VERDICTS = ("likely", "unlikely", "uncertain")
GATED_KINDS = ("lstm", "gru")

__all__ = ["Trainability", "assess", "reach_of", "VERDICTS"]


@dataclass
class Trainability:
    """The trainability prediction of a model (``Diagnosis.trainability``).

    Attributes:
        verdict: ``"likely"``, ``"unlikely"`` or ``"uncertain"`` — will the model learn a dependency
            across the probed length ``seq_len`` under the benchmark protocol.
        confidence: in [0, 1]: how often the calibration runs in the same cell had this outcome
            (Laplace-smoothed); 0.5 where nothing is known.
        reasons: sentences that quote the numbers used.
        sites: per site ``{"reach", "seq_len", "kind", "verdict"}``.
        evidence: the model-level numbers (``reach``, ``seq_len``, the cell and its counts).
    """

    verdict: str
    confidence: float
    reasons: List[str] = field(default_factory=list)
    sites: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    evidence: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"verdict": self.verdict, "confidence": self.confidence, "reasons": list(self.reasons),
                "sites": {k: dict(v) for k, v in self.sites.items()}, "evidence": dict(self.evidence),
                "calibration": table.SOURCE}

    def summary(self) -> str:
        """One line: the verdict, its confidence and the main reason."""
        head = f"trainability: {self.verdict} (confidence {self.confidence:.2f})"
        return head + (f" — {self.reasons[0]}" if self.reasons else "")

    def __str__(self) -> str:
        return "\n".join([self.summary()] + [f"  - {r}" for r in self.reasons[1:]])


def reach_of(jacobian_norms: np.ndarray) -> float:
    """``log10 ‖∂h_T/∂h_0‖₂``: median over samples of the Jacobian norm at the longest lag.

    Args:
        jacobian_norms: ``[B, T+1]`` norms by lag (``Recording.jacobian_norms``); column ``T`` is
            the lag that spans the whole sequence.

    Returns:
        The reach, or NaN where no sample has a finite positive norm at that lag.

    Example:
        >>> round(reach_of(np.array([[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]])), 4)
        -0.6021
    """
    jn = np.asarray(jacobian_norms, dtype=np.float64)
    if jn.ndim != 2 or jn.shape[1] < 2:
        return math.nan
    last = jn[:, -1]
    last = last[np.isfinite(last) & (last > 0)]
    return float(np.median(np.log10(last))) if last.size else math.nan


def _t_bin(T: float) -> int:
    for i, edge in enumerate(table.T_EDGES):
        if T <= edge:
            return i
    return len(table.T_EDGES)


def _reach_bin(r: float) -> str:
    return "below" if r < table.LO else ("above" if r > table.HI else "window")


def _cell_verdict(reach: float, T: float):
    """(verdict, confidence, cell name, runs, learned) from the calibration table."""
    rb, tb = _reach_bin(reach), _t_bin(T)
    n, learned = table.CELLS.get((rb, tb), (0, 0))
    cell = f"reach {rb}, {table.T_NAMES[tb]}"
    if n == 0:
        return "uncertain", 0.5, cell, n, learned
    share = learned / n
    if n >= table.MIN_RUNS and share >= table.PURITY:
        return "likely", (learned + 1) / (n + 2), cell, n, learned
    if n >= table.MIN_RUNS and 1 - share >= table.PURITY:
        return "unlikely", (n - learned + 1) / (n + 2), cell, n, learned
    agree = max(learned, n - learned)
    return "uncertain", (agree + 1) / (n + 2), cell, n, learned


def assess(recording, sites: Optional[Dict[str, Dict[str, Any]]] = None) -> Trainability:
    """The trainability prediction for the recurrent sites of a Recording.

    Args:
        recording: a Recording with probe measures (``gradscope.probe`` or ``watch`` with probes).
        sites: the diagnosis's site table (``kind`` per site), or None to read it from the Recording.

    Returns:
        :class:`Trainability`. Without Jacobian norms the verdict is ``"uncertain"``, and the
        reasons say which measurement is missing.
    """
    per: Dict[str, Dict[str, Any]] = {}
    recurrent = [s for s in recording.sites if recording.site_info(s).get("kind") != "attention"]
    for s in recurrent:
        kind = (sites or {}).get(s, {}).get("kind") or recording.site_info(s).get("kind")
        if s not in recording.measure_meta or "jacobian" not in recording.site_measures(s):
            continue
        jn = recording.jacobian_norms(s)
        T = float(recording.site_measures(s).get("seq_len", jn.shape[1] - 1))
        r = reach_of(jn)
        verdict, conf, cell, n, learned = _cell_verdict(r, T) if math.isfinite(r) else ("uncertain", 0.5, "", 0, 0)
        per[s] = {"kind": kind, "reach": r, "seq_len": T, "verdict": verdict, "confidence": conf}
    if not recurrent:
        return Trainability("uncertain", 0.5, ["no recurrent site: the trainability prediction covers "
                                                "recurrent models only."])
    skipped = [s for s in recurrent if recording.measure_meta.get(s, {}).get("skipped")]
    if not per and skipped:
        return Trainability("uncertain", 0.5, [
            f"no Jacobian norms could be measured: {', '.join(skipped)} hold NaN/inf weights or inputs, "
            f"so no prediction is made."])
    if not per:
        return Trainability("uncertain", 0.5, [
            "no Jacobian norms were measured, so how far the gradient reaches across the sequence is "
            "unknown; run gradscope.probe(model, batch) (or watch(model) with its default probes) "
            "for a prediction."])
    finite = {s: d for s, d in per.items() if math.isfinite(d["reach"])}
    if not finite:
        return Trainability("uncertain", 0.5, [
            "the Jacobian norms over the whole sequence are not finite (NaN/inf weights or states), "
            "so no prediction is made."], per)
    best = max(finite, key=lambda s: finite[s]["reach"])
    d = finite[best]
    r, T = d["reach"], d["seq_len"]
    verdict, conf, cell, n, learned = _cell_verdict(r, T)
    reasons = [_main_reason(verdict, best, r, T, len(finite))]
    reasons.append(f"calibration: of {n} benchmark run(s) in the same cell ({cell}), {learned} learned "
                   f"({table.SOURCE}).")
    gated = [s for s, v in finite.items() if v["kind"] in GATED_KINDS]
    if verdict != "likely" and r < table.LO and gated:
        reasons.append(
            f"{', '.join(gated)} {'is' if len(gated) == 1 else 'are'} gated: the reach above is what the "
            f"gradient crosses now; gates can lengthen memory during training when shorter dependencies "
            f"give them a signal — in the benchmark's adding task (one of two values near the end) "
            f"{table.GATED_ADDING[1]} of {table.GATED_ADDING[0]} gated runs with reach below "
            f"{table.LO:.2g} learned, against {table.GATED_RECALL[1]} of {table.GATED_RECALL[0]} on "
            f"the recall task, whose only signal is T − 1 steps back.")
    inputs = recording.meta.get("inputs")
    if isinstance(inputs, str) and inputs:
        reasons.append(f"measured on {inputs}.")
    ev = {"reach": r, "seq_len": T, "site": best, "cell": cell, "cell_runs": n, "cell_learned": learned,
          "lo": table.LO, "hi": table.HI}
    return Trainability(verdict, conf, reasons, per, ev)


def _main_reason(verdict: str, site: str, r: float, T: float, nsites: int) -> str:
    where = f"at {site}" + (f", the furthest-reaching of {nsites} sites" if nsites > 1 else "")
    head = f"‖∂h_T/∂h_0‖₂ = 10^{r:.3g} over T = {fmt(T)} steps {where}"
    if r < table.LO:
        return (f"{head}: below 10^{table.LO:.2g}, a perturbation of the first state is lost in the "
                f"product of Jacobians (ordered phase over this length).")
    if r > table.HI:
        return (f"{head}: above 10^{table.HI:.2g}, perturbations grow across the sequence (chaotic "
                f"phase over this length).")
    return (f"{head}: within [10^{table.LO:.2g}, 10^{table.HI:.2g}], the signal crosses the sequence "
            f"without vanishing or exploding (near the edge of chaos).")
