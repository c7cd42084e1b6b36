"""The update-to-weight ratio ‖Δw‖/‖w‖ per parameter, as :func:`gradscope.watch` measures it.

The optimizer changes the weights between a step's backward pass and the next forward pass; the
watch sees neither the optimizer nor its step, only the forward passes (the root module's forward
pre-hook). So on a recorded step (a deep pass) the parameters are copied at the forward pass
(:meth:`UpdateTracker.snapshot`: one device copy of every parameter, their norms ‖w‖ reduced on the
device), and at the next forward pass with gradients of a *later* step (or when the watch closes)
``w_snapshot − w_now`` is taken in place and normed (:meth:`UpdateTracker.measure`): one
multi-tensor norm and one host copy per device. The copy is then freed, so at most one copy of
the parameters lives at a time, and only between a recorded step and the next step.

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

    def measure(self) -> Tuple[int, np.ndarray, np.ndarray]:
        """``(step, ‖Δw‖ [P], ‖w‖ [P])`` of the snapshot against the parameters now, in float64;
        frees the snapshot. A parameter whose shape changed since gets NaN."""
        snap, wnorm, step = self._snap, self._wnorm, self.step
        self.drop()
        P = len(self.params)
        dn, wn = np.full(P, np.nan), np.full(P, np.nan)
        with torch.no_grad():
            for dev, idx in self._groups.items():
                ok = [i for i in idx if snap[i].shape == self.params[i].shape]
                if not ok:
                    continue
                olds = [snap[i] for i in ok]
                torch._foreach_sub_(olds, [self.params[i].detach() for i in ok])  # in place: no second copy
                host = torch.cat([_norms(olds), wnorm[dev][[idx.index(i) for i in ok]]]).cpu().numpy()
                dn[ok], wn[ok] = host[:len(ok)], host[len(ok):]
        return step, dn, wn

    def drop(self) -> None:
        """Free the snapshot without measuring."""
        self._snap, self._wnorm, self.step = None, {}, None


class UpdateRatios:
    """The update ratio as a watch measures it: snapshots at recorded steps, results into the history.

    Args:
        params: the watched parameters, in the order of the recording's parameter columns.
        history: the watch's :class:`~.history.History` (``set_update`` receives each result).
        note: adds a note to the recording, once per key.

    Attributes:
        tracker: the :class:`UpdateTracker`, or None once memory for a copy ran out.
    """

    def __init__(self, params: List[Tensor], history, note: Callable[[Any, str], None]):
        self.tracker: Optional[UpdateTracker] = UpdateTracker(params)
        self._history, self._note = history, note

    def measure_due(self, step: int) -> None:
        """‖Δw‖ and ‖w‖ of the snapshot's step into its history row once a later step (``step``)
        has begun (the optimizer ran in between); frees the snapshot. Nothing to do otherwise."""
        if self.tracker is None or not self.tracker.pending or step <= self.tracker.step:
            return
        snap_step, upd, wn = eager(self.tracker.measure)()
        self._history.set_update(snap_step, upd, wn)

    def snapshot(self, step: int) -> None:
        """Copy the parameters at recorded step ``step`` (unless a copy is held already); without the
        memory for a copy, stop measuring (and say so) rather than fail the user's step."""
        if self.tracker is None or self.tracker.pending:
            return
        try:
            eager(self.tracker.snapshot)(step)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            self.tracker.drop()
            self.tracker = None
            self._note("update-ratio-oom", f"update-to-weight ratio not measured from step {step} on: no "
                                           f"memory for a copy of the parameters ({type(e).__name__}). "
                                           f"watch(model, update_ratio=False) skips it from the start.")

    def close(self, step: int) -> None:
        """Measure the last recorded step's update (the loop ended after it) and free the copy."""
        if self.tracker is not None:
            self.measure_due(step)
            self.tracker.drop()
