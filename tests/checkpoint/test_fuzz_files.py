"""Fuzzing the file readers and the CLI (issue 18 item 8): random bytes, truncations, byte flips of valid
files, random npy headers and metadata, random options. Whatever arrives, the CLI exits 0, 1 or 2,
prints exactly one line on stderr for 2, never says "unexpected" and never shows a traceback, within a
deadline and without growing memory. The CLI's main() runs in-process (stderr via capsys)."""
import io
import json
import resource
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradscope.cli import main

import hostile as H

SETTINGS = settings(max_examples=40, deadline=5000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    torch.save(nn.GRU(2, 4).state_dict(), d / "gru.pt")
    rec = H.good_recording(d / "rec.npz")
    files = {"pt": (d / "gru.pt").read_bytes(), "npz": rec.read_bytes()}
    try:
        from safetensors.torch import save_file
        save_file(nn.RNN(2, 4).state_dict(), d / "rnn.safetensors")
        files["safetensors"] = (d / "rnn.safetensors").read_bytes()
    except ImportError:
        pass
    return files


@pytest.fixture
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def check_cli(argv, capsys):
    """Run the CLI in-process and assert the contract; returns the exit code."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "unexpected" not in err and "Traceback" not in err, (argv, err)
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, (argv, err)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, (argv, grown_mib)
    return code


def _mutate(data: bytes, flips, cut):
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] ^= val or 1
    if cut is not None:
        b = b[: cut % (len(b) + 1)]
    return bytes(b)


mutations = st.tuples(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
                      st.one_of(st.none(), st.integers(0, 1 << 20)))


@SETTINGS
@given(kind=st.sampled_from(["pt", "safetensors"]), mut=mutations)
def test_mutated_checkpoints(valid, out, capsys, kind, mut):
    if kind not in valid:
        pytest.skip("safetensors is not installed")
    path = out / f"m.{kind}"
    path.write_bytes(_mutate(valid[kind], *mut))
    check_cli(["report", path, "--no-probe"], capsys)


@SETTINGS
@given(mut=mutations)
def test_mutated_recordings(valid, out, capsys, mut):
    path = out / "m.npz"
    path.write_bytes(_mutate(valid["npz"], *mut))
    check_cli(["show", path], capsys)


@SETTINGS
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".pt", ".npz", ".safetensors", ".bin"]),
       prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]))
def test_random_bytes(out, capsys, data, suffix, prefix):
    path = out / f"r{suffix}"
    path.write_bytes(prefix + data)
    check_cli(["show" if suffix == ".npz" else "report", path, "--no-probe"] if suffix != ".npz"
              else ["show", path], capsys)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=8)


@SETTINGS
@given(field=st.sampled_from(["sites", "events", "unsupported", "notes", "meta", "measure_meta", "index",
                              "version", "sites.l0", "sites.l0.states", "index.grads", "index.measures",
                              "measure_meta.l0", "measure_meta.l0.gates", "measure_meta.l0.hidden"]),
       value=json_values)
def test_random_metadata(valid, out, capsys, field, value):
    members = H.npz_members(io.BytesIO(valid["npz"]))
    meta = H.recording_meta(members)
    *parents, last = field.split(".")
    node = meta
    for p in parents:
        node = node[p]
    node[last] = value
    path = H.write_npz(out / "meta.npz", H.with_meta(members, meta))
    check_cli(["show", path], capsys)


npy_dtypes = st.sampled_from(["<f8", "<f4", "<i8", "|u1", "|b1", "<c16", "|O", "<U3", "|V4", ">f8"])


@SETTINGS
@given(member=st.sampled_from(["steps.npy", "g0.npy", "l0.npy", "p0.npy", "m0.npy", "m1.npy", "m2.npy"]),
       shape=st.lists(st.integers(0, 1 << 42), max_size=3), dtype=npy_dtypes, body=st.integers(0, 256),
       honest=st.booleans())
def test_random_npy_headers(valid, out, capsys, member, shape, dtype, body, honest):
    members = H.npz_members(io.BytesIO(valid["npz"]))
    if honest:   # a header that tells the truth about a small array of an odd dtype or shape
        shape = [s % 4 for s in shape]
        body = int(np.prod(shape)) * np.dtype(dtype).itemsize if dtype != "|O" else body
    if member in members:
        members[member] = H.npy_with_header(shape, dtype, bytes(body))
    path = H.write_npz(out / "npy.npz", members)
    check_cli(["show", path], capsys)


@SETTINGS
@given(members=st.dictionaries(st.sampled_from(["archive/data.pkl", "archive/data/0", "archive/version",
                                                "archive/byteorder", "x/data.pkl", "__meta__.npy"]),
                               st.binary(max_size=256), max_size=4))
def test_random_zip_archives(out, capsys, members):
    path = H.write_npz(out / "z.pt", members)
    check_cli(["report", path, "--no-probe"], capsys)
    path = H.write_npz(out / "z.npz", members)
    check_cli(["show", path], capsys)


numbers = st.one_of(st.integers(-10, 10 ** 9).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["1e8", "abc", "", "-0", "0x10", "4G", "none"]))


@settings(max_examples=30, deadline=10000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(option=st.sampled_from(["--k", "--threshold", "--batch", "--seq-len", "--num-heads", "--seed",
                               "--input-scale", "--max-load-bytes", "--max-probe-seconds", "--format",
                               "--fail-on", "--rnn-nonlinearity", "--model-args"]),
       value=numbers)
def test_random_options(valid, out, capsys, option, value):
    path = out / "gru.pt"
    if not path.exists():
        path.write_bytes(valid["pt"])
    # a short probe keeps valid option values fast; --no-probe for the sizes that would only slow it down
    argv = ["report", path, option, value, "--seq-len", "8", "--batch", "2"]
    if option in ("--batch", "--seq-len", "--k"):
        argv = ["report", path, "--seq-len", "8", "--batch", "2", option, value, "--no-probe"]
    check_cli(argv, capsys)
    if option in ("--threshold", "--max-load-bytes", "--format", "--fail-on"):
        rec = out / "rec.npz"
        if not rec.exists():
            rec.write_bytes(valid["npz"])
        check_cli(["show", rec, option, value], capsys)
