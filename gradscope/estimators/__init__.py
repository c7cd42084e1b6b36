"""Estimators: pure functions from tensors to numbers, named after the mathematics.

- :func:`step_jacobians` — per-step Jacobians J_t = ∂h_t/∂h_{t−1} ``[T, B, N, N]``.
- :func:`jacobian_norms` — ‖∂h_T/∂h_{T−k}‖ for every lag k ``[B, T+1]``.
- :func:`lyapunov_spectrum` — top-k Lyapunov exponents ``[B, k]``.
- :func:`hidden_spectrum` — singular values, effective rank and participation ratio of states.
- :func:`decay_rate` — robust decay rate per lag, gradient horizon and explosion lag.
- :mod:`.attention` — attention entropy per head, rank-collapse residual, token cosine, ‖W_Qᵀ W_K‖₂.
- :mod:`.gates` — memory time τ = −1/ln σ(b) of a gate and its inverse (plain Python).

A *step* is ``step(h, x) -> h_next`` with ``h`` a Tensor ``[B, N]`` or a tuple of them (their
concatenation along features is the state); inputs are time-major ``[T, B, ...]``. The built-in
steps (:class:`ElmanStep`, :class:`LSTMStep`, :class:`GRUStep`, or :func:`step_from_module` of an
``nn.RNN/LSTM/GRU`` or cell) get closed-form Jacobians; any other callable goes through autograd.

Attributes are loaded on first use (as in :mod:`gradscope`), so that ``gradscope.estimators.gates``
imports without torch: the remedy catalogue uses it and must load where torch is not installed.
"""
from __future__ import annotations

from .._lazy import lazy_names

_LAZY = {
    "step_jacobians": ".jacobians", "jacobian_norms": ".norms", "lyapunov_spectrum": ".lyapunov",
    "hidden_spectrum": ".spectra", "HiddenSpectrum": ".spectra", "effective_rank": ".spectra",
    "participation_ratio": ".spectra", "decay_rate": ".decay", "DecayFit": ".decay",
    "RecurrentStep": ".steps", "ElmanStep": ".steps", "LSTMStep": ".steps", "GRUStep": ".steps",
    "step_from_module": ".steps",
}

__all__ = [
    "step_jacobians", "jacobian_norms", "lyapunov_spectrum", "hidden_spectrum", "HiddenSpectrum",
    "effective_rank", "participation_ratio", "decay_rate", "DecayFit",
    "RecurrentStep", "ElmanStep", "LSTMStep", "GRUStep", "step_from_module",
]


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
