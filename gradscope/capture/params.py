"""Parameter gradient norms of a scheduled step.

Each trainable parameter gets a tensor hook from a scheduled pass's forward until the end of its
backward; the gradient is normed with the state gradients in one multi-tensor op
(:class:`~.collector.Collector`). Under ``DistributedDataParallel`` no hook is set: the norms are
read from ``p.grad`` after DDP's all-reduce (:meth:`ParamGrads.read_grads`), so every rank records
the averaged gradient it applies.
"""
from __future__ import annotations

import functools
from typing import Any, List, Tuple

from torch import Tensor, nn

from ._forwards import remove_leaf_hooks
from ._norms import norm as _norm
from .collector import Collector, ParamKey
from .passes import Passes

__all__ = ["ParamGrads"]


class ParamGrads:
    """The gradient-norm hooks of the watched parameters.

    Args:
        model: the watched (eager) module; its parameters that require grad are watched.
        passes: the watch's passes (a gradient counts only in a backward through a scheduled pass).
        collector: this step's values.
        hooked: whether to hook the parameters (False under DDP: :meth:`read_grads` instead).

    Attributes:
        params: ``(name, parameter)`` of every watched parameter, in the recording's column order.
    """

    def __init__(self, model: nn.Module, passes: Passes, collector: Collector, hooked: bool = True):
        self.params: List[Tuple[str, Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.passes, self.collector, self._hooked = passes, collector, hooked
        self._handles: List[Any] = []

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.params]

    def hook(self) -> None:
        """Hook every parameter for the scheduled step starting now (once; a no-op under DDP)."""
        if not self._handles and self._hooked:
            for i, (_, prm) in enumerate(self.params):
                if prm.requires_grad:  # one frozen since the watch began has no gradient to norm
                    self._handles.append(prm.register_hook(functools.partial(self._on_grad, i)))

    def _on_grad(self, i, grad):
        if grad is None or self.passes.closed or not self.passes.in_scheduled_backward:
            # not in_scheduled_backward: no scheduled pass in this backward (e.g. one through an
            # older, off-schedule pass while the hooks of a scheduled pass that raised are still on)
            return
        if grad.is_sparse:  # e.g. nn.Embedding(sparse=True): duplicate indices summed first
            self.collector.add(ParamKey(i), _norm(grad.detach().coalesce()._values()))
            return
        # normed with the state gradients, one multi-tensor op (no norm call per parameter)
        self.collector.add_gradient(ParamKey(i), grad)

    def read_grads(self) -> None:
        """Norm every parameter's ``.grad`` now (DDP: after the all-reduce)."""
        for i, (_, prm) in enumerate(self.params):
            g = prm.grad
            if g is not None and not g.is_sparse:
                self.collector.add(ParamKey(i), _norm(g.detach()))

    def remove(self) -> None:
        """Remove the hooks (and torch's hook wrapper where no hook is left on a parameter)."""
        if self._handles:
            remove_leaf_hooks(self._handles, [prm for _, prm in self.params])
            self._handles = []
