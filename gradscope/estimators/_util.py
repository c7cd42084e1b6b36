"""Private helpers shared by the estimators: state flattening, input checks, progress, warnings.

Index letters: T sequence length, B batch, N state size (the concatenation of the state's
components along features), I input features, k lag.
"""
from __future__ import annotations

import copy
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import GradscopeError, NonFiniteWarning, ShapeError
from .steps import ElmanStep, GRUStep, LSTMStep, RecurrentStep, step_from_module

State = Union[Tensor, Tuple[Tensor, ...]]
# None for a plain Tensor state, else the feature size of each tuple component.
Spec = Optional[Tuple[int, ...]]

# Seconds of work above which progress=None shows a bar when stderr is a terminal.
_PROGRESS_SECONDS = 2.0
# A rough CPU rate used only to guess whether a loop is long enough to deserve a bar.
_FLOPS_PER_SECOND = 2e10


def shape_str(x: Any) -> str:
    """``[2, 3]`` for a Tensor/array, ``([2, 3], [2, 3])`` for a tuple, the type name otherwise."""
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(shape_str(v) for v in x) + ")"
    if hasattr(x, "shape"):
        return "[" + ", ".join(str(int(s)) for s in x.shape) + "]"
    return type(x).__name__


def spec_of(h: State) -> Spec:
    return tuple(int(c.shape[-1]) for c in h) if isinstance(h, tuple) else None


def flatten_state(h: State) -> Tensor:
    """``[B, N]``: the state's components concatenated along features, in tuple order."""
    return torch.cat(h, dim=-1) if isinstance(h, tuple) else h


def unflatten_state(flat: Tensor, spec: Spec) -> State:
    if spec is None:
        return flat
    return tuple(torch.split(flat, list(spec), dim=-1))


def closed_form_kind(step: Any) -> Optional[str]:
    """``"rnn_tanh" | "rnn_relu" | "lstm" | "gru"`` for an unmodified built-in step, else None.

    A subclass that overrides ``recur``/``__call__``/``project_inputs`` computes something else, so
    it is differentiated by autograd like any user step.
    """
    for cls in (ElmanStep, LSTMStep, GRUStep):
        if isinstance(step, cls):
            t = type(step)
            if (t.recur is cls.recur and t.__call__ is RecurrentStep.__call__
                    and t.project_inputs is RecurrentStep.project_inputs):
                return step.kind
    return None


def as_step(step: Any) -> Any:
    """Accept ``nn.RNNCell/LSTMCell/GRUCell`` and single-layer unidirectional fused modules."""
    if isinstance(step, (nn.RNNCell, nn.LSTMCell, nn.GRUCell)):
        return step_from_module(step)
    if isinstance(step, (nn.RNN, nn.LSTM, nn.GRU)):
        if step.num_layers == 1 and not step.bidirectional:
            return step_from_module(step)
        raise GradscopeError(
            f"{type(step).__name__} has {step.num_layers} layer(s) and bidirectional="
            f"{step.bidirectional}; pick one layer and direction with "
            f"gradscope.estimators.step_from_module(module, layer=..., reverse=...).")
    if not callable(step):
        raise GradscopeError(
            f"step must be a callable step(h, x) -> h_next or a recurrent module, got "
            f"{type(step).__name__}.")
    return step


@dataclass
class Problem:
    """A validated (step, h0, inputs) triple, cast to one dtype and device."""

    step: Any
    kind: Optional[str]          # closed-form kind, or None for autograd
    h0: Tensor                   # [B, N] flat initial state
    spec: Spec
    inputs: Tensor               # [T, B, ...]
    dtype: torch.dtype

    @property
    def T(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def B(self) -> int:
        return int(self.h0.shape[0])

    @property
    def N(self) -> int:
        return int(self.h0.shape[1])


def _check_floating(name: str, t: Tensor, fn: str) -> None:
    if not torch.is_floating_point(t):
        raise ShapeError(
            f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype} {shape_str(t)}. "
            f"Convert it with .float() or .double() (token ids belong in the step, e.g. an "
            f"embedding applied to float one-hots, or pass the embedded sequence).")


