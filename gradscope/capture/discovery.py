"""Finding user cells: modules whose output feeds their own next call, seen on one forward pass.

On the first scheduled pass (unless ``watch(sites=[...])`` named the sites) every module that may
be a cell — not a fused or attention module, not parameter-free, not TorchScript — gets a forward
hook that logs its calls' tensors. At the end of that forward :func:`~.sites.find_cells` decides
by data flow which modules are cells; they become sites, and the states of the pass just run are
hooked at once (its backward has not run yet).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ._autograd import saved_hooks_active
from .alerts import Notes
from .catalog import SiteTable
from .cells import Cells
from .collector import StateKey
from .passes import Pass, Passes
from .sites import FUSED_TYPES, SiteSpec, find_cells, flatten_tensors, state_names

__all__ = ["Discovery"]


class Discovery:
    """Cell discovery for one watch.

    Args:
        model: the watched (eager) module.
        table: its sites; found cells are added to it.
        passes: the watch's passes.
        cells: tracks the states of the discovery pass.
        notes: where "no site found" is said.

    Attributes:
        done: whether discovery has run (or was replaced by an explicit ``sites=`` selection).
    """

    def __init__(self, model: nn.Module, table: SiteTable, passes: Passes, cells: Cells, notes: Notes):
        self.model, self.table, self.passes, self.cells, self.notes = model, table, passes, cells, notes
        self.done = table.selected is not None  # an explicit selection replaces automatic cell discovery
        self._log: Optional[Dict[str, list]] = None
        self._handles: List[Any] = []

    @property
    def running(self) -> bool:
        """Whether the calls of the forward in progress are being logged."""
        return self._log is not None

    def start(self) -> None:
        """Hook every candidate module for the scheduled pass starting now."""
        self.remove()  # left by a discovery pass that raised
        self._log = defaultdict(list)
        layout = self.table.attn_layout
        for name, m in self.model.named_modules():
            if not name or isinstance(m, FUSED_TYPES) or name in self.table.sites:
                continue
            if name in layout.blocks or name in layout.attn:
                continue  # attention blocks and modules are attention sites, not recurrent cells
            if next(m.parameters(), None) is None:
                continue  # parameter-free modules (activations, dropout) are never cells
            if isinstance(m, torch.jit.ScriptModule):
                continue  # no hooks allowed on TorchScript; reported in recording.unsupported
            self._handles.append(m.register_forward_hook(functools.partial(self._on_call, name), with_kwargs=True))

    def _on_call(self, name, module, args, kwargs, output):
        # calls without gradients inside a pass with them count too (a reentrant checkpoint's
        # first forward; its recomputation in backward records them)
        if self._log is not None and (torch.is_grad_enabled() or self.passes.current is not None):
            p = self.passes.current
            if p is not None and not p.recomputable and torch.is_grad_enabled() and saved_hooks_active():
                p.recomputable = True
            self._log[name].append((flatten_tensors((args, kwargs)), flatten_tensors(output),
                                    (args, kwargs), output, torch.is_grad_enabled()))

    def finish(self, p: Pass) -> None:
        """Decide the cells from pass ``p``'s calls, add them as sites and hook their states."""
        log, self._log = self._log, None
        self.remove()
        self.done = True
        cells = find_cells({n: [(c[0], c[1]) for c in calls] for n, calls in log.items()})
        for name, (outs, ins) in cells.items():
            m = self.table.module(name)
            states = state_names(len(outs))
            self.table.sites[name] = SiteSpec(name, name, "cell", states,
                                              info={"module_type": type(m).__name__, "calls": len(log[name])},
                                              state_outputs=outs, state_inputs=ins)
            # Hooks on this pass's states are registered now: the backward has not run yet.
            for t, (_, outputs, _, _, grad) in enumerate(log[name]):
                if grad:
                    for sname, i in zip(states, outs):
                        self.cells.track(p, outputs[i], StateKey(name, sname, t))
                elif self.table.wanted(name):
                    # Without gradients at the call (a reentrant checkpoint's first forward): recorded
                    # when recomputed. Its outputs may require grad by now (a checkpoint's outputs):
                    # a hook there would count the gradient reaching them twice.
                    p.remember_nograd(name, t, outputs)
            p.seq_len[name] = len(log[name])
            if p.probe and self.table.wanted(name):
                p.calls[name] = [(c[2], c[3]) for c in log[name]]
        if not self.table.sites:
            self.notes.add("no-sites", "no recurrent or attention site found: no nn.RNN/LSTM/GRU and no "
                                       "module whose output feeds its own next call; parameter gradient "
                                       "norms are still recorded. Name a module in watch(sites=[...]) to record it.")

    def remove(self) -> None:
        """Remove the discovery hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        """Remove the hooks and drop the log of a discovery pass that never ended."""
        self.remove()
        self._log = None
