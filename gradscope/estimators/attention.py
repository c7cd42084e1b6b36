"""Attention measures: pure functions of attention probabilities, token representations, weights.

Index letters: B samples, H heads, T query positions, S key positions, P tokens, E features,
d features per head.

- :func:`normalized_entropy` — per head, the attention entropy of each query row normalised by
  ln(its number of attended keys): 1 for uniform attention, 0 for one-hot (Zhai et al. 2023).
- :func:`rank_residual` — rank-collapse residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F (Dong et al. 2021).
- :func:`token_cosine` — mean cosine similarity of distinct token pairs.
- :func:`qk_spectral_norms` — per head, ‖scale · W_{Q,h}ᵀ W_{K,h}‖₂ by power iteration.

:func:`entropy_sums` and :func:`token_sums` return the sums behind the first three, so that the
attention capture can accumulate them over chunks of query rows and over calls on the device and
divide once on the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["normalized_entropy", "entropy_sums", "rank_residual", "token_cosine", "token_sums",
           "qk_spectral_norms"]


def normalized_entropy(probs: Tensor, allowed: Optional[Tensor] = None,
                       query_valid: Optional[Tensor] = None) -> Tensor:
    """Per-head attention entropy, each query row normalised by ln(its number of attended keys).

    Row i of head h has entropy −Σ_j A_ij ln A_ij over the keys it may attend; divided by
    ln n_i it is 1 for uniform attention and 0 for one-hot attention. Rows with fewer than two
    attended keys (the first row of causal attention) and invalid query rows are left out; the
    result is the mean over samples and the remaining rows.

    Args:
        probs: ``[B, H, T, S]`` attention probabilities (rows sum to 1 over attended keys).
        allowed: bool, broadcastable to ``probs``: which keys each row may attend (default all).
        query_valid: bool ``[B, T]``: rows to include (default all).

    Returns:
        ``[H]`` float tensor (NaN for a head without any row to average).

    Example:
        >>> normalized_entropy(torch.full((1, 2, 3, 4), 0.25))
        tensor([1., 1.])
    """
    s, c = entropy_sums(probs.float() if probs.dtype != torch.float64 else probs, allowed, query_valid)
    return s / c.where(c > 0, torch.full_like(c, float("nan")))


def entropy_sums(probs: Tensor, allowed: Optional[Tensor] = None,
                 query_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per head, (Σ normalised row entropy, number of rows counted): the sums behind
    :func:`normalized_entropy`, which is their ratio.

    Args:
        probs: ``[B, H, T, S]`` attention probabilities, in the dtype the sums should have.
        allowed: bool, broadcastable to ``probs``: which keys each row may attend (default all).
        query_valid: bool ``[B, T]``: rows to include (default all).

    Returns:
        (``[H]``, ``[H]``), both in ``probs``' dtype, on its device.

    Example:
        >>> causal = torch.ones(3, 3, dtype=torch.bool).tril()
        >>> entropy_sums(causal / causal.sum(-1, keepdim=True)[None, None], causal)
        (tensor([2.]), tensor([2.]))
    """
    B, H, T, S = probs.shape
    if allowed is None:
        allowed = torch.ones(1, 1, 1, S, dtype=torch.bool, device=probs.device)
    ent = torch.special.entr(probs).masked_fill(~allowed, 0).sum(-1)          # [B, H, T]
    n = allowed.sum(-1).expand(B, H, T)
    ok = n >= 2
    if query_valid is not None:
        ok = ok & query_valid[:, None, :]
    val = torch.where(ok, ent / n.clamp(min=2).to(ent.dtype).log(), torch.zeros_like(ent))
    return val.sum((0, 2)), ok.sum((0, 2)).to(ent.dtype)


