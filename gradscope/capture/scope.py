"""watch(): record the total gradient reaching every recurrent state, around an unchanged loop.

How it works (the only code in gradscope that touches a live model):

* The root module gets a forward pre-hook and a forward hook for the whole watch. They decide, per
  forward pass with gradients enabled, whether the coming *step* (one backward pass that reaches
  the model) is on the ``every`` schedule.
* Off schedule, the only work is one tensor hook on the model's outputs that counts the backward
  pass; fused modules run their own kernel untouched (bitwise identical results).
* On schedule, fused ``nn.RNN/LSTM/GRU`` modules are replayed step by step
  (:mod:`gradscope.capture.replay`) so every h_t and c_t is a graph node, user cells get a forward
  hook for that pass only, and every state tensor gets a tensor hook that stores the norm of the
  fully accumulated gradient. Parameters get tensor hooks for that step only. Norms stay on the
  device until the backward pass ends (``queue_callback``); then they are copied to the host in one
  transfer per device and dtype.
* Attention blocks (transformer layers, :mod:`gradscope.capture.attention`) have their forward
  shadowed the same way; on scheduled passes it records the gradient at the block input by
  position, the attention entropy per head, the rank-collapse residual of the output and the
  Q/K/V gradient norms, reduced on the device and copied with everything else.
* Every hook handle is owned by the :class:`Scope` and removed by :meth:`Scope.close`, which also
  runs when the ``with`` block raises.

Where the parts live: forwards are swapped only by :mod:`.patching` (removable handles); values
go through :mod:`.collector` (typed keys, batched norms, one host copy); recorded steps are kept by
:mod:`.history`. Probes on the schedule run :func:`gradscope.measure.sites.measure_sites` and
:func:`gradscope.measure.depth.depth_jacobians`: capture imports those, and nothing in capture
imports :mod:`gradscope.measure.probe`, which drives a Scope (imports run one way; tests/test_imports.py).
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import GradscopeAlert, GradscopeError, did_you_mean
from ..measure.depth import depth_jacobians
from ..measure.sites import measure_sites
from ..recording import Recording
from ._forwards import PatchedForward, ScopeHook, remove_leaf_hooks
from .patching import ForwardHandle, remove_all, swap_forward
from ._norms import norm as _norm
from ._autograd import backward_task, eager, graph_task_id, saved_hooks_active
from .collector import Collector, ParamKey, SiteKey, StateKey, sum_squares
from .history import History
from .recurrent import dense_len, fused_cell_device, lstm_cell_ops
from .schedule import AUTO, DEFAULT_MAX_INTERVAL, DEFAULT_OVERHEAD, Schedule, check_schedule
from .attention import AttentionCapture, find_attention, qkv_of
from .replay import replay_fused
from .updates import UpdateTracker
from .sites import (FUSED_TYPES, SiteSpec, find_cells, flatten_tensors, fused_sites, state_names,
                    unsupported_reason)

#: update_ratio="auto" records the ratios while the trainable parameters take at most this much
#: (the copy held from a recorded step to the next forward pass).
UPDATE_RATIO_AUTO_BYTES = 256 << 20

__all__ = ["watch", "Scope"]

# Which models are watched right now (model -> scope). Only liveness lives here; every piece of
# recording state lives on the Scope instance.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_NORM_CHUNK = 128  # state gradients normed together during the backward pass
_MAX_PENDING = 16  # forwards with gradients that never saw a backward; older ones are dropped


def _ignore_norms(layer, reverse, norms) -> None:
    """on_norms of a replay that records nothing (it still takes the fast path, same tensors saved)."""


class _Pass:
    """One forward pass with gradients enabled, until a backward pass consumes it."""

    __slots__ = ("scheduled", "deep", "probe", "calls", "fired", "task", "seq_len", "handles", "attn",
                 "recomputable", "nograd", "nograd_out", "keep", "rc_last", "__weakref__")

    def __init__(self, scheduled: bool, probe: bool = False, deep: Optional[bool] = None):
        self.scheduled = scheduled  # hooked and replayed: a deep pass, a probe, or both
        self.deep = scheduled if deep is None else deep  # its step becomes a row of the history
        self.probe = probe  # also measure Jacobians/exponents on this pass's batch
        self.calls: Dict[str, list] = {}  # probe passes: module -> [((args, kwargs), output), …]
        self.fired = False
        self.task = -1  # the autograd graph task (backward call) that first reached this pass
        self.seq_len: Dict[str, int] = {}
        self.handles: List[Any] = []
        self.attn: Any = None  # attention capture state of a scheduled pass (capture/attention.py)
        # Activation checkpointing (see Scope._pass_now): whether part of this pass may be run
        # again inside its backward (saved-tensor hooks were active, or a watched module ran
        # without gradients), and the sites this scheduled pass ran without
        # gradients (a reentrant checkpoint's first forward), recorded when recomputed in backward.
        self.recomputable = False
        self.nograd: set = set()
        self.nograd_out: Dict[str, Dict[Tuple, int]] = {}  # cell site -> {(data_ptr, shape): call t}
        self.keep: List[Any] = []  # those calls' outputs, alive so that their data_ptr stay unique
        self.rc_last: Dict[str, Tuple[Tuple, int]] = {}  # cell site -> (outputs, t) of its last recomputed call


class _Host:
    """The part of a Scope its attention capture sees (:class:`~.attention.Host`): the collector,
    which pass a call belongs to, claiming a module, notes."""

    __slots__ = ("_scope", "model", "collector")

    def __init__(self, scope: "Scope"):
        self._scope, self.model, self.collector = scope, scope.model, scope._collector

    @property
    def closed(self) -> bool:
        return self._scope.closed

    def pass_now(self):
        return self._scope._pass_now()

    def is_current(self, p) -> bool:
        return p is self._scope._current

    def claim(self, module: nn.Module) -> None:
        self._scope._claim(module)

    def note(self, key, text: str) -> None:
        self._scope._note(key, text)


class Scope:
    """A live watch on one model. Use as a context manager or call :meth:`close` yourself.

    Attributes:
        model: the watched module.
        every: record one step in ``every`` (steps are backward passes reaching the model).
        sites: the :class:`SiteSpec` of every site, by name (user cells appear after the first
            forward pass with gradients).
    """

    def __init__(self, model: nn.Module, *, every: Optional[int] = None, sites: Optional[Sequence[str]] = None,
                 max_steps: int = 10_000, probe_every: Union[int, str, None] = AUTO,
                 probe_options: Optional[Dict[str, Any]] = None, overhead: float = DEFAULT_OVERHEAD,
                 max_interval: int = DEFAULT_MAX_INTERVAL, on_event: Optional[Callable] = None,
                 raise_on: Sequence[str] = (), update_ratio: Union[bool, str] = AUTO):
        check_model(model)
        # A torch.compile'd module: watch the eager module inside it. Dynamo breaks the graph at
        # gradscope's hooks and runs them eagerly, so the recording equals an eager run's (tested);
        # site and parameter names carry no "_orig_mod." prefix.
        self.compiled = None
        # DistributedDataParallel: watch the replica inside (names without "module."); parameter
        # norms are read from p.grad after DDP's all-reduce, and scope.gather() merges the ranks.
        self.ddp: Optional[nn.Module] = None
        while True:
            if _is_compiled(model) and self.compiled is None:
                self.compiled = model
                model = model._orig_mod
            elif _is_ddp(model) and self.ddp is None:
                self.ddp = model
                model = model.module
            else:
                break
        check_model(model)
        check_watch_options(every=every, max_steps=max_steps, probe_every=probe_every,
                            probe_options=probe_options, overhead=overhead, max_interval=max_interval)
        for m in model.modules():
            ref = _ACTIVE.get(m)
            other = ref() if ref is not None else None
            if other is not None and not other.closed:
                what = "this model" if m is model else f"its submodule {type(m).__name__}"
                raise GradscopeError(
                    f"{what} is already watched by {other!r}; one watch per model at a time. "
                    f"Close the first with scope.close() (or leave its `with` block) before watching again.")
        self.model = model
        self.every = every
        self.max_steps = max_steps
        self.probe_every = probe_every
        self._schedule = Schedule(every, probe_every, overhead=overhead, max_interval=max_interval)
        self._on_event, self._raise_on = _check_alerts(on_event, raise_on)
        if not (isinstance(update_ratio, bool) or update_ratio == AUTO):
            raise GradscopeError(f"update_ratio must be True, False or 'auto', got {update_ratio!r}.")
        self._alerts: List[Dict[str, Any]] = []   # events of this step not yet delivered
        self.probe_options = dict(probe_options or {})
        self._probe_latest: Optional[Tuple[int, Dict, Dict]] = None
        self._probe_history: List[Tuple[int, Dict[str, Dict[str, float]]]] = []
        self.closed = False
        self._step = 0  # backward passes that reached the model, counted so far (_settle)
        self._root_handles: List[Any] = []
        self._forward_handles: List[ForwardHandle] = []  # forwards installed for the whole watch
        self._pending: List[_Pass] = []
        self._current: Optional[_Pass] = None
        self._armed: Optional[_Pass] = None  # the scheduled pass the per-pass forwards stay installed for
        self._bw_queued = False
        self._bw_task = -1
        self._collector = Collector(_NORM_CHUNK)  # this step's values; normed in batches, one host copy
        self._param_handles: List[Any] = []
        self._history = History(0)  # re-made once the parameters are known (below)
        self._events: List[Dict[str, Any]] = []
        self._event_keys: set = set()
        self._notes: List[str] = []
        self._note_keys: set = set()
        self._unsupported: List[Dict[str, Any]] = []
        self._discovered = False
        self._discovery_log: Optional[Dict[str, list]] = None
        self._discovery_handles: List[Any] = []
        self._cell_handles: List[Any] = []
        self._cell_counter: Dict[str, int] = {}
        self._probe_records: List[Any] = []
        self._lstm_cells: Dict[nn.Module, Any] = {}
        self._pass_forwards: Dict[nn.Module, Any] = {}  # fused submodules' replaying forwards
        self._pass_handles: List[ForwardHandle] = []  # those and the LSTMCells', installed for a pass
        self._cell_forwards: List[ForwardHandle] = []  # user cells' per-pass wrappers

        names = dict(model.named_modules())
        self._module_names = {id(m): n for n, m in names.items()}
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._param_index = {n: i for i, (n, _) in enumerate(self._params)}
        self._history = History(len(self._params))
        if update_ratio == AUTO:
            # one copy of the trainable parameters at recorded steps: by default only while that
            # copy is small (a large model's spare memory is the user's, not ours)
            nbytes = sum(p.numel() * p.element_size() for _, p in self._params)
            update_ratio = nbytes <= UPDATE_RATIO_AUTO_BYTES
            if not update_ratio:
                self._notes.append(
                    f"update-to-weight ratios not recorded: they need a copy of the trainable parameters "
                    f"({nbytes / 2**20:.0f} MiB, over the {UPDATE_RATIO_AUTO_BYTES >> 20} MiB default); "
                    f"watch(model, update_ratio=True) records them.")
        self._update_ratio = update_ratio
        self._updates = UpdateTracker([p for _, p in self._params]) if update_ratio else None

        # static sites: every fused recurrent module, one site per layer and direction
        self.sites: Dict[str, SiteSpec] = {}
        self._fused: Dict[str, nn.Module] = {}
        scripted: List[str] = []
        for name, m in names.items():
            if any(name.startswith(s + ".") for s in scripted):
                continue  # inside a TorchScript module: reported once, at its top
            reason = unsupported_reason(m)
            if reason:
                self._unsupported.append({"module": name, "type": type(m).__name__, "reason": reason})
                if isinstance(m, torch.jit.ScriptModule):
                    scripted.append(name)
                continue
            if isinstance(m, FUSED_TYPES):
                self._fused[name] = m
                for spec in fused_sites(name, m):
                    self.sites[spec.name] = spec
        # attention sites: blocks of attention modules (capture/attention.py)
        self._attn: Optional[AttentionCapture] = None
        self._probing = False
        self._attn_layout = find_attention(model, _attention_extra(sites, names))
        for spec in self._attn_layout.specs():
            self.sites[spec.name] = spec
        self._explicit_cells: Dict[str, nn.Module] = {}
        self._selected: Optional[set] = None
        if sites is not None:
            self._select(list(sites), names)
        self._tracked_fused = {n: [s for s in self.sites.values() if s.module_name == n]
                               for n in self._fused}

        self._claimed = [model]
        _ACTIVE[model] = weakref.ref(self)
        try:
            # ScopeHook: a copy of the model (deepcopy, pickle) gets no-op hooks, not a copy of this watch
            self._root_handles = [model.register_forward_pre_hook(ScopeHook(self._root_pre)),
                                  model.register_forward_hook(ScopeHook(self._root_post))]
            for name, m in self._fused.items():
                if any(self._wanted(s.name) for s in self.sites.values() if s.module_name == name):
                    self._patch(m, name)
            self._lstm_cells = {m: self._lstm_cell_forward(m) for m in names.values()
                                if getattr(type(m), "forward", None) is nn.LSTMCell.forward}
            if self._attn_layout.blocks:
                self._attn = AttentionCapture(_Host(self), self._attn_layout)
                self._attn.install(self._wanted)
        except BaseException:  # KeyboardInterrupt too: a failed setup leaves the model untouched
            self.close()
            raise

    # ------------------------------------------------------------------ setup
    def _select(self, wanted: List[str], names: Dict[str, nn.Module]) -> None:
        if isinstance(wanted, str):
            raise GradscopeError(f"sites must be a list of names, got the string {wanted!r}; "
                                 f"write sites=[{wanted!r}].")
        selected = set()
        for w in wanted:
            w = w[len("attention:"):] if isinstance(w, str) and w.startswith("attention:") else w
            attn = self._attn_layout.resolve(w) if w not in self.sites else None
            if attn:
                selected |= set(attn)
            elif w in self.sites:
                selected.add(w)
            elif w in self._fused:
                selected |= {s for s, spec in self.sites.items() if spec.module_name == w}
            elif w in names and w != "":
                m = names[w]
                self._explicit_cells[w] = m
                self.sites[w] = SiteSpec(w, w, "cell", ("h",), info={"module_type": type(m).__name__,
                                                                       "explicit": True})
                selected.add(w)
            else:
                cands = list(self.sites) + [n for n in names if n]
                raise GradscopeError(
                    f"unknown site {w!r}: no module or site of that name in {type(self.model).__name__}."
                    f"{did_you_mean(w, cands)} Site names are qualified module names "
                    f"(model.named_modules()), with '.l<k>' / '.l<k>_reverse' for fused layers.")
        self._selected = selected
        self._discovered = True  # an explicit selection replaces automatic cell discovery

    def _wanted(self, site: str) -> bool:
        return self._selected is None or site in self._selected

    def _patch(self, m: nn.Module, name: str) -> None:
        """Shadow the fused module's forward with one that replays on scheduled passes."""
        cls_forward = type(m).forward
        scope_ref = weakref.ref(self)
        specs = {(s.layer, s.reverse): s.name for s in self.sites.values()
                 if s.module_name == name and self._wanted(s.name)}

        def forward(*args, **kwargs):
            scope = scope_ref()
            p = scope._pass_now() if scope is not None and not scope.closed else None
            if p is None or not p.scheduled:
                return cls_forward(m, *args, **kwargs)
            if not torch.is_grad_enabled():
                # e.g. the first forward of a reentrant checkpoint: its recomputation in backward
                # replays and records (below); the probe measures this call
                if p is scope._current:
                    p.nograd.add(name)
                    if p.probe:
                        p.calls.setdefault(name, []).append(((args, kwargs), None))
                return cls_forward(m, *args, **kwargs)
            if p is not scope._current:
                # A checkpoint recomputation inside backward: replay again, so that it saves exactly
                # the tensors the first forward saved (non-reentrant checkpointing compares them).
                # It records only what the first forward ran without gradients (reentrant
                # checkpointing); else the first forward's graph, hooked already, is the one
                # backpropagated and the recomputed graph is discarded.
                return scope._replay(m, specs, p, args, kwargs, track=name in p.nograd)
            if not p.recomputable and saved_hooks_active():
                p.recomputable = True
            return scope._replay(m, specs, p, args, kwargs)

        # Under torch.compile the replay must run eagerly (it drives its own hooks and autograd
        # Function); disabling compilation here makes Dynamo break the graph around it.
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        if disable is not None:
            forward = disable(forward)
        forward.__gradscope__ = True  # type: ignore[attr-defined]
        self._claim(m)
        # The replay runs the class's forward: removing it deletes the instance attribute (restore=None).
        if m is self.model and self.compiled is None:
            # The root's forward is looked up before its pre-hook runs: installed for good (as an
            # object whose copies run unwatched)
            self._forward_handles.append(swap_forward(
                m, PatchedForward(forward, m, None, functools.partial(cls_forward, m)), restore=None))
        elif self.compiled is not None:
            # Dynamo would guard on (and recompile for) a forward that changes between passes
            self._forward_handles.append(swap_forward(m, forward, restore=None))
        else:
            # Installed by _root_pre for scheduled passes only: off schedule the module runs with
            # no wrapper at all.
            self._pass_forwards[m] = forward

    def _lstm_cell_forward(self, m: nn.Module):
        """On an accelerator nn.LSTMCell is one fused kernel whose autograd node outputs c_t and
        computes h_t from it internally, so a hook on c_t would miss the path c_t → h_t. For
        scheduled passes on such a device this forward (installed by ``_root_pre``, removed by
        ``_root_post``) runs the cell op by op instead (same formula; within the replay
        tolerance), so ∂L/∂c_t is total. CPU cells and unscheduled passes are left untouched."""
        scope_ref = weakref.ref(self)
        cls_forward = type(m).forward

        def forward(input, hx=None):
            scope = scope_ref()
            p = scope._pass_now() if scope is not None and not scope.closed else None
            if p is None or not p.scheduled or not fused_cell_device(input.device) or not torch.is_grad_enabled():
                return cls_forward(m, input, hx)
            if p is scope._current and not p.recomputable and saved_hooks_active():
                p.recomputable = True
            return lstm_cell_ops(m, input, hx)

        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        if disable is not None:
            forward = disable(forward)
        forward.__gradscope__ = True  # type: ignore[attr-defined]
        return forward

    def _unpatch_cells(self) -> None:
        """Remove the per-pass forwards (fused submodules, accelerator LSTMCells). One left behind
        by a forward pass that raised falls back to the module's own forward off schedule."""
        remove_all(self._cell_forwards)
        remove_all(self._pass_handles)

    def _claim(self, m: nn.Module) -> None:
        _ACTIVE[m] = weakref.ref(self)  # a second watch on this submodule is refused too
        self._claimed.append(m)

    # ------------------------------------------------- activation checkpointing
    # torch.utils.checkpoint recomputes a checkpointed region inside the backward pass, with
    # gradients enabled (both kinds). The rule: a forward call made while autograd runs a backward
    # call that has already reached a pending pass of this watch (its output hook fired with that
    # graph task id) is a *recomputation of that pass*, not a new step: the root hooks ignore it,
    # and the per-pass forwards (fused replay, user-cell wrappers, accelerator LSTMCell) — kept
    # installed from a scheduled pass's forward until its backward ends (``_armed``) — act for
    # that pass. A reentrant checkpoint around the whole model is the exception that needs no
    # rule: its first forward runs without gradients (no pass), so its recomputation is the
    # step's only forward with gradients and counts as the step.

    def _pass_now(self) -> Optional[_Pass]:
        """The pass a module call belongs to: the forward pass in progress, or — for a checkpoint
        recomputation inside backward — the pending pass that this backward call reached."""
        p = self._current
        if p is not None or self.closed or not torch.is_grad_enabled():
            return p
        task = backward_task()
        if task < 0:
            return None
        for q in reversed(self._pending):
            if q.fired and q.task == task:
                return q
        return None

    def _disarm(self) -> None:
        """Remove the per-pass forwards and cell hooks once no recomputation can need them."""
        self._armed = None
        self._unpatch_cells()
        for h in self._cell_handles:
            h.remove()
        self._cell_handles = []

    def _reruns_in_backward(self) -> bool:
        """Whether a pending scheduled pass ran watched modules without gradients (a reentrant
        checkpoint's first forward): its backward will run them again (probe() then avoids
        torch.autograd.grad, which reentrant checkpointing refuses)."""
        return any(p.scheduled and (p.nograd or p.nograd_out) for p in self._pending)

    def _maybe_disarm(self) -> None:
        if self._armed is not None and not any(p is self._armed for p in self._pending):
            self._disarm()

    def _recompute_index(self, p: _Pass, name: str, args, kwargs) -> int:
        """Time index of a recomputed call of cell ``name``: one past the call whose output it
        takes — the previous recomputed call (same objects), or a call of the first forward
        (reentrant checkpointing hands the region detached views of its inputs: same data)."""
        leaves = [t for t in flatten_tensors((args, kwargs)) if t.numel()]
        last = p.rc_last.get(name)
        if last is not None and any(any(a is o for o in last[0]) for a in leaves):
            return last[1] + 1
        seen = p.nograd_out.get(name, {})
        for a in leaves:
            t = seen.get((a.data_ptr(), tuple(a.shape)))
            if t is not None:
                return t + 1
        return 0

    # ------------------------------------------------------------- root hooks
    def _root_pre(self, module, args):
        if self._current is None and self._pass_now() is not None:
            return  # a checkpoint recomputation of a pending pass inside backward: no new step
        if self._cell_forwards and (self._armed is None or not any(p is self._armed for p in self._pending)):
            self._abandon_pass()  # left by a scheduled pass whose forward raised
        if self.closed or self._probing or not torch.is_grad_enabled():
            self._current = None
            return
        if self._pending:
            self._settle()
        self._measure_update()  # before begin(): its time counts towards the recorded step's cost
        deep, probe = eager(self._schedule.begin)(self._step)
        p = _Pass(deep or probe, probe, deep)
        p.recomputable = p.scheduled and saved_hooks_active()  # the whole model under checkpoint
        self._current = p
        if deep and self._updates is not None and not self._updates.pending:
            self._snapshot_params()
        if p.scheduled:
            if not self._param_handles and self.ddp is None:
                for i, (_, prm) in enumerate(self._params):
                    self._param_handles.append(prm.register_hook(functools.partial(self._on_param_grad, i)))
            if self._attn is not None:
                self._attn.start_pass(p)
            if not self._discovered:
                self._start_discovery()
            self._cell_counter = {}
            self._unpatch_cells()  # anything a pass that raised left behind
            for h in self._cell_handles:
                h.remove()
            self._cell_handles = []
            for m, fwd in self._pass_forwards.items():
                self._pass_handles.append(swap_forward(m, fwd, restore=None))
            for m, fwd in self._lstm_cells.items():
                if fused_cell_device(m.weight_ih.device):
                    self._pass_handles.append(swap_forward(m, fwd, restore=None))
            for name, m in self._explicit_cells.items():
                self._watch_cell(name, m)
            for name, spec in self.sites.items():
                if spec.kind == "cell" and name not in self._explicit_cells and self._wanted(name):
                    self._watch_cell(name, self._module_by_name(spec.module_name))

    def _snapshot_params(self) -> None:
        """Copy the parameters for the update ratio; without the memory for a copy, stop measuring it
        (and say so) rather than fail the user's step."""
        try:
            eager(self._updates.snapshot)(self._step)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            self._updates.drop()
            self._updates = None
            self._note("update-ratio-oom", f"update-to-weight ratio not measured from step {self._step} on: no "
                                           f"memory for a copy of the parameters ({type(e).__name__}). "
                                           f"watch(model, update_ratio=False) skips it from the start.")

    def _measure_update(self) -> None:
        """‖Δw‖ and ‖w‖ of the snapshot's step into its history row once a later step has begun (the
        optimizer ran in between); frees the snapshot. Nothing to do otherwise."""
        if self._updates is None or not self._updates.pending or self._step <= self._updates.step:
            return
        step, upd, wn = eager(self._updates.measure)()
        self._history.set_update(step, upd, wn)

    def _watch_cell(self, name: str, m: nn.Module) -> None:
        """Record each call of cell ``m`` in this scheduled pass. Normally by wrapping its forward
        for the pass (an instance attribute, removed by ``_root_post``): a forward hook would send
        every one of the T calls down nn.Module's slower hooked call path. A forward hook is used
        where the cell has hooks of its own (they may change its output) or the model is compiled."""
        if self.compiled is not None or m._forward_hooks or m._forward_pre_hooks:
            self._cell_handles.append(m.register_forward_hook(functools.partial(self._on_cell_call, name),
                                                              with_kwargs=True))
            return
        base = m.forward
        on_call = self._on_cell_call

        def forward(*args, **kwargs):
            out = base(*args, **kwargs)
            on_call(name, m, args, kwargs, out)
            return out

        # only_this: a wrapper replaced meanwhile (by the user) is left alone, as a user's forward is
        self._cell_forwards.append(swap_forward(m, forward, only_this=True))

    def _root_post(self, module, args, output):
        p = self._current
        self._current = None
        if p is None or self.closed:
            return
        if type(output) is Tensor:  # the common case, without the generic walk
            outs = [output] if output.requires_grad else []
        else:
            outs = [t for t in flatten_tensors(output) if t.requires_grad]
        if p.scheduled:
            if self._discovery_log is not None:
                self._finish_discovery(p)
            for name, n in self._cell_counter.items():
                p.seq_len[name] = max(p.seq_len.get(name, 0), n)
            if outs and (p.recomputable or p.nograd or p.nograd_out):
                # The per-pass forwards stay until this pass's backward ends (_on_backward_end):
                # activation checkpointing runs parts of the forward again in there. Cells just
                # discovered that ran without gradients get their wrapper for that recomputation.
                self._armed = p
                wrapped = {id(h.module) for h in self._cell_forwards}
                for name in p.nograd_out:
                    cell = self._module_by_name(self.sites[name].module_name)
                    if id(cell) not in wrapped:
                        self._watch_cell(name, cell)
            else:
                self._disarm()
            if p.probe:
                eager(self._run_probe)(p)  # never traced by Dynamo under torch.compile
        if not outs:
            return
        hook = functools.partial(self._on_output_grad, weakref.ref(p))
        for t in outs:
            p.handles.append(t.register_hook(hook))
        self._pending.append(p)
        while len(self._pending) > _MAX_PENDING:
            self._drop_pass(self._pending.pop(0))
        self._maybe_disarm()

    def _on_output_grad(self, pref, grad):
        p = pref()
        if p is None or self.closed or p.fired:
            return
        p.fired = True
        p.task = graph_task_id()
        # Off schedule nothing more happens here: the step is counted when the next forward pass
        # starts (or the step is read), from the distinct backward calls that reached pending passes
        # (_settle). A scheduled pass is finished at the end of its backward call.
        if p.scheduled and not self._bw_queued:
            self._bw_queued = True
            self._bw_task = p.task
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _settle(self, current: Optional[int] = None) -> None:
        """Count the backward calls (other than ``current``) that reached pending passes since the
        last count as steps, and drop those passes."""
        tasks = set()
        keep = []
        for p in self._pending:
            if p.fired and p.task != current:
                tasks.add(p.task)
                self._drop_pass(p)
            else:
                keep.append(p)
        self._pending = keep
        self._step += len(tasks)
        self._maybe_disarm()

    def _on_backward_end(self):
        self._bw_queued = False
        if self.closed:
            return
        self._settle(current=self._bw_task)  # earlier backward calls came first
        fired = [p for p in self._pending if p.fired]
        self._pending = [p for p in self._pending if not p.fired]
        step = self._step
        self._step += 1
        scheduled = [p for p in fired if p.scheduled]
        for p in fired:
            self._drop_pass(p)
        self._maybe_disarm()
        for p in scheduled:
            for mod in p.nograd:
                for spec in self._tracked_fused.get(mod, []):
                    if self._wanted(spec.name) and not p.seq_len.get(spec.name):
                        self._note(("unrecorded", spec.name),
                                   f"site {spec.name!r} ran without gradients inside a forward pass with them "
                                   f"(first at step {step}) and was not run again in its backward pass (as a "
                                   f"reentrant torch.utils.checkpoint recomputation is): no norms for it in "
                                   f"such steps.")
        if scheduled:
            if self.ddp is not None:
                # DDP queues its own end-of-backward callback (wait for the all-reduce, write
                # p.grad) after ours: a callback queued from here runs after DDP's, when p.grad
                # holds the averaged gradient every rank applies.
                torch.autograd.Variable._execution_engine.queue_callback(
                    functools.partial(self._finalize_ddp, step, scheduled))
            else:
                self._finalize(step, scheduled)

    def _abandon_pass(self) -> None:
        """Forget the current pass of a forward that raised: its per-pass forwards, hooks and ids."""
        self._current = None
        self._armed = None
        self._unpatch_cells()
        for h in self._cell_handles:
            h.remove()
        self._cell_handles = []
        if not any(p.scheduled for p in self._pending):
            # else an off-schedule backward would feed the next scheduled step's parameter norms
            self._remove_param_hooks()

    def _remove_param_hooks(self) -> None:
        if self._param_handles:
            remove_leaf_hooks(self._param_handles, [prm for _, prm in self._params])
            self._param_handles = []

    def _finalize_ddp(self, step: int, passes: List[_Pass]) -> None:
        if self.closed:
            return
        for i, (_, prm) in enumerate(self._params):
            g = prm.grad
            if g is not None and not g.is_sparse:
                self._collector.add(ParamKey(i), _norm(g.detach()))
        self._finalize(step, passes)

    # ----------------------------------------------------------- state hooks
    def _track(self, p: _Pass, tensor: Tensor, key: StateKey) -> None:
        if tensor.requires_grad:
            p.handles.append(tensor.register_hook(functools.partial(self._on_state_grad, key)))

    def _on_state_grad(self, key, grad):
        # Keep the gradient itself; the norms of all of a step's states are taken at the end of the
        # backward pass in one batched op per shape (cheaper than one norm call per hook). A None
        # gradient (an output no later op used, e.g. the last c of a fused CUDA cell) adds nothing.
        if grad is not None and not self.closed:
            self._collector.add_gradient(key, grad)

    def _on_param_grad(self, i, grad):
        if grad is None or self.closed or not self._bw_queued:
            # not_bw_queued: no scheduled pass in this backward (e.g. one through an older,
            # off-schedule pass while the hooks of a scheduled pass that raised are still on)
            return
        if grad.is_sparse:  # e.g. nn.Embedding(sparse=True): duplicate indices summed first
            self._collector.add(ParamKey(i), _norm(grad.detach().coalesce()._values()))
            return
        # normed with the state gradients, one multi-tensor op (no norm call per parameter)
        self._collector.add_gradient(ParamKey(i), grad)

    def _replay(self, m: nn.Module, specs: Dict[Tuple[int, bool], str], p: _Pass, args, kwargs,
                track: bool = True):
        """Replay fused module ``m`` for pass ``p``; ``track=False``: the same computation, nothing
        recorded (a checkpoint recomputation whose first forward recorded already)."""
        input = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if not track:
            return replay_fused(m, input, hx, None, _ignore_norms)
        if p.probe and p is self._current:
            p.calls.setdefault(self._module_names[id(m)], []).append(((args, kwargs), None))
        names = {key: (site, self.sites[site].states) for key, site in specs.items()}
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
                    self._track(p, s, StateKey(site, sname, t))
            else:
                self._track(p, state, StateKey(site, "h", t))

        def on_norms(layer, reverse, norms):
            entry = names.get((layer, reverse))
            if entry is not None and not self.closed:
                for sname, v in norms.items():
                    self._collector.add(SiteKey(entry[0], sname), v)

        out = replay_fused(m, input, hx, on_state, on_norms)
        if not seen:  # fast path: every selected layer ran over the whole (dense) sequence
            T = dense_len(m, input)
            seen = {site: T for site, _ in names.values()}
        for site, n in seen.items():
            p.seq_len[site] = max(p.seq_len.get(site, 0), n)
        return out

    def _on_cell_call(self, name, module, args, kwargs, output):
        p = self._current
        if p is None:
            p = self._pass_now()
            if p is None or not p.scheduled or name not in p.nograd_out:
                # a wrapper left by a pass that raised, or a recomputation whose first forward
                # ran with gradients (its graph carries the hooks already)
                return
            # a reentrant checkpoint's recomputation in backward: this graph is the one
            # backpropagated (the first forward ran without gradients)
            t = self._recompute_index(p, name, args, kwargs)
            self._record_call(name, t, args, kwargs, output, p)
            p.rc_last[name] = (tuple(flatten_tensors(output)), t)
            p.seq_len[name] = max(p.seq_len.get(name, 0), t + 1)
            return
        if not p.scheduled:
            return
        t = self._cell_counter.get(name, 0)
        self._cell_counter[name] = t + 1
        if not torch.is_grad_enabled():  # e.g. a reentrant checkpoint's first forward
            self._remember_nograd(p, name, t, flatten_tensors(output))
        elif not p.recomputable and saved_hooks_active():
            p.recomputable = True
        self._record_call(name, t, args, kwargs, output)

    @staticmethod
    def _remember_nograd(p: _Pass, name: str, t: int, outs) -> None:
        """Note call ``t`` of cell ``name`` ran without gradients in pass ``p``, by its outputs'
        memory, so that a recomputation in backward knows its time steps (_recompute_index)."""
        seen = p.nograd_out.setdefault(name, {})
        for o in outs:
            if o.numel():
                seen[(o.data_ptr(), tuple(o.shape))] = t
        p.keep.append(outs)

    def _record_call(self, name, t, args, kwargs, output, p: Optional[_Pass] = None):
        """Track the states among ``output``, call ``t`` of cell site ``name`` in pass ``p`` (default:
        the forward pass in progress; also the C++ tap's path for outputs it leaves to Python)."""
        recompute = p is not None
        p = self._current if p is None else p
        if p is None or not p.scheduled:
            return
        if p.probe and not recompute:
            p.calls.setdefault(name, []).append(((args, kwargs), output))
        spec = self.sites[name]
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
            self._track(p, o, StateKey(name, sname, t))

    # -------------------------------------------------------------- discovery
    def _start_discovery(self) -> None:
        for h in self._discovery_handles:  # left by a discovery pass that raised
            h.remove()
        self._discovery_handles = []
        self._discovery_log = defaultdict(list)
        for name, m in self.model.named_modules():
            if not name or isinstance(m, FUSED_TYPES) or name in self.sites:
                continue
            if name in self._attn_layout.blocks or name in self._attn_layout.attn:
                continue  # attention blocks and modules are attention sites, not recurrent cells
            if next(m.parameters(), None) is None:
                continue  # parameter-free modules (activations, dropout) are never cells
            if isinstance(m, torch.jit.ScriptModule):
                continue  # no hooks allowed on TorchScript; reported in recording.unsupported
            self._discovery_handles.append(m.register_forward_hook(
                functools.partial(self._on_discovery_call, name), with_kwargs=True))

    def _on_discovery_call(self, name, module, args, kwargs, output):
        # calls without gradients inside a pass with them count too (a reentrant checkpoint's
        # first forward; its recomputation in backward records them)
        if self._discovery_log is not None and (torch.is_grad_enabled() or self._current is not None):
            p = self._current
            if p is not None and not p.recomputable and torch.is_grad_enabled() and saved_hooks_active():
                p.recomputable = True
            self._discovery_log[name].append((flatten_tensors((args, kwargs)), flatten_tensors(output),
                                              (args, kwargs), output, torch.is_grad_enabled()))

    def _finish_discovery(self, p: _Pass) -> None:
        log, self._discovery_log = self._discovery_log, None
        for h in self._discovery_handles:
            h.remove()
        self._discovery_handles = []
        self._discovered = True
        cells = find_cells({n: [(c[0], c[1]) for c in calls] for n, calls in log.items()})
        for name, (outs, ins) in cells.items():
            m = self._module_by_name(name)
            states = state_names(len(outs))
            self.sites[name] = SiteSpec(name, name, "cell", states, info={"module_type": type(m).__name__,
                                                                        "calls": len(log[name])},
                                        state_outputs=outs, state_inputs=ins)
            # Hooks on this pass's states are registered now: the backward has not run yet.
            for t, (_, outputs, _, _, grad) in enumerate(log[name]):
                if grad:
                    for sname, i in zip(states, outs):
                        self._track(p, outputs[i], StateKey(name, sname, t))
                elif self._wanted(name):
                    # Without gradients at the call (a reentrant checkpoint's first forward): recorded
                    # when recomputed. Its outputs may require grad by now (a checkpoint's outputs):
                    # a hook there would count the gradient reaching them twice.
                    self._remember_nograd(p, name, t, outputs)
            p.seq_len[name] = len(log[name])
            if p.probe and self._wanted(name):
                p.calls[name] = [(c[2], c[3]) for c in log[name]]
        if not self.sites:
            self._note("no-sites", "no recurrent or attention site found: no nn.RNN/LSTM/GRU and no "
                                   "module whose output feeds its own next call; parameter gradient "
                                   "norms are still recorded. Name a module in watch(sites=[...]) to record it.")

    def _module_by_name(self, name: str) -> nn.Module:
        return dict(self.model.named_modules())[name]

    # ------------------------------------------------------------------ probe
    def _run_probe(self, p: _Pass) -> None:
        """Jacobians, exponents, spectra and gate statistics on this pass's batch (no grad).

        Runs at the end of the forward pass, before the backward and the optimizer step, so the
        weights and inputs are the ones this step uses.
        """
        mods = dict(self.model.named_modules())
        wanted = {n for n in self.sites if self._wanted(n) and self.sites[n].kind != "attention"}
        with torch.no_grad():
            measures, meta, notes = measure_sites(mods, self.sites, wanted, p.calls, order=list(self.sites),
                                                  **self.probe_options)
        p.calls = {}
        if self._attn is not None:
            self._probing = True  # the depth Jacobians call blocks, maybe the model itself: no new pass
            try:
                with torch.no_grad():
                    notes = list(notes) + self._attn.run_probe(p, self._step, depth_jacobians,
                                                                   **self.probe_options)
            finally:
                self._probing = False
        for n in notes:
            self._note(("probe", n), n)
        self._probe_latest = (self._step, measures, meta)
        summary = {site: {"horizon": m.get("jacobian", {}).get("horizon", math.nan),
                          "rate": m.get("jacobian", {}).get("rate", math.nan),
                          "lambda1": m.get("lyapunov", {}).get("lambda1", math.nan),
                          "memory_time": m.get("gates", {}).get("memory_time", math.nan)}
                   for site, m in meta.items()}
        self._probe_history.append((self._step, summary))
        if len(self._probe_history) >= self.max_steps:
            self._probe_history = self._probe_history[::2]
        self._critical_findings()

    # -------------------------------------------------------------- finalize
    def _finalize(self, step: int, passes: List[_Pass]) -> None:
        self._collector.flush()
        if self._attn is not None:  # values measured during the forward, and the Q/K/V hooks end
            self._attn.add_pass_values(passes)
            self._attn.end_step()
        self._remove_param_hooks()
        items = self._collector.take()  # one host copy per device

        seq_len: Dict[str, int] = {}
        for p in passes:
            for s, n in p.seq_len.items():
                seq_len[s] = max(seq_len.get(s, 0), n)
        sumsq, fired_sites, params, got_param, attn_items = sum_squares(items, seq_len, len(self._params))
        grads = {}
        for site, spec in self.sites.items():
            if not self._wanted(site):
                continue
            n = seq_len.get(site, 0)
            if n and site not in fired_sites:
                self._note(("nograd", site), f"site {site!r} ran but no gradient reached its states "
                                            f"(first at step {step}); its norms are recorded as 0.")
            for sname in spec.states:
                row = np.zeros(n)
                a = sumsq.get((site, sname))
                if a is not None:
                    row[:len(a)] = a
                grads[(site, sname)] = np.sqrt(row)
        params = np.sqrt(params)
        self._check_finite(step, grads, params, got_param)
        params[~got_param] = np.nan  # NaN: the parameter received no gradient in this step
        attn_row = self._attn.finalize_row(step, attn_items, grads) if self._attn is not None else {}
        if any(p.deep for p in passes):  # else a probe's step off the recording schedule: no history row
            self._history.append(step, grads, seq_len, params, attn_row)
        self._deliver_alerts()  # last: an alert raised here leaves the step fully recorded
        if self._history.n >= self.max_steps:
            self._history.thin()
            self._schedule.thin()

    def _check_finite(self, step, grads, params, got_param) -> None:
        """Record the first non-finite value per site state and per parameter as an event."""
        for (site, sname), row in grads.items():
            bad = np.flatnonzero(~np.isfinite(row))
            if bad.size:
                # backward runs from the last position: the highest index is where it showed first
                self._event(("site", site, sname), {"kind": "nonfinite", "step": step, "site": site,
                                                     "state": sname, "t": int(bad[-1]),
                                                     "value": repr(float(row[bad[-1]])),
                                                     "count": int(bad.size)})
        for i in np.flatnonzero(got_param & ~np.isfinite(params)):
            name = self._params[i][0]
            self._event(("param", name), {"kind": "nonfinite", "step": step, "param": name,
                                          "value": repr(float(params[i]))})

    def _event(self, key, event) -> None:
        if key not in self._event_keys:
            self._event_keys.add(key)
            self._events.append(event)
            self._alerts.append(event)

    def _critical_findings(self) -> None:
        """After a probe: a critical finding not seen before becomes an event (for alerts)."""
        if self._on_event is None and "critical" not in self._raise_on:
            return
        from ..analysis.diagnose import diagnose  # analysis imports nothing of capture

        for f in diagnose(self.recording).findings:
            if f.severity == "critical" and f.kind != "nonfinite":
                self._event(("finding", f.kind, f.site), {"kind": "critical", "finding": f.kind, "site": f.site,
                                                         "step": self._step, "explanation": f.explanation})

    def _deliver_alerts(self) -> None:
        """Hand this step's new events to ``on_event``; raise for a kind in ``raise_on``."""
        alerts, self._alerts = self._alerts, []
        for e in alerts:
            if self._on_event is not None:
                self._on_event(dict(e))
        for e in alerts:
            if e["kind"] in self._raise_on:
                where = e.get("site") or e.get("param")
                at = f", position {e['t']}" if e.get("t") is not None else ""
                what = (f"a {e.get('value')} gradient" if e["kind"] == "nonfinite"
                        else f"a critical {e.get('finding')} finding")
                raise GradscopeAlert(f"gradscope: {what} at {where}{at} in training step {e['step']} "
                                     f"(watch(raise_on={tuple(self._raise_on)!r})).", dict(e))

    def _note(self, key, text) -> None:
        if key not in self._note_keys:
            self._note_keys.add(key)
            self._notes.append(text)

    def _drop_pass(self, p: _Pass) -> None:
        for h in p.handles:
            h.remove()
        p.handles = []
        p.keep, p.nograd_out, p.rc_last = [], {}, {}

    def _settle_open(self) -> None:
        """Count the steps taken since the last count while the watch is open, before the count
        is read."""
        if self._pending and not self.closed:
            self._settle()

    # ---------------------------------------------------------------- public
    @property
    def step(self) -> int:
        """Number of backward passes that reached the model so far."""
        self._settle_open()
        return self._step

    @property
    def recording(self) -> Recording:
        """A frozen :class:`~gradscope.Recording` of everything recorded so far."""
        self._settle_open()
        h = self._history
        S = h.n
        sites = {n: s.to_dict() for n, s in self.sites.items() if self._wanted(n)}
        grads, seq = {}, {}
        for name, spec in self.sites.items():
            if name not in sites:
                continue
            lens = h.seq[name][:S].copy() if name in h.seq else np.zeros(S, dtype=np.int64)
            T = int(lens.max()) if S else 0
            seq[name] = lens
            for sname in spec.states:
                a = np.full((S, T), np.nan)
                stored = h.grads.get((name, sname))
                if stored is not None:
                    w = min(T, stored.shape[1])
                    a[:, :w] = stored[:S, :w]
                grads[(name, sname)] = a
        params = {n: h.params[:S, i].copy() for i, (n, _) in enumerate(self._params)}
        upd, wn = {}, {}
        if self._update_ratio:
            upd = {n: h.upd[:S, i].copy() for i, (n, _) in enumerate(self._params)}
            wn = {n: h.wn[:S, i].copy() for i, (n, _) in enumerate(self._params)}
        rows = h.rows() if self._attn is not None else None
        notes = list(self._notes)
        if not sites and self._discovered and not any("no recurrent" in n for n in notes):
            notes.append("no recurrent or attention site found; parameter gradient norms are still recorded.")
        meta = {"gradscope_version": __version__, "torch_version": str(torch.__version__),
                "model": type(self.model).__name__, "compiled": self.compiled is not None,
                "ddp": self.ddp is not None, "every": self.every,
                "stride": self._schedule.stride, "max_steps": self.max_steps, "total_steps": self._step,
                "source": "watch", "probe_every": self.probe_every, "schedule": self._schedule.meta()}
        measures: Dict[Tuple[str, str], np.ndarray] = {}
        mmeta: Dict[str, Any] = {}
        if self._probe_latest is not None:
            step, measures, mmeta = self._probe_latest
            measures = {k: v for k, v in measures.items() if k[0] in sites}
            mmeta = {k: dict(v, probe_step=step) for k, v in mmeta.items() if k in sites}
            hist_steps = np.array([h[0] for h in self._probe_history], dtype=np.float64)
            for site in mmeta:
                measures[(site, "probe_steps")] = hist_steps
                for key in ("horizon", "rate", "lambda1", "memory_time"):
                    measures[(site, "probe_" + key)] = np.array(
                        [h[1].get(site, {}).get(key, np.nan) for h in self._probe_history], dtype=np.float64)
        if self._attn is not None:  # per-step attention measures, depth flow and depth Jacobians
            measures = dict(measures)
            measures.update(self._attn.recording_measures(rows, grads))
            if self._attn.latest_probe is not None:
                pstep, pm, pmeta = self._attn.latest_probe
                measures.update(pm)
                mmeta = dict(mmeta)
                mmeta.update({k: dict(v, probe_step=pstep) for k, v in pmeta.items()})
            meta["attention"] = self._attn.meta()
        return Recording(sites=sites, steps=h.steps[:S].copy(), grads=grads, seq_lens=seq,
                         params=params, events=self._events, unsupported=self._unsupported,
                         notes=notes, meta=meta, measures=measures, measure_meta=mmeta,
                         update_norms=upd, weight_norms=wn)

    def gather(self, dst: int = 0, group=None) -> Optional[Recording]:
        """Merge the recordings of all ranks of a ``torch.distributed`` run on rank ``dst``.

        A collective: call it on every rank (same point of the program). Returns the merged
        :class:`~gradscope.Recording` on ``dst`` and ``None`` elsewhere. Per-timestep norms are
        combined as ``sqrt(Σ_r n_r²) / R`` — the norm of the gradient of the rank-averaged loss
        that DDP optimises, over the global batch — and parameter norms (identical on every rank
        after DDP's all-reduce) are taken once. Sites, states or positions a rank did not record
        contribute nothing (NaN where no rank has them); probe measures and per-step attention
        statistics are rank ``dst``'s. See :mod:`gradscope.capture.distributed`.

        Raises:
            GradscopeError: no initialised process group, or ``dst`` is not a rank.

        Example (``torchrun --nproc_per_node 2 -m gradscope.examples.ddp``)::

            model = DistributedDataParallel(model)
            with gradscope.watch(model) as scope:
                train(model)
            merged = scope.gather(dst=0)
            if merged is not None:
                print(gradscope.diagnose(merged))
        """
        from .distributed import gather_recording
        return gather_recording(self.recording, dst=dst, group=group)

    def to_tensorboard(self, writer, step=None, **kwargs) -> None:
        """Write the recording so far to a TensorBoard ``SummaryWriter`` (see
        :meth:`Recording.to_tensorboard`); ``step`` defaults to the number of steps so far."""
        self.recording.to_tensorboard(writer, step=self._step if step is None else step, **kwargs)

    def diagnose(self, **kwargs):
        """:func:`gradscope.diagnose` of the recording so far (keywords pass through)."""
        from ..analysis.diagnose import diagnose
        return diagnose(self.recording, **kwargs)

    def close(self) -> None:
        """Remove every hook and patch; safe to call twice. The recording stays available."""
        if self.closed:
            return
        self._settle()
        if self._updates is not None:
            self._measure_update()  # the last recorded step's update (the loop ended after it)
            self._updates.drop()
        self.closed = True
        self._remove_param_hooks()
        for h in self._root_handles + self._discovery_handles + self._cell_handles:
            h.remove()
        self._root_handles, self._discovery_handles, self._cell_handles = [], [], []
        for p in self._pending:
            self._drop_pass(p)
        self._pending = []
        if self._attn is not None:
            self._attn.close()
        self._discovery_log = None
        self._collector.clear()
        self._unpatch_cells()
        remove_all(self._forward_handles)
        for m in self._claimed:
            ref = _ACTIVE.get(m)
            if ref is not None and ref() is self:
                del _ACTIVE[m]

    def __enter__(self) -> "Scope":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<gradscope.Scope on {type(self.model).__name__} ({state}), every={self.every}, "
                f"sites={list(self.sites)}, steps={self._step}>")


