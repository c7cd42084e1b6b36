"""Step functions and trajectories of real sites, so the estimators run on real models.

For every site this module yields a :class:`Trajectory`: a step ``step(h, x) -> h_next``, the
initial state ``h0``, the inputs ``[T, B, ...]`` in the order the recurrence consumes them (for a
reverse direction that is positions T−1 … 0), and the states it passes through. It also measures
the gate statistics on the way.

* Fused layers: :func:`~gradscope.estimators.step_from_module` of the layer and direction, inputs
  = the layer's input sequence (the previous layer's output; inter-layer dropout is left out, as
  in eval mode). ``PackedSequence`` input: the samples that span the whole length are measured.
* Built-in cells (``nn.RNNCell`` / ``LSTMCell`` / ``GRUCell``): their built-in step.
* Other user cells: an adapter that calls the module with the state replaced, when the state
  returned at one call enters the next call unchanged and exactly one other tensor argument
  changes from call to call (the per-step input). Other cells are reported, not guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..estimators.gates import memory_time_of_keep
from ..estimators.steps import ElmanStep, GRUStep, LSTMStep, RecurrentStep, step_from_module
from ..capture.sites import flatten_tensors

__all__ = ["Trajectory", "fused_trajectories", "cell_trajectory", "CellStep"]

_BUILTIN_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@dataclass
class Trajectory:
    """A site's recurrence on one batch, ready for the estimators."""

    site: str
    step: Any
    h0: Any
    inputs: Tensor  # [T, B, ...] in processing order
    states: Tensor  # [T, B, H] the h part, processing order
    gate_stats: Dict[str, float] = field(default_factory=dict)


class _GateAccumulator:
    """Running gate statistics over (t, sample, unit): saturation shares and mean keep-gate."""

    def __init__(self):
        self.n = 0
        self.low = {}
        self.high = {}
        self.sums = {}
        self.count = {}
        self.keep_unit = None
        self.active_unit = None
        self.count_units = 0

    def add(self, name: str, g: Tensor) -> None:
        # Running sums stay on g's device (float64: the same sums as adding Python floats) and
        # reach the host once, in result(): no synchronisation per time step.
        self.low[name] = self.low.get(name, 0) + (g < 0.1).sum()
        self.high[name] = self.high.get(name, 0) + (g > 0.9).sum()
        self.sums[name] = self.sums.get(name, 0) + g.sum().double()
        self.count[name] = self.count.get(name, 0) + g.numel()

    def add_keep(self, g: Tensor) -> None:
        """The gate that keeps memory (LSTM forget, GRU update): per-unit mean for τ."""
        s = g.double().sum(0)
        self.keep_unit = s if self.keep_unit is None else self.keep_unit + s
        self.count_units += g.shape[0]

    def result(self, keep: Optional[str]) -> Dict[str, float]:
        out: Dict[str, float] = {}
        names = list(self.low)
        low, high, sums = {}, {}, {}
        if names:  # one host copy for every running sum
            host = torch.stack([torch.stack([d[n].double() for n in names])
                                for d in (self.low, self.high, self.sums)]).cpu().tolist()
            low, high, sums = (dict(zip(names, row)) for row in host)
        tot_low = tot_high = tot_n = 0.0
        for name in names:
            n = self.count[name]
            out[f"{name}_low"] = low[name] / n
            out[f"{name}_high"] = high[name] / n
            out[f"{name}_mean"] = sums[name] / n
            tot_low += low[name]
            tot_high += high[name]
            tot_n += n
        if tot_n:
            out["saturated_low"] = tot_low / tot_n
            out["saturated_high"] = tot_high / tot_n
            out["saturated"] = (tot_low + tot_high) / tot_n
        if keep is not None and self.keep_unit is not None:
            per_unit = (self.keep_unit / max(self.count_units, 1)).clamp(1e-12, 1 - 1e-12)
            mean = float(per_unit.mean())
            out["keep_gate"] = keep
            out["keep_mean"] = mean
            out["memory_time"] = memory_time_of_keep(mean)
            taus = memory_time_of_keep(per_unit)
            out["memory_time_median"] = float(taus.median())
            out["memory_time_max"] = float(taus.max())
        return out


@torch.no_grad()
def run_step(step: RecurrentStep, h0, xs: Tensor):
    """States of a built-in step over ``xs [T, B, I]`` plus its gate statistics."""
    acc = _GateAccumulator()
    h = h0
    states = []
    keep = None
    dead = None
    for t in range(xs.shape[0]):
        xw = step.project_inputs(xs[t])
        if isinstance(step, LSTMStep):
            i, f, g, o = step.gate_values(h[0], xw)
            acc.add("input", i)
            acc.add("forget", f)
            acc.add("output", o)
            acc.add_keep(f.reshape(-1, f.shape[-1]))
            keep = "forget"
        elif isinstance(step, GRUStep):
            r, z, n, _ = step.gate_values(h, xw)
            acc.add("reset", r)
            acc.add("update", z)
            acc.add_keep(z.reshape(-1, z.shape[-1]))
            keep = "update"
        h = step.recur(h, xw)
        hh = h[0] if isinstance(h, tuple) else h
        if isinstance(step, ElmanStep) and step.nonlinearity == "relu":
            act = (hh > 0).any(0)
            dead = ~act if dead is None else dead & ~act
        states.append(hh)
    stats = acc.result(keep)
    if dead is not None:
        stats["dead_units"] = float(dead.double().mean())
    return torch.stack(states), stats


