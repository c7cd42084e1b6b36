"""Attention probabilities as gradscope sees them: observed calls, recomputed in chunks of rows.

During a scheduled pass, and only inside attention modules, an :class:`Interceptor` (a
``TorchFunctionMode``) notes the calls the module makes to ``F.multi_head_attention_forward``,
``F.scaled_dot_product_attention`` and ``softmax``. From the first two gradscope recomputes the
probabilities with the module's own projections, masks and scale (so ``need_weights=False`` and
fused SDPA kernels are covered); from a softmax (eager attention) it reads them. The mode only
observes: every call runs as it would unwatched. Probabilities are computed in chunks of query rows
so that long sequences never materialise all B·H·T·S scores at once.

Index letters: B samples, H heads, T query positions, S key positions (keys that are sequence
positions first, then any ``bias_k`` / ``add_zero_attn`` columns).
"""
from __future__ import annotations

import inspect
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...errors import GradscopeError
from ...estimators.attention import entropy_sums
from .layout import static_heads

__all__ = ["MASKED_LOGIT", "Scores", "scores_of", "Interceptor", "attention_events", "recompute_probabilities"]

#: A score at or below this (after the additive mask) counts as masked: it covers -inf, finfo.min,
#: -1e9 and the -10000 of older BERT code, while ALiBi-style biases stay attended.
MASKED_LOGIT = -5e3
_CHUNK_ELEMENTS = 1 << 22        # scores materialised at once when recomputing probabilities

_MHA_FN = F.multi_head_attention_forward
_SDPA_FN = F.scaled_dot_product_attention
_SOFTMAX_FNS = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_SIG = inspect.signature(_MHA_FN)


def _rows(m: Tensor, i0: int, i1: int) -> Tensor:
    return m if m.shape[-2] == 1 else m[..., i0:i1, :]


def _as4d(m: Tensor) -> Tensor:
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


class Scores:
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
            s, n = entropy_sums(p, a, None if qv is None else qv[:, i0:i1])
            tot += s.float()
            cnt += n.float()
        return tot, cnt

    def probabilities(self) -> Tensor:
        return self.probs_rows(0, self.T)[0]


def _scores_from_sdpa(args, kwargs) -> Scores:
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
    return Scores(q, k, scale, masks, causal=bool(a.get("is_causal", False)))


def _scores_from_mha(args, kwargs) -> Scores:
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
    return Scores(q, k, 1.0 / math.sqrt(hd), masks, positions=positions)


def _scores_from_softmax(args, kwargs, out: Tensor, heads: Optional[int]) -> Optional[Scores]:
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
    return Scores(None, None, 1.0, probs=p, logits=x)


def scores_of(event, heads: Optional[int]) -> Optional[Scores]:
    """The scores of one event noted by an :class:`Interceptor`.

    Args:
        event: ``(kind, args, kwargs, output)`` with kind ``"mha"``, ``"sdpa"`` or ``"softmax"``.
        heads: the module's head count, to split a 3-D softmax input ``[B·H, T, S]``; None if unknown.

    Returns:
        The :class:`Scores`, or None for a softmax that is not over the last dimension of ≥ 3-D scores.
    """
    kind, args, kwargs, out = event
    if kind == "mha":
        return _scores_from_mha(args, kwargs)
    if kind == "sdpa":
        return _scores_from_sdpa(args, kwargs)
    return _scores_from_softmax(args, kwargs, out, heads)


class Interceptor(TorchFunctionMode):
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


def attention_events(events: list) -> list:
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
    events: list = []
    with Interceptor(events):
        module(*args, **kwargs)
    ev = attention_events(events)
    if not ev:
        raise GradscopeError(
            f"{type(module).__name__} made no call to F.multi_head_attention_forward, "
            f"F.scaled_dot_product_attention or softmax over ≥ 3-D scores, so gradscope cannot see its "
            f"attention probabilities (a custom kernel?).")
    sc = scores_of(ev[0], static_heads(module))
    return sc.probabilities()

