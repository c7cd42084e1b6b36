"""Recording: what gradscope measured, as frozen plain data (numpy + JSON-able metadata).

A Recording holds no torch objects and never touches a model or a device. It is produced by
:func:`gradscope.watch` (``scope.recording``) and :func:`gradscope.probe`, saved with
:meth:`Recording.save` and read back with :func:`gradscope.load`.

Index letters: S recorded training steps, T time steps (the longest sequence seen), B samples,
k lags or exponents, H hidden units.

Time axis. Column ``t`` of ``grad_norms(site)`` is the state produced after consuming input
position ``t`` (``t = 0 … T−1``), for the reverse direction of a bidirectional layer too (its
recurrence runs from ``T−1`` down to ``0``, so its gradient travels in the opposite direction).
Variable sequence lengths across training steps are padded with NaN on the right: a step whose
sequence had length 30 in a recording whose longest sequence is 50 has NaN in columns 30–49
(``rec.seq_lens(site)`` gives each step's length). Within one step, samples of a
``PackedSequence`` that have ended simply no longer contribute to the norm at later positions.
"""
from __future__ import annotations

import io
import json
import stat
import zipfile
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._archive import DEFAULT_MAX_LOAD_BYTES, check_file_size, check_limit, inspect_zip, read_npz
from ._format import jsonable
from ._renderers import renderer
from .errors import GradscopeError, MissingMeasureError, NotARecordingError, RecordingFormatError, did_you_mean

FORMAT_VERSION = 1
_META_KEY = "__meta__"

__all__ = ["Recording", "load", "FORMAT_VERSION"]


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


