"""Saved checkpoints: safe loading, finding the state dict, rebuilding modules, static analysis.

This is what ``gradscope report model.pt`` stands on:

1. :func:`load_checkpoint` reads ``.pt/.pth/.bin/.ckpt`` files with
   ``torch.load(weights_only=True)`` and ``.safetensors`` files with safetensors (optional:
   ``pip install "gradscope[ckpt]"``). A file that would need to run code to load is refused with
   :class:`~gradscope.errors.UnsafeCheckpointError` unless ``unsafe=True`` (CLI ``--unsafe-load``).
2. The returned :class:`Checkpoint` holds the model's ``state_dict`` wherever the file kept it
   (bare, under ``state_dict``/``model``/..., DDP ``module.`` prefixes stripped) and a JSON-able
   summary of everything else (epoch, optimizer state, ...).
3. :func:`find_modules` recognises ``nn.RNN/LSTM/GRU``, their ``*Cell`` versions and
   ``nn.MultiheadAttention`` from parameter names and shapes alone; :meth:`FoundModule.build`
   constructs the module with exactly those weights. With the model's own code at hand,
   :func:`build_user_model` (CLI ``--model pkg.module:factory``) builds the whole model instead.
4. :func:`static_analysis` reports, per recurrent layer and direction, the spectra of the
   recurrent weight blocks and the memory time implied by the forget (LSTM) or update (GRU) bias.

Index letters: G gates (RNN 1, GRU 3, LSTM 4), H hidden units, P projection size (LSTM
``proj_size``), I input features, D directions, E attention embedding size, d head size.
Nothing here needs a GPU: everything is loaded to the CPU.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pkgutil
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import _archive, _ckpt_io, _ckpt_tree
from ._archive import DEFAULT_MAX_LOAD_BYTES
from ._ckpt_io import INSTALL_HINT, one_line
from .estimators.gates import memory_time  # τ = −1/ln σ(b), re-exported here
from .errors import CheckpointError, LoadLimitError, ModelSpecError, UnsafeCheckpointError, did_you_mean

__all__ = [
    "Checkpoint",
    "FoundModule",
    "load_checkpoint",
    "find_modules",
    "static_analysis",
    "build_user_model",
    "memory_time",
    "default_num_heads",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ModelSpecError",
    "INSTALL_HINT",
    "DEFAULT_MAX_LOAD_BYTES",
    "estimate_probe_seconds",
]

PathLike = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` found in a file.

    Attributes:
        path: The file, as given.
        format: ``"torch-zip"`` (``torch.save`` since 1.6), ``"torch-legacy"``, ``"pickle"``
            (plain ``pickle.dump``, only with ``unsafe=True``), ``"safetensors"`` or ``"torch"``.
        state_dict: Parameter and buffer names to tensors (on the CPU), wrapper prefixes
            (``module.``, ``_orig_mod.``) removed.
        source_key: Where the state dict was found, as a Python expression on the loaded object:
            ``"checkpoint"`` (the file is the state dict), ``"checkpoint['state_dict']"``,
            ``"checkpoint['model']['state_dict']"``, ``"checkpoint.state_dict()"`` (a whole
            pickled module), or several joined by ``" + "`` when merged.
        metadata: The file's other entries, summarised as JSON-able values (numbers and strings as
            they are, tensors as ``"tensor float32 [3, 4]"``, optimizer state as
            ``"optimizer state (N tensors)"``).
        stripped_prefix: The wrapper prefix removed from every key (``""`` if none).
        unsafe: Whether the file was loaded with ``unsafe=True`` (code from it may have run).
        notes: Things worth telling the user (a warning from torch, merged state dicts, ...).
    """

    path: str
    format: str
    state_dict: Dict[str, Tensor] = field(repr=False)
    source_key: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    stripped_prefix: str = ""
    unsafe: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        """Total number of elements over all tensors of the state dict."""
        return int(sum(t.numel() for t in self.state_dict.values()))


def load_checkpoint(path: PathLike, *, unsafe: bool = False,
                    max_load_bytes: Optional[int] = DEFAULT_MAX_LOAD_BYTES) -> Checkpoint:
    """Load a saved checkpoint without running code from it, and find its state dict.

    ``.pt``, ``.pth``, ``.bin`` and ``.ckpt`` files (and files with other suffixes that turn out to
    be zip archives or pickles) are read with ``torch.load(path, weights_only=True,
    map_location="cpu")``; ``.safetensors`` files with ``safetensors.torch.load_file``. The format
    is decided by the first bytes; the suffix only shapes the error messages.

    Args:
        path: The checkpoint file.
        unsafe: Allow a pickle to run code while loading (``torch.load(weights_only=False)`` or
            ``pickle.load``). Needed for whole pickled models and custom classes. Only for files
            you trust: the file's code runs with your permissions.
        max_load_bytes: The most bytes the file may be, and may declare once inflated (zip
            members, safetensors tensors), checked before anything is read; also refused: a zip
            inflating more than 100:1 beyond 16 MiB (a zip bomb), headers that do not fit the file,
            zip members whose CRC-32 does not match. Default 4 GiB; None switches the limits off
            (CRCs are still checked).

    Returns:
        A :class:`Checkpoint`.

    Raises:
        UnsafeCheckpointError: The file needs to run code to load (it names the globals it
            wanted) and ``unsafe`` is False.
        LoadLimitError: The file is, or declares, more than ``max_load_bytes`` (a CheckpointError).
        CheckpointError: Missing file, directory, empty/truncated/corrupt file, a JSON or text
            file, unreadable safetensors, safetensors not installed, no tensors or no state dict
            in the file. Every message is one line saying what arrived and how to fix it. No other
            exception type escapes.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "lstm.pt")
        >>> torch.save({"epoch": 3, "state_dict": torch.nn.LSTM(4, 8).state_dict()}, path)
        >>> ckpt = load_checkpoint(path)
        >>> ckpt.source_key, ckpt.metadata, sorted(ckpt.state_dict)[:2]
        ("checkpoint['state_dict']", {'epoch': 3}, ['bias_hh_l0', 'bias_ih_l0'])
    """
    max_load_bytes = _archive.check_limit(max_load_bytes)
    p = Path(os.fspath(path)).expanduser()
    try:
        if not p.exists():
            raise CheckpointError(_ckpt_io.describe_missing(p))
        if p.is_dir():
            raise CheckpointError(_ckpt_io.describe_directory(p))
        if not p.is_file():
            raise CheckpointError(
                f"{str(p)!r} is not a regular file (a device, pipe or socket?); pass a checkpoint file.")
    except OSError as exc:
        raise CheckpointError(f"cannot access {str(p)!r} ({one_line(str(exc), 80)}); check the path.") from None
    obj, fmt, notes, extra = _ckpt_io.load_file(p, unsafe=unsafe, max_load_bytes=max_load_bytes)
    try:
        sd, source, used, more_notes = _ckpt_tree.locate_state_dict(obj)
        sd, stripped = _ckpt_tree.strip_wrapper_prefixes(sd)
        metadata = _ckpt_tree.metadata_without(obj, used)
    except CheckpointError as exc:
        raise CheckpointError(f"{str(p)!r}: {exc}") from None
    except Exception as exc:  # a hostile or odd object from an unsafe load
        raise CheckpointError(
            f"{str(p)!r} loaded, but its contents could not be read as a checkpoint "
            f"({type(exc).__name__}: {one_line(str(exc), 80)}); save model.state_dict() instead.") from None
    metadata.update(extra)
    if stripped:
        more_notes.append(f"stripped the prefix {stripped!r} carried by every key")
    sd = _densified(p, sd, more_notes, max_load_bytes)
    return Checkpoint(path=str(path), format=fmt, state_dict=sd, source_key=source, metadata=metadata,
                      stripped_prefix=stripped, unsafe=unsafe, notes=notes + more_notes)


