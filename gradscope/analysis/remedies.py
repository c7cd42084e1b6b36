"""Remedies for vanishing and exploding gradients: plain data, with numbers from the evidence.

Every remedy of the table in SCIENCE.md ("Remedies, the signal that calls for each, and a source")
is here as a :class:`Remedy`: a title, a ``why`` that quotes the measured numbers, a ``code`` snippet
to paste (valid Python, with the numbers and the user's module path filled in), the source, and
whether :func:`gradscope.analysis.trials.try_remedies` can measure it on a copy of the model.

This module imports neither torch nor numpy: a Remedy is built from an ``evidence`` dict of floats
(the keys :func:`gradscope.diagnose` fills: ``seq_len``, ``rate``, ``horizon``, ``lambda1``,
``w_hh_norm``, ``memory_time``, ``forget_bias``, ``grad_norm_median`` …). Any key may be missing or
non-finite; the text then says which default was used. The snippets assume the names ``model``
(the model whose module names the recording uses), ``optimizer``, ``x``, ``y`` and ``loss_fn``
where a training loop is involved.

Entry points:

* :func:`remedies_for` — the ranked remedies for one finding (most specific first).
* :func:`get_remedy` — one remedy by name (unknown names get a "did you mean").
* :data:`REMEDIES` — the registry: one :class:`RemedySpec` per remedy (what it applies to, how
  to build its text and code, how :func:`~gradscope.analysis.trials.try_remedies` applies it or why
  it cannot, whether it re-initialises); :data:`REMEDY_NAMES`, :data:`UNTESTABLE` and the other
  tables are derived from it.
* :data:`FOLKLORE` and :func:`folklore_verdicts` — the usual advice (ReLU, Xavier/He, batch norm,
  dropout, Adam, "use an LSTM", "add attention") checked against the mechanism and the evidence.

Example:
    >>> r = get_remedy("forget_bias", {"seq_len": 100, "forget_bias": -3.0},
    ...                site="encoder.lstm.l0", site_kind="lstm")
    >>> "model.encoder.lstm.bias_ih_l0[H:2 * H] += 3.8" in r.code      # b_f −3 → 4.6: τ = T = 100
    True
"""
from __future__ import annotations

import keyword
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .._format import fmt
from ..errors import GradscopeError, did_you_mean
from ..estimators.gates import bias_of_memory_time, memory_time
from . import _trainability_table as _table
from .evidence import HORIZON_THRESHOLD
from .evidence import regime as evidence_regime

__all__ = ["Remedy", "RemedySpec", "REMEDIES", "REINITIALISING", "remedies_for", "finding_remedies", "get_remedy", "REMEDY_NAMES", "FOLKLORE_CHECKS", "FINDING_KINDS",
           "SITE_KINDS", "UNTESTABLE", "FOLKLORE", "folklore_verdicts", "forget_bias_plan", "critical_gain",
           "clip_threshold", "truncation_window", "chrono_t_max", "module_expr"]

# float32: exp(λ₁ k) falls below the machine epsilon 2**-23 once k > ln(2**23)/|λ₁| = 15.9/|λ₁|.
_LN_FLOAT32_EPS = 23 * math.log(2.0)
_DEFAULT_SEQ_LEN = 100
_DEFAULT_THRESHOLD = HORIZON_THRESHOLD
# The share of the gradient the keep gate should carry over the whole sequence: e⁻¹, τ ≥ T
# (forget_bias_plan says why).
KEEP_OVER_SEQUENCE = math.exp(-1.0)

SITE_KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru", "cell", "attention")


@dataclass(frozen=True)
class Remedy:
    """One remedy, specialised to a site and its evidence.

    Attributes:
        name: catalogue key (``"orthogonal_init"``); see :data:`REMEDY_NAMES`.
        title: one line for a report.
        why: one to three sentences tying the remedy to the measured numbers.
        code: a PyTorch snippet to paste (valid Python; uses ``model``, and ``optimizer`` / ``x`` /
            ``y`` / ``loss_fn`` where a training loop is involved).
        reference: the source.
        testable: :func:`gradscope.analysis.trials.try_remedies` can apply it to a copy of the
            model and measure the effect (otherwise :data:`UNTESTABLE` says why not).
    """

    name: str
    title: str
    why: str
    code: str
    reference: str
    testable: bool = False  # set from the catalogue entry (RemedySpec.testable) by remedies_for/get_remedy

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# formatting helpers


def _lit(x: float, digits: int = 3) -> str:
    """A finite number as a Python literal (never inf/nan: the snippets must compile)."""
    if not math.isfinite(x):
        raise ValueError(f"non-finite literal {x!r}")  # callers pass finite values only
    if float(x).is_integer() and abs(x) < 1e9:
        return f"{float(x):.1f}"
    s = f"{x:.{digits}g}"
    return s if ("e" in s or "." in s) else s + ".0"


def _size_lit(x: Optional[float], placeholder: str) -> str:
    """A size (hidden units) as an int literal, or a placeholder name when unknown."""
    return str(int(round(x))) if x is not None and x >= 1 else placeholder


def _num(ev: Mapping[str, Any], key: str) -> Optional[float]:
    """A finite float from the evidence, or None when missing or non-finite (NaN, ±inf, junk)."""
    v = ev.get(key) if ev else None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _raw(ev: Mapping[str, Any], key: str) -> Optional[float]:
    """A float that may be infinite (a horizon of ∞ means "never fell below the threshold")."""
    v = ev.get(key) if ev else None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def module_expr(module: str, root: str = "model") -> str:
    """The Python expression that reaches a submodule by its qualified name.

    ``"encoder.lstm"`` → ``model.encoder.lstm``; names that are not identifiers (``"layers.0"``)
    go through ``model.get_submodule('layers.0')``; ``""`` (the model itself) → ``model``.

    Example:
        >>> module_expr("encoder.lstm"), module_expr("layers.0.rnn"), module_expr("")
        ('model.encoder.lstm', "model.get_submodule('layers.0.rnn')", 'model')
    """
    if not module:
        return root
    parts = module.split(".")
    if all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return root + "." + module
    return f"{root}.get_submodule({module!r})"


def _assign(module: str, value: str) -> str:
    """A statement that replaces the submodule ``module`` by the expression ``value``."""
    if not module:
        return f"model = {value}"
    parent, _, last = module.rpartition(".")
    if last.isidentifier() and not keyword.iskeyword(last):
        return f"{module_expr(parent)}.{last} = {value}"
    return f"setattr({module_expr(parent)}, {last!r}, {value})"


_SITE_RE = re.compile(r"^(?:(?P<module>.*)\.)?(?P<suffix>l\d+(?:_reverse)?)$")


def _split_site(site: str, module: str, site_kind: str) -> Tuple[str, Optional[str]]:
    """(module name, parameter suffix such as ``l1_reverse`` or None) of a site.

    Model-wide findings (site ``"(model)"``) and parameter names act on ``model`` itself.
    """
    if site.startswith("(") or (site_kind == "cell" and not module and "weight" in site.rsplit(".", 1)[-1]):
        return module if module and not module.startswith("(") else "", None
    if site_kind in ("cell", "attention"):
        return (module or site), None
    if module:
        rest = site[len(module) + 1:] if site.startswith(module + ".") else site
        return module, (rest if re.fullmatch(r"l\d+(?:_reverse)?", rest) else None)
    m = _SITE_RE.match(site or "")
    if m:
        return m.group("module") or "", m.group("suffix")
    return site, None


class _Ctx:
    """What a remedy builder knows: evidence, finding kind, site kind, module path."""

    def __init__(self, evidence, kind, site_kind, site, module):
        self.ev = dict(evidence or {})
        self.kind = kind or ""
        self.site_kind = site_kind or ""
        self.site = site or ""
        self.module, self.suffix = _split_site(self.site, module or "", self.site_kind)
        self.m = module_expr(self.module)  # e.g. "model.encoder.lstm"
        self.notes: List[str] = []

    def get(self, key):
        return _num(self.ev, key)

    def seq_len(self) -> float:
        T = self.get("seq_len")
        if T is None or T < 1:
            self.notes.append(f"sequence length unknown, {_DEFAULT_SEQ_LEN} assumed")
            return float(_DEFAULT_SEQ_LEN)
        return T

    @property
    def where(self) -> str:
        return f" at {self.site!r}" if self.site else ""

    def param(self, stem: str) -> str:
        """``model.lstm.bias_ih_l0`` (or a loop variable name when the layer is unknown)."""
        return f"{self.m}.{stem}_{self.suffix}"

    def gated(self) -> bool:
        return self.site_kind in ("lstm", "gru")

    def regime_text(self) -> str:
        lam, hor, T = self.get("lambda1"), _raw(self.ev, "horizon"), self.get("seq_len")
        bits = []
        if lam is not None:
            bits.append(f"λ₁ = {fmt(lam)} per step")
        if hor is not None and T is not None:
            bits.append(f"horizon {fmt(hor)} of {fmt(T)} steps")
        elif hor is not None:
            bits.append(f"horizon {fmt(hor)} steps")
        return ", ".join(bits)

    def finish(self, text: str) -> str:
        if self.notes:
            text += " (" + "; ".join(dict.fromkeys(self.notes)) + ".)"
        return text


# ------------------------------------------------------------------------------------------------
# the arithmetic behind the numbers (shared with trials.py so snippet and trial agree)


