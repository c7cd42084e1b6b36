"""Rules for attention sites (transformer blocks) and their stacks: evidence, regime, findings.

Called by :func:`gradscope.diagnose` for sites of kind ``"attention"``; the recurrent rules do not
apply to them. Thresholds are in :class:`AttentionRules` (``diagnose(rec, attention_rules=...)``);
the regime thresholds (``threshold``, ``steps``) come from the diagnosis' :class:`Rules`.

* **vanishing / exploding (depth)** — per stack, the gradient reaching the first block's input
  relative to the one reaching the last block's input (median over the last ``steps`` recorded
  steps, Frobenius over positions), or, when probed, the RMS gain ‖∂x_L/∂x_0‖ of the whole stack:
  below ``threshold`` is vanishing, above 1/``threshold`` exploding. A block's regime compares its
  own input gradient with the last block's.
* **attention_entropy_collapse** — at least ``collapsed_share`` of a block's heads have normalised
  entropy below ``entropy_low`` (critical when the mean over heads is below it), or the mean
  entropy fell below ``entropy_falling`` while having at least halved since the first recorded
  steps as ‖W_Q W_Kᵀ‖ at least doubled (Zhai et al. 2023).
* **rank_collapse** — the first block of a stack whose output residual ‖X − 1x̄ᵀ‖_F/‖X‖_F is below
  ``rank_low`` (Dong et al. 2021); the mean token cosine decides only where no residual was
  measured (above ``cosine_high``), since a common offset that skips accumulate raises the cosine
  of tokens that still differ. The query/key versus value gradient ratio is quoted (Noci et al.
  2022).
* **postln_instability** — a Post-LN stack of three or more blocks (LayerNorm after the residual
  sum, as BERT and torch's layers with ``norm_first=False``) whose weight gradients grow with depth
  (correlation of their log with the depth above 0.5) and whose last block's exceed the first's by
  more than ``postln_ratio`` in the first recorded steps, where warm-up matters (Xiong et al. 2020).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import GradscopeError
from .._format import fmt
from .finding import Finding, Rules
from .remedies import finding_remedies

__all__ = ["AttentionRules", "site_diagnosis", "stack_findings"]


@dataclass(frozen=True)
class AttentionRules:
    """Thresholds of the attention rules (see the module docstring)."""

    entropy_low: float = 0.1
    collapsed_share: float = 0.5
    entropy_falling: float = 0.5
    rank_low: float = 0.05
    cosine_high: float = 0.99
    postln_ratio: float = 1.25

    def __post_init__(self):
        for name in ("entropy_low", "collapsed_share", "entropy_falling", "rank_low", "cosine_high"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise GradscopeError(f"attention rule {name} must be in (0, 1], got {v!r}.")
        if not (isinstance(self.postln_ratio, (int, float)) and self.postln_ratio > 1):
            raise GradscopeError(f"attention rule postln_ratio must be > 1, got {self.postln_ratio!r}.")


def _quiet_median(a: np.ndarray, axis=0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: not measured there
        return np.nanmedian(a, axis=axis)


def _measure(rec, site: str, name: str) -> Optional[np.ndarray]:
    key = (site, name)
    m = rec.measures()
    return m.get(key)


def _flow_total(rec, site: str, last: int, first: bool = False) -> float:
    """Median over recorded steps of ‖∂L/∂x_ℓ‖ over all positions (NaN-padding ignored)."""
    g = rec.grad_norms(site)
    if not g.size:
        return math.nan
    g = g[:last] if first else g[-last:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tot = np.sqrt(np.nansum(g ** 2, axis=1))
    tot = np.where(np.all(np.isnan(g), axis=1), np.nan, tot)
    return float(_quiet_median(tot)) if np.isfinite(tot).any() else math.nan


_NORM_PARAM = re.compile(r"(^|\.)(ln|norm|layernorm|layer_norm|rmsnorm)[^.]*\.", re.I)


def _block_param_norm(rec, module: str, first: int) -> float:
    """Median over the first recorded steps of the gradient norm of the block's weights.

    Biases and normalisation parameters are left out: Xiong et al.'s statement is about the weight
    matrices, and the gain of a final LayerNorm gets gradient even from losses that are invariant
    to the scale of its input (½·mean(y²) of a LayerNorm output), which says nothing about depth.
    """
    pn = rec.param_grad_norms()
    pre = module + "." if module else ""
    rows = [v[:first] for k, v in pn.items()
            if k.startswith(pre) and k.endswith("weight") and not _NORM_PARAM.search(k[len(pre):])]
    if not rows:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tot = np.sqrt(np.nansum(np.vstack(rows) ** 2, axis=0))
    tot = tot[np.isfinite(tot) & (tot > 0)]
    return float(np.median(tot)) if tot.size else math.nan


def _all_param_norm(rec, first: int) -> float:
    """Median over the first recorded steps of the gradient norm of every parameter."""
    pn = rec.param_grad_norms()
    if not pn:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tot = np.sqrt(np.nansum(np.vstack([v[:first] for v in pn.values()]) ** 2, axis=0))
    tot = tot[np.isfinite(tot) & (tot > 0)]
    return float(np.median(tot)) if tot.size else math.nan


def _site_evidence(rec, site: str, rules: Rules) -> Tuple[Dict[str, float], List[str]]:
    info = rec.site_info(site)
    ev: Dict[str, float] = {}
    used: List[str] = []
    n = rules.steps
    for k in ("depth", "num_layers", "heads", "embed_dim"):
        if isinstance(info.get(k), (int, float)) and info.get(k) is not None:
            ev[k] = float(info[k])
    lens = rec.seq_lens(site)
    if lens.size and lens.max() > 0:
        ev["seq_len"] = float(lens[-n:].max())
    g = _flow_total(rec, site, n)
    if math.isfinite(g):
        ev["grad_in"] = g
        used.append("depth_grad_norms")
    ent = _measure(rec, site, "attention_entropy")
    if ent is not None and np.isfinite(ent).any():
        used.append("attention_entropy")
        last = _quiet_median(ent[-n:])                           # [H]
        ok = last[np.isfinite(last)]
        if ok.size:
            ev["entropy"] = float(ok.mean())
            ev["entropy_min"] = float(ok.min())
            ev["collapsed_heads"] = float(np.mean(ok < 0.1))
            ev["heads"] = float(ok.size)
        firstv = _quiet_median(ent[:max(1, min(n, len(ent) // 4 or 1))])
        fo = firstv[np.isfinite(firstv)]
        if fo.size:
            ev["entropy_first"] = float(fo.mean())
    qk = _measure(rec, site, "qk_spectral_norm")
    if qk is not None and np.isfinite(qk).any():
        used.append("qk_spectral_norm")
        ev["qk_norm"] = float(np.nanmax(_quiet_median(qk[-n:])))
        ev["qk_norm_first"] = float(np.nanmax(_quiet_median(qk[:max(1, min(n, len(qk) // 4 or 1))])))
    for name, key in (("rank_residual", "rank_residual"), ("token_cosine", "token_cosine")):
        a = _measure(rec, site, name)
        if a is not None and np.isfinite(a).any():
            used.append(name)
            ev[key] = float(_quiet_median(a[-n:]))
    gq, gk, gv = (_measure(rec, site, f"grad_w{w}") for w in "qkv")
    if gq is not None and gk is not None and gv is not None:
        q, k, v = (float(_quiet_median(a[-n:])) for a in (gq, gk, gv))
        if all(math.isfinite(x) for x in (q, k, v)):
            used.append("qkv_grad_norms")
            ev.update(grad_wq=q, grad_wk=k, grad_wv=v)
            if v > 0:
                ev["qk_v_grad_ratio"] = (q + k) / (2 * v)
    if ev.get("embed_dim") and ev.get("heads"):
        ev["head_dim"] = ev["embed_dim"] / ev["heads"]
    return ev, used


def site_diagnosis(rec, site: str, rules: Rules, arules: AttentionRules) -> Tuple[Dict[str, Any], List[Finding]]:
    """(site summary for the Diagnosis, findings) of one attention block."""
    info = rec.site_info(site)
    ev, used = _site_evidence(rec, site, rules)
    caveats: List[str] = []
    stack = info.get("stack", site)
    sites = rec.attention_stacks.get(stack, (site,))
    top = _flow_total(rec, sites[-1], rules.steps)
    regime, reason = "stable", "gradient reaches this block's input at a similar scale as the last block's"
    if math.isfinite(ev.get("grad_in", math.nan)) and math.isfinite(top) and top > 0:
        ratio = ev["grad_in"] / top
        ev["grad_ratio"] = ratio
        if ratio < rules.threshold:
            regime, reason = "vanishing", "input gradient below threshold × the last block's"
        elif ratio > 1 / rules.threshold:
            regime, reason = "exploding", "input gradient above 1/threshold × the last block's"
    if not used:
        regime, reason = "stable", "no usable evidence"
        caveats.append("no gradient or attention measure reached this block in the recorded steps")
    if "attention_entropy" not in used and used:
        caveats.append("no attention probabilities seen (see the recording's notes)")
    findings: List[Finding] = []
    attn_modules = info.get("attention") or [info.get("module", site)]
    module = attn_modules[0]

    def add(kind, severity, text, keys, mod, used_keys):
        e = {k: ev[k] for k in keys if k in ev}
        findings.append(Finding(kind, site, severity, e, text, finding_remedies(kind, "attention", ev, site, mod),
                                list(used_keys)))

    ent, share = ev.get("entropy"), ev.get("collapsed_heads")
    if ent is not None and share is not None:
        falling = (ev.get("entropy_first") and ent < arules.entropy_falling and ent <= 0.5 * ev["entropy_first"]
                   and ev.get("qk_norm_first") and ev.get("qk_norm", 0) >= 2 * ev["qk_norm_first"])
        collapsed = share >= arules.collapsed_share
        if collapsed or falling:
            sev = "critical" if ent < arules.entropy_low else "warning"
            qk = ev.get("qk_norm")
            text = (f"Attention in {module} has collapsed onto few keys: the normalised entropy is {ent:.3g} "
                    f"on average (1 = uniform, 0 = one key), {share:.0%} of its heads are below "
                    f"{arules.entropy_low:g}")
            if falling:
                text += (f"; it fell from {ev['entropy_first']:.3g} while ‖W_Q W_Kᵀ‖ grew from "
                         f"{ev['qk_norm_first']:.3g} to {qk:.3g}")
            elif qk is not None:
                text += f"; the largest ‖W_Q W_Kᵀ‖₂·scale of a head is {qk:.3g}"
            text += (". Collapsed attention goes with unstable training and vanishing gradients to the "
                     "other tokens (Zhai et al. 2023).")
            add("attention_entropy_collapse", sev, text,
                ["entropy", "entropy_min", "collapsed_heads", "entropy_first", "qk_norm", "qk_norm_first",
                 "heads", "head_dim", "seq_len"], module, ["attention_entropy", "qk_spectral_norm"])
    return ({"kind": "attention", "module": stack or site, "regime": regime, "reason": reason,
             "evidence": ev, "evidence_used": used, "caveats": caveats}, findings)


def stack_findings(rec, rules: Rules, arules: AttentionRules, site_summaries: Dict[str, Dict[str, Any]]) -> List[Finding]:
    """Depth vanishing/exploding, rank collapse and Post-LN instability, per attention stack."""
    out: List[Finding] = []
    n = rules.steps
    for stack, sites in rec.attention_stacks.items():
        label = stack or sites[0]
        L = len(sites)
        infos = [rec.site_info(s) for s in sites]
        ev: Dict[str, float] = {"num_layers": float(L)}
        used: List[str] = []
        g0, gl = _flow_total(rec, sites[0], n), _flow_total(rec, sites[-1], n)
        if L >= 2 and math.isfinite(g0) and math.isfinite(gl) and gl > 0:
            ev["grad_ratio"] = g0 / gl
            ev["grad_first"], ev["grad_last"] = g0, gl
            used.append("depth_grad_norms")
        jac = rec.measures().get((stack, "depth_jacobian_norms"))
        if jac is not None and jac.size and np.isfinite(jac[:, -1]).any():
            with np.errstate(divide="ignore"):
                ev["jacobian_gain"] = float(np.exp(_quiet_median(np.log(jac[:, -1]))))
            used.append("depth_jacobian_norms")
        lens = [rec.seq_lens(s)[-n:] for s in sites]
        T = max((int(x.max()) for x in lens if x.size), default=0)
        if T:
            ev["seq_len"] = float(T)
        ratio = ev.get("jacobian_gain", ev.get("grad_ratio"))
        src = "the stack's RMS Jacobian gain ‖∂x_L/∂x_0‖" if "jacobian_gain" in ev else \
            "the gradient at the first block's input relative to the last block's"
        if ratio is not None and math.isfinite(ratio) and L >= 2:
            if ratio < rules.threshold:
                sev = "critical" if ratio < rules.threshold ** 2 else "warning"
                out.append(Finding("vanishing", label, sev, dict(ev),
                                   f"Through the {L} blocks of {label} the gradient shrinks: {src} is "
                                   f"{fmt(ratio)}, below the threshold {fmt(rules.threshold)}, so the early "
                                   f"blocks and the embeddings barely learn.",
                                   finding_remedies("vanishing", "attention", ev, label, stack), list(used)))
            elif ratio > 1 / rules.threshold:
                sev = "critical" if ratio > rules.threshold ** -2 else "warning"
                out.append(Finding("exploding", label, sev, dict(ev),
                                   f"Through the {L} blocks of {label} the gradient grows: {src} is "
                                   f"{fmt(ratio)}, above 1/threshold = {fmt(1 / rules.threshold)}.",
                                   finding_remedies("exploding", "attention", ev, label, stack), list(used)))
        # rank collapse: the first block whose output has (nearly) collapsed to one token direction
        res = [site_summaries.get(s, {}).get("evidence", {}) for s in sites]
        for i, e in enumerate(res):
            r, c = e.get("rank_residual"), e.get("token_cosine")
            # the residual decides; a common offset alone already raises the cosine (skips add one)
            if (r is not None and r < arules.rank_low) or (r is None and c is not None and c > arules.cosine_high):
                fev = {"rank_residual": r, "token_cosine": c, "depth": float(i), "num_layers": float(L)}
                if res[0].get("rank_residual") is not None:
                    fev["rank_residual_first"] = res[0]["rank_residual"]
                if res[-1].get("rank_residual") is not None:
                    fev["rank_residual_last"] = res[-1]["rank_residual"]
                for k in ("qk_v_grad_ratio", "grad_wq", "grad_wk", "grad_wv"):
                    if k in e:
                        fev[k] = e[k]
                fev = {k: v for k, v in fev.items() if v is not None}
                sev = "critical" if (r is not None and r < arules.rank_low / 10) else "warning"
                qkv = (f" Query/key gradients are {fmt(e['qk_v_grad_ratio'])}× the value gradients."
                       if "qk_v_grad_ratio" in e else "")
                out.append(Finding(
                    "rank_collapse", sites[i], sev, fev,
                    f"From block {i} of {label} on, the tokens have collapsed towards one vector: the residual "
                    f"‖X − 1x̄ᵀ‖/‖X‖ is {fmt(r)} (first block {fmt(res[0].get('rank_residual'))}) and the "
                    f"mean token cosine {fmt(c)}. Every position then carries the same signal and the "
                    f"query/key gradients vanish (Dong et al. 2021; Noci et al. 2022).{qkv}",
                    finding_remedies("rank_collapse", "attention", fev, sites[i], stack),
                    ["rank_residual", "token_cosine", "qkv_grad_norms"]))
                break
        # Post-LN: parameter gradients growing towards the output in the first recorded steps
        positions = {i.get("norm_position") for i in infos}
        if L >= 3 and positions == {"post"}:  # two blocks show no trend with depth
            pn = [_block_param_norm(rec, i.get("module", s), n) for s, i in zip(sites, infos)]
            total = _all_param_norm(rec, n)
            # weight gradients at rounding level (a loss the last LayerNorm makes invariant) say nothing
            meaningful = math.isfinite(total) and max(pn, default=0) > 1e-4 * total
            if meaningful and all(math.isfinite(x) and x > 0 for x in pn):
                pr = pn[-1] / pn[0]
                increasing = np.corrcoef(np.arange(L), np.log(pn))[0, 1] > 0.5
                if pr > arules.postln_ratio and increasing:
                    pev = {"param_grad_ratio": pr, "param_grad_first": pn[0], "param_grad_last": pn[-1],
                           "num_layers": float(L)}
                    out.append(Finding(
                        "postln_instability", label, "warning", pev,
                        f"{label} is a Post-LN stack, and in the first recorded steps its last block's parameter "
                        f"gradient is {fmt(pr)}× the first block's, growing with depth: the pattern of "
                        f"Post-LN at initialisation that makes large learning rates diverge without "
                        f"warm-up (Xiong et al. 2020).",
                        finding_remedies("postln_instability", "attention", pev, label, stack), ["param_grad_norms"]))
    return out