def _densified(p: Path, sd: Dict[str, Any], notes: List[str], max_load_bytes: Optional[int]) -> Dict[str, Any]:
    """The state dict with sparse tensors made dense (the modules and the analysis need dense weights),
    each one's dense size checked against ``max_load_bytes`` first; a note names them."""
    sparse = [k for k, v in sd.items() if isinstance(v, Tensor) and v.layout != torch.strided]
    if not sparse:
        return sd
    out = dict(sd)
    for key in sparse:
        t = sd[key]
        size = t.numel() * t.element_size()
        if max_load_bytes is not None and size > max_load_bytes:
            raise LoadLimitError(
                f"{str(p)!r}: the sparse tensor {key!r} {list(t.shape)} is {size} bytes once dense, more than "
                f"--max-load-bytes {max_load_bytes}; raise the limit for a file you trust.")
        try:
            out[key] = t.to_dense()
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{str(p)!r}: the sparse tensor {key!r} cannot be made dense "
                                  f"({one_line(str(exc), 80)}); the file is damaged.") from None
    notes.append(f"sparse tensors made dense before analysis: {', '.join(sparse[:6])}"
                 f"{f' and {len(sparse) - 6} more' if len(sparse) > 6 else ''}")
    return out


#: Effective speed assumed for probe estimates; a rough CPU figure (measured 2.5–20 GFLOP/s for
#: LSTM/RNN probes of H 128–256 on one core), so estimates are right within a factor of a few.
PROBE_FLOPS_PER_SECOND = 1e10


def estimate_probe_seconds(module: nn.Module, seq_len: int, batch: int, k: Optional[int] = None,
                           jacobian_samples: int = 4) -> float:
    """A rough estimate of :func:`gradscope.probe`'s time on ``module`` for ``[seq_len, batch]`` inputs.

    The probe multiplies per-step state Jacobians over every lag: about ``2·N³`` operations per step
    and sample for a state of size N (H, or 2H for LSTM's (h, c)), plus the Lyapunov QR steps
    ``4·N²·k``, for ``min(batch, jacobian_samples)`` samples and every layer and direction. Attention
    modules and other layers are not counted. It is an estimate, not a promise: it only has to tell a
    report of seconds from one of hours before it starts.

    Example:
        >>> estimate_probe_seconds(torch.nn.LSTM(8, 64), 100, 8) < 1 < estimate_probe_seconds(
        ...     torch.nn.RNN(8, 4096), 100, 8)
        True
    """
    flops = 0.0
    samples = min(batch, jacobian_samples)
    for m in module.modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            h = m.hidden_size
            n = h + (getattr(m, "proj_size", 0) or h) if isinstance(m, (nn.LSTM, nn.LSTMCell)) else h
            units = getattr(m, "num_layers", 1) * (2 if getattr(m, "bidirectional", False) else 1)
            kk = min(k or 16, n)
            flops += units * samples * seq_len * (2.0 * n ** 3 + 4.0 * n ** 2 * kk)
    return flops / PROBE_FLOPS_PER_SECOND


# ---------------------------------------------------------------------------------------------
# Rebuilding modules from keys and shapes

RECURRENT_KINDS = ("RNN", "GRU", "LSTM")
CELL_KINDS = ("RNNCell", "GRUCell", "LSTMCell")
_GATES = {1: "RNN", 3: "GRU", 4: "LSTM"}
_GATE_NAMES = {"RNN": ("h",), "GRU": ("r", "z", "n"), "LSTM": ("i", "f", "g", "o")}
_FUSED_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_CELL_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_MHA_DIRECT = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
               "bias_k", "bias_v")
_MHA_CHILD = ("out_proj.weight", "out_proj.bias")


