"""try_remedies(): apply each candidate remedy to a copy of the model and measure what it changes.

A remedy that sounds right can still do nothing for *this* model, and folklore advice is a claim to
test. :func:`try_remedies` probes and diagnoses the model on one batch, picks the remedies the
findings call for (or the ones named), applies each to a ``copy.deepcopy`` of the model, probes the
copy on the same batch with the same seed, and reports the gradient horizon, λ₁ and regime of every
targeted site before and after. The user's model is never modified and carries no hook afterwards.

What can be applied to a copy (fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` layers):

* ``orthogonal_init`` — each gate block of W_hh orthogonal, gain 1 (every singular value 1).
* ``irnn`` — W_hh = I, all biases 0, ReLU (``nonlinearity="relu"``, ``mode="RNN_RELU"``); an
  ``nn.RNN`` has one nonlinearity for all its layers, so IRNN is applied to the whole module.
* ``critical_init`` — orthogonal W_hh with the gain of :func:`~gradscope.analysis.remedies.critical_gain`.
* ``switch_to_lstm`` / ``switch_to_gru`` — the ``nn.RNN`` is replaced, in its parent, by an
  ``nn.LSTM`` / ``nn.GRU`` of the same sizes and options, freshly initialised from ``seed`` with
  keep-gate bias 1 (``bias_ih`` block 1, ``bias_hh`` block 0; gate order i, f, g, o / r, z, n). An
  ``nn.GRU`` takes and returns ``(out, h)`` like ``nn.RNN``; an ``nn.LSTM`` takes ``(h0, c0)`` and
  returns ``(out, (h, c))``, so it is wrapped in :class:`LSTMAsRNN`, which answers like ``nn.RNN``
  (``c0`` = 0) — the pattern ``out, h = self.rnn(x, h0)`` keeps working. Its sites are then named
  ``<module>.lstm.l<k>``; the report maps them back to the original site names.
* ``forget_bias`` — the keep-gate bias (LSTM f, GRU z: block ``[H:2H]`` of both biases) raised to
  the value of :func:`~gradscope.analysis.remedies.forget_bias_plan`, computed from the layer's
  actual mean effective bias b_ih + b_hh; the change is added in halves to ``bias_ih`` and
  ``bias_hh``, so per-unit differences stay.
* ``chrono_init`` — b_f = ln U[1, T_max − 1] in ``bias_ih`` (``bias_hh`` block 0), LSTM b_i = −b_f,
  T_max = the sequence length (GRU: the update gate, by analogy).
* ``reinit_dead`` — ReLU units never active on this batch get fresh incoming weights and biases
  U(±1/√H) (their rows of ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``).
* folklore checks: ``relu_nonlinearity`` (tanh → ReLU, weights kept), ``xavier_init``, ``he_init``.

Not applicable to a copy (listed in ``skipped`` with the reason): clipping, learning rate, warm-up
and truncated BPTT act on training, not on the Jacobians a probe measures; LayerNorm and LeakyReLU
need a hand-written cell; attention remedies wait for attention probes; user cells are left alone.

Ranking rule. For a site with sequence length T, its *reach* is min(horizon, explosion lag, T)/T:
1 when the gradient neither falls below the threshold nor grows past its inverse within the
sequence, smaller the sooner either happens. A trial's ``score`` is the mean change of reach over
the targeted sites; ties (e.g. both reach 1) are broken by ``lambda_gain``, the mean decrease of
|λ₁| (λ₁ moving toward 0 from below or from above). A trial counts as ``improved`` when its score is
positive, or zero with λ₁ moved toward 0 by more than 0.01 per step, and no site got worse: none
left "stable", and none turned "exploding" (trading vanishing for exploding is not a fix).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._batch import call_model, fused_args
from .._format import jsonable
from .._renderers import renderer
from ..errors import GradscopeError, did_you_mean
from . import remedies as R

__all__ = ["try_remedies", "apply_remedy", "RemedyTrials", "TrialResult", "TrainingRun", "SiteChange",
           "SkippedRemedy", "LSTMAsRNN", "TESTABLE"]


class LSTMAsRNN(nn.Module):
    """An ``nn.LSTM`` that takes and returns what ``nn.RNN`` does: ``(out, h_n)``.

    ``hx`` (``h0``, as for ``nn.RNN``) is paired with ``c0 = 0``; ``c_n`` is dropped. Use it when an
    ``nn.RNN`` is swapped for an LSTM and the calling code unpacks ``out, h = rnn(x, h0)``.
    ``input_size``, ``hidden_size``, ``num_layers``, ``batch_first`` and ``bidirectional`` are
    passed through.

    Example:
        >>> m = LSTMAsRNN(torch.nn.LSTM(3, 5, batch_first=True))
        >>> out, h = m(torch.randn(2, 7, 3))
        >>> tuple(out.shape), tuple(h.shape)
        ((2, 7, 5), (1, 2, 5))
    """

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        if not isinstance(lstm, nn.LSTM):
            raise GradscopeError(f"LSTMAsRNN wraps an nn.LSTM, got {type(lstm).__name__}.")
        self.lstm = lstm

    def forward(self, input, hx: Optional[Tensor] = None):
        if hx is not None:
            if self.lstm.proj_size:
                raise GradscopeError("LSTMAsRNN with proj_size > 0 cannot build c0 from h0 (their sizes "
                                     "differ); call the nn.LSTM with (h0, c0) directly.")
            hx = (hx, torch.zeros_like(hx))
        out, (h, _c) = self.lstm(input, hx)
        return out, h

    input_size = property(lambda self: self.lstm.input_size)
    hidden_size = property(lambda self: self.lstm.hidden_size)
    num_layers = property(lambda self: self.lstm.num_layers)
    batch_first = property(lambda self: self.lstm.batch_first)
    bidirectional = property(lambda self: self.lstm.bidirectional)


# ------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class SiteChange:
    """One site before and after a remedy (``site_after``: its name in the modified copy).

    ``memory_time``: the keep gate's τ = −1/ln f̄ in steps (LSTM forget / GRU update gate; NaN for
    ungated sites). ``reach``: min(horizon, explosion lag, T)/T.
    """

    site: str
    site_after: str
    kind_before: str
    kind_after: str
    seq_len: float
    regime_before: str
    regime_after: str
    horizon_before: float
    horizon_after: float
    lambda1_before: float
    lambda1_after: float
    reach_before: float
    reach_after: float
    memory_time_before: float = math.nan
    memory_time_after: float = math.nan


@dataclass(frozen=True)
class TrainingRun:
    """A copy of the model trained for ``steps`` steps on the user's data.

    ``final_loss``: mean loss over the last tenth of the steps (at least one); ``loss_auc``: mean
    loss over all steps (the area under the curve per step); ``diverged``: a non-finite loss ended
    the run (its final loss is then inf); ``curve``: the loss at every step.
    """

    steps: int
    final_loss: float
    loss_auc: float
    diverged: bool
    curve: Tuple[float, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return jsonable(asdict(self))


@dataclass(frozen=True)
class TrialResult:
    """One remedy applied to a copy of the model and measured.

    Attributes:
        remedy: catalogue name; ``title`` its one-line title.
        sites: the original names of the sites it targeted.
        applied: what was changed, with the numbers (e.g. ``"l0: b_f -3.00 → 4.60"``).
        changes: per targeted site, before and after.
        score: mean change of reach (see the module docstring), in [−1, 1].
        lambda_gain: mean decrease of |λ₁| (per step).
        improved: the ranking rule's verdict (trained: a lower final loss than the original's).
        training: the remedied copy trained on the user's data (``train_steps > 0``), else None.
        model: the remedied copy, untrained (the original is untouched): train it yourself.
    """

    remedy: str
    title: str
    sites: Tuple[str, ...]
    applied: str
    changes: Tuple[SiteChange, ...]
    score: float
    lambda_gain: float
    improved: bool
    training: Optional[TrainingRun] = None
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        d = {f: getattr(self, f) for f in ("remedy", "title", "sites", "applied", "score", "lambda_gain",
                                           "improved")}
        d["changes"] = [asdict(c) for c in self.changes]
        d["training"] = self.training.to_dict() if self.training is not None else None
        return jsonable(d)


@dataclass(frozen=True)
class SkippedRemedy:
    """A remedy not tried on a copy, and why."""

    remedy: str
    sites: Tuple[str, ...]
    reason: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class RemedyTrials:
    """What each remedy did to a copy of the model (see :func:`try_remedies`).

    Attributes:
        results: :class:`TrialResult` list, best first (ranking rule in the module docstring).
        skipped: :class:`SkippedRemedy` list.
        findings: ``(kind, site, severity)`` of the original model's findings.
        before: per site of the original: ``kind``, ``regime``, ``horizon``, ``explosion_lag``,
            ``lambda1``, ``seq_len``, ``reach``, ``memory_time``.
        seed: the seed every copy was initialised and probed with.
    """

    def __init__(self, results, skipped, findings, before, seed, baseline: Optional[TrainingRun] = None):
        self.results: List[TrialResult] = list(results)
        self.skipped: List[SkippedRemedy] = list(skipped)
        self.findings: List[Tuple[str, str, str]] = list(findings)
        self.before: Dict[str, Dict[str, Any]] = dict(before)
        self.seed = seed
        #: the original model trained the same way (``train_steps > 0``), else None
        self.baseline = baseline

    @property
    def ranked_by(self) -> str:
        """``"training"`` (measured loss) or ``"prediction"`` (probe only: the Jacobian effect)."""
        return "training" if self.baseline is not None else "prediction"

    def _repr_html_(self) -> str:
        """The notebook display (:func:`gradscope.render.html.trials_repr_html`)."""
        return renderer("trials.repr_html")(self)

    def best(self) -> Optional[TrialResult]:
        """The top-ranked trial that improved the model, or None."""
        return next((r for r in self.results if r.improved), None)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __str__(self) -> str:
        """The text table: :func:`gradscope.render.text.trials_to_text`."""
        return renderer("trials.text")(self)

    def to_markdown(self) -> str:
        """The markdown table: :func:`gradscope.render.text.trials_to_markdown`."""
        return renderer("trials.markdown")(self)

    def to_dict(self) -> Dict[str, Any]:
        best = self.best()
        return jsonable({"seed": self.seed, "best": best.remedy if best else None,
                         "ranked_by": self.ranked_by,
                         "baseline": self.baseline.to_dict() if self.baseline is not None else None,
                       "results": [r.to_dict() for r in self.results],
                       "skipped": [s.to_dict() for s in self.skipped],
                       "findings": [{"kind": k, "site": s, "severity": v} for k, s, v in self.findings],
                       "before": self.before})

    def __repr__(self) -> str:
        best = self.best()
        return (f"<RemedyTrials {len(self.results)} tried, {len(self.skipped)} skipped, "
                f"best={best.remedy if best else None}>")


# ------------------------------------------------------------------------------------------------
# applying remedies to a copy


@dataclass
class _Target:
    site: str
    module: str      # qualified module name ("" = the model itself)
    suffix: str      # parameter suffix: "l0", "l1_reverse"
    kind: str        # site kind
    evidence: Dict[str, float] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(self.suffix[1:].split("_")[0])

    @property
    def reverse(self) -> bool:
        return self.suffix.endswith("_reverse")


class _Skip(Exception):
    """Raised by an applier when the remedy does not apply after all (the message says why)."""


def _sub(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` was; returns the (possibly new) root."""
    if not name:
        return new
    parent, _, last = name.rpartition(".")
    setattr(_sub(model, parent), last, new)
    return model


