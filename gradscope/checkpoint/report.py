"""The checkpoint report: a saved checkpoint loaded, rebuilt, analysed statically, probed and diagnosed.

The checkpoint is loaded safely (:func:`~gradscope.checkpoint.load_checkpoint`), its recurrent and
attention modules are rebuilt from keys and shapes (or the user's own model is built from
``model_spec``), the recurrent weights are analysed statically, and the rebuilt modules are probed on
synthetic (or given) inputs and diagnosed. The result is a :class:`CheckpointReport`: data, whose
``to_dict()`` / ``to_json()`` are its own schema. Its text, markdown and HTML are
:mod:`gradscope.render.checkpoint`, found by name through :mod:`gradscope._renderers`
(``gradscope report PATH`` prints one of them).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .. import __version__
from .._archive import DEFAULT_MAX_LOAD_BYTES
from .._format import jsonable, unique
from .._renderers import renderer
from ..analysis.diagnose import SCHEMA_VERSION, Diagnosis, diagnose, nonfinite_weight_findings
from ..analysis.finding import Finding
from ..errors import GradscopeError, InputsError
from ..measure.probe import nonfinite_tensors, probe
from .io import load_checkpoint
from .locate import CELL_KINDS, find_modules
from .locate import FUSED_KEY as _FUSED_KEY
from .locate import site_name as _site
from .rebuild import build_user_model
from .static import estimate_probe_seconds, static_analysis

RECURRENT = ("LSTM", "GRU", "RNN")
CELLS = ("LSTMCell", "GRUCell", "RNNCell")

__all__ = ["CheckpointReport", "Advice", "keyword", "report_checkpoint"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_cell(cell: nn.Module, x):
    """A rebuilt ``nn.*Cell`` over a time-major sequence from a zero state."""
    h = x.new_zeros(x.shape[1], cell.hidden_size)
    state = (h, h.clone()) if isinstance(cell, nn.LSTMCell) else h
    outs = []
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        outs.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(outs)


class _Rebuilt(nn.Module):
    """The rebuilt modules under their checkpoint prefixes; each runs on its own input."""

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        self._order: List[str] = []
        for prefix, m in modules.items():
            parent = self
            parts = prefix.split(".")
            for part in parts[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(parts[-1], m)
            self._order.append(prefix)

    def forward(self, *xs):
        mods = dict(self.named_modules())
        outs = []
        for name, x in zip(self._order, xs):
            m = mods[name]
            if isinstance(m, nn.RNNCellBase):
                outs.append(_run_cell(m, x))
            elif isinstance(m, nn.MultiheadAttention):
                outs.append(m(x, x, x, need_weights=False)[0])  # self-attention on the synthetic tokens
            else:
                out = m(x)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return tuple(outs)


class _Bare(nn.Module):
    """A bare cell (prefix ""), looped over time, or a bare attention module on its own tokens."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        if isinstance(self.cell, nn.MultiheadAttention):
            return self.cell(x, x, x, need_weights=False)[0]
        return _run_cell(self.cell, x)


def _sum_loss(outs):
    return sum(0.5 * o.float().pow(2).mean() for o in outs)


def keyword(setting: str, value: Any = None) -> str:
    """How the report's notes name a setting: as :func:`report_checkpoint`'s keyword argument.

    Example:
        >>> keyword("seq_len", 30), keyword("seq_len")
        ('seq_len=30', 'seq_len=')
    """
    return f"{setting}=" if value is None else f"{setting}={value}"


@dataclass(frozen=True)
class Advice:
    """A note that advises one of :func:`report_checkpoint`'s settings; its words are written when
    the report is shown, so that each caller reads its own names for them.

    Attributes:
        write: ``write(name) -> str``, where ``name(setting, value=None)`` names a setting (and
            its value): :func:`keyword` (``seq_len=30``) unless the report says otherwise
            (:attr:`CheckpointReport.setting_name`; ``gradscope report`` names its flags).
    """

    write: Callable[[Callable[..., str]], str]


