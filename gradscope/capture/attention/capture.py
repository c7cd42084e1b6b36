"""What attention capture records per scheduled pass, through the collector and its small host.

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

The mathematics is in :mod:`gradscope.estimators.attention`; how probabilities are obtained in
:mod:`.probabilities`. :class:`AttentionCapture` talks only to its :class:`Host` (closed,
``pass_now()``, ``is_current()``, ``claim()``, ``note()``) and to the collector's ``add``.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ...estimators.attention import qk_spectral_norms, token_sums
from .._forwards import PatchedForward, remove_leaf_hooks
from .._norms import norm as _norm, wide as _wide
from ..collector import AttentionKey, Collector, SiteKey
from ..patching import ForwardHandle, remove_all, swap_forward
from ..sites import flatten_tensors
from . import hf
from .calls import block_view, call_arg, hidden_index, replace_arg
from .layout import AttentionLayout, AttnModule, Block
from .probabilities import Interceptor, attention_events, scores_of
from .rows import finalize_row, recording_measures

__all__ = ["AttentionCapture", "Host"]

_POWER_WARM = 3  # power iterations of a warm-started ‖W_Qᵀ W_K‖₂ (the first measurement uses the default)


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

    Values are reduced on the device and added to the host's
    :class:`~gradscope.capture.collector.Collector`, which copies them to the host together with every
    other value of the step (one transfer per device).
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
            with Interceptor(events):
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
        idx = hidden_index(args, kwargs)
        if idx is None:
            return args, kwargs, None
        x = call_arg(args, kwargs, idx)
        sub = False
        if not x.requires_grad:
            # A private copy that requires grad, so the gradient at the stack's input is measured
            # too. Same values; the user's tensor is untouched; clone() keeps in-place ops legal.
            new = x.detach().requires_grad_(True).clone()
            args, kwargs = replace_arg(args, kwargs, x, new)
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
                    r, c, n = token_sums(yb, None if pad is None else ~pad)
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
        evs = attention_events(events)
        if not evs:
            self.host.note(("attention-noprob", att.name),
                             f"attention module {att.name or type(att.module).__name__!r} "
                             f"({type(att.module).__name__}) made no call to F.multi_head_attention_forward, "
                             f"F.scaled_dot_product_attention or softmax that gradscope can see (a custom or "
                             f"flash kernel?), so its entropy and padding are not measured"
                             + self._hf_hint(att) + ".")
            return
        for ev in evs:
            sc = scores_of(ev, att.heads)
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
                    if v0 is None:
                        norms, v = qk_spectral_norms(wq, wk, H, scale)
                    else:
                        norms, v = qk_spectral_norms(wq, wk, H, scale, v0, iters=_POWER_WARM)
                    self._qk_v[att.name] = v
                    st.push(AttentionKey(blk.site, rel, "qk_spectral_norm", "avg"), norms)

    def _hf_hint(self, att: AttnModule) -> str:
        if att.origin != "hf":
            return ""
        root = self.host.model
        impl = hf.attn_implementation(root)
        return (f"; this Hugging Face model uses attn_implementation={impl!r}: load it with "
                f"attn_implementation='sdpa' or 'eager' to measure attention probabilities")

    def meta(self) -> Dict[str, Any]:
        """JSON-able facts for the Recording's meta: stacks, and how probabilities were obtained."""
        out: Dict[str, Any] = {"stacks": {s: [self.layout.blocks[b].site for b in bs if b in self.wanted_blocks]
                                          for s, bs in self.layout.stacks.items()}}
        if any(a.origin == "hf" for a in self.wanted_attn.values()):
            out["hf_attn_implementation"] = hf.attn_implementation(self.host.model)
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
        """This step's attention measures from its collected values (:func:`.rows.finalize_row`)."""
        return finalize_row(items, grads)

    def recording_measures(self, rows: List[Dict[str, Any]], grads) -> Dict[Tuple[str, str], np.ndarray]:
        """The Recording's attention arrays from the rows (:func:`.rows.recording_measures`)."""
        return recording_measures(self.layout, self.wanted_blocks, rows, grads)

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
