"""diagnose(): name the regime of every site with numbers, and say what to change.

Rules (defaults in :class:`Rules`, all configurable through :func:`diagnose`'s keywords):

* **vanishing** — the gradient horizon (first lag at which ‖∂h_T/∂h_{T−k}‖, or the gradient-norm
  profile relative to where the loss enters, falls below ``threshold``, default 1e-3) is shorter
  than the sequence length; without a measured horizon (``probe(..., jacobians=False)``), when
  λ₁ < −``lyapunov_margin`` puts the estimated horizon ln(1/``threshold``)/|λ₁| inside it.
* **exploding** — growth passes 1/``threshold`` within the sequence, or the top Lyapunov exponent
  is clearly positive (λ₁ > ``lyapunov_margin`` per step *and* λ₁·T > ln 10), or the parameter
  gradient norm spikes to more than ``spike_ratio`` × its median during training.
* **stable** — otherwise.

The site rules are :func:`gradscope.analysis.evidence.regime`, the one regime rule (its default
thresholds are named constants there); the spike is a model-wide finding.

Evidence, best first: probe measures (Jacobian norms by lag, Lyapunov exponents, weights, gates);
otherwise the watched gradient-norm profile ‖∂L/∂h_t‖ along the direction the gradient travels
(median over the last ``steps`` recorded steps). Every site says which evidence it used. A profile
can only show how much of the gradient that enters at the end reaches the start: where the loss
touches every position, it cannot separate decay from fresh gradient, and the report says so.

Other findings: ``short_memory`` (LSTM/GRU memory time τ = −1/ln f̄ below ``short_memory_ratio``
× the sequence length), ``saturated_gates`` (share of gate activations < 0.1 or > 0.9 above
``saturation``), ``dead_units`` (ReLU units inactive over every sample and step), ``nonfinite``
(NaN/inf gradients), ``precision_underflow`` (the Jacobian norm falls below float32 epsilon within
the sequence, so contributions from further back are below rounding error of nearby ones).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .._format import fmt, jsonable, remedy_index
from .._renderers import renderer
from ..errors import GradscopeError, did_you_mean
from ..recording import Recording
from .attention_rules import AttentionRules, site_diagnosis, stack_findings
from .evidence import HORIZON_THRESHOLD, LYAPUNOV_MARGIN
from .evidence import regime as evidence_regime
from .finding import Finding, Rules
from .remedies import REINITIALISING, finding_remedies
from .trainability import assess

SCHEMA_VERSION = 2  # 2: remedies listed once at the top level, findings point to them by id
FLOAT32_EPS = float(np.finfo(np.float32).eps)
SEVERITIES = ("info", "warning", "critical")
REGIMES = ("vanishing", "exploding", "stable", "inconclusive", "unmeasured")
INCONCLUSIVE_PROFILE = (
    "the watched gradient-norm profile does not fall below the threshold, but a profile cannot show "
    "stability: a flat one comes both from a long reach and from gradient injected along the way (a "
    "loss at every position, the layer above); Jacobian evidence from a probe decides")

__all__ = ["diagnose", "Diagnosis", "SCHEMA_VERSION"]


# ------------------------------------------------------------------------------ evidence
def _profile_fit(by_travel: np.ndarray, threshold: float) -> Dict[str, float]:
    """Decay of a gradient-norm profile ordered along the direction the gradient travels.

    Lag 0 is the peak of the profile; the horizon is the first lag after it where the norm falls
    below ``threshold`` × peak. Growth *towards* the peak cannot be told apart from gradient
    injected along the way (by a loss at many positions or by the layer above), so it is reported
    as ``growth`` and never decides "exploding" on its own.
    """
    g = np.asarray(by_travel, dtype=np.float64)
    ok = np.isfinite(g) & (g > 0)
    if ok.sum() < 2:
        return {}
    p = int(np.nanargmax(np.where(ok, g, -np.inf)))
    seg = g[p:] / g[p]
    out = {"growth": float(g[p] / g[ok][0]), "peak_lag": float(p), "grad_ratio": float(g[ok][-1] / g[p])}
    good = np.isfinite(seg) & (seg > 0)
    below = np.flatnonzero(np.isfinite(seg) & (seg < threshold))
    out["horizon"] = float(below[0]) if below.size else math.inf
    out["span"] = float(len(seg) - 1)
    lags = np.flatnonzero(good)
    out["rate"] = float(np.polyfit(lags, np.log(seg[good]), 1)[0]) if len(lags) >= 2 else math.nan
    return out


def _site_evidence(rec, site: str, rules: Rules) -> Tuple[Dict[str, float], List[str], List[str]]:
    """(evidence numbers, evidence used, caveats) for one site."""
    info = rec.site_info(site)
    ev: Dict[str, float] = {}
    used: List[str] = []
    caveats: List[str] = []
    m = rec.site_measures(site) if site in rec.measure_meta else {}
    if info.get("hidden_size") is not None:
        ev["hidden_size"] = float(info["hidden_size"])
    if info.get("num_layers") is not None:
        ev["num_layers"] = float(info["num_layers"])
    if m:
        ev["seq_len"] = float(m["seq_len"])
        jac = m.get("jacobian")
        if jac:
            used.append("jacobian_norms")
            ev["rate"] = float(jac["rate"])
            ev["horizon"] = float(jac["horizon"])
            ev["explosion_lag"] = float(jac["explosion_lag"])
            jn = rec.jacobian_norms(site)
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN lag: noted as non-finite already
                med = np.exp(np.nanmedian(np.log(jn), axis=0))
            under = np.flatnonzero(med < FLOAT32_EPS)
            ev["underflow_lag"] = float(under[0]) if under.size else math.inf
        ly = m.get("lyapunov")
        if ly:
            used.append("lyapunov")
            ev["lambda1"] = float(ly["lambda1"])
        w = m.get("weights")
        if w:
            used.append("weights")
            for k in ("w_hh_norm", "spectral_radius", "forget_bias", "update_bias"):
                if k in w:
                    ev[k] = float(w[k])
        gates = m.get("gates") or {}
        if gates:
            used.append("gate_stats")
            for k in ("saturated", "memory_time", "memory_time_median", "keep_mean", "dead_units"):
                if k in gates:
                    ev[k] = float(gates[k])
    # watched gradient-norm profile
    if len(rec.steps) and site in rec.sites:
        g = rec.grad_norms(site, "h")
        if g.size:
            last = g[-rules.steps:]
            lens = rec.seq_lens(site)[-rules.steps:]
            T = int(lens.max()) if lens.size else 0
            if T >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no gradient there
                    prof = np.nanmedian(np.where(last > 0, last, np.nan), axis=0)[:T]
                reverse = info.get("direction") == "reverse"
                # the backward pass of a forward recurrence travels from position T-1 to 0
                fit = _profile_fit(prof if reverse else prof[::-1], rules.threshold)
                if fit:
                    ev.setdefault("seq_len", float(T))
                    ev["grad_ratio"] = fit["grad_ratio"]
                    ev["growth"] = fit["growth"]
                    if "jacobian_norms" not in used:
                        used.append("grad_norm_profile")
                        ev["rate"] = fit["rate"]
                        # the horizon counts from the profile's peak; inside the span it is measured
                        ev["horizon"] = fit["horizon"] + fit["peak_lag"] if math.isfinite(fit["horizon"]) else math.inf
                        caveats.append("watch-only evidence: the gradient-norm profile shows decay, but "
                                       "growth along it cannot be told from gradient injected on the way "
                                       "(a loss at many positions, the layer above); run "
                                       "gradscope.probe(model, batch) or watch(..., probe_every=N) for "
                                       "Jacobians by lag and Lyapunov exponents")
    ev.update(_global_grad_stats(rec))
    return ev, used, caveats


def _global_grad_stats(rec) -> Dict[str, float]:
    """Median and maximum over recorded steps of the global parameter-gradient norm."""
    pn = rec.param_grad_norms()
    if not pn or not len(rec.steps):
        return {}
    with np.errstate(invalid="ignore"):
        tot = np.sqrt(np.nansum(np.vstack(list(pn.values())) ** 2, axis=0))
    tot = tot[np.isfinite(tot) & (tot > 0)]
    if not tot.size:
        return {}
    return {"grad_norm_median": float(np.median(tot)), "grad_norm_max": float(np.max(tot))}


# ------------------------------------------------------------------------------ findings
def _explain_vanishing(site, ev, kind: str = "", threshold: float = 1e-3) -> str:
    """What the horizon measured, and no more: the reach of the gradient at these weights, now."""
    T, h, rate = ev.get("seq_len"), ev.get("horizon"), ev.get("rate", math.nan)
    per = f"by a factor {math.exp(rate):.3g} per step (rate {rate:.3g}/step), " if math.isfinite(rate) else ""
    text = (f"The gradient reaching {site} shrinks {per}falling below {threshold:.2g} of its size after "
            f"{fmt(h)} of {fmt(T)} steps: at the current weights, on the inputs measured, states more "
            f"than {fmt(h)} steps back receive under {threshold:.2g} of the gradient the nearest ones do.")
    if kind in ("lstm", "gru"):
        text += (" This is what the gradient reaches now: gates can open during training and lengthen it "
                 "(see the trainability prediction).")
    return text


def _explain_exploding(site, ev, reason) -> str:
    T, lam, lag = ev.get("seq_len"), ev.get("lambda1", math.nan), ev.get("explosion_lag", math.inf)
    if math.isfinite(lag) and lag <= (T or math.inf):
        return (f"The gradient through {site} grows past 1/threshold after {fmt(lag)} of {fmt(T)} steps"
                + (f" (λ₁ = {lam:.3g}/step)" if math.isfinite(lam) else "") + ", so updates are dominated "
                "by a few directions and can overflow.")
    return (f"Perturbations of {site} grow by about e^{lam:.3g} = {math.exp(lam):.3g}× per step (top "
            f"Lyapunov exponent), {math.exp(min(lam * (T or 0), 700)):.3g}× over the {fmt(T)}-step sequence.")


def _site_findings(site: str, info: Dict[str, Any], ev: Dict[str, float], used: List[str],
                   regime: str, reason: str, rules: Rules) -> List[Finding]:
    kind = info.get("kind", "cell")
    module = info.get("module", site)
    out: List[Finding] = []
    T = ev.get("seq_len", math.nan)

    def add(fkind, severity, explanation, keys, evidence_used=None):
        e = {k: ev[k] for k in keys if k in ev}
        out.append(Finding(fkind, site, severity, e, explanation,
                           finding_remedies(fkind, kind, ev, site, module), list(evidence_used or used)))

    base = ["seq_len", "rate", "horizon", "explosion_lag", "lambda1", "w_hh_norm", "spectral_radius",
            "grad_ratio", "grad_norm_median", "grad_norm_max", "memory_time", "forget_bias"]
    if regime == "vanishing":
        h = ev.get("horizon", math.inf)
        sev = "critical" if h < 0.1 * T else "warning"
        add("vanishing", sev, _explain_vanishing(site, ev, kind, rules.threshold), base)
    elif regime == "exploding":
        sev = "critical" if ev.get("explosion_lag", math.inf) <= T else "warning"
        add("exploding", sev, _explain_exploding(site, ev, reason), base)
    tau = ev.get("memory_time")
    if kind in ("lstm", "gru") and tau is not None and math.isfinite(T) and tau < rules.short_memory_ratio * T:
        gate = "forget" if kind == "lstm" else "update"
        bias = ev.get("forget_bias" if kind == "lstm" else "update_bias")
        btxt = f" (effective {gate} bias {bias:.3g})" if bias is not None else ""
        add("short_memory", "warning" if regime == "vanishing" else "info",
            f"The mean {gate} gate of {site} is {ev.get('keep_mean', math.nan):.3g}{btxt}, a memory time "
            f"τ = −1/ln f = {tau:.3g} steps, far below the {fmt(T)}-step sequence.",
            ["memory_time", "memory_time_median", "keep_mean", "forget_bias", "update_bias", "seq_len"],
            ["gate_stats", "weights"])
    sat = ev.get("saturated")
    if sat is not None and sat > rules.saturation:
        add("saturated_gates", "critical" if sat > 0.6 else "warning",
            f"{sat:.0%} of the gate activations of {site} are below 0.1 or above 0.9, where the "
            f"sigmoid's derivative is under 0.09, so little gradient passes through the gates.",
            ["saturated", "seq_len"], ["gate_stats"])
    dead = ev.get("dead_units")
    if dead is not None and dead > 0:
        add("dead_units", "critical" if dead >= 0.5 else ("warning" if dead >= 0.1 else "info"),
            f"{dead:.0%} of the ReLU units of {site} never activate on any sample or step of the batch, "
            f"so no gradient flows through them.", ["dead_units", "hidden_size"], ["gate_stats"])
    ul = ev.get("underflow_lag", math.inf)
    if math.isfinite(ul) and ul < T:
        lam = ev.get("lambda1", math.nan)
        add("precision_underflow", "warning",
            f"The Jacobian norm of {site} falls below float32 epsilon ({FLOAT32_EPS:.2g}) after {fmt(ul)} "
            f"of {fmt(T)} steps" + (f" (15.9/|λ₁| = {15.9 / abs(lam):.3g})" if math.isfinite(lam) and lam < 0 else "")
            + ": contributions from further back are below rounding error of nearby ones.",
            ["underflow_lag", "lambda1", "seq_len", "rate"], ["jacobian_norms"])
    return out


# ------------------------------------------------------------------------------ Diagnosis
class Diagnosis:
    """The verdict on a Recording: a regime per site, findings with evidence and remedies.

    Attributes:
        findings: list of :class:`Finding`, most severe first.
        sites: the sites diagnosed.
    """

    def __init__(self, sites: Dict[str, Dict[str, Any]], findings: List[Finding], modules: List[Dict[str, Any]],
                 notes: List[str], meta: Dict[str, Any], rules: Rules, recording=None, trainability=None):
        self.recording = recording  # the Recording diagnosed (for figures); plain data
        #: :class:`~gradscope.analysis.trainability.Trainability`: will the model learn a dependency
        #: across the probed length (a calibrated prediction, not a measurement); None without
        #: recurrent sites.
        self.trainability = trainability
        self._sites = sites
        self.findings = findings
        self.modules = modules
        self.notes = notes
        self.meta = meta
        self.rules = rules

    @property
    def sites(self) -> Tuple[str, ...]:
        return tuple(self._sites)

    def _check(self, site: str) -> str:
        if site not in self._sites:
            raise GradscopeError(f"unknown site {site!r}; the diagnosis has {list(self._sites)}."
                                 f"{did_you_mean(site, self._sites)}")
        return site

    def regime(self, site: str) -> str:
        """``"vanishing"``, ``"exploding"``, ``"stable"``, ``"inconclusive"`` (watch-only evidence
        that cannot show stability: see ``site_summary(site)["reason"]``) or ``"unmeasured"`` (its
        weights or inputs hold NaN/inf, so the probe measured nothing)."""
        return self._sites[self._check(site)]["regime"]

    def site_summary(self, site: str) -> Dict[str, Any]:
        """``regime``, ``horizon``, ``lambda1``, ``rate``, ``seq_len``, ``kind``, ``evidence`` of a site."""
        s = self._sites[self._check(site)]
        ev = s["evidence"]
        return {"regime": s["regime"], "reason": s["reason"], "kind": s["kind"], "module": s["module"],
                "horizon": ev.get("horizon"), "lambda1": ev.get("lambda1"), "rate": ev.get("rate"),
                "seq_len": ev.get("seq_len"), "evidence": dict(ev), "evidence_used": list(s["evidence_used"])}

    def findings_for(self, site: str) -> List[Finding]:
        return [f for f in self.findings if f.site == site]

    @property
    def worst(self) -> Optional[str]:
        """The highest severity among the findings, or None."""
        sev = [SEVERITIES.index(f.severity) for f in self.findings]
        return SEVERITIES[max(sev)] if sev else None

    # ---------------------------------------------------------------- rendering
    def to_dict(self) -> Dict[str, Any]:
        return jsonable({
            "schema": SCHEMA_VERSION, "gradscope_version": self.meta.get("gradscope_version"),
            "source": self.meta.get("source"), "rules": asdict(self.rules),
            "sites": [{"name": n, "kind": s["kind"], "module": s["module"], "regime": s["regime"],
                       "reason": s["reason"], "evidence": s["evidence"], "evidence_used": s["evidence_used"],
                       "caveats": s["caveats"]} for n, s in self._sites.items()],
            "modules": self.modules,
            "findings": self._finding_dicts(),
            "remedies": remedy_index(self.findings)[0],
            "trainability": self.trainability.to_dict() if self.trainability is not None else None,
            "schedule": self.meta.get("schedule"), "measured_on": self.meta.get("measured_on"),
            "notes": list(self.notes),
        })

    def _finding_dicts(self) -> List[Dict[str, Any]]:
        """Findings for JSON: each remedy as a pointer (``id`` into the top-level ``remedies``, with
        its name, title, why and reference); the code lives once, in ``remedies``."""
        _, refs = remedy_index(self.findings)
        out = []
        for f, ids in zip(self.findings, refs):
            d = f.to_dict()
            d["remedies"] = [dict({k: v for k, v in r.items() if k != "code"}, id=i)
                             for r, i in zip(d["remedies"], ids)]
            d["remedy_ids"] = ids
            out.append(d)
        return out

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def schedule_line(self) -> str:
        """What the watch's schedule did and cost, in one sentence ("" for a probe)."""
        sc = self.meta.get("schedule")
        if not isinstance(sc, dict):
            return ""
        every, pe = sc.get("every"), sc.get("probe_every")
        if sc.get("mode") != "budget":
            how = f"fixed: every {every} step(s)" + (f", probe every {pe}" if isinstance(pe, int) else "")
        else:  # the budget spaces what is not fixed: say which part that is
            b = f"{sc['overhead_budget']:.0%}"
            if isinstance(every, int):
                how = f"deep pass every {every} step(s) (fixed), probes within a {b} budget"
            elif isinstance(pe, int):
                how = f"deep passes within a {b} budget, probe every {pe} step(s)"
            elif pe is None:
                how = f"deep passes within a {b} budget, no probes"
            else:
                how = f"budget {b} of the loop's time"
        real = sc.get("realised_overhead")
        cost = f", realised overhead {real:.1%}" if isinstance(real, (int, float)) else ""
        light, budget = sc.get("light_overhead"), sc.get("overhead_budget")
        if isinstance(light, (int, float)) and isinstance(budget, (int, float)) and light > budget:
            cost += (f", of which {light:.1%} the hooks on every step alone — over the budget: with "
                     f"steps this short only the first deep pass and probe (and those max_interval "
                     f"forces) run")
        return (f"schedule: {how} — {sc.get('deep_passes', 0)} deep pass(es), {sc.get('probes', 0)} "
                f"probe(s){cost}")

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, notes: Optional[List[str]] = None) -> str:
        """The plain-text report (``str(diag)``): :func:`gradscope.render.text.diagnosis_to_text`.
        ``notes`` replaces ``self.notes`` (a checkpoint report adds its own)."""
        return renderer("diagnosis.text")(self, notes=notes)

    def to_markdown(self, notes: Optional[List[str]] = None) -> str:
        """The markdown report: :func:`gradscope.render.text.diagnosis_to_markdown`. ``notes``
        replaces ``self.notes``."""
        return renderer("diagnosis.markdown")(self, notes=notes)

    def to_html(self, path=None, notes: Optional[List[str]] = None) -> str:
        """One self-contained HTML report (figures embedded, no network); written to ``path`` if
        given. Returns the HTML text. ``notes`` replaces ``self.notes``
        (:func:`gradscope.render.html.diagnosis_to_html`)."""
        return renderer("diagnosis.html")(self, path=path, notes=notes)

    def _repr_html_(self) -> str:
        """The notebook display (:func:`gradscope.render.html.diagnosis_repr_html`)."""
        return renderer("diagnosis.repr_html")(self)

    def __repr__(self) -> str:
        regs = {}
        for s in self._sites.values():
            regs[s["regime"]] = regs.get(s["regime"], 0) + 1
        return f"<Diagnosis {len(self._sites)} sites {regs} findings={len(self.findings)}>"


