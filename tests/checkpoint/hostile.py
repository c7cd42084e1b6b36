"""Builders of hostile and malformed files (bombs, lying headers, corrupt archives, bad schemas), shared by
test_load_limits.py and test_fuzz_files.py. Nothing here needs more memory than the file it writes."""
import collections
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

import gradscope


class _Storage:
    pass


class _Tensor:
    """Pickles like a float32 tensor of ``numel`` elements whose storage is record ``key``."""

    def __init__(self, storage, numel):
        self.storage, self.numel = storage, numel

    def __reduce_ex__(self, protocol):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict()))


def _torch_pickle(obj, storages):
    """``data.pkl`` of a torch zip whose _Tensor leaves refer to records by persistent id."""
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                key, numel = storages[id(o)]
                return ("storage", torch.FloatStorage, key, "cpu", numel)
            return None

    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _write_zeros(zf, name, nbytes):
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(1 << 24)
    with zf.open(info, "w", force_zip64=True) as f:
        left = nbytes
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def torch_zip_bomb(path, inflated_bytes, level=6):
    """A torch.save-style zip holding an LSTM's weights plus one float32 tensor of ``inflated_bytes``
    zeros, deflated (a few MiB per GiB). torch.load inflates all of it."""
    sd = {k: v for k, v in torch.nn.LSTM(2, 3).state_dict().items()}
    with zipfile.ZipFile(path, "w", compresslevel=level) as zf:
        storages, obj = {}, collections.OrderedDict()
        for i, (k, t) in enumerate(sd.items()):
            s = _Storage()
            storages[id(s)] = (str(i), t.numel())
            obj[k] = _Tensor(s, t.numel())
        big = _Storage()
        storages[id(big)] = ("big", inflated_bytes // 4)
        obj["extra.big"] = _Tensor(big, inflated_bytes // 4)
        zf.writestr("archive/data.pkl", _torch_pickle(obj, storages))
        zf.writestr("archive/byteorder", "little")
        for i, t in enumerate(sd.values()):
            zf.writestr(f"archive/data/{i}", t.contiguous().numpy().tobytes())
        _write_zeros(zf, "archive/data/big", inflated_bytes)
        zf.writestr("archive/version", "3\n")
    return Path(path)


def good_recording(path):
    rec = gradscope.probe(torch.nn.GRU(2, 4), torch.randn(12, 2, 2))
    return rec.save(path)


def npz_members(path):
    """{member name: bytes} of an npz."""
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_npz(path, members, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)


def npy_bytes(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=True)
    return buf.getvalue()


def npy_with_header(shape, dtype="<f8", data=b""):
    """An npy member whose header declares ``shape`` whatever ``data`` holds (a lying header)."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def recording_meta(members):
    return json.loads(np.load(io.BytesIO(members["__meta__.npy"])).tobytes().decode())


def with_meta(members, meta):
    out = dict(members)
    out["__meta__.npy"] = npy_bytes(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return out


def npz_bomb(path, inflated_bytes, good):
    """A valid recording whose index also lists a grads member of ``inflated_bytes`` zeros (deflated)."""
    members = npz_members(good)
    meta = recording_meta(members)
    site = next(iter(meta["sites"]))
    n = len(np.load(io.BytesIO(members["steps.npy"])))
    cols = inflated_bytes // 8 // n
    meta["index"]["grads"].append([site, "h2", "gbig"])
    meta["sites"][site]["states"].append("h2")
    members = with_meta(members, meta)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("gbig.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        header = npy_with_header((n, cols))
        chunk = bytes(1 << 24)
        with zf.open(info, "w", force_zip64=True) as f:
            f.write(header)
            left = n * cols * 8
            while left:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k
    return Path(path)


def flip_bytes(data: bytes, start: int, count: int = 64) -> bytes:
    b = bytearray(data)
    for i in range(start, min(start + count, len(b))):
        b[i] ^= 0xFF
    return bytes(b)


def stored_member_offset(path, suffix):
    """Offset of the data of the first zip member whose name ends with ``suffix`` (stored)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    m = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + n + m, info.file_size
