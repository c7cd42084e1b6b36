"""Recurrent step functions with PyTorch's conventions, shared by replay and the estimators.

A *step* maps a state and one input to the next state: ``step(h, x) -> h_next``. The state is a
Tensor ``[B, N]`` or a tuple of them (LSTM: ``(h, c)``); ``x`` is ``[B, I]``. Index letters used
throughout: T sequence, B batch, I input features, H hidden units, P projection size, N state size.

The built-in steps (:class:`ElmanStep`, :class:`LSTMStep`, :class:`GRUStep`) hold the weights of one
layer and direction of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (or of the matching ``nn.*Cell``) and
split the work into :meth:`project_inputs` (one matmul for all time steps) and :meth:`recur` (the
part that depends on the state), so replaying a fused module costs one ordinary BPTT.
Gate order is PyTorch's: LSTM (i, f, g, o), GRU (r, z, n).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GradscopeError

State = Union[Tensor, Tuple[Tensor, ...]]

__all__ = ["RecurrentStep", "ElmanStep", "LSTMStep", "GRUStep", "step_from_module", "State"]


class RecurrentStep:
    """Base class: a step with weights ``weight_ih [G*H, I]``, ``weight_hh [G*H, H or P]``.

    Subclasses define :meth:`recur`; ``step(h, x)`` is ``recur(h, project_inputs(x))``.
    """

    kind: str = "custom"
    gates: int = 1

    def __init__(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor] = None,
                 bias_hh: Optional[Tensor] = None):
        self.weight_ih = weight_ih
        self.weight_hh = weight_hh
        self.bias_ih = bias_ih
        self.bias_hh = bias_hh
        self.hidden_size = weight_hh.shape[0] // self.gates
        self.input_size = weight_ih.shape[1]

    def project_inputs(self, x: Tensor) -> Tensor:
        """``W_ih x + b_ih`` for any leading shape: ``[..., I] -> [..., G*H]``."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def recur(self, h: State, xw: Tensor) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, h: State, x: Tensor) -> State:
        return self.recur(h, self.project_inputs(x))

    @property
    def state_sizes(self) -> Tuple[int, ...]:
        """Feature size of each state component (``(H,)``, or ``(P or H, H)`` for LSTM)."""
        return (self.hidden_size,)

    def initial_state(self, batch: int, *, dtype=None, device=None) -> State:
        """Zero state for ``batch`` samples (a Tensor, or a tuple for LSTM)."""
        dtype = dtype or self.weight_hh.dtype
        device = device or self.weight_hh.device
        zs = tuple(torch.zeros(batch, n, dtype=dtype, device=device) for n in self.state_sizes)
        return zs if len(zs) > 1 else zs[0]

    def to(self, dtype=None, device=None) -> "RecurrentStep":
        """A shallow copy whose weights are cast to ``dtype`` and/or moved to ``device``.

        The step itself is left unchanged; weights already of that dtype and device are shared.

        Example:
            >>> cell = torch.nn.GRUCell(3, 4)
            >>> step_from_module(cell).to(torch.float64).weight_hh.dtype
            torch.float64
        """
        import copy  # local: keeps this module's import block as it was

        new = copy.copy(self)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            w = getattr(self, name, None)
            if w is not None:
                setattr(new, name, w.to(dtype=dtype, device=device))
        return new

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size}, hidden_size={self.hidden_size})"


class ElmanStep(RecurrentStep):
    """``h' = φ(W_ih x + b_ih + W_hh h + b_hh)`` with φ = tanh or relu (``nn.RNN``)."""

    gates = 1

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, nonlinearity: str = "tanh"):
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh)
        if nonlinearity not in ("tanh", "relu"):
            raise GradscopeError(
                f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}.")
        self.nonlinearity = nonlinearity
        self.kind = "rnn_" + nonlinearity

    def recur(self, h: Tensor, xw: Tensor) -> Tensor:
        a = xw + F.linear(h, self.weight_hh, self.bias_hh)
        return torch.tanh(a) if self.nonlinearity == "tanh" else torch.relu(a)


