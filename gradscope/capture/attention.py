"""Attention sites: gradient flow through depth and position, entropy, rank collapse.

Sites. An *attention module* is the module that computes softmax(q kᵀ · scale + mask) v:
``nn.MultiheadAttention``, a Hugging Face attention module (``BertSelfAttention``,
``GPT2Attention``, …) or a user module whose class name says attention (``CausalSelfAttention``)
or that is named in ``watch(sites=[...])``; when such modules nest, the innermost counts. The
*block* of an attention module is its nearest ancestor that is an element of an ``nn.ModuleList``
or ``nn.Sequential`` (``encoder.layers.3``, ``bert.encoder.layer.0``, ``transformer.h.5``), or the
attention module itself when there is none. Blocks are gradscope's attention sites (kind
``"attention"``); the container is their *stack* and the index in it their depth ℓ. A decoder block
with self- and cross-attention is one site with two attention modules; the first is its primary.

Measures per scheduled step (index letters: S recorded steps, L blocks of a stack, P positions,
H heads, B samples):

* depth flow ‖∂L/∂x_{ℓ,p}‖: the total gradient reaching the *input* of block ℓ at position p
  (Frobenius over samples and features, padding positions of each sample left out) — the site's
  ``grad_norms`` ``[S, P]`` and, stacked, ``rec.depth_grad_norms(stack)`` ``[S, L, P]``;
* per head, the attention entropy normalised by ln(number of attended keys) of every query row,
  averaged over samples and non-padding query rows: 1 for uniform attention, 0 for one-hot;
* rank-collapse residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F and mean pairwise token cosine of the block output
  (per sample over its non-padding tokens, averaged over samples);
* ‖∇W_Q‖, ‖∇W_K‖, ‖∇W_V‖ of the primary attention module and, per head, the spectral norm of the
  logit bilinear form scale · W_{Q,h}ᵀ W_{K,h} (PyTorch's ``[out, in]`` weights; Zhai et al. write
  it W_Q W_Kᵀ) by power iteration warm-started from the previous step.

How the probabilities are obtained. During a scheduled pass, and only inside attention modules, a
``TorchFunctionMode`` notes the calls the module makes to ``F.multi_head_attention_forward``,
``F.scaled_dot_product_attention`` and ``softmax``. From the first two gradscope recomputes the
probabilities with the module's own projections, masks and scale (so ``need_weights=False`` and
fused SDPA kernels are covered); from a softmax (eager attention) it reads them. The mode only
observes: every call runs as it would unwatched. Probabilities are computed in chunks of query rows
so that long sequences never materialise all B·H·T·S scores at once.

Depth Jacobians (probe): the blocks of a stack, in eval mode and with the call arguments of the
probed batch (at most two samples), form a step x_{ℓ+1} = block_ℓ(x_ℓ) over depth;
``jacobian_norms`` gives the RMS gain ‖∂x_L/∂x_{L−k}‖_F / √(P·E) = √(mean σᵢ²) for every k (exact
up to P·E = 512, else estimated from 64 random probes, relative s.d. ≈ 18 %). The RMS gain rather
than the spectral norm: residual blocks have nearly flat spectra, on which power/subspace
iteration converges slowly and a dense SVD of a P·E × P·E matrix per lag would dominate the probe. Key/value caches are removed from the arguments so that re-running a block never
extends the user's cache.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import _hf
from ._forwards import PatchedForward, remove_leaf_hooks
from .patching import ForwardHandle, remove_all, swap_forward
from ._norms import norm as _norm, wide as _wide
from .collector import AttentionKey, Collector, SiteKey
from .sites import FUSED_TYPES, SiteSpec, flatten_tensors

__all__ = ["normalized_entropy", "rank_residual", "token_cosine", "qk_spectral_norms",
           "recompute_probabilities", "find_attention", "looks_like_attention", "AttentionLayout",
           "AttentionCapture", "MASKED_LOGIT"]

#: A score at or below this (after the additive mask) counts as masked: it covers -inf, finfo.min,
#: -1e9 and the -10000 of older BERT code, while ALiBi-style biases stay attended.
MASKED_LOGIT = -5e3
_CHUNK_ELEMENTS = 1 << 22        # scores materialised at once when recomputing probabilities
_POWER_COLD, _POWER_WARM = 30, 3  # power iterations: first measurement, warm-started later ones

_MHA_FN = F.multi_head_attention_forward
_SDPA_FN = F.scaled_dot_product_attention
_SOFTMAX_FNS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_SIG = inspect.signature(_MHA_FN)
_ATTN_RE = re.compile(r"attention|attn", re.I)
_HIDDEN_KEYS = ("hidden_states", "src", "tgt", "x", "query", "input", "inputs", "inputs_embeds")
_Q_NAMES = ("query", "q_proj", "q", "q_lin", "to_q", "wq", "w_q", "W_q", "query_proj", "q_linear")
_K_NAMES = ("key", "k_proj", "k", "k_lin", "to_k", "wk", "w_k", "W_k", "key_proj", "k_linear")
_V_NAMES = ("value", "v_proj", "v", "v_lin", "to_v", "wv", "w_v", "W_v", "value_proj", "v_linear")
_QKV_NAMES = ("c_attn", "qkv", "qkv_proj", "Wqkv", "in_proj", "to_qkv", "att_proj")


# =============================================================================== pure measures
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
    s, c = _entropy_sums(probs.float() if probs.dtype != torch.float64 else probs, allowed, query_valid)
    return s / c.where(c > 0, torch.full_like(c, float("nan")))


def _entropy_sums(probs: Tensor, allowed: Optional[Tensor], query_valid: Optional[Tensor]):
    """(Σ normalised row entropy, number of rows) per head: ``[H]``, ``[H]``."""
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


def _token_sums(X: Tensor, valid: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(Σ_b residual_b, Σ_b mean-cosine_b, number of samples) for ``X`` ``[B, P, E]``."""
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

    Example:
        >>> float(rank_residual(torch.ones(2, 5, 3)))
        0.0
    """
    r, _, n = _token_sums(X, valid)
    return _mean_or_nan(r, n)


def token_cosine(X: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean cosine similarity of distinct token pairs of each sample, averaged over samples.

    Example:
        >>> round(float(token_cosine(torch.ones(1, 4, 3))), 6)
        1.0
    """
    _, c, n = _token_sums(X, valid)
    return _mean_or_nan(c, n)


