"""Attention sites: gradient flow through depth and position, entropy, rank collapse.

* :mod:`.layout` — attention modules, their blocks (the sites) and stacks; where W_Q, W_K, W_V are;
* :mod:`.hf` — Hugging Face conventions, read from names without importing ``transformers``;
* :mod:`.probabilities` — attention probabilities observed and recomputed from the calls a module
  makes (``F.multi_head_attention_forward``, ``F.scaled_dot_product_attention``, ``softmax``);
* :mod:`.calls` — a block's hidden-state argument and its ``[B, P, features]`` view;
* :mod:`.capture` — :class:`AttentionCapture`, what is recorded per scheduled pass;
* :mod:`.rows` — from the collected values to one row of measures per step, and to arrays per run.

The measures themselves (entropy, rank-collapse residual, token cosine, ‖W_Qᵀ W_K‖₂) are pure
functions in :mod:`gradscope.estimators.attention`.

Depth Jacobians (probe, :mod:`gradscope.measure.depth`): the blocks of a stack, in eval mode and
with the call arguments of the probed batch (at most two samples), form a step
x_{ℓ+1} = block_ℓ(x_ℓ) over depth; ``jacobian_norms`` gives the RMS gain
‖∂x_L/∂x_{L−k}‖_F / √(P·E) = √(mean σᵢ²) for every k (exact up to P·E = 512, else estimated from 64
random probes, relative s.d. ≈ 18 %). The RMS gain rather than the spectral norm: residual blocks
have nearly flat spectra, on which power/subspace iteration converges slowly and a dense SVD of a
P·E × P·E matrix per lag would dominate the probe. Key/value caches are removed from the arguments
so that re-running a block never extends the user's cache.
"""
from __future__ import annotations

from .capture import AttentionCapture, Host
from .layout import AttentionLayout, Block, find_attention, looks_like_attention, qkv_of
from .probabilities import MASKED_LOGIT, recompute_probabilities

__all__ = ["AttentionCapture", "Host", "AttentionLayout", "Block", "find_attention", "looks_like_attention",
           "qkv_of", "recompute_probabilities", "MASKED_LOGIT"]