def forget_bias_plan(evidence: Mapping[str, Any], threshold: float = KEEP_OVER_SEQUENCE, *,
                     key: str = "forget_bias") -> Dict[str, Any]:
    """The forget-gate (LSTM) / update-gate (GRU) bias that lets the cell path span the sequence.

    ``key`` names the evidence entry holding the current mean effective bias (``"update_bias"``
    for a GRU; ``forget_bias`` is the fallback). Without it, the bias is recovered from
    ``keep_mean`` (its logit) or ``memory_time``, else 0 is assumed and said so.

    With small recurrent weights the keep gate is f ≈ σ(b) and the cell path carries the gradient
    over k steps as σ(b)^k = exp(−k/τ), τ = −1/ln σ(b). For that factor to stay above ``threshold``
    over the whole sequence of length T, τ ≥ T / ln(1/threshold); solving σ(b) = exp(−1/τ) gives
    b = −ln(exp(1/τ) − 1). The new bias is that value, and at least 1 (Jozefowicz et al. 2015);
    when the bias already exceeds it, +1. The change is split in halves over ``bias_ih`` and
    ``bias_hh`` (their sum is the effective bias).

    The default ``threshold`` is e⁻¹, i.e. τ ≥ T: the gate's memory spans the whole dependency, the
    upper end of the range chrono initialisation draws τ from (Tallec & Ollivier 2018). A weaker
    target (the gradient horizon's 1e-3, τ ≥ T/6.9) was tried first and is too little in practice:
    on the calibration half of ``benchmarks/trainability.py`` (recall task, fixed forget biases) the
    share of LSTMs that learned falls from τ ≥ T to τ < T/6.9 (the counts are ``FORGET_TAU`` of
    :mod:`._trainability_table`, written by ``benchmarks/trainability_calibrate.py fit``, and
    quoted in the remedy's text); the remedy benchmark
    (``benchmarks/remedies_trained.py``) checks the target on held-out runs.

    Returns:
        dict with ``b_now``, ``tau_now``, ``tau_target``, ``b_target``, ``b_new``, ``tau_new``,
        ``delta``, ``seq_len`` and ``assumed`` (list of the defaults used).

    Example:
        >>> p = forget_bias_plan({"seq_len": 100, "forget_bias": -3.0})
        >>> round(p["tau_target"], 1), round(p["b_new"], 2), round(p["delta"], 2)
        (100.0, 4.6, 7.6)
    """
    assumed = []
    T = _num(evidence, "seq_len")
    if T is None or T < 1:
        T = float(_DEFAULT_SEQ_LEN)
        assumed.append(f"sequence length unknown, {_DEFAULT_SEQ_LEN} assumed")
    b_now = _num(evidence, key)
    if b_now is None and key != "forget_bias":
        b_now = _num(evidence, "forget_bias")
    source = "the mean effective bias b_ih + b_hh"
    if b_now is None:
        keep = _num(evidence, "keep_mean")
        tau = _num(evidence, "memory_time")
        if keep is not None and 0 < keep < 1:
            b_now, source = math.log(keep / (1 - keep)), "logit of the mean gate value"
        elif tau is not None and tau > 0:
            b_now, source = bias_of_memory_time(tau), "the measured memory time"
        else:
            b_now, source = 0.0, "assumed"
            assumed.append("forget bias unknown, 0 assumed (PyTorch's initialisation)")
    tau_now = memory_time(b_now)
    tau_target = max(T / math.log(1.0 / threshold), 1.0)
    b_target = max(bias_of_memory_time(tau_target), 1.0)
    b_new = b_target if b_now < b_target else b_now + 1.0
    return {"b_now": b_now, "b_source": source, "tau_now": tau_now, "tau_target": tau_target,
            "b_target": b_target, "b_new": b_new, "tau_new": memory_time(b_new),
            "delta": b_new - b_now, "seq_len": T, "threshold": threshold, "assumed": assumed}


def chrono_t_max(evidence: Mapping[str, Any]) -> Tuple[int, List[str]]:
    """T_max for chrono initialisation: the sequence length (at least 3), else 100 assumed."""
    T = _num(evidence, "seq_len")
    if T is None or T < 1:
        return _DEFAULT_SEQ_LEN, [f"sequence length unknown, T_max = {_DEFAULT_SEQ_LEN} assumed"]
    return max(int(round(T)), 3), []


def critical_gain(evidence: Mapping[str, Any]) -> Dict[str, Any]:
    """The gain g of an orthogonal W_hh that puts an Elman RNN at χ = 1 (edge of chaos).

    Mean field (Chen et al. 2018): χ = σ_w² E[φ′(h)²] and λ₁ ≈ ½ ln χ. With the current scale
    s = ‖W_hh‖₂ (or the spectral radius) and the measured λ₁: E[φ′²] ≈ exp(2λ₁)/s², and χ = 1 needs
    g = 1/√E[φ′²] = s·exp(−λ₁). This holds E[φ′²] fixed (first order: a larger gain saturates tanh
    more), so it is an estimate to re-measure. φ′ ≤ 1 for tanh and ReLU, so g ≥ 1; g is kept in
    [1, 3]. Without λ₁: g = 1 (critical for tanh at small activity).

    Example:
        >>> round(critical_gain({"lambda1": -0.8, "w_hh_norm": 0.5})["gain"], 3)
        1.113
    """
    lam = _num(evidence, "lambda1")
    s = _num(evidence, "w_hh_norm") or _num(evidence, "spectral_radius")
    out = {"lambda1": lam, "scale": s, "chi_now": None, "phi2": None, "clamped": False}
    if lam is None or s is None or s <= 0:
        out.update(gain=1.0, basis="λ₁ or ‖W_hh‖₂ unknown: gain 1 (critical for tanh at small "
                                   "activity)")
        return out
    chi = math.exp(2 * lam)
    phi2 = min(chi / s ** 2, 1e6)
    g = s * math.exp(-lam)
    gc = min(max(g, 1.0), 3.0)
    out.update(chi_now=chi, phi2=phi2, gain=gc, clamped=(gc != g), basis="mean field")
    return out


def clip_threshold(evidence: Mapping[str, Any], multiple: float = 2.0) -> Dict[str, Any]:
    """``max_norm`` for global-norm clipping: ``multiple`` × the median recorded gradient norm.

    Pascanu et al. (2013, §3.2) clip at 0.5–10× the running mean of the norm; 2× the median leaves
    typical steps alone and cuts the spikes. Without recorded norms: 1.0 (a common start).
    """
    med, mx = _num(evidence, "grad_norm_median"), _num(evidence, "grad_norm_max")
    if med is None or med <= 0:
        return {"max_norm": 1.0, "median": None, "max": mx, "known": False}
    return {"max_norm": multiple * med, "median": med, "max": mx, "known": True,
            "multiple": multiple}


def truncation_window(evidence: Mapping[str, Any], few: float = 5.0) -> Dict[str, Any]:
    """Truncated-BPTT window: ``few``/|λ₁| steps, within [2, T]; float32 limit 15.9/|λ₁|.

    Contributions from beyond ``few``/|λ₁| steps are below exp(−few) (0.7 % for 5) of the nearest
    ones; beyond 15.9/|λ₁| they are below float32 resolution and are lost to rounding anyway.
    """
    lam = _num(evidence, "lambda1")
    rate = _num(evidence, "rate")
    T = _num(evidence, "seq_len")
    decay = lam if (lam is not None and lam < 0) else (rate if (rate is not None and rate < 0) else None)
    if decay is None:
        k = 50 if T is None else max(2, min(int(T), 50))
        return {"window": k, "known": False, "float32_lag": None, "decay": None}
    k = int(math.ceil(few / abs(decay)))
    if T is not None:
        k = min(k, max(int(T), 2))
    return {"window": max(k, 2), "known": True, "float32_lag": _LN_FLOAT32_EPS / abs(decay),
            "decay": decay, "few": few}


# ------------------------------------------------------------------------------------------------
# the catalogue: one builder per remedy


def _gate_comment(site_kind: str) -> str:
    return {"lstm": "gate order i, f, g, o", "gru": "gate order r, z, n"}.get(site_kind, "")


def _weight_hh_loop(c: _Ctx, body: List[str], indent: str = "    ") -> List[str]:
    """Lines that bind ``W`` to the recurrent weight(s) of the site and run ``body`` on each."""
    if c.site_kind == "cell":
        lines = [f"for name, W in {c.m}.named_parameters():",
                 "    if W.dim() == 2 and W.shape[0] == W.shape[1]:  # square: recurrent weights "
                 "(check the names)"]
        return [indent + l for l in lines] + [indent + "        " + b for b in body]
    if c.suffix:
        return [indent + f"W = {c.param('weight_hh')}"] + [indent + b for b in body]
    return ([indent + f"for name, W in {c.m}.named_parameters():",
             indent + "    if name.startswith(\"weight_hh\"):"]
            + [indent + "        " + b for b in body])


def _r_orthogonal_init(c: _Ctx) -> Remedy:
    w = c.get("w_hh_norm")
    lam = c.get("lambda1")
    bits = []
    if w is not None:
        bits.append(f"‖W_hh‖₂ = {fmt(w)}")
    if lam is not None:
        bits.append(f"λ₁ = {fmt(lam)} per step")
    evid = (", ".join(bits) + ": ") if bits else ""
    if c.kind == "exploding":
        why = (f"{evid}the recurrent map stretches some direction at every step{c.where}. An "
               f"orthogonal W_hh has every singular value 1, so the linear part of a step neither "
               f"grows nor shrinks the gradient (Saxe et al. 2014); re-initialising resets the "
               f"spectrum training has inflated.")
    else:
        hor = _raw(c.ev, "horizon")
        T = c.seq_len()
        reach = (f" and the gradient falls below 1e-3 after {fmt(hor)} of {fmt(T)} steps"
                 if hor is not None and math.isfinite(hor) else "")
        why = (f"{evid}each step shrinks the gradient{reach}{c.where}. An orthogonal W_hh has "
               f"every singular value 1, so the linear part of a step preserves norms (Saxe et al. "
               f"2014) and only φ′ ≤ 1 of the nonlinearity still shrinks it.")
    if c.gated():
        body_note = f"# one orthogonal block per gate ({_gate_comment(c.site_kind)})"
    else:
        body_note = "# gate blocks: 1 (RNN), 3 (GRU: r, z, n), 4 (LSTM: i, f, g, o)"
    if c.site_kind == "cell":
        body = ["torch.nn.init.orthogonal_(W)"]
        lines = ["import torch", "", "with torch.no_grad():"] + _weight_hh_loop(c, body)
    else:
        body = [f"H = {c.m}.hidden_size",
                f"for k in range(W.shape[0] // H):  {body_note}",
                "    torch.nn.init.orthogonal_(W[k * H:(k + 1) * H])  # gain 1: singular values 1"]
        lines = ["import torch", "", "with torch.no_grad():"] + _weight_hh_loop(c, body)
    return Remedy("orthogonal_init", "Orthogonal recurrent weights (W_hh)", c.finish(why),
                  "\n".join(lines) + "\n",
                  "Saxe, McClelland & Ganguli 2014, Exact solutions to the nonlinear dynamics of "
                  "learning in deep linear networks")