def _blocks(W: Tensor, H: int):
    return [W[k * H:(k + 1) * H] for k in range(W.shape[0] // H)]


def _by_module(targets: Sequence[_Target]) -> Dict[str, List[_Target]]:
    out: Dict[str, List[_Target]] = {}
    for t in targets:
        out.setdefault(t.module, []).append(t)
    return out


def _mod_label(name: str) -> str:
    return repr(name) if name else "the model"


@torch.no_grad()
def _apply_orthogonal(model, targets, ctx):
    done = []
    for t in targets:
        m = _sub(model, t.module)
        W = getattr(m, f"weight_hh_{t.suffix}")
        for b in _blocks(W, m.hidden_size):
            nn.init.orthogonal_(b)
        done.append(f"{t.site}: weight_hh_{t.suffix} orthogonal per gate block (gain 1)")
    return model, {}, "; ".join(done)


@torch.no_grad()
def _apply_critical(model, targets, ctx):
    done = []
    for t in targets:
        m = _sub(model, t.module)
        g = R.critical_gain(t.evidence)["gain"]
        nn.init.orthogonal_(getattr(m, f"weight_hh_{t.suffix}"), gain=g)
        done.append(f"{t.site}: weight_hh_{t.suffix} orthogonal, gain {g:.3g}")
    return model, {}, "; ".join(done)


def _init_check(fn: Callable[[Tensor], Any], label: str):
    @torch.no_grad()
    def apply(model, targets, ctx):
        for t in targets:
            m = _sub(model, t.module)
            for b in _blocks(getattr(m, f"weight_hh_{t.suffix}"), m.hidden_size):
                fn(b)
        return model, {}, "; ".join(f"{t.site}: weight_hh_{t.suffix} {label} per gate block" for t in targets)
    return apply


@torch.no_grad()
def _apply_irnn(model, targets, ctx):
    done = []
    for name, ts in _by_module(targets).items():
        m = _sub(model, name)
        for pname, p in m.named_parameters():
            if pname.startswith("weight_hh"):
                p.copy_(torch.eye(m.hidden_size, dtype=p.dtype, device=p.device))
            elif pname.startswith("bias"):
                p.zero_()
        m.nonlinearity, m.mode = "relu", "RNN_RELU"
        done.append(f"{_mod_label(name)}: W_hh = I, biases 0, ReLU (all {m.num_layers} layer(s); "
                    f"nn.RNN has one nonlinearity per module)")
    return model, {}, "; ".join(done)


def _apply_relu(model, targets, ctx):
    for name in _by_module(targets):
        m = _sub(model, name)
        m.nonlinearity, m.mode = "relu", "RNN_RELU"
    return model, {}, "; ".join(f"{_mod_label(n)}: tanh → ReLU, weights unchanged" for n in _by_module(targets))


def _switch(cls):
    def apply(model, targets, ctx):
        renames = {}
        done = []
        for name in _by_module(targets):
            old = _sub(model, name)
            if type(old) is not nn.RNN:
                raise _Skip(f"{_mod_label(name)} is a {type(old).__name__}, not a plain nn.RNN")
            ref = old.weight_hh_l0
            new = cls(old.input_size, old.hidden_size, num_layers=old.num_layers, bias=old.bias,
                      batch_first=old.batch_first, dropout=old.dropout, bidirectional=old.bidirectional)
            new = new.to(device=ref.device, dtype=ref.dtype)
            new.train(old.training)
            H = old.hidden_size
            with torch.no_grad():
                for pname, p in new.named_parameters():
                    if pname.startswith("bias_ih"):
                        p[H:2 * H].fill_(1.0)
                    elif pname.startswith("bias_hh"):
                        p[H:2 * H].fill_(0.0)
            if cls is nn.LSTM:
                wrapped = LSTMAsRNN(new)
                model = _replace(model, name, wrapped)
                renames[name] = (name + "." if name else "") + "lstm"
                done.append(f"{_mod_label(name)}: nn.RNN → nn.LSTM (wrapped in LSTMAsRNN), keep-gate bias 1")
            else:
                model = _replace(model, name, new)
                done.append(f"{_mod_label(name)}: nn.RNN → nn.GRU, keep-gate bias 1")
        return model, renames, "; ".join(done)
    return apply


def _mean_keep_bias(m, suffix) -> float:
    H = m.hidden_size
    b = getattr(m, f"bias_ih_{suffix}")[H:2 * H] + getattr(m, f"bias_hh_{suffix}")[H:2 * H]
    return float(b.double().mean())


def _require_bias(m, name):
    if not m.bias:
        raise _Skip(f"{_mod_label(name)} has bias=False: there is no gate bias to change")


@torch.no_grad()
def _apply_forget_bias(model, targets, ctx):
    done = []
    for t in targets:
        m = _sub(model, t.module)
        _require_bias(m, t.module)
        ev = dict(t.evidence)
        key = "update_bias" if t.kind == "gru" else "forget_bias"
        ev[key] = _mean_keep_bias(m, t.suffix)
        plan = R.forget_bias_plan(ev, key=key)
        H = m.hidden_size
        for stem in ("bias_ih", "bias_hh"):
            getattr(m, f"{stem}_{t.suffix}")[H:2 * H] += plan["delta"] / 2
        done.append(f"{t.site}: b_{'z' if t.kind == 'gru' else 'f'} {plan['b_now']:.2f} → {plan['b_new']:.2f} "
                    f"(τ {plan['tau_now']:.3g} → {plan['tau_new']:.3g} steps)")
    return model, {}, "; ".join(done)


@torch.no_grad()
def _apply_chrono(model, targets, ctx):
    done = []
    for t in targets:
        m = _sub(model, t.module)
        _require_bias(m, t.module)
        T_max, _ = R.chrono_t_max(t.evidence)
        H = m.hidden_size
        b_ih, b_hh = getattr(m, f"bias_ih_{t.suffix}"), getattr(m, f"bias_hh_{t.suffix}")
        b_f = torch.empty(H, dtype=torch.float64).uniform_(1, T_max - 1).log().to(b_ih)
        b_ih[H:2 * H] = b_f
        b_hh[H:2 * H] = 0.0
        if t.kind == "lstm":
            b_ih[:H] = -b_f
            b_hh[:H] = 0.0
        done.append(f"{t.site}: b_{'z' if t.kind == 'gru' else 'f'} = ln U[1, {T_max - 1}]"
                    + (", b_i = -b_f" if t.kind == "lstm" else ""))
    return model, {}, "; ".join(done)


@torch.no_grad()
def _apply_reinit_dead(model, targets, ctx):
    from ..measure.trajectories import fused_trajectories

    done = []
    for name, ts in _by_module(targets).items():
        m = _sub(model, name)
        calls = []
        handle = m.register_forward_hook(lambda mod, a, kw, out: calls.append((a, kw)), with_kwargs=True)
        try:
            call_model(model, ctx["batch"])
        finally:
            handle.remove()
        if not calls:
            raise _Skip(f"{_mod_label(name)} was not called by the model's forward")
        name_of = {(t.layer, t.reverse): t.site for t in ts}
        trs = {tr.site: tr for tr in fused_trajectories(name_of, m, *fused_args(*calls[0]))}
        for t in ts:
            dead = (trs[t.site].states <= 0).flatten(0, -2).all(0)
            n = int(dead.sum())
            if not n:
                continue
            bound = m.hidden_size ** -0.5
            for stem in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(m, f"{stem}_{t.suffix}", None)
                if p is not None:
                    p[dead] = torch.empty_like(p[dead]).uniform_(-bound, bound)
            done.append(f"{t.site}: {n} dead unit(s) of {m.hidden_size} re-initialised U(±{bound:.3g})")
    if not done:
        raise _Skip("no unit is dead on this batch")
    return model, {}, "; ".join(done)


_apply_switch_to_lstm = _switch(nn.LSTM)
_apply_switch_to_gru = _switch(nn.GRU)
_apply_xavier = _init_check(nn.init.xavier_uniform_, "Xavier-uniform")
_apply_he = _init_check(lambda b: nn.init.kaiming_normal_(b, nonlinearity="relu"), "He-normal")

TESTABLE: Tuple[str, ...] = tuple(n for n, s in R.REMEDIES.items() if s.testable)
"""The remedies :func:`try_remedies` can apply to a copy of a model (those with ``apply`` in
:data:`~gradscope.analysis.remedies.REMEDIES`)."""


# ------------------------------------------------------------------------------------------------
# measuring


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int):
    """Every RNG the model's devices use starts from ``seed``; their states are restored after."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with the fused RNN weights of the copy in one cuDNN chunk again.

    A deep copy gives each weight its own storage; on the GPU every cuDNN call would then compact
    them afresh and warn ("not part of single contiguous chunk of memory"). On the CPU this is a
    no-op.
    """
    work = copy.deepcopy(model)
    for m in work.modules():
        if isinstance(m, nn.RNNBase):
            m.flatten_parameters()
    return work


def _probe(model, batch, loss_fn, target, sites, seed, threshold):
    from ..measure.probe import probe

    with _seeded(model, seed):
        return probe(model, batch, loss_fn=loss_fn, target=target, sites=sites, k=1,
                     threshold=threshold, progress=False)


def _site_numbers(rec, diag, site) -> Dict[str, Any]:
    """kind, regime, horizon, explosion lag, λ₁, T and reach of one probed site."""
    m = rec.site_measures(site)
    jac, ly = m.get("jacobian", {}), m.get("lyapunov", {})
    T = float(m.get("seq_len", math.nan))
    hor = float(jac.get("horizon", math.nan))
    exp_lag = float(jac.get("explosion_lag", math.inf))
    lam = float(ly.get("lambda1", math.nan))
    if math.isfinite(T) and T > 0 and not math.isnan(hor):
        reach = min(hor, exp_lag, T) / T
    else:
        reach = math.nan
    tau = float(m.get("gates", {}).get("memory_time", math.nan))
    return {"kind": rec.site_info(site)["kind"], "regime": diag.regime(site) if site in diag.sites else "unknown",
            "horizon": hor, "explosion_lag": exp_lag, "lambda1": lam, "seq_len": T, "reach": reach,
            "memory_time": tau}


def _rename(site: str, renames: Dict[str, str]) -> str:
    """A site's name after its module moved (``{"rnn": "rnn.lstm"}``: ``rnn.l0`` → ``rnn.lstm.l0``)."""
    for old, new in renames.items():
        if old == "":
            return f"{new}.{site}"
        if site.startswith(old + "."):
            return new + site[len(old):]
    return site


_REGIME_RANK = {"stable": 0, "vanishing": 1, "exploding": 1, "unknown": 1, "inconclusive": 1}


def _score(changes: Sequence[SiteChange]) -> Tuple[float, float, bool]:
    gains = [c.reach_after - c.reach_before for c in changes
             if math.isfinite(c.reach_after) and math.isfinite(c.reach_before)]
    lams = [abs(c.lambda1_before) - abs(c.lambda1_after) for c in changes
            if math.isfinite(c.lambda1_before) and math.isfinite(c.lambda1_after)]
    score = sum(gains) / len(gains) if gains else -math.inf
    lam_gain = sum(lams) / len(lams) if lams else 0.0
    # Trading vanishing for exploding is not an improvement, however far the reach moves.
    worse = any(_REGIME_RANK.get(c.regime_after, 1) > _REGIME_RANK.get(c.regime_before, 1)
                or (c.regime_after == "exploding" and c.regime_before != "exploding") for c in changes)
    improved = (score > 1e-9 or (abs(score) <= 1e-9 and lam_gain > 0.01)) and not worse
    return score, lam_gain, improved


# ------------------------------------------------------------------------------------------------
# choosing what to try


def _targets_of(rec, site: str, evidence: Dict[str, float], model) -> _Target:
    info = rec.site_info(site)
    module = info.get("module", site)
    prefix = module + "." if module else ""
    suffix = site[len(prefix):] if site.startswith(prefix) else ""
    t = _Target(site, module, suffix, info.get("kind", "cell"), dict(evidence))
    if t.kind in ("lstm", "gru") and _has_module(model, module):
        m = _sub(model, module)
        if getattr(m, "bias", False) and hasattr(m, f"bias_ih_{suffix}"):
            with torch.no_grad():  # exact, from the weights (the key diagnose may also fill)
                t.evidence["update_bias" if t.kind == "gru" else "forget_bias"] = _mean_keep_bias(m, suffix)
    return t


def _plan(rec, diag, names: Optional[Sequence[str]], site_filter: Optional[set], model
          ) -> Tuple[List[Tuple[str, List[_Target]]], List[SkippedRemedy]]:
    evidence = {s: dict(diag.site_summary(s)["evidence"]) for s in diag.sites}
    sites = [s for s in rec.sites if site_filter is None or s in site_filter]
    wanted: Dict[str, List[str]] = {}
    if names is None:
        for f in diag.findings:
            if f.site not in sites:
                continue
            for r in f.remedies:
                lst = wanted.setdefault(r.name, [])
                if f.site not in lst:
                    lst.append(f.site)
    else:
        for n in names:
            wanted.setdefault(n, list(sites))
    plan, skipped = [], []
    for name, ss in wanted.items():
        spec = R.REMEDIES[name]
        if not spec.testable:
            skipped.append(SkippedRemedy(name, tuple(ss) if names is None else (), spec.untestable))
            continue
        kinds = spec.apply_kinds
        targets, bad = [], []
        for s in ss:
            t = _targets_of(rec, s, evidence.get(s, {}), model)
            mod = _sub(model, t.module) if _has_module(model, t.module) else None
            if t.kind not in kinds or not isinstance(mod, (nn.RNN, nn.LSTM, nn.GRU)):
                bad.append((s, t.kind))
            else:
                targets.append(t)
        if bad:
            kinds_txt = ", ".join(kinds)
            skipped.append(SkippedRemedy(name, tuple(s for s, _ in bad),
                                         f"applies to fused {kinds_txt} layers; "
                                         + ", ".join(f"{s!r} is {k}" for s, k in bad)))
        if targets:
            plan.append((name, targets))
    return plan, skipped


def _has_module(model, name) -> bool:
    try:
        _sub(model, name)
        return True
    except AttributeError:
        return False


# ------------------------------------------------------------------------------------------------


def _batches(data, target):
    """``(first inputs, first target, iterator of (inputs, target))`` from a batch or an iterable.

    A Tensor, a tuple of positional arguments or a dict is one batch (trained on again and again,
    with ``target``); anything else iterable (a DataLoader, a list, a generator) yields batches, each
    ``(inputs, target)`` — a 2-sequence — or inputs alone (then ``target`` is used)."""
    if isinstance(data, (Tensor, tuple, dict)):
        def again():
            while True:
                yield data, target
        return data, target, again()
    try:
        it = iter(data)
    except TypeError:
        raise GradscopeError(f"data must be a batch (a Tensor, a tuple of positional arguments or a dict) "
                             f"or an iterable of batches such as a DataLoader, got {type(data).__name__}.") from None

    def pairs(source):
        for item in source:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                yield item[0], item[1]
            else:
                yield item, target
    gen = pairs(it)
    try:
        x0, y0 = next(gen)
    except StopIteration:
        raise GradscopeError("data is an empty iterable: try_remedies needs at least one batch.") from None
    import itertools
    return x0, y0, itertools.chain([(x0, y0)], gen)


def _loss_of(out, y, loss_fn):
    from ..measure.probe import default_loss

    if loss_fn is None:
        return default_loss(out, y)
    return loss_fn(out) if y is None else loss_fn(out, y)


def _train(model: nn.Module, batches: List, loss_fn, make_optimizer, clip: Optional[float], seed: int,
           bar) -> TrainingRun:
    """Train ``model`` in place on ``batches`` (one optimizer step each); its loss curve."""
    curve: List[float] = []
    diverged = False
    with _seeded(model, seed):
        opt = make_optimizer(model.parameters())
        model.train()
        for x, y in batches:
            loss = _loss_of(call_model(model, x), y, loss_fn)
            value = float(loss.detach())
            bar.update(1)
            if not math.isfinite(value):
                diverged = True
                break
            curve.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    if diverged or not curve:
        return TrainingRun(len(batches), math.inf, math.inf, diverged, tuple(curve))
    tail = curve[-max(1, len(curve) // 10):]
    return TrainingRun(len(curve), sum(tail) / len(tail), sum(curve) / len(curve), False, tuple(curve))


def try_remedies(model: nn.Module, data, *, loss_fn: Optional[Callable] = None, target=None,
                 remedies: Optional[Iterable[str]] = None, sites: Optional[Sequence[str]] = None,
                 seed: int = 0, threshold: float = 1e-3, train_steps: int = 0,
                 optimizer: Optional[Callable] = None, clip: Optional[float] = 1.0,
                 progress: Optional[bool] = None) -> RemedyTrials:
    """Apply candidate remedies to copies of ``model``; measure each — by training, or by a probe.

    The model is probed (:func:`gradscope.probe`) and diagnosed (:func:`gradscope.diagnose`) on the
    first batch. Without ``remedies``, every remedy the findings list is a candidate, for the sites
    it was listed for; with ``remedies``, the named ones are tried on every site they apply to. Each
    candidate that can be applied (see the module docstring) is applied to a fresh
    ``copy.deepcopy(model)`` under ``torch.manual_seed(seed)``, the copy is probed on the same batch
    with the same seed, and the targeted sites are compared. With ``train_steps=N`` the original and
    every remedied copy are also trained for N steps on the same batches (same seed, same optimizer
    settings, gradient-norm clipping at ``clip``), and the trials are ranked by the measured final
    loss, then the loss AUC; with ``train_steps=0`` the ranking is the Jacobian effect — a
    prediction. The global RNG state is restored.

    Args:
        model: the model; it is not modified and carries no hook afterwards.
        data: one batch (a Tensor, a tuple of positional arguments or a dict, as for probe()) or an
            iterable of batches (a DataLoader, a list; each item ``(inputs, target)`` or inputs
            alone). The first batch is probed; training takes the first ``train_steps`` batches
            (one batch is reused; the batches are kept so every copy sees the same ones).
        loss_fn, target: as for :func:`gradscope.probe`.
        remedies: remedy names (:data:`gradscope.analysis.remedies.REMEDY_NAMES`); default: those
            the findings call for.
        sites: only these site names (default: all).
        seed: seed of every copy's new weights, of every probe and of every training run.
        threshold: the gradient-horizon threshold (as for probe() and diagnose()).
        train_steps: optimizer steps per training run; 0 (default) trains nothing.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (default Adam, lr 1e-3).
        clip: gradient-norm clipping during training (None: off).
        progress: a tqdm bar over the training steps (None: only when stderr is a terminal).

    Returns:
        :class:`RemedyTrials`: ``results`` ranked (``ranked_by`` says how), ``skipped`` with
        reasons, ``baseline`` (the original's training run), ``best()``; each result's ``model`` is
        the remedied copy.

    Raises:
        GradscopeError: an unknown remedy or site name (with a suggestion), bad ``data`` or
            ``train_steps``, or what probe() raises.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(2, 8)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.mul_(0.3)
        >>> trials = try_remedies(rnn, torch.randn(40, 2, 2), remedies=["orthogonal_init"])
        >>> trials.best().remedy, trials.ranked_by
        ('orthogonal_init', 'prediction')
    """
    from .diagnose import diagnose

    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise GradscopeError(f"train_steps must be a non-negative integer, got {train_steps!r}.")
    if remedies is not None:
        if isinstance(remedies, str):
            raise GradscopeError(f"remedies must be a list of names, got the string {remedies!r}; "
                                 f"write remedies=[{remedies!r}].")
        remedies = list(remedies)
        for n in remedies:
            if n not in R.REMEDY_NAMES:
                raise GradscopeError(f"unknown remedy {n!r}; known remedies: {', '.join(R.REMEDY_NAMES)}."
                                     f"{did_you_mean(str(n), R.REMEDY_NAMES)}")
    if sites is not None and isinstance(sites, str):
        raise GradscopeError(f"sites must be a list of names, got the string {sites!r}; write sites=[{sites!r}].")
    batch, target, stream = _batches(data, target)
    train_batches = list(itertools.islice(stream, train_steps)) if train_steps else []
    make_opt = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))

    rec0 = _probe(model, batch, loss_fn, target, None, seed, threshold)
    if sites is not None:
        for s in sites:
            if s not in rec0.sites:
                raise GradscopeError(f"unknown site {s!r}; the model has sites {list(rec0.sites)}."
                                     f"{did_you_mean(str(s), rec0.sites)}")
    diag0 = diagnose(rec0, threshold=threshold)
    wanted_sites = None if sites is None else set(sites)
    before = {s: _site_numbers(rec0, diag0, s) for s in rec0.sites
              if wanted_sites is None or s in wanted_sites}
    findings = [(f.kind, f.site, f.severity) for f in diag0.findings]
    plan, skipped = _plan(rec0, diag0, remedies, wanted_sites, model)

    from ..estimators._util import progress_bar
    total = (len(plan) + 1) * len(train_batches)
    bar = progress_bar(total, progress, flops=1e9 * total, desc="try_remedies: training")
    baseline = None
    try:
        if train_batches:
            baseline = _train(_copy(model), train_batches, loss_fn, make_opt, clip, seed, bar)
        results: List[TrialResult] = []
        for name, targets in plan:
            work, renames, applied = _applied_copy(model, name, targets, batch, seed, skipped)
            if work is None:
                continue
            rec1 = _probe(work, batch, loss_fn, target, None, seed, threshold)
            diag1 = diagnose(rec1, threshold=threshold)
            changes = []
            for t in targets:
                new_site = _rename(t.site, renames)
                b = before[t.site]
                if new_site not in rec1.sites:
                    raise GradscopeError(  # an applier bug, not a user error
                        f"internal: after {name}, site {t.site!r} (as {new_site!r}) is missing from "
                        f"{list(rec1.sites)}.")
                a = _site_numbers(rec1, diag1, new_site)
                changes.append(SiteChange(t.site, new_site, b["kind"], a["kind"], b["seq_len"],
                                          b["regime"], a["regime"], b["horizon"], a["horizon"],
                                          b["lambda1"], a["lambda1"], b["reach"], a["reach"],
                                          b["memory_time"], a["memory_time"]))
            score, lam_gain, improved = _score(changes)
            run = None
            if train_batches:
                run = _train(_copy(work), train_batches, loss_fn, make_opt, clip, seed, bar)
                improved = run.final_loss < baseline.final_loss * (1 - TRAINED_MARGIN)
            t0 = targets[0]
            title = R.get_remedy(name, t0.evidence, site=t0.site, module=t0.module, site_kind=t0.kind).title
            results.append(TrialResult(name, title, tuple(t.site for t in targets), applied, tuple(changes),
                                       score, lam_gain, improved, run, work))
    finally:
        bar.close()
    if baseline is not None:
        results.sort(key=lambda r: (r.training.final_loss, r.training.loss_auc, r.remedy))
    else:
        results.sort(key=lambda r: (-r.score, -r.lambda_gain, r.remedy))
    return RemedyTrials(results, skipped, findings, before, seed, baseline)


#: a trained remedy "improved" the model when its final loss is this share below the original's
TRAINED_MARGIN = 0.02


def _applied_copy(model, name, targets, batch, seed, skipped):
    """``(copy with remedy ``name`` applied, renames, what changed)``; ``(None, …)`` when skipped."""
    applier = globals()[R.REMEDIES[name].apply]
    work = _copy(model)
    try:
        with _seeded(work, seed):
            return applier(work, targets, {"batch": batch, "seed": seed})
    except _Skip as e:
        skipped.append(SkippedRemedy(name, tuple(t.site for t in targets), str(e)))
        return None, {}, ""


def apply_remedy(model: nn.Module, name: str, batch, *, site: Optional[str] = None,
                 loss_fn: Optional[Callable] = None, target=None, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with one remedy applied (the original is untouched).

    The model is probed on ``batch`` to find the sites the remedy applies to (and the numbers it
    uses, e.g. the forget-gate bias plan or chrono init's T_max), then the remedy is applied to a
    ``copy.deepcopy`` under ``torch.manual_seed(seed)``, as :func:`try_remedies` does.

    Args:
        model: the model.
        name: a remedy name (:data:`gradscope.analysis.remedies.REMEDY_NAMES`) that can be applied
            to a copy (see the module docstring).
        batch: an input batch, as for :func:`gradscope.probe`.
        site: only this site (default: every site the remedy applies to).
        loss_fn, target: as for :func:`gradscope.probe`.
        seed: seed of the copy's new weights.

    Returns:
        The remedied copy (create the optimizer for it afresh).

    Raises:
        GradscopeError: an unknown name or site, a remedy that cannot be applied to a copy, or no
            site it applies to.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(2, 8)
        >>> new = gradscope.apply_remedy(rnn, "orthogonal_init", torch.randn(20, 2, 2))
        >>> W = new.weight_hh_l0.detach()
        >>> bool(torch.allclose(W @ W.T, torch.eye(8), atol=1e-5)), new is rnn
        (True, False)
    """
    from .diagnose import diagnose

    if name not in R.REMEDY_NAMES:
        raise GradscopeError(f"unknown remedy {name!r}; known remedies: {', '.join(R.REMEDY_NAMES)}."
                             f"{did_you_mean(str(name), R.REMEDY_NAMES)}")
    if not R.REMEDIES[name].testable:
        raise GradscopeError(f"remedy {name!r} cannot be applied to a copy of the model: "
                             f"{R.REMEDIES[name].untestable}.")
    rec = _probe(model, batch, loss_fn, target, None, seed, 1e-3)
    if site is not None and site not in rec.sites:
        raise GradscopeError(f"unknown site {site!r}; the model has sites {list(rec.sites)}."
                             f"{did_you_mean(str(site), rec.sites)}")
    plan, skipped = _plan(rec, diagnose(rec), [name], None if site is None else {site}, model)
    if not plan:
        why = "; ".join(s.reason for s in skipped) or "no site it applies to"
        raise GradscopeError(f"remedy {name!r} applies to none of the model's sites: {why}.")
    work, _, _ = _applied_copy(model, name, plan[0][1], batch, seed, skipped)
    if work is None:
        raise GradscopeError(f"remedy {name!r} could not be applied: {skipped[-1].reason}.")
    return work
