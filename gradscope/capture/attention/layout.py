"""Where attention is in a model: attention modules, their blocks (gradscope's sites) and stacks.

An *attention module* is the module that computes softmax(q kᵀ · scale + mask) v:
``nn.MultiheadAttention``, a Hugging Face attention module (``BertSelfAttention``,
``GPT2Attention``, …) or a user module whose class name says attention (``CausalSelfAttention``)
or that is named in ``watch(sites=[...])``; when such modules nest, the innermost counts. The
*block* of an attention module is its nearest ancestor that is an element of an ``nn.ModuleList``
or ``nn.Sequential`` (``encoder.layers.3``, ``bert.encoder.layer.0``, ``transformer.h.5``), or the
attention module itself when there is none. Blocks are gradscope's attention sites (kind
``"attention"``); the container is their *stack* and the index in it their depth ℓ. A decoder block
with self- and cross-attention is one site with two attention modules; the first is its primary.

Also here: where W_Q, W_K, W_V of an attention module live (:func:`qkv_of`), its head count and
whether its block normalises before or after attention. Everything is read from module types,
attribute and parameter names; no forward pass runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..sites import FUSED_TYPES, SiteSpec
from . import hf

__all__ = ["looks_like_attention", "static_heads", "QKV", "qkv_of", "AttnModule", "Block", "AttentionLayout",
           "find_attention"]

_ATTN_RE = re.compile(r"attention|attn", re.I)
_Q_NAMES = ("query", "q_proj", "q", "q_lin", "to_q", "wq", "w_q", "W_q", "query_proj", "q_linear")
_K_NAMES = ("key", "k_proj", "k", "k_lin", "to_k", "wk", "w_k", "W_k", "key_proj", "k_linear")
_V_NAMES = ("value", "v_proj", "v", "v_lin", "to_v", "wv", "w_v", "W_v", "value_proj", "v_linear")
_QKV_NAMES = ("c_attn", "qkv", "qkv_proj", "Wqkv", "in_proj", "to_qkv", "att_proj")


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


def static_heads(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.MultiheadAttention):
        return m.num_heads
    if hf.is_hf(m):
        return hf.hf_heads(m)
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
    if hf.is_hf(m):
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
        layout.attn[a] = AttnModule(a, m, block, rel, _origin(m), static_heads(m),
                                    (m.batch_first if isinstance(m, nn.MultiheadAttention)
                                     else (True if hf.is_hf(m) else None)),
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

