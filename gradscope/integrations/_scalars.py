"""Scalars that summarise a Recording, shared by the TensorBoard export and the training callbacks.

Names (without the ``gradscope/`` prefix the writers add):

* ``grad_first_over_last/<site>``: ‖∂L/∂h‖ at the first position the backward pass reaches divided
  by the last one (the decay across the sequence, per recorded step);
* ``grad_norm_mean/<site>``: the mean of ‖∂L/∂h_t‖ over positions;
* ``horizon/<site>``, ``rate/<site>``, ``lambda1/<site>``, ``memory_time/<site>``: probe measures
  (``watch(..., probe_every=N)`` or :func:`gradscope.probe`);
* ``param_grad_norm``: the global norm of all parameter gradients;
* ``update_ratio``: the update-to-weight ratio of all parameters together, ‖Δw‖/‖w‖ over the
  whole model (``watch(update_ratio=True)``, the default; per parameter: ``rec.update_ratios()``).

:func:`summary_scalars` adds what only a Diagnosis knows: ``regime/<site>`` (−1 vanishing, 0 stable,
+1 exploding), ``findings`` (how many) and ``severity`` (the worst: 0 none, 1 info, 2 warning,
3 critical).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["profile_scalars", "probe_series", "param_grad_total", "update_ratio_total", "summary_scalars",
           "REGIME_CODES", "SEVERITY_CODES"]

PROBE_KEYS = ("horizon", "rate", "lambda1", "memory_time")
REGIME_CODES = {"vanishing": -1.0, "stable": 0.0, "exploding": 1.0}  # "inconclusive" is not logged
SEVERITY_CODES = {None: 0.0, "info": 1.0, "warning": 2.0, "critical": 3.0}


def profile_scalars(row: np.ndarray, reverse: bool) -> Dict[str, float]:
    """``grad_first_over_last`` (only where it is finite) and ``grad_norm_mean`` of one step's profile.

    Args:
        row: ‖∂L/∂h_t‖ of one recorded step, ``[n]`` (the positions that ran).
        reverse: the site runs backwards in time (a bidirectional layer's reverse direction), so
            the backward pass reaches position ``n - 1`` first.
    """
    out: Dict[str, float] = {}
    # backward runs from the last position of a forward recurrence: it reaches position 0 last
    first, last = (row[-1], row[0]) if reverse else (row[0], row[-1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if last > 0 and math.isfinite(first / last):
            out["grad_first_over_last"] = float(first / last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row of NaN (no gradient) has no mean
        out["grad_norm_mean"] = float(np.nanmean(row))
    return out


def probe_series(rec, site: str, last: int) -> Dict[str, List[Tuple[int, float]]]:
    """Finite probe measures of one site as ``{key: [(step, value), …]}`` (keys: :data:`PROBE_KEYS`).

    A watch with ``probe_every`` keeps a history per probe; a one-shot probe has one value, given
    the step ``last``.
    """
    out: Dict[str, List[Tuple[int, float]]] = {}
    if rec.has_measure(site, "probe_steps"):
        psteps = rec.measure(site, "probe_steps")
        for key in PROBE_KEYS:
            if rec.has_measure(site, "probe_" + key):
                pts = [(int(s), float(v)) for s, v in zip(psteps, rec.measure(site, "probe_" + key))
                       if math.isfinite(float(v))]
                if pts:
                    out[key] = pts
    elif site in rec.measure_meta:
        m = rec.site_measures(site)
        for key, v in (("horizon", m.get("jacobian", {}).get("horizon")),
                       ("rate", m.get("jacobian", {}).get("rate")),
                       ("lambda1", m.get("lyapunov", {}).get("lambda1")),
                       ("memory_time", m.get("gates", {}).get("memory_time"))):
            if v is not None and math.isfinite(float(v)):
                out[key] = [(last, float(v))]
    return out


def param_grad_total(rec) -> np.ndarray:
    """The global parameter-gradient norm of every recorded step, ``[steps]`` (empty without any)."""
    pn = rec.param_grad_norms()
    if not pn or not len(rec):
        return np.zeros(0)
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.nansum(np.vstack(list(pn.values())) ** 2, axis=0))


def update_ratio_total(rec) -> np.ndarray:
    """The model's update-to-weight ratio √Σ‖Δw_p‖² / √Σ‖w_p‖² of every recorded step, ``[steps]``
    (NaN where not measured; empty for a recording without update norms)."""
    un, wn = rec.update_norms(), rec.weight_norms()
    if not un or not len(rec):
        return np.zeros(0)
    d = np.vstack(list(un.values()))
    w = np.vstack([wn[n] for n in un])
    with np.errstate(invalid="ignore", divide="ignore"):
        num = np.sqrt(np.nansum(d ** 2, axis=0))
        den = np.sqrt(np.nansum(w ** 2, axis=0))
        r = num / den
    r[np.isnan(d).all(axis=0)] = np.nan
    return r


def summary_scalars(rec, diagnosis=None, *, prefix: str = "gradscope/") -> Dict[str, float]:
    """The latest value of every scalar, plus the diagnosis' verdict, as one flat dict.

    What a training logger shows at one step: the gradient profile of the last recorded step, the
    latest probe measures, the global gradient norm, the latest measured update-to-weight ratio,
    and from ``diagnosis`` the regime of each site, the number of findings and the worst severity.
    ``horizon``, ``rate`` and ``lambda1`` come from the latest probe when there is one, otherwise
    from the evidence the diagnosis used (the watched gradient-norm profile gives a horizon and a
    rate, not λ₁). Only finite values are included: a
    horizon of ∞ (the gradient never falls below the threshold within the sequence) is left out.

    Args:
        rec: a :class:`~gradscope.Recording`.
        diagnosis: ``gradscope.diagnose(rec)``, or None to leave its entries out.
        prefix: put in front of every name.

    Returns:
        ``{name: float}``, e.g. ``{"gradscope/grad_first_over_last/lstm.l0": 0.02, …}``.

    Example:
        >>> import torch, gradscope
        >>> from gradscope.integrations._scalars import summary_scalars
        >>> rnn = torch.nn.RNN(2, 4)
        >>> with gradscope.watch(rnn) as scope:
        ...     out, _ = rnn(torch.randn(6, 1, 2)); out[-1].sum().backward()
        >>> rec = scope.recording
        >>> sorted(summary_scalars(rec, gradscope.diagnose(rec)))[:3]
        ['gradscope/findings', 'gradscope/grad_first_over_last/l0', 'gradscope/grad_norm_mean/l0']
    """
    out: Dict[str, float] = {}
    steps = rec.steps
    last = int(steps[-1]) if len(steps) else 0
    for site in rec.sites:
        vals: Dict[str, float] = {}
        g = rec.grad_norms(site)
        if g.size:
            n = int(rec.seq_lens(site)[-1])
            if n >= 1:
                vals.update(profile_scalars(g[-1, :n], rec.site_info(site).get("direction") == "reverse"))
        for key, pts in probe_series(rec, site, last).items():
            vals[key] = pts[-1][1]
        if diagnosis is not None and site in diagnosis.sites:
            s = diagnosis.site_summary(site)
            for key in ("horizon", "rate", "lambda1"):
                if key not in vals and s.get(key) is not None:
                    vals[key] = float(s[key])
            if s["regime"] in REGIME_CODES:
                vals["regime"] = REGIME_CODES[s["regime"]]
        out.update({f"{prefix}{key}/{site}": v for key, v in vals.items() if math.isfinite(v)})
    tot = param_grad_total(rec)
    if tot.size and math.isfinite(tot[-1]):
        out[f"{prefix}param_grad_norm"] = float(tot[-1])
    ur = update_ratio_total(rec)
    ur = ur[np.isfinite(ur)]  # the last recorded step is measured only at the next forward pass
    if ur.size:
        out[f"{prefix}update_ratio"] = float(ur[-1])
    if diagnosis is not None:
        out[f"{prefix}findings"] = float(len(diagnosis.findings))
        out[f"{prefix}severity"] = SEVERITY_CODES.get(diagnosis.worst, 0.0)
    return out
