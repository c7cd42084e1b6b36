"""watch(): record the total gradient reaching every recurrent state, around an unchanged loop.

This is the only code in gradscope that touches a live model. The :class:`Scope` owns the watch's
lifetime and every handle; the work is done by collaborators it owns, each with one job:

* :mod:`.options` — checks what watch() is given; unwraps ``torch.compile`` / DDP wrappers.
* :mod:`.catalog` — :class:`~.catalog.SiteTable`: the sites (fused layers and directions,
  attention blocks, user cells) and the user's selection.
* :mod:`.passes` — :class:`~.passes.Passes`: the root module's forward pre-hook and forward hook
  (here) decide, per forward pass with gradients enabled, whether the coming *step* (one backward
  pass that reaches the model) is on the schedule (:mod:`.schedule`); Passes knows which pass a
  module call belongs to (also for activation-checkpoint recomputations inside backward) and when
  a step ends. Off schedule the only work is the two root hooks and a hook set once on one
  parameter that counts the backward calls (the *sentinel*, checked against the outputs on
  scheduled steps and one off-schedule pass in 16); fused modules run their own kernel untouched
  (bitwise identical results).
* :mod:`.cells` — :class:`~.cells.Cells`: on scheduled passes fused ``nn.RNN/LSTM/GRU`` modules
  are replayed step by step (:mod:`.replay`) so every h_t and c_t is a graph node, user cells get
  a wrapper for that pass, and every state tensor gets a tensor hook that keeps its fully
  accumulated gradient.
* :mod:`.discovery` — :class:`~.discovery.Discovery`: finds user cells on the first scheduled pass.
* :mod:`.params` — :class:`~.params.ParamGrads`: parameter gradient hooks for scheduled steps.
* :mod:`.attention` — attention blocks have their forward shadowed the same way; on scheduled
  passes they record the gradient at the block input by position, the attention entropy per
  head, the rank-collapse residual and the Q/K/V gradient norms. It sees the watch through a
  :class:`~.passes.CaptureHost`.
* :mod:`.collector` — values are normed on the device in batches and copied to the host at the
  end of the backward pass (``queue_callback``), one transfer per device and dtype.
* :mod:`.build` — :class:`~.build.Builder`: turns a step's values into a row of the bounded
  :mod:`.history` and the history into a :class:`~gradscope.Recording`.
* :mod:`.probing` — :class:`~.probing.Probes`: Jacobians and exponents on a scheduled step's batch.
* :mod:`.alerts` — notes, non-finite events and critical findings, ``on_event`` / ``raise_on``.
* :mod:`.updates` — the update-to-weight ratio between recorded steps.

Every hook handle is removed by :meth:`Scope.close`, which also runs when the ``with`` block
raises. Forwards are swapped only by :mod:`.patching` (removable handles).
"""
from __future__ import annotations

import functools
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import GradscopeError
from ..recording import Recording
from ._autograd import eager, saved_hooks_active
from ._forwards import ScopeHook
from .alerts import Events, Notes
from .attention import AttentionCapture
from .build import Builder
from .catalog import SiteTable
from .cells import Cells
from .collector import Collector
from .discovery import Discovery
from .history import History
from .options import check_alerts, check_model, check_watch_options, resolve_update_ratio, unwrap
from .params import ParamGrads
from .passes import CaptureHost, Pass, Passes
from .probing import Probes
from .schedule import AUTO, DEFAULT_MAX_INTERVAL, DEFAULT_OVERHEAD, Schedule
from .sites import SiteSpec, flatten_tensors
from .updates import UpdateRatios

__all__ = ["watch", "Scope"]

# Which models are watched right now (model -> scope). Only liveness lives here; every piece of
# recording state lives on the Scope instance and its collaborators.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
NORM_CHUNK = 128  # state gradients normed together during the backward pass
# True while Dynamo traces (the root hooks of a compiled model): no clock there (Dynamo cannot trace
# time.perf_counter), and the schedule is called through its torch.compiler.disable wrapper
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling


