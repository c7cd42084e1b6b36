"""Estimators: pure functions from tensors to numbers, named after the mathematics.

- :func:`step_jacobians` — per-step Jacobians J_t = ∂h_t/∂h_{t−1} ``[T, B, N, N]``.
- :func:`jacobian_norms` — ‖∂h_T/∂h_{T−k}‖ for every lag k ``[B, T+1]``.
- :func:`lyapunov_spectrum` — top-k Lyapunov exponents ``[B, k]``.
- :func:`hidden_spectrum` — singular values, effective rank and participation ratio of states.
- :func:`decay_rate` — robust decay rate per lag, gradient horizon and explosion lag.

A *step* is ``step(h, x) -> h_next`` with ``h`` a Tensor ``[B, N]`` or a tuple of them (their
concatenation along features is the state); inputs are time-major ``[T, B, ...]``. The built-in
steps (:class:`ElmanStep`, :class:`LSTMStep`, :class:`GRUStep`, or :func:`step_from_module` of an
``nn.RNN/LSTM/GRU`` or cell) get closed-form Jacobians; any other callable goes through autograd.
"""
from __future__ import annotations

from .decay import DecayFit, decay_rate
from .jacobians import step_jacobians
from .lyapunov import lyapunov_spectrum
from .norms import jacobian_norms
from .spectra import HiddenSpectrum, effective_rank, hidden_spectrum, participation_ratio
from .steps import ElmanStep, GRUStep, LSTMStep, RecurrentStep, step_from_module

__all__ = [
    "step_jacobians", "jacobian_norms", "lyapunov_spectrum", "hidden_spectrum", "HiddenSpectrum",
    "effective_rank", "participation_ratio", "decay_rate", "DecayFit",
    "RecurrentStep", "ElmanStep", "LSTMStep", "GRUStep", "step_from_module",
]
