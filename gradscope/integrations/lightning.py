"""PyTorch Lightning: :class:`GradscopeCallback` watches the LightningModule while ``trainer.fit`` runs.

Needs Lightning (``pip install "gradscope[lightning]"``): ``lightning.pytorch`` is used, or
``pytorch_lightning`` where only that is installed. ``import gradscope`` never imports either; this
module does, and it still imports without them (the callback then raises on construction with the
install line).

Usage::

    from gradscope.integrations.lightning import GradscopeCallback

    cb = GradscopeCallback(probe_every=100)            # watch(...)'s options
    trainer = lightning.Trainer(max_steps=1000, callbacks=[cb])
    trainer.fit(model)                                  # gradscope/* scalars reach the trainer's loggers
    print(cb.diagnosis)                                 # cb.recording: the Recording of the run

How the steps are found. Lightning calls ``training_step``, not the module's ``forward``, so a watch
on the LightningModule alone would see no forward pass where ``training_step`` calls its submodules
directly (``self.lstm(x)``). With automatic optimization the callback therefore makes each
``training_step`` call one watched forward pass: while ``fit`` runs, the module's ``training_step``
is shadowed by an instance attribute that runs the original inside a light module holding the same
submodules and parameters under the same names (so site and parameter names are the
LightningModule's own). The shadow and every hook are removed at the end of ``fit`` and when it
raises. With manual optimization (``automatic_optimization = False``) the LightningModule itself is
watched: steps are recorded where ``training_step`` calls ``self(...)``.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence

from torch import nn

from ._callback import WatchingCallback, missing_framework

try:  # the unified package first, the standalone one where only that is installed
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback as _Callback
    except ImportError:
        _Callback = None

__all__ = ["GradscopeCallback"]

_SHADOWED = "training_step"


class _StepView(nn.Module):
    """The LightningModule's submodules, parameters and buffers (the same dicts, so the same names),
    with ``training_step`` as its forward: watching it makes each training step one forward pass."""

    def __init__(self, module: nn.Module, step):
        super().__init__()
        self.__dict__["_modules"] = module._modules
        self.__dict__["_parameters"] = module._parameters
        self.__dict__["_buffers"] = module._buffers
        self.__dict__["_gs_step"] = step
        self.__dict__["_gs_module"] = module

    def forward(self, *args, **kwargs):
        return self.__dict__["_gs_step"](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. a Hugging Face model's ``config``, read by the attention capture
            module = self.__dict__.get("_gs_module")
            if module is None:
                raise
            return getattr(module, name)


def _view_of(module: nn.Module, step) -> nn.Module:
    # named after the user's class, so the Recording says which model it came from
    cls = type(type(module).__name__, (_StepView,), {"__module__": type(module).__module__})
    return cls(module, step)


class GradscopeCallback(WatchingCallback, _Callback or object):
    """Watch a LightningModule during ``trainer.fit`` and log gradscope's summary scalars.

    Contract:

    * ``on_fit_start``: watches the LightningModule (``gradscope.watch`` with this callback's
      options). Anything that is not an ``nn.Module`` raises :class:`~gradscope.GradscopeError`.
    * During training, every ``log_every`` optimizer steps and once at the end of training, on
      global rank zero only, it sends :meth:`summary` to every logger of the trainer
      (``logger.log_metrics(metrics, step=trainer.global_step)``): per site
      ``gradscope/grad_first_over_last/<site>``, ``gradscope/grad_norm_mean/<site>``,
      ``gradscope/horizon/<site>``, ``gradscope/rate/<site>``, ``gradscope/lambda1/<site>`` (with a
      probe), ``gradscope/memory_time/<site>`` (probe, LSTM/GRU), ``gradscope/regime/<site>``
      (−1 vanishing, 0 stable, +1 exploding), and ``gradscope/param_grad_norm``,
      ``gradscope/findings`` (count), ``gradscope/severity`` (worst: 0 none, 1 info, 2 warning,
      3 critical). Only finite values are logged. Each log builds the recording and diagnoses it,
      so keep ``log_every`` well above 1 on long runs.
    * ``on_fit_end`` and ``on_exception`` (and ``teardown``): close the watch, so no hook remains on
      the module, and leave :attr:`recording` and :attr:`diagnosis` on the callback.

    Every rank watches its own replica; only rank zero logs. Under mixed precision with a loss
    scaler the recorded norms include the loss scale (ratios such as first-over-last do not).

    Args:
        every: record one step in ``every`` (a step is one backward pass).
        probe_every: every this many steps also measure Jacobians by lag and Lyapunov exponents on
            that step's batch (see :func:`gradscope.watch`).
        sites: record only these sites (see :func:`gradscope.watch`).
        max_steps: bound on the recorded history (see :func:`gradscope.watch`).
        probe_options: keywords for the probe measurements (see :func:`gradscope.watch`).
        log_every: log the summary every this many optimizer steps; default: the trainer's
            ``log_every_n_steps``.

    Attributes:
        recording: the :class:`~gradscope.Recording` (live during fit, final after it).
        diagnosis: the :class:`~gradscope.Diagnosis` after fit (None if no step was recorded).
        scope: the live :class:`~gradscope.Scope` during fit, else None.

    Raises:
        GradscopeError: Lightning is not installed; ``log_every`` is not a positive integer; fit
            starts with something that is not an ``nn.Module``; a bad watch option (``every``,
            ``probe_every``, ``max_steps``, ``probe_options``), checked when the callback is made.

    Example:
        >>> from gradscope.integrations.lightning import GradscopeCallback
        >>> cb = GradscopeCallback(every=2, log_every=10)
        >>> cb.recording is None and cb.diagnosis is None
        True
    """

    _hook_name = "on_fit_start"

    def __init__(self, every: int = 1, probe_every: Optional[int] = None,
                 sites: Optional[Sequence[str]] = None, max_steps: int = 10_000,
                 probe_options: Optional[Dict[str, Any]] = None, log_every: Optional[int] = None):
        if _Callback is None:
            raise missing_framework(type(self).__name__, "PyTorch Lightning", "lightning")
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise _bad_log_every(log_every)
        super().__init__()
        self._init_watch(every=every, sites=sites, max_steps=max_steps, probe_every=probe_every,
                         probe_options=probe_options)
        self.log_every = log_every
        self._logged_step: Optional[int] = None
        self._shadowed: Optional[nn.Module] = None
        self._previous_step: Any = None  # an instance attribute training_step had before fit

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._check_module(pl_module, "a LightningModule (a torch.nn.Module)")
        self.close()  # a watch left from an earlier fit that ended without on_fit_end
        self._logged_step = None
        if getattr(pl_module, "automatic_optimization", False) and callable(getattr(pl_module, _SHADOWED, None)):
            self._shadow(pl_module)
        else:
            self._start(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.log_every or max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        step = trainer.global_step
        if step > 0 and step % every == 0:
            self._log(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close_after_error()

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.scope is not None:  # a path that skipped on_fit_end: never leave hooks behind
            self._close_after_error()

    # ------------------------------------------------------------------ internals
    def _log(self, trainer) -> None:
        step = trainer.global_step
        if (self.scope is None or step == self._logged_step or not trainer.is_global_zero
                or not trainer.loggers):
            return
        metrics = self.summary()
        if not metrics:
            return
        self._logged_step = step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _shadow(self, pl_module: nn.Module) -> None:
        original = getattr(pl_module, _SHADOWED)
        view = _view_of(pl_module, original)

        @functools.wraps(original)
        def training_step(*args, **kwargs):
            return view(*args, **kwargs)

        self._previous_step = pl_module.__dict__.get(_SHADOWED)
        self._shadowed = pl_module
        pl_module.__dict__[_SHADOWED] = training_step
        try:
            self._start(view)
        except BaseException:
            self._after_close()
            raise

    def _after_close(self) -> None:
        m, self._shadowed = self._shadowed, None
        if m is None:
            return
        if self._previous_step is not None:
            m.__dict__[_SHADOWED] = self._previous_step
        else:
            m.__dict__.pop(_SHADOWED, None)
        self._previous_step = None


def _bad_log_every(value):
    from ..errors import GradscopeError

    return GradscopeError(f"log_every must be a positive integer (log every this many optimizer steps) "
                          f"or None for the trainer's log_every_n_steps, got {value!r}.")