class LSTMStep(RecurrentStep):
    """``nn.LSTM`` step on the state ``(h, c)``; with ``weight_hr [P, H]`` h is projected."""

    kind = "lstm"
    gates = 4

    def __init__(self, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr: Optional[Tensor] = None):
        super().__init__(weight_ih, weight_hh, bias_ih, bias_hh)
        self.weight_hr = weight_hr

    @property
    def state_sizes(self):
        h = self.weight_hr.shape[0] if self.weight_hr is not None else self.hidden_size
        return (h, self.hidden_size)

    def gate_values(self, h: Tensor, xw: Tensor):
        """The gate activations ``(i, f, g, o)``, each ``[B, H]``."""
        gates = xw + F.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=-1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    def recur(self, state, xw):
        h, c = state
        i, f, g, o = self.gate_values(h, xw)
        c_next = f * c + i * g
        h_next = o * torch.tanh(c_next)
        if self.weight_hr is not None:
            h_next = F.linear(h_next, self.weight_hr)
        return h_next, c_next


class GRUStep(RecurrentStep):
    """``nn.GRU`` step: ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1−z) ⊙ n + z ⊙ h``."""

    kind = "gru"
    gates = 3

    def gate_values(self, h: Tensor, xw: Tensor):
        """``(r, z, n, u)`` with ``u = W_hn h + b_hn``, each ``[B, H]``."""
        hw = F.linear(h, self.weight_hh, self.bias_hh)
        xr, xz, xn = xw.chunk(3, dim=-1)
        hr, hz, hn = hw.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return r, z, n, hn

    def recur(self, h, xw):
        r, z, n, _ = self.gate_values(h, xw)
        return (1 - z) * n + z * h


_FUSED = (nn.RNN, nn.LSTM, nn.GRU)
_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


def step_from_module(module: nn.Module, layer: int = 0, reverse: bool = False) -> RecurrentStep:
    """The step of one layer and direction of a fused ``nn.RNN/LSTM/GRU``, or of an ``nn.*Cell``.

    The step holds the module's own parameters (no copy), so gradients reach them.

    Example:
        >>> lstm = torch.nn.LSTM(3, 5, num_layers=2)
        >>> step = step_from_module(lstm, layer=1)
        >>> step.state_sizes
        (5, 5)
    """
    if isinstance(module, _CELLS):
        args = (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
        if isinstance(module, nn.LSTMCell):
            return LSTMStep(*args)
        if isinstance(module, nn.GRUCell):
            return GRUStep(*args)
        return ElmanStep(*args, nonlinearity=module.nonlinearity)
    if not isinstance(module, _FUSED):
        raise GradscopeError(
            f"step_from_module expects nn.RNN/LSTM/GRU or nn.RNNCell/LSTMCell/GRUCell, got "
            f"{type(module).__name__}. For another cell, pass a function step(h, x) -> h_next.")
    if not 0 <= layer < module.num_layers:
        raise GradscopeError(f"layer must be in [0, {module.num_layers}), got {layer}.")
    if reverse and not module.bidirectional:
        raise GradscopeError("reverse=True needs a bidirectional module; this one is not.")
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih = getattr(module, "weight_ih" + sfx)
    w_hh = getattr(module, "weight_hh" + sfx)
    b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
    b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
    if isinstance(module, nn.LSTM):
        w_hr = getattr(module, "weight_hr" + sfx) if module.proj_size > 0 else None
        return LSTMStep(w_ih, w_hh, b_ih, b_hh, weight_hr=w_hr)
    if isinstance(module, nn.GRU):
        return GRUStep(w_ih, w_hh, b_ih, b_hh)
    nl = "tanh" if module.mode == "RNN_TANH" else "relu"
    return ElmanStep(w_ih, w_hh, b_ih, b_hh, nonlinearity=nl)