def prepare(step: Any, h0: Optional[State], inputs: Tensor, dtype: Optional[torch.dtype],
            fn: str) -> Problem:
    """Check shapes and dtypes, cast everything to one dtype, and check the step's output.

    ``fn`` names the public function in error messages.
    """
    step = as_step(step)
    kind = closed_form_kind(step)
    if not isinstance(inputs, Tensor):
        raise ShapeError(f"{fn}: inputs must be a Tensor [T, B, ...] (time-major), got "
                         f"{type(inputs).__name__}.")
    _check_floating("inputs", inputs, fn)
    if inputs.dim() < 2:
        raise ShapeError(f"{fn}: inputs must be [T, B, ...] (time-major), got {shape_str(inputs)}.")
    if inputs.shape[0] < 1:
        raise ShapeError(f"{fn}: inputs has no time steps: got {shape_str(inputs)}, expected "
                         f"[T, B, ...] with T >= 1.")
    if h0 is None:
        if kind is None:
            raise ShapeError(f"{fn}: h0=None works only for the built-in steps; pass the initial "
                             f"state of your step, a Tensor [B, N] or a tuple of them.")
        h0 = step.initial_state(int(inputs.shape[1]), dtype=dtype or inputs.dtype,
                                device=inputs.device)
    if isinstance(h0, list):
        h0 = tuple(h0)
    comps = h0 if isinstance(h0, tuple) else (h0,)
    if len(comps) == 0 or not all(isinstance(c, Tensor) for c in comps):
        raise ShapeError(f"{fn}: h0 must be a Tensor [B, N] or a tuple of Tensors [B, N_i], got "
                         f"{shape_str(h0)}.")
    for c in comps:
        _check_floating("h0", c, fn)
    if not all(c.dim() == 2 for c in comps):
        raise ShapeError(f"{fn}: every component of h0 must be 2-D [B, N], got {shape_str(h0)}.")
    B = int(comps[0].shape[0])
    if any(int(c.shape[0]) != B for c in comps):
        raise ShapeError(f"{fn}: the components of h0 disagree on the batch size: {shape_str(h0)}.")
    if int(inputs.shape[1]) != B:
        hint = (" inputs looks batch-first; pass inputs.transpose(0, 1)."
                if int(inputs.shape[0]) == B else "")
        raise ShapeError(
            f"{fn}: h0 has batch size {B} {shape_str(h0)} but inputs {shape_str(inputs)} has "
            f"batch size {int(inputs.shape[1])}; expected inputs [T, B, ...] = [T, {B}, ...]."
            + hint)

    if kind is not None:
        sizes = step.state_sizes
        want = sizes if kind == "lstm" else None
        got = spec_of(h0)
        if kind == "lstm" and not isinstance(h0, tuple):
            raise ShapeError(f"{fn}: an LSTM step takes the state (h, c) with shapes "
                             f"([B, {sizes[0]}], [B, {sizes[1]}]), got a Tensor {shape_str(h0)}.")
        if kind != "lstm" and isinstance(h0, tuple):
            raise ShapeError(f"{fn}: a {kind} step takes a Tensor state [B, {sizes[0]}], got a "
                             f"tuple {shape_str(h0)}.")
        if got != want or (want is None and int(h0.shape[1]) != sizes[0]):
            exp = ("(" + ", ".join(f"[{B}, {s}]" for s in sizes) + ")") if want else f"[{B}, {sizes[0]}]"
            raise ShapeError(f"{fn}: h0 has shape {shape_str(h0)}, expected {exp} for this "
                             f"{kind} step.")
        if inputs.dim() != 3 or int(inputs.shape[2]) != step.input_size:
            raise ShapeError(f"{fn}: inputs has shape {shape_str(inputs)}, expected [T, B, I] = "
                             f"[T, {B}, {step.input_size}] for this {kind} step.")

    work = dtype or comps[0].dtype
    if not work.is_floating_point:
        raise ShapeError(f"{fn}: dtype must be a floating-point dtype, got {work}.")
    device = comps[0].device
    spec = spec_of(h0)
    flat = flatten_state(tuple(c.detach().to(work) for c in comps) if spec else comps[0].detach().to(work))
    inputs = inputs.detach().to(dtype=work, device=device)
    cast_failed_hint = ""
    if kind is not None:
        step = step.to(dtype=work, device=device)  # a copy: the user's step is left as it was
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            w = getattr(step, name, None)
            if w is not None:
                # Estimators differentiate with respect to the state only; an autograd graph
                # through the weights would only cost memory.
                setattr(step, name, w.detach())
    elif isinstance(step, nn.Module):
        params = list(step.parameters()) + list(step.buffers())
        if any(p.is_floating_point() and (p.dtype != work or p.device != device) for p in params):
            # A copy, so the user's module keeps its own dtype and device.
            step = copy.deepcopy(step).to(dtype=work, device=device)
    else:
        cast_failed_hint = (" gradscope cannot cast the weights a plain function closes over; make "
                            "the step an nn.Module or cast its weights to the state's dtype.")
    _check_output(step, flat, spec, inputs[0], fn, cast_failed_hint)
    return Problem(step=step, kind=kind, h0=flat, spec=spec, inputs=inputs, dtype=work)


