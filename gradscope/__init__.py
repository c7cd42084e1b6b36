"""gradscope: see how far back your gradient reaches in PyTorch sequence models.

Public API::

    with gradscope.watch(model) as scope:   # record during training
        ...
    print(scope.diagnose())                 # regimes, findings, remedies
    rec = gradscope.probe(model, batch)     # one-shot: Jacobians by lag, Lyapunov exponents, spectra
    gradscope.try_remedies(model, data, train_steps=200)  # remedies on copies, ranked by training
    gradscope.apply_remedy(model, "forget_bias", batch)   # the remedied copy

Attributes are loaded on first use, so ``import gradscope.analysis.remedies`` (plain data) works
without torch installed, and ``import gradscope`` stays cheap: it imports only the errors and
:mod:`gradscope.render`, whose modules register the renderers that Recording and Diagnosis display
with (:mod:`gradscope._renderers`) and import numpy, matplotlib and the data classes only when
they draw.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._lazy import lazy_names
from .errors import GradscopeError, MissingMeasureError, RecordingFormatError
from . import render  # registers the renderers the data classes display with (gradscope/_renderers.py)

_LAZY = {
    "watch": ".capture.watch", "Scope": ".capture.watch",
    "probe": ".measure.probe",
    "diagnose": ".analysis.diagnose", "Diagnosis": ".analysis.diagnose", "Finding": ".analysis.finding",
    "try_remedies": ".analysis.trials", "RemedyTrials": ".analysis.trials", "apply_remedy": ".analysis.trials",
    "Recording": ".recording", "load": ".recording",
}
_SUBMODULES = {"estimators", "analysis", "capture", "measure", "checkpoint", "zoo", "plot", "cli"}

__all__ = ["watch", "probe", "diagnose", "try_remedies", "apply_remedy", "load", "Scope", "Recording", "Diagnosis",
           "Finding", "RemedyTrials", "GradscopeError", "RecordingFormatError", "MissingMeasureError",
           "estimators", "checkpoint", "zoo", "plot", "__version__"]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, _SUBMODULES)