def _r_irnn(c: _Ctx) -> Remedy:
    lam = c.get("lambda1")
    now = f"λ₁ is {fmt(lam)} per step now{c.where}; " if lam is not None else ""
    why = (f"{now}with W_hh = I, zero biases and ReLU every step's Jacobian is diag(1[a > 0]): "
           f"exactly 1 along the active units, so the gradient is carried without shrinking while "
           f"units stay active (Le et al. 2015). Pair it with clipping: once training pushes an "
           f"eigenvalue of W_hh above 1 a ReLU RNN can explode.")
    if c.site_kind == "cell":
        code = ["import torch", "", "with torch.no_grad():",
                f"    for name, W in {c.m}.named_parameters():",
                "        if W.dim() == 2 and W.shape[0] == W.shape[1]:  # recurrent weights (check)",
                "            W.copy_(torch.eye(W.shape[0]))",
                "        elif name.endswith(\"bias\"):",
                "            W.zero_()",
                "# and use torch.relu as the cell's nonlinearity"]
    else:
        code = ["import torch", "",
                f"rnn = {c.m}  # nn.RNN: every layer and direction",
                "with torch.no_grad():",
                "    for name, p in rnn.named_parameters():",
                "        if name.startswith(\"weight_hh\"):",
                "            p.copy_(torch.eye(rnn.hidden_size))",
                "        elif name.startswith(\"bias\"):",
                "            p.zero_()",
                "rnn.nonlinearity, rnn.mode = \"relu\", \"RNN_RELU\"  # as nn.RNN(..., nonlinearity=\"relu\")"]
    return Remedy("irnn", "IRNN: identity W_hh, zero bias, ReLU", c.finish(why), "\n".join(code) + "\n",
                  "Le, Jaitly & Hinton 2015, A simple way to initialize recurrent networks of "
                  "rectified linear units")


def _r_critical_init(c: _Ctx) -> Remedy:
    cg = critical_gain(c.ev)
    g = cg["gain"]
    if cg["chi_now"] is not None:
        why = (f"Mean field: χ = σ_w² E[φ′(h)²] ≈ exp(2λ₁) = {fmt(cg['chi_now'])} now{c.where} "
               f"({'ordered: vanishing' if cg['chi_now'] < 1 else 'chaotic: exploding'}); with "
               f"‖W_hh‖₂ = {fmt(cg['scale'])} that means E[φ′²] ≈ {fmt(cg['phi2'])}, so an orthogonal "
               f"W_hh with gain {fmt(g)} puts χ at 1, the edge of chaos (Chen et al. 2018). First "
               f"order: it holds E[φ′²] fixed; re-probe to check.")
        if cg["clamped"]:
            why += f" (The gain is kept in [1, 3]; the formula gave {fmt(cg['scale'] * math.exp(-cg['lambda1']))}.)"
    else:
        why = (f"χ = σ_w² E[φ′(h)²] = 1 is the edge between vanishing (χ < 1) and exploding "
               f"(χ > 1) (Chen et al. 2018); {cg['basis']}.")
    body = [f"torch.nn.init.orthogonal_(W, gain={_lit(g)})  # chi = gain**2 * E[phi'(h)**2] ~ 1"]
    lines = ["import torch", "", "with torch.no_grad():"] + _weight_hh_loop(c, body)
    return Remedy("critical_init", f"Critical initialisation χ = 1 (orthogonal W_hh, gain {fmt(g)})",
                  c.finish(why), "\n".join(lines) + "\n",
                  "Chen, Pennington & Schoenholz 2018, Dynamical isometry and a mean field theory "
                  "of RNNs: gating enables signal propagation in recurrent neural networks")


def _switch_code(c: _Ctx, cls: str) -> List[str]:
    if c.site_kind == "cell":
        h = _size_lit(c.get("hidden_size"), "HIDDEN_SIZE")
        return ["from torch import nn", "",
                f"# replace the cell {c.module!r} by a built-in gated cell of the same state size;",
                "# INPUT_SIZE: the size of the per-step input your cell takes",
                f"cell = nn.{cls}Cell(input_size=INPUT_SIZE, hidden_size={h})"
                + ("  # returns (h, c)" if cls == "LSTM" else "")]
    lines = ["import torch", "from torch import nn", "",
             f"old = {c.m}  # nn.RNN",
             f"new = nn.{cls}(old.input_size, old.hidden_size, num_layers=old.num_layers, bias=old.bias,",
             f"       {' ' * len(cls)}batch_first=old.batch_first, dropout=old.dropout, bidirectional=old.bidirectional)",
             "new = new.to(old.weight_hh_l0.device, old.weight_hh_l0.dtype)",
             "H = old.hidden_size",
             f"with torch.no_grad():  # keep-gate bias 1 (Jozefowicz et al. 2015); "
             f"{'gate order i, f, g, o' if cls == 'LSTM' else 'gate order r, z, n'}",
             "    for name, p in new.named_parameters():",
             "        if name.startswith(\"bias_ih\"):",
             "            p[H:2 * H].fill_(1.0)",
             "        elif name.startswith(\"bias_hh\"):",
             "            p[H:2 * H].fill_(0.0)"]
    if cls == "LSTM":
        lines += ["# nn.LSTM returns (out, (h, c)) where nn.RNN returned (out, h), and takes (h0, c0):",
                  "# either change the call site, or wrap it so it answers like nn.RNN:",
                  "from gradscope.analysis.trials import LSTMAsRNN",
                  _assign(c.module, "LSTMAsRNN(new)")]
    else:
        lines += ["# nn.GRU takes and returns the same (out, h) as nn.RNN: a drop-in replacement",
                  _assign(c.module, "new")]
    lines.append("# the optimizer holds the old parameters: create it again after this")
    return lines


def _r_switch(cls: str) -> Callable[[_Ctx], Remedy]:
    def build(c: _Ctx) -> Remedy:
        lam = c.get("lambda1")
        now = f"with λ₁ = {fmt(lam)} per step{c.where} " if lam is not None else ""
        if cls == "LSTM":
            mech = ("The LSTM's cell path gives ∂c_T/∂c_t = Π diag(f): with forget gates near 1 the "
                    "gradient crosses many steps without the W_hh product")
            cost = "4× the recurrent parameters of an Elman RNN"
        else:
            mech = ("The GRU's update h′ = (1−z)⊙n + z⊙h adds diag(z) to every step's Jacobian: with "
                    "z near 1 the gradient crosses many steps without the W_hh product")
            cost = "3× the recurrent parameters; same (out, h) interface as nn.RNN"
        why = (f"{mech} that {now}makes this RNN vanish (Hochreiter & Schmidhuber 1997; Cho et al. "
               f"2014). Keep-gate bias 1 gives τ ≈ 3.2 steps at initialisation and the gates learn "
               f"longer; costs {cost}.")
        ref = ("Hochreiter & Schmidhuber 1997 (LSTM); Gers et al. 2000 (forget gate)" if cls == "LSTM"
               else "Cho et al. 2014 (GRU); Chung et al. 2014 (gated RNN comparison)")
        return Remedy(f"switch_to_{cls.lower()}", f"Switch the Elman RNN to nn.{cls}", c.finish(why),
                      "\n".join(_switch_code(c, cls)) + "\n", ref)
    return build


def _bias_lines(c: _Ctx, stmts: List[str]) -> List[str]:
    """Lines applying ``stmts`` to the site's biases; ``{ih}``/``{hh}`` in them name the two biases."""
    if c.suffix:
        ih, hh = c.param("bias_ih"), c.param("bias_hh")
        return ["    " + s.format(ih=ih, hh=hh) for s in stmts]
    if c.site_kind == "cell":
        ih, hh = f"{c.m}.bias_ih", f"{c.m}.bias_hh"
        return (["    # nn.LSTMCell / nn.GRUCell biases; adapt the names to your cell"]
                + ["    " + s.format(ih=ih, hh=hh) for s in stmts])
    return ([f"    for k in range({c.m}.num_layers):  # every layer (add the _reverse biases if "
             f"bidirectional)",
             f"        b_ih, b_hh = getattr({c.m}, f\"bias_ih_l{{k}}\"), getattr({c.m}, f\"bias_hh_l{{k}}\")"]
            + ["        " + s.format(ih="b_ih", hh="b_hh") for s in stmts])


def _forget_evidence() -> str:
    """The calibration runs the τ ≥ T target rests on, from the generated table."""
    ev = _table.FORGET_TAU
    (n1, k1), (n2, k2), (n3, k3) = ev["tau >= T"], ev["T/ln 1000 <= tau < T"], ev["tau < T/ln 1000"]
    return (f"In the calibration half of gradscope's trainability benchmark (recall task) LSTMs learned "
            f"in {k1} of {n1} runs with τ ≥ T, {k2} of {n2} with T/6.9 ≤ τ < T and {k3} of {n3} with "
            f"τ < T/6.9.")


