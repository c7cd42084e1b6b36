"""Checks of what :func:`gradscope.watch` is given: the model, the options, the alert settings.

They raise :class:`~gradscope.errors.GradscopeError` saying what arrived and how to fix it. The
framework callbacks (:mod:`gradscope.integrations`) call :func:`check_watch_options` when they are
made, so a bad option fails before training starts. :func:`unwrap` finds the eager module inside
a ``torch.compile`` or ``DistributedDataParallel`` wrapper; :func:`resolve_update_ratio` decides
``update_ratio="auto"``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import GradscopeError, did_you_mean
from .schedule import AUTO, DEFAULT_MAX_INTERVAL, DEFAULT_OVERHEAD, check_schedule

__all__ = ["ALERT_KINDS", "UPDATE_RATIO_AUTO_BYTES", "check_model", "check_watch_options", "check_alerts",
           "resolve_update_ratio", "unwrap"]

#: update_ratio="auto" records the ratios while the trainable parameters take at most this much
#: (the copy held from a recorded step to the next forward pass).
UPDATE_RATIO_AUTO_BYTES = 256 << 20

#: The event kinds ``raise_on`` accepts.
ALERT_KINDS = ("nonfinite", "critical")


def check_model(model) -> None:
    """Raise :class:`GradscopeError` unless ``model`` is an ``nn.Module`` instance gradscope can hook."""
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise GradscopeError(
            f"watch() received the class {model.__name__} instead of a model; instantiate it first, "
            f"e.g. watch({model.__name__}(...)).")
    if not isinstance(model, nn.Module):
        raise GradscopeError(
            f"watch() expects a torch.nn.Module, got {type(model).__name__}. Pass the model object "
            f"itself (not its output, state_dict or parameters).")
    if isinstance(model, torch.jit.ScriptModule):
        raise GradscopeError(
            f"{type(model).__name__} is a TorchScript module: torch supports no hooks on it, so gradscope "
            f"cannot watch or probe it. Watch (or probe) the Python module before torch.jit.script/trace; "
            f"a model that only contains scripted parts can be watched (those parts run as opaque steps).")
    if isinstance(model, nn.DataParallel):
        raise GradscopeError(
            "watch() cannot see inside nn.DataParallel: it copies the module onto every GPU at each "
            "forward, and the copies carry no watch. Use DistributedDataParallel (one process per GPU; "
            "watch() and scope.gather() support it) or watch the module on one device.")


def check_watch_options(*, every: Optional[int] = None, max_steps: int = 10_000,
                        probe_every: Union[int, str, None] = AUTO, probe_options: Optional[Dict[str, Any]] = None,
                        overhead: float = DEFAULT_OVERHEAD, max_interval: int = DEFAULT_MAX_INTERVAL) -> None:
    """Raise :class:`GradscopeError` for a bad :func:`watch` option (used by watch() and by the
    framework callbacks, which check their options when they are made)."""
    check_schedule(every=every, probe_every=probe_every, overhead=overhead, max_interval=max_interval)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 2:
        raise GradscopeError(f"max_steps must be an integer >= 2, got {max_steps!r}.")
    allowed = {"jacobians", "lyapunov", "k", "jacobian_samples", "threshold", "progress"}
    if probe_options is not None and not isinstance(probe_options, dict):
        raise GradscopeError(f"probe_options must be a dict of probe keywords, got {type(probe_options).__name__}.")
    bad = set(probe_options or {}) - allowed
    if bad:
        raise GradscopeError(f"unknown probe option(s) {sorted(bad)}; allowed: {sorted(allowed)}.")


def check_alerts(on_event: Optional[Callable], raise_on: Sequence[str]) -> Tuple[Optional[Callable], Tuple[str, ...]]:
    """``(on_event, raise_on as a tuple)``, or :class:`GradscopeError` for a bad one."""
    if on_event is not None and not callable(on_event):
        raise GradscopeError(f"on_event must be a callable taking one event dict, got {type(on_event).__name__}.")
    if isinstance(raise_on, str):
        raise GradscopeError(f"raise_on must be a tuple of event kinds, got the string {raise_on!r}; write "
                             f"raise_on=({raise_on!r},).")
    raise_on = tuple(raise_on or ())
    bad = [k for k in raise_on if k not in ALERT_KINDS]
    if bad:
        raise GradscopeError(f"unknown event kind(s) {bad} in raise_on; known: {list(ALERT_KINDS)}."
                             f"{did_you_mean(str(bad[0]), ALERT_KINDS)}")
    return on_event, raise_on


def resolve_update_ratio(update_ratio: Union[bool, str], params: List[torch.Tensor]) -> Tuple[bool, Optional[str]]:
    """``(record the update ratio?, a note saying why not, or None)`` for ``watch(update_ratio=…)``.

    ``"auto"`` records while one copy of the trainable ``params`` takes at most
    :data:`UPDATE_RATIO_AUTO_BYTES` (a large model's spare memory is the user's, not ours).
    """
    if not (isinstance(update_ratio, bool) or update_ratio == AUTO):
        raise GradscopeError(f"update_ratio must be True, False or 'auto', got {update_ratio!r}.")
    if update_ratio != AUTO:
        return update_ratio, None
    nbytes = sum(p.numel() * p.element_size() for p in params)
    if nbytes <= UPDATE_RATIO_AUTO_BYTES:
        return True, None
    return False, (f"update-to-weight ratios not recorded: they need a copy of the trainable parameters "
                   f"({nbytes / 2**20:.0f} MiB, over the {UPDATE_RATIO_AUTO_BYTES >> 20} MiB default); "
                   f"watch(model, update_ratio=True) records them.")


def unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[nn.Module], Optional[nn.Module]]:
    """``(the eager module to watch, its torch.compile wrapper or None, its DDP wrapper or None)``.

    A ``torch.compile``'d module: the eager module inside it is watched. Dynamo breaks the graph
    at gradscope's hooks and runs them eagerly, so the recording equals an eager run's (tested);
    site and parameter names carry no ``_orig_mod.`` prefix. ``DistributedDataParallel``: the
    replica inside (names without ``module.``); parameter norms are read from ``p.grad`` after
    DDP's all-reduce, and ``scope.gather()`` merges the ranks.
    """
    compiled = ddp = None
    while True:
        if _is_compiled(model) and compiled is None:
            compiled, model = model, model._orig_mod
        elif _is_ddp(model) and ddp is None:
            ddp, model = model, model.module
        else:
            return model, compiled, ddp


def _is_compiled(model: nn.Module) -> bool:
    """True for the wrapper torch.compile returns (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def _is_ddp(model: nn.Module) -> bool:
    """True for ``torch.nn.parallel.DistributedDataParallel`` (and subclasses)."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, DistributedDataParallel)
