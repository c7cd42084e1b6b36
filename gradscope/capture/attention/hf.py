"""Hugging Face ``transformers`` helpers. This module never imports ``transformers``.

A model is treated as a Hugging Face model when its class comes from the ``transformers`` package
(``type(m).__module__.startswith("transformers")``); everything here works from attribute names and
class names, so gradscope neither needs nor loads the package for other models.

How attention probabilities are obtained for Hugging Face models (documented choice): gradscope
does *not* switch ``config._attn_implementation``. During a scheduled pass it watches, inside each
attention module only, the call the module makes to ``torch.nn.functional.scaled_dot_product_attention``
(the ``"sdpa"`` implementation) or to ``softmax`` (``"eager"``), and recomputes the probabilities
softmax(q kᵀ · scale + mask) from the very query, key, mask and scale that call received. The
user's model, its config and its numerics are left exactly as they are. Kernels that bypass both
(``"flash_attention_2"``, ``"flex_attention"``) give no probabilities; the recording says so.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

__all__ = ["is_hf", "hf_heads", "attn_implementation", "without_cache"]


def is_hf(m: Any) -> bool:
    """Whether ``m``'s class comes from the ``transformers`` package (no import needed)."""
    return type(m).__module__.startswith("transformers")


def hf_heads(m: nn.Module) -> Optional[int]:
    """The head count of a Hugging Face attention module, from its attributes or its config."""
    for attr in ("num_attention_heads", "num_heads", "n_head", "n_heads"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(m, "config", None)
    for attr in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def attn_implementation(model: nn.Module) -> Optional[str]:
    """``config._attn_implementation`` of a Hugging Face model (``"sdpa"``, ``"eager"``, …)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def _is_cache(v: Any) -> bool:
    # transformers' Cache classes (DynamicCache, EncoderDecoderCache, …): updating one appends keys
    # and values, so a block must never be re-run with the user's cache object.
    return type(v).__name__.endswith("Cache") and is_hf(v)


def without_cache(args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
    """Block call arguments with key/value caches removed, for re-running a block safely."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kw = {}
    for k, v in kwargs.items():
        if _is_cache(v):
            v = None
        elif k == "use_cache":
            v = False
        elif k in ("output_attentions", "output_hidden_states"):
            v = False
        kw[k] = v
    return args, kw
