"""Hugging Face ``Trainer``: :class:`GradscopeTrainerCallback` watches the model while ``trainer.train`` runs.

Needs ``transformers`` and ``accelerate`` (``pip install "gradscope[trainer]"``). ``import
gradscope`` never imports ``transformers``; this module does, and still imports without it (the
callback then raises on construction with the install line).

Usage::

    from gradscope.integrations.transformers import GradscopeTrainerCallback

    cb = GradscopeTrainerCallback(probe_every=100)          # watch(...)'s options
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    cb.attach(trainer)                                      # ahead of the report_to integrations
    trainer.train()                                         # gradscope/* scalars in every log
    print(cb.diagnosis)                                     # cb.recording: the Recording of the run

Why ``attach``: the Trainer calls the ``report_to`` integrations (TensorBoard, W&B, …) *before* the
callbacks given in ``Trainer(callbacks=[...])``, so scalars a callback adds to ``logs`` in
``on_log`` reach them only from a callback placed in front of them. ``Trainer(callbacks=[cb])``
works too, but the scalars then reach ``trainer.state.log_history`` and the callbacks after it
(the console printer) only; with ``report_to`` set the callback warns once about this.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

from ._callback import WatchingCallback, missing_framework

try:
    from transformers import DefaultFlowCallback as _DefaultFlow
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:
    _TrainerCallback = _DefaultFlow = None

__all__ = ["GradscopeTrainerCallback"]


class GradscopeTrainerCallback(WatchingCallback, _TrainerCallback or object):
    """Watch a Hugging Face ``Trainer``'s model during ``train()`` and add gradscope's summary to its logs.

    Contract:

    * ``on_train_begin``: watches ``model`` (the Trainer passes it; ``gradscope.watch`` with this
      callback's options). Anything that is not an ``nn.Module`` raises
      :class:`~gradscope.GradscopeError`.
    * ``on_log`` (every ``logging_steps``; on the main process only, and only when a step was
      recorded since the last time): adds :meth:`summary` to ``logs`` and to the entry just
      appended to ``state.log_history``. The names are those of
      :class:`gradscope.integrations.lightning.GradscopeCallback`: per site
      ``gradscope/grad_first_over_last/<site>``, ``gradscope/grad_norm_mean/<site>``,
      ``gradscope/horizon|rate|lambda1|memory_time/<site>``, ``gradscope/regime/<site>``, and
      ``gradscope/param_grad_norm``, ``gradscope/findings``, ``gradscope/severity``; finite values
      only. To have them reach the ``report_to`` integrations, add the callback with
      :meth:`attach` (see the module docstring).
    * ``on_train_end``: closes the watch, so no hook remains on the model, and leaves
      :attr:`recording` and :attr:`diagnosis` on the callback. The Trainer has no event for a
      failed run: after an exception in ``trainer.train()`` call :meth:`close` (or use the callback
      as a context manager, ``with GradscopeTrainerCallback() as cb: ...``).

    A step is one backward pass through the model, so with gradient accumulation one optimizer
    step is several recorded steps. Under fp16 with a loss scaler the recorded norms include the
    loss scale (ratios such as first-over-last do not).

    Args:
        every: record one step in ``every``.
        probe_every: every this many steps also measure Jacobians by lag and Lyapunov exponents on
            that step's batch (see :func:`gradscope.watch`).
        sites: record only these sites (see :func:`gradscope.watch`).
        max_steps: bound on the recorded history (see :func:`gradscope.watch`).
        probe_options: keywords for the probe measurements (see :func:`gradscope.watch`).

    Attributes:
        recording: the :class:`~gradscope.Recording` (live during training, final after it).
        diagnosis: the :class:`~gradscope.Diagnosis` after training (None if no step was recorded).
        scope: the live :class:`~gradscope.Scope` during training, else None.

    Raises:
        GradscopeError: ``transformers`` is not installed; training starts with something that is
            not an ``nn.Module``; a bad watch option (``every``, ``probe_every``, ``max_steps``,
            ``probe_options``), checked when the callback is made.

    Example:
        >>> from gradscope.integrations.transformers import GradscopeTrainerCallback
        >>> cb = GradscopeTrainerCallback(every=2)
        >>> cb.recording is None and cb.diagnosis is None
        True
    """

    def __init__(self, every: int = 1, probe_every: Optional[int] = None,
                 sites: Optional[Sequence[str]] = None, max_steps: int = 10_000,
                 probe_options: Optional[Dict[str, Any]] = None):
        if _TrainerCallback is None:
            raise missing_framework(type(self).__name__, "transformers", "trainer")
        super().__init__()
        self._init_watch(every=every, sites=sites, max_steps=max_steps, probe_every=probe_every,
                         probe_options=probe_options)
        self._attached = False
        self._logged_step: Optional[int] = None  # scope.step of the last summary added to logs

    def attach(self, trainer) -> "GradscopeTrainerCallback":
        """Add this callback to ``trainer`` right after its ``DefaultFlowCallback``, ahead of the
        ``report_to`` integrations, so the scalars it adds in ``on_log`` reach them. Moves it there
        if it is in the list already. Returns the callback."""
        handler = getattr(trainer, "callback_handler", None)
        cbs = getattr(handler, "callbacks", None)
        if not isinstance(cbs, list):
            from ..errors import GradscopeError

            raise GradscopeError(f"attach() expects a transformers Trainer (with callback_handler.callbacks), "
                                 f"got {type(trainer).__name__}.")
        if self in cbs:
            cbs.remove(self)
        flow = [i for i, c in enumerate(cbs) if isinstance(c, _DefaultFlow)]
        cbs.insert(flow[-1] + 1 if flow else 0, self)
        self._attached = True
        return self

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_module(model, "the Trainer's model (a torch.nn.Module)")
        self._logged_step = None
        report_to = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if report_to and not self._attached and getattr(state, "is_world_process_zero", True):
            warnings.warn(
                f"GradscopeTrainerCallback was given in Trainer(callbacks=[...]), so the Trainer calls the "
                f"report_to integrations {report_to} before it and the gradscope/* scalars reach only "
                f"trainer.state.log_history. Use cb.attach(trainer) instead to send them to {report_to}.",
                UserWarning, stacklevel=2)
        self._start(model)  # after the warning: one turned into an error leaves no hook behind

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.scope is None or logs is None or not getattr(state, "is_world_process_zero", True):
            return
        if self.scope.step == self._logged_step:  # e.g. an evaluation log: nothing new recorded
            return
        metrics = self.summary()
        if not metrics:
            return
        self._logged_step = self.scope.step
        logs.update(metrics)
        hist = getattr(state, "log_history", None)
        if hist and isinstance(hist[-1], dict) and hist[-1].get("step") == state.global_step:
            hist[-1].update(metrics)  # the Trainer appended a copy of `logs` before calling on_log

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