@torch.no_grad()
def fused_trajectories(name_of: Dict[Tuple[int, bool], str], module: nn.Module, input, hx=None
                       ) -> List[Trajectory]:
    """Trajectories of every layer and direction of a fused module called with ``(input, hx)``."""
    is_lstm = isinstance(module, nn.LSTM)
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)  # [T, B, I]
        full = (lengths == lengths.max()).nonzero().flatten().to(padded.device)
        x = padded.index_select(1, full)
        if hx is not None:
            hx = tuple(h.index_select(1, full) for h in hx) if is_lstm else hx.index_select(1, full)
    else:
        x = input
        if x.dim() == 2:
            x = x.unsqueeze(0 if module.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        if module.batch_first:
            x = x.transpose(0, 1)
    L, D = module.num_layers, 2 if module.bidirectional else 1
    B = x.shape[1]
    out_list = []
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(D):
            step = step_from_module(module, layer, reverse=bool(d))
            idx = layer * D + d
            if hx is None:
                h0 = step.initial_state(B, dtype=x.dtype, device=x.device)
            else:
                h0 = (hx[0][idx], hx[1][idx]) if is_lstm else hx[idx]
            xs = layer_in.flip(0) if d else layer_in
            states, stats = run_step(step, h0, xs)
            site = name_of.get((layer, bool(d)))
            if site is not None:
                out_list.append(Trajectory(site, step, h0, xs, states, stats))
            outs.append(states.flip(0) if d else states)
        layer_in = torch.cat(outs, -1) if D == 2 else outs[0]
    return out_list


class CellStep:
    """``step(h, x)`` for a user cell: calls the module with the state and the input replaced.

    Built from one recorded call: ``leaves``/``spec`` its flattened ``(args, kwargs)``,
    ``state_pos`` the leaf positions of the state parts (in state order), ``x_pos`` the leaf of the
    per-step input, ``out_idx`` the state among the module's flattened outputs.
    """

    def __init__(self, module, leaves, spec, state_pos, x_pos, out_idx):
        self.module, self.leaves, self.spec = module, list(leaves), spec
        self.state_pos, self.x_pos, self.out_idx = tuple(state_pos), x_pos, tuple(out_idx)

    def inputs(self, h, x, leaves=None):
        """``(args, kwargs)`` of the recorded call (or of ``leaves`` in its layout) with the state
        ``h`` and the per-step input ``x`` put in."""
        hs = h if isinstance(h, tuple) else (h,)
        leaves = list(self.leaves if leaves is None else leaves)
        for p, v in zip(self.state_pos, hs):
            leaves[p] = v
        leaves[self.x_pos] = x
        return tree_unflatten(leaves, self.spec)

    def state_of(self, output):
        """The state (a tensor, or a tuple of its parts) among the module's ``output``."""
        outs = flatten_tensors(output)
        st = tuple(outs[i] for i in self.out_idx)
        return st if len(st) > 1 else st[0]

    def __call__(self, h, x):
        args, kwargs = self.inputs(h, x)
        return self.state_of(self.module(*args, **kwargs))

    def __repr__(self) -> str:
        return f"CellStep({type(self.module).__name__})"


@torch.no_grad()
def cell_trajectory(site: str, module: nn.Module, calls: Sequence[Tuple[Any, Any]]
                    ) -> Tuple[Optional[Trajectory], Optional[str]]:
    """A user cell's trajectory from its recorded calls ``[((args, kwargs), output), …]``.

    Returns ``(trajectory, None)`` or ``(None, reason)`` when no step function can be built.
    """
    if len(calls) < 2:
        return None, "called fewer than twice"
    flat = [tree_flatten(c[0]) for c in calls]
    outs = [flatten_tensors(c[1]) for c in calls]
    leaves0, spec0 = flat[0]
    # pair each state output of call t with the leaf of call t+1 that is the same tensor object
    pairs = {}
    for i, o in enumerate(outs[0]):
        for j, leaf in enumerate(flat[1][0]):
            if leaf is o:
                pairs[i] = j
    if not pairs:
        return None, ("its returned state does not enter its next call unchanged (e.g. dropout or "
                      "normalisation in between), so no step function can be formed")
    out_idx = tuple(sorted(pairs))
    state_pos = tuple(pairs[i] for i in out_idx)
    tensor_pos = [j for j, leaf in enumerate(leaves0) if isinstance(leaf, Tensor) and j not in state_pos]
    varying = [j for j in tensor_pos if any(f[0][j] is not leaves0[j] for f in flat[1:])]
    if len(varying) != 1:
        return None, (f"it takes {len(varying)} per-step tensor inputs besides the state; "
                      f"exactly one is supported")
    x_pos = varying[0]
    xs = [f[0][x_pos] for f in flat]
    if any(x.shape != xs[0].shape for x in xs):
        return None, "its per-step input changes shape between calls"
    inputs = torch.stack(xs)
    h0_parts = tuple(leaves0[p] for p in state_pos)
    h0 = h0_parts if len(h0_parts) > 1 else h0_parts[0]
    if isinstance(module, _BUILTIN_CELLS):
        step = step_from_module(module)
        states, stats = run_step(step, h0, inputs)
        return Trajectory(site, step, h0, inputs, states, stats), None
    step = CellStep(module, leaves0, spec0, state_pos, x_pos, out_idx)
    states = torch.stack([o[out_idx[0]] for o in outs])
    return Trajectory(site, step, h0, inputs, states, {}), None
