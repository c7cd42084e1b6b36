"""Reading checkpoint files safely and within limits: :func:`load_checkpoint` and the formats behind it.

Nothing here executes code from a file unless ``unsafe=True``: torch files are read with
``torch.load(weights_only=True)`` (a restricted unpickler), safetensors files hold no code, and the
pickle scanner below only *reads* opcodes (``pickletools.genops``), it never unpickles. What a file
declares is checked against ``max_load_bytes`` before it is read (:mod:`gradscope._archive`).
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.serialization
from torch import Tensor

from .. import _archive
from .._archive import DEFAULT_MAX_LOAD_BYTES
from .._format import one_line
from ..errors import CheckpointError, LoadLimitError, PlainPickleError, UnsafeCheckpointError, did_you_mean
from .contents import locate_state_dict, metadata_without, strip_wrapper_prefixes

__all__ = ["Checkpoint", "load_checkpoint", "INSTALL_HINT"]

PathLike = Union[str, "os.PathLike[str]"]

#: Suffixes read with ``torch.load``; anything else is sniffed from its first bytes.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
INSTALL_HINT = 'pip install "gradscope[ckpt]"'

# torch.save(..., _use_new_zipfile_serialization=False) writes this pickled magic number first.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_HEAD_BYTES = 4096


def sniff(head: bytes, size: int) -> str:
    """Name the format from the first bytes of a file.

    Returns one of ``"empty"``, ``"zip"`` (``torch.save`` since 1.6), ``"torch-legacy"`` (older
    ``torch.save``), ``"pickle"`` (a plain ``pickle.dump``), ``"safetensors"``, ``"json"``,
    ``"text"`` or ``"unknown"``.
    """
    if size == 0:
        return "empty"
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if size >= 10:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the head is still text.
        try:
            text = head[:-3].decode("utf-8") if len(head) > 3 else None
        except UnicodeDecodeError:
            text = None
    if text is not None:
        printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
        if text and printable >= 0.95 * len(text):
            return "json" if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "[") else "text"
    return "unknown"


def read_head(path: Path) -> Tuple[bytes, int]:
    """The first few KiB of ``path`` and its size in bytes."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
        f.seek(0, 2)
        return head, f.tell()


# ---------------------------------------------------------------------------------------------
# Which globals does a pickle want? (static: opcodes are read, nothing is executed)

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
# Globals that only rebuild plain data; the weights-only unpickler also accepts these.
_DATA_GLOBALS = {
    "collections.OrderedDict", "torch.Size", "torch.device", "_codecs.encode", "builtins.set",
    "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice",
    "torch.nn.parameter.Parameter", "torch._tensor._rebuild_from_type_v2",
}


def pickle_globals(data: bytes, limit: int = 64) -> List[str]:
    """The ``module.name`` globals a pickle refers to, in order of first use, read statically.

    ``STACK_GLOBAL`` takes its two names from the stack; they are tracked through the memo the
    way pickle writes them (string, ``MEMOIZE``, later ``BINGET``). Malformed data ends the scan
    quietly: what was found until then is returned.
    """
    found: List[str] = []
    strings: List[Optional[str]] = []
    memo: dict = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                strings.append(arg if isinstance(arg, str) else None)
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in _PUT_OPS:
                memo[arg] = strings[-1] if strings else None
            elif name in _GET_OPS:
                strings.append(memo.get(arg))
            elif name in ("GLOBAL", "INST"):
                g = str(arg).replace(" ", ".", 1)
                if g not in found:
                    found.append(g)
            elif name == "STACK_GLOBAL":
                mod, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
                g = f"{mod}.{attr}" if mod and attr else "<unknown global>"
                if g not in found:
                    found.append(g)
            else:
                strings.append(None)
            if len(found) >= limit or len(strings) > 100_000:
                break
            if len(strings) > 1000:
                del strings[:-16]
    except Exception:  # malformed pickle: keep what was found
        pass
    return found


def _is_data_global(name: str) -> bool:
    if name in _DATA_GLOBALS or name.startswith("torch._utils._rebuild_"):
        return True
    if name.startswith("torch.") and name.count(".") == 1:
        attr = getattr(torch, name.split(".", 1)[1], None)
        if isinstance(attr, torch.dtype) or name.endswith("Storage"):
            return True
    return False