def _r_forget_bias(c: _Ctx) -> Remedy:
    gru = c.site_kind == "gru"
    p = forget_bias_plan(c.ev, key="update_bias" if gru else "forget_bias")
    c.notes += p["assumed"]
    gate, b = ("update-gate (z)", "b_z") if gru else ("forget-gate", "b_f")
    T = p["seq_len"]
    half = p["delta"] / 2
    tau_meas = c.get("memory_time")
    meas = f" (measured memory time {fmt(tau_meas)} steps)" if tau_meas is not None else ""
    path = "kept path z⊙h" if gru else "cell path"
    why = (f"The {gate} bias {b} = {fmt(p['b_now'])}{c.where} ({p['b_source']}) gives τ = -1/ln σ({b}) "
           f"= {fmt(p['tau_now'])} steps{meas}. For the {path} to keep e⁻¹ of the gradient over all "
           f"{fmt(T)} steps, τ ≥ {fmt(p['tau_target'])} ⇒ {b} ≥ "
           f"-ln(exp(1/{fmt(p['tau_target'])}) - 1) = {fmt(p['b_target'])}; adding {fmt(p['delta'])} "
           f"(half to bias_ih, half to bias_hh) sets {b} = {fmt(p['b_new'])}, τ = {fmt(p['tau_new'])} "
           f"steps. Jozefowicz et al. (2015) recommend at least 1 (τ = 3.2). {_forget_evidence()}")
    if gru:
        why += (" In PyTorch's GRU h′ = (1−z)⊙n + z⊙h, so z is the gate that keeps memory; that evidence "
                "is for LSTMs, the GRU update gate's target follows by analogy.")
    comment = f"# {gate} block [H:2H] ({_gate_comment(c.site_kind) or 'LSTM: i, f, g, o; GRU: r, z, n'})"
    tau_new = _lit(p["tau_new"]) if math.isfinite(p["tau_new"]) else "inf"
    tau_now = _lit(p["tau_now"]) if math.isfinite(p["tau_now"]) else "inf"
    stmts = [f"{{ih}}[H:2 * H] += {_lit(half, 4)}  # {b} {_lit(p['b_now'])} -> {_lit(p['b_new'])}",
             f"{{hh}}[H:2 * H] += {_lit(half, 4)}  # tau {tau_now} -> {tau_new} steps"]
    lines = ["import torch", "", f"H = {c.m}.hidden_size", f"with torch.no_grad():  {comment}"] + _bias_lines(c, stmts)
    return Remedy("forget_bias", f"Raise the {gate} bias to {fmt(p['b_new'])} (τ {fmt(p['tau_now'])} → "
                  f"{fmt(p['tau_new'])} steps)", c.finish(why), "\n".join(lines) + "\n",
                  "Jozefowicz, Zaremba & Sutskever 2015, An empirical exploration of recurrent network "
                  "architectures; Gers, Schmidhuber & Cummins 2000, Learning to forget")


def _r_chrono_init(c: _Ctx) -> Remedy:
    T_max, assumed = chrono_t_max(c.ev)
    c.notes += assumed
    gru = c.site_kind == "gru"
    why = (f"Chrono initialisation draws b_f = ln u, u ~ U[1, T_max − 1] with T_max = {T_max} (the "
           f"sequence length){c.where}: σ(ln u) = u/(1+u), so each unit's memory time τ ≈ u + ½ "
           f"spreads over 1.5 … {fmt(T_max - 0.5)} steps and covers every dependency up to the "
           f"sequence length (Tallec & Ollivier 2018).")
    if gru:
        why += (" For a GRU the update gate z plays the forget gate's role (h′ = (1−z)⊙n + z⊙h); the "
                "paper derives the rule for LSTM, this is the analogue.")
        stmts = ["b_f = torch.log(torch.empty(H).uniform_(1, T_max - 1))",
                 "{ih}[H:2 * H] = b_f  # update gate z (gate order r, z, n)",
                 "{hh}[H:2 * H] = 0.0"]
    else:
        why += " b_i = −b_f keeps new input from flooding the long-memory units."
        stmts = ["b_f = torch.log(torch.empty(H).uniform_(1, T_max - 1))",
                 "{ih}[H:2 * H] = b_f  # forget gate (gate order i, f, g, o)",
                 "{hh}[H:2 * H] = 0.0",
                 "{ih}[:H] = -b_f  # input gate",
                 "{hh}[:H] = 0.0"]
    lines = ["import torch", "", f"H, T_max = {c.m}.hidden_size, {T_max}", "with torch.no_grad():"] \
        + _bias_lines(c, stmts)
    return Remedy("chrono_init", f"Chrono initialisation of the gate biases (T_max = {T_max})",
                  c.finish(why), "\n".join(lines) + "\n",
                  "Tallec & Ollivier 2018, Can recurrent neural networks warp time?")


def _r_clip_grad_norm(c: _Ctx) -> Remedy:
    ct = clip_threshold(c.ev)
    mn = ct["max_norm"]
    if ct["known"]:
        why = (f"Recorded global gradient norm: median {fmt(ct['median'])}"
               + (f", max {fmt(ct['max'])} ({fmt(ct['max'] / ct['median'])}× the median)"
                  if ct["max"] is not None else "")
               + f". Clipping at 2× the median = {fmt(mn)} (Pascanu et al. 2013 §3.2 suggest 0.5–10× "
                 f"the running mean) rescales the spikes and leaves typical steps alone.")
        if ct["max"] is not None and ct["max"] <= mn:
            why += " No recorded step exceeded it: it only guards against future spikes."
    else:
        why = ("No gradient norms were recorded (record them with gradscope.watch during training); "
               "max_norm = 1.0 is a common start. Set it to 0.5–10× the running mean of the global "
               "norm (Pascanu et al. 2013 §3.2).")
    lam = c.get("lambda1")
    if lam is not None and lam > 0:
        why += (f" λ₁ = {fmt(lam)} per step: the Jacobian grows ×1000 in {fmt(math.log(1000) / lam)} "
                f"steps{c.where}.")
    why += " Clipping keeps the direction of a step and bounds its size; it does not make a vanishing gradient larger."
    code = ["import torch", "",
            "# in the training loop, after loss.backward() and before optimizer.step():",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={_lit(mn)})"]
    return Remedy("clip_grad_norm", f"Clip the global gradient norm at {fmt(mn)}", c.finish(why),
                  "\n".join(code) + "\n",
                  "Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
                  "networks, §3.2")


def _r_lower_lr(c: _Ctx) -> Remedy:
    bits = []
    med, mx = c.get("grad_norm_median"), c.get("grad_norm_max")
    if med and mx:
        bits.append(f"gradient-norm spikes up to {fmt(mx / med)}× the median")
    sat = c.get("saturated")
    if sat is not None and c.kind == "saturated_gates":
        bits.append(f"{fmt(100 * sat)}% of gate activations saturated (< 0.1 or > 0.9)")
    dead = c.get("dead_units")
    if dead is not None and c.kind == "dead_units":
        bits.append(f"{fmt(100 * dead)}% of units dead")
    lam = c.get("lambda1")
    if lam is not None and lam > 0:
        bits.append(f"λ₁ = {fmt(lam)} per step")
    ev = ("; ".join(bits) + f"{c.where}. ") if bits else ""
    why = (f"{ev}Large steps push weights into regions where units saturate, die or the recurrence "
           f"turns chaotic; a smaller learning rate (÷3 here, then re-measure) makes each step "
           f"smaller. It does not make a vanishing gradient carry further.")
    code = ["# after creating the optimizer (or pass lr=... when you create it):",
            "for group in optimizer.param_groups:",
            "    group[\"lr\"] *= 0.3"]
    return Remedy("lower_lr", "Lower the learning rate (×0.3)", c.finish(why), "\n".join(code) + "\n",
                  "Pascanu, Mikolov & Bengio 2013; Zhai et al. 2023 (attention: lower LR and warm-up)")


def _ln_cell_code(c: _Ctx) -> List[str]:
    h = _size_lit(c.get("hidden_size"), "HIDDEN_SIZE")
    i = "INPUT_SIZE"
    if c.suffix and c.site_kind in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        i, h = f"{c.m}.weight_ih_{c.suffix}.shape[1]", f"{c.m}.hidden_size"
    if c.site_kind in ("rnn_tanh", "rnn_relu"):
        act = "torch.relu" if c.site_kind == "rnn_relu" else "torch.tanh"
        return ["import torch", "from torch import nn", "", "",
                "class LayerNormRNNCell(nn.Module):",
                "    \"\"\"h' = phi(LN(W_ih x + W_hh h)) (Ba et al. 2016).\"\"\"", "",
                "    def __init__(self, input_size, hidden_size):",
                "        super().__init__()",
                "        self.ih = nn.Linear(input_size, hidden_size)",
                "        self.hh = nn.Linear(hidden_size, hidden_size, bias=False)",
                "        self.ln = nn.LayerNorm(hidden_size)", "",
                "    def forward(self, x, h):",
                f"        return {act}(self.ln(self.ih(x) + self.hh(h)))", "", "",
                f"# replaces {c.m} (a fused layer) by a loop over time steps:",
                f"cell = LayerNormRNNCell(input_size={i}, hidden_size={h})"]
    return ["import torch", "from torch import nn", "", "",
            "class LayerNormLSTMCell(nn.Module):",
            "    \"\"\"LSTM cell with LayerNorm on the gate pre-activations and the cell (Ba et al. 2016).\"\"\"", "",
            "    def __init__(self, input_size, hidden_size):",
            "        super().__init__()",
            "        self.ih = nn.Linear(input_size, 4 * hidden_size, bias=False)",
            "        self.hh = nn.Linear(hidden_size, 4 * hidden_size)",
            "        self.ln_ih, self.ln_hh = nn.LayerNorm(4 * hidden_size), nn.LayerNorm(4 * hidden_size)",
            "        self.ln_c = nn.LayerNorm(hidden_size)", "",
            "    def forward(self, x, state):",
            "        h, c = state",
            "        i, f, g, o = (self.ln_ih(self.ih(x)) + self.ln_hh(self.hh(h))).chunk(4, -1)",
            "        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)",
            "        h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))",
            "        return h, c", "", "",
            f"# replaces {c.m} by a loop over time steps (nn.LSTM has no LayerNorm option):",
            f"cell = LayerNormLSTMCell(input_size={i}, hidden_size={h})"]


def _r_layernorm_cell(c: _Ctx) -> Remedy:
    sat = c.get("saturated")
    if sat is not None:
        ev = (f"{fmt(100 * sat)}% of gate activations{c.where} are saturated (< 0.1 or > 0.9), where "
              f"σ′ < 0.09: those gates pass almost no gradient. ")
    else:
        ev = ""
    why = (f"{ev}LayerNorm on the pre-activations keeps them at zero mean and unit variance at every "
           f"step, so gates stay in their sensitive range and the scale of h cannot drift (Ba et al. "
           f"2016). It needs a cell written out per step (PyTorch's fused layers have no LayerNorm).")
    return Remedy("layernorm_cell", "LayerNorm inside the recurrent cell", c.finish(why),
                  "\n".join(_ln_cell_code(c)) + "\n",
                  "Ba, Kiros & Hinton 2016, Layer normalization")


