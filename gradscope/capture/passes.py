"""Forward passes and steps: which pass a module call belongs to, and when a step ends.

A *pass* (:class:`Pass`) is one forward pass of the watched model with gradients enabled; a
*step* is one backward call that reaches the model. :class:`Passes` keeps the pass in progress
and the pending ones (forwards whose backward has not run yet, at most :data:`MAX_PENDING`),
counts steps and hands a finished step back (:meth:`Passes.end_backward`).

How steps are counted. A hook registered once on one trainable parameter, the *sentinel* (the
model's first; it lies on the path from every output to the input in most models), fires once in
every backward call that reaches it: each firing is a step. Steps off the schedule then cost no
per-step hook at all (a fresh hook on each step's output costs tens of µs on a CPU step whose
caches the model's own work has just evicted). Scheduled passes, and one in :data:`AUDIT_EVERY`
forward passes off the schedule (an *audit*), also hook their outputs, as every pass did before:
at the end of such a backward call the sentinel must have fired in that same call. If it did not (the loss
skipped the sentinel's branch, the parameter was frozen or replaced, ``autograd.grad`` with inputs
other than the parameters), or where the model has no trainable parameter, steps are counted at
the outputs from then on: each backward call that reaches a pending pass's outputs is one step
(the distinct graph tasks among the fired passes), and a note says from which step.

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
from ._forwards import remove_leaf_hooks
from .collector import Collector
from .sites import flatten_tensors

__all__ = ["Pass", "Passes", "CaptureHost", "MAX_PENDING", "AUDIT_EVERY"]

MAX_PENDING = 16  # forwards with gradients that never saw a backward; older ones are dropped
AUDIT_EVERY = 16  # in sentinel counting, one off-schedule forward pass in this many also hooks its outputs


class Pass:
    """One forward pass with gradients enabled, until a backward pass consumes it.

    Args:
        scheduled: hooked and replayed: a deep pass, a probe, or both.
        probe: also measure Jacobians/exponents on this pass's batch.
        deep: its step becomes a row of the history (default: ``scheduled``).
    """

    __slots__ = ("scheduled", "deep", "probe", "audit", "calls", "fired", "task", "seq_len", "handles", "attn",
                 "recomputable", "nograd", "nograd_out", "keep", "rc_last", "__weakref__")

    def __init__(self, scheduled: bool, probe: bool = False, deep: Optional[bool] = None, audit: bool = False):
        self.scheduled = scheduled
        self.deep = scheduled if deep is None else deep
        self.probe = probe
        self.audit = audit  # an off-schedule pass whose outputs are hooked (to count or check steps)
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

    Args:
        note: adds a note to the recording (key, text): says when counting moves to the outputs.

    Attributes:
        current: the forward pass in progress, or None.
        pending: passes whose outputs are hooked and whose backward has not ended yet, oldest first.
        armed: the scheduled pass the per-pass forwards stay installed for (until its backward ends).
        step: backward calls that reached the model, counted so far (:meth:`settle`).
        closed: set when the watch closes; every hook checks it.
        on_disarm: called when the per-pass forwards are no longer needed (set by the owner).
        on_backward_end: called at the end of a backward call that reached a scheduled pass.
        sentinel: the sentinel parameter's name while steps are counted by it, else None.
    """

    def __init__(self, note: Callable[[Any, str], None] = lambda key, text: None):
        self.current: Optional[Pass] = None
        self.plain = Pass(False)  # the pass object of every off-schedule, non-audit forward pass
        self.pending: List[Pass] = []
        self.armed: Optional[Pass] = None
        self.step = 0
        self.closed = False
        self.on_disarm: Callable[[], None] = lambda: None
        self.on_backward_end: Callable[[], None] = lambda: None
        self._bw_queued = False     # a backward call that reached a scheduled or audit pass is running
        self._bw_scheduled = False  # ... and it reached a scheduled pass
        self._bw_task = -1
        self._fired_at_bw = 0       # the sentinel's firings when that call reached the outputs
        self._note = note
        self.sentinel: Optional[str] = None
        self._sentinel_param = None
        self._sentinel_handle = None
        self._fired = 0             # backward calls that reached the sentinel ...
        self._counted = 0           # ... of which counted as steps
        self._off = 0               # off-schedule forward passes while the sentinel counts

    def install(self, sentinel: Optional[Tuple[str, Any]]) -> None:
        """Count steps by the hook of ``sentinel``, ``(name, parameter)`` (module docstring); None:
        count at the outputs."""
        if sentinel is not None and self._sentinel_handle is None and not self.closed:
            self.sentinel, self._sentinel_param = sentinel
            self._sentinel_handle = self._sentinel_param.register_hook(self._on_sentinel_grad)

    def _remove_sentinel(self) -> None:
        self._settle_sentinel()
        remove_leaf_hooks([self._sentinel_handle], [self._sentinel_param])
        self._sentinel_handle = self._sentinel_param = None

    def _on_sentinel_grad(self, grad) -> None:
        # once per backward call that reaches it (a leaf's hook sees the gradient summed over all
        # its uses in that call), after the model's outputs (the parameter is upstream of them);
        # no graph_task_id() here: end_backward compares counts, which a reentrant checkpoint's
        # inner backward call (a task of its own) also advances
        self._fired += 1

    def off_schedule(self) -> Pass:
        """The pass object for an off-schedule forward pass starting now: the shared inert
        :attr:`plain` while the sentinel counts steps, an *audit* pass (its outputs hooked, the
        sentinel checked at the end of its backward) on the first off-schedule pass and one in
        :data:`AUDIT_EVERY` after it, a fresh pass with hooked outputs once steps are counted at
        the outputs. A sentinel that stopped requiring gradients (frozen) ends sentinel counting."""
        if self._sentinel_handle is not None and not self._sentinel_param.requires_grad:
            self._count_at_outputs(f"the parameter {self.sentinel!r} stopped requiring gradients")
        if self._sentinel_handle is None:
            return Pass(False)
        self._off += 1  # forward passes, not steps: a sentinel that is missed stops the step count
        return Pass(False, audit=True) if self._off % AUDIT_EVERY == 1 else self.plain

    def _count_at_outputs(self, why: str) -> None:
        """End sentinel counting: from now on each backward call reaching the outputs is a step."""
        if self._sentinel_handle is None:
            return
        self._remove_sentinel()
        self._note("step-count", f"steps are counted at the model's outputs from step {self.step} on: {why} "
                                 f"(steps were counted by the gradient reaching {self.sentinel!r} before; "
                                 f"backward calls that skipped it were not counted)")
        self.sentinel = None

    def _settle_sentinel(self) -> None:
        self.step += self._fired - self._counted
        self._counted = self._fired

    @property
    def in_scheduled_backward(self) -> bool:
        """Whether the backward call running now reached a scheduled pass."""
        return self._bw_scheduled

    def now(self) -> Optional[Pass]:
        """The pass a module call belongs to: the forward pass in progress, or — for a checkpoint
        recomputation inside backward — the pending pass that this backward call reached."""
        p = self.current
        if p is not None or not self.pending or self.closed or not torch.is_grad_enabled():
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
        # starts (or the step is read) by settle(). A scheduled pass is finished at the end of its
        # backward call, where an audit pass checks the sentinel.
        if p.scheduled:
            self._bw_scheduled = True
        if (p.scheduled or p.audit) and not self._bw_queued:
            self._bw_queued = True
            self._bw_task = p.task
            self._fired_at_bw = self._fired
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self._bw_queued = self._bw_scheduled = False
        if not self.closed:
            self.on_backward_end()

    def settle(self, current: Optional[int] = None) -> None:
        """Count the steps since the last count: the sentinel's firings, or (counting at the
        outputs) the backward calls other than ``current`` that reached pending passes; drop the
        passes those calls reached."""
        if self._sentinel_handle is not None:
            self._settle_sentinel()
        if not self.pending:
            return
        tasks = set()
        keep = []
        for p in self.pending:
            if p.fired and p.task != current:
                tasks.add(p.task)
                p.drop()
            else:
                keep.append(p)
        self.pending = keep
        if self._sentinel_handle is None:
            self.step += len(tasks)
        self.maybe_disarm()

    def settle_open(self) -> None:
        """Count the steps taken since the last count while the watch is open, before the count
        is read."""
        if not self.closed:
            self.settle()

    def end_backward(self) -> Tuple[int, List[Pass]]:
        """At the end of a backward call that reached a scheduled (or audit) pass: ``(its step, the
        scheduled passes it consumed)``; earlier backward calls are counted first."""
        if self._sentinel_handle is not None and self._fired == self._fired_at_bw:
            self._count_at_outputs(f"a backward call reached the outputs but not {self.sentinel!r}")
        self.settle(current=self._bw_task)
        fired = [p for p in self.pending if p.fired]
        self.pending = [p for p in self.pending if not p.fired]
        if self._sentinel_handle is not None:
            step = self.step - 1  # this call's own firing was just counted
        else:
            step = self.step
            self.step += 1
        for p in fired:
            p.drop()
        self.maybe_disarm()
        return step, [p for p in fired if p.scheduled]

    def close(self) -> None:
        """Mark closed, remove the sentinel's hook and drop every pending pass."""
        if self._sentinel_handle is not None:
            self._remove_sentinel()
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