@dataclass
class FoundModule:
    """A recurrent or attention module recognised in a state dict by its keys and shapes.

    Attributes:
        prefix: Qualified module name in the state dict (``"encoder.lstm"``; ``""`` when the state
            dict is the module's own).
        kind: ``"LSTM"``, ``"GRU"``, ``"RNN"``, ``"LSTMCell"``, ``"GRUCell"``, ``"RNNCell"`` or
            ``"MultiheadAttention"``.
        config: Constructor keyword arguments of the torch class (``input_size``,
            ``hidden_size``, ``num_layers``, ``bias``, ``batch_first``, ``bidirectional``,
            ``proj_size`` for LSTM, ``nonlinearity`` for RNN; for attention ``embed_dim``,
            ``num_heads``, ``bias``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``, ``vdim``,
            ``batch_first``). Edit it, or pass overrides to :meth:`build`, to change a guess.
        notes: What could not be told from the weights and what was assumed.
        keys: The module's own parameter names mapped to the full state-dict keys.
        tensors: The module's own parameter names mapped to the tensors (not copied).
    """

    prefix: str
    kind: str
    config: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    keys: Dict[str, str] = field(default_factory=dict, repr=False)
    tensors: Dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sites(self) -> List[str]:
        """Site names, one per layer and direction: ``"enc.lstm.l0"``, ``"enc.lstm.l0_reverse"``.

        Cells and attention modules have one site, their prefix.
        """
        if self.kind not in RECURRENT_KINDS:
            return [self.prefix]
        dirs = ("", "_reverse") if self.config["bidirectional"] else ("",)
        return [_site(self.prefix, k, d) for k in range(self.config["num_layers"]) for d in dirs]

    def build(self, **overrides: Any) -> nn.Module:
        """Construct the torch module and load exactly these weights (``strict=True``).

        Args:
            **overrides: Constructor arguments replacing guesses in :attr:`config`, e.g.
                ``nonlinearity="relu"`` or ``num_heads=4``.

        Returns:
            The module, on the CPU, in the tensors' dtype, in training mode like any new module.

        Raises:
            CheckpointError: The module cannot be constructed with this config or the weights do
                not load (a bad override).

        Example:
            >>> lstm = torch.nn.LSTM(3, 5, num_layers=2)
            >>> found = find_modules(lstm.state_dict())[0]
            >>> rebuilt = found.build()
            >>> rebuilt
            LSTM(3, 5, num_layers=2)
            >>> torch.equal(rebuilt.weight_hh_l1, lstm.weight_hh_l1)
            True
        """
        cls = getattr(nn, self.kind)
        config = {**self.config, **overrides}
        dtype = next(iter(self.tensors.values())).dtype if self.tensors else None
        try:
            module = cls(**config, dtype=dtype)
        except Exception as exc:
            raise CheckpointError(
                f"cannot construct nn.{self.kind}(**{config}) for {self.prefix or '<root>'!r} "
                f"({type(exc).__name__}: {one_line(str(exc), 100)}); fix the overrides.") from None
        try:
            module.load_state_dict(self.tensors, strict=True)
        except Exception as exc:
            raise CheckpointError(
                f"the weights of {self.prefix or '<root>'!r} do not fit nn.{self.kind}(**{config}) "
                f"({one_line(str(exc), 160)}); fix the overrides.") from None
        return module


def _site(prefix: str, layer: int, direction_suffix: str) -> str:
    name = f"l{layer}{direction_suffix}"
    return f"{prefix}.{name}" if prefix else name