def _mean_or_nan(total: Tensor, n: Tensor) -> Tensor:
    """total / n, NaN where n = 0; on their device, without a host synchronisation."""
    return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


@torch.no_grad()
def qk_spectral_norms(w_q: Tensor, w_k: Tensor, heads: int, scale: float = 1.0,
                      v0: Optional[Tensor] = None, iters: int = _POWER_COLD) -> Tuple[Tensor, Tensor]:
    """Per head, ‖scale · W_{Q,h}ᵀ W_{K,h}‖₂ by power iteration on MᵀM (batched over heads).

    Args:
        w_q: ``[H·d, E]`` query weight (PyTorch ``[out, in]``), head h in rows h·d … (h+1)·d.
        w_k: ``[H_k·d, E_k]`` key weight; with fewer key heads (grouped-query attention) query head
            h uses key head h // (H / H_k).
        heads: H.
        scale: the logit scale (1/√d for standard attention).
        v0: ``[H, E_k]`` start vectors (warm start); default a fixed random start.
        iters: power iterations.

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


# =============================================================================== scores
def _rows(m: Tensor, i0: int, i1: int) -> Tensor:
    return m if m.shape[-2] == 1 else m[..., i0:i1, :]


def _as4d(m: Tensor) -> Tensor:
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


class _Scores:
    """The attention scores of one call, recomputable in chunks of query rows.

    ``masks`` are ``(tensor broadcastable to [B, H, T, S], kind)`` with kind ``"allow"`` (bool,
    True = may attend: SDPA), ``"deny"`` (bool, True = masked: nn.MultiheadAttention) or ``"add"``
    (float, added to the scores; ≤ MASKED_LOGIT counts as masked).
    """

    def __init__(self, q: Optional[Tensor], k: Optional[Tensor], scale: float, masks=(), causal=False,
                 probs: Optional[Tensor] = None, logits: Optional[Tensor] = None, positions: Optional[int] = None):
        self.q, self.k, self.scale = q, k, scale
        self.masks = [(_as4d(m), kind) for m, kind in masks]
        self.causal = causal
        self.probs, self.logits = probs, logits
        ref = probs if probs is not None else q
        self.B, self.H, self.T = ref.shape[0], ref.shape[1], ref.shape[2]
        self.S = probs.shape[3] if probs is not None else k.shape[2]
        self.positions = self.S if positions is None else positions  # keys that are sequence positions
        self.device = ref.device

    def allowed(self, i0: int, i1: int) -> Tensor:
        if self.probs is not None:
            return _rows(self.logits, i0, i1) > MASKED_LOGIT
        a = torch.ones(1, 1, i1 - i0, self.S, dtype=torch.bool, device=self.device)
        for m, kind in self.masks:
            m = _rows(m, i0, i1)
            if kind == "allow":
                a = a & m
            elif kind == "deny":
                a = a & ~m
            else:
                a = a & (m > MASKED_LOGIT)
        if self.causal:
            r = torch.arange(i0, i1, device=self.device)[:, None]
            a = a & (torch.arange(self.S, device=self.device)[None, :] <= r)
        return a

    def probs_rows(self, i0: int, i1: int) -> Tuple[Tensor, Tensor]:
        allowed = self.allowed(i0, i1)
        if self.probs is not None:
            p = _rows(self.probs, i0, i1)
            return (p.float() if p.dtype not in (torch.float32, torch.float64) else p), allowed
        q = self.q[:, :, i0:i1]
        s = torch.matmul(q * self.scale, self.k.transpose(-1, -2))
        for m, kind in self.masks:
            if kind == "add":
                s = s + _rows(m, i0, i1).to(s.dtype)
        s = s.masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, dim=-1).nan_to_num(0.0), allowed

    def chunk(self) -> int:
        return max(1, _CHUNK_ELEMENTS // max(1, self.B * self.H * self.S))

    def key_padding(self) -> Tensor:
        """bool ``[B, positions]``: keys no query of any head may attend (padding).

        Always a tensor (all False without padding): asking whether any key is padding would
        synchronise with the device once per attention module and step. Every use treats an
        all-False mask exactly as no mask.
        """
        seen = torch.zeros(self.B, self.S, dtype=torch.bool, device=self.device)
        c = self.chunk()
        for i0 in range(0, self.T, c):
            a = self.allowed(i0, min(self.T, i0 + c))
            seen |= a.any(dim=2).any(dim=1).expand(self.B, self.S)
        return ~seen[:, :self.positions]

    def entropy_sums(self, pad: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        qv = ~pad if pad is not None and self.T == self.positions else None
        tot = torch.zeros(self.H, device=self.device)
        cnt = torch.zeros(self.H, device=self.device)
        c = self.chunk()
        for i0 in range(0, self.T, c):
            i1 = min(self.T, i0 + c)
            p, a = self.probs_rows(i0, i1)
            s, n = _entropy_sums(p, a, None if qv is None else qv[:, i0:i1])
            tot += s.float()
            cnt += n.float()
        return tot, cnt

    def probabilities(self) -> Tensor:
        return self.probs_rows(0, self.T)[0]


def _scores_from_sdpa(args, kwargs) -> _Scores:
    a = dict(zip(_SDPA_NAMES, args))
    a.update(kwargs)
    q, k = a["query"], a["key"]
    if q.dim() == 3:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    elif q.dim() > 4:
        q, k = q.flatten(0, q.dim() - 4), k.flatten(0, k.dim() - 4)
    q = q.detach()
    k = k.detach()
    if q.dtype not in (torch.float32, torch.float64):
        q, k = q.float(), k.float()
    if k.shape[1] != q.shape[1] and q.shape[1] % k.shape[1] == 0:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    masks = []
    m = a.get("attn_mask")
    if m is not None:
        m = m.detach()
        masks.append((m, "allow") if m.dtype == torch.bool else (m.float() if m.dtype != torch.float64 else m, "add"))
    return _Scores(q, k, scale, masks, causal=bool(a.get("is_causal", False)))


def _scores_from_mha(args, kwargs) -> _Scores:
    b = _MHA_SIG.bind(*args, **kwargs)
    b.apply_defaults()
    a = b.arguments
    query, key = a["query"].detach(), a["key"].detach()
    H = int(a["num_heads"])
    if query.dim() == 2:
        query, key = query.unsqueeze(1), key.unsqueeze(1)
    T, B, E = query.shape
    hd = E // H
    w, bias = a["in_proj_weight"], a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        wq, wk = a["q_proj_weight"], a["k_proj_weight"]
    else:
        wq, wk = w[:E], w[E:2 * E]
    bq = bk = None
    if bias is not None:
        bq, bk = bias[:E], bias[E:2 * E]
    dt = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    cast = lambda t: None if t is None else t.detach().to(dt)  # noqa: E731
    q = F.linear(query.to(dt), cast(wq), cast(bq))                                  # [T, B, E]
    q = q.reshape(T, B * H, hd).transpose(0, 1).reshape(B, H, T, hd)
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    masks: List[Tuple[Tensor, str]] = []
    extra = 0
    if a["static_k"] is not None:
        k = a["static_k"].detach().to(dt).reshape(B, H, -1, hd)
    else:
        k = F.linear(key.to(dt), cast(wk), cast(bk))                                # [S, B, E]
        if a["bias_k"] is not None:
            k = torch.cat([k, a["bias_k"].detach().to(dt).repeat(1, B, 1)])
            extra += 1
        S0 = k.shape[0]
        k = k.reshape(S0, B * H, hd).transpose(0, 1).reshape(B, H, S0, hd)
    positions = k.shape[2] - extra
    if a["add_zero_attn"]:
        k = torch.cat([k, torch.zeros(B, H, 1, hd, dtype=dt, device=k.device)], dim=2)
        extra += 1
    S = k.shape[2]

    def fit(m: Tensor) -> Tensor:
        m = m.detach()
        if m.shape[-1] < S:  # bias_k / add_zero_attn columns are attended by everyone
            m = F.pad(m, (0, S - m.shape[-1]), value=False if m.dtype == torch.bool else 0.0)
        return m

    if attn_mask is not None:
        m = fit(attn_mask)
        m = m.reshape(B, H, T, S) if m.dim() == 3 else m
        masks.append((m, "deny") if m.dtype == torch.bool else (m.to(dt), "add"))
    if kpm is not None:
        m = fit(kpm).reshape(B, 1, 1, S)
        masks.append((m, "deny") if m.dtype == torch.bool else (m.to(dt), "add"))
    return _Scores(q, k, 1.0 / math.sqrt(hd), masks, positions=positions)


def _scores_from_softmax(args, kwargs, out: Tensor, heads: Optional[int]) -> Optional[_Scores]:
    x = args[0] if args else kwargs.get("input")
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() < 3:
        return None
    if dim is not None and dim not in (-1, x.dim() - 1):
        return None
    x, p = x.detach(), out.detach()
    if x.dim() == 3:
        if heads and x.shape[0] % heads == 0:
            x, p = x.reshape(-1, heads, *x.shape[1:]), p.reshape(-1, heads, *p.shape[1:])
        else:
            x, p = x.unsqueeze(1), p.unsqueeze(1)
    elif x.dim() > 4:
        x, p = x.flatten(0, x.dim() - 4), p.flatten(0, p.dim() - 4)
    return _Scores(None, None, 1.0, probs=p, logits=x)


def _scores(event, heads: Optional[int]) -> Optional[_Scores]:
    kind, args, kwargs, out = event
    if kind == "mha":
        return _scores_from_mha(args, kwargs)
    if kind == "sdpa":
        return _scores_from_sdpa(args, kwargs)
    return _scores_from_softmax(args, kwargs, out, heads)


class _Interceptor(TorchFunctionMode):
    """Observes, inside one attention module, the calls that compute attention. Changes nothing."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _MHA_FN:
            self.events.append(("mha", args, kwargs, None))
        elif func is _SDPA_FN:
            self.events.append(("sdpa", args, kwargs, None))
        elif func in _SOFTMAX_FNS:
            self.events.append(("softmax", args, kwargs, out))
        return out