class Recording:
    """Frozen measurements of one watched run or one probe.

    Attributes:
        sites: site names in discovery order (e.g. ``"encoder.lstm.l0"``,
            ``"encoder.lstm.l0_reverse"``, ``"decoder.cell"``).
        steps: ``[S]`` the training-step index of every recorded step.
        events: list of dicts, e.g. the first non-finite value per source
            (``{"kind": "nonfinite", "step": 12, "site": "lstm.l0", "state": "h", "t": 37}``).
        unsupported: modules that look recurrent or attention-like but could not be measured,
            each ``{"module": name, "type": cls, "reason": ...}``.
        notes: human-readable remarks of the capture (e.g. "no recurrent site found").
        meta: JSON-able metadata (gradscope and torch versions, model class, ``every``, …).

    Example:
        >>> import gradscope, torch
        >>> rnn = torch.nn.RNN(3, 8)
        >>> with gradscope.watch(rnn) as scope:
        ...     out, _ = rnn(torch.randn(5, 2, 3))
        ...     out.sum().backward()
        >>> scope.recording.grad_norms("l0").shape
        (1, 5)
    """

    def __init__(self, *, sites: Mapping[str, Mapping[str, Any]], steps: Sequence[int],
                 grads: Mapping[Tuple[str, str], np.ndarray], seq_lens: Mapping[str, np.ndarray],
                 params: Mapping[str, np.ndarray], events: Sequence[Mapping[str, Any]] = (),
                 unsupported: Sequence[Mapping[str, Any]] = (), notes: Sequence[str] = (),
                 meta: Optional[Mapping[str, Any]] = None,
                 measures: Optional[Mapping[Tuple[str, str], np.ndarray]] = None,
                 measure_meta: Optional[Mapping[str, Any]] = None,
                 update_norms: Optional[Mapping[str, np.ndarray]] = None,
                 weight_norms: Optional[Mapping[str, np.ndarray]] = None):
        self._site_info = {k: dict(v) for k, v in sites.items()}
        self._steps = _frozen(np.asarray(steps, dtype=np.int64))
        self._grads = {k: _frozen(np.asarray(v, dtype=np.float64)) for k, v in grads.items()}
        self._seq_lens = {k: _frozen(np.asarray(v, dtype=np.int64)) for k, v in seq_lens.items()}
        self._params = {k: _frozen(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
        self._measures = {k: _frozen(np.asarray(v)) for k, v in (measures or {}).items()}
        self._update_norms = {k: _frozen(np.asarray(v, dtype=np.float64)) for k, v in (update_norms or {}).items()}
        self._weight_norms = {k: _frozen(np.asarray(v, dtype=np.float64)) for k, v in (weight_norms or {}).items()}
        self._measure_meta = dict(measure_meta or {})
        self.events: Tuple[Dict[str, Any], ...] = tuple(dict(e) for e in events)
        self.unsupported: Tuple[Dict[str, Any], ...] = tuple(dict(u) for u in unsupported)
        self.notes: Tuple[str, ...] = tuple(notes)
        self.meta: Dict[str, Any] = dict(meta or {})
        n = len(self._steps)
        for (site, state), a in self._grads.items():
            if site not in self._site_info:
                raise RecordingFormatError(f"grad norms for unknown site {site!r}")
            if a.ndim != 2 or a.shape[0] != n:
                raise RecordingFormatError(
                    f"grad norms of {site!r}/{state!r} have shape {a.shape}, expected [{n}, T]")
        for name, a in self._params.items():
            if a.shape != (n,):
                raise RecordingFormatError(
                    f"parameter norms of {name!r} have shape {a.shape}, expected [{n}]")
        if set(self._update_norms) != set(self._weight_norms):
            raise RecordingFormatError("update norms and weight norms name different parameters")
        for what, d in (("update", self._update_norms), ("weight", self._weight_norms)):
            for name, a in d.items():
                if a.shape != (n,):
                    raise RecordingFormatError(
                        f"{what} norms of {name!r} have shape {a.shape}, expected [{n}]")

    # ---------------------------------------------------------------- queries
    @property
    def sites(self) -> Tuple[str, ...]:
        return tuple(self._site_info)

    @property
    def steps(self) -> np.ndarray:
        return self._steps

    def __len__(self) -> int:
        return len(self._steps)

    def site_info(self, site: str) -> Dict[str, Any]:
        """Static facts about a site: ``kind`` (``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``,
        ``cell``), ``module`` (qualified name), ``layer``, ``direction``, ``states``, sizes."""
        return dict(self._site_info[self._check_site(site)])

    def states(self, site: str) -> Tuple[str, ...]:
        """State names of a site: ``("h",)``, or ``("h", "c")`` for LSTM and two-state cells."""
        return tuple(self._site_info[self._check_site(site)]["states"])

    def grad_norms(self, site: str, state: str = "h") -> np.ndarray:
        """‖∂L/∂h_t‖ per recorded step and time step: ``[S, T]`` (Frobenius over batch and
        features; NaN right-padding for steps with shorter sequences)."""
        site = self._check_site(site)
        states = self._site_info[site]["states"]
        if state not in states:
            raise GradscopeError(
                f"site {site!r} has states {tuple(states)}, not {state!r}.{did_you_mean(state, states)}")
        key = (site, state)
        if key not in self._grads:
            return np.zeros((len(self._steps), 0))
        return self._grads[key]

    def seq_lens(self, site: str) -> np.ndarray:
        """``[S]`` the sequence length the site ran for at every recorded step (0: not called)."""
        site = self._check_site(site)
        return self._seq_lens.get(site, np.zeros(len(self._steps), dtype=np.int64))

    def param_grad_norms(self) -> Dict[str, np.ndarray]:
        """``{name: [S]}`` the gradient norm of every named parameter at every recorded step
        (NaN where the parameter received no gradient)."""
        return dict(self._params)

    def update_ratios(self) -> Dict[str, np.ndarray]:
        """``{name: [S]}`` the update-to-weight ratio ‖Δw‖/‖w‖ of every parameter at every
        recorded step: Δw is the change of the parameter between that step's forward pass and the
        next forward pass with gradients (the optimizer's update, as the model saw it), w its value
        at that step's forward. Recorded by ``watch(update_ratio=True)`` (the default).

        NaN where not measured (no next forward before the watch closed; older recordings and
        :func:`gradscope.probe` have none: ``{}``); 0 where the parameter did not change (frozen, not
        in the optimizer, no optimizer step); inf where an all-zero parameter moved (e.g. a
        zero-initialised bias on the first step).
        """
        out = {}
        for name, d in self._update_norms.items():
            w = self._weight_norms[name]
            with np.errstate(divide="ignore", invalid="ignore"):
                r = d / w
            r[(d == 0) & (w == 0)] = 0.0
            out[name] = r
        return out

    def update_norms(self) -> Dict[str, np.ndarray]:
        """``{name: [S]}`` ‖Δw‖ per parameter and recorded step (see :meth:`update_ratios`)."""
        return dict(self._update_norms)

    def weight_norms(self) -> Dict[str, np.ndarray]:
        """``{name: [S]}`` ‖w‖ per parameter at the forward pass of each recorded step where the
        update was measured (NaN elsewhere; see :meth:`update_ratios`)."""
        return dict(self._weight_norms)

    # probe measures ---------------------------------------------------------
    def has_measure(self, site: str, measure: str) -> bool:
        return (site, measure) in self._measures

    def measure(self, site: str, measure: str) -> np.ndarray:
        """A probe measure of a site by name (``jacobian_norms``, ``lyapunov``, …)."""
        site = self._check_site(site)
        key = (site, measure)
        if key not in self._measures:
            have = sorted({m for (s, m) in self._measures if s == site})
            raise MissingMeasureError(
                f"the recording has no {measure!r} for site {site!r} (it has {have or 'none'}). "
                f"Record it with gradscope.probe(model, batch) or watch(model, probe_every=N).")
        return self._measures[key]

    def measures(self) -> Dict[Tuple[str, str], np.ndarray]:
        return dict(self._measures)

    def jacobian_norms(self, site: str) -> np.ndarray:
        """``[B, T+1]`` ‖∂h_T/∂h_{T−k}‖₂ by lag k for the probed samples (from :func:`gradscope.probe`)."""
        return self.measure(site, "jacobian_norms")

    def lyapunov(self, site: str) -> np.ndarray:
        """``[B, k]`` top-k Lyapunov exponents (natural log per step, descending)."""
        return self.measure(site, "lyapunov")

    def hidden_spectrum(self, site: str) -> Dict[str, Any]:
        """``{"singular_values": [K], "effective_rank": float, "participation_ratio": float}``."""
        sv = self.measure(site, "hidden_sv")
        meta = self._measure_meta.get(site, {}).get("hidden", {})
        return {"singular_values": sv, **meta}

    def gate_stats(self, site: str) -> Dict[str, Any]:
        """Gate statistics of a probed LSTM/GRU site (saturation shares, mean keep gate, memory
        time τ = −1/ln f̄) and the dead-unit share of a ReLU RNN; empty for other sites."""
        site = self._check_site(site)
        if site not in self._measure_meta:
            raise MissingMeasureError(
                f"the recording has no probe measures for site {site!r}. Record them with "
                f"gradscope.probe(model, batch) or watch(model, probe_every=N).")
        return dict(self._measure_meta[site].get("gates", {}))

    def site_measures(self, site: str) -> Dict[str, Any]:
        """All probe metadata of a site (decay fit, λ₁, weights, gates, …) as a dict."""
        return dict(self._measure_meta.get(self._check_site(site), {}))

    # attention measures ------------------------------------------------------
    # Sites of kind "attention" are transformer blocks; their grad_norms(site) is ‖∂L/∂x_{ℓ,p}‖ at
    # the block *input* by position p. Per-step measures are stored as measures of the site
    # (``[S]`` or ``[S, H]``, NaN where a step did not measure them); a block with several attention
    # modules (self- and cross-attention) keeps the others' as ``"<measure>[<module path in block>]"``.
    @property
    def attention_stacks(self) -> Dict[str, Tuple[str, ...]]:
        """``{stack: (site, …)}``: attention blocks (sites) of every stack, by depth. A stack is the
        ``nn.ModuleList`` / ``nn.Sequential`` holding the blocks (``"encoder.layers"``,
        ``"bert.encoder.layer"``, ``"transformer.h"``)."""
        stacks: Dict[str, List[Tuple[int, str]]] = {}
        for s, info in self._site_info.items():
            if info.get("kind") == "attention":
                stacks.setdefault(info.get("stack", s), []).append((int(info.get("depth") or 0), s))
        return {k: tuple(s for _, s in sorted(v)) for k, v in stacks.items()}

    def _stack(self, stack: Optional[str]) -> str:
        stacks = self.attention_stacks
        if not stacks:
            raise MissingMeasureError(
                "this recording has no attention sites (no nn.MultiheadAttention, nn.Transformer* layer, "
                "Hugging Face attention or user attention module was found); depth and attention measures "
                "exist only for attention models.")
        if stack is None:
            if len(stacks) > 1:
                raise GradscopeError(f"the recording has {len(stacks)} attention stacks {list(stacks)}; "
                                     f"name one, e.g. stack={next(iter(stacks))!r}.")
            return next(iter(stacks))
        if stack not in stacks:
            raise GradscopeError(f"unknown attention stack {stack!r}; the recording has {list(stacks)}."
                                 f"{did_you_mean(stack, stacks)}")
        return stack

    def _attention_site(self, site: str) -> str:
        site = self._check_site(site)
        if self._site_info[site].get("kind") != "attention":
            have = [s for s, i in self._site_info.items() if i.get("kind") == "attention"]
            raise GradscopeError(f"site {site!r} is a {self._site_info[site].get('kind')} site, not an attention "
                                 f"block; attention sites: {have or 'none'}.")
        return site

    def _attention_measure(self, site: str, name: str, module: Optional[str]) -> np.ndarray:
        site = self._attention_site(site)
        key = (site, name if not module else f"{name}[{module}]")
        if key not in self._measures:
            if module:
                mods = sorted({m[len(name) + 1:-1] for s, m in self._measures
                               if s == site and m.startswith(name + "[")})
                raise MissingMeasureError(
                    f"site {site!r} has no {name!r} for attention module {module!r}; modules with it: "
                    f"{mods or 'none besides the primary one (module=None)'}.")
            raise MissingMeasureError(
                f"the recording has no {name!r} for attention site {site!r} (no scheduled step measured it: "
                f"watch() records it on scheduled steps, probe() on its batch).")
        return self._measures[key]

    def depth_grad_norms(self, stack: Optional[str] = None) -> np.ndarray:
        """``[S, L, P]`` ‖∂L/∂x_{ℓ,p}‖: the gradient reaching the input of block ℓ of an attention
        stack at position p, every recorded step (Frobenius over samples and features; padding
        positions of each sample left out; NaN where a position is padding in every sample or the
        block did not run). ``stack`` may be omitted when the model has one stack.

        Example:
            >>> import torch, gradscope
            >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 3,
            ...                                   enable_nested_tensor=False)
            >>> with gradscope.watch(enc) as scope:
            ...     enc(torch.randn(5, 2, 8)).sum().backward()
            >>> scope.recording.depth_grad_norms().shape
            (1, 3, 5)
        """
        stack = self._stack(stack)
        key = (stack, "depth_grad_norms")
        if key in self._measures:
            return self._measures[key]
        sites = self.attention_stacks[stack]
        arrs = [self.grad_norms(s) for s in sites]
        P = max((a.shape[1] for a in arrs), default=0)
        out = np.full((len(self._steps), len(sites), P), np.nan)
        for i, a in enumerate(arrs):
            out[:, i, :a.shape[1]] = a
        return out

    def depth_jacobian_norms(self, stack: Optional[str] = None) -> np.ndarray:
        """``[B, L+1]`` RMS gain ‖∂x_L/∂x_{L−k}‖_F / √(P·E) of an attention stack for k = 0…L
        (lag 0 is the identity, 1), per probed sample; from :func:`gradscope.probe` or
        ``watch(probe_every=N)``."""
        stack = self._stack(stack)
        key = (stack, "depth_jacobian_norms")
        if key not in self._measures:
            raise MissingMeasureError(
                f"the recording has no depth Jacobians for attention stack {stack!r}. Record them with "
                f"gradscope.probe(model, batch) or watch(model, probe_every=N).")
        return self._measures[key]

    def attention_entropy(self, site: str, module: Optional[str] = None) -> np.ndarray:
        """``[S, H]`` attention entropy per head, each query row normalised by ln(number of keys it
        attends) and averaged over samples and non-padding rows: 1 uniform, 0 one-hot. ``module``
        picks another attention module of the block (its path inside the block, e.g.
        ``"multihead_attn"``); default: the block's first (self-)attention."""
        return self._attention_measure(site, "attention_entropy", module)

    def rank_residual(self, site: str) -> np.ndarray:
        """``[S]`` rank-collapse residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F of the block output X (per sample over
        its non-padding tokens, averaged): 0 when all tokens are equal (Dong et al. 2021)."""
        return self._attention_measure(site, "rank_residual", None)

    def token_cosine(self, site: str) -> np.ndarray:
        """``[S]`` mean cosine similarity between distinct tokens of the block output (→ 1 with rank
        collapse)."""
        return self._attention_measure(site, "token_cosine", None)

    def qk_spectral_norm(self, site: str, module: Optional[str] = None) -> np.ndarray:
        """``[S, H]`` per head ‖scale · W_{Q,h}ᵀ W_{K,h}‖₂, the spectral norm of the attention-logit
        bilinear form (power iteration), scale = 1/√d for standard attention."""
        return self._attention_measure(site, "qk_spectral_norm", module)

    def qkv_grad_norms(self, site: str, module: Optional[str] = None) -> Dict[str, np.ndarray]:
        """``{"q": [S], "k": [S], "v": [S]}`` ‖∇W_Q‖, ‖∇W_K‖, ‖∇W_V‖ of the block's attention module
        (query/key gradients ≪ value gradients go with rank collapse, Noci et al. 2022)."""
        return {w: self._attention_measure(site, f"grad_w{w}", module) for w in "qkv"}

    def replace(self, **changes) -> "Recording":
        """A new Recording with some fields replaced (the constructor's keywords: ``meta``,
        ``measures``, ``measure_meta``, ``notes`` …); this one is unchanged."""
        fields = dict(sites=self._site_info, steps=self._steps, grads=self._grads,
                      seq_lens=self._seq_lens, params=self._params, events=self.events,
                      unsupported=self.unsupported, notes=self.notes, meta=self.meta,
                      measures=self._measures, measure_meta=self._measure_meta,
                      update_norms=self._update_norms, weight_norms=self._weight_norms)
        fields.update(changes)
        return Recording(**fields)


    @property
    def measure_meta(self) -> Dict[str, Any]:
        return dict(self._measure_meta)

    def _check_site(self, site: str) -> str:
        if site not in self._site_info:
            if not self._site_info:
                raise GradscopeError(
                    f"unknown site {site!r}: this recording has no sites (no recurrent or attention "
                    f"module was found in the model).")
            raise GradscopeError(
                f"unknown site {site!r}; the recording has {list(self._site_info)}."
                f"{did_you_mean(site, self._site_info)}")
        return site

    def to_tensorboard(self, writer, step=None, **kwargs) -> None:
        """Write this recording to a TensorBoard ``SummaryWriter``: scalars per site, heatmaps as
        images, the diagnosis as text (see :mod:`gradscope.render.tensorboard`)."""
        renderer("recording.tensorboard")(self, writer, step=step, **kwargs)

    def _repr_html_(self) -> str:
        """The notebook display (:func:`gradscope.render.html.recording_repr_html`)."""
        return renderer("recording.repr_html")(self)

    def __repr__(self) -> str:
        return (f"Recording(sites={list(self.sites)}, steps={len(self)}, "
                f"params={len(self._params)}, events={len(self.events)})")

    # ----------------------------------------------------------------- file io
    def save(self, path) -> Path:
        """Write the recording to ``path`` (a ``.npz`` zip: arrays plus JSON metadata)."""
        path = path if hasattr(path, "write") else Path(path)
        arrays: Dict[str, np.ndarray] = {"steps": self._steps}
        index: Dict[str, Any] = {"grads": [], "seq_lens": [], "params": [], "measures": []}
        for i, ((site, state), a) in enumerate(self._grads.items()):
            arrays[f"g{i}"] = a
            index["grads"].append([site, state, f"g{i}"])
        for i, (site, a) in enumerate(self._seq_lens.items()):
            arrays[f"l{i}"] = a
            index["seq_lens"].append([site, f"l{i}"])
        for i, (name, a) in enumerate(self._params.items()):
            arrays[f"p{i}"] = a
            index["params"].append([name, f"p{i}"])
        for i, ((site, m), a) in enumerate(self._measures.items()):
            arrays[f"m{i}"] = a
            index["measures"].append([site, m, f"m{i}"])
        if self._update_norms:  # optional (absent from files of gradscope before it, still read)
            index["updates"] = []
            for i, name in enumerate(self._update_norms):
                arrays[f"u{i}"] = self._update_norms[name]
                arrays[f"w{i}"] = self._weight_norms[name]
                index["updates"].append([name, f"u{i}", f"w{i}"])
        meta = {
            "format": "gradscope.recording", "version": FORMAT_VERSION,
            "sites": self._site_info, "events": list(self.events), "unsupported": list(self.unsupported),
            "notes": list(self.notes), "meta": self.meta, "measure_meta": self._measure_meta,
            "index": index,
        }
        arrays[_META_KEY] = np.frombuffer(json.dumps(jsonable(meta)).encode(), dtype=np.uint8)
        with open(path, "wb") if isinstance(path, Path) else nullcontext(path) as f:
            np.savez_compressed(f, **arrays)
        return path

    def _to_bytes(self) -> bytes:
        """The saved form (npz + JSON, no pickle) as bytes; used to send recordings between ranks."""
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    @staticmethod
    def _from_bytes(data: bytes, what: str = "received recording") -> "Recording":
        return _read(io.BytesIO(data), what)


def load(path, *, max_load_bytes: Optional[int] = DEFAULT_MAX_LOAD_BYTES) -> Recording:
    """Read a Recording written by :meth:`Recording.save`.

    The file is checked before it is inflated: its size, and the size its arrays declare, must fit
    ``max_load_bytes`` (default 4 GiB; None: no limit), a zip inflating beyond 100:1 past 16 MiB is
    refused as a zip bomb, every npy header must match its member's size, and CRC-32s must match.
    Then the schema is checked: metadata types, array dtypes and shapes (``steps`` ``[S]`` integers,
    grad norms ``[S, T]``, parameter, update and weight norms ``[S]``), and signs (norms are not negative).

    Raises:
        RecordingFormatError: the file is missing, unreadable, not a gradscope recording, truncated,
            corrupt or malformed (the message names the field), or written by a newer gradscope
            (unknown format version). Its subclass LoadLimitError: the file declares more than
            ``max_load_bytes``.
    """
    limit = check_limit(max_load_bytes)
    path = Path(path)
    hint = "Pass a file written by Recording.save()."
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RecordingFormatError(f"no recording at {str(path)!r}: no such file. {hint}") from None
    except OSError as e:
        raise RecordingFormatError(f"cannot access {str(path)!r} ({e.strerror or e}); check the path "
                                   f"and its permissions.") from None
    if stat.S_ISDIR(st.st_mode):
        raise RecordingFormatError(f"no recording at {str(path)!r}: a directory. {hint}")
    if not stat.S_ISREG(st.st_mode):
        raise RecordingFormatError(f"{str(path)!r} is not a regular file (a pipe, device or socket); "
                                   f"{hint}")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise RecordingFormatError(f"cannot read {str(path)!r} ({e.strerror or e}); check its "
                                   f"permissions.") from None
    with fh:
        return _read(fh, repr(str(path)), limit)


def _not_a_recording(what: str, infos, hint: str) -> NotARecordingError:
    """The error for a zip archive without gradscope metadata: what it holds, and what to do instead."""
    names = [i.filename for i in infos]
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return NotARecordingError(
            f"{what} is a TorchScript archive (torch.jit.save), not a gradscope recording; to analyse the "
            f"model it holds, load it with gradscope.checkpoint.load_checkpoint(path, unsafe=True) (loading "
            f"TorchScript runs its code).", holds="torchscript")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return NotARecordingError(
            f"{what} is a PyTorch checkpoint (torch.save), not a gradscope recording; to analyse the "
            f"weights it holds, load it with gradscope.checkpoint.load_checkpoint(path).", holds="checkpoint")
    kind = (f"a NumPy .npz archive of {len(names)} array(s)"
            if names and all(n.endswith(".npy") for n in names) else f"a zip archive of {len(names)} member(s)")
    return NotARecordingError(f"{what} is {kind} without gradscope metadata, not a gradscope recording. {hint}",
                              holds="archive")


def _read(fh, what: str, max_load_bytes: Optional[int] = DEFAULT_MAX_LOAD_BYTES) -> Recording:
    hint = "Pass a file written by Recording.save()."
    try:
        size = fh.seek(0, 2)
        fh.seek(0)
        check_file_size(what, size, max_load_bytes)
        with zipfile.ZipFile(fh) as z:
            infos = inspect_zip(z, what, size, max_load_bytes, RecordingFormatError)
            if not any(i.filename in (_META_KEY, _META_KEY + ".npy") for i in infos):
                raise _not_a_recording(what, infos, hint)
            arrays = read_npz(z, infos, what, RecordingFormatError)
    except RecordingFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError,
            zlib.error, NotImplementedError, RuntimeError) as e:
        raise RecordingFormatError(
            f"{what} is not a readable gradscope recording (corrupt or truncated: "
            f"{type(e).__name__}). {hint}") from None
    raw = arrays[_META_KEY]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise RecordingFormatError(f"{what}: its metadata (__meta__) is a {raw.dtype} array of shape "
                                   f"{raw.shape}, expected JSON bytes (uint8, 1-D). {hint}")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RecordingFormatError(f"{what}: its metadata is not valid JSON ({type(e).__name__}). {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != "gradscope.recording":
        raise RecordingFormatError(f"{what} is not a gradscope recording. {hint}")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise RecordingFormatError(
            f"{what} has recording format version {version!r}; this gradscope reads "
            f"version {FORMAT_VERSION}. Upgrade gradscope (pip install -U gradscope) to read it.")
    fields = _validated(meta, arrays, what)
    try:
        return Recording(**fields)
    except RecordingFormatError as e:
        raise RecordingFormatError(f"{what}: {e}. {hint}") from None


# Measures whose arrays gradscope writes: (ndim, first axis is the recorded steps, non-negative).
_MEASURE_SCHEMA = {
    "jacobian_norms": (2, False, True), "lyapunov": (2, False, False), "hidden_sv": (1, False, True),
    "depth_grad_norms": (3, True, True), "depth_jacobian_norms": (2, False, True),
    "attention_entropy": (2, True, True), "qk_spectral_norm": (2, True, True),
    "rank_residual": (1, True, True), "token_cosine": (1, True, False),
    "grad_wq": (1, True, True), "grad_wk": (1, True, True), "grad_wv": (1, True, True),
}


def _bad(what: str, field: str, got: str, expected: str) -> RecordingFormatError:
    return RecordingFormatError(f"{what}: field {field} is {got}, expected {expected}; the file is malformed "
                                f"or was not written by Recording.save(): re-save it.")


def _kind(v: Any) -> str:
    return f"a {type(v).__name__} ({' '.join(repr(v).split())[:40]})"


def _validated(meta: Dict[str, Any], arrays: Dict[str, np.ndarray], what: str) -> Dict[str, Any]:
    """Check the metadata and arrays of a loaded recording against the schema Recording.save writes;
    returns Recording's keyword arguments. Every refusal names the field."""
    def typed(name, value, types, expected):
        if not isinstance(value, types):
            raise _bad(what, name, _kind(value), expected)
        return value

    sites = typed("sites", meta.get("sites"), dict, "an object of site name -> site info")
    for s, info in sites.items():
        typed(f"sites[{s!r}]", info, dict, "an object (kind, states, ...)")
        states = info.get("states")
        if not isinstance(states, list) or not all(isinstance(x, str) for x in states):
            raise _bad(what, f"sites[{s!r}].states", _kind(states), "a list of state names such as ['h', 'c']")
        if not isinstance(info.get("kind", ""), str):
            raise _bad(what, f"sites[{s!r}].kind", _kind(info.get("kind")), "a string such as 'lstm'")
    for name in ("events", "unsupported"):
        items = typed(name, meta.get(name, []), list, "a list of objects")
        for i, e in enumerate(items):
            typed(f"{name}[{i}]", e, dict, "an object")
    notes = typed("notes", meta.get("notes", []), list, "a list of strings")
    for i, n in enumerate(notes):
        typed(f"notes[{i}]", n, str, "a string")
    typed("meta", meta.get("meta", {}), dict, "an object")
    measure_meta = typed("measure_meta", meta.get("measure_meta", {}), dict, "an object of site -> object")
    for s, m in measure_meta.items():
        typed(f"measure_meta[{s!r}]", m, dict, "an object")
    index = typed("index", meta.get("index"), dict, "an object with grads, seq_lens, params, measures")

    def entries(name, arity):
        rows = typed(f"index.{name}", index.get(name, []), list, f"a list of [{arity} strings] rows")
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == arity and all(isinstance(x, str) for x in row)):
                raise _bad(what, f"index.{name}[{i}]", _kind(row), f"a list of {arity} strings")
            if row[-1] not in arrays:
                raise _bad(what, f"index.{name}[{i}]", f"a reference to array {row[-1]!r}, which the file lacks",
                           "the name of one of its arrays")
        return rows

    def array(field, key, kinds, ndim, length=None, signed=False):
        a = arrays[key]
        if a.dtype.kind not in kinds:
            raise _bad(what, field, f"an array of dtype {a.dtype}", f"{'integers' if kinds == 'iu' else 'real numbers'}")
        if a.ndim != ndim or (length is not None and a.shape[0] != length):
            shape = "[" + ", ".join(["S" if length is not None else "n"] + ["n"] * (ndim - 1)) + "]"
            raise _bad(what, field, f"an array of shape {list(a.shape)}",
                       f"{ndim}-D {shape}" + (f" with S = {length} recorded steps" if length is not None else ""))
        if not signed and a.size and bool(np.any(a < 0)):
            raise _bad(what, field, f"an array with negative values (min {np.nanmin(a):.4g})",
                       "norms and counts, which are never negative (NaN marks missing values)")
        return a

    if "steps" not in arrays:
        raise _bad(what, "steps", "missing", "a 1-D integer array [S] of training-step indices")
    steps = array("steps", "steps", "iu", 1)
    n = len(steps)
    grads = {}
    for i, (s, st, k) in enumerate(entries("grads", 3)):
        if s not in sites or st not in sites[s]["states"]:
            raise _bad(what, f"index.grads[{i}]", f"a reference to site {s!r} state {st!r}",
                       "a site and state listed under sites")
        grads[(s, st)] = array(f"grad norms of {s!r}/{st!r} ({k})", k, "fiub", 2, n)
    seq_lens = {}
    for i, (s, k) in enumerate(entries("seq_lens", 2)):
        if s not in sites:
            raise _bad(what, f"index.seq_lens[{i}]", f"a reference to site {s!r}", "a site listed under sites")
        seq_lens[s] = array(f"sequence lengths of {s!r} ({k})", k, "iu", 1, n)
    params = {p: array(f"parameter grad norms of {p!r} ({k})", k, "fiub", 1, n)
              for p, k in entries("params", 2)}
    measures = {}
    for s, m, k in entries("measures", 3):
        ndim, per_step, positive = _MEASURE_SCHEMA.get(m.split("[")[0], (arrays[k].ndim, False, False))
        measures[(s, m)] = array(f"measure {m!r} of {s!r} ({k})", k, "fiub", ndim, n if per_step else None,
                                 signed=not positive)
    update_norms, weight_norms = {}, {}
    for i, (p, ku, kw) in enumerate(entries("updates", 3)):  # optional: older files lack it
        if ku not in arrays:
            raise _bad(what, f"index.updates[{i}]", f"a reference to array {ku!r}, which the file lacks",
                       "the name of one of its arrays")
        update_norms[p] = array(f"update norms of {p!r} ({ku})", ku, "fiub", 1, n)
        weight_norms[p] = array(f"weight norms of {p!r} ({kw})", kw, "fiub", 1, n)
    return dict(sites=sites, steps=steps, grads=grads, seq_lens=seq_lens, params=params,
                events=meta.get("events", []), unsupported=meta.get("unsupported", []), notes=notes,
                meta=meta.get("meta", {}), measures=measures, measure_meta=measure_meta,
                update_norms=update_norms, weight_norms=weight_norms)