def _check_output(step, flat: Tensor, spec: Spec, x0: Tensor, fn: str, hint: str) -> None:
    h = unflatten_state(flat, spec)
    try:
        with torch.no_grad():
            out = step(h, x0)
    except RuntimeError as e:  # typically a dtype or shape mismatch inside the user's step
        raise GradscopeError(
            f"{fn}: the step raised on its first call with h {shape_str(h)} ({flat.dtype}) and "
            f"x {shape_str(x0)}: {e}.{hint}") from e
    if isinstance(out, list):
        out = tuple(out)
    if isinstance(h, tuple) != isinstance(out, tuple):
        raise ShapeError(
            f"{fn}: the step takes a {'tuple' if isinstance(h, tuple) else 'Tensor'} state "
            f"{shape_str(h)} but returned a {'tuple' if isinstance(out, tuple) else type(out).__name__} "
            f"{shape_str(out)}; step(h, x) must return the next state with the same structure.")
    outs = out if isinstance(out, tuple) else (out,)
    ins = h if isinstance(h, tuple) else (h,)
    if len(outs) != len(ins):
        raise ShapeError(f"{fn}: the step takes a state of {len(ins)} tensors {shape_str(h)} but "
                         f"returned {len(outs)} {shape_str(out)}.")
    for i, (a, b) in enumerate(zip(ins, outs)):
        if not isinstance(b, Tensor) or tuple(a.shape) != tuple(b.shape):
            raise ShapeError(
                f"{fn}: the step returned a state of shape {shape_str(out)} for a state of shape "
                f"{shape_str(h)} (component {i}); step(h, x) must keep the state's shape.")
        if not torch.is_floating_point(b):
            raise ShapeError(f"{fn}: the step returned a non-floating state component {i} "
                             f"({b.dtype}).")


def is_int(v: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_k(k: Optional[int], N: int, fn: str) -> int:
    if k is None:
        return N
    if not is_int(k) or not 1 <= k <= N:
        raise ShapeError(f"{fn}: k must be an integer with 1 <= k <= N = {N} (the state size), got "
                         f"{k!r}.")
    return int(k)


def progress_iter(iterable: Iterable, total: int, progress: Optional[bool], flops: float,
                  desc: str) -> Iterable:
    """Wrap ``iterable`` in ``tqdm.auto`` when asked, or (``progress=None``) when the work is long.

    ``flops`` is a rough count of the loop's arithmetic, used only to guess its duration.
    """
    if progress is None:
        progress = flops / _FLOPS_PER_SECOND > _PROGRESS_SECONDS and _stderr_is_tty()
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, progress: Optional[bool], flops: float, desc: str):
    """A ``tqdm.auto`` bar to ``update(n)`` by hand (same rule as :func:`progress_iter`), or a
    do-nothing stand-in."""
    if progress is None:
        progress = flops / _FLOPS_PER_SECOND > _PROGRESS_SECONDS and _stderr_is_tty()
    if not progress:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def finite_rows(*tensors: Tensor) -> Tensor:
    """``[B]`` bool: every entry of sample b is finite in every tensor (batch on dim 0)."""
    ok = None
    for t in tensors:
        f = torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        ok = f if ok is None else ok & f
    return ok


def ranges(idx: Sequence[int]) -> str:
    """``"3, 7..12"`` from sorted integers."""
    out: List[str] = []
    idx = list(idx)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}..{idx[j]}")
        i = j + 1
    return ", ".join(out)


def warn_nonfinite(fn: str, first_bad: dict, what: Callable[[int], str]) -> None:
    """One NonFiniteWarning naming, per affected sample b, what became NaN (``what(first step)``)."""
    if not first_bad:
        return
    items = sorted(first_bad.items())
    parts = [f"sample {b}: {what(t)}" for b, t in items[:5]]
    more = f"; and {len(items) - 5} more samples" if len(items) > 5 else ""
    warnings.warn(f"{fn}: NaN or inf inside the recurrence; " + "; ".join(parts) + more
                  + ". Those entries are NaN in the result.", NonFiniteWarning, stacklevel=3)
