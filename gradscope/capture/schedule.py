"""When a watched step gets a deep pass (per-timestep capture) and when a probe: fixed or by budget.

A *step* is one backward call that reaches the watched model, with the forward passes (gradients
enabled) it goes back through (:mod:`.passes`); its schedule is decided at its first forward pass.
Every step pays only the light tier: counting, and on recorded steps the parameter-gradient norms.
Two kinds of work cost more:

* a **deep pass** — the per-timestep capture (replay of fused modules, a hook per state): on the
  order of a plain step's time again;
* a **probe** — Jacobians by lag, Lyapunov exponents and spectra on the step's batch: tens of
  plain steps for a small model.

``every=N`` / ``probe_every=N`` fix the schedule. Otherwise the schedule keeps gradscope's extra
time within ``overhead`` (default 3%) of the training loop's own time, split evenly between deep
passes and probes: each kind earns ``overhead × (1 - RESERVE) / 2`` of every step's duration as
credit, a pass of that kind runs when the credit covers its last measured extra cost, and the cost
is then charged.
The light tier is paid from the same budget: the watch reports the time its own hooks take on
plain steps (:meth:`Schedule.light`), and that time is taken from both kinds' credit before they
earn any. What this clock cannot see — the hooks' mere presence in nn.Module's call path, the step
counter's hook inside backward — is paid by spending only ``1 - RESERVE`` (85%) of the budget.
The first step always gets both (discovery needs one, and ``diagnose`` needs Jacobian evidence);
neither is ever rarer than ``max_interval`` steps (which can overrun the budget: say so in the
meta). Durations are host wall-clock times between consecutive forward passes (on a GPU the host
runs ahead until the queue fills, so they approximate the loop's throughput); the extra cost of a
deep or probe step is its duration minus the mean duration of recent plain steps.

Example:
    >>> s = Schedule(every=3, probe_every=None)
    >>> [s.begin(i, float(i)) for i in range(4)]
    [(True, False), (False, False), (False, False), (True, False)]
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Dict, Optional, Tuple, Union

from ..errors import GradscopeError

__all__ = ["Schedule", "AUTO", "DEFAULT_OVERHEAD", "DEFAULT_MAX_INTERVAL", "RESERVE"]

AUTO = "auto"
DEFAULT_OVERHEAD = 0.03
DEFAULT_MAX_INTERVAL = 10_000
_RECENT = 32  # plain-step durations kept for the running mean
_MIN_COST = 0.1  # the least extra cost charged for a deep pass or probe, in plain steps
# The share of the budget kept for what this clock cannot see: the hooked call path of the model
# (nn.Module's slow path for a module with hooks) and the step counter's hook inside backward. On
# the small CPU LSTM step of benchmarks/overhead.py those cost 0.1-0.4% of the step (the
# off-schedule row's ratio minus the light tier the watch times), about a tenth of a 3% budget.
RESERVE = 0.15
# a step with both: each kind's share of the extra cost (the probe is the larger part)
_SHARE = {(True, False): (1.0, 0.0), (False, True): (0.0, 1.0), (True, True): (0.2, 0.8)}


class _Bucket:
    """Credit for one kind of work (deep passes or probes)."""

    __slots__ = ("credit", "cost", "last", "count", "spent")

    def __init__(self):
        self.credit = 0.0   # seconds of extra work this kind may still spend
        self.cost = None    # last measured extra seconds of one pass (None: not measured yet)
        self.last = -1      # step of the last pass
        self.count = 0
        self.spent = 0.0    # total extra seconds charged

    def due(self, step: int, max_interval: int) -> bool:
        if self.last < 0:
            return True
        if step - self.last >= max_interval:
            return True
        return self.cost is not None and self.credit >= self.cost


class Schedule:
    """The deep-pass and probe schedule of one watch (see the module docstring).

    Args:
        every: a deep pass every this many steps (fixed), or None for the budget.
        probe_every: a probe every this many steps (fixed), ``"auto"`` for the budget, or None for
            never.
        overhead: the budget, a fraction of the loop's time, in (0, 1].
        max_interval: the most steps between two deep passes (and two probes) in budget mode.
    """

    def __init__(self, every: Optional[int] = None, probe_every: Union[int, str, None] = AUTO, *,
                 overhead: float = DEFAULT_OVERHEAD, max_interval: int = DEFAULT_MAX_INTERVAL):
        check_schedule(every=every, probe_every=probe_every, overhead=overhead, max_interval=max_interval)
        self.every = every
        self.probe_every = probe_every
        self.overhead = float(overhead)
        self.max_interval = int(max_interval)
        self.stride = 1                 # fixed mode: grows ×2 when the history is thinned
        self._deep, self._probe = _Bucket(), _Bucket()
        self._decided: Tuple[int, bool, bool] = (-1, False, False)
        self._open: Optional[Tuple[float, bool, bool]] = None   # (start, deep, probe) of the last step begun
        self._plain = deque(maxlen=_RECENT)
        self._plain_sum = 0.0           # sum of self._plain (a running sum: begin() runs every step)
        self._unpriced: Optional[Tuple[float, bool, bool]] = None  # a costly step before any plain one
        self.elapsed = 0.0              # seconds of all measured steps
        self.light_seconds = 0.0        # the watch's own time on plain steps (light tier), all steps
        self._light_new = 0.0           # ... since the last step was accounted

    @property
    def budgeted(self) -> bool:
        return self.every is None or self.probe_every == AUTO

    def begin(self, step: int, now: Optional[float] = None) -> Tuple[bool, bool]:
        """A forward pass of step ``step`` starts at ``now`` (seconds; default: the clock now):
        ``(deep, probe)`` for it. Passes of one step (gradient accumulation) get the step's first
        decision."""
        if now is None:
            now = time.perf_counter()
        if self._decided[0] == step:
            return self._decided[1], self._decided[2]
        if self._open is not None:
            self._account(now - self._open[0], self._open[1], self._open[2])
        deep = (step % (self.every * self.stride) == 0 if self.every is not None
                else self._deep.due(step, self.max_interval))
        if self.probe_every is None:
            probe = False
        elif self.probe_every == AUTO:
            probe = self._probe.due(step, self.max_interval)
        else:
            probe = step % self.probe_every == 0
        for on, b in ((deep, self._deep), (probe, self._probe)):
            if on:
                b.last, b.count = step, b.count + 1
        self._decided = (step, deep, probe)
        self._open = (now, deep, probe)
        return deep, probe

    def light(self, seconds: float) -> None:
        """``seconds`` of the watch's own work on a plain step (its hooks): paid from the budget."""
        if seconds > 0:
            self.light_seconds += seconds
            self._light_new += seconds

    def _account(self, seconds: float, deep: bool, probe: bool) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self.elapsed += seconds
        earned = (seconds * self.overhead * (1.0 - RESERVE) - self._light_new) / 2
        self._light_new = 0.0
        self._deep.credit += earned
        self._probe.credit += earned
        plain_steps = self._plain
        if not deep and not probe:
            if len(plain_steps) == _RECENT:
                self._plain_sum -= plain_steps[0]
            plain_steps.append(seconds)
            self._plain_sum += seconds
            if self._unpriced is None:
                return
        plain = self._plain_sum / len(plain_steps) if plain_steps else None
        if (deep or probe) and plain is not None:
            # at least a tenth of a plain step: timing noise must not make the work look free
            extra = max(seconds - plain, _MIN_COST * plain)
            share = _SHARE[(deep, probe)]
            for on, b, k in ((deep, self._deep, share[0]), (probe, self._probe, share[1])):
                if on:
                    b.cost = extra * k
                    b.credit -= extra * k
                    b.spent += extra * k
        elif (deep or probe) and plain is None:
            # no plain step measured yet (the first step): charge it once one is known
            self._unpriced = (seconds, deep, probe)
        if plain is not None and self._unpriced is not None:
            s0, d0, p0 = self._unpriced
            self._unpriced = None
            self.elapsed -= s0
            self._account(s0, d0, p0)

    def thin(self) -> None:
        """The history was thinned: a fixed schedule records half as often from now on."""
        self.stride *= 2

    def meta(self) -> Dict[str, Any]:
        """What the Recording and every report state about the schedule and its cost."""
        spent = self._deep.spent + self._probe.spent + self.light_seconds
        base = self.elapsed - spent
        return {"mode": "budget" if self.budgeted else "fixed", "every": self.every,
                "probe_every": self.probe_every, "overhead_budget": self.overhead if self.budgeted else None,
                "max_interval": self.max_interval, "stride": self.stride,
                "deep_passes": self._deep.count, "probes": self._probe.count,
                "light_seconds": self.light_seconds,
                "realised_overhead": spent / base if base > 0 else None,
                # the hooks' own share alone (on very short steps it can exceed the budget)
                "light_overhead": self.light_seconds / base if base > 0 else None,
                "measured_seconds": self.elapsed}


def check_schedule(*, every, probe_every, overhead, max_interval) -> None:
    """Raise GradscopeError for a bad schedule option (before anything is hooked)."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise GradscopeError(
            f"every must be a positive integer (record one step in `every`) or None (space the deep "
            f"passes within the overhead budget), got {every!r}. Use every=1 to record every step.")
    if probe_every is not None and probe_every != AUTO and (
            isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1):
        raise GradscopeError(f"probe_every must be a positive integer, 'auto' (within the overhead budget) "
                             f"or None (never), got {probe_every!r}.")
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead <= 1:
        raise GradscopeError(f"overhead must be a fraction in (0, 1] of the training loop's time (default "
                             f"{DEFAULT_OVERHEAD}), got {overhead!r}.")
    if isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < 1:
        raise GradscopeError(f"max_interval must be a positive integer (steps), got {max_interval!r}.")
