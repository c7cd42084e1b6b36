"""Write a Recording (and its diagnosis) to a Weights & Biases run.

Needs the ``wandb`` package (``pip install "gradscope[wandb]"``); gradscope imports it only when this
is used. Everything goes under the ``gradscope/`` prefix with its own x-axis ``gradscope/step`` (the
training step each value was recorded at), so it can be written at any time — during training or
after it — without disturbing the steps of the run's own ``wandb.log`` calls.

What is written (the same scalars the Lightning and Hugging Face callbacks log):

* per recorded step: ``gradscope/grad_first_over_last/<site>``, ``gradscope/grad_norm_mean/<site>``,
  ``gradscope/param_grad_norm``; per probe: ``gradscope/horizon/<site>``, ``rate``, ``lambda1``,
  ``memory_time``;
* one image per site: the gradient heatmap (``gradscope/heatmap/<site>``);
* the diagnosis: ``gradscope/regime/<site>``, ``gradscope/findings``, ``gradscope/severity`` and the
  trainability verdict in the run summary, and the HTML report as ``gradscope/report``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

from ..errors import GradscopeError
from ..render.tensorboard import heatmap_image
from ._scalars import param_grad_total, probe_series, profile_scalars, summary_scalars, update_ratio_total

__all__ = ["recording_to_wandb"]

INSTALL_HINT = 'pip install "gradscope[wandb]"'


def _wandb():
    try:
        import wandb
    except ImportError:
        raise GradscopeError(f"the Weights & Biases integration needs the wandb package: {INSTALL_HINT}") from None
    return wandb


def recording_to_wandb(rec, run=None, *, images: bool = True, report: bool = True) -> Dict[str, Any]:
    """Log ``rec`` to a W&B run (see the module docstring for the keys).

    Args:
        rec: a :class:`~gradscope.Recording` (``scope.recording`` or ``gradscope.probe(...)``).
        run: a ``wandb`` run (what ``wandb.init()`` returns); default: the active ``wandb.run``.
        images: also log the gradient heatmap of every site.
        report: also diagnose the recording: its summary scalars and verdicts go to the run
            summary, its HTML report to ``gradscope/report``.

    Returns:
        The run-summary values written (``{key: value}``).

    Raises:
        GradscopeError: wandb is not installed, or no run is given and none is active.
    """
    wandb = _wandb()
    run = run if run is not None else wandb.run
    if run is None or not callable(getattr(run, "log", None)):
        raise GradscopeError("recording_to_wandb() needs a W&B run: call wandb.init(...) first or pass "
                             "run=wandb.init(...).")
    run.define_metric("gradscope/step")
    run.define_metric("gradscope/*", step_metric="gradscope/step")
    steps = [int(s) for s in rec.steps]
    rows: Dict[int, Dict[str, Any]] = {}

    def put(step: int, key: str, value: float) -> None:
        if math.isfinite(value):
            rows.setdefault(step, {})[f"gradscope/{key}"] = float(value)

    last = steps[-1] if steps else 0
    for site in rec.sites:
        g = rec.grad_norms(site)
        if g.size:
            reverse = rec.site_info(site).get("direction") == "reverse"
            lens = rec.seq_lens(site)
            for i, s in enumerate(steps):
                if int(lens[i]) >= 1:
                    for key, v in profile_scalars(g[i, :int(lens[i])], reverse).items():
                        put(s, f"{key}/{site}", v)
        for key, pts in probe_series(rec, site, last).items():
            for s, v in pts:
                put(int(s), f"{key}/{site}", v)
    for s, v in zip(steps, param_grad_total(rec)):
        put(s, "param_grad_norm", v)
    for s, v in zip(steps, update_ratio_total(rec)):
        put(s, "update_ratio", v)
    for s in sorted(rows):
        run.log({"gradscope/step": s, **rows[s]})
    media: Dict[str, Any] = {}
    if images and len(rec):
        for site in rec.sites:
            if rec.grad_norms(site).size:
                media[f"gradscope/heatmap/{site}"] = wandb.Image(heatmap_image(rec, site),
                                                                 caption=f"log10 ‖∂L/∂h_t‖ at {site}")
    summary: Dict[str, Any] = {}
    if report and (len(rec) or rec.measure_meta):
        from ..analysis.diagnose import diagnose
        diag = diagnose(rec)
        summary = dict(summary_scalars(rec, diag))
        for site in diag.sites:
            summary[f"gradscope/regime_name/{site}"] = diag.regime(site)
        if diag.trainability is not None:
            summary["gradscope/trainability"] = diag.trainability.verdict
            summary["gradscope/trainability_confidence"] = diag.trainability.confidence
        media["gradscope/report"] = wandb.Html(diag.to_html())
    if media:
        run.log({"gradscope/step": last, **media})
    for k, v in summary.items():
        run.summary[k] = v
    return summary
