"""What the Lightning and Hugging Face Trainer callbacks share: one watch per training run, the
summary scalars they log, and an end that always removes every hook.

The framework classes mix :class:`WatchingCallback` in front of the framework's own callback base
class; the framework modules only translate their hooks into :meth:`_start`, :meth:`summary` and
:meth:`close`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from torch import nn

from ..errors import GradscopeError

__all__ = ["WatchingCallback", "missing_framework"]


def missing_framework(cls_name: str, framework: str, extra: str) -> GradscopeError:
    """The error a callback raises when its framework is not installed."""
    return GradscopeError(
        f"{cls_name} needs {framework}, which is not installed (or failed to import). Install it with "
        f'pip install "gradscope[{extra}]"')


class WatchingCallback:
    """State and behaviour common to gradscope's training-framework callbacks.

    Attributes:
        scope: the live :class:`~gradscope.Scope` while training runs, else None.
        diagnosis: the :class:`~gradscope.Diagnosis` computed at the last log and at the end of
            training; None before, or when no step was recorded.
    """

    _hook_name = "on_train_begin"  # where the model arrives, for messages

    def _init_watch(self, *, every: int, sites: Optional[Sequence[str]], max_steps: int,
                    probe_every: Optional[int], probe_options: Optional[Dict[str, Any]]) -> None:
        from ..capture.options import check_watch_options

        check_watch_options(every=every, max_steps=max_steps, probe_every=probe_every,
                            probe_options=probe_options)
        self.every = every
        self.sites = sites
        self.max_steps = max_steps
        self.probe_every = probe_every
        self.probe_options = probe_options
        self.scope = None
        self.diagnosis = None
        self._recording = None
        self._summary_step: Optional[int] = None  # scope.step at which _summary was computed
        self._summary: Dict[str, float] = {}

    @property
    def recording(self):
        """The :class:`~gradscope.Recording`: live while training runs, the final one after it
        (None before the first run)."""
        if self.scope is not None and not self.scope.closed:
            return self.scope.recording
        return self._recording

    # ------------------------------------------------------------------ life cycle
    def _check_module(self, model: Any, expected: str) -> None:
        name = type(self).__name__
        if isinstance(model, type) and issubclass(model, nn.Module):
            raise GradscopeError(
                f"{name}.{self._hook_name} received the class {model.__name__} instead of a model; "
                f"instantiate it first and give the instance to the trainer.")
        if not isinstance(model, nn.Module):
            raise GradscopeError(
                f"{name}.{self._hook_name} received {type(model).__name__} ({_short_repr(model)}) where "
                f"it expects {expected}. Pass the callback to the trainer (callbacks=[{name}()]) and "
                f"let the trainer call it with the model it trains.")

    def _start(self, target: nn.Module) -> None:
        """Watch ``target`` (closing a watch left from an earlier run of this callback)."""
        from ..capture.watch import watch

        self.close()
        self.diagnosis = None
        self._recording = None
        self._summary_step, self._summary = None, {}
        self.scope = watch(target, every=self.every, sites=self.sites, max_steps=self.max_steps,
                           probe_every=self.probe_every, probe_options=self.probe_options)

    def summary(self) -> Dict[str, float]:
        """The summary scalars of the recording so far (``gradscope/…`` names; see
        :func:`gradscope.integrations._scalars.summary_scalars`); empty before the first recorded
        step. Recomputed only when a new step was recorded since the last call."""
        if self.scope is None:
            return {}
        step = self.scope.step
        if step != self._summary_step:
            from ._scalars import summary_scalars

            rec = self.scope.recording
            diag = _diagnose(rec)
            if diag is not None:
                self.diagnosis = diag
            self._summary = summary_scalars(rec, diag)
            self._summary_step = step
        return dict(self._summary)

    def close(self) -> None:
        """Stop watching: remove every hook, keep :attr:`recording` and compute :attr:`diagnosis`.

        The callback's framework calls this at the end of training; call it yourself (or use the
        callback as a context manager) where the framework has no event for a failed run. Safe to
        call twice.
        """
        scope = self.scope
        if scope is None:
            return
        self.scope = None
        try:
            rec = scope.recording
        finally:
            scope.close()
            self._after_close()
        self._recording = rec
        diag = _diagnose(rec)
        if diag is not None:
            self.diagnosis = diag

    def _close_after_error(self) -> None:
        """:meth:`close` on a failing run: the hooks always go, but a diagnosis that fails on the
        partial recording must not replace the user's exception (the diagnosis is None then)."""
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the training error is the one to see
            self.diagnosis = None

    def _after_close(self) -> None:
        """Undo what the framework module changed besides the watch (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _diagnose(rec):
    """``diagnose(rec)``, or None for a recording with nothing in it yet."""
    if not len(rec) and not rec.measure_meta:
        return None
    from ..analysis.diagnose import diagnose

    return diagnose(rec)


def _short_repr(x: Any, n: int = 60) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n - 3] + "..."