def _r_leaky_relu(c: _Ctx) -> Remedy:
    dead = c.get("dead_units")
    ev = (f"{fmt(100 * dead)}% of the units{c.where} are never active over any sample and step: ReLU′ = 0 "
          f"there, so those rows of every Jacobian are zero and no gradient flows through them. "
          if dead is not None else "")
    why = (f"{ev}LeakyReLU keeps a slope (0.01) below zero, so a unit can come back. nn.RNN offers "
           f"only tanh and ReLU, so it needs a cell; the snippet copies the layer's weights into one.")
    suffix = c.suffix or "l0"
    code = ["import torch", "from torch import nn", "import torch.nn.functional as F", "", "",
            "class LeakyRNNCell(nn.Module):",
            "    def __init__(self, input_size, hidden_size, negative_slope=0.01):",
            "        super().__init__()",
            "        self.ih = nn.Linear(input_size, hidden_size)",
            "        self.hh = nn.Linear(hidden_size, hidden_size)",
            "        self.negative_slope = negative_slope", "",
            "    def forward(self, x, h):",
            "        return F.leaky_relu(self.ih(x) + self.hh(h), self.negative_slope)", "", ""]
    if c.site_kind in ("rnn_relu", "rnn_tanh"):
        code += [f"rnn = {c.m}",
                 f"cell = LeakyRNNCell(rnn.weight_ih_{suffix}.shape[1], rnn.hidden_size)",
                 "with torch.no_grad():  # start from the trained weights of this layer",
                 f"    cell.ih.weight.copy_(rnn.weight_ih_{suffix})",
                 f"    cell.hh.weight.copy_(rnn.weight_hh_{suffix})",
                 "    if rnn.bias:",
                 f"        cell.ih.bias.copy_(rnn.bias_ih_{suffix})",
                 f"        cell.hh.bias.copy_(rnn.bias_hh_{suffix})",
                 "# then loop over time: h = cell(x[:, t], h)"]
    else:
        code += ["cell = LeakyRNNCell(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE)"]
    return Remedy("leaky_relu", "LeakyReLU instead of ReLU", c.finish(why), "\n".join(code) + "\n",
                  "Maas, Hannun & Ng 2013, Rectifier nonlinearities improve neural network acoustic "
                  "models")


def _r_reinit_dead(c: _Ctx) -> Remedy:
    dead = c.get("dead_units")
    ev = (f"{fmt(100 * dead)}% of the units{c.where} never fire on the probed batch. "
          if dead is not None else "")
    why = (f"{ev}Re-drawing their incoming weights and biases (PyTorch's U(±1/√H)) gives them a "
           f"chance to fire again; their rows of the Jacobian stop being zero. Treat the cause too "
           f"(learning rate, LeakyReLU), or they die again.")
    H = "rnn.hidden_size"
    if c.suffix and c.site_kind in ("rnn_relu", "rnn_tanh"):
        layer_note = ("# out holds the top layer's states; for a lower layer run the layers one by one"
                      if not c.suffix.startswith("l0") else "# out: the states of this layer when "
                                                            "num_layers == 1")
        code = ["import torch", "",
                f"rnn = {c.m}",
                f"H = {H}",
                "with torch.no_grad():",
                "    out, _ = rnn(x)  # x: a batch of your inputs",
                f"    {layer_note}",
                "    dead = (out[..., :H] <= 0).reshape(-1, H).all(0)  # units never active",
                "    bound = H ** -0.5",
                "    for name, p in rnn.named_parameters():",
                f"        if name.endswith(\"_{c.suffix}\"):",
                "            p[dead] = torch.empty_like(p[dead]).uniform_(-bound, bound)"]
    else:
        code = ["import torch", "",
                f"rnn = {c.m}",
                f"H = {H}",
                "with torch.no_grad():",
                "    out, _ = rnn(x)  # x: a batch of your inputs",
                "    dead = (out[..., :H] <= 0).reshape(-1, H).all(0)  # top layer, forward direction",
                "    bound = H ** -0.5",
                "    top = f\"_l{rnn.num_layers - 1}\"",
                "    for name, p in rnn.named_parameters():",
                "        if name.endswith(top):",
                "            p[dead] = torch.empty_like(p[dead]).uniform_(-bound, bound)"]
    return Remedy("reinit_dead", "Re-initialise the dead ReLU units", c.finish(why),
                  "\n".join(code) + "\n",
                  "Lu et al. 2019, Dying ReLU and initialization: theory and numerical examples")


def _r_truncated_bptt(c: _Ctx) -> Remedy:
    tw = truncation_window(c.ev)
    K = tw["window"]
    if tw["known"]:
        why = (f"The gradient decays at {fmt(tw['decay'])} per step{c.where}: beyond "
               f"15.9/|λ₁| = {fmt(tw['float32_lag'])} steps it is below float32 resolution and lost "
               f"to rounding anyway. Back-propagating through windows of {tw['few']:g}/|λ₁| ≈ {K} "
               f"steps keeps every contribution above exp(−{tw['few']:g}) = "
               f"{fmt(math.exp(-tw['few']))} of the nearest and saves memory and time. It does not "
               f"make the model learn longer dependencies; gating does.")
    else:
        why = (f"No decay rate is known{c.where}; a window of {K} steps is a placeholder. Choose a "
               f"few times 1/|λ₁| once it is measured (gradscope.probe).")
    code = [f"K = {K}  # window (steps)",
            "state = None",
            "for t0 in range(0, x.shape[1], K):  # x: [B, T, I] (batch_first)",
            f"    out, state = {c.m}(x[:, t0:t0 + K], state)",
            "    loss = loss_fn(out, y[:, t0:t0 + K])  # apply the rest of your model to out first",
            "    optimizer.zero_grad()",
            "    loss.backward()",
            "    optimizer.step()",
            "    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()"]
    return Remedy("truncated_bptt", f"Truncated BPTT over windows of {K} steps", c.finish(why),
                  "\n".join(code) + "\n",
                  "Williams & Peng 1990; Sutskever 2013 (thesis), truncated backpropagation through "
                  "time")


def _r_gating(c: _Ctx) -> Remedy:
    lam = c.get("lambda1")
    prec = (f" With λ₁ = {fmt(lam)} the ungated gradient is below float32 resolution after "
            f"{fmt(_LN_FLOAT32_EPS / abs(lam))} steps." if lam is not None and lam < 0 else "")
    if c.gated():
        p = forget_bias_plan(c.ev, key="update_bias" if c.site_kind == "gru" else "forget_bias")
        why = (f"The site{c.where} is already gated; what limits it is how shut its keep gates "
               f"are (b_f = {fmt(p['b_now'])}, τ = {fmt(p['tau_now'])} steps).{prec} Open them: "
               f"forget_bias or chrono_init.")
        return Remedy("gating", "Open the keep gates (the cell is already gated)", c.finish(why),
                      _r_chrono_init(c).code, "Gers et al. 2000; Tallec & Ollivier 2018")
    why = (f"A gated update h′ = (1−z)⊙h + z⊙h̃ makes the per-step factor along the kept path z-close "
           f"to 1 instead of the W_hh product, so the gradient survives many more steps before "
           f"underflowing{c.where}.{prec} For nn.RNN this is a switch to nn.GRU.")
    if c.site_kind == "cell":
        code = ["import torch", "from torch import nn", "", "",
                "class GatedUpdate(nn.Module):",
                "    \"\"\"Wraps a cell h~ = cell(x, h) into h' = (1 - z) * h + z * h~ (a learned leak).\"\"\"", "",
                "    def __init__(self, cell, input_size, hidden_size):",
                "        super().__init__()",
                "        self.cell = cell",
                "        self.gate = nn.Linear(input_size + hidden_size, hidden_size)",
                "        nn.init.constant_(self.gate.bias, -1.0)  # z ~ 0.27: keeps 73 % of h per step", "",
                "    def forward(self, x, h):",
                "        z = torch.sigmoid(self.gate(torch.cat([x, h], -1)))",
                "        return (1 - z) * h + z * self.cell(x, h)", "", "",
                f"{_assign(c.module, f'GatedUpdate({c.m}, INPUT_SIZE, HIDDEN_SIZE)')}"]
        code_s = "\n".join(code) + "\n"
    else:
        code_s = "\n".join(_switch_code(c, "GRU")) + "\n"
    return Remedy("gating", "Use a gated update (GRU-style)", c.finish(why), code_s,
                  "Hochreiter & Schmidhuber 1997; Cho et al. 2014; Chen et al. 2018 (gating enables "
                  "signal propagation)")


def _attn_ev(c: _Ctx) -> str:
    bits = []
    for key, label in (("entropy", "normalised attention entropy"), ("attention_entropy", "normalised attention entropy"),
                       ("logit_norm", "‖W_Q W_Kᵀ‖₂"), ("qk_norm", "‖W_Q W_Kᵀ‖₂"),
                       ("rank_residual", "rank-collapse residual"), ("token_cosine", "mean token cosine"),
                       ("grad_ratio", "gradient ratio first/last")):
        v = c.get(key)
        if v is not None and label not in " ".join(bits):
            bits.append(f"{label} {fmt(v)}")
    return ("; ".join(bits) + f"{c.where}. ") if bits else ""


def _r_sigma_reparam(c: _Ctx) -> Remedy:
    why = (f"{_attn_ev(c)}σReparam divides each linear layer's weight by its spectral norm and "
           f"multiplies by a learned scalar γ, Ŵ = γ/σ(W)·W: the attention logits cannot grow "
           f"through a runaway ‖W_Q W_Kᵀ‖, which goes with entropy collapse (Zhai et al. 2023).")
    code = ["import torch", "from torch import nn", "", "",
            "class SigmaReparam(nn.Module):",
            "    \"\"\"y = gamma / sigma(W) * W x + b (Zhai et al. 2023).\"\"\"", "",
            "    def __init__(self, linear):",
            "        super().__init__()",
            "        self.linear = nn.utils.parametrizations.spectral_norm(linear)  # weight / sigma(weight)",
            "        self.gamma = nn.Parameter(torch.ones(()))", "",
            "    def forward(self, x):",
            "        return nn.functional.linear(x, self.gamma * self.linear.weight, self.linear.bias)", "", "",
            f"attn = {c.m}",
            "for name, child in list(attn.named_children()):  # its q/k/v/out projections",
            "    if isinstance(child, nn.Linear):",
            "        setattr(attn, name, SigmaReparam(child))",
            "# nn.MultiheadAttention keeps in_proj_weight as a parameter: reparametrise it instead"]
    return Remedy("sigma_reparam", "σReparam on the attention projections", c.finish(why),
                  "\n".join(code) + "\n",
                  "Zhai et al. 2023, Stabilizing transformer training by preventing attention "
                  "entropy collapse")