def _pick(events: list) -> list:
    """The events that compute attention: MHA/SDPA calls, else softmaxes over ≥ 3-D scores."""
    hard = [e for e in events if e[0] in ("mha", "sdpa")]
    if hard:
        return hard
    return [e for e in events if e[0] == "softmax" and isinstance(e[3], Tensor) and e[3].dim() >= 3]


@torch.no_grad()
def recompute_probabilities(module: nn.Module, *args, **kwargs) -> Tensor:
    """Run ``module(*args, **kwargs)`` and return the attention probabilities gradscope measures.

    The probabilities are recomputed from the query, key, mask and scale the module passed to
    ``F.multi_head_attention_forward`` / ``F.scaled_dot_product_attention``, or read from its
    softmax (eager attention), exactly as during a watched step. Dropout is not applied (these are
    the probabilities before dropout).

    Returns:
        ``[B, H, T, S]`` (the first attention computation of the call).

    Raises:
        GradscopeError: the module computed no attention gradscope can see.

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(1, 5, 8)
        >>> p = recompute_probabilities(mha, x, x, x, need_weights=False)
        >>> torch.allclose(p, mha(x, x, x, average_attn_weights=False)[1], atol=1e-6)
        True
    """
    from ..errors import GradscopeError

    events: list = []
    with _Interceptor(events):
        module(*args, **kwargs)
    ev = _pick(events)
    if not ev:
        raise GradscopeError(
            f"{type(module).__name__} made no call to F.multi_head_attention_forward, "
            f"F.scaled_dot_product_attention or softmax over ≥ 3-D scores, so gradscope cannot see its "
            f"attention probabilities (a custom kernel?).")
    sc = _scores(ev[0], _static_heads(module))
    return sc.probabilities()


