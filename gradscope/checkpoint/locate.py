"""Recognising recurrent and attention modules in a state dict from key names and shapes alone.

:func:`find_modules` groups the keys by module prefix and recognises ``nn.RNN/GRU/LSTM`` (keys
``weight_ih_l{k}[_reverse]`` ...), their ``*Cell`` versions and ``nn.MultiheadAttention``; each
:class:`FoundModule` holds the guessed constructor arguments and rebuilds the torch module with exactly
those weights. What the weights cannot tell (``nn.RNN``'s nonlinearity, the attention head count,
``batch_first``, dropout) is assumed and noted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .._format import one_line
from ..errors import CheckpointError

__all__ = ["FoundModule", "find_modules", "default_num_heads", "RECURRENT_KINDS", "CELL_KINDS", "FUSED_KEY",
           "site_name"]

RECURRENT_KINDS = ("RNN", "GRU", "LSTM")
CELL_KINDS = ("RNNCell", "GRUCell", "LSTMCell")
_GATES = {1: "RNN", 3: "GRU", 4: "LSTM"}
GATE_NAMES = {"RNN": ("h",), "GRU": ("r", "z", "n"), "LSTM": ("i", "f", "g", "o")}
FUSED_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
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
        return [site_name(self.prefix, k, d) for k in range(self.config["num_layers"]) for d in dirs]

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


def site_name(prefix: str, layer: int, direction_suffix: str) -> str:
    """The site of one layer and direction of a fused module: ``site_name("enc.lstm", 0, "_reverse")``
    is ``"enc.lstm.l0_reverse"``; without a prefix just ``"l0_reverse"``."""
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
            f"(change with rnn_nonlinearity={other!r})")


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
        if names and all(FUSED_KEY.match(n) for n in names) and not below:
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
        m = FUSED_KEY.match(local)
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
            f"measures depend on it (change with num_heads=N)")
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
