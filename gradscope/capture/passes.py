"""Forward passes and steps: which pass a module call belongs to, and when a step ends.

A *pass* (:class:`Pass`) is one forward pass of the watched model with gradients enabled; a
*step* is one backward call that reaches the model. :class:`Passes` keeps the pass in progress
and the pending ones (forwards whose backward has not run yet, at most :data:`MAX_PENDING`),
counts steps and hands a finished step back (:meth:`Passes.end_backward`).

Activation checkpointing. ``torch.utils.checkpoint`` recomputes a checkpointed region inside the
backward pass, with gradients enabled (both kinds). The rule: a forward call made while autograd
runs a backward call that has already reached a pending pass of this watch (its output hook fired
with that graph task id) is a *recomputation of that pass*, not a new step: the root hooks ignore
it, and the per-pass forwards (fused replay, user-cell wrappers, accelerator LSTMCell) — kept
installed from a scheduled pass's forward until its backward ends (:attr:`Passes.armed`) — act
for that pass (:meth:`Passes.now`). A reentrant checkpoint around the whole model is the
exception that needs no rule: its first forward runs without gradients (no pass), so its
recomputation is the step's only forward with gradients and counts as the step.

:class:`CaptureHost` is what attention capture (:mod:`.attention`) sees of a watch.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._autograd import backward_task, graph_task_id
from .collector import Collector
from .sites import flatten_tensors

__all__ = ["Pass", "Passes", "CaptureHost", "MAX_PENDING"]

MAX_PENDING = 16  # forwards with gradients that never saw a backward; older ones are dropped


class Pass:
    """One forward pass with gradients enabled, until a backward pass consumes it.

    Args:
        scheduled: hooked and replayed: a deep pass, a probe, or both.
        probe: also measure Jacobians/exponents on this pass's batch.
        deep: its step becomes a row of the history (default: ``scheduled``).
    """

    __slots__ = ("scheduled", "deep", "probe", "calls", "fired", "task", "seq_len", "handles", "attn",
                 "recomputable", "nograd", "nograd_out", "keep", "rc_last", "__weakref__")

    def __init__(self, scheduled: bool, probe: bool = False, deep: Optional[bool] = None):
        self.scheduled = scheduled
        self.deep = scheduled if deep is None else deep
        self.probe = probe
        self.calls: Dict[str, list] = {}  # probe passes: module -> [((args, kwargs), output), …]
        self.fired = False
        self.task = -1  # the autograd graph task (backward call) that first reached this pass
        self.seq_len: Dict[str, int] = {}
        self.handles: List[Any] = []
        self.attn: Any = None  # attention capture state of a scheduled pass (capture/attention/)
        # Activation checkpointing (module docstring): whether part of this pass may be run again
        # inside its backward (saved-tensor hooks were active, or a watched module ran without
        # gradients), and the sites this scheduled pass ran without gradients (a reentrant
        # checkpoint's first forward), recorded when recomputed in backward.
        self.recomputable = False
        self.nograd: set = set()
        self.nograd_out: Dict[str, Dict[Tuple, int]] = {}  # cell site -> {(data_ptr, shape): call t}
        self.keep: List[Any] = []  # those calls' outputs, alive so that their data_ptr stay unique
        self.rc_last: Dict[str, Tuple[Tuple, int]] = {}  # cell site -> (outputs, t) of its last recomputed call

    def track(self, tensor, hook: Callable) -> None:
        """Register tensor hook ``hook`` on ``tensor`` for this pass (removed when it is dropped)."""
        if tensor.requires_grad:
            self.handles.append(tensor.register_hook(hook))

    def drop(self) -> None:
        """Remove this pass's tensor hooks and forget what it kept."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.keep, self.nograd_out, self.rc_last = [], {}, {}

    def remember_nograd(self, name: str, t: int, outs) -> None:
        """Note call ``t`` of cell ``name`` ran without gradients in this pass, by its outputs'
        memory, so that a recomputation in backward knows its time steps (:meth:`recompute_index`)."""
        seen = self.nograd_out.setdefault(name, {})
        for o in outs:
            if o.numel():
                seen[(o.data_ptr(), tuple(o.shape))] = t
        self.keep.append(outs)

    def recompute_index(self, name: str, args, kwargs) -> int:
        """Time index of a recomputed call of cell ``name``: one past the call whose output it
        takes — the previous recomputed call (same objects), or a call of the first forward
        (reentrant checkpointing hands the region detached views of its inputs: same data)."""
        leaves = [t for t in flatten_tensors((args, kwargs)) if t.numel()]
        last = self.rc_last.get(name)
        if last is not None and any(any(a is o for o in last[0]) for a in leaves):
            return last[1] + 1
        seen = self.nograd_out.get(name, {})
        for a in leaves:
            t = seen.get((a.data_ptr(), tuple(a.shape)))
            if t is not None:
                return t + 1
        return 0