# =============================================================================== discovery
def looks_like_attention(m: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or a module with parameters whose class name says attention."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    if isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential) + FUSED_TYPES):
        return False
    name = type(m).__name__
    if not _ATTN_RE.search(name) or name.endswith(("Output", "Outputs", "Mask")):
        return False
    return next(m.parameters(), None) is not None


def _static_heads(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.MultiheadAttention):
        return m.num_heads
    if _hf.is_hf(m):
        return _hf.hf_heads(m)
    for attr in ("num_heads", "n_head", "n_heads", "nhead", "heads", "num_attention_heads"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class QKV:
    """Where W_Q, W_K, W_V of an attention module live: ``(param name, param, dim, start, stop)``;
    the matrix is ``param[start:stop]`` (dim 0) or ``param[:, start:stop].T`` (dim 1, HF Conv1D)."""

    parts: Dict[str, Tuple[str, nn.Parameter, int, int, int]]

    def matrix(self, which: str) -> Tensor:
        _, p, dim, a, b = self.parts[which]
        return (p[a:b] if dim == 0 else p[:, a:b].T).detach()


def _linear_like(m: Optional[nn.Module]):
    """(weight, dim holding the outputs) of a Linear or HF Conv1D, else None."""
    if m is None:
        return None
    w = getattr(m, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    return (w, 1) if type(m).__name__ == "Conv1D" else (w, 0)


def qkv_of(m: nn.Module, prefix: str) -> Optional[QKV]:
    """W_Q, W_K, W_V of an attention module, or None when they cannot be told apart."""
    parts: Dict[str, Tuple] = {}
    if isinstance(m, nn.MultiheadAttention):
        E = m.embed_dim
        if m.in_proj_weight is not None:
            for i, w in enumerate("qkv"):
                parts[w] = (prefix + "in_proj_weight", m.in_proj_weight, 0, i * E, (i + 1) * E)
        else:
            for w in "qkv":
                p = getattr(m, f"{w}_proj_weight")
                parts[w] = (prefix + f"{w}_proj_weight", p, 0, 0, p.shape[0])
        return QKV(parts)
    children = dict(m.named_children())
    for which, names in (("q", _Q_NAMES), ("k", _K_NAMES), ("v", _V_NAMES)):
        for n in names:
            lw = _linear_like(children.get(n))
            if lw is not None:
                w, dim = lw
                parts[which] = (f"{prefix}{n}.weight", w, dim, 0, w.shape[dim])
                break
    if len(parts) == 3:
        return QKV(parts)
    fused = [(n, _linear_like(children.get(n))) for n in _QKV_NAMES]
    fused = [(n, lw) for n, lw in fused if lw is not None]
    q_attn = _linear_like(children.get("q_attn"))
    if q_attn is not None and fused:  # GPT-2 cross-attention: q_attn (q) and c_attn (k, v)
        (n, (w, dim)), (wq, dq) = fused[0], q_attn
        if w.shape[dim] % 2 == 0:
            h = w.shape[dim] // 2
            return QKV({"q": (f"{prefix}q_attn.weight", wq, dq, 0, wq.shape[dq]),
                        "k": (f"{prefix}{n}.weight", w, dim, 0, h),
                        "v": (f"{prefix}{n}.weight", w, dim, h, 2 * h)})
        return None
    if fused and not parts:
        n, (w, dim) = fused[0]
        if w.shape[dim] % 3 == 0:  # [q; k; v] stacked along the outputs (nanoGPT, GPT-2, ViT)
            t = w.shape[dim] // 3
            return QKV({which: (f"{prefix}{n}.weight", w, dim, i * t, (i + 1) * t)
                        for i, which in enumerate("qkv")})
    return None


@dataclass
class AttnModule:
    name: str
    module: nn.Module
    block: str
    rel: str            # name relative to the block ("" when the block is the module)
    origin: str         # "torch" | "hf" | "user"
    heads: Optional[int]
    batch_first: Optional[bool]
    qkv: Optional[QKV]


@dataclass
class Block:
    site: str
    name: str
    module: nn.Module
    stack: str
    depth: int
    attn: List[str] = field(default_factory=list)
    norm_position: Optional[str] = None  # "pre" | "post" | "none" (no normalisation module)

    @property
    def primary(self) -> str:
        return self.attn[0]


def _norm_like(m: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, nn.LayerNorm) or ("Norm" in type(m).__name__ and not isinstance(m, _BatchNorm))


def _norm_position(block: nn.Module, attn_rel: str) -> Optional[str]:
    """"pre" when a normalisation module comes before the attention module in the block, "post"
    when one comes only after it, "none" without any (registration order, which BERT, GPT-2,
    nanoGPT and torch's layers follow; a block registering its modules in another order is
    misread)."""
    if isinstance(block, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return "pre" if block.norm_first else "post"
    seen_attn = False
    after = False
    for n, m in block.named_modules():
        if n == attn_rel or (attn_rel and n.startswith(attn_rel + ".")):
            seen_attn = True
            continue
        if _norm_like(m):
            if not seen_attn:
                return "pre"
            after = True
    return "post" if after else "none"


@dataclass
class AttentionLayout:
    """Attention modules, blocks (sites) and stacks of one model."""

    attn: Dict[str, AttnModule] = field(default_factory=dict)
    blocks: Dict[str, Block] = field(default_factory=dict)   # by block module name
    stacks: Dict[str, List[str]] = field(default_factory=dict)  # stack -> block names by depth

    def resolve(self, name: str) -> Optional[List[str]]:
        """Site names a ``sites=`` entry selects (a block, an attention module or a stack)."""
        L = self
        if name in L.blocks:
            return [L.blocks[name].site]
        if name in L.attn:
            return [L.blocks[L.attn[name].block].site]
        if name in L.stacks and name:
            return [L.blocks[b].site for b in L.stacks[name]]
        sites = {b.site: b for b in L.blocks.values()}
        if name in sites:
            return [name]
        return None

    def specs(self) -> List[SiteSpec]:
        out = []
        for stack, names in self.stacks.items():
            for b in names:
                blk = self.blocks[b]
                prim = self.attn[blk.primary]
                m = prim.module
                info = {"stack": stack, "depth": blk.depth, "num_layers": len(names),
                        "attention": [self.attn[a].name for a in blk.attn],
                        "module_type": type(blk.module).__name__,
                        "attention_type": type(m).__name__, "origin": prim.origin,
                        "heads": prim.heads, "norm_position": blk.norm_position,
                        "batch_first": prim.batch_first}
                if isinstance(m, nn.MultiheadAttention):
                    info["embed_dim"] = m.embed_dim
                out.append(SiteSpec(blk.site, blk.name, "attention", ("h",), layer=blk.depth, info=info))
        return out


def _origin(m: nn.Module) -> str:
    if _hf.is_hf(m):
        return "hf"
    return "torch" if type(m).__module__.startswith("torch.") else "user"


def find_attention(model: nn.Module, extra: Sequence[str] = ()) -> AttentionLayout:
    """Attention modules, their blocks and stacks; ``extra`` names user modules to treat as
    attention modules whatever their class name."""
    names = dict(model.named_modules())
    cands = [n for n, m in names.items() if looks_like_attention(m)] + [n for n in extra if n in names]
    cands = list(dict.fromkeys(cands))
    inner = [n for n in cands
             if not any(c != n and (n == "" or c.startswith(n + ".")) for c in cands)]
    # a module inside an attention module of a fused RNN/LSTM/GRU is never attention
    inner = [n for n in inner if not isinstance(names[n], FUSED_TYPES)]
    layout = AttentionLayout()
    members: Dict[str, List[Tuple[int, str]]] = {}
    for a in inner:
        parts = a.split(".") if a else []
        block, stack, index = a, a, 0
        for i in range(len(parts), 0, -1):
            parent = ".".join(parts[:i - 1])
            if isinstance(names[parent], (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:i])
                stack = parent
                index = list(names[parent]._modules).index(parts[i - 1])
                break
        else:  # no container: a torch Transformer layer around it is still its block
            for i in range(len(parts) - 1, -1, -1):
                anc = ".".join(parts[:i])
                if isinstance(names[anc], (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                    block = stack = anc
                    break
        m = names[a]
        rel = "" if a == block else (a[len(block) + 1:] if block else a)
        layout.attn[a] = AttnModule(a, m, block, rel, _origin(m), _static_heads(m),
                                    (m.batch_first if isinstance(m, nn.MultiheadAttention)
                                     else (True if _hf.is_hf(m) else None)),
                                    qkv_of(m, a + "." if a else ""))
        if block not in layout.blocks:
            site = block if block else "attention"
            layout.blocks[block] = Block(site, block, names[block], stack, 0)
            members.setdefault(stack, []).append((index, block))
        layout.blocks[block].attn.append(a)
    for stack, lst in members.items():
        lst.sort()
        layout.stacks[stack] = [b for _, b in lst]
        for depth, b in enumerate(layout.stacks[stack]):
            blk = layout.blocks[b]
            blk.depth = depth
            blk.norm_position = _norm_position(blk.module, layout.attn[blk.primary].rel)
    return layout


# =============================================================================== capture
def block_view(t: Tensor, batch_first: bool) -> Optional[Tensor]:
    """A block input/output as ``[B, P, features]``."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() < 2:
        return None
    if not batch_first:
        t = t.transpose(0, 1)
    return t.flatten(2) if t.dim() > 3 else t


def _hidden_index(args, kwargs) -> Optional[Tuple[str, Any]]:
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.is_floating_point():
            return ("a", i)
    for k in _HIDDEN_KEYS:
        v = kwargs.get(k)
        if isinstance(v, Tensor) and v.is_floating_point():
            return ("k", k)
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            return ("k", k)
    return None


def call_arg(args, kwargs, idx):
    """The argument at ``idx`` (``("a", position)`` or ``("k", name)``) of a recorded call."""
    return args[idx[1]] if idx[0] == "a" else kwargs[idx[1]]


def _replace(args, kwargs, old, new):
    """Every argument that *is* ``old`` becomes ``new`` (keeps q is k is v identities)."""
    return (tuple(new if a is old else a for a in args),
            {k: (new if v is old else v) for k, v in kwargs.items()})


class _PassState:
    """What the attention capture keeps for one scheduled forward pass."""

    __slots__ = ("vals", "keys", "pad", "shape", "calls", "qk_done")

    def __init__(self):
        self.vals: List[Tensor] = []
        self.keys: List[AttentionKey] = []
        self.pad: Dict[str, Optional[Tensor]] = {}
        self.shape: Dict[str, Tuple[int, int, int, int]] = {}
        self.calls: Dict[str, Dict[str, Any]] = {}
        self.qk_done: set = set()

    def push(self, key, value: Tensor):
        self.vals.append(value.detach().float() if value.dtype != torch.float64 else value.detach())
        self.keys.append(key)


class Host(Protocol):
    """What :class:`AttentionCapture` gets from the Scope that owns it, and all it uses of it."""

    model: nn.Module
    collector: Collector

    @property
    def closed(self) -> bool: ...

    def pass_now(self) -> Any:
        """The pass a module call belongs to (the forward in progress, or the pending pass a
        checkpoint recomputation inside backward belongs to), or None."""

    def is_current(self, p) -> bool:
        """Whether ``p`` is the forward pass in progress (not one recomputed inside backward)."""

    def claim(self, module: nn.Module) -> None:
        """Mark ``module`` as watched (a second watch on it is refused)."""

    def note(self, key, text: str) -> None:
        """A note for the Recording, once per ``key``."""


class AttentionCapture:
    """The Scope's attention part: owns its patched forwards and parameter hooks.

    Values are reduced on the device and added to the host's :class:`~.collector.Collector`, which
    copies them to the host together with every other value of the step (one transfer per device).
    """

    def __init__(self, host: Host, layout: AttentionLayout):
        self.host = host
        self.collector = host.collector
        self.layout = layout
        self.wanted_blocks: Dict[str, Block] = {}
        self.wanted_attn: Dict[str, AttnModule] = {}
        self._forward_handles: List[ForwardHandle] = []
        self._param_handles: List[Any] = []
        self._hooked_params: List[torch.Tensor] = []
        self._qk_v: Dict[str, Tensor] = {}
        self.latest_probe: Optional[Tuple[int, Dict, Dict]] = None
        self._vjp_root: Optional[Tensor] = None

    # ----------------------------------------------------------------- setup
    def install(self, wanted: Callable[[str], bool]) -> None:
        """Patch the forwards of the wanted blocks and their attention modules."""
        for bname, blk in self.layout.blocks.items():
            if not wanted(blk.site):
                continue
            self.wanted_blocks[bname] = blk
            for a in blk.attn:
                self.wanted_attn[a] = self.layout.attn[a]
        for name in list(self.wanted_blocks) + [a for a in self.wanted_attn if a not in self.wanted_blocks]:
            m = self.layout.blocks[name].module if name in self.wanted_blocks else self.layout.attn[name].module
            self._patch(m, name)

    def _patch(self, m: nn.Module, name: str) -> None:
        prev = m.__dict__.get("forward")
        fwd = prev if prev is not None else functools.partial(type(m).forward, m)
        ref = weakref.ref(self)

        def forward(*args, **kwargs):
            cap = ref()
            host = cap.host if cap is not None else None
            p = host.pass_now() if host is not None and not host.closed else None
            if p is None or not p.scheduled:
                return fwd(*args, **kwargs)
            if not torch.is_grad_enabled():
                if host.is_current(p):  # a reentrant checkpoint's first forward: measured when recomputed
                    p.nograd.add(name)
                return fwd(*args, **kwargs)
            if not host.is_current(p) and name not in p.nograd:
                # a non-reentrant checkpoint's recomputation: the first forward's graph is measured
                return fwd(*args, **kwargs)
            return cap._call(m, name, fwd, p, args, kwargs)

        # an object: copies of the model run unwatched; the signature is the module's own
        self._forward_handles.append(swap_forward(m, PatchedForward(forward, m, prev, fwd), restore=prev))
        self.host.claim(m)

    def start_pass(self, p) -> None:
        p.attn = _PassState()
        if self._param_handles:
            return
        seen = set()
        for a in self.wanted_attn.values():
            if a.qkv is None:
                continue
            blk = self.layout.blocks[a.block]
            by_param: Dict[int, List[Tuple[str, int, int, int]]] = {}
            params = {}
            for which, (_, prm, dim, s0, s1) in a.qkv.parts.items():
                by_param.setdefault(id(prm), []).append((which, dim, s0, s1))
                params[id(prm)] = prm
            for pid, slices in by_param.items():
                prm = params[pid]
                if not prm.requires_grad or (pid, a.name) in seen:
                    continue
                seen.add((pid, a.name))
                self._hooked_params.append(prm)
                self._param_handles.append(prm.register_hook(
                    functools.partial(self._on_qkv_grad, blk.site, a.rel if a.name != blk.primary else "",
                                      tuple(slices))))

    def _on_qkv_grad(self, site, rel, slices, grad):
        if self.host.closed or grad is None:  # None: an output of a multi-output node got no gradient
            return
        g = grad.detach()
        for which, dim, s0, s1 in slices:
            part = g[s0:s1] if dim == 0 else g[:, s0:s1]
            self.collector.add(AttentionKey(site, rel, f"grad_w{which}", "avg"), _norm(part))

    def end_step(self) -> None:
        remove_leaf_hooks(self._param_handles, self._hooked_params)
        self._param_handles, self._hooked_params = [], []

    def close(self) -> None:
        self.end_step()
        remove_all(self._forward_handles)

    # ---------------------------------------------------------------- forward
    def _fail(self, where: str, e: BaseException) -> None:
        self.host.note(("attention-error", where, type(e).__name__),
                         f"attention measure at {where!r} failed ({type(e).__name__}: {e}); the run itself "
                         f"is unaffected. Please report this with the model's class.")

    def _call(self, m, name, fwd, p, args, kwargs):
        st: _PassState = p.attn if p.attn is not None else _PassState()
        p.attn = st
        blk = self.wanted_blocks.get(name)
        att = self.wanted_attn.get(name)
        pre = None
        if blk is not None:
            try:
                args, kwargs, pre = self._block_pre(blk, p, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a measurement must never break the run
                self._fail(blk.site, e)
        if att is not None:
            events: list = []
            with _Interceptor(events):
                out = fwd(*args, **kwargs)
            try:
                with torch.no_grad():
                    self._attn_post(att, st, events)
            except Exception as e:  # noqa: BLE001
                self._fail(att.name or "attention", e)
        else:
            out = fwd(*args, **kwargs)
        if blk is not None and pre is not None:
            try:
                self._block_post(blk, p, st, pre, args, kwargs, out)
            except Exception as e:  # noqa: BLE001
                self._fail(blk.site, e)
        return out

    def _block_pre(self, blk: Block, p, args, kwargs):
        idx = _hidden_index(args, kwargs)
        if idx is None:
            return args, kwargs, None
        x = call_arg(args, kwargs, idx)
        sub = False
        if not x.requires_grad:
            # A private copy that requires grad, so the gradient at the stack's input is measured
            # too. Same values; the user's tensor is untouched; clone() keeps in-place ops legal.
            new = x.detach().requires_grad_(True).clone()
            args, kwargs = _replace(args, kwargs, x, new)
            x, sub = new, True
        return args, kwargs, {"idx": idx, "x": x, "sub": sub}

    def _layout(self, blk: Block, st: _PassState, x: Tensor) -> bool:
        """Whether the block's hidden tensor is batch-first."""
        prim = self.layout.attn[blk.primary]
        if isinstance(blk.module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return blk.module.self_attn.batch_first
        if prim.module is blk.module and prim.batch_first is not None:
            return prim.batch_first
        if prim.origin == "hf":
            return True
        shape = st.shape.get(blk.primary)
        if shape is not None and x.dim() >= 3:
            B, _, T, _ = shape
            if B != T:
                if tuple(x.shape[:2]) == (T, B):
                    return False
                if tuple(x.shape[:2]) == (B, T):
                    return True
        return prim.batch_first if prim.batch_first is not None else True

    def _block_post(self, blk: Block, p, st: _PassState, pre, args, kwargs, out) -> None:
        x = pre["x"]
        bf = self._layout(blk, st, x)
        xb = block_view(x, bf)
        if xb is None:
            return
        B, P = xb.shape[0], xb.shape[1]
        pad = st.pad.get(blk.primary)
        if pad is not None and tuple(pad.shape) != (B, P):
            pad = None
        site = blk.site
        p.seq_len[site] = max(p.seq_len.get(site, 0), P)
        valid = torch.full((P,), float(B), device=x.device) if pad is None else (~pad).sum(0).float()
        st.push(AttentionKey(site, "", "valid", "sum"), valid)
        if x.requires_grad:
            p.handles.append(x.register_hook(functools.partial(self._on_input_grad, site, bf, pad,
                                                               weakref.ref(x))))
        ys = [t for t in flatten_tensors(out) if t.is_floating_point() and t.dim() == x.dim()]
        y = ys[0] if ys else None
        if pre["sub"] and y is not None and y.requires_grad and x.grad_fn is not None:
            # probe() asks autograd only for parameter gradients, which never need the input's:
            # then one extra vector-Jacobian product through this block supplies it.
            # y is held by its own hook (a cycle broken when the pass's handles are removed): the
            # Python tensor may otherwise be gone by the time its gradient arrives
            p.handles.append(y.register_hook(functools.partial(self._vjp_input, y, x)))
        if y is not None:
            with torch.no_grad():
                yb = block_view(y.detach(), bf)
                if yb is not None and yb.shape[:2] == xb.shape[:2]:
                    r, c, n = _token_sums(yb, None if pad is None else ~pad)
                    st.push(AttentionKey(site, "", "rank_residual", "sum"), r)
                    st.push(AttentionKey(site, "", "rank_residual", "cnt"), n)
                    st.push(AttentionKey(site, "", "token_cosine", "sum"), c)
                    st.push(AttentionKey(site, "", "token_cosine", "cnt"), n)
        if p.probe:
            st.calls.setdefault(site, {"args": args, "kwargs": kwargs, "idx": pre["idx"], "x": x,
                                       "y": y, "bf": bf, "pad": pad})

    def _on_input_grad(self, site, bf, pad, xref, grad):
        if grad is None or self.host.closed or (self._vjp_root is not None and xref() is self._vjp_root):
            return  # the root of our own vector-Jacobian product: counted by the ordinary pass
        with torch.no_grad():
            g = block_view(grad.detach(), bf)
            if g is None:
                return
            g = g.to(_wide(g.device))   # float64 squares: a finite gradient keeps a finite norm
            sq = g.pow(2).sum(-1)
            if pad is not None and pad.shape == sq.shape:
                sq = sq.masked_fill(pad, 0)
            self.collector.add(SiteKey(site, "h"), sq.sum(0).sqrt())

    def _vjp_input(self, y, x, grad):
        if grad is None or self.host.closed or x.grad_fn is None:
            return
        if torch._C._will_engine_execute_node(x.grad_fn):
            return  # the ordinary backward reaches the input: its hook fires by itself
        # Hooks on y run again for this product (autograd applies them to grad_outputs): ours on
        # the next block's input is told to skip; a user's own hook on this tensor would see it twice.
        self._vjp_root = y
        try:
            torch.autograd.grad(y, x, grad, retain_graph=True, allow_unused=True)
        except RuntimeError:
            pass
        finally:
            self._vjp_root = None

    def _attn_post(self, att: AttnModule, st: _PassState, events: list) -> None:
        blk = self.layout.blocks[att.block]
        rel = "" if att.name == blk.primary else att.rel
        evs = _pick(events)
        if not evs:
            self.host.note(("attention-noprob", att.name),
                             f"attention module {att.name or type(att.module).__name__!r} "
                             f"({type(att.module).__name__}) made no call to F.multi_head_attention_forward, "
                             f"F.scaled_dot_product_attention or softmax that gradscope can see (a custom or "
                             f"flash kernel?), so its entropy and padding are not measured"
                             + self._hf_hint(att) + ".")
            return
        for ev in evs:
            sc = _scores(ev, att.heads)
            if sc is None:
                continue
            if att.name not in st.shape:
                pad = sc.key_padding()
                st.pad[att.name] = pad
                st.shape[att.name] = (sc.B, sc.H, sc.T, sc.S)
            pad = st.pad[att.name]
            if pad is not None and pad.shape[0] != sc.B:
                pad = None
            tot, cnt = sc.entropy_sums(pad)
            if att.heads is None:
                att.heads = sc.H
            st.push(AttentionKey(blk.site, rel, "attention_entropy", "sum"), tot)
            st.push(AttentionKey(blk.site, rel, "attention_entropy", "cnt"), cnt)
            if att.name not in st.qk_done and att.qkv is not None and "k" in att.qkv.parts:
                st.qk_done.add(att.name)
                scale = sc.scale if sc.probs is None else float(getattr(att.module, "scaling", 0.0) or 0.0)
                wq, wk = att.qkv.matrix("q"), att.qkv.matrix("k")
                H = sc.H
                if wq.shape[0] % H == 0 and wk.shape[0] % (wq.shape[0] // H) == 0:
                    d = wq.shape[0] // H
                    if not scale:
                        scale = 1.0 / math.sqrt(d)
                    v0 = self._qk_v.get(att.name)
                    norms, v = qk_spectral_norms(wq, wk, H, scale, v0, _POWER_WARM if v0 is not None else _POWER_COLD)
                    self._qk_v[att.name] = v
                    st.push(AttentionKey(blk.site, rel, "qk_spectral_norm", "avg"), norms)

    def _hf_hint(self, att: AttnModule) -> str:
        if att.origin != "hf":
            return ""
        root = self.host.model
        impl = _hf.attn_implementation(root)
        return (f"; this Hugging Face model uses attn_implementation={impl!r}: load it with "
                f"attn_implementation='sdpa' or 'eager' to measure attention probabilities")

    def meta(self) -> Dict[str, Any]:
        """JSON-able facts for the Recording's meta: stacks, and how probabilities were obtained."""
        out: Dict[str, Any] = {"stacks": {s: [self.layout.blocks[b].site for b in bs if b in self.wanted_blocks]
                                          for s, bs in self.layout.stacks.items()}}
        if any(a.origin == "hf" for a in self.wanted_attn.values()):
            out["hf_attn_implementation"] = _hf.attn_implementation(self.host.model)
            out["probabilities"] = ("recomputed from the query, key, mask and scale each attention module passed "
                                    "to scaled_dot_product_attention, or read from its softmax (eager); the "
                                    "model and its config are unchanged")
        return out

    # -------------------------------------------------------------- finalize
    def add_pass_values(self, passes) -> None:
        """Hand the values measured during the passes' forwards to the collector."""
        for p in passes:
            st = getattr(p, "attn", None)
            if st is not None:
                for v, k in zip(st.vals, st.keys):
                    self.collector.add(k, v)
                st.vals, st.keys = [], []

    def finalize_row(self, step: int, items, grads: Dict[Tuple[str, str], np.ndarray]) -> Dict[Tuple[str, str], Any]:
        """Turn this step's host values into measures; NaN the depth flow of all-padding positions."""
        acc: Dict[Tuple[str, str, str, str], Any] = {}
        navg: Dict[Tuple, int] = {}
        for key, v in items:
            site, rel, name, mode = key
            k = (site, rel, name, mode)
            v = np.asarray(v, dtype=np.float64)
            if k in acc and acc[k].shape == v.shape:
                acc[k] = acc[k] + v
            else:
                acc[k] = v.copy()
            navg[k] = navg.get(k, 0) + 1
        row: Dict[Tuple[str, str], Any] = {}
        for (site, rel, name, mode), v in acc.items():
            mname = name if not rel else f"{name}[{rel}]"
            if mode == "sum":
                if name == "valid":
                    continue
                c = acc.get((site, rel, name, "cnt"))
                if c is None:
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):
                    row[(site, mname)] = np.where(c > 0, v / np.where(c > 0, c, 1), np.nan)
            elif mode == "avg":
                row[(site, mname)] = v / navg[(site, rel, name, mode)]
        for (site, rel, name, mode), v in acc.items():
            if name == "valid":
                g = grads.get((site, "h"))
                if g is not None and len(g):
                    n = min(len(g), len(v))
                    g = g.copy()
                    g[:n][v[:n] <= 0] = np.nan
                    grads[(site, "h")] = g
                    if np.any(v[:n] <= 0):
                        row[(site, "padding_positions")] = np.asarray(float(np.sum(v[:n] <= 0)))
        for k, v in row.items():
            if np.ndim(v) == 0:
                row[k] = float(v)
        return row

    def recording_measures(self, rows: List[Dict[str, Any]], grads) -> Dict[Tuple[str, str], np.ndarray]:
        """``{(site, measure): [S, …]}`` from the rows, plus ``(stack, "depth_grad_norms")``."""
        keys: Dict[Tuple[str, str], int] = {}
        for r in rows:
            for k, v in (r.get("attn") or {}).items():
                keys[k] = max(keys.get(k, 0), int(np.size(v)) if np.ndim(v) else 0)
        out: Dict[Tuple[str, str], np.ndarray] = {}
        S = len(rows)
        for k, width in keys.items():
            if k[1] == "padding_positions":
                continue
            a = np.full((S, width) if width else (S,), np.nan)
            for i, r in enumerate(rows):
                v = (r.get("attn") or {}).get(k)
                if v is None:
                    continue
                if width:
                    v = np.ravel(v)
                    a[i, :len(v)] = v
                else:
                    a[i] = float(v)
            out[k] = a
        for stack, names in self.layout.stacks.items():
            blks = [self.layout.blocks[b] for b in names if b in self.wanted_blocks]
            if not blks:
                continue
            arrs = [grads.get((b.site, "h"), np.zeros((S, 0))) for b in blks]
            P = max((a.shape[1] for a in arrs), default=0)
            d = np.full((S, len(arrs), P), np.nan)
            for i, a in enumerate(arrs):
                d[:, i, :a.shape[1]] = a
            out[(stack, "depth_grad_norms")] = d
        return out

    # ------------------------------------------------------------------ probe
    def run_probe(self, p, step: int, measure: Callable, **options) -> List[str]:
        """Depth Jacobians of every stack on this pass's batch, by ``measure`` (the Scope passes
        :func:`gradscope.measure.depth.depth_jacobians`; capture imports no measurement code).
        Keeps them as :attr:`latest_probe`; returns notes."""
        st: Optional[_PassState] = p.attn
        if st is None or not options.get("jacobians", True):
            self.latest_probe = (step, {}, {})
            return []
        measures, meta, notes = measure(self.layout, self.wanted_blocks, st.calls, **options)
        st.calls = {}  # the probed call arguments are no longer needed
        self.latest_probe = (step, measures, meta)
        return notes
