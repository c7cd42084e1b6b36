"""Bounded reading of files: declared sizes are checked before anything is inflated or allocated.

Used by :func:`gradscope.checkpoint.load_checkpoint` (torch zips, safetensors) and
:func:`gradscope.load` (npz Recordings). Every archive format declares its sizes up front — the zip
central directory, each npy header, the safetensors JSON header — so a file can be refused for what
it *says* it holds before a byte of that is read:

- the file itself, and the total it declares inflated, must each fit the load limit
  (``max_load_bytes``, default :data:`DEFAULT_MAX_LOAD_BYTES`; ``None`` switches every check off);
- a zip whose members inflate to more than :data:`MAX_INFLATE_RATIO` times the file's size is refused
  as a zip bomb once it declares more than :data:`RATIO_FLOOR` bytes (Apache POI's ``ZipSecureFile``
  refuses ratios beyond 100:1 too; deflate cannot exceed about 1032:1, real weights and float
  recordings compress far less than 100:1);
- members must lie inside the file, and each npy header's shape × dtype must equal its member's size
  (a header that lies would make numpy allocate what it declares);
- zip members are read back against their CRC-32 (torch itself does not check it when loading).

Limits are stated plainly: the legacy (pre-1.6) torch format and plain pickles declare no sizes up
front; for them only the file size is checked.
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Type

import numpy as np

from .errors import GradscopeError, LoadLimitError

#: Default of ``max_load_bytes`` / ``--max-load-bytes``: 4 GiB declared per file.
DEFAULT_MAX_LOAD_BYTES = 4 * 2 ** 30
#: Largest accepted ratio of declared (inflated) bytes to the file's size.
MAX_INFLATE_RATIO = 100
#: Archives that declare less than this are never refused for their inflate ratio.
RATIO_FLOOR = 16 * 2 ** 20
_CHUNK = 1 << 20
RAISE_HINT = "if you trust the file, raise the limit (max_load_bytes=)"


def fmt_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def check_limit(max_load_bytes: Any) -> Optional[int]:
    """Validate a ``max_load_bytes`` keyword: a positive int, or None for no limit."""
    if max_load_bytes is None:
        return None
    if isinstance(max_load_bytes, bool) or not isinstance(max_load_bytes, (int, np.integer)) \
            or max_load_bytes < 1:
        raise GradscopeError(
            f"max_load_bytes must be a positive number of bytes or None (no limit), got "
            f"{max_load_bytes!r}; e.g. max_load_bytes=8 * 2**30.")
    return int(max_load_bytes)


def check_file_size(what: str, size: int, limit: Optional[int]) -> None:
    """Refuse a file larger than the limit."""
    if limit is not None and size > limit:
        raise LoadLimitError(
            f"{what} is {fmt_bytes(size)}, more than the load limit of {fmt_bytes(limit)}; {RAISE_HINT}.",
            limit=limit)


def inspect_zip(zf: zipfile.ZipFile, what: str, file_size: int, limit: Optional[int],
                error: Type[GradscopeError]) -> List[zipfile.ZipInfo]:
    """Check a zip's declared sizes against the file and the limit; returns its members.

    Raises ``error`` for members that cannot lie inside the file, :class:`LoadLimitError` for a
    declared total beyond the limit or an inflate ratio beyond :data:`MAX_INFLATE_RATIO`.
    """
    infos = zf.infolist()
    total = 0
    for info in infos:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise error(f"{what}: zip member {info.filename!r} uses compression method "
                        f"{info.compress_type}, expected stored or deflated; re-save the file.")
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.header_offset + info.compress_size > file_size or (stored and info.compress_size != info.file_size):
            raise error(
                f"{what}: zip member {info.filename!r} declares {fmt_bytes(info.compress_size)} "
                f"stored at offset {info.header_offset} ({fmt_bytes(info.file_size)} inflated), which "
                f"does not fit the {fmt_bytes(file_size)} file: its headers lie or it is truncated; "
                f"re-save or re-download it.")
        total += info.file_size
    if limit is not None and total > limit:
        raise LoadLimitError(
            f"{what} declares {fmt_bytes(total)} once inflated ({len(infos)} zip members in a "
            f"{fmt_bytes(file_size)} file), more than the load limit of {fmt_bytes(limit)}; {RAISE_HINT}.",
            limit=limit)
    if limit is not None and total > RATIO_FLOOR and total > MAX_INFLATE_RATIO * max(file_size, 1):
        raise LoadLimitError(
            f"{what} declares {fmt_bytes(total)} once inflated from a {fmt_bytes(file_size)} file "
            f"(ratio {total / max(file_size, 1):.0f}:1, beyond {MAX_INFLATE_RATIO}:1): a zip bomb? "
            f"If you trust the file, pass max_load_bytes=None.", limit=limit, bomb=True)
    return infos


def verify_crcs(zf: zipfile.ZipFile, infos: List[zipfile.ZipInfo], what: str,
                error: Type[GradscopeError], skip_zero: bool = False) -> List[str]:
    """Read every member in 1 MiB chunks and check its CRC-32; returns members not checked.

    ``skip_zero``: a CRC of 0 on a non-empty member means "not recorded" (``torch.save`` under
    ``torch.serialization.set_crc32_options(False)``); such members are returned, not refused.
    """
    unchecked = []
    for info in infos:
        if skip_zero and info.CRC == 0 and info.file_size > 0:
            unchecked.append(info.filename)
            continue
        try:
            with zf.open(info) as f:
                while f.read(_CHUNK):
                    pass
        except zipfile.BadZipFile as exc:
            bad = "CRC" in str(exc)
            raise error(
                f"{what}: zip member {info.filename!r} is corrupt "
                f"({'its bytes do not match their CRC-32 checksum' if bad else exc}); the file was "
                f"damaged in storage or transfer: re-save or re-download it.") from None
        except (zlib.error, EOFError, OSError, ValueError) as exc:
            raise error(
                f"{what}: zip member {info.filename!r} cannot be inflated ({type(exc).__name__}: "
                f"{exc}); the file is corrupt or truncated: re-save or re-download it.") from None
    return unchecked


def read_npz(zf: zipfile.ZipFile, infos: List[zipfile.ZipInfo], what: str,
             error: Type[GradscopeError]) -> Dict[str, np.ndarray]:
    """Read the arrays of an npz whose sizes :func:`inspect_zip` accepted.

    Each npy header is checked against its member's size before any allocation; objects
    (pickles) are refused; CRCs are checked as each member is read to its end.
    """
    out: Dict[str, np.ndarray] = {}
    for info in infos:
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise error(f"{what}: array {key!r} has npy format version {version}, expected 1.0 "
                                f"or 2.0; re-save the file.")
                if dtype.hasobject:
                    raise error(f"{what}: array {key!r} holds Python objects (dtype {dtype}), which "
                                f"would need pickle to read; a Recording holds numbers only.")
                header = f.tell()
                count = math.prod(int(s) for s in shape)
                nbytes = count * dtype.itemsize
                if header + nbytes != info.file_size:
                    raise error(
                        f"{what}: the npy header of array {key!r} declares shape {tuple(shape)} "
                        f"{dtype} = {fmt_bytes(nbytes)}, but its member holds "
                        f"{fmt_bytes(info.file_size - header)} of data: the header lies or the file is "
                        f"corrupt; re-save it.")
                data = f.read(nbytes)
                f.read(1)  # reach the member's end, where zipfile checks the CRC
        except GradscopeError:
            raise
        except zipfile.BadZipFile as exc:
            msg = "its bytes do not match their CRC-32 checksum" if "CRC" in str(exc) else str(exc)
            raise error(f"{what}: array {key!r} is corrupt ({msg}); re-save or re-download the file.") from None
        except (ValueError, OSError, EOFError, zlib.error, SyntaxError, TypeError) as exc:
            raise error(f"{what}: array {key!r} is not a readable npy array ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]}); re-save the file.") from None
        if len(data) != nbytes:
            raise error(f"{what}: array {key!r} is truncated ({len(data)} of {nbytes} bytes); re-save it.")
        arr = np.frombuffer(data, dtype=dtype, count=count)
        out[key] = arr.reshape(shape, order="F" if fortran else "C")
    return out


_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
              "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
#: safetensors itself refuses headers over 100 MB.
_ST_MAX_HEADER = 100_000_000


def check_safetensors(f, what: str, file_size: int, error: Type[GradscopeError]) -> None:
    """Check a safetensors file's header: its length, and every tensor's offsets, shape and dtype.

    Nothing in it is compressed, so the file-size limit bounds its tensors too."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    if n > min(file_size - 8, _ST_MAX_HEADER):
        raise error(f"{what} is not a readable safetensors file: its header declares {fmt_bytes(n)} of JSON in a "
                    f"{fmt_bytes(file_size)} file: it lies or the file is truncated; re-save or re-download it.")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not a readable safetensors file: its header is not valid JSON ({type(exc).__name__}); "
                    f"re-save or re-download it.") from None
    if not isinstance(header, dict):
        raise error(f"{what} is not a readable safetensors file: its header is a JSON {type(header).__name__}, expected an object; "
                    f"re-save or re-download it.")
    data_size = file_size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(begin, int) \
                and isinstance(end, int) and 0 <= begin <= end <= data_size
            # a dtype newer than this table: its offsets are still checked
            declared = math.prod(shape) * _ST_DTYPES[dtype] if dtype in _ST_DTYPES else end - begin
            ok = ok and end - begin == declared
        except (KeyError, TypeError, ValueError):
            ok, declared = False, 0
        if not ok:
            raise error(f"{what} is not a readable safetensors file: its header entry {name!r} ({' '.join(str(entry).split())[:120]}) "
                        f"does not fit its {fmt_bytes(data_size)} of data (dtype, shape and data_offsets "
                        f"must agree): the header lies or the file is truncated; re-save or re-download it.")
