"""What capture needs to know about autograd and torch.compile at a given moment.

Which backward call is running (activation-checkpoint recomputations run inside one), whether
saved-tensor hooks are active (non-reentrant checkpointing), and running gradscope's own work
eagerly under ``torch.compile``. Private torch entry points are looked up once, with fallbacks.
"""
from __future__ import annotations

import torch

__all__ = ["eager", "graph_task_id", "saved_hooks_active", "backward_task"]


def eager(fn):
    """``fn`` run eagerly under ``torch.compile`` (Dynamo would try to trace gradscope's own work —
    the probe's estimators took minutes to trace); ``fn`` itself where torch has no compiler API.
    Wrap once and keep the result: each call builds a new wrapper (hundreds of µs)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def graph_task_id() -> int:
    """Id of the running backward call (torch ≥ 2.1); a fresh number per call where missing."""
    global _TASK_FALLBACK
    if _CURRENT_TASK is not None:
        return _CURRENT_TASK()
    _TASK_FALLBACK += 1
    return _TASK_FALLBACK


_CURRENT_TASK = getattr(torch._C, "_current_graph_task_id", None)
_TASK_FALLBACK = 0


_TOP_SAVED_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def saved_hooks_active() -> bool:
    """Whether saved-tensor hooks are active: non-reentrant ``torch.utils.checkpoint`` runs its
    region under them (so do ``save_on_cpu`` and user hooks: then we merely keep a little more
    installed until the backward ends). True where torch cannot tell, and while Dynamo traces (it
    cannot trace this builtin; ``eager`` would cost ~3 µs a call in eager mode)."""
    if _TOP_SAVED_HOOKS is None or _IS_COMPILING():
        return True
    try:
        return _TOP_SAVED_HOOKS(False) is not None
    except Exception:  # pragma: no cover - a changed private signature
        return True


def backward_task() -> int:
    """Id of the backward call running on this thread, or -1 outside backward (and on torch < 2.1,
    which cannot tell: there activation-checkpoint recomputations are not recognised; also while
    Dynamo traces a forward, which it cannot do inside a backward call)."""
    return _CURRENT_TASK() if _CURRENT_TASK is not None and not _IS_COMPILING() else -1
