"""Measurement on a model: one-shot probes, the estimators along recorded trajectories, depth Jacobians.

Imports run one way, capture never reaching the one-shot entry point:

* :mod:`.trajectories` and :mod:`.sites` (recurrent sites) and :mod:`.depth` (attention stacks)
  measure a model from the calls recorded in one forward pass. They import
  :mod:`gradscope.estimators` and the modules of capture that describe what was recorded
  (``capture.sites``; ``capture.attention``'s layout, calls and hf modules for depth), never
  ``capture.watch``; so :mod:`gradscope.capture.probing` imports them to probe on a watch's
  schedule, and hands :func:`.depth.depth_jacobians` to its attention capture, which imports no
  measurement code.
* :mod:`.probe` (:func:`probe`) drives a :class:`~gradscope.capture.watch.Scope` for one forward and
  backward pass; nothing in capture imports it.

The names below are loaded on first use, so importing ``gradscope.measure.sites`` from capture
does not import :mod:`.probe` (which imports capture) through this package.
"""
from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "probe": ".probe", "default_loss": ".probe", "nonfinite_tensors": ".probe",
    "measure_sites": ".sites", "measure_trajectory": ".sites",
    "depth_jacobians": ".depth",
    "Trajectory": ".trajectories", "fused_trajectories": ".trajectories", "cell_trajectory": ".trajectories",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