def _module_lines(rec, sites: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[str, List[str]] = {}
    for n, s in sites.items():
        groups.setdefault(s["module"], []).append(n)
    out = []
    for mod, names in groups.items():
        info = rec.site_info(names[0])
        regs = [sites[n]["regime"] for n in names]
        counts = {r: regs.count(r) for r in REGIMES if regs.count(r)}
        hs = [sites[n]["evidence"].get("horizon") for n in names]
        hs = [h for h in hs if h is not None and math.isfinite(h)]
        T = sites[names[0]]["evidence"].get("seq_len")
        shape = ""
        if info.get("num_layers") is not None:
            shape = (f" ({info.get('module_type', info['kind'])}, {info['num_layers']} layer(s)"
                     f"{' × 2 directions' if info.get('bidirectional') else ''})")
        detail = ", ".join(f"{r} in {c}/{len(names)} site(s)" for r, c in counts.items())
        if hs:
            detail += f"; horizons {fmt(min(hs))}–{fmt(max(hs))} of {fmt(T)} steps"
        worst = next((r for r in ("unmeasured", "exploding", "vanishing", "inconclusive") if r in counts), "stable")
        out.append({"module": mod or "(model)", "regime": worst, "counts": counts,
                    "line": f"{mod or '(model)'}{shape}: {detail}"})
    return out


def _measured_on(rec) -> str:
    """What the evidence was measured on: the inputs, the module's mode and, for half-precision
    weights, the working precision (from the Recording)."""
    bits = []
    if isinstance(rec.meta.get("inputs"), str):
        bits.append(rec.meta["inputs"])
    if rec.meta.get("mode") in ("train", "eval"):
        bits.append(f"{rec.meta['mode']} mode")
    prec = rec.meta.get("precision")
    if isinstance(prec, dict) and prec.get("stored"):
        bits.append(f"weights stored in {prec['stored']}, measured in {prec.get('measured', 'float32')}")
    return ", ".join(bits)


def _owner_site(rec, name: str) -> Optional[str]:
    """The site whose weights include the parameter ``name`` (``enc.weight_hh_l0`` → ``enc.l0``), or None."""
    for site in rec.sites:
        mod = rec.site_info(site).get("module", site)
        pre = f"{mod}." if mod else ""
        if not name.startswith(pre):
            continue
        if site == mod:  # a cell or an attention module: every parameter under it
            return site
        local, suffix = name[len(pre):], site[len(pre):]
        if any(local == f"{stem}_{suffix}" for stem in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")):
            return site
    return None


def _count(b: Dict[str, Any]) -> str:
    parts = [f"{b['nan']} NaN" if b.get("nan") else "", f"{b['inf']} inf" if b.get("inf") else ""]
    return f"{b['name']} holds {' and '.join(p for p in parts if p)} (of {b.get('numel')} values)"


def nonfinite_weight_findings(bad: List[Dict[str, Any]], groups: Dict[str, List[Dict[str, Any]]],
                              sites: Dict[str, Dict[str, Any]], folded: int = 0) -> List[Finding]:
    """One critical ``nonfinite`` finding per site (or ``"(model)"``/``"(checkpoint)"``) whose weights
    hold NaN or inf, naming the tensors and counting their bad values.

    ``bad`` as from :func:`gradscope.measure.probe.nonfinite_tensors`; ``groups`` maps a site to its
    entries of ``bad``; ``folded`` counts the probe's NaN/inf events that these weights caused.
    """
    out = []
    for n, (site, items) in enumerate(groups.items()):
        names = "; ".join(_count(b) for b in items[:8]) + (f"; and {len(items) - 8} more tensor(s)"
                                                           if len(items) > 8 else "")
        where = (f" {site} was not measured: its Jacobians, exponents and spectra would be NaN."
                 if sites.get(site, {}).get("regime") == "unmeasured" else "")
        after = (f" In the probe's pass NaN/inf then reached {folded} state(s) or gradient(s); they are not "
                 f"listed separately." if folded and n == 0 else "")
        ev = {"tensors": float(len(items)), "nan": float(sum(b.get("nan", 0) for b in items)),
              "inf": float(sum(b.get("inf", 0) for b in items))}
        kind = sites.get(site, {}).get("kind") or "cell"
        kind = kind if kind in ("rnn_tanh", "rnn_relu", "lstm", "gru", "cell", "attention") else "cell"
        out.append(Finding("nonfinite", site, "critical", ev,
                           f"The weights hold non-finite values: {names}. Training diverged before this was "
                           f"saved (or the file is damaged); every output and gradient these weights touch "
                           f"is NaN or inf.{where} Restore the last finite checkpoint and train on from there."
                           + after,
                           finding_remedies("nonfinite", kind, {}, site, sites.get(site, {}).get("module") or site),
                           ["weights"]))
    return out


def diagnose(recording, *, threshold: float = HORIZON_THRESHOLD, lyapunov_margin: float = LYAPUNOV_MARGIN,
             short_memory_ratio: float = 0.1, saturation: float = 0.3, spike_ratio: float = 100.0,
             steps: int = 20, attention_rules=None, trained: bool = False) -> Diagnosis:
    """Name the regime of every site of a Recording and list findings with evidence and remedies.

    Args:
        recording: from :func:`gradscope.watch` (``scope.recording``) or :func:`gradscope.probe`.
        threshold: norm ratio that ends the gradient horizon, in (0, 1); growth past its inverse
            within the sequence is "exploding".
        lyapunov_margin: λ₁ above this (per step) counts as clearly positive (with λ₁·T > ln 10).
        short_memory_ratio: LSTM/GRU memory time below this share of the sequence → ``short_memory``.
        saturation: share of saturated gate activations above which ``saturated_gates`` is raised.
        spike_ratio: a global gradient norm this many times its median is an exploding spike.
        steps: how many of the last recorded steps the watch-only profile uses.
        attention_rules: thresholds for attention sites, an
            :class:`~gradscope.analysis.attention_rules.AttentionRules` (default: its defaults).
        trained: the weights are trained (a checkpoint): remedies that re-initialise weights or
            change the architecture are listed after those that work during training.

    A site whose weights or inputs hold NaN/inf was not measured by the probe: its regime is
    ``"unmeasured"``. Non-finite weights listed by the probe (``meta["nonfinite_weights"]``) give
    one critical ``nonfinite`` finding per site (or ``"(model)"`` for tensors outside every site)
    naming the tensors and counting their bad values; the probe's own NaN/inf events they caused
    are folded into it.

    Returns:
        :class:`Diagnosis`.

    Raises:
        GradscopeError: an empty recording, or a threshold outside its range.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(2, 16)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.mul_(0.1)
        >>> diag = gradscope.diagnose(gradscope.probe(rnn, torch.randn(60, 2, 2)))
        >>> diag.regime("l0")
        'vanishing'
    """
    if not isinstance(recording, Recording):
        raise GradscopeError(f"diagnose() expects a gradscope Recording (scope.recording or "
                             f"gradscope.probe(...)), got {type(recording).__name__}.")
    rules = Rules(threshold, lyapunov_margin, short_memory_ratio, saturation, spike_ratio, steps)
    rec = recording
    if len(rec.steps) == 0 and not rec.measure_meta:
        raise GradscopeError(
            "empty recording: no step was recorded. Inside `with gradscope.watch(model)`, run at least "
            "one forward and backward pass (steps are backward passes), or use gradscope.probe(model, batch).")
    sites: Dict[str, Dict[str, Any]] = {}
    findings: List[Finding] = []
    notes = list(rec.notes)
    for u in getattr(rec, "unsupported", ()) or ():
        notes.append(f"{u.get('module') or '(model)'} ({u.get('type')}) is not measured: {u.get('reason')}.")
    missing_probe = []
    attn_sites = [s for s in rec.sites if rec.site_info(s).get("kind") == "attention"]
    if attn_sites:  # transformer blocks: their own rules (analysis/attention_rules.py)
        arules = attention_rules if attention_rules is not None else AttentionRules()
        for site in attn_sites:
            sites[site], f = site_diagnosis(rec, site, rules, arules)
            findings += f
        findings += stack_findings(rec, rules, arules, sites)
    for site in rec.sites:
        if site in sites:
            continue
        info = rec.site_info(site)
        skipped = rec.measure_meta.get(site, {}).get("skipped")
        if skipped:  # the probe could not measure it (non-finite weights or inputs)
            sites[site] = {"kind": info.get("kind"), "module": info.get("module", site), "regime": "unmeasured",
                           "reason": f"not measured: {skipped}",
                           "evidence": {"seq_len": float(rec.measure_meta[site].get("seq_len", math.nan))},
                           "evidence_used": [], "caveats": [f"not measured: {skipped}"]}
            continue
        ev, used, caveats = _site_evidence(rec, site, rules)
        if not used:
            regime, reason = "stable", "no usable evidence"
            caveats.append("no gradient reached this site's states in the recorded steps")
        else:
            regime, reason = evidence_regime(ev, threshold=rules.threshold,
                                                 lyapunov_margin=rules.lyapunov_margin)
            if regime == "stable" and used == ["grad_norm_profile"]:
                regime, reason = "inconclusive", INCONCLUSIVE_PROFILE
        sites[site] = {"kind": info.get("kind"), "module": info.get("module", site), "regime": regime,
                       "reason": reason, "evidence": ev, "evidence_used": used, "caveats": caveats}
        findings += _site_findings(site, info, ev, used, regime, reason, rules)
        if site not in rec.measure_meta:
            missing_probe.append(site)
    # model-wide: non-finite weights, non-finite events and gradient-norm spikes
    bad_weights = rec.meta.get("nonfinite_weights") or []
    events = list(rec.events)
    if bad_weights:
        # a site whose own weights hold NaN/inf has no regime, whatever its captured numbers say
        # (attention capture measures on: NaN in, NaN out)
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for b in bad_weights:
            groups.setdefault(_owner_site(rec, b["name"]) or "(model)", []).append(b)
        owners = set(groups) & set(sites)
        for site in owners:
            if sites[site]["regime"] != "unmeasured":
                sites[site].update(regime="unmeasured", reason="not measured: its weights hold NaN or inf",
                                   evidence_used=[],
                                   caveats=sites[site]["caveats"] + ["not measured: its weights hold NaN or inf"])
        findings = [f for f in findings if f.site not in owners]
        # in a probe, the NaN/inf events downstream of the weights are one finding, not dozens
        folded = [e for e in events if e.get("kind") == "nonfinite"] if rec.meta.get("source") == "probe" else []
        events = [e for e in events if not any(e is f for f in folded)]
        findings += nonfinite_weight_findings(bad_weights, groups, sites, len(folded))
    for e in events:
        if e.get("kind") == "nonfinite":
            where = e.get("site") or e.get("param")
            what = (f"state {e.get('state')} at position {e.get('t')}" if e.get("site") else "parameter gradient")
            findings.append(Finding("nonfinite", where, "critical", {"step": float(e["step"])},
                                    f"A {e.get('value')} appeared in the {what} of {where} at training step "
                                    f"{e['step']}; every update after it is corrupted.",
                                    finding_remedies("nonfinite", sites.get(where, {}).get("kind", "cell"), {}, where, where),
                                    ["events"]))
    gev = _global_grad_stats(rec)
    gmed, gmax = gev.get("grad_norm_median"), gev.get("grad_norm_max")
    if gmed and gmax and gmax > rules.spike_ratio * gmed:
        gev["spike_ratio"] = gmax / gmed
        findings.append(Finding("exploding", "(model)", "warning", gev,
                                f"The global gradient norm reached {gmax:.3g}, {gmax / gmed:.3g}× its median "
                                f"{gmed:.3g}: a spike typical of exploding gradients.",
                                finding_remedies("exploding", "cell", gev, "(model)", ""), ["param_grad_norms"]))
    if missing_probe and rec.sites:
        notes.append("gate statistics, Jacobians by lag and Lyapunov exponents need a probe; sites "
                     f"without them: {missing_probe}. Record them with gradscope.probe(model, batch) "
                     "or watch(model, probe_every=N).")
    findings.sort(key=lambda f: (-SEVERITIES.index(f.severity), list(sites).index(f.site) if f.site in sites else -1))
    if trained:
        for f in findings:  # stable: the catalogue's order within each group
            f.remedies.sort(key=lambda r: getattr(r, "name", "") in REINITIALISING)
            if f.remedies and getattr(f.remedies[0], "name", "") in REINITIALISING and f.site in sites:
                # nothing that works during training was listed: truncated BPTT is (it keeps every
                # contribution above rounding; its text says it does not lengthen the memory)
                s = sites[f.site]
                extra = [r for r in finding_remedies("precision_underflow", s["kind"] or "cell", s["evidence"], f.site,
                                              s["module"]) if getattr(r, "name", "") not in REINITIALISING]
                f.remedies[:0] = extra[:1]
    if rec.meta.get("inputs_synthetic"):
        for f in findings:
            if f.kind in ("vanishing", "exploding", "short_memory", "precision_underflow", "saturated_gates",
                          "dead_units"):
                f.explanation += (f" (Measured on {rec.meta.get('inputs')}, not on your data: pass real "
                                  f"inputs to confirm.)")
    meta = {"gradscope_version": rec.meta.get("gradscope_version"), "source": rec.meta.get("source", "watch"),
            "steps": len(rec.steps), "schedule": rec.meta.get("schedule"), "measured_on": _measured_on(rec),
            "trained": trained}
    recurrent = any(s.get("kind") != "attention" for s in sites.values())
    verdict = assess(rec, sites) if recurrent else None
    return Diagnosis(sites, findings, _module_lines(rec, sites), notes, meta, rules, recording=rec,
                     trainability=verdict)
