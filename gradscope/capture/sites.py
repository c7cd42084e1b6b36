"""Finding sites: fused recurrent layers (static) and user cells (by data flow, during a forward).

Site names start with the module's qualified name from ``model.named_modules()``:

* fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: one site per layer and direction, named
  ``"<module>.l<k>"`` and ``"<module>.l<k>_reverse"`` — the suffixes PyTorch itself uses for the
  parameters (``weight_hh_l1_reverse``). A watched bare LSTM has sites ``"l0"``, ``"l0_reverse"``…
* user cells: the module's qualified name, e.g. ``"decoder.cell"``.

A user cell is recognised by data flow, not by call count alone: it is called two or more times in
one forward *and* a tensor it returns at one call reaches an input of its next call (the same
tensor object, or through at most a few autograd nodes such as dropout or a LayerNorm). Modules
without parameters (a shared ``nn.Tanh`` or ``nn.Dropout``) are never cells; when a cell contains
other modules that also qualify (its inner ``nn.Linear``), only the outermost counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

FUSED_TYPES = (nn.RNN, nn.LSTM, nn.GRU)
_FUSED_FORWARDS = {nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward}

__all__ = ["SiteSpec", "fused_sites", "flatten_tensors", "find_cells", "state_names"]


@dataclass
class SiteSpec:
    """What gradscope knows about one site before any gradient arrives."""

    name: str
    module_name: str
    kind: str  # lstm | gru | rnn_tanh | rnn_relu | cell
    states: Tuple[str, ...] = ("h",)
    layer: Optional[int] = None
    reverse: bool = False
    info: Dict[str, Any] = field(default_factory=dict)
    # user cells: which flattened outputs are the state, and where the state enters the next call
    state_outputs: Tuple[int, ...] = ()
    state_inputs: Tuple[int, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        d = {"kind": self.kind, "module": self.module_name, "states": list(self.states),
             "layer": self.layer, "direction": "reverse" if self.reverse else "forward"}
        d.update(self.info)
        return d


def site_prefix(module_name: str) -> str:
    return module_name + "." if module_name else ""


def fused_kind(m: nn.Module) -> str:
    if isinstance(m, nn.LSTM):
        return "lstm"
    if isinstance(m, nn.GRU):
        return "gru"
    return "rnn_tanh" if m.mode == "RNN_TANH" else "rnn_relu"


def fused_sites(name: str, m: nn.Module) -> List[SiteSpec]:
    """One SiteSpec per layer and direction of a fused module."""
    kind = fused_kind(m)
    states = ("h", "c") if kind == "lstm" else ("h",)
    info = {"input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
            "bidirectional": m.bidirectional, "batch_first": m.batch_first,
            "proj_size": getattr(m, "proj_size", 0), "bias": m.bias, "dropout": m.dropout,
            "module_type": type(m).__name__}
    out = []
    for layer in range(m.num_layers):
        for rev in ((False, True) if m.bidirectional else (False,)):
            sname = f"{site_prefix(name)}l{layer}{'_reverse' if rev else ''}"
            out.append(SiteSpec(sname, name, kind, states, layer, rev, dict(info)))
    return out


def unsupported_reason(m: nn.Module) -> Optional[str]:
    """Why a module cannot be watched or replayed, or None when it can."""
    if isinstance(m, torch.jit.ScriptModule):
        return ("TorchScript module: torch allows no hooks on it, so it runs unwatched as one opaque "
                "step (gradient still flows through it); watch the Python module before scripting it "
                "to record inside")
    if isinstance(m, FUSED_TYPES):
        if type(m).forward not in _FUSED_FORWARDS:
            return (f"{type(m).__name__} subclasses {type(m).__mro__[1].__name__} but overrides "
                    f"forward(); pass its name in sites=[...] to record its per-call outputs instead")
        return None
    if isinstance(m, nn.RNNBase):
        return f"{type(m).__name__} is an nn.RNNBase variant that gradscope cannot replay"
    tname = type(m).__module__ + "." + type(m).__name__
    if ("quantized" in tname or "quantizable" in tname) and "LSTM" in type(m).__name__.upper():
        return f"{tname} (quantized LSTM) cannot be replayed"
    return None


def flatten_tensors(obj, _depth: int = 0) -> List[Tensor]:
    """Tensors inside a nested output (tuple, list, dict, PackedSequence, ModelOutput), in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if _depth > 4:
        return []
    if isinstance(obj, PackedSequence):
        return [obj.data]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flatten_tensors(o, _depth + 1)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in flatten_tensors(o, _depth + 1)]
    return []


def state_names(n: int) -> Tuple[str, ...]:
    if n == 1:
        return ("h",)
    if n == 2:
        return ("h", "c")
    return tuple(f"s{i}" for i in range(n))


def _reaches(start: Tensor, targets: Dict[Any, int], max_depth: int = 6, max_nodes: int = 256) -> set:
    """Indices of ``targets`` (grad_fn → output index) reachable backwards from ``start``."""
    fn = start.grad_fn
    found = set()
    if fn is None:
        return found
    frontier, seen = [fn], {fn}
    for _ in range(max_depth):
        nxt = []
        for f in frontier:
            if f in targets:
                found.add(targets[f])
                continue
            for g, _i in getattr(f, "next_functions", ()):
                if g is not None and g not in seen and len(seen) < max_nodes:
                    seen.add(g)
                    nxt.append(g)
        frontier = nxt
        if not frontier:
            break
    return found


def _flow(prev_out: Sequence[Tensor], next_in: Sequence[Tensor]) -> Tuple[set, set]:
    """(output indices of one call that feed the next call, input positions they enter)."""
    outs, ins = set(), set()
    for j, x in enumerate(next_in):
        for i, o in enumerate(prev_out):
            if x is o:
                outs.add(i)
                ins.add(j)
    if outs:
        return outs, ins
    targets = {o.grad_fn: i for i, o in enumerate(prev_out) if o.grad_fn is not None}
    if not targets:
        return outs, ins
    for j, x in enumerate(next_in):
        hit = _reaches(x, targets)
        if hit:
            outs |= hit
            ins.add(j)
    return outs, ins


def find_cells(calls: Dict[str, List[Tuple[List[Tensor], List[Tensor]]]]) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """User cells among logged calls ``{module: [(inputs, outputs), …]}`` of one forward.

    Returns ``{module: (state output indices, state input positions)}`` for the outermost modules
    whose returned state feeds their next call.
    """
    found = {}
    for name, log in calls.items():
        if len(log) < 2:
            continue
        outs, ins = set(), set()
        for (_, prev_out), (next_in, _) in zip(log[:-1], log[1:]):
            o, i = _flow(prev_out, next_in)
            outs |= o
            ins |= i
        if outs:
            found[name] = (tuple(sorted(outs)), tuple(sorted(ins)))
    names = sorted(found)
    outer = {n: v for n, v in found.items()
             if not any(n != a and n.startswith(a + ".") for a in names)}
    return outer
