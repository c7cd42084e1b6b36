"""Singular-value spectra of hidden states and the dimensions derived from them.

Index letters: T sequence length, B batch, H hidden units, M samples (any flattening of B and T).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ..errors import NonFiniteWarning, ShapeError

__all__ = ["HiddenSpectrum", "hidden_spectrum", "effective_rank", "participation_ratio"]


@dataclass(frozen=True)
class HiddenSpectrum:
    """Singular values of a ``[samples·time, H]`` state matrix and two dimensions derived from them.

    Attributes:
        singular_values: ndarray ``[min(M, H)]``, descending.
        effective_rank: exp of the Shannon entropy of p_i = σ_i / Σσ (Roy & Vetterli 2007); between
            1 and the rank, equal to r for r equal non-zero singular values.
        participation_ratio: (Σσ²)² / Σσ⁴, the same idea weighted by variance: between 1 and the rank.
        n_samples: M, the number of rows of the matrix.
    """

    singular_values: np.ndarray
    effective_rank: float
    participation_ratio: float
    n_samples: int

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """σ_i² / Σσ², descending (the share of variance along each principal direction)."""
        s2 = self.singular_values ** 2
        tot = s2.sum()
        return s2 / tot if tot > 0 else np.zeros_like(s2)


def _as_1d_sv(singular_values) -> np.ndarray:
    s = np.asarray(singular_values.detach().cpu() if isinstance(singular_values, Tensor)
                   else singular_values, dtype=np.float64)
    if s.ndim != 1:
        raise ShapeError(f"singular values must be 1-D [K], got shape {list(s.shape)}.")
    if (s < 0).any():
        raise ShapeError("singular values must be non-negative.")
    return s


def effective_rank(singular_values) -> float:
    """Roy & Vetterli's effective rank exp(−Σ p_i ln p_i), p_i = σ_i / Σσ (0 for an all-zero input).

    Args:
        singular_values: ``[K]`` non-negative (ndarray or Tensor).

    Example:
        >>> round(effective_rank([2.0, 2.0, 2.0, 0.0]), 12)
        3.0
    """
    s = _as_1d_sv(singular_values)
    tot = s.sum()
    if not np.isfinite(tot):
        return float("nan")
    if tot == 0:
        return 0.0
    p = s[s > 0] / tot
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(singular_values) -> float:
    """(Σσ²)² / Σσ⁴ of singular values σ (0 for an all-zero input).

    Args:
        singular_values: ``[K]`` non-negative (ndarray or Tensor).

    Example:
        >>> participation_ratio([1.0, 1.0, 0.0])
        2.0
    """
    s = _as_1d_sv(singular_values)
    if not np.isfinite(s).all():
        return float("nan")
    # Scale first: σ⁴ overflows float64 for σ > 1e77 and underflows for σ < 1e-77.
    m = s.max() if s.size else 0.0
    if m == 0:
        return 0.0
    s2 = (s / m) ** 2
    return float(s2.sum() ** 2 / (s2 ** 2).sum())


def hidden_spectrum(states: Union[Tensor, np.ndarray], *, center: bool = True) -> HiddenSpectrum:
    """Singular values of the hidden-state matrix ``[samples·time, H]``, effective rank, PR.

    Args:
        states: ``[T, B, H]`` (time-major, as the estimators take) or ``[M, H]``; Tensor or ndarray.
            Every leading axis is flattened into rows; only the last (features) is kept.
        center: Subtract the mean state over all rows first (PCA of the states); ``False`` keeps
            the mean direction, which then usually dominates σ₁.

    Returns:
        :class:`HiddenSpectrum`, computed in float64. Non-finite states give NaN fields and a
        :class:`~gradscope.errors.NonFiniteWarning`.

    Raises:
        ShapeError: ``states`` is not 2-D or 3-D, is empty, or is not floating point.

    Example:
        >>> X = np.zeros((10, 4)); X[:5, 0] = 1.0; X[5:, 1] = 1.0
        >>> hs = hidden_spectrum(X, center=False)
        >>> hs.singular_values.round(4), hs.effective_rank, hs.participation_ratio
        (array([2.2361, 2.2361, 0.    , 0.    ]), 2.0, 2.0)
    """
    if isinstance(states, Tensor):
        if not torch.is_floating_point(states):
            raise ShapeError(f"hidden_spectrum: states must be floating point, got {states.dtype}.")
        X = states.detach().cpu().to(torch.float64).numpy()
    else:
        X = np.asarray(states)
        if not np.issubdtype(X.dtype, np.floating):
            raise ShapeError(f"hidden_spectrum: states must be floating point, got {X.dtype}.")
        X = X.astype(np.float64, copy=False)
    if X.ndim not in (2, 3):
        raise ShapeError(f"hidden_spectrum: states must be [T, B, H] or [M, H], got shape "
                         f"{list(X.shape)}.")
    X = X.reshape(-1, X.shape[-1])
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ShapeError(f"hidden_spectrum: states is empty: got {list(X.shape)} after flattening "
                         f"to [samples·time, H].")
    if not np.isfinite(X).all():
        rows = np.nonzero(~np.isfinite(X).all(axis=1))[0]
        warnings.warn(f"hidden_spectrum: {len(rows)} of {X.shape[0]} state rows hold NaN or inf "
                      f"(first at row {rows[0]}); the spectrum is NaN.", NonFiniteWarning,
                      stacklevel=2)
        k = min(X.shape)
        return HiddenSpectrum(np.full(k, np.nan), float("nan"), float("nan"), X.shape[0])
    if center:
        X = X - X.mean(axis=0, keepdims=True)
    s = np.linalg.svd(X, compute_uv=False)
    return HiddenSpectrum(singular_values=s, effective_rank=effective_rank(s),
                          participation_ratio=participation_ratio(s), n_samples=int(X.shape[0]))