def _r_warmup(c: _Ctx) -> Remedy:
    why = (f"{_attn_ev(c)}A linear learning-rate warm-up keeps the first updates small while the "
           f"gradients near the output are large (Post-LN at initialisation, Xiong et al. 2020) and "
           f"while attention logits are still growing (Zhai et al. 2023).")
    code = ["import torch", "",
            "warmup_steps = 1000",
            "scheduler = torch.optim.lr_scheduler.LambdaLR(",
            "    optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))",
            "# call scheduler.step() after every optimizer.step()"]
    return Remedy("warmup", "Learning-rate warm-up (1000 steps)", c.finish(why), "\n".join(code) + "\n",
                  "Xiong et al. 2020, On layer normalization in the transformer architecture; Zhai et "
                  "al. 2023")


def _r_qk_layernorm(c: _Ctx) -> Remedy:
    hd = _size_lit(c.get("head_dim"), "64")
    why = (f"{_attn_ev(c)}LayerNorm on queries and keys bounds the attention logits q·k/√d however "
           f"W_Q and W_K grow, so the softmax cannot collapse onto one key (Dehghani et al. 2023; "
           f"Wortsman et al. 2023).")
    code = ["import math", "from torch import nn", "",
            f"head_dim = {hd}",
            f"attn = {c.m}",
            "attn.q_norm, attn.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)",
            "# in attn.forward, before the scores:",
            "#     q, k = self.q_norm(q), self.k_norm(k)",
            "#     scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)"]
    return Remedy("qk_layernorm", "QK-LayerNorm", c.finish(why), "\n".join(code) + "\n",
                  "Dehghani et al. 2023, Scaling vision transformers to 22 billion parameters; "
                  "Wortsman et al. 2023, Small-scale proxies for large-scale transformer training "
                  "instabilities")


def _r_residual_scaling(c: _Ctx) -> Remedy:
    L = c.get("num_layers")
    assumed = L is None or L < 1
    L = 12 if assumed else int(L)
    if assumed:
        c.notes.append("number of blocks unknown, L = 12 assumed")
    a = 1 / math.sqrt(L)
    why = (f"{_attn_ev(c)}Scaling each residual branch by 1/√L = {fmt(a)} (L = {L} blocks) keeps the "
           f"token representations from collapsing to one direction with depth, and with them the "
           f"query/key gradients (Noci et al. 2022).")
    code = ["import math", "",
            f"L = {L}",
            f"alpha = 1 / math.sqrt(L)  # = {_lit(a)}",
            "# in every block's forward:",
            "#     x = x + alpha * self.attn(self.norm1(x))",
            "#     x = x + alpha * self.mlp(self.norm2(x))"]
    return Remedy("residual_scaling", f"Scale residual branches by 1/√L = {fmt(a)}", c.finish(why),
                  "\n".join(code) + "\n",
                  "Noci et al. 2022, Signal propagation in transformers: theoretical perspectives "
                  "and the role of rank collapse")


def _r_pre_ln(c: _Ctx) -> Remedy:
    why = (f"{_attn_ev(c)}Post-LN (x = LN(x + f(x))) puts large gradients near the output at "
           f"initialisation; Pre-LN (x = x + f(LN(x))) keeps an identity path through every block, "
           f"so gradients are well scaled at every depth and warm-up becomes optional (Xiong et al. "
           f"2020).")
    code = ["import torch", "",
            "for m in model.modules():  # built-in layers: LayerNorm before each sublayer",
            "    if isinstance(m, (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)):",
            "        m.norm_first = True",
            "# own blocks: x = x + attn(ln1(x)); x = x + mlp(ln2(x))  instead of  x = ln1(x + attn(x))"]
    return Remedy("pre_ln", "Pre-LN instead of Post-LN", c.finish(why), "\n".join(code) + "\n",
                  "Xiong et al. 2020, On layer normalization in the transformer architecture")


# Folklore checks: not recommended by remedies_for, but measurable with try_remedies(remedies=[...]).
def _r_relu_nonlinearity(c: _Ctx) -> Remedy:
    w = c.get("w_hh_norm")
    ev = f"‖W_hh‖₂ = {fmt(w)}{c.where}: " if w is not None else ""
    why = (f"{ev}switching tanh to ReLU removes the factor tanh′ ≤ 1, but the step Jacobian "
           f"diag(1[a > 0]) W_hh still shrinks the gradient when W_hh is contractive and grows it "
           f"when ‖W_hh‖ > 1; it helps only with identity/orthogonal W_hh (see irnn). A folklore "
           f"check, not a recommendation.")
    code = [f"rnn = {c.m}  # nn.RNN",
            "rnn.nonlinearity, rnn.mode = \"relu\", \"RNN_RELU\"  # as nn.RNN(..., nonlinearity=\"relu\")"]
    return Remedy("relu_nonlinearity", "Folklore check: ReLU instead of tanh (weights unchanged)",
                  c.finish(why), "\n".join(code) + "\n", "folklore; compare Le et al. 2015 (IRNN)")


def _r_init_check(name: str, title: str, fn: str, args: str, why_core: str, ref: str):
    def build(c: _Ctx) -> Remedy:
        body = [f"H = {c.m}.hidden_size" if c.site_kind != "cell" else "H = W.shape[0]",
                "for k in range(W.shape[0] // H):  # one block per gate",
                f"    torch.nn.init.{fn}(W[k * H:(k + 1) * H]{args})"]
        lines = ["import torch", "", "with torch.no_grad():"] + _weight_hh_loop(c, body)
        return Remedy(name, title, c.finish(why_core + " A folklore check, not a recommendation."),
                      "\n".join(lines) + "\n", ref)
    return build


_xavier = _r_init_check(
    "xavier_init", "Folklore check: Xavier/Glorot W_hh", "xavier_uniform_", "",
    "Xavier/Glorot init is designed for depth: different matrices, one per layer. On a square W_hh "
    "it gives entry variance 1/H, so σ_w² = 1 and the spectral radius ≈ 1 — near the edge of chaos "
    "for tanh at small activity, but what the product of the same W_hh over T steps does depends on "
    "its eigenvalues and the saturation, so measure it.",
    "Glorot & Bengio 2010, Understanding the difficulty of training deep feedforward neural networks")
_he = _r_init_check(
    "he_init", "Folklore check: He/Kaiming W_hh", "kaiming_normal_", ", nonlinearity=\"relu\"",
    "He init (variance 2/H) is designed for ReLU layers in depth. On a recurrent W_hh it gives "
    "spectral radius ≈ √2: a tanh RNN moves toward or past the edge of chaos (how far depends on "
    "its saturation), a ReLU RNN with half its units active sits near χ = 1 on average but its "
    "products still vary widely.",
    "He et al. 2015, Delving deep into rectifiers")


# ------------------------------------------------------------------------------------------------
# the registry: one entry per remedy


_RNN = ("rnn_tanh", "rnn_relu", "cell")      # Elman-type sites (a user cell may be one)
_GATED = ("lstm", "gru", "cell")              # sites with a keep gate (a user cell may have one)
_FUSED_RNN = ("rnn_tanh", "rnn_relu")         # fused nn.RNN layers (what the appliers rewrite)
_FUSED = ("rnn_tanh", "rnn_relu", "lstm", "gru")
_ON_TRAINING = "acts on training, not on the Jacobians a probe measures"


@dataclass(frozen=True)
class RemedySpec:
    """Everything gradscope knows about one remedy, in one place (the entry of :data:`REMEDIES`).

    Attributes:
        name: the catalogue key (``"forget_bias"``).
        build: ``build(ctx) -> Remedy``: title, why, code and reference specialised to one site's
            evidence (``ctx``: what the builder knows, see ``_Ctx``).
        applies_to: the site kinds it makes sense on (None: every kind); :func:`remedies_for`
            leaves it out elsewhere.
        apply: the name of the function in :mod:`gradscope.analysis.trials` that applies it to a
            copy of the model, ``fn(model, targets, ctx) -> (model, renames, what changed)`` (a
            name, so this module stays torch-free and never imports trials); None when it cannot
            be measured on a copy, and then ``untestable`` says why (exactly one of the two).
        apply_kinds: the site kinds whose fused layers ``apply`` rewrites.
        untestable: why a probe of a copy cannot measure it (None when ``apply`` is given).
        model_wide: it can answer a model-wide finding (a gradient-norm spike at ``"(model)"``).
        reinitialising: it re-initialises weights or changes the architecture, so for a trained
            model it undoes the training and is listed after the remedies that work during training.
        folklore: a folklore check: never recommended by :func:`remedies_for`, only tried by name.
    """

    name: str
    build: Callable[[_Ctx], Remedy]
    applies_to: Optional[Tuple[str, ...]] = None
    apply: Optional[str] = None
    apply_kinds: Tuple[str, ...] = ()
    untestable: Optional[str] = None
    model_wide: bool = False
    reinitialising: bool = False
    folklore: bool = False

    def __post_init__(self):
        if (self.apply is None) == (self.untestable is None):
            raise GradscopeError(f"remedy {self.name!r}: give either apply= or untestable= (why it cannot "
                                 f"be measured on a copy), exactly one.")
        if self.apply is not None and not self.apply_kinds:
            raise GradscopeError(f"remedy {self.name!r}: apply= needs apply_kinds= (the site kinds it rewrites).")

    @property
    def testable(self) -> bool:
        """:func:`~gradscope.analysis.trials.try_remedies` can apply it to a copy and measure it."""
        return self.apply is not None

    def applies(self, site_kind: str) -> bool:
        """It makes sense on a site of this kind (``""``: unknown, so yes)."""
        return not site_kind or self.applies_to is None or site_kind in self.applies_to


def _specs(*specs: RemedySpec) -> Dict[str, RemedySpec]:
    out: Dict[str, RemedySpec] = {}
    for spec in specs:
        if spec.name in out:
            raise GradscopeError(f"remedy {spec.name!r} is registered twice.")
        out[spec.name] = spec
    return out



