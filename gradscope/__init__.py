"""gradscope: see how far back your gradient reaches in PyTorch sequence models.

Public API::

    with gradscope.watch(model) as scope:   # record during training
        ...
    rec = scope.recording                   # frozen numpy data; rec.save(path) / gradscope.load(path)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import GradscopeError, MissingMeasureError, RecordingFormatError
from .recording import Recording, load
from .capture.scope import Scope, watch
from .capture.probe import probe
from . import estimators
from .analysis.diagnose import Diagnosis, Finding, diagnose

__all__ = ["watch", "probe", "diagnose", "Diagnosis", "Finding", "estimators", "Scope", "Recording", "load", "GradscopeError", "RecordingFormatError",
           "MissingMeasureError", "__version__"]
