"""Finding the state dict inside whatever a checkpoint file held, and summarising the rest.

Used by :func:`gradscope.checkpoint.load_checkpoint`. A *state dict* here is a non-empty mapping
with string keys whose values are all tensors (``*_extra_state`` entries excepted).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._format import one_line
from ..errors import CheckpointError

#: Entry names that hold the model's state dict, tried in this order (then one level deeper).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
#: Prefixes stripped when every key carries them: DDP/DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Path_ = Tuple[Any, ...]


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    n_tensors = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, Tensor):
            n_tensors += 1
        elif not k.endswith("_extra_state"):
            return False
    return n_tensors > 0


def _is_optimizer_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "state" in obj and "param_groups" in obj


def _path_text(path: Path_) -> str:
    return "checkpoint" + "".join(f"[{k!r}]" for k in path)


def _children(obj: Any) -> List[Tuple[Any, Any]]:
    if isinstance(obj, Mapping):
        return list(obj.items())
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    return []


def _module_state(module: nn.Module, where: str) -> Dict[str, Tensor]:
    try:
        return dict(module.state_dict())
    except Exception as exc:
        raise CheckpointError(
            f"{where} is a pickled {type(module).__name__} whose state_dict() failed "
            f"({type(exc).__name__}: {one_line(str(exc), 80)}); re-save model.state_dict() instead."
        ) from None


def _tensors_only(sd: Mapping) -> Tuple[Dict[str, Tensor], int]:
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    return out, len(sd) - len(out)


def locate_state_dict(obj: Any) -> Tuple[Dict[str, Tensor], str, List[Path_], List[str]]:
    """Find the model's state dict in a loaded checkpoint object.

    Returns ``(state_dict, source_key, used_paths, notes)``; ``used_paths`` are the entries taken
    (so the metadata summary can leave them out). Raises CheckpointError when there is none.
    """
    notes: List[str] = []

    def take(value: Any, path: Path_) -> Optional[Tuple[Dict[str, Tensor], str]]:
        where = _path_text(path)
        if isinstance(value, nn.Module):
            return _module_state(value, where), where + ".state_dict()"
        if _is_state_dict(value):
            sd, dropped = _tensors_only(value)
            if dropped:
                notes.append(f"dropped {dropped} non-tensor *_extra_state entries")
            return sd, where
        return None

    got = take(obj, ())
    if got:
        return got[0], got[1], [()], notes
    children = _children(obj)
    by_key = {k: v for k, v in children}
    # 1. The usual names, then the usual names one level down (checkpoint['model']['state_dict']).
    for name in STATE_DICT_KEYS:
        if name in by_key:
            got = take(by_key[name], (name,))
            if got:
                return got[0], got[1], [(name,)], notes
    parents = [k for k in STATE_DICT_KEYS if k in by_key]
    parents += [k for k, _ in children if k not in STATE_DICT_KEYS]
    for parent in parents:
        inner = dict(_children(by_key[parent]))
        for name in STATE_DICT_KEYS:
            if name in inner:
                got = take(inner[name], (parent, name))
                if got:
                    return got[0], got[1], [(parent, name)], notes
    # 2. Any entry that is a state dict or a module; several are merged under their names
    #    ({'encoder': enc.state_dict(), 'decoder': dec.state_dict()} reads like one model).
    hits = []
    for k, v in children:
        got = take(v, (k,))
        if got:
            hits.append((k, got))
    if len(hits) == 1:
        k, (sd, where) = hits[0]
        return sd, where, [(k,)], notes
    if hits:
        merged: Dict[str, Tensor] = {}
        for k, (sd, _where) in hits:
            merged.update({f"{k}.{name}": t for name, t in sd.items()})
        notes.append("merged several state dicts, each key prefixed with its entry name")
        return merged, " + ".join(w for _k, (_sd, w) in hits), [(k,) for k, _ in hits], notes
    # 3. A flat mapping mixing tensors with other values ({'weight': ..., 'epoch': 3}).
    if isinstance(obj, Mapping):
        flat = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if flat:
            notes.append("took the checkpoint's tensor entries as the state dict")
            return flat, "checkpoint (its tensor entries)", [(k,) for k in flat], notes
    n = count_tensors(obj)
    if n == 0 and nesting_depth(obj, _MAX_DEPTH + 1) > _MAX_DEPTH:
        raise CheckpointError(
            f"the checkpoint nests containers more than {_MAX_DEPTH} levels deep (dicts or lists inside "
            f"each other) and holds no tensor in its first {_MAX_DEPTH} levels; gradscope looks for the "
            f"state dict at the top or under one or two keys such as 'state_dict': save "
            f"torch.save(model.state_dict(), path) or {{'state_dict': model.state_dict()}}.")
    if n == 0:
        raise CheckpointError(
            f"the checkpoint holds no tensors at all (it is {describe_type(obj)}); it has no weights "
            f"to analyse: pass the file written by torch.save(model.state_dict(), path).")
    if isinstance(obj, Tensor):
        raise CheckpointError(
            f"the checkpoint is a single tensor {list(obj.shape)}, not a state dict; save "
            f"model.state_dict() instead.")
    keys = ", ".join(repr(k) for k, _ in children[:8])
    raise CheckpointError(
        f"found {n} tensors but no state dict (a mapping of parameter names to tensors) in the "
        f"checkpoint (entries: {keys or describe_type(obj)}); save model.state_dict(), or put it "
        f"under 'state_dict'.")


def strip_wrapper_prefixes(sd: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], str]:
    """Strip ``module.`` / ``_orig_mod.`` (in any nesting) while every key carries one."""
    stripped = ""
    while sd:
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(p) and len(k) > len(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped += p
                break
        else:
            break
    return sd, stripped


#: Containers deeper than this are not searched for tensors.
_MAX_DEPTH = 20


def nesting_depth(obj: Any, limit: int) -> int:
    """How many levels of dicts, lists and tuples nest in ``obj`` (``{}`` is 1), counted up to ``limit``."""
    depth = 0
    level = [obj] if isinstance(obj, (Mapping, list, tuple)) else []
    while level and depth < limit:
        depth += 1
        level = [v for o in level for _k, v in _children(o) if isinstance(v, (Mapping, list, tuple))][:10_000]
    return depth


def count_tensors(obj: Any, _depth: int = 0) -> int:
    """Number of tensors anywhere in a nested structure (modules count their state)."""
    if isinstance(obj, Tensor):
        return 1
    if isinstance(obj, nn.Module):
        return len(obj.state_dict())
    if _depth > _MAX_DEPTH:
        return 0
    return sum(count_tensors(v, _depth + 1) for _k, v in _children(obj))


def describe_type(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with {len(obj)} {'entry' if len(obj) == 1 else 'entries'}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} {'item' if len(obj) == 1 else 'items'}"
    return f"a {type(obj).__name__}"


def _shape(t: Any) -> List[int]:
    return [int(s) for s in t.shape]


def summarise(obj: Any, depth: int = 0) -> Any:
    """A JSON-able summary: numbers and strings as they are, tensors as ``"tensor float32 [3, 4]"``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj if not isinstance(obj, str) else one_line(obj, 200)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Tensor):
        if obj.numel() == 1 and not obj.is_complex():
            try:
                v = obj.item()
                return v if not isinstance(v, float) or math.isfinite(v) else str(v)
            except Exception:
                pass
        return f"tensor {str(obj.dtype).replace('torch.', '')} {_shape(obj)}"
    if isinstance(obj, torch.Size):
        return [int(s) for s in obj]
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, nn.Module):
        return f"nn.Module {type(obj).__name__} ({count_tensors(obj)} tensors)"
    if _is_optimizer_state(obj):
        return f"optimizer state ({count_tensors(obj)} tensors)"
    if _is_state_dict(obj):
        return f"state dict ({len(obj)} tensors)"
    if isinstance(obj, Mapping):
        if depth >= 3 or len(obj) > 64:
            return f"dict with {len(obj)} entries ({count_tensors(obj)} tensors)"
        return {str(k): summarise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
        if depth >= 3 or len(items) > 16:
            return f"{type(obj).__name__} of {len(items)} items"
        return [summarise(v, depth + 1) for v in items]
    if isinstance(obj, (bytes, bytearray)):
        return f"bytes ({len(obj)})"
    if isinstance(obj, complex):
        return str(obj)
    try:  # numpy scalars and arrays, without importing numpy here
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            if getattr(obj, "ndim", 1) == 0:
                return summarise(obj.item(), depth)
            return f"array {obj.dtype} {[int(s) for s in obj.shape]}"
    except Exception:
        pass
    return f"<{type(obj).__module__}.{type(obj).__qualname__}>"


def metadata_without(obj: Any, used: Sequence[Path_]) -> Dict[str, Any]:
    """Summaries of the checkpoint's entries other than the ``used`` ones."""
    if () in used or not isinstance(obj, (Mapping, list, tuple)):
        return {}
    out: Dict[str, Any] = {}
    for k, v in _children(obj):
        inner_used = [p[1:] for p in used if p and p[0] == k]
        if (k,) in used:
            continue
        if inner_used and isinstance(v, (Mapping, list, tuple)):
            out[str(k)] = {str(k2): summarise(v2, 1) for k2, v2 in _children(v)
                           if (k2,) not in inner_used}
        else:
            out[str(k)] = summarise(v)
    return out
