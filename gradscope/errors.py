"""Errors raised by gradscope.

Every message says what arrived, what was expected and how to fix it.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


class GradscopeError(Exception):
    """Base class of every error gradscope raises on purpose."""


class RecordingFormatError(GradscopeError):
    """A file is not a gradscope Recording, is corrupt, or has an unknown format version."""


class NotARecordingError(RecordingFormatError):
    """A readable archive that is not a gradscope Recording.

    Attributes:
        holds: What it is instead: ``"checkpoint"`` (``torch.save``), ``"torchscript"``
            (``torch.jit.save``) or ``"archive"`` (another zip or npz).
    """

    def __init__(self, message: str, *, holds: str):
        super().__init__(message)
        self.holds = holds


class MissingMeasureError(GradscopeError):
    """A Recording lacks the measure an operation needs (the message says how to record it)."""


class GradscopeAlert(GradscopeError):
    """Raised from ``loss.backward()`` of a watched step when an event named in ``watch(...,
    raise_on=...)`` happens; ``.event`` holds it (kind, step, site or parameter, time step)."""

    def __init__(self, message: str, event: dict):
        super().__init__(message)
        self.event = event


class ShapeError(GradscopeError, ValueError):
    """Tensors given to an estimator have shapes that do not fit together."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


class CheckpointError(GradscopeError):
    """A checkpoint file cannot be read, holds no usable state dict, or does not fit a model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs to run code from the file to load; refused unless ``unsafe=True``.

    Attributes:
        loadable: Whether ``unsafe=True`` loads it in this process. False for a whole model whose
            class was defined in the script that saved it (``__main__``): only a program that
            defines that class can unpickle it.
    """

    def __init__(self, message: str, *, loadable: bool = True):
        super().__init__(message)
        self.loadable = loadable


class PlainPickleError(CheckpointError):
    """A plain pickle (``pickle.dump``) that weights-only loading cannot read, though it asks to run
    no code; ``unsafe=True`` reads it with ``pickle.load``."""


class ModelSpecError(CheckpointError):
    """A ``package.module:factory`` model spec cannot be imported, called, or loaded strictly.

    Attributes:
        spec: The spec as given; None when the keyword arguments were refused before it was read.
    """

    def __init__(self, message: str, *, spec: Optional[str] = None):
        super().__init__(message)
        self.spec = spec


class InputsError(GradscopeError):
    """The inputs to probe a checkpoint's model with (``report_checkpoint(inputs=...)``) cannot be
    read or do not fit the model, or none were given and none can be made up.

    Attributes:
        path: The file given; None when the model needs inputs and none were given.
    """

    def __init__(self, message: str, *, path: Optional[str] = None):
        super().__init__(message)
        self.path = path


class LoadLimitError(CheckpointError, RecordingFormatError):
    """A file declares more data than the load limit allows, or inflates like a zip bomb.

    Raised before anything is inflated, so memory stays bounded. Raise the limit with
    ``max_load_bytes=`` (or pass None) for a file you trust.

    Attributes:
        limit: The limit in force, in bytes.
        bomb: True when refused for its inflate ratio rather than its size: only switching the
            checks off (``max_load_bytes=None``) loads it.
    """

    def __init__(self, message: str, *, limit: Optional[int] = None, bomb: bool = False):
        super().__init__(message)
        self.limit = limit
        self.bomb = bomb


class NonFiniteWarning(UserWarning):
    """NaN or inf arose inside a computation; the affected entries of the result are NaN.

    The message names the samples and steps (or lags) concerned. Turn it into an error with
    ``warnings.simplefilter("error", NonFiniteWarning)``.
    """