@dataclass
class CheckpointReport:
    """Everything ``gradscope report`` says about one checkpoint.

    Notes that advise a setting (:class:`Advice`) name it with ``setting_name``: the keyword
    arguments of :func:`report_checkpoint` by default; the command line passes its flags.
    """

    path: str
    sha256: str
    checkpoint: Dict[str, Any]
    modules: List[Dict[str, Any]]
    static: List[Dict[str, Any]]
    diagnosis: Optional[Diagnosis]
    notes: List[Union[str, Advice]] = field(default_factory=list)
    extra_findings: List[Finding] = field(default_factory=list)  # without a probe: non-finite weights
    setting_name: Callable[..., str] = keyword

    @property
    def findings(self):
        return (self.diagnosis.findings if self.diagnosis is not None else []) + self.extra_findings

    @property
    def all_notes(self) -> List[str]:
        """The one list of notes every format renders: the report's, then the diagnosis's."""
        own = [n.write(self.setting_name) if isinstance(n, Advice) else n for n in self.notes]
        return unique(own + (list(self.diagnosis.notes) if self.diagnosis is not None else []))

    def to_dict(self) -> Dict[str, Any]:
        d = self.diagnosis.to_dict() if self.diagnosis is not None else {"sites": [], "findings": [], "notes": []}
        static_by_site = {r["site"]: r for r in self.static}
        sites = []
        for s in d["sites"]:
            st = static_by_site.get(s["name"])
            if st is not None:
                s = dict(s, static=st)
            sites.append(s)
        known = {s["name"] for s in sites}
        for r in self.static:  # sites with static analysis only (e.g. attention, no probe)
            if r["site"] not in known:
                bad = any(f.site == r["site"] for f in self.extra_findings)
                sites.append({"name": r["site"], "kind": r.get("kind"), "regime": "unmeasured" if bad else None,
                              "evidence": {}, "static": r})
        return jsonable({"schema": SCHEMA_VERSION, "gradscope_version": __version__,
                       "checkpoint": dict(self.checkpoint, path=self.path, sha256=self.sha256),
                       "modules": self.modules, "sites": sites,
                       "findings": d["findings"] + [f.to_dict() for f in self.extra_findings],
                       "measured_on": d.get("measured_on"), "trainability": d.get("trainability"),
                       "remedies": d.get("remedies", []), "notes": self.all_notes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_text(self) -> str:
        """The plain-text report (:func:`gradscope.render.checkpoint.checkpoint_report_to_text`)."""
        return renderer("checkpoint_report.text")(self)

    def to_markdown(self) -> str:
        """The markdown report (:func:`gradscope.render.checkpoint.checkpoint_report_to_markdown`)."""
        return renderer("checkpoint_report.markdown")(self)

    def to_html(self) -> str:
        """The HTML page (:func:`gradscope.render.checkpoint.checkpoint_report_to_html`)."""
        return renderer("checkpoint_report.html")(self)

    def render(self, fmt: str) -> str:
        return {"text": self.to_text, "markdown": self.to_markdown, "json": self.to_json,
                "html": self.to_html}[fmt]()


def _synthetic_input(m: nn.Module, T: int, B: int, scale: float, gen: torch.Generator):
    dtype = next(m.parameters()).dtype
    size = m.embed_dim if isinstance(m, nn.MultiheadAttention) else m.input_size
    x = torch.randn(T, B, size, generator=gen, dtype=torch.float64).to(dtype) * scale
    if getattr(m, "batch_first", False):
        x = x.transpose(0, 1).contiguous()
    return x


def _user_inputs(model: nn.Module, T: int, B: int, scale: float, gen: torch.Generator):
    """Synthetic inputs for a user model: token ids when it starts with an embedding, else
    features of the first recurrent module's input size (its batch_first respected)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.RNNBase, nn.RNNCellBase))), None)
    if first is None:
        raise InputsError("cannot make synthetic inputs for this model: it has no nn.Embedding and no "
                          "recurrent module; pass inputs= a file written with torch.save of a tensor (or tuple) "
                          "of inputs.")
    if isinstance(first, nn.Embedding):
        return torch.randint(0, first.num_embeddings, (B, T), generator=gen)
    x = torch.randn(T, B, first.input_size, generator=gen) * scale
    if getattr(first, "batch_first", False):
        x = x.transpose(0, 1).contiguous()
    return x


def _load_inputs(path: Path):
    """The inputs saved in ``path`` (``report_checkpoint(inputs=path)``), loaded weights-only."""
    p = str(path)
    if not path.is_file():
        raise InputsError(f"inputs={p!r}: no such file; pass a file written with torch.save(tensor).", path=p)
    if path.stat().st_size > DEFAULT_MAX_LOAD_BYTES:
        raise InputsError(f"inputs={p!r} is {path.stat().st_size} bytes, more than 4 GiB of inputs; "
                          f"probing needs a batch of a few dozen sequences: save fewer.", path=p)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
        raise InputsError(f"inputs={p!r} is not a readable tensor file ({type(e).__name__}); "
                          f"write it with torch.save(tensor).", path=p) from None
    if not isinstance(obj, (torch.Tensor, tuple, list, dict)):
        raise InputsError(f"inputs={p!r} holds {type(obj).__name__}; expected a tensor, a tuple "
                          f"of positional inputs or a dict of keyword inputs.", path=p)
    return obj


def _check_inputs_fit(model: nn.Module, x, path: Path) -> None:
    """One forward pass without gradients, so inputs the model cannot take fail in one clear line."""
    shapes = ([list(x.shape)] if isinstance(x, torch.Tensor) else
              [list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
               for v in (x.values() if isinstance(x, dict) else x)])
    try:
        with torch.no_grad():
            model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, (tuple, list)) else model(x)
    except Exception as e:  # noqa: BLE001 - the model refused the user's inputs
        raise InputsError(
            f"inputs={str(path)!r} (shapes {shapes}) does not fit the model: its forward raised "
            f"{type(e).__name__}: {' '.join(str(e).split())[:160]}; save inputs of the shape the model's "
            f"forward expects.", path=str(path)) from None


def _over_budget(modules: Dict[str, nn.Module], seq_len: int, batch: int, k: Optional[int],
                 max_seconds: Optional[float]) -> Dict[str, "Advice"]:
    """Modules (by prefix) whose probes are estimated beyond ``max_seconds`` in all, largest first, each
    with its note."""
    if not max_seconds:
        return {}
    est = {p: estimate_probe_seconds(m, seq_len, batch, k) for p, m in modules.items()}
    total, out = sum(est.values()), {}
    for p in sorted(est, key=est.get, reverse=True):
        if total <= max_seconds:
            break
        total -= est[p]
        m = modules[p]
        size = getattr(m, "hidden_size", None) or getattr(m, "embed_dim", None)
        what = type(m).__name__ + (f" {p!r}" if p else "") + (f" (size {size})" if size else "")
        out[p] = Advice(lambda n, what=what, t=_duration(est[p]): (
            f"probe skipped for {what}: estimated {t} at {n('seq_len', seq_len)}, {n('batch', batch)}, beyond "
            f"{n('max_probe_seconds', f'{max_seconds:g}')}; the static analysis above still holds. Probe it "
            f"with a shorter {n('seq_len')}, or raise {n('max_probe_seconds')} (0: no limit)."))
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min" if seconds < 7200 else f"~{seconds / 3600:.1f} h"


def report_checkpoint(path, *, unsafe: bool = False, model_spec: Optional[str] = None,
                      model_args=None, rnn_nonlinearity: str = "tanh", num_heads: Optional[int] = None,
                      seq_len: int = 100, batch: int = 8, seed: int = 0, input_scale: float = 1.0,
                      inputs: Optional[Path] = None, probe_sites: bool = True, threshold: float = 1e-3,
                      k: Optional[int] = None, progress: Optional[bool] = None,
                      max_load_bytes: Optional[int] = DEFAULT_MAX_LOAD_BYTES,
                      max_probe_seconds: Optional[float] = None, train_mode: bool = False) -> CheckpointReport:
    """Load, rebuild, analyse and probe a checkpoint (see the module docstring).

    ``max_load_bytes`` bounds the checkpoint file (see :func:`load_checkpoint`);
    ``max_probe_seconds`` skips probing modules whose estimated probe time
    (:func:`estimate_probe_seconds`) is beyond it, with a note (None: probe everything). The model
    is probed in eval mode (dropout off, batch-norm running statistics) unless ``train_mode``; the
    report states the mode and the inputs it measured on, and a checkpoint's remedies put what
    works during training (clipping, truncation, gate-bias adjustment with fine-tuning) before
    re-initialisation.
    """
    for name, v, lo in (("seq_len", seq_len, 2), ("batch", batch, 1)):
        if v < lo:
            raise GradscopeError(f"{name}= must be at least {lo}, got {v}.")
    if not (input_scale > 0 and math.isfinite(input_scale)):
        raise GradscopeError(f"input_scale= must be a positive number, got {input_scale}.")
    path = Path(path)
    ckpt = load_checkpoint(path, unsafe=unsafe, max_load_bytes=max_load_bytes)  # sparse tensors made dense
    found = find_modules(ckpt.state_dict, rnn_nonlinearity=rnn_nonlinearity, num_heads=num_heads)
    notes: List[Union[str, Advice]] = list(ckpt.notes)
    bad = nonfinite_tensors(ckpt.state_dict.items())  # NaN/inf anywhere in the state dict
    info = {"format": ckpt.format, "source_key": ckpt.source_key, "metadata": ckpt.metadata,
            "num_tensors": len(ckpt.state_dict), "num_parameters": ckpt.num_parameters,
            "stripped_prefix": ckpt.stripped_prefix, "unsafe_load": unsafe}
    static: List[Dict[str, Any]] = []
    for f in found:
        static += static_analysis(f)
    modules = [{"prefix": f.prefix, "kind": f.kind, "config": f.config, "notes": list(f.notes),
                "sites": list(f.sites)} for f in found]
    gen = torch.Generator().manual_seed(seed)
    diag = None
    mode = "train" if train_mode else "eval"
    synthetic = (f"synthetic N(0, {input_scale:g}²) inputs of length {seq_len}, batch {batch}, seed {seed}")
    measured = {"mode": mode, "inputs_synthetic": True, "inputs": synthetic}
    if model_spec:
        model = build_user_model(model_spec, model_args, ckpt.state_dict)
        model.train(train_mode)
        if inputs:
            x = _load_inputs(inputs)
            _check_inputs_fit(model, x, inputs)
            measured.update(inputs=f"the inputs in {inputs}", inputs_synthetic=False)
        else:
            x = _user_inputs(model, seq_len, batch, input_scale, gen)
            if not x.is_floating_point():
                measured["inputs"] = (f"synthetic uniform token ids of length {seq_len}, batch {batch}, "
                                      f"seed {seed}")
        over = _over_budget({"": model}, seq_len, batch, k, max_probe_seconds)
        if over and probe_sites:
            notes.append(over[""])
            probe_sites = False
        if probe_sites:
            rec = probe(model, x, k=k, threshold=threshold, progress=progress)
            diag = diagnose(rec.replace(meta=dict(_with_bad(rec.meta, bad), **measured)), threshold=threshold,
                            trained=True)
    else:
        rebuilt, xs = {}, []
        for f in found:
            if f.kind not in RECURRENT + CELLS + ("MultiheadAttention",):
                notes.append(f"{f.kind} at {f.prefix or '(root)'}: static analysis only.")
                continue
            m = f.build()
            rebuilt[f.prefix] = m
            xs.append(_synthetic_input(m, seq_len, batch, input_scale, gen))
        if inputs:
            notes.append(Advice(lambda n: f"{n('inputs')} is used with {n('model_spec')} only; rebuilt modules "
                                          f"get synthetic inputs."))
        if probe_sites:
            for prefix, note in _over_budget(rebuilt, seq_len, batch, k, max_probe_seconds).items():
                notes.append(note)
                xs.pop(list(rebuilt).index(prefix))
                del rebuilt[prefix]
        if rebuilt and probe_sites:
            if "" in rebuilt:  # a bare module's state dict: probe it as it is
                m = rebuilt[""]
                root = _Bare(m) if isinstance(m, (nn.RNNCellBase, nn.MultiheadAttention)) else m
                rec = probe(root.train(train_mode), xs[list(rebuilt).index("")], k=k, threshold=threshold,
                            progress=progress)
            else:
                root = _Rebuilt(rebuilt).train(train_mode)
                rec = probe(root, tuple(xs), loss_fn=_sum_loss, k=k, threshold=threshold, progress=progress)
            # name the report after the file, not the internal container module
            diag = diagnose(rec.replace(meta=dict(_with_bad(rec.meta, bad), model=path.name, **measured)),
                            threshold=threshold, trained=True)
    extra: List[Finding] = []
    if diag is None and bad:  # no probe (probe_sites=False, nothing to rebuild, over budget): still a finding
        owner = _static_owners(found)
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for b in bad:
            groups.setdefault(owner.get(b["name"], "(checkpoint)"), []).append(b)
        extra = nonfinite_weight_findings(bad, groups, {})
    if not found and not model_spec:
        notes.append("no recurrent or attention weights found in this checkpoint (keys of nn.RNN/LSTM/GRU, "
                     "their cells, or nn.MultiheadAttention); nothing to probe.")
    return CheckpointReport(str(path), sha256(path), info, modules, static, diag, notes, extra_findings=extra)


def _with_bad(meta: Dict[str, Any], bad: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The probe's metadata with the checkpoint's own list of non-finite tensors (every tensor of the
    state dict, also those no rebuilt module holds)."""
    meta = {k: v for k, v in meta.items() if k != "nonfinite_weights"}
    if bad:
        meta["nonfinite_weights"] = bad
    return meta


def _static_owners(found) -> Dict[str, str]:
    """State-dict key → the site (as in the static analysis) whose weights it is."""
    out = {}
    for f in found:
        for local, key in f.keys.items():
            m = _FUSED_KEY.match(local)
            if f.kind in CELL_KINDS or f.kind == "MultiheadAttention" or m is None:
                out[key] = f.prefix or "(checkpoint)"
            else:
                out[key] = _site(f.prefix, int(m.group(2)), m.group(3) or "")
    return out