class Scope:
    """A live watch on one model. Use as a context manager or call :meth:`close` yourself.

    Attributes:
        model: the watched module.
        every: record one step in ``every`` (steps are backward passes reaching the model).
        sites: the :class:`SiteSpec` of every site, by name (user cells appear after the first
            forward pass with gradients).
        compiled: the ``torch.compile`` wrapper the model came in, or None.
        ddp: the ``DistributedDataParallel`` wrapper the model came in, or None.
        passes: the pass and step bookkeeping (:class:`~.passes.Passes`).
        updates: the update-ratio measurement (:class:`~.updates.UpdateRatios`), or None.
    """

    def __init__(self, model: nn.Module, *, every: Optional[int] = None, sites: Optional[Sequence[str]] = None,
                 max_steps: int = 10_000, probe_every: Union[int, str, None] = AUTO,
                 probe_options: Optional[Dict[str, Any]] = None, overhead: float = DEFAULT_OVERHEAD,
                 max_interval: int = DEFAULT_MAX_INTERVAL, on_event: Optional[Callable] = None,
                 raise_on: Sequence[str] = (), update_ratio: Union[bool, str] = AUTO):
        check_model(model)
        model, self.compiled, self.ddp = unwrap(model)
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
        self.model, self.every, self.max_steps, self.probe_every = model, every, max_steps, probe_every
        self.probe_options = dict(probe_options or {})
        self._events = Events(*check_alerts(on_event, raise_on))
        self._notes = Notes()
        self._schedule = Schedule(every, probe_every, overhead=overhead, max_interval=max_interval)
        # wrapped once: torch.compiler.disable builds a new wrapper per call (hundreds of µs, every
        # step); and called through the wrapper only while Dynamo traces (the wrapper itself costs
        # tens of µs a call, the bulk of a plain step's hook time in eager code)
        self._begin = eager(self._schedule.begin)
        self._probe_now = eager(self._probe)
        self._collector = Collector(NORM_CHUNK)  # this step's values; normed in batches, one host copy
        self.passes = Passes(self._notes.add)
        self._params = ParamGrads(model, self.passes, self._collector, hooked=self.ddp is None)
        self._update_ratio, why_not = resolve_update_ratio(update_ratio, [p for _, p in self._params.params])
        if why_not:
            self._notes.add("update-ratio-auto", why_not)

        self._table = SiteTable(model, sites)
        self.sites: Dict[str, SiteSpec] = self._table.sites
        self._claimed: List[nn.Module] = [model]
        self._cells = Cells(model, self._table, self.passes, self._collector, self._claim, self.compiled is not None)
        self.passes.on_disarm = self._cells.disarm
        self.passes.on_backward_end = self._on_backward_end
        self._discovery = Discovery(model, self._table, self.passes, self._cells, self._notes)
        self._attn: Optional[AttentionCapture] = None
        if self._table.attn_layout.blocks:
            host = CaptureHost(model, self._collector, self.passes, self._claim, self._notes.add)
            self._attn = AttentionCapture(host, self._table.attn_layout)
        self._probes = Probes(self._table, self._attn, self._notes, self.probe_options, max_steps)
        history = History(len(self._params.params))
        self.updates: Optional[UpdateRatios] = None
        if self._update_ratio:
            self.updates = UpdateRatios([p for _, p in self._params.params], history, self._notes.add,
                                        self._collector)
        self._builder = Builder(self._table, self._collector, self._params, self._notes, self._events,
                                self._attn, self._schedule, max_steps, history, self.updates)

        self._root_handles: List[Any] = []
        _ACTIVE[model] = weakref.ref(self)
        try:
            # ScopeHook: a copy of the model (deepcopy, pickle) gets no-op hooks, not a copy of this watch
            # the step counter's hook on the first trainable parameter; with every pass scheduled
            # (every=1) all outputs are hooked anyway and steps are counted there
            trainable = self._params.params
            self.passes.install(trainable[0] if trainable and every != 1 else None)
            self._root_handles = [model.register_forward_pre_hook(ScopeHook(self._root_pre)),
                                  model.register_forward_hook(ScopeHook(self._root_post))]
            self._cells.install()
            if self._attn is not None:
                self._attn.install(self._table.wanted)
        except BaseException:  # KeyboardInterrupt too: a failed setup leaves the model untouched
            self.close()
            raise

    def _claim(self, m: nn.Module) -> None:
        _ACTIVE[m] = weakref.ref(self)  # a second watch on this submodule is refused too
        self._claimed.append(m)

    # ------------------------------------------------------------- root hooks
    def _root_pre(self, module, args):
        compiling = _is_compiling()
        t0 = 0.0 if compiling else time.perf_counter()
        passes = self.passes
        if passes.current is None and passes.now() is not None:
            return  # a checkpoint recomputation of a pending pass inside backward: no new step
        if self._cells.has_pass_wrappers and not passes.armed_pending():
            self._abandon_pass()  # left by a scheduled pass whose forward raised
        if self.closed or self._probes.running or not torch.is_grad_enabled():
            passes.current = None
            return
        passes.settle()
        if self.updates is not None:  # before begin(): its time counts towards the recorded step's cost
            self.updates.measure_due(passes.step)
        deep, probe = (self._begin if compiling else self._schedule.begin)(passes.step)
        if not (deep or probe):
            passes.current = passes.off_schedule()  # mostly one shared, inert pass object
            if not compiling:  # the light tier's time, paid from the overhead budget
                self._schedule.light(time.perf_counter() - t0)
            return
        p = Pass(True, probe, deep)
        p.recomputable = saved_hooks_active()  # the whole model under checkpoint
        passes.current = p
        if deep and self.updates is not None:
            self.updates.snapshot(passes.step)
        self._params.hook()
        if self._attn is not None:
            self._attn.start_pass(p)
        if not self._discovery.done:
            self._discovery.start()
        self._cells.begin_pass()

    def _root_post(self, module, args, output):
        passes = self.passes
        p = passes.current
        passes.current = None
        if p is None or p is passes.plain or self.closed:
            return  # off schedule (steps counted by the sentinel); its few µs here are not timed
        compiling = _is_compiling()
        t0 = 0.0 if compiling else time.perf_counter()
        if type(output) is Tensor:  # the common case, without the generic walk
            outs = [output] if output.requires_grad else []
        else:
            outs = [t for t in flatten_tensors(output) if t.requires_grad]
        if p.scheduled:
            if self._discovery.running:
                self._discovery.finish(p)
            self._cells.end_pass(p, bool(outs))
            if p.probe:
                self._probe_now(p)  # never traced by Dynamo under torch.compile
        if outs:
            passes.add(p, outs)
        if not p.scheduled and not compiling:
            self._schedule.light(time.perf_counter() - t0)

    def _probe(self, p: Pass) -> None:
        """Probe pass ``p``'s batch; a critical finding not seen before becomes an event."""
        self._probes.run(p, self.passes.step)
        if self._events.wants_findings:
            from ..analysis.diagnose import diagnose  # analysis imports nothing of capture
            self._events.critical_findings(self.passes.step, diagnose(self.recording).findings)

    def _on_backward_end(self) -> None:
        step, scheduled = self.passes.end_backward()
        self._cells.note_unrecorded(step, scheduled, self._notes)
        if not scheduled:
            return
        if self.ddp is not None:
            # DDP queues its own end-of-backward callback (wait for the all-reduce, write p.grad)
            # after ours: a callback queued from here runs after DDP's, when p.grad holds the
            # averaged gradient every rank applies.
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._end_step_ddp, step, scheduled))
        else:
            self._builder.end_step(step, scheduled)

    def _end_step_ddp(self, step: int, passes: List[Pass]) -> None:
        if not self.closed:
            self._params.read_grads()
            self._builder.end_step(step, passes)

    def _abandon_pass(self) -> None:
        """Forget the current pass of a forward that raised: its per-pass forwards, hooks and ids."""
        self.passes.current = None
        self.passes.armed = None
        self._cells.disarm()
        if not any(p.scheduled for p in self.passes.pending):
            # else an off-schedule backward would feed the next scheduled step's parameter norms
            self._params.remove()

    # ---------------------------------------------------------------- public
    @property
    def closed(self) -> bool:
        """Whether the watch has ended (its hooks are removed)."""
        return self.passes.closed

    @property
    def step(self) -> int:
        """Number of backward passes that reached the model so far."""
        self.passes.settle_open()
        return self.passes.step

    @property
    def recording(self) -> Recording:
        """A frozen :class:`~gradscope.Recording` of everything recorded so far."""
        self.passes.settle_open()
        if self.updates is not None:
            self.updates.flush()   # update norms still on the device (they ride with the next recorded step)
        meta = {"gradscope_version": __version__, "torch_version": str(torch.__version__),
                "model": type(self.model).__name__, "compiled": self.compiled is not None,
                "ddp": self.ddp is not None, "every": self.every,
                "stride": self._schedule.stride, "max_steps": self.max_steps, "total_steps": self.passes.step,
                "source": "watch", "probe_every": self.probe_every, "schedule": self._schedule.meta()}
        return self._builder.recording(meta, self._probes, self._discovery.done)

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
        self.recording.to_tensorboard(writer, step=self.passes.step if step is None else step, **kwargs)

    def diagnose(self, **kwargs):
        """:func:`gradscope.diagnose` of the recording so far (keywords pass through)."""
        from ..analysis.diagnose import diagnose
        return diagnose(self.recording, **kwargs)

    def close(self) -> None:
        """Remove every hook and patch; safe to call twice. The recording stays available."""
        if self.closed:
            return
        try:
            self.passes.settle()
            if self.updates is not None:
                self.updates.close(self.passes.step)  # the last recorded step's update
        finally:
            self.passes.close()
            self._params.remove()
            for h in self._root_handles:
                h.remove()
            self._root_handles = []
            self._discovery.close()
            if self._attn is not None:
                self._attn.close()
            self._collector.clear()
            self._cells.close()
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
                f"sites={list(self.sites)}, steps={self.passes.step}>")


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