def _attention_extra(sites, names: Dict[str, nn.Module]) -> List[str]:
    """Modules named in ``sites=`` to treat as attention modules: ``"attention:NAME"`` entries and
    modules with recognisable query/key/value projections."""
    if sites is None or isinstance(sites, str):
        return []
    out = []
    for w in sites:
        if not isinstance(w, str):
            continue
        if w.startswith("attention:"):
            out.append(w[len("attention:"):])
        elif w and w in names and qkv_of(names[w], "") is not None:
            out.append(w)
    return out


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


ALERT_KINDS = ("nonfinite", "critical")


def _check_alerts(on_event, raise_on):
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


def check_model(model) -> None:
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


def watch(model: nn.Module, *, every: Optional[int] = None, overhead: float = DEFAULT_OVERHEAD,
          max_interval: int = DEFAULT_MAX_INTERVAL, sites: Optional[Sequence[str]] = None,
          max_steps: int = 10_000, probe_every: Union[int, str, None] = AUTO,
          probe_options: Optional[Dict[str, Any]] = None, on_event: Optional[Callable] = None,
          raise_on: Sequence[str] = (), update_ratio: Union[bool, str] = AUTO) -> Scope:
    """Record ‖∂L/∂h_t‖ for every recurrent state and every parameter's gradient norm.

    By default the watch stays within an overhead budget: the deep passes (per-timestep capture)
    and the probes (Jacobians by lag, Lyapunov exponents) are spaced so that gradscope's extra
    time stays near ``overhead`` (3%) of the training loop's own time, each never rarer than
    ``max_interval`` steps; the first step gets both. ``every=N`` records every N-th step instead
    (``every=1``: every step). ``scope.recording.meta["schedule"]`` and every report give the
    realised overhead and the number of deep passes and probes (:mod:`gradscope.capture.schedule`).

    Args:
        model: the model to watch; its training loop stays unchanged. A ``torch.compile``'d
            module or a ``DistributedDataParallel`` wrapper is unwrapped (names carry no
            ``_orig_mod.`` / ``module.``); under DDP parameter norms are read from ``p.grad``
            after the all-reduce, and :meth:`Scope.gather` merges the ranks' recordings.
        every: record one step in ``every`` (a fixed schedule); None (default): space the
            recorded steps within the overhead budget. A step is one forward pass of the model
            with gradients enabled through to its backward pass; steps off the schedule run the
            model untouched.
        overhead: the budget for the scheduled work, a fraction of the loop's time (default 0.03).
        max_interval: in budget mode, the most steps between two deep passes or two probes.
        sites: record only these sites: site names (``"lstm.l0_reverse"``), fused module names
            (all their layers and directions) or any module's qualified name (its per-call outputs
            become per-step states, even where automatic discovery would not pick it). Attention:
            a block (``"encoder.layers.3"``), an attention module (its block) or a stack
            (``"encoder.layers"``, all its blocks); ``"attention:NAME"`` makes any module an
            attention module. Default: every fused RNN/LSTM/GRU layer and direction, every user
            cell found, and every attention block (``nn.MultiheadAttention``, ``nn.Transformer*``
            layers, Hugging Face attention, user modules whose class name says attention).
        max_steps: the history stays below this many recorded steps; when it is reached every
            other recorded step is dropped (and a fixed schedule records half as often), so a
            long run keeps its whole span in bounded memory.
        probe_every: ``"auto"`` (default): probe the first step's batch and then within the
            budget; N: every N-th step; None: never. A probe measures Jacobian norms by lag,
            Lyapunov exponents, hidden-state spectra and gate statistics on that step's batch (as
            :func:`gradscope.probe` does), so ``scope.diagnose()`` has Jacobian evidence: a watched
            gradient-norm profile alone cannot tell decay from gradient injected along the way (a
            loss at every position). The recording holds the latest full measurement and, per
            site, the history of horizon, rate, λ₁ and memory time (``rec.measure(site,
            "probe_lambda1")`` against ``"probe_steps"``).
        probe_options: keywords for those measurements: ``jacobians``, ``lyapunov``, ``k``,
            ``jacobian_samples``, ``threshold``, ``progress``.
        on_event: called with each new event as it happens, at the end of the step's backward
            pass: ``{"kind": "nonfinite", "step", "site", "state", "t", "value"}`` (or ``"param"``
            for a parameter gradient) for the first non-finite value per site state or parameter;
            ``{"kind": "critical", "finding", "site", "step", "explanation"}`` for a critical
            finding of a probe.
        raise_on: event kinds (``"nonfinite"``, ``"critical"``) that raise
            :class:`~gradscope.errors.GradscopeAlert` from that ``loss.backward()`` (the step is
            recorded first; the ``with`` block then closes the watch).
        update_ratio: record the update-to-weight ratio ‖Δw‖/‖w‖ of every parameter on the
            recorded steps (``rec.update_ratios()``): the parameters are copied at a recorded
            step's forward pass (one copy on their device, freed at the next forward pass) and
            compared with their values at the next step's forward pass
            (:mod:`gradscope.capture.updates`). False: no copy, no ratio. ``"auto"`` (default):
            True while the trainable parameters take at most 256 MiB, else False with a note.

    Returns:
        A :class:`Scope`; ``scope.recording`` is the :class:`~gradscope.Recording` so far.

    Raises:
        GradscopeError: ``model`` is not an ``nn.Module`` instance (or is an ``nn.DataParallel``,
            whose per-forward replicas cannot be watched), a bad option, an unknown site name, or
            the model is already watched.

    Example:
        >>> import torch, gradscope
        >>> lstm = torch.nn.LSTM(4, 8, num_layers=2, bidirectional=True)
        >>> with gradscope.watch(lstm) as scope:
        ...     out, _ = lstm(torch.randn(10, 3, 4))
        ...     out.pow(2).mean().backward()
        >>> scope.recording.sites
        ('l0', 'l0_reverse', 'l1', 'l1_reverse')
        >>> scope.recording.grad_norms("l1", state="c").shape
        (1, 10)
        >>> scope.recording.meta["schedule"]["mode"], scope.recording.meta["schedule"]["probes"]
        ('budget', 1)
    """
    return Scope(model, every=every, sites=sites, max_steps=max_steps, probe_every=probe_every,
                 probe_options=probe_options, overhead=overhead, max_interval=max_interval,
                 on_event=on_event, raise_on=raise_on, update_ratio=update_ratio)
