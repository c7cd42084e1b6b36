"""Recurrent sites as a watch runs them: fused modules replayed, user cells' calls recorded.

On a scheduled pass every recurrent state must be a node of the autograd graph with a tensor hook
that stores its fully accumulated gradient (:meth:`Cells.track`):

* fused ``nn.RNN/LSTM/GRU`` modules get a forward that replays them step by step
  (:func:`~.replay.replay_fused`, :meth:`Cells.replay`); off schedule they run their own kernel,
  untouched. The forward is installed for scheduled passes only, except on the root module
  (looked up before its pre-hook runs) and under ``torch.compile`` (Dynamo would recompile for a
  forward that changes between passes): there it stays for the whole watch.
* user cells (sites of kind ``"cell"``, found by :mod:`.discovery` or named in ``sites=``) get a
  wrapper for the pass that records each call's state outputs (:meth:`Cells.on_call`).
* ``nn.LSTMCell`` on an accelerator is one fused kernel whose autograd node hides c_t → h_t; on
  scheduled passes it runs op by op (:func:`~.recurrent.lstm_cell_ops`).

Per-pass forwards stay installed until the pass's backward ends when activation checkpointing may
recompute the pass there (:mod:`.passes`); a recomputation replays again and records only what its
first forward ran without gradients.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._autograd import eager, saved_hooks_active
from ._forwards import PatchedForward
from .alerts import Notes
from .catalog import SiteTable
from .collector import Collector, SiteKey, StateKey
from .passes import Pass, Passes
from .patching import ForwardHandle, remove_all, swap_forward
from .recurrent import dense_len, fused_cell_device, lstm_cell_ops
from .replay import replay_fused
from .sites import flatten_tensors, state_names

__all__ = ["Cells"]


def _ignore_norms(layer, reverse, norms) -> None:
    """on_norms of a replay that records nothing (it still takes the fast path, same tensors saved)."""


def _gradscope_eager(forward):
    """``forward`` marked as gradscope's, run eagerly under torch.compile (it drives its own hooks
    and autograd Function; disabling compilation here makes Dynamo break the graph around it)."""
    forward = eager(forward)
    forward.__gradscope__ = True  # type: ignore[attr-defined]
    return forward


class Cells:
    """The recurrent part of a watch: owns the replaying forwards and the user-cell wrappers.

    Args:
        model: the watched (eager) module.
        table: its sites.
        passes: the watch's passes (which pass a call belongs to).
        collector: this step's values.
        claim: marks a module as watched (a second watch on it is refused).
        compiled: whether the model is watched inside a ``torch.compile`` wrapper.
    """

    def __init__(self, model: nn.Module, table: SiteTable, passes: Passes, collector: Collector,
                 claim: Callable[[nn.Module], None], compiled: bool):
        self.model, self.table, self.passes, self.collector = model, table, passes, collector
        self._claim, self._compiled = claim, compiled
        self._forward_handles: List[ForwardHandle] = []  # forwards installed for the whole watch
        self._pass_forwards: Dict[nn.Module, Any] = {}  # fused submodules' replaying forwards
        self._lstm_cells: Dict[nn.Module, Any] = {}
        self._pass_handles: List[ForwardHandle] = []  # those and the LSTMCells', installed for a pass
        self._cell_forwards: List[ForwardHandle] = []  # user cells' per-pass wrappers
        self._cell_handles: List[Any] = []  # user cells' per-pass forward hooks
        self._counter: Dict[str, int] = {}  # calls of each user cell in the forward in progress

    # ------------------------------------------------------------------ setup
    def install(self) -> None:
        """Patch every fused module with a wanted site; prepare the LSTMCells' op-by-op forwards."""
        for name, m in self.table.fused.items():
            if any(self.table.wanted(s.name) for s in self.table.tracked_fused[name]):
                self.patch_fused(m, name)
        self._lstm_cells = {m: self._lstm_cell_forward(m) for m in self.table.modules.values()
                            if getattr(type(m), "forward", None) is nn.LSTMCell.forward}

    def patch_fused(self, m: nn.Module, name: str) -> None:
        """Shadow the fused module's forward with one that replays on scheduled passes."""
        cls_forward = type(m).forward
        cells_ref = weakref.ref(self)
        specs = {(s.layer, s.reverse): s.name for s in self.table.tracked_fused[name] if self.table.wanted(s.name)}

        def forward(*args, **kwargs):
            cells = cells_ref()
            p = cells.passes.now() if cells is not None and not cells.passes.closed else None
            if p is None or not p.scheduled:
                return cls_forward(m, *args, **kwargs)
            if not torch.is_grad_enabled():
                # e.g. the first forward of a reentrant checkpoint: its recomputation in backward
                # replays and records (below); the probe measures this call
                if p is cells.passes.current:
                    p.nograd.add(name)
                    if p.probe:
                        p.calls.setdefault(name, []).append(((args, kwargs), None))
                return cls_forward(m, *args, **kwargs)
            if p is not cells.passes.current:
                # A checkpoint recomputation inside backward: replay again, so that it saves exactly
                # the tensors the first forward saved (non-reentrant checkpointing compares them).
                # It records only what the first forward ran without gradients (reentrant
                # checkpointing); else the first forward's graph, hooked already, is the one
                # backpropagated and the recomputed graph is discarded.
                return cells.replay(m, specs, p, args, kwargs, track=name in p.nograd)
            if not p.recomputable and saved_hooks_active():
                p.recomputable = True
            return cells.replay(m, specs, p, args, kwargs)

        forward = _gradscope_eager(forward)
        self._claim(m)
        # The replay runs the class's forward: removing it deletes the instance attribute (restore=None).
        if m is self.model and not self._compiled:
            # The root's forward is looked up before its pre-hook runs: installed for good (as an
            # object whose copies run unwatched)
            self._forward_handles.append(swap_forward(
                m, PatchedForward(forward, m, None, functools.partial(cls_forward, m)), restore=None))
        elif self._compiled:
            # Dynamo would guard on (and recompile for) a forward that changes between passes
            self._forward_handles.append(swap_forward(m, forward, restore=None))
        else:
            # Installed by begin_pass for scheduled passes only: off schedule the module runs with
            # no wrapper at all.
            self._pass_forwards[m] = forward

    def _lstm_cell_forward(self, m: nn.Module):
        """On an accelerator nn.LSTMCell is one fused kernel whose autograd node outputs c_t and
        computes h_t from it internally, so a hook on c_t would miss the path c_t → h_t. For
        scheduled passes on such a device this forward (installed by :meth:`begin_pass`, removed
        when the pass ends) runs the cell op by op instead (same formula; within the replay
        tolerance), so ∂L/∂c_t is total. CPU cells and unscheduled passes are left untouched."""
        cells_ref = weakref.ref(self)
        cls_forward = type(m).forward

        def forward(input, hx=None):
            cells = cells_ref()
            p = cells.passes.now() if cells is not None and not cells.passes.closed else None
            if p is None or not p.scheduled or not fused_cell_device(input.device) or not torch.is_grad_enabled():
                return cls_forward(m, input, hx)
            if p is cells.passes.current and not p.recomputable and saved_hooks_active():
                p.recomputable = True
            return lstm_cell_ops(m, input, hx)

        return _gradscope_eager(forward)

    # ------------------------------------------------------------ per pass
    @property
    def has_pass_wrappers(self) -> bool:
        """Whether user-cell wrappers of some pass are installed."""
        return bool(self._cell_forwards)

    def begin_pass(self) -> None:
        """Install the per-pass forwards and cell wrappers for the scheduled pass starting now."""
        self._counter = {}
        self.disarm()  # anything a pass that raised left behind
        for m, fwd in self._pass_forwards.items():
            self._pass_handles.append(swap_forward(m, fwd, restore=None))
        for m, fwd in self._lstm_cells.items():
            if fused_cell_device(m.weight_ih.device):
                self._pass_handles.append(swap_forward(m, fwd, restore=None))
        for name, m in self.table.explicit_cells.items():
            self._watch_cell(name, m)
        for name, spec in self.table.sites.items():
            if spec.kind == "cell" and name not in self.table.explicit_cells and self.table.wanted(name):
                self._watch_cell(name, self.table.module(spec.module_name))

    def end_pass(self, p: Pass, has_outputs: bool) -> None:
        """At the end of scheduled pass ``p``'s forward: its cells' sequence lengths; keep the
        per-pass forwards (armed) while checkpointing may recompute the pass in its backward."""
        for name, n in self._counter.items():
            p.seq_len[name] = max(p.seq_len.get(name, 0), n)
        if has_outputs and (p.recomputable or p.nograd or p.nograd_out):
            # The per-pass forwards stay until this pass's backward ends: activation checkpointing
            # runs parts of the forward again in there. Cells just discovered that ran without
            # gradients get their wrapper for that recomputation.
            self.passes.armed = p
            wrapped = {id(h.module) for h in self._cell_forwards}
            for name in p.nograd_out:
                cell = self.table.module(self.table.sites[name].module_name)
                if id(cell) not in wrapped:
                    self._watch_cell(name, cell)
        else:
            self.passes.disarm()

    def disarm(self) -> None:
        """Remove the per-pass forwards and cell hooks. One left behind by a forward pass that
        raised falls back to the module's own forward off schedule."""
        remove_all(self._cell_forwards)
        remove_all(self._pass_handles)
        for h in self._cell_handles:
            h.remove()
        self._cell_handles = []

    def close(self) -> None:
        """Remove every forward and hook this object installed."""
        self.disarm()
        remove_all(self._forward_handles)

    def _watch_cell(self, name: str, m: nn.Module) -> None:
        """Record each call of cell ``m`` in this scheduled pass. Normally by wrapping its forward
        for the pass (an instance attribute, removed when the pass ends): a forward hook would send
        every one of the T calls down nn.Module's slower hooked call path. A forward hook is used
        where the cell has hooks of its own (they may change its output) or the model is compiled."""
        if self._compiled or m._forward_hooks or m._forward_pre_hooks:
            self._cell_handles.append(m.register_forward_hook(functools.partial(self.on_call, name),
                                                              with_kwargs=True))
            return
        base = m.forward
        on_call = self.on_call

        def forward(*args, **kwargs):
            out = base(*args, **kwargs)
            on_call(name, m, args, kwargs, out)
            return out

        # only_this: a wrapper replaced meanwhile (by the user) is left alone, as a user's forward is
        self._cell_forwards.append(swap_forward(m, forward, only_this=True))

    # ---------------------------------------------------------- state hooks
    def track(self, p: Pass, tensor: Tensor, key: StateKey) -> None:
        """Store the norm of the gradient reaching ``tensor`` (state ``key``) in pass ``p``'s step."""
        p.track(tensor, functools.partial(self._on_state_grad, key))

    def _on_state_grad(self, key, grad):
        # Keep the gradient itself; the norms of all of a step's states are taken at the end of the
        # backward pass in one batched op per shape (cheaper than one norm call per hook). A None
        # gradient (an output no later op used, e.g. the last c of a fused CUDA cell) adds nothing.
        if grad is not None and not self.passes.closed:
            self.collector.add_gradient(key, grad)

    def replay(self, m: nn.Module, specs: Dict[Tuple[int, bool], str], p: Pass, args, kwargs,
               track: bool = True):
        """Replay fused module ``m`` for pass ``p``; ``track=False``: the same computation, nothing
        recorded (a checkpoint recomputation whose first forward recorded already)."""
        input = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if not track:
            return replay_fused(m, input, hx, None, _ignore_norms)
        if p.probe and p is self.passes.current:
            p.calls.setdefault(self.table.module_names[id(m)], []).append(((args, kwargs), None))
        names = {key: (site, self.table.sites[site].states) for key, site in specs.items()}
        seen: Dict[str, int] = {}

        def on_state(layer, reverse, t, state):
            entry = names.get((layer, reverse))
            if entry is None:
                return
            site, states = entry
            if t >= seen.get(site, 0):
                seen[site] = t + 1
            if isinstance(state, tuple):
                for sname, s in zip(states, state):
                    self.track(p, s, StateKey(site, sname, t))
            else:
                self.track(p, state, StateKey(site, "h", t))

        def on_norms(layer, reverse, norms):
            entry = names.get((layer, reverse))
            if entry is not None and not self.passes.closed:
                for sname, v in norms.items():
                    self.collector.add(SiteKey(entry[0], sname), v)

        out = replay_fused(m, input, hx, on_state, on_norms)
        if not seen:  # fast path: every selected layer ran over the whole (dense) sequence
            T = dense_len(m, input)
            seen = {site: T for site, _ in names.values()}
        for site, n in seen.items():
            p.seq_len[site] = max(p.seq_len.get(site, 0), n)
        return out

    def on_call(self, name, module, args, kwargs, output):
        """A call of user cell ``name`` (its wrapper or forward hook)."""
        p = self.passes.current
        if p is None:
            p = self.passes.now()
            if p is None or not p.scheduled or name not in p.nograd_out:
                # a wrapper left by a pass that raised, or a recomputation whose first forward
                # ran with gradients (its graph carries the hooks already)
                return
            # a reentrant checkpoint's recomputation in backward: this graph is the one
            # backpropagated (the first forward ran without gradients)
            t = p.recompute_index(name, args, kwargs)
            self.record_call(name, t, args, kwargs, output, p)
            p.rc_last[name] = (tuple(flatten_tensors(output)), t)
            p.seq_len[name] = max(p.seq_len.get(name, 0), t + 1)
            return
        if not p.scheduled:
            return
        t = self._counter.get(name, 0)
        self._counter[name] = t + 1
        if not torch.is_grad_enabled():  # e.g. a reentrant checkpoint's first forward
            p.remember_nograd(name, t, flatten_tensors(output))
        elif not p.recomputable and saved_hooks_active():
            p.recomputable = True
        self.record_call(name, t, args, kwargs, output)

    def record_call(self, name, t, args, kwargs, output, p: Optional[Pass] = None):
        """Track the states among ``output``, call ``t`` of cell site ``name`` in pass ``p`` (default:
        the forward pass in progress)."""
        recompute = p is not None
        p = self.passes.current if p is None else p
        if p is None or not p.scheduled:
            return
        if p.probe and not recompute:
            p.calls.setdefault(name, []).append(((args, kwargs), output))
        spec = self.table.sites[name]
        # the common outputs (a tensor, or a tuple of tensors) without the general flattening
        if isinstance(output, Tensor):
            outs = (output,)
        elif isinstance(output, tuple) and all(isinstance(o, Tensor) for o in output):
            outs = output
        else:
            outs = flatten_tensors(output)
        idx = spec.state_outputs or tuple(range(len(outs)))
        if spec.info.get("explicit") and not spec.state_outputs and len(spec.states) != len(idx):
            spec.states = state_names(len(idx))
        pairs = [(outs[i], sname) for sname, i in zip(spec.states, idx) if i < len(outs)]
        for o, sname in pairs:
            self.track(p, o, StateKey(name, sname, t))

    def note_unrecorded(self, step: int, passes: List[Pass], notes: Notes) -> None:
        """Say which fused sites ran without gradients in these passes and were never recomputed."""
        for p in passes:
            for mod in p.nograd:
                for spec in self.table.tracked_fused.get(mod, []):
                    if self.table.wanted(spec.name) and not p.seq_len.get(spec.name):
                        notes.add(("unrecorded", spec.name),
                                  f"site {spec.name!r} ran without gradients inside a forward pass with them "
                                  f"(first at step {step}) and was not run again in its backward pass (as a "
                                  f"reentrant torch.utils.checkpoint recomputation is): no norms for it in "
                                  f"such steps.")