class Passes:
    """The pass in progress, the pending passes and the step count of one watch.

    Attributes:
        current: the forward pass in progress, or None.
        pending: passes whose backward has not ended yet, oldest first.
        armed: the scheduled pass the per-pass forwards stay installed for (until its backward ends).
        step: backward calls that reached the model, counted so far (:meth:`settle`).
        closed: set when the watch closes; every hook checks it.
        on_disarm: called when the per-pass forwards are no longer needed (set by the owner).
        on_backward_end: called at the end of a backward call that reached a scheduled pass.
    """

    def __init__(self):
        self.current: Optional[Pass] = None
        self.pending: List[Pass] = []
        self.armed: Optional[Pass] = None
        self.step = 0
        self.closed = False
        self.on_disarm: Callable[[], None] = lambda: None
        self.on_backward_end: Callable[[], None] = lambda: None
        self._bw_queued = False
        self._bw_task = -1

    @property
    def in_scheduled_backward(self) -> bool:
        """Whether the backward call running now reached a scheduled pass."""
        return self._bw_queued

    def now(self) -> Optional[Pass]:
        """The pass a module call belongs to: the forward pass in progress, or — for a checkpoint
        recomputation inside backward — the pending pass that this backward call reached."""
        p = self.current
        if p is not None or self.closed or not torch.is_grad_enabled():
            return p
        task = backward_task()
        if task < 0:
            return None
        for q in reversed(self.pending):
            if q.fired and q.task == task:
                return q
        return None

    def reruns_in_backward(self) -> bool:
        """Whether a pending scheduled pass ran watched modules without gradients (a reentrant
        checkpoint's first forward): its backward will run them again (probe() then avoids
        torch.autograd.grad, which reentrant checkpointing refuses)."""
        return any(p.scheduled and (p.nograd or p.nograd_out) for p in self.pending)

    def armed_pending(self) -> bool:
        """Whether the armed pass is still waiting for its backward."""
        return self.armed is not None and any(p is self.armed for p in self.pending)

    def disarm(self) -> None:
        """Forget the armed pass and remove the per-pass forwards (:attr:`on_disarm`)."""
        self.armed = None
        self.on_disarm()

    def maybe_disarm(self) -> None:
        if self.armed is not None and not self.armed_pending():
            self.disarm()

    def add(self, p: Pass, outs) -> None:
        """Make ``p`` pending: a hook on its outputs ``outs`` sees the backward call reach it."""
        hook = functools.partial(self._on_output_grad, weakref.ref(p))
        for t in outs:
            p.handles.append(t.register_hook(hook))
        self.pending.append(p)
        while len(self.pending) > MAX_PENDING:
            self.pending.pop(0).drop()
        self.maybe_disarm()

    def _on_output_grad(self, pref, grad):
        p = pref()
        if p is None or self.closed or p.fired:
            return
        p.fired = True
        p.task = graph_task_id()
        # Off schedule nothing more happens here: the step is counted when the next forward pass
        # starts (or the step is read), from the distinct backward calls that reached pending passes
        # (settle). A scheduled pass is finished at the end of its backward call.
        if p.scheduled and not self._bw_queued:
            self._bw_queued = True
            self._bw_task = p.task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self._bw_queued = False
        if not self.closed:
            self.on_backward_end()

    def settle(self, current: Optional[int] = None) -> None:
        """Count the backward calls (other than ``current``) that reached pending passes since the
        last count as steps, and drop those passes."""
        tasks = set()
        keep = []
        for p in self.pending:
            if p.fired and p.task != current:
                tasks.add(p.task)
                p.drop()
            else:
                keep.append(p)
        self.pending = keep
        self.step += len(tasks)
        self.maybe_disarm()

    def settle_open(self) -> None:
        """Count the steps taken since the last count while the watch is open, before the count
        is read."""
        if self.pending and not self.closed:
            self.settle()

    def end_backward(self) -> Tuple[int, List[Pass]]:
        """At the end of a backward call that reached a scheduled pass: ``(its step, the scheduled
        passes it consumed)``; earlier backward calls are counted first."""
        self.settle(current=self._bw_task)
        fired = [p for p in self.pending if p.fired]
        self.pending = [p for p in self.pending if not p.fired]
        step = self.step
        self.step += 1
        for p in fired:
            p.drop()
        self.maybe_disarm()
        return step, [p for p in fired if p.scheduled]

    def close(self) -> None:
        """Mark closed and drop every pending pass."""
        self.closed = True
        for p in self.pending:
            p.drop()
        self.pending = []


class CaptureHost:
    """What attention capture (:class:`~.attention.AttentionCapture`) sees of a watch: the
    collector, which pass a call belongs to, claiming a module, notes (its ``Host`` protocol).

    Args:
        model: the watched module.
        collector: this step's values.
        passes: the watch's passes.
        claim: marks a module as watched (a second watch on it is refused).
        note: adds a note to the recording, once per key.
    """

    __slots__ = ("model", "collector", "_passes", "claim", "note")

    def __init__(self, model: nn.Module, collector: Collector, passes: Passes,
                 claim: Callable[[nn.Module], None], note: Callable[[Any, str], None]):
        self.model, self.collector, self._passes = model, collector, passes
        self.claim, self.note = claim, note

    @property
    def closed(self) -> bool:
        return self._passes.closed

    def pass_now(self) -> Optional[Pass]:
        return self._passes.now()

    def is_current(self, p) -> bool:
        return p is self._passes.current
