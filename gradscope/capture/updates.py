"""The update-to-weight ratio ‖Δw‖/‖w‖ per parameter, as :func:`gradscope.watch` measures it.

The optimizer changes the weights between a step's backward pass and the next forward pass; the
watch sees neither the optimizer nor its step, only the forward passes (the root module's forward
pre-hook). So on a recorded step (a deep pass) the parameters are copied at the forward pass
(:meth:`UpdateTracker.snapshot`: one device copy of every parameter, their norms ‖w‖ reduced on the
device), and at the next forward pass with gradients of a *later* step (or when the watch closes)
``w_snapshot − w_now`` is taken in place and normed on the device (:meth:`UpdateTracker.measure`:
one multi-tensor norm per device). The copy is then freed, so at most one copy of the parameters
lives at a time, and only between a recorded step and the next step. The norms stay on the device
and go to the host with the next host copy the watch makes anyway (the collector's, at the end of
the next recorded step's backward pass, or at close): measuring adds no synchronisation of its own
(on a GPU each host copy waits for the queue), so a recorded step's ratio is in the recording once
the next recorded step has ended.

What is measured is every change between those two forward passes — an optimizer step, weight
decay, a scheduler, a user's manual edit, several optimizer steps if the loop takes them without
a forward pass in between. With gradient accumulation a step is one backward pass, so the steps
between optimizer steps measure 0.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._autograd import eager
from ._norms import norms as _norms
from .collector import UpdateKey

__all__ = ["UpdateTracker", "UpdateRatios"]


class UpdateTracker:
    """Snapshot of the parameters at one step's forward pass, measured against a later one.

    Args:
        params: the watched parameters, in the order of the recording's parameter columns.
    """

    def __init__(self, params: List[Tensor]):
        self.params = list(params)
        self.step: Optional[int] = None       # the step the snapshot belongs to
        self._snap: Optional[List[Tensor]] = None
        self._wnorm: Dict[torch.device, Tensor] = {}
        self._groups: Dict[torch.device, List[int]] = defaultdict(list)
        for i, p in enumerate(self.params):
            self._groups[p.device].append(i)

    @property
    def pending(self) -> bool:
        """Whether a snapshot is held (to be measured or dropped)."""
        return self._snap is not None

    def snapshot(self, step: int) -> None:
        """Copy the parameters (their values at step ``step``'s forward pass) and their norms."""
        if not self.params:
            return
        with torch.no_grad():
            self._snap = [p.detach().clone() for p in self.params]
            self._wnorm = {dev: _norms([self._snap[i] for i in idx]) for dev, idx in self._groups.items()}
        self.step = step

    def measure(self) -> Tuple[int, List[Tuple[List[int], List[int], Tensor]]]:
        """``(step, groups)``: per device ``(ok, idx, values)`` — ``values`` on the device holds
        ‖Δw‖ of the parameters ``ok`` (the snapshot against the parameters now; a parameter whose
        shape changed since is left out) then ‖w‖ of all the device's parameters ``idx``, float64.
        Frees the snapshot; copies nothing to the host (:func:`update_norms` reads ``values`` there)."""
        snap, wnorm, step = self._snap, self._wnorm, self.step
        self.drop()
        groups = []
        with torch.no_grad():
            for dev, idx in self._groups.items():
                ok = [i for i in idx if snap[i].shape == self.params[i].shape]
                if not ok:
                    continue
                olds = [snap[i] for i in ok]
                torch._foreach_sub_(olds, [self.params[i].detach() for i in ok])  # in place: no second copy
                groups.append((ok, idx, torch.cat([_norms(olds), wnorm[dev]])))
        return step, groups

    def drop(self) -> None:
        """Free the snapshot without measuring."""
        self._snap, self._wnorm, self.step = None, {}, None


def update_norms(P: int, groups) -> Tuple[np.ndarray, np.ndarray]:
    """``(‖Δw‖ [P], ‖w‖ [P])`` from :meth:`UpdateTracker.measure`'s groups ``(ok, idx, values)`` with
    their values on the host; NaN where a parameter was left out."""
    dn, wn = np.full(P, np.nan), np.full(P, np.nan)
    for ok, idx, host in groups:
        host = np.asarray(host, dtype=np.float64)
        dn[ok] = host[:len(ok)]
        wn[ok] = host[len(ok):][[idx.index(i) for i in ok]]
    return dn, wn


class UpdateRatios:
    """The update ratio as a watch measures it: snapshots at recorded steps, results into the history.

    Args:
        params: the watched parameters, in the order of the recording's parameter columns.
        history: the watch's :class:`~.history.History` (``set_update`` receives each result).
        note: adds a note to the recording, once per key.
        collector: the watch's :class:`~.collector.Collector`: measured norms ride with its next host
            copy under :class:`~.collector.UpdateKey` (:meth:`receive` takes them back).

    Attributes:
        tracker: the :class:`UpdateTracker`, or None once memory for a copy ran out.
    """

    def __init__(self, params: List[Tensor], history, note: Callable[[Any, str], None], collector):
        self.tracker: Optional[UpdateTracker] = UpdateTracker(params)
        # wrapped once (torch.compiler.disable builds a new wrapper per call: hundreds of µs)
        self._measure, self._snapshot = eager(self.tracker.measure), eager(self.tracker.snapshot)
        self._P = len(params)
        self._history, self._note, self._collector = history, note, collector
        # step -> its groups (ok, idx, values on the device), until their values reach the host
        self._waiting: Dict[int, List[Tuple[List[int], List[int], Tensor]]] = {}

    def measure_due(self, step: int) -> None:
        """Norm ‖Δw‖ and ‖w‖ of the snapshot's step on the device once a later step (``step``) has
        begun (the optimizer ran in between) and hand them to the collector; frees the snapshot.
        Nothing to do otherwise."""
        if self.tracker is None or not self.tracker.pending or step <= self.tracker.step:
            return
        snap_step, groups = self._measure()
        self._waiting[snap_step] = groups
        for g, (_, _, values) in enumerate(groups):
            self._collector.add(UpdateKey(snap_step, g), values)

    def receive(self, items) -> None:
        """The :class:`~.collector.UpdateKey` values among a host copy's ``(value, key)`` items into
        the history (before the copying step's own row is added: the measured step is the last row)."""
        # the norms were added at a step's first forward, ahead of that step's other values: stop
        # scanning the step's (possibly thousands of) items once every awaited one is found
        want = sum(len(groups) for groups in self._waiting.values())
        got: Dict[int, Dict[int, Any]] = {}
        for v, key in items:
            if want == 0:
                break
            if type(key) is UpdateKey and key.step in self._waiting:
                got.setdefault(key.step, {})[key.group] = v
                want -= 1
        for snap_step, values in got.items():
            groups = self._waiting.pop(snap_step, None)
            if groups is None:   # already read by flush()
                continue
            host = [(ok, idx, values[g]) for g, (ok, idx, _) in enumerate(groups) if g in values]
            dn, wn = update_norms(self._P, host)
            self._history.set_update(snap_step, dn, wn)

    def flush(self) -> None:
        """Copy what still waits on the device to the host now (a Recording read between recorded
        steps shows the last measured update instead of NaN; one host copy, on request only). The
        collector's copies of those values are ignored when they arrive."""
        for snap_step, groups in self._waiting.items():
            dn, wn = update_norms(self._P, [(ok, idx, v.cpu().numpy()) for ok, idx, v in groups])
            self._history.set_update(snap_step, dn, wn)
        self._waiting = {}

    def snapshot(self, step: int) -> None:
        """Copy the parameters at recorded step ``step`` (unless a copy is held already); without the
        memory for a copy, stop measuring (and say so) rather than fail the user's step."""
        if self.tracker is None or self.tracker.pending:
            return
        try:
            self._snapshot(step)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            self.tracker.drop()
            self.tracker = None
            self._note("update-ratio-oom", f"update-to-weight ratio not measured from step {step} on: no "
                                           f"memory for a copy of the parameters ({type(e).__name__}). "
                                           f"watch(model, update_ratio=False) skips it from the start.")

    def close(self, step: int) -> None:
        """Measure the last recorded step's update (the loop ended after it), copy what still waits
        on the device to the host and free the copy."""
        if self.tracker is not None:
            self.measure_due(step)
            self.tracker.drop()
        self.flush()