def _not_rewritten(what: str) -> str:
    """Why a remedy that changes model code cannot be tried on a copy (attention remedies)."""
    return (f"{what}, which try_remedies does not rewrite on a copy yet; measure it by training with and "
            f"without under watch")

REMEDIES: Dict[str, RemedySpec] = _specs(
    RemedySpec("clip_grad_norm", _r_clip_grad_norm, model_wide=True,
               untestable="clipping acts on the optimizer's step; it does not change the Jacobians a "
                          "probe measures (watch a training run with and without it)"),
    RemedySpec("lower_lr", _r_lower_lr, model_wide=True,
               untestable="the learning rate acts on training, not on the Jacobians a probe measures"),
    RemedySpec("orthogonal_init", _r_orthogonal_init, apply="_apply_orthogonal",
               apply_kinds=_FUSED, reinitialising=True),
    RemedySpec("irnn", _r_irnn, applies_to=_RNN, apply="_apply_irnn", apply_kinds=_FUSED_RNN,
               reinitialising=True),
    RemedySpec("critical_init", _r_critical_init, applies_to=_RNN, apply="_apply_critical",
               apply_kinds=_FUSED_RNN, reinitialising=True),
    RemedySpec("switch_to_lstm", _r_switch("LSTM"), applies_to=_RNN, apply="_apply_switch_to_lstm",
               apply_kinds=_FUSED_RNN, reinitialising=True),
    RemedySpec("switch_to_gru", _r_switch("GRU"), applies_to=_RNN, apply="_apply_switch_to_gru",
               apply_kinds=_FUSED_RNN, reinitialising=True),
    RemedySpec("forget_bias", _r_forget_bias, applies_to=_GATED, apply="_apply_forget_bias",
               apply_kinds=("lstm", "gru")),
    RemedySpec("chrono_init", _r_chrono_init, applies_to=_GATED, apply="_apply_chrono",
               apply_kinds=("lstm", "gru"), reinitialising=True),
    RemedySpec("layernorm_cell", _r_layernorm_cell,
               untestable="it needs a hand-written cell (PyTorch's fused layers have no LayerNorm), "
                          "which gradscope does not build for you"),
    RemedySpec("leaky_relu", _r_leaky_relu, applies_to=("rnn_relu", "cell"),
               untestable="nn.RNN offers only tanh and ReLU; a LeakyReLU RNN needs a hand-written cell"),
    RemedySpec("reinit_dead", _r_reinit_dead, applies_to=("rnn_relu", "cell"),
               apply="_apply_reinit_dead", apply_kinds=("rnn_relu",), reinitialising=True),
    RemedySpec("truncated_bptt", _r_truncated_bptt,
               untestable="truncation changes which gradient terms training sums, not the Jacobians a "
                          "probe measures"),
    RemedySpec("gating", _r_gating,
               untestable="gradscope measures it as switch_to_gru / switch_to_lstm (Elman RNN) or "
                          "chrono_init (LSTM/GRU)"),
    RemedySpec("sigma_reparam", _r_sigma_reparam,
               untestable=_not_rewritten("it changes the parametrisation of every attention projection")),
    RemedySpec("warmup", _r_warmup, model_wide=True,
               untestable="warm-up acts on the learning-rate schedule, not on the Jacobians a probe measures"),
    RemedySpec("qk_layernorm", _r_qk_layernorm,
               untestable=_not_rewritten("it adds modules inside the attention computation")),
    RemedySpec("residual_scaling", _r_residual_scaling,
               untestable=_not_rewritten("it changes the block's forward code")),
    RemedySpec("pre_ln", _r_pre_ln,
               untestable="it moves the normalisation inside each block's forward code, which try_remedies "
                          "does not rewrite on a copy yet; nn.TransformerEncoderLayer(norm_first=True) is "
                          "the switch"),
    RemedySpec("relu_nonlinearity", _r_relu_nonlinearity, applies_to=("rnn_tanh",),
               apply="_apply_relu", apply_kinds=("rnn_tanh",), reinitialising=True, folklore=True),
    RemedySpec("xavier_init", _xavier, apply="_apply_xavier", apply_kinds=_FUSED,
               reinitialising=True, folklore=True),
    RemedySpec("he_init", _he, apply="_apply_he", apply_kinds=_FUSED, reinitialising=True,
               folklore=True),
)
"""The remedy catalogue: name → :class:`RemedySpec`, in catalogue order. Every other table
(:data:`REMEDY_NAMES`, :data:`UNTESTABLE`, :data:`FOLKLORE_CHECKS`, the trials' ``TESTABLE``,
diagnose's ``REINITIALISING``) is derived from it."""

REMEDY_NAMES: Tuple[str, ...] = tuple(REMEDIES)
"""Every remedy name :func:`get_remedy` knows (the last three are folklore checks)."""

FOLKLORE_CHECKS: Tuple[str, ...] = tuple(n for n, s in REMEDIES.items() if s.folklore)

UNTESTABLE: Dict[str, str] = {n: s.untestable for n, s in REMEDIES.items() if s.untestable is not None}
"""Why each remedy :func:`~gradscope.analysis.trials.try_remedies` cannot measure is so."""

REINITIALISING: Tuple[str, ...] = tuple(n for n, s in REMEDIES.items() if s.reinitialising)
"""Remedies that re-initialise weights or change the architecture: for a trained model they undo
the training, so they come after those that work during training."""

# Ranked remedies per (finding kind, site kind); "*" is the fallback for other site kinds.
_RANKING: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "vanishing": {
        "rnn_tanh": ("orthogonal_init", "irnn", "switch_to_lstm", "switch_to_gru", "critical_init"),
        "rnn_relu": ("irnn", "orthogonal_init", "critical_init", "switch_to_lstm", "switch_to_gru"),
        "lstm": ("forget_bias", "chrono_init", "orthogonal_init"),
        "gru": ("forget_bias", "chrono_init", "orthogonal_init"),
        "cell": ("orthogonal_init", "critical_init", "gating", "switch_to_lstm", "switch_to_gru"),
        "attention": ("residual_scaling", "pre_ln"),
    },
    "exploding": {
        "rnn_tanh": ("clip_grad_norm", "lower_lr", "orthogonal_init", "critical_init"),
        "rnn_relu": ("clip_grad_norm", "lower_lr", "orthogonal_init", "critical_init"),
        "lstm": ("clip_grad_norm", "lower_lr", "layernorm_cell", "orthogonal_init"),
        "gru": ("clip_grad_norm", "lower_lr", "layernorm_cell", "orthogonal_init"),
        "cell": ("clip_grad_norm", "lower_lr", "orthogonal_init", "layernorm_cell"),
        "attention": ("clip_grad_norm", "warmup", "lower_lr"),
    },
    "short_memory": {
        "*": ("forget_bias", "chrono_init"),
    },
    "saturated_gates": {
        "*": ("layernorm_cell", "lower_lr"),
    },
    "dead_units": {
        "rnn_relu": ("reinit_dead", "leaky_relu", "lower_lr"),
        "*": ("leaky_relu", "reinit_dead", "lower_lr"),
    },
    "nonfinite": {
        "*": ("clip_grad_norm", "lower_lr"),
        "attention": ("clip_grad_norm", "warmup", "lower_lr"),
    },
    "precision_underflow": {
        "rnn_tanh": ("truncated_bptt", "gating", "switch_to_lstm"),
        "rnn_relu": ("truncated_bptt", "gating", "switch_to_lstm"),
        "lstm": ("truncated_bptt", "chrono_init", "forget_bias"),
        "gru": ("truncated_bptt", "chrono_init", "forget_bias"),
        "*": ("truncated_bptt", "gating"),
    },
    "attention_entropy_collapse": {"*": ("sigma_reparam", "qk_layernorm", "warmup", "lower_lr")},
    "rank_collapse": {"*": ("residual_scaling", "pre_ln")},
    "postln_instability": {"*": ("pre_ln", "warmup")},
}
FINDING_KINDS: Tuple[str, ...] = tuple(_RANKING)
_unknown = sorted({n for t in _RANKING.values() for ns in t.values() for n in ns} - set(REMEDIES))
if _unknown:  # a ranking names a remedy the registry lacks: fail at import, naming it
    raise GradscopeError(f"_RANKING names remedies missing from REMEDIES: {_unknown}.")

def _check_kind(kind: str, site_kind: str) -> None:
    if kind not in _RANKING:
        raise GradscopeError(f"unknown finding kind {kind!r}; expected one of {list(FINDING_KINDS)}."
                             f"{did_you_mean(str(kind), FINDING_KINDS)}")
    if site_kind and site_kind not in SITE_KINDS:
        raise GradscopeError(f"unknown site kind {site_kind!r}; expected one of {list(SITE_KINDS)} "
                             f"(or '' when unknown).{did_you_mean(str(site_kind), SITE_KINDS)}")


def remedies_for(kind: str, site_kind: str = "", evidence: Optional[Mapping[str, Any]] = None, *,
                 site: str = "", module: str = "") -> List[Remedy]:
    """The remedies for one finding, most specific first, with the evidence's numbers filled in.

    Args:
        kind: finding kind, one of :data:`FINDING_KINDS` (``"vanishing"``, ``"short_memory"`` …).
        site_kind: ``rnn_tanh``, ``rnn_relu``, ``lstm``, ``gru``, ``cell``, ``attention`` (or
            ``""`` when unknown: the generic ranking).
        evidence: floats the finding rests on (any key may be missing or non-finite).
        site: the site name (``"encoder.lstm.l1"``); its layer suffix picks the parameters. A
            model-wide site (``"(model)"``) gets only clipping, learning rate and warm-up.
        module: the module's qualified name (``"encoder.lstm"``); derived from ``site`` if empty.

    Raises:
        GradscopeError: unknown ``kind`` or ``site_kind`` (with a suggestion).

    Example:
        >>> [r.name for r in remedies_for("vanishing", "rnn_tanh", {"lambda1": -0.8})][:3]
        ['orthogonal_init', 'irnn', 'switch_to_lstm']
    """
    _check_kind(kind, site_kind)
    table = _RANKING[kind]
    names = table.get(site_kind) or table.get("*") or next(iter(table.values()))
    if site.startswith("("):  # a model-wide finding ("(model)"): only remedies that act on training
        names = tuple(n for n in names if REMEDIES[n].model_wide)
    out = []
    for name in names:
        if not REMEDIES[name].applies(site_kind):
            continue
        out.append(_build(name, evidence, kind=kind, site_kind=site_kind, site=site, module=module))
    return out