def _full(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def _shape(t: Tensor) -> List[int]:
    return [int(s) for s in t.shape]


def _where(prefix: str) -> str:
    return f"under {prefix!r}" if prefix else "at the top level"


def _rnn_note(kind: str, nonlinearity: str) -> str:
    other = "relu" if nonlinearity == "tanh" else "tanh"
    return (f"{kind} nonlinearity tanh vs relu cannot be told from weights; assumed {nonlinearity} "
            f"(change with --rnn-nonlinearity {other})")


def default_num_heads(embed_dim: int) -> int:
    """The head count assumed for attention: the largest divisor of E that is ≤ 8 with E/h ≥ 8, else 1.

    Example:
        >>> [default_num_heads(e) for e in (512, 64, 16, 12, 40)]
        [8, 8, 2, 1, 5]
    """
    for h in range(8, 0, -1):
        if embed_dim % h == 0 and embed_dim // h >= 8:
            return h
    return 1


def find_modules(state_dict: Mapping[str, Tensor], *, rnn_nonlinearity: str = "tanh",
                 num_heads: Optional[int] = None) -> List[FoundModule]:
    """Recognise recurrent and attention modules in a state dict from key names and shapes alone.

    Recognised, at any nesting: ``nn.RNN/GRU/LSTM`` (keys ``weight_ih_l{k}[_reverse]``,
    ``weight_hh_l{k}...``, ``bias_ih_l{k}...``, ``bias_hh_l{k}...``, ``weight_hr_l{k}...``),
    ``nn.RNNCell/GRUCell/LSTMCell`` (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) and
    ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``, ``out_proj.*``,
    ``bias_k``, ``bias_v``). The kind comes from the gate count G = rows of ``weight_hh`` / H, with
    H = columns of ``weight_hh`` (or of ``weight_hr`` when projected): 1 RNN, 3 GRU, 4 LSTM.

    A group of keys that carries other parameters besides these (a custom module that happens to
    use the same names) is skipped, not guessed at.

    Args:
        state_dict: Names to tensors, e.g. :attr:`Checkpoint.state_dict`.
        rnn_nonlinearity: ``"tanh"`` or ``"relu"`` for ``nn.RNN``/``nn.RNNCell``, which the weights
            cannot tell apart (noted on each such module).
        num_heads: Head count for attention modules, which the weights cannot tell either; by
            default :func:`default_num_heads` of the embedding size (noted).

    Returns:
        The modules in state-dict order.

    Raises:
        CheckpointError: A group that looks like a torch module has inconsistent keys or shapes
            (a missing layer or direction, a layer whose input size does not match the previous
            layer's output, a gate count other than 1, 3 or 4, ...), naming the key and shapes.

    Example:
        >>> model = torch.nn.ModuleDict({"enc": torch.nn.GRU(4, 6, bidirectional=True)})
        >>> [(f.prefix, f.kind, f.config["hidden_size"]) for f in find_modules(model.state_dict())]
        [('enc', 'GRU', 6)]
    """
    if rnn_nonlinearity not in ("tanh", "relu"):
        raise CheckpointError(f"rnn_nonlinearity must be 'tanh' or 'relu', got {rnn_nonlinearity!r}.")
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise CheckpointError(f"num_heads must be a positive integer, got {num_heads!r}.")
    direct: Dict[str, Dict[str, str]] = {}
    nested: Dict[str, List[str]] = {}   # prefix -> keys two or more levels below it
    order: Dict[str, int] = {}
    for i, key in enumerate(state_dict):
        if not isinstance(key, str):
            continue
        prefix, _, local = key.rpartition(".")
        direct.setdefault(prefix, {})[local] = key
        order.setdefault(prefix, i)
        parts = key.split(".")
        for depth in range(len(parts) - 1):
            anc = ".".join(parts[:depth])
            nested.setdefault(anc, []).append(key)
            order.setdefault(anc, i)
    found: List[Tuple[int, FoundModule]] = []
    for prefix in sorted(set(direct) | set(nested), key=lambda p: order[p]):
        locals_ = direct.get(prefix, {})
        below = nested.get(prefix, [])
        names = set(locals_)
        module: Optional[FoundModule] = None
        if names and all(_FUSED_KEY.match(n) for n in names) and not below:
            module = _fused(prefix, locals_, state_dict, rnn_nonlinearity)
        elif "weight_ih" in names and names <= set(_CELL_NAMES) and not below:
            module = _cell(prefix, locals_, state_dict, rnn_nonlinearity)
        elif names & {"in_proj_weight", "q_proj_weight"} and names <= set(_MHA_DIRECT):
            children = {k[len(prefix) + 1:] if prefix else k for k in below}
            if "out_proj.weight" in children and children <= set(_MHA_CHILD):
                module = _mha(prefix, locals_, state_dict, num_heads)
        if module is not None:
            found.append((order[prefix], module))
    return [m for _i, m in sorted(found, key=lambda x: x[0])]


def _tensor(state_dict: Mapping[str, Tensor], key: str, ndim: int) -> Tensor:
    t = state_dict[key]
    if not isinstance(t, Tensor):
        raise CheckpointError(f"{key!r} is a {type(t).__name__}, expected a tensor.")
    if t.layout != torch.strided:  # a sparse weight: the module and the analysis need it dense
        t = t.to_dense()
    if t.dim() != ndim:
        raise CheckpointError(
            f"{key!r} has shape {_shape(t)}, expected a {ndim}-D tensor; the checkpoint is corrupt "
            f"or this is not a torch module's parameter.")
    if t.is_complex() or not t.is_floating_point():
        raise CheckpointError(f"{key!r} has dtype {t.dtype}, expected floating point weights.")
    return t


def _fused(prefix: str, locals_: Dict[str, str], sd: Mapping[str, Tensor], nonlinearity: str) -> FoundModule:
    entries: Dict[Tuple[int, bool], Dict[str, str]] = {}
    for local in locals_:
        m = _FUSED_KEY.match(local)
        assert m is not None
        entries.setdefault((int(m.group(2)), bool(m.group(3))), {})[m.group(1)] = local
    layers = sorted({layer for layer, _rev in entries})
    where = _where(prefix)
    for layer in range(layers[-1] + 1):
        if (layer, False) not in entries:
            raise CheckpointError(
                f"layer {layer} is missing {where}: found weights for layers {layers} but no "
                f"{_full(prefix, f'weight_ih_l{layer}')!r}; the state dict is incomplete.")
    num_layers = layers[-1] + 1
    bidirectional = any(rev for _l, rev in entries)
    if bidirectional:
        have = sorted(layer for layer, rev in entries if rev)
        for layer in range(num_layers):
            if (layer, True) not in entries:
                raise CheckpointError(
                    f"{_full(prefix, f'weight_ih_l{layer}_reverse')!r} is missing: layers {have} have "
                    f"reverse-direction weights {where}, layer {layer} does not; the state dict is incomplete.")
    for (layer, rev), params in entries.items():
        sfx = f"_l{layer}{'_reverse' if rev else ''}"
        for req in ("weight_ih", "weight_hh"):
            if req not in params:
                raise CheckpointError(
                    f"{_full(prefix, req + sfx)!r} is missing {where} (found {sorted(params.values())}); "
                    f"the state dict is incomplete.")
        if ("bias_ih" in params) != ("bias_hh" in params):
            have_b, miss_b = ("bias_ih", "bias_hh") if "bias_ih" in params else ("bias_hh", "bias_ih")
            raise CheckpointError(
                f"{_full(prefix, miss_b + sfx)!r} is missing while {_full(prefix, have_b + sfx)!r} is "
                f"present; torch recurrent modules have both biases or neither.")
    flags = {(("bias_ih" in p), ("weight_hr" in p)) for p in entries.values()}
    if len(flags) > 1:
        raise CheckpointError(
            f"layers {where} disagree on having biases / projection weights (weight_hr); every layer "
            f"and direction of one torch module has the same parameters.")
    has_bias, has_proj = flags.pop()
    k0 = {p: _full(prefix, local) for p, local in entries[(0, False)].items()}
    w_hh = _tensor(sd, k0["weight_hh"], 2)
    w_ih = _tensor(sd, k0["weight_ih"], 2)
    rows, cols = _shape(w_hh)
    if has_proj:
        w_hr = _tensor(sd, k0["weight_hr"], 2)
        proj, hidden = _shape(w_hr)
        if hidden == 0 or rows % hidden or rows // hidden != 4 or cols != proj:
            raise CheckpointError(
                f"{k0['weight_hh']!r} has shape [{rows}, {cols}] but with {k0['weight_hr']!r} of shape "
                f"[{proj}, {hidden}] an LSTM needs [4·{hidden}, {proj}] = [{4 * hidden}, {proj}].")
        if not 0 < proj < hidden:
            raise CheckpointError(
                f"{k0['weight_hr']!r} has shape [{proj}, {hidden}]: proj_size {proj} must be in "
                f"(0, hidden_size {hidden}) for nn.LSTM.")
        gates = 4
    else:
        proj, hidden = 0, cols
        if hidden == 0 or rows % hidden or rows // hidden not in _GATES:
            raise CheckpointError(
                f"{k0['weight_hh']!r} has shape [{rows}, {cols}]: rows / columns = {rows / max(hidden, 1):g}, "
                f"expected 1 (RNN), 3 (GRU) or 4 (LSTM) gates × hidden size.")
        gates = rows // hidden
    kind = _GATES[gates]
    input_size = _shape(w_ih)[1]
    out = proj or hidden
    dirs = 2 if bidirectional else 1
    tensors: Dict[str, Tensor] = {}
    keys: Dict[str, str] = {}
    for (layer, rev), params in sorted(entries.items()):
        sfx = f"_l{layer}{'_reverse' if rev else ''}"
        expect = {
            "weight_ih": ([gates * hidden, input_size if layer == 0 else out * dirs],
                          "G·H rows and the input size" if layer == 0 else
                          f"G·H rows and layer {layer - 1}'s output ({out} features × {dirs} directions)"),
            "weight_hh": ([gates * hidden, out], "G·H rows and H (or proj_size) columns"),
            "bias_ih": ([gates * hidden], "G·H entries"),
            "bias_hh": ([gates * hidden], "G·H entries"),
            "weight_hr": ([proj, hidden], "[proj_size, H]"),
        }
        for p, local in params.items():
            key = _full(prefix, local)
            t = _tensor(sd, key, 1 if p.startswith("bias") else 2)
            want, why = expect[p]
            if _shape(t) != want:
                raise CheckpointError(
                    f"{key!r} has shape {_shape(t)}, expected {want} ({why}) for {kind} with "
                    f"hidden_size {hidden} as {k0['weight_hh']!r} {[rows, cols]} implies; the layers "
                    f"do not fit together.")
            tensors[local] = t
            keys[local] = key
    config: Dict[str, Any] = {"input_size": input_size, "hidden_size": hidden, "num_layers": num_layers,
                              "bias": has_bias, "batch_first": False, "bidirectional": bidirectional}
    notes = ["batch_first cannot be told from weights; assumed False"]
    if kind == "LSTM":
        config["proj_size"] = proj
    if kind == "RNN":
        config["nonlinearity"] = nonlinearity
        notes.insert(0, _rnn_note("RNN", nonlinearity))
    if num_layers > 1:
        notes.append("dropout between layers cannot be told from weights; assumed 0")
    _note_dtypes(tensors, notes)
    return FoundModule(prefix=prefix, kind=kind, config=config, notes=notes, keys=keys, tensors=tensors)


def _note_dtypes(tensors: Dict[str, Tensor], notes: List[str]) -> None:
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    if len(dtypes) > 1:
        notes.append(f"mixed dtypes {dtypes}; build() uses the first tensor's dtype")


def _cell(prefix: str, locals_: Dict[str, str], sd: Mapping[str, Tensor], nonlinearity: str) -> FoundModule:
    where = _where(prefix)
    names = set(locals_)
    if "weight_hh" not in names:
        raise CheckpointError(
            f"{_full(prefix, 'weight_hh')!r} is missing while {_full(prefix, 'weight_ih')!r} is present; "
            f"the state dict is incomplete.")
    if ("bias_ih" in names) != ("bias_hh" in names):
        raise CheckpointError(
            f"only one of {_full(prefix, 'bias_ih')!r} / {_full(prefix, 'bias_hh')!r} is present {where}; "
            f"torch cells have both biases or neither.")
    keys = {n: _full(prefix, n) for n in _CELL_NAMES if n in names}
    w_ih = _tensor(sd, keys["weight_ih"], 2)
    w_hh = _tensor(sd, keys["weight_hh"], 2)
    rows, hidden = _shape(w_hh)
    if hidden == 0 or rows % hidden or rows // hidden not in _GATES:
        raise CheckpointError(
            f"{keys['weight_hh']!r} has shape [{rows}, {hidden}]: rows / columns = {rows / max(hidden, 1):g}, "
            f"expected 1 (RNNCell), 3 (GRUCell) or 4 (LSTMCell).")
    gates = rows // hidden
    kind = _GATES[gates] + "Cell"
    tensors = {"weight_ih": w_ih, "weight_hh": w_hh}
    if _shape(w_ih)[0] != rows:
        raise CheckpointError(
            f"{keys['weight_ih']!r} has shape {_shape(w_ih)}, expected {rows} rows like "
            f"{keys['weight_hh']!r} {[rows, hidden]}.")
    for b in ("bias_ih", "bias_hh"):
        if b in keys:
            t = _tensor(sd, keys[b], 1)
            if _shape(t) != [rows]:
                raise CheckpointError(f"{keys[b]!r} has shape {_shape(t)}, expected [{rows}] (G·H entries).")
            tensors[b] = t
    config: Dict[str, Any] = {"input_size": _shape(w_ih)[1], "hidden_size": hidden, "bias": "bias_ih" in keys}
    notes = [f"keys match nn.{kind}; a custom cell with the same parameter names would be misread"]
    if kind == "RNNCell":
        config["nonlinearity"] = nonlinearity
        notes.insert(0, _rnn_note("RNNCell", nonlinearity))
    _note_dtypes(tensors, notes)
    return FoundModule(prefix=prefix, kind=kind, config=config, notes=notes,
                       keys={n: keys[n] for n in tensors}, tensors=tensors)


def _mha(prefix: str, locals_: Dict[str, str], sd: Mapping[str, Tensor], num_heads: Optional[int]) -> FoundModule:
    names = set(locals_) | {c for c in _MHA_CHILD if _full(prefix, c) in sd}
    key = {n: _full(prefix, n) for n in names}
    out_w = _tensor(sd, key["out_proj.weight"], 2)
    embed = _shape(out_w)[0]
    if _shape(out_w) != [embed, embed] or embed == 0:
        raise CheckpointError(
            f"{key['out_proj.weight']!r} has shape {_shape(out_w)}, expected a square [E, E] output projection.")
    tensors: Dict[str, Tensor] = {"out_proj.weight": out_w}

    def check(n: str, want: List[int], why: str) -> None:
        t = _tensor(sd, key[n], len(want))
        if _shape(t) != want:
            raise CheckpointError(
                f"{key[n]!r} has shape {_shape(t)}, expected {want} ({why}, with E = {embed} from "
                f"{key['out_proj.weight']!r}).")
        tensors[n] = t

    if "in_proj_weight" in names:
        if names & {"q_proj_weight", "k_proj_weight", "v_proj_weight"}:
            raise CheckpointError(
                f"both {key['in_proj_weight']!r} and separate q/k/v projection weights are present "
                f"{_where(prefix)}; nn.MultiheadAttention has one or the other.")
        check("in_proj_weight", [3 * embed, embed], "queries, keys and values stacked: [3E, E]")
        kdim = vdim = embed
    else:
        for n in ("k_proj_weight", "v_proj_weight"):
            if n not in names:
                raise CheckpointError(f"{_full(prefix, n)!r} is missing while {key['q_proj_weight']!r} is present.")
        kdim = _shape(_tensor(sd, key["k_proj_weight"], 2))[1]
        vdim = _shape(_tensor(sd, key["v_proj_weight"], 2))[1]
        check("q_proj_weight", [embed, embed], "[E, E]")
        check("k_proj_weight", [embed, kdim], "[E, kdim]")
        check("v_proj_weight", [embed, vdim], "[E, vdim]")
        if kdim == embed and vdim == embed:
            raise CheckpointError(
                f"{key['q_proj_weight']!r} and siblings are separate projections with kdim = vdim = E = "
                f"{embed}, which nn.MultiheadAttention stores as one in_proj_weight; this is not a torch "
                f"MultiheadAttention state dict.")
    has_bias = "in_proj_bias" in names
    if has_bias != ("out_proj.bias" in names):
        raise CheckpointError(
            f"{_where(prefix)} only one of in_proj_bias / out_proj.bias is present; nn.MultiheadAttention "
            f"with bias=True has both, with bias=False neither.")
    if has_bias:
        check("in_proj_bias", [3 * embed], "[3E]")
        check("out_proj.bias", [embed], "[E]")
    if ("bias_k" in names) != ("bias_v" in names):
        raise CheckpointError(f"only one of bias_k / bias_v is present {_where(prefix)}; add_bias_kv creates both.")
    if "bias_k" in names:
        check("bias_k", [1, 1, embed], "[1, 1, E]")
        check("bias_v", [1, 1, embed], "[1, 1, E]")
    notes = []
    if num_heads is None:
        heads = default_num_heads(embed)
        notes.append(
            f"num_heads cannot be told from weights; assumed {heads} (the largest divisor of "
            f"embed_dim {embed} that is ≤ 8 with head size ≥ 8, else 1); outputs and per-head "
            f"measures depend on it (change with --num-heads N)")
    else:
        if embed % num_heads:
            raise CheckpointError(
                f"num_heads {num_heads} does not divide embed_dim {embed} of {prefix or '<root>'!r}; "
                f"pass a divisor of {embed}.")
        heads = num_heads
    notes.append("add_zero_attn, dropout and batch_first cannot be told from weights; assumed False, 0, False")
    config = {"embed_dim": embed, "num_heads": heads, "bias": has_bias, "add_bias_kv": "bias_k" in names,
              "add_zero_attn": False, "kdim": kdim, "vdim": vdim, "batch_first": False}
    _note_dtypes(tensors, notes)
    return FoundModule(prefix=prefix, kind="MultiheadAttention", config=config, notes=notes,
                       keys={n: key[n] for n in tensors}, tensors=tensors)


# ---------------------------------------------------------------------------------------------
# Static analysis of the weights


#: Matrices larger than this get their top singular values and spectral radius from ARPACK: the dense
#: SVD and eigenvalues of a 4096² block take minutes (8·n³), the iterative ones about a second.
_DENSE_SPECTRUM_MAX = 1024


def _large_spectrum(m: np.ndarray, top: int) -> Tuple[np.ndarray, float]:
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigs, svds

    try:
        sv = np.sort(svds(m, k=min(top, min(m.shape) - 1), return_singular_vectors=False, tol=1e-8,
                          random_state=0))[::-1]
        radius = float("nan")
        if m.shape[0] == m.shape[1]:
            v0 = np.ones(m.shape[0]) / math.sqrt(m.shape[0])
            radius = float(np.max(np.abs(eigs(m, k=1, which="LM", return_eigenvectors=False, tol=1e-8,
                                              v0=v0, maxiter=20 * m.shape[0]))))
    except (ArpackError, ArpackNoConvergence) as exc:
        raise ArithmeticError(str(exc)) from None
    return sv, radius


def _spectrum(m: np.ndarray, top: int = 16) -> Dict[str, Any]:
    nan = {"spectral_norm": float("nan"), "spectral_radius": float("nan"), "singular_values": []}
    if not np.all(np.isfinite(m)):
        return nan
    try:
        if min(m.shape) > _DENSE_SPECTRUM_MAX:
            sv, radius = _large_spectrum(m, top)
        else:
            sv = np.linalg.svd(m, compute_uv=False)
            radius = float(np.max(np.abs(np.linalg.eigvals(m)))) if m.shape[0] == m.shape[1] and m.size else float("nan")
    except (np.linalg.LinAlgError, ArithmeticError):  # LAPACK/ARPACK did not converge (pathological values)
        return nan
    return {"spectral_norm": float(sv[0]) if sv.size else 0.0, "spectral_radius": radius,
            "singular_values": [float(s) for s in sv[:top]]}


def _bias_stats(b: np.ndarray, name: str) -> Dict[str, float]:
    if not np.all(np.isfinite(b)):
        nan = float("nan")
        return {name: nan, f"{name}_min": nan, f"{name}_max": nan, "memory_time": nan, "memory_time_median": nan}
    return {name: float(b.mean()), f"{name}_min": float(b.min()), f"{name}_max": float(b.max()),
            "memory_time": memory_time(float(b.mean())),
            "memory_time_median": float(np.median(memory_time(b)))}


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    if t is not None and t.layout != torch.strided:
        t = t.to_dense()
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def static_analysis(found: FoundModule, state_dict: Optional[Mapping[str, Tensor]] = None) -> List[Dict[str, Any]]:
    """Spectra of the recurrent weights and gate-bias memory times, per layer and direction.

    For each layer and direction of a fused module (one entry for a cell), and for each gate block
    W_g ``[H, H or P]`` of ``weight_hh`` (LSTM i, f, g, o; GRU r, z, n; RNN one block named ``h``):
    ``spectral_norm`` ‖M‖₂, ``spectral_radius`` max |eig M| and ``singular_values`` (descending,
    top 16) of the recurrent map M. Without projection M = W_g; with ``proj_size`` P the state
    fed back is h = W_hr m, so M = W_g @ W_hr, square ``[H, H]`` of rank ≤ P.

    LSTM: ``forget_bias`` = mean over units of b_f = b_ih,f + b_hh,f (``_min``, ``_max`` too) and
    ``memory_time`` τ = −1/ln σ(mean b_f) (SCIENCE.md: the cell path decays as σ(b_f)^k with small
    weights); ``memory_time_median`` is the median over units of their own τ. GRU: the same for the
    update gate, whose keep share is z (h' = (1−z) n + z h), as ``update_bias`` and
    ``memory_time``. Without biases b = 0. τ is ``inf`` when σ(b) rounds to 1. Non-finite weights
    give NaN values, ``finite`` False.

    Attention modules have no recurrence; their single entry holds ``qk_spectral_norm``, per head
    ‖W_q,hᵀ W_k,h‖₂ / √d (the bilinear form of the attention logits; it depends on the assumed
    ``num_heads``), and its maximum ``qk_spectral_norm_max``.

    Args:
        found: A module from :func:`find_modules`.
        state_dict: The state dict it was found in; defaults to the tensors ``found`` holds.

    Returns:
        One JSON-able dict per site: ``site`` (``"enc.lstm.l0"``, ``"enc.lstm.l0_reverse"``; the
        prefix for cells), ``kind``, ``layer``, ``direction`` (``"forward"``/``"reverse"``),
        ``hidden_size``, ``proj_size``, ``recurrent_map``, ``gates`` ({gate: spectra}), ``finite``
        and the bias entries above. Values are plain floats (``inf``/``nan`` possible) and lists.

    Example:
        >>> sd = torch.nn.LSTM(2, 3).state_dict()
        >>> sd["bias_ih_l0"] = torch.zeros(12)
        >>> sd["bias_hh_l0"] = torch.tensor([0.0] * 3 + [1.0] * 3 + [0.0] * 6)  # gates i, f, g, o
        >>> row = static_analysis(find_modules(sd)[0], sd)[0]
        >>> row["site"], row["forget_bias"], round(row["memory_time"], 2), sorted(row["gates"])
        ('l0', 1.0, 3.19, ['f', 'g', 'i', 'o'])
    """
    tensors = dict(found.tensors)
    if state_dict is not None:
        missing = [k for k in found.keys.values() if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"the state dict lacks {missing[0]!r}, which {found.kind} {found.prefix or '<root>'!r} "
                f"was found with; pass the state dict given to find_modules.")
        tensors = {local: state_dict[key] for local, key in found.keys.items()}
    if found.kind == "MultiheadAttention":
        return [_attention_analysis(found, tensors)]
    kind = found.kind.replace("Cell", "")
    gate_names = _GATE_NAMES[kind]
    cfg = found.config
    if found.kind in CELL_KINDS:
        units = [(0, False, "")]
    else:
        dirs = (False, True) if cfg["bidirectional"] else (False,)
        units = [(layer, rev, f"_l{layer}{'_reverse' if rev else ''}")
                 for layer in range(cfg["num_layers"]) for rev in dirs]
    rows = []
    hidden = cfg["hidden_size"]
    proj = cfg.get("proj_size", 0)
    for layer, rev, sfx in units:
        w_hh = _np(tensors["weight_hh" + sfx])
        w_hr = _np(tensors.get("weight_hr" + sfx))
        blocks = np.split(w_hh, len(gate_names), axis=0)
        maps = [b @ w_hr if w_hr is not None else b for b in blocks]
        finite = bool(np.all(np.isfinite(w_hh)) and (w_hr is None or np.all(np.isfinite(w_hr))))
        row: Dict[str, Any] = {
            "site": found.prefix if found.kind in CELL_KINDS else _site(found.prefix, layer, "_reverse" if rev else ""),
            "kind": found.kind, "layer": layer, "direction": "reverse" if rev else "forward",
            "hidden_size": hidden, "proj_size": proj,
            "recurrent_map": "W_hh[gate] @ W_hr" if w_hr is not None else "W_hh[gate]",
            "gates": {g: _spectrum(m) for g, m in zip(gate_names, maps)},
            "finite": finite,
        }
        if kind in ("LSTM", "GRU"):
            b = np.zeros(hidden)
            for name in ("bias_ih", "bias_hh"):
                if name + sfx in tensors:
                    b = b + _np(tensors[name + sfx])[hidden:2 * hidden]  # gate 1: LSTM f, GRU z
            row["memory_gate"] = "f" if kind == "LSTM" else "z"
            row.update(_bias_stats(b, "forget_bias" if kind == "LSTM" else "update_bias"))
            row["finite"] = finite and bool(np.all(np.isfinite(b)))
        rows.append(row)
    return rows


def _attention_analysis(found: FoundModule, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    cfg = found.config
    embed, heads = cfg["embed_dim"], cfg["num_heads"]
    d = embed // heads
    if "in_proj_weight" in tensors:
        w = _np(tensors["in_proj_weight"])
        w_q, w_k = w[:embed], w[embed:2 * embed]
    else:
        w_q, w_k = _np(tensors["q_proj_weight"]), _np(tensors["k_proj_weight"])
    finite = bool(np.all(np.isfinite(w_q)) and np.all(np.isfinite(w_k)))
    norms = []
    for h in range(heads):
        a, b = w_q[h * d:(h + 1) * d], w_k[h * d:(h + 1) * d]     # [d, E], [d, kdim]
        if not finite:
            norms.append(float("nan"))
            continue
        # ‖aᵀ b‖₂ through thin QRs: aᵀ = Q_a R_a, bᵀ = Q_b R_b, so aᵀb = Q_a (R_a R_bᵀ) Q_bᵀ.
        try:
            r_a = np.linalg.qr(a.T, mode="r")
            r_b = np.linalg.qr(b.T, mode="r")
            norms.append(float(np.linalg.svd(r_a @ r_b.T, compute_uv=False)[0]) / math.sqrt(d))
        except np.linalg.LinAlgError:
            norms.append(float("nan"))
    return {"site": found.prefix, "kind": found.kind, "layer": 0, "direction": "forward",
            "embed_dim": embed, "num_heads": heads, "qk_spectral_norm": norms,
            "qk_spectral_norm_max": max(norms) if norms else float("nan"), "finite": finite}


# ---------------------------------------------------------------------------------------------
# The user's own model class


def _parse_args(model_args: Union[None, str, Mapping[str, Any]]) -> Dict[str, Any]:
    if model_args is None:
        return {}
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(
                f"--model-args is not valid JSON ({exc.msg} at character {exc.pos}); pass an object "
                f"such as '{{\"hidden_size\": 64}}'.") from None
    if not isinstance(model_args, Mapping) or not all(isinstance(k, str) for k in model_args):
        raise ModelSpecError(
            f"--model-args must be a JSON object of keyword arguments, got {type(model_args).__name__}; "
            f"pass e.g. '{{\"hidden_size\": 64}}'.")
    return dict(model_args)


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if missing != module_name and not module_name.startswith(missing + "."):
            raise ModelSpecError(
                f"importing {module_name!r} for --model {spec!r} failed: it imports {missing!r}, which is "
                f"not installed; install it.") from None
        if module_name.endswith(".py"):
            raise ModelSpecError(
                f"--model {spec!r} names a file; give the module's import name instead, e.g. "
                f"{module_name[:-3].replace(os.sep, '.') + ':' + spec.split(':')[1]!r}, with its folder on "
                f"PYTHONPATH.") from None
        parent, _, leaf = missing.rpartition(".")
        siblings: List[str] = []
        try:
            if parent:
                pkg = importlib.import_module(parent)
                siblings = [m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
            else:
                siblings = [m.name for m in pkgutil.iter_modules()] + list(sys.builtin_module_names)
        except Exception:
            pass
        raise ModelSpecError(
            f"no module named {missing!r} (from --model {spec!r}); check the spelling, and that its "
            f"package is installed or on PYTHONPATH.{did_you_mean(leaf, siblings)}") from None
    except Exception as exc:
        raise ModelSpecError(
            f"importing {module_name!r} for --model {spec!r} raised {type(exc).__name__}: "
            f"{one_line(str(exc), 100)}; fix the module.") from None


def _key_list(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _prefix_hint(missing: List[str], unexpected: List[str]) -> str:
    miss = set(missing)
    for u in unexpected[:20]:
        parts = u.split(".")
        for i in range(1, len(parts)):
            pre = ".".join(parts[:i]) + "."
            if u[len(pre):] in miss and all(k.startswith(pre) and k[len(pre):] in miss for k in unexpected):
                return f" (every checkpoint key carries an extra prefix {pre!r} the model lacks)"
    exp = set(unexpected)
    for m in missing[:20]:
        parts = m.split(".")
        for i in range(1, len(parts)):
            pre = ".".join(parts[:i]) + "."
            if m[len(pre):] in exp and all(k.startswith(pre) and k[len(pre):] in exp for k in missing):
                return f" (the model's keys carry a prefix {pre!r} the checkpoint lacks)"
    return ""


def build_user_model(spec: str, model_args: Union[None, str, Mapping[str, Any]],
                     state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Build the user's model from ``package.module:factory_or_class`` and load the weights strictly.

    This backs the CLI's ``--model pkg.module:factory [--model-args JSON]``: the module is imported
    (it must be importable: installed, or on ``sys.path``/``PYTHONPATH``; a console script does not
    search the current directory, so the CLI should put it on ``sys.path`` first), the attribute after the
    colon (dots allowed: ``pkg.mod:Outer.make``) is called with ``model_args`` as keyword arguments,
    and ``load_state_dict(state_dict, strict=True)`` is applied.

    Args:
        spec: ``"package.module:attribute"``.
        model_args: Keyword arguments: a dict, a JSON object string, or None.
        state_dict: The weights, e.g. :attr:`Checkpoint.state_dict`.

    Returns:
        The model with the weights, as the factory left it (training mode unless it set eval).

    Raises:
        ModelSpecError: A malformed spec or model_args, a missing module (with the closest
            importable sibling name) or attribute (with the closest name in the module), something
            not callable, a call that raised, a result that is not an ``nn.Module``, or weights that
            do not fit: "missing keys (N): ...; unexpected keys (M): ...; shape mismatches (K): ...".

    Example:
        >>> sd = torch.nn.GRU(3, 4).state_dict()
        >>> model = build_user_model("torch.nn:GRU", {"input_size": 3, "hidden_size": 4}, sd)
        >>> type(model).__name__
        'GRU'
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ModelSpecError(
            f"--model expects 'package.module:factory_or_class', got {spec!r}; separate the module "
            f"from the attribute with one ':' (e.g. 'mypkg.models:build_model').")
    module_name, attr_path = spec.split(":")
    kwargs = _parse_args(model_args)
    module = _import_module(module_name, spec)
    obj: Any = module
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSpecError(
                f"{walked!r} has no attribute {part!r} (from --model {spec!r}); name a function or "
                f"class defined there.{did_you_mean(part, names)}")
        obj = getattr(obj, part)
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(obj):
        raise ModelSpecError(
            f"{spec!r} is a {type(obj).__name__}, not callable; --model must name a class or a "
            f"function that returns the model.")
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"calling {spec}(**{one_line(json.dumps(kwargs, default=str), 80)}) raised "
            f"{type(exc).__name__}: {one_line(str(exc), 120)}; check --model-args.") from None
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise ModelSpecError(
            f"{spec!r} returned the class {model.__name__}, not an instance; point --model at the "
            f"class itself or at a function that instantiates it.")
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec!r} returned a {type(model).__name__}, expected an nn.Module; point --model at a "
            f"class or a function that builds the model.")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} checkpoint {_shape(state_dict[k])} vs model {_shape(own[k])}"
                  for k in own if k in state_dict and isinstance(state_dict[k], Tensor)
                  and isinstance(own[k], Tensor) and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_key_list(mismatched, 3)}")
    if problems:
        raise ModelSpecError(
            f"the checkpoint does not fit {spec}: {'; '.join(problems)}"
            f"{_prefix_hint(missing, unexpected)}; check --model-args or that the checkpoint belongs to this model.")
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise ModelSpecError(
            f"load_state_dict(strict=True) on {spec} failed ({one_line(str(exc), 160)}); check "
            f"--model-args or that the checkpoint belongs to this model.") from None
    return model