def _unsafe_globals(path: Path, kind: str, exc: BaseException) -> List[str]:
    """Globals that made weights-only loading refuse ``path`` (empty when that was not the cause)."""
    names: List[str] = []
    for m in re.finditer(r"GLOBAL ([A-Za-z_][\w.]*)", str(exc)):
        if m.group(1) not in names:
            names.append(m.group(1))
    if kind == "zip" and names:
        lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
        if lister is not None:
            try:
                for g in lister(str(path)):
                    if g not in names:
                        names.append(g)
            except Exception:
                pass
    if kind == "pickle":
        # Weights-only loading cannot even parse protocol >= 4 pickles, so it never names the
        # global; read the opcodes ourselves.
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        for g in pickle_globals(data):
            if g not in names and not _is_data_global(g):
                names.append(g)
    return names


# ---------------------------------------------------------------------------------------------
# Loading


def _torch_reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (torch wraps it in paragraphs of advice)."""
    boiler = ("weights only load failed", "please file an issue", "check the documentation",
              "in pytorch 2.6", "(1)", "(2)", "this file can still be loaded", "re-running")
    for line in str(exc).splitlines():
        s = one_line(line.replace("WeightsUnpickler error:", ""))
        if s and not s.lower().startswith(boiler):
            return f"{type(exc).__name__}: {s}"
    return type(exc).__name__


def _zip_without_data_pkl(path: Optional[Path]) -> bool:
    """True when ``path`` is a readable zip archive that lacks torch.save's ``*/data.pkl``."""
    if path is None:
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return not any(n.endswith("data.pkl") for n in z.namelist())
    except Exception:
        return False