def finding_remedies(kind: str, site_kind: str, evidence: Optional[Mapping[str, Any]], site: str,
                     module: str) -> List[Remedy]:
    """:func:`remedies_for` as a finding needs it: ``[]`` instead of an error for a finding or site
    kind the catalogue does not know (a finding is reported with no remedy rather than not at all).

    Example:
        >>> finding_remedies("no_such_kind", "lstm", {}, "rnn.l0", "rnn")
        []
    """
    try:
        return list(remedies_for(kind, site_kind, evidence, site=site, module=module))
    except GradscopeError:
        return []


def _build(name, evidence, *, kind="", site_kind="", site="", module="") -> Remedy:
    spec = REMEDIES[name]
    return replace(spec.build(_Ctx(evidence, kind, site_kind, site, module)), testable=spec.testable)


def get_remedy(name: str, evidence: Optional[Mapping[str, Any]] = None, *, site: str = "",
               module: str = "", site_kind: str = "", kind: str = "") -> Remedy:
    """One remedy by name, specialised to the evidence and the site.

    Args:
        name: one of :data:`REMEDY_NAMES`.
        evidence: as in :func:`remedies_for`.
        site, module: where the snippet should act (``model`` itself when both are empty).
        site_kind: picks gate blocks and the variant of the snippet (``""``: generic).
        kind: the finding kind the remedy answers (changes the wording of ``why``).

    Raises:
        GradscopeError: unknown name (with a suggestion), unknown ``site_kind`` or ``kind``.

    Example:
        >>> get_remedy("clip_grad_norm", {"grad_norm_median": 0.5}).code.splitlines()[-1]
        'torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)'
    """
    if name not in REMEDIES:
        raise GradscopeError(f"unknown remedy {name!r}; known remedies: {', '.join(REMEDY_NAMES)}."
                             f"{did_you_mean(str(name), REMEDY_NAMES)}")
    if kind:
        _check_kind(kind, site_kind)
    else:
        _check_kind("vanishing", site_kind)
    return _build(name, evidence, kind=kind, site_kind=site_kind, site=site, module=module)


# ------------------------------------------------------------------------------------------------
# folklore

FOLKLORE: Dict[str, Dict[str, Any]] = {
    "relu": {
        "claim": "Use ReLU or LeakyReLU instead of tanh/sigmoid to stop gradients vanishing.",
        "verdict": "partly true",
        "why": ("ReLU removes the derivative factor tanh′ ≤ 1 (sigmoid′ ≤ ¼) from every step, but the "
                "step Jacobian diag(1[a > 0]) W_hh is still a product of the same W_hh over T steps: "
                "it vanishes when ‖W_hh‖ < 1 and explodes when the active part has gain > 1. It works "
                "with identity or orthogonal W_hh (IRNN, Le et al. 2015) and clipping. LeakyReLU "
                "additionally keeps dead units alive."),
        "testable": True, "test": ["relu_nonlinearity", "irnn"],
    },
    "xavier_he": {
        "claim": "Use Xavier or He initialisation.",
        "verdict": "partly true",
        "why": ("Both are designed for depth — a different matrix per layer — not for the product of "
                "the same W_hh over T steps, which is governed by its eigenvalues. On a square W_hh "
                "Xavier gives spectral radius ≈ 1 (near critical for tanh at small activity; "
                "PyTorch's default U(±1/√H) gives ≈ 0.58, the vanishing side), He gives ≈ √2 "
                "(chaotic for tanh). Orthogonal or critical initialisation target the recurrence "
                "directly (Saxe 2014; Chen 2018)."),
        "testable": True, "test": ["xavier_init", "he_init"],
    },
    "learning_rate": {
        "claim": "Adjust the learning rate.",
        "verdict": "true for exploding, does not address vanishing",
        "why": ("A smaller learning rate makes steps smaller: with clipping it tames exploding "
                "gradients and saturation. It does not change how far back the gradient reaches — "
                "that is the product of Jacobians, not the step size."),
        "testable": False, "test": [],
    },
    "batch_norm": {
        "claim": "Use batch normalisation.",
        "verdict": "does not address it",
        "why": ("Batch statistics across time steps are awkward in RNNs: they need separate "
                "statistics per step and careful γ initialisation (recurrent BN, Cooijmans et al. "
                "2017), fail at test lengths not seen in training, and do not by themselves change the "
                "recurrent Jacobian's spectrum. LayerNorm in the cell (Ba et al. 2016) is the usual "
                "choice."),
        "testable": False, "test": [],
    },
    "dropout": {
        "claim": "Use dropout.",
        "verdict": "does not address it",
        "why": ("Dropout is a regulariser against overfitting. On the state it multiplies each "
                "step's Jacobian by a random mask scaled by 1/(1−p): it scales and cuts gradient "
                "paths, it does not make a vanishing product larger on average (and noise on the "
                "recurrent path is why Zaremba et al. 2014 apply it only between layers)."),
        "testable": False, "test": [],
    },
    "adam": {
        "claim": "Use Adam or RMSprop.",
        "verdict": "does not address it",
        "why": ("Adam rescales each parameter's step by its gradient's running RMS, so small gradients "
                "still move weights. But the gradient of W_hh is a sum over lags in which the "
                "contribution from k steps back is exp(λ₁ k) times the nearest one: the direction is "
                "still set by short lags, and below float precision the long-lag part is gone before "
                "Adam sees it."),
        "testable": False, "test": [],
    },
    "lstm_gru": {
        "claim": "Use an LSTM or GRU.",
        "verdict": "true",
        "why": ("The cell path gives ∂c_T/∂c_t = Π diag(f) (GRU: the z⊙h term), an additive path that "
                "avoids the W_hh product; with keep gates near 1 the gradient crosses long lags. The "
                "gates must be open, though: forget-gate bias and initialisation decide the memory "
                "time τ = −1/ln σ(b_f)."),
        "testable": True, "test": ["switch_to_lstm", "switch_to_gru"],
    },
    "attention": {
        "claim": "Add attention (self-attention).",
        "verdict": "true for the path length",
        "why": ("Attention connects every pair of positions directly, so the gradient path between "
                "them has length 1 instead of their distance. It costs O(T²) time and memory per "
                "layer and brings its own failure modes: entropy collapse (Zhai et al. 2023), rank "
                "collapse with depth (Dong et al. 2021), Post-LN instability (Xiong et al. 2020)."),
        "testable": False, "test": [],
    },
}


def folklore_verdicts(evidence: Optional[Mapping[str, Any]] = None, *, site_kind: str = "",
                      regime: str = "") -> List[Dict[str, Any]]:
    """The usual advice (the seed article's list) judged against the mechanism and the evidence.

    Args:
        evidence: a site's evidence (as in :func:`remedies_for`); may be empty.
        site_kind: the site's kind; some verdicts depend on it (an LSTM already has gates).
        regime: ``vanishing`` / ``exploding`` / ``stable``; inferred from the evidence if empty.

    Returns:
        One dict per claim of :data:`FOLKLORE`, in its order: ``key``, ``claim``, ``verdict``,
        ``why`` (mechanism), ``evidence`` (this case's numbers, or ``""``), ``testable`` and
        ``test`` (remedy names for :func:`gradscope.analysis.trials.try_remedies`).

    Example:
        >>> v = {d["key"]: d for d in folklore_verdicts({"lambda1": -0.8, "seq_len": 100})}
        >>> v["dropout"]["verdict"], v["lstm_gru"]["verdict"]
        ('does not address it', 'true')
    """
    ev = dict(evidence or {})
    regime = regime or evidence_regime(ev)[0]
    lam, T = _num(ev, "lambda1"), _num(ev, "seq_len")
    w = _num(ev, "w_hh_norm")
    out = []
    for key, entry in FOLKLORE.items():
        d = {"key": key, **{k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}}
        note = ""
        if key == "relu":
            if site_kind == "rnn_relu":
                d["verdict"] = "already applied"
                dead = _num(ev, "dead_units")
                note = (f"This site already uses ReLU{'' if dead is None else f' ({fmt(100 * dead)}% of its units dead)'}"
                        f"{'' if lam is None else f' and still has λ₁ = {fmt(lam)}'}.")
            elif w is not None:
                note = (f"‖W_hh‖₂ = {fmt(w)}: with ReLU and unchanged weights the per-step factor would be "
                        f"at most {fmt(w)} along active units — "
                        + ("still vanishing." if w < 1 else "it can grow: exploding risk."))
        elif key == "adam" and lam is not None and lam < 0:
            k32 = _LN_FLOAT32_EPS / abs(lam)
            note = (f"λ₁ = {fmt(lam)}: a contribution from k steps back is exp({fmt(lam)}·k) of the "
                    f"nearest; beyond k = {fmt(k32)} steps it is below float32 resolution"
                    + (f" (the sequence has {fmt(T)})" if T is not None else "") + ", and no optimizer "
                    "recovers it.")
        elif key == "learning_rate":
            if regime == "exploding":
                d["verdict"] = "true (with clipping)"
            elif regime == "vanishing":
                d["verdict"] = "does not address it"
        elif key == "lstm_gru":
            if site_kind in ("lstm", "gru"):
                tau = _num(ev, "memory_time")
                d["verdict"] = "already applied; its gates decide"
                note = ("This site is already gated" + (f"; its memory time is τ = {fmt(tau)} steps"
                                                        if tau is not None else "")
                        + ": open the keep gates (forget_bias, chrono_init).")
                d["test"] = ["forget_bias", "chrono_init"]
            elif regime == "exploding":
                d["verdict"] = "partly true"
                note = "Gates bound the cell path but an LSTM can still explode through W_hh; clip as well."
        elif key == "dropout" and lam is not None:
            note = f"It leaves λ₁ = {fmt(lam)} where it is."
        elif key == "xavier_he" and w is not None and site_kind in ("rnn_tanh", "rnn_relu", "cell"):
            note = f"Here ‖W_hh‖₂ = {fmt(w)}."
        d["evidence"] = note
        out.append(d)
    return out