def token_sums(X: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(Σ_b residual_b, Σ_b mean-cosine_b, number of samples counted): the sums behind
    :func:`rank_residual` and :func:`token_cosine`.

    A sample counts when it has at least two valid tokens and a nonzero norm; its mean cosine is 0
    when fewer than two of its tokens are nonzero vectors.

    Args:
        X: ``[B, P, E]`` token representations (computed in float32 unless float64).
        valid: bool ``[B, P]``: tokens to include (padding excluded); default all.

    Returns:
        Three scalar tensors on ``X``'s device.

    Example:
        >>> [round(float(v), 4) for v in token_sums(torch.tensor([[[1., 0.], [0., 1.]]]))]
        [0.7071, 0.0, 1.0]
    """
    X = X.float() if X.dtype not in (torch.float32, torch.float64) else X
    B, P, _ = X.shape
    w = torch.ones(B, P, 1, dtype=X.dtype, device=X.device) if valid is None else valid[..., None].to(X.dtype)
    n = w.sum(1)                                                               # [B, 1]
    mean = (X * w).sum(1, keepdim=True) / n.clamp(min=1)[:, None]
    num = ((X - mean).pow(2) * w).sum((1, 2))
    den = (X.pow(2) * w).sum((1, 2))
    ok = (n[:, 0] >= 2) & (den > 0)
    res = torch.where(ok, (num / den.where(den > 0, torch.ones_like(den))).sqrt(), torch.zeros_like(den))
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    U = X / norms.where(norms > 0, torch.ones_like(norms)) * w
    s = U.sum(1).pow(2).sum(-1)                                                # ‖Σ u_i‖²
    k = (w[..., 0] * (norms[..., 0] > 0)).sum(1)                               # unit vectors counted
    cos = torch.where(ok & (k >= 2), (s - k) / (k * (k - 1)).clamp(min=1), torch.zeros_like(s))
    return res.sum(), cos.sum(), ok.sum().to(X.dtype)


def rank_residual(X: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Rank-collapse residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F per sample, averaged (Dong et al. 2021).

    x̄ is the mean token of each sample (the Frobenius-nearest rank-one matrix of the form 1xᵀ);
    the residual is 0 when every token is the same vector.

    Args:
        X: ``[B, P, E]`` token representations.
        valid: bool ``[B, P]``: tokens to include (padding excluded).

    Returns:
        A scalar tensor on ``X``'s device (NaN when no sample has two valid tokens).

    Example:
        >>> float(rank_residual(torch.ones(2, 5, 3)))
        0.0
    """
    r, _, n = token_sums(X, valid)
    return _mean_or_nan(r, n)


def token_cosine(X: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean cosine similarity of distinct token pairs of each sample, averaged over samples.

    Args:
        X: ``[B, P, E]`` token representations.
        valid: bool ``[B, P]``: tokens to include (padding excluded).

    Returns:
        A scalar tensor on ``X``'s device (NaN when no sample has two valid tokens).

    Example:
        >>> round(float(token_cosine(torch.ones(1, 4, 3))), 6)
        1.0
    """
    _, c, n = token_sums(X, valid)
    return _mean_or_nan(c, n)


def _mean_or_nan(total: Tensor, n: Tensor) -> Tensor:
    """total / n, NaN where n = 0; on their device, without a host synchronisation."""
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


@torch.no_grad()
def qk_spectral_norms(w_q: Tensor, w_k: Tensor, heads: int, scale: float = 1.0,
                      v0: Optional[Tensor] = None, iters: int = 30) -> Tuple[Tensor, Tensor]:
    """Per head, ‖scale · W_{Q,h}ᵀ W_{K,h}‖₂ by power iteration on MᵀM (batched over heads).

    Args:
        w_q: ``[H·d, E]`` query weight (PyTorch ``[out, in]``), head h in rows h·d … (h+1)·d.
        w_k: ``[H_k·d, E_k]`` key weight; with fewer key heads (grouped-query attention) query head
            h uses key head h // (H / H_k).
        heads: H.
        scale: the logit scale (1/√d for standard attention).
        v0: ``[H, E_k]`` start vectors (warm start); default a fixed random start.
        iters: power iterations (a warm start needs few).

    Returns:
        (``[H]`` spectral norms, ``[H, E_k]`` vectors to warm-start the next call).

    Example:
        >>> w = torch.eye(4)
        >>> qk_spectral_norms(w, 2 * w, heads=2)[0]
        tensor([2., 2.])
    """
    d = w_q.shape[0] // heads
    A = w_q.reshape(heads, d, w_q.shape[1])
    hk = w_k.shape[0] // d
    Bk = w_k.reshape(hk, d, w_k.shape[1])
    if hk != heads:
        Bk = Bk.repeat_interleave(heads // hk, dim=0)
    A = A.float() if A.dtype not in (torch.float32, torch.float64) else A
    Bk = Bk.to(A.dtype)
    if v0 is None or v0.shape != (heads, Bk.shape[2]) or v0.dtype != A.dtype:
        g = torch.Generator().manual_seed(0)
        v0 = torch.randn(heads, Bk.shape[2], generator=g, dtype=torch.float64).to(A)
    v = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-30)
    for _ in range(iters):
        mv = torch.einsum("hde,hd->he", A, torch.einsum("hde,he->hd", Bk, v))        # M v
        v = torch.einsum("hde,hd->he", Bk, torch.einsum("hde,he->hd", A, mv))        # Mᵀ M v
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-30)
    sigma = torch.linalg.vector_norm(torch.einsum("hde,hd->he", A, torch.einsum("hde,he->hd", Bk, v)), dim=-1)
    return sigma * abs(scale), v