def _is_torchscript(path: Path) -> bool:
    """True for a zip archive written by ``torch.jit.save`` (it carries code and constants)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _load_torchscript(path: Path, name: str, unsafe: bool) -> Tuple[Any, str, List[str], dict]:
    if not unsafe:
        raise UnsafeCheckpointError(
            f"{name!r} is a TorchScript archive (torch.jit.save): loading it runs the code it contains; "
            f"if you trust the file, load it with unsafe=True (torch.jit.load) to report its weights.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates TorchScript; the file is still what it is
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"{name!r} is a TorchScript archive but torch.jit.load failed ({_torch_reason(exc)}); it is "
                f"corrupt or needs custom operators: re-export it or save its state_dict.") from None
    notes = ["a TorchScript archive, loaded with torch.jit.load (this ran its code); its weights are "
             "analysed and probed in rebuilt modules, not its scripted forward"]
    return dict(module.state_dict()), "torchscript", notes, {}


def _failure(name: str, kind: str, suffix: str, exc: BaseException,
             path: Optional[Path] = None) -> CheckpointError:
    """Turn any exception from reading a file into a one-line CheckpointError."""
    msg = str(exc)
    reason = _torch_reason(exc)
    if isinstance(exc, MemoryError):
        return CheckpointError(
            f"{name!r} ran out of memory while loading; free memory or load it on a larger machine.")
    if kind == "zip":
        if "central directory" in msg or isinstance(exc, EOFError):
            return CheckpointError(
                f"{name!r} is a truncated or corrupt zip archive (its central directory, at the end of "
                f"the file, is missing or damaged); the save was probably "
                f"interrupted or the copy is incomplete: re-save or re-download it.")
        if ("data.pkl" in msg and "failed locating" in msg) or _zip_without_data_pkl(path):
            return CheckpointError(
                f"{name!r} is a zip archive but not one written by torch.save (it has no data.pkl); "
                f"pass a checkpoint written by torch.save or a .safetensors file.")
        return CheckpointError(
            f"{name!r} is a torch.save zip archive but its contents are corrupt ({reason}); "
            f"re-save or re-download it.")
    if kind == "torch-legacy":
        return CheckpointError(
            f"{name!r} is an old-format torch.save file but it is corrupt ({reason}); "
            f"re-save or re-download it.")
    if kind == "pickle":
        return PlainPickleError(
            f"{name!r} is a plain pickle (pickle.dump), not a torch.save file, and weights-only loading "
            f"cannot read it ({reason}); re-save it with torch.save(obj, path), or pass unsafe=True "
            f"if you trust it.")
    if kind == "json":
        return CheckpointError(
            f"{name!r} is a JSON file, not a checkpoint (a config?); pass the weights file "
            f"(.pt, .pth, .bin, .ckpt or .safetensors) instead.")
    if kind == "text":
        return CheckpointError(
            f"{name!r} is a text file, not a checkpoint; pass the weights file "
            f"(.pt, .pth, .bin, .ckpt or .safetensors) instead.")
    expected = "safetensors" if suffix == SAFETENSORS_SUFFIX else "torch.save zip, pickle or safetensors"
    return CheckpointError(
        f"{name!r} is not a recognised checkpoint (expected {expected}, got bytes that are none of "
        f"these: {reason}); pass a file written by torch.save or safetensors, or re-download it.")


def _load_safetensors(path: Path, name: str) -> Tuple[Any, List[str], dict]:
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(
            f"{name!r} is a safetensors file and reading it needs the optional package safetensors, "
            f"which is not installed; run: {INSTALL_HINT}") from None
    try:
        tensors = st.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{name!r} is not a readable safetensors file ({type(exc).__name__}: "
            f"{one_line(str(exc), 100)}); re-save it with safetensors.torch.save_file or "
            f"re-download it.") from None
    extra: dict = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if meta:
            extra = {"safetensors_metadata": {str(k): one_line(str(v), 200) for k, v in meta.items()}}
    except Exception:
        pass
    return tensors, [], extra


def _is_text_pickle(path: Path, size: int) -> bool:
    """True when a file that reads as text is a protocol 0 or 1 pickle (ASCII opcodes, such as
    ``(dp0`` or ``ccollections``): its opcodes parse to a STOP at the end of the file."""
    if size > 64 * 2 ** 20:
        return False
    try:
        data = path.read_bytes().rstrip(b"\r\n")
        if data[:1] not in (b"(", b"c", b"}", b"]", b"N", b"I", b"F", b"S", b"V", b"\x80", b"l", b"d"):
            return False
        last = None
        for op, _arg, pos in pickletools.genops(data):
            last = (op.name, pos)
        return last is not None and last[0] == "STOP" and last[1] == len(data) - 1
    except Exception:  # not a pickle: any parse error says so
        return False


def _check_sizes(path: Path, name: str, kind: str, size: int, max_load_bytes: Optional[int]) -> List[str]:
    """Refuse what declares more than the limit, or lies about its sizes, before reading it
    (see :mod:`gradscope._archive`); verify zip CRCs. Returns notes."""
    _archive.check_file_size(repr(name), size, max_load_bytes)
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return []  # not readable as a zip at all: torch.load's own error explains it
        with zf:
            infos = _archive.inspect_zip(zf, repr(name), size, max_load_bytes, CheckpointError)
            unchecked = _archive.verify_crcs(zf, infos, repr(name), CheckpointError, skip_zero=True)
        if unchecked:
            return [f"{len(unchecked)} zip members carry no CRC-32 (written with torch.serialization."
                    f"set_crc32_options(False)?); their integrity could not be checked"]
    if kind == "safetensors":
        with open(path, "rb") as f:
            _archive.check_safetensors(f, repr(name), size, CheckpointError)
    return []


def load_file(path: Path, *, unsafe: bool, max_load_bytes: Optional[int] = None) -> Tuple[Any, str, List[str], dict]:
    """Read ``path`` into a Python object.

    ``max_load_bytes`` bounds what the file may declare (None: no limit; see
    :mod:`gradscope._archive`). Returns ``(object, format, notes, extra_metadata)``; raises
    :class:`CheckpointError` (or :class:`UnsafeCheckpointError`, :class:`LoadLimitError`) for
    anything that goes wrong, never another exception type.
    """
    name = str(path)
    try:
        head, size = read_head(path)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {name!r} ({type(exc).__name__}: {one_line(exc.strerror or str(exc), 80)}); "
            f"check the path and its permissions.") from None
    kind = sniff(head, size)
    suffix = path.suffix.lower()
    if kind == "empty":
        raise CheckpointError(
            f"{name!r} is empty (0 bytes); the save was probably interrupted: re-save or re-download it.")
    if kind in ("json", "text", "unknown") and _is_text_pickle(path, size):
        kind = "pickle"  # protocol 0 or 1: pickle opcodes in (mostly) printable bytes
    if kind in ("json", "text"):
        raise _failure(name, kind, suffix, ValueError(kind))
    size_notes = _check_sizes(path, name, kind, size, max_load_bytes)
    if kind == "safetensors" or (suffix == SAFETENSORS_SUFFIX and kind == "unknown"):
        obj, notes, extra = _load_safetensors(path, name)
        return obj, "safetensors", notes, extra

    if kind == "zip" and _is_torchscript(path):
        return _load_torchscript(path, name, unsafe)

    notes: List[str] = list(size_notes)
    if suffix == SAFETENSORS_SUFFIX:
        notes.append(f"the file is named {suffix} but holds a torch.save {kind}; read with torch.load")
    fmt = {"zip": "torch-zip", "torch-legacy": "torch-legacy", "pickle": "pickle"}.get(kind, "unknown")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not unsafe:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            elif kind == "pickle":
                with open(path, "rb") as f:
                    obj = pickle.load(f)  # noqa: S301 - the caller asked for unsafe=True
            else:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            bad = [] if unsafe else _unsafe_globals(path, kind, exc)
            main_classes = [g for g in bad if g.startswith("__main__.")]
            if unsafe and re.search(r"Can't get attribute '(\w+)' on <module '[\w.]*__main__'", str(exc)):
                main_classes = ["__main__." + re.search(r"attribute '(\w+)'", str(exc)).group(1)]
            if main_classes:
                message = (
                    f"cannot load {name!r}: it pickles a whole model whose class "
                    f"({', '.join(main_classes[:3])}) was defined in the script that saved it, so only "
                    f"a program that defines that class can unpickle it (with unsafe=True, which runs "
                    f"code); in that script save model.state_dict() and report on that file, or move the "
                    f"class into an importable module.")
                if unsafe:
                    raise CheckpointError(message) from None
                raise UnsafeCheckpointError(message, loadable=False) from None
            if bad:
                raise UnsafeCheckpointError(
                    f"refusing to load {name!r}: it asks to run code from the file "
                    f"({', '.join(bad[:6])}{', …' if len(bad) > 6 else ''}), which weights-only loading "
                    f"does not allow; if you trust the file, load it with unsafe=True, which runs "
                    f"that code, or re-save only the weights with torch.save(model.state_dict(), path)."
                ) from None
            if unsafe and kind in ("zip", "torch-legacy", "pickle") and "central directory" not in str(exc):
                raise CheckpointError(
                    f"loading {name!r} with unsafe=True failed ({_torch_reason(exc)}); the file is corrupt "
                    f"or the classes it names cannot be imported here (add their package to PYTHONPATH), "
                    f"or re-save only the state_dict.") from None
            raise _failure(name, kind, suffix, exc, path) from None
    for w in caught:
        text = one_line(str(w.message), 120)
        if "pickle protocol" not in text:
            notes.append(f"torch warned: {text}")
    if kind == "unknown":
        fmt = "torch"
    return obj, fmt, notes, {}


def describe_missing(path: Path) -> str:
    """One-line message for a path that does not exist, with the closest sibling name."""
    parent = path.parent if str(path.parent) else Path(".")
    hint = ""
    try:
        if parent.is_dir():
            hint = did_you_mean(path.name, [p.name for p in list(parent.iterdir())[:2000]])
    except OSError:
        pass
    where = "" if parent.is_dir() else f" (its folder {str(parent)!r} does not exist either)"
    return f"no checkpoint file at {str(path)!r}{where}; check the path.{hint}"


def describe_directory(path: Path) -> str:
    """One-line message for a directory given as checkpoint, listing checkpoint files inside."""
    try:
        inside = sorted(p.name for p in path.iterdir()
                        if p.suffix.lower() in TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))
    except OSError:
        inside = []
    listing = f" (it holds {', '.join(inside[:5])}{', …' if len(inside) > 5 else ''})" if inside else ""
    return (f"{str(path)!r} is a directory{listing}; pass the checkpoint file itself, "
            f"e.g. {str(path / (inside[0] if inside else 'model.pt'))!r}.")


# ---------------------------------------------------------------------------------------------
# The public entry point


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
            wanted) and ``unsafe`` is False; ``.loadable`` says whether ``unsafe=True`` can load it.
        PlainPickleError: A plain pickle that weights-only loading cannot read (``unsafe=True``
            reads it with ``pickle.load``).
        LoadLimitError: The file is, or declares, more than ``max_load_bytes`` (a CheckpointError;
            ``.limit`` and ``.bomb`` say which limit refused it).
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
            raise CheckpointError(describe_missing(p))
        if p.is_dir():
            raise CheckpointError(describe_directory(p))
        if not p.is_file():
            raise CheckpointError(
                f"{str(p)!r} is not a regular file (a device, pipe or socket?); pass a checkpoint file.")
    except OSError as exc:
        raise CheckpointError(f"cannot access {str(p)!r} ({one_line(str(exc), 80)}); check the path.") from None
    obj, fmt, notes, extra = load_file(p, unsafe=unsafe, max_load_bytes=max_load_bytes)
    try:
        sd, source, used, more_notes = locate_state_dict(obj)
        sd, stripped = strip_wrapper_prefixes(sd)
        metadata = metadata_without(obj, used)
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
                f"max_load_bytes={max_load_bytes}; raise the limit for a file you trust.", limit=max_load_bytes)
        try:
            out[key] = t.to_dense()
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{str(p)!r}: the sparse tensor {key!r} cannot be made dense "
                                  f"({one_line(str(exc), 80)}); the file is damaged.") from None
    notes.append(f"sparse tensors made dense before analysis: {', '.join(sparse[:6])}"
                 f"{f' and {len(sparse) - 6} more' if len(sparse) > 6 else ''}")
    return out
