"""Issue 18 items 3, 5, 6: bounded loading (bombs, lying headers, CRCs), Recording schema validation,
options validated before any work, and the messages that used to mislead."""
import io
import json
import os
import pickle
import re
import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import RecordingFormatError
from gradscope.checkpoint import estimate_probe_seconds, load_checkpoint
from gradscope.checkpoint.report import report_checkpoint
from gradscope.cli import main
from gradscope.cli.args import parse_size
from gradscope.errors import CheckpointError, GradscopeError, InputsError, LoadLimitError

import hostile as H


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unexpected" not in err and "Traceback" not in err, err
    return lines[0]


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return H.good_recording(tmp_path_factory.mktemp("rec") / "good.npz")


@pytest.fixture(scope="module")
def lstm_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "lstm.pt"
    torch.save(nn.LSTM(4, 8).state_dict(), path)
    return path


# ------------------------------------------------------------------ bombs and limits (item 3)

def test_torch_zip_bomb_is_refused_before_inflating(tmp_path, capsys):
    bomb = H.torch_zip_bomb(tmp_path / "bomb.pt", 256 << 20)   # ~256 KiB that torch.load inflates to 256 MiB
    assert bomb.stat().st_size < 2 << 20
    before = maxrss_mib()
    with pytest.raises(LoadLimitError, match=r"declares 256\.0 MiB once inflated .* \(ratio \d+:1, beyond 100:1"):
        load_checkpoint(bomb)
    with pytest.raises(LoadLimitError, match=r"declares 256\.0 MiB once inflated .* more than the load limit of 64\.0 MiB"):
        load_checkpoint(bomb, max_load_bytes=64 << 20)
    assert maxrss_mib() - before < 100   # nothing was inflated
    code, _, err = run(["report", bomb, "--no-probe"], capsys)
    assert code == 2 and "zip bomb" in one_error_line(err)
    # the user can lift the checks for a file they trust
    ckpt = load_checkpoint(bomb, max_load_bytes=None)
    assert ckpt.state_dict["extra.big"].numel() == (256 << 20) // 4


def test_npz_bomb_is_refused_before_inflating(tmp_path, good, capsys):
    bomb = H.npz_bomb(tmp_path / "bomb.npz", 256 << 20, good)
    before = maxrss_mib()
    with pytest.raises(LoadLimitError, match=r"a zip bomb\? If you trust the file, pass max_load_bytes=None"):
        gradscope.load(bomb)
    assert maxrss_mib() - before < 100
    code, _, err = run(["show", bomb], capsys)
    assert code == 2 and "--max-load-bytes none" in one_error_line(err)


def test_file_over_the_limit_is_refused(lstm_pt, good, capsys):
    with pytest.raises(LoadLimitError, match=r"is 3\.\d KiB, more than the load limit of 1\.0 KiB; if you trust"):
        load_checkpoint(lstm_pt, max_load_bytes=1024)
    with pytest.raises(LoadLimitError, match="more than the load limit of 1.0 KiB"):
        gradscope.load(good, max_load_bytes=1024)
    code, _, err = run(["show", good, "--max-load-bytes", "1K"], capsys)
    assert code == 2 and "load limit of 1.0 KiB" in one_error_line(err)
    code, _, err = run(["report", lstm_pt, "--max-load-bytes", "1K"], capsys)
    assert code == 2 and "load limit of 1.0 KiB" in one_error_line(err)
    assert run(["show", good, "--max-load-bytes", "none"], capsys)[0] == 0


@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("512MiB", 512 << 20), ("1e6", 10 ** 6),
                                            ("100", 100), ("off", None)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1", "0", "4X", "", "nan", "1e400"])
def test_parse_size_refuses(text, capsys):
    with pytest.raises(GradscopeError, match=r"--max-load-bytes: expected a size such as 4G, 512M or 1000000"):
        parse_size(text)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "4G", True])
def test_max_load_bytes_keyword_is_checked(bad, good):
    with pytest.raises(GradscopeError, match="max_load_bytes must be a positive number of bytes or None"):
        gradscope.load(good, max_load_bytes=bad)


def test_npy_header_declaring_7_tib_is_refused_without_allocating(tmp_path, good):
    m = H.npz_members(good)
    m["g0.npy"] = H.npy_with_header((7 << 40 >> 3,), "<f8", b"\0" * 64)
    H.write_npz(tmp_path / "lie.npz", m)
    with pytest.raises(RecordingFormatError, match=r"npy header of array 'g0' declares shape \(962072674304,\) "
                                                   r"float64 = 7\.0 TiB, but its member holds 64 bytes"):
        gradscope.load(tmp_path / "lie.npz")


def test_zip_member_larger_than_the_file_is_refused(tmp_path, lstm_pt):
    b = bytearray(lstm_pt.read_bytes())
    cd = b.find(b"PK\x01\x02")
    b[cd + 20:cd + 28] = (0x7FFFFFF0).to_bytes(4, "little") * 2   # compressed and inflated size
    (tmp_path / "lie.pt").write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match=r"declares 2\.0 GiB stored .* does not fit the .* file: its headers lie"):
        load_checkpoint(tmp_path / "lie.pt")


def test_flipped_bytes_in_a_torch_zip_are_refused(tmp_path, lstm_pt, capsys):
    off, _ = H.stored_member_offset(lstm_pt, "data/1")
    (tmp_path / "flip.pt").write_bytes(H.flip_bytes(lstm_pt.read_bytes(), off, 64))
    with pytest.raises(CheckpointError, match=r"zip member '\w+/data/1' is corrupt \(its bytes do not match their "
                                              r"CRC-32 checksum\)"):
        load_checkpoint(tmp_path / "flip.pt")
    code, _, err = run(["report", tmp_path / "flip.pt", "--no-probe"], capsys)
    assert code == 2 and "CRC-32" in one_error_line(err)


def test_torch_zip_without_crcs_still_loads_with_a_note(tmp_path):
    set_crc = getattr(torch.serialization, "set_crc32_options", None)
    if set_crc is None:
        pytest.skip("torch < 2.5 has no set_crc32_options")
    set_crc(False)
    try:
        torch.save(nn.GRU(2, 3).state_dict(), tmp_path / "nocrc.pt")
    finally:
        set_crc(True)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as zf:
        if all(i.CRC for i in zf.infolist() if i.file_size):
            pytest.skip("this torch writes CRCs regardless")
    ckpt = load_checkpoint(tmp_path / "nocrc.pt")
    assert any("carry no CRC-32" in n for n in ckpt.notes)


def test_flipped_bytes_in_a_recording_are_refused(tmp_path, good):
    m = H.npz_members(good)
    H.write_npz(tmp_path / "stored.npz", m, compress=zipfile.ZIP_STORED)
    off, _ = H.stored_member_offset(tmp_path / "stored.npz", "g0.npy")
    (tmp_path / "flip.npz").write_bytes(H.flip_bytes((tmp_path / "stored.npz").read_bytes(), off + 128, 8))
    assert len(gradscope.load(tmp_path / "stored.npz")) == 1
    with pytest.raises(RecordingFormatError, match=r"array 'g0' is corrupt \(its bytes do not match their CRC-32"):
        gradscope.load(tmp_path / "flip.npz")


def test_safetensors_header_that_lies_is_refused(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    save_file({"weight_hh_l0": torch.randn(8, 2), "weight_ih_l0": torch.randn(8, 2)}, tmp_path / "ok.safetensors")
    raw = (tmp_path / "ok.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["weight_hh_l0"]["shape"] = [1 << 38]
    new = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file: its header entry 'weight_hh_l0' "
                                              r".* does not fit its 128 bytes of data"):
        load_checkpoint(tmp_path / "lie.safetensors")
    with pytest.raises(LoadLimitError, match=r"is 280 bytes, more than the load limit of 279 bytes"):
        load_checkpoint(tmp_path / "ok.safetensors", max_load_bytes=279)


# ------------------------------------------------------------------ Recording schema (item 5)

def _meta_case(fn):
    def build(m):
        meta = H.recording_meta(m)
        fn(meta)
        return H.with_meta(m, meta)
    return build


SCHEMA_CASES = [
    ("sites_list", _meta_case(lambda x: x.__setitem__("sites", ["l0"])), r"field sites is a list \(\['l0'\]\), expected an object"),
    ("meta_int", _meta_case(lambda x: x.__setitem__("meta", 5)), r"field meta is a int \(5\), expected an object"),
    ("notes_int", _meta_case(lambda x: x.__setitem__("notes", 5)), r"field notes is a int \(5\), expected a list of strings"),
    ("events_ints", _meta_case(lambda x: x.__setitem__("events", [1])), r"field events\[0\] is a int"),
    ("states_str", _meta_case(lambda x: x["sites"]["l0"].__setitem__("states", "h")), r"field sites\['l0'\]\.states is a str"),
    ("index_missing", _meta_case(lambda x: x["index"]["grads"].append(["l0", "h", "zz"])),
     r"field index\.grads\[1\] is a reference to array 'zz', which the file lacks"),
    ("index_row", _meta_case(lambda x: x["index"].__setitem__("grads", ["abc"])), r"field index\.grads\[0\] is a str"),
    ("measure_meta_list", _meta_case(lambda x: x.__setitem__("measure_meta", {"l0": [1]})), r"field measure_meta\['l0'\] is a list"),
    ("steps_2d", lambda m: {**m, "steps.npy": H.npy_bytes(np.zeros((1, 1), np.int64))},
     r"field steps is an array of shape \[1, 1\], expected 1-D"),
    ("steps_float", lambda m: {**m, "steps.npy": H.npy_bytes(np.zeros(1))}, r"field steps is an array of dtype float64, expected integers"),
    ("grads_negative", lambda m: {**m, "g0.npy": H.npy_bytes(-np.ones((1, 12)))},
     r"field grad norms of 'l0'/'h' \(g0\) is an array with negative values \(min -1\), expected norms"),
    ("grads_1d", lambda m: {**m, "g0.npy": H.npy_bytes(np.ones(12))}, r"grad norms of 'l0'/'h' \(g0\) is an array of shape \[12\], expected 2-D \[S, n\] with S = 1"),
    ("grads_object", lambda m: {**m, "g0.npy": H.npy_bytes(np.array([["a"]], dtype=object))}, r"array 'g0' holds Python objects"),
    ("measure_0d", lambda m: {**m, "m0.npy": H.npy_bytes(np.float64(1.0))}, r"measure 'jacobian_norms' of 'l0' \(m0\) is an array of shape \[\]"),
    ("meta_not_bytes", lambda m: {**m, "__meta__.npy": H.npy_bytes(np.zeros(3))}, r"metadata \(__meta__\) is a float64 array"),
    ("meta_deep_json", lambda m: {**m, "__meta__.npy": H.npy_bytes(np.frombuffer(b"[" * 100000, np.uint8))}, r"metadata is not valid JSON"),
]


@pytest.mark.parametrize("name, build, pattern", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_malformed_recordings_name_the_field(name, build, pattern, tmp_path, good, capsys):
    path = H.write_npz(tmp_path / f"{name}.npz", build(H.npz_members(good)))
    with pytest.raises(RecordingFormatError, match=pattern):
        gradscope.load(path)
    code, _, err = run(["show", path], capsys)
    assert code == 2 and one_error_line(err)


def test_saved_recordings_pass_the_schema(tmp_path):
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    with gradscope.watch(enc, probe_every=1) as scope:
        enc(torch.randn(5, 2, 8)).sum().backward()
    lstm = nn.LSTM(3, 4, bidirectional=True)
    with gradscope.watch(lstm, every=2) as s2:
        for T in (6, 4, 5):
            lstm(torch.randn(T, 2, 3))[0].pow(2).sum().backward()
    for rec in (scope.recording, s2.recording, gradscope.probe(lstm, torch.randn(6, 2, 3))):
        back = gradscope.load(rec.save(tmp_path / "r.npz"))
        assert back.sites == rec.sites and back.measures().keys() == rec.measures().keys()


def test_unreadable_and_non_regular_recordings(tmp_path, good, monkeypatch, capsys):
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(RecordingFormatError, match=r"is not a regular file \(a pipe, device or socket\)"):
        gradscope.load(tmp_path / "fifo.npz")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("gradscope.recording.open", denied, raising=False)
    with pytest.raises(RecordingFormatError, match=r"cannot read .* \(Permission denied\); check its permissions"):
        gradscope.load(good)
    code, _, err = run(["show", good], capsys)
    assert code == 2 and "Permission denied" in one_error_line(err)


# ------------------------------------------------------------------ messages that misled

def test_deeply_nested_checkpoint_says_so(tmp_path):
    nest = cur = {}
    for _ in range(200):
        cur["x"] = {}
        cur = cur["x"]
    torch.save(nest, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match=r"nests containers more than 20 levels deep"):
        load_checkpoint(tmp_path / "deep.pt")
    torch.save({"x": {}}, tmp_path / "shallow.pt")
    with pytest.raises(CheckpointError, match=r"holds no tensors at all"):
        load_checkpoint(tmp_path / "shallow.pt")


def test_protocol_0_pickle_is_a_pickle_not_text(tmp_path, capsys):
    sd = dict(nn.LSTM(2, 3).state_dict())
    with open(tmp_path / "p0.pkl", "wb") as f:
        pickle.dump(sd, f, protocol=0)
    with open(tmp_path / "p0_plain.pkl", "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f, protocol=0)
    with pytest.raises(CheckpointError, match=r"p0_plain.pkl' is a plain pickle \(pickle\.dump\), not a torch\.save file"):
        load_checkpoint(tmp_path / "p0_plain.pkl")
    # pickled tensors are rebuilt by torch.storage._load_from_bytes, which runs torch.load: code
    with pytest.raises(CheckpointError, match=r"p0.pkl': it asks to run code from the file \(torch.storage._load_from_bytes\)"):
        load_checkpoint(tmp_path / "p0.pkl")
    ckpt = load_checkpoint(tmp_path / "p0.pkl", unsafe=True)
    assert ckpt.format == "pickle" and torch.equal(ckpt.state_dict["weight_hh_l0"], sd["weight_hh_l0"])
    (tmp_path / "notes.txt").write_text("(some notes, not a pickle).\n")
    with pytest.raises(CheckpointError, match="is a text file, not a checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")


# ------------------------------------------------------------------ options before work (item 6)

@pytest.mark.parametrize("argv, pattern", [
    (["--k", "0"], r"^gradscope: error: --k must be at least 1, got 0\.$"),
    (["--threshold", "2"], r"^gradscope: error: --threshold must be between 0 and 1 \(exclusive\), e\.g\. 1e-3, got 2\.0\.$"),
    (["--batch", "100000000"], r"--batch must be at most 65536 .*got 100000000\."),
    (["--batch", "1e8"], r"argument --batch: invalid int value: '1e8' \(see 'gradscope report --help'\)$"),
    (["--seq-len", "10000000"], r"--seq-len must be at most 1000000"),
    (["--num-heads", "0"], r"--num-heads must be at least 1, got 0\."),
    (["--max-probe-seconds", "nan"], r"--max-probe-seconds must be a number of seconds >= 0"),
    (["--max-load-bytes", "lots"], r"--max-load-bytes: expected a size such as 4G"),
    (["--inputs", "nowhere.pt"], r"--inputs 'nowhere\.pt': no such file"),
    (["--model-args", "{bad"], r"--model-args is not valid JSON"),
])
def test_options_are_checked_before_the_file_is_read(argv, pattern, tmp_path, capsys):
    # the checkpoint does not even exist: the option must be refused first
    code, _, err = run(["report", tmp_path / "missing.pt", *argv], capsys)
    assert code == 2
    assert re.search(pattern, one_error_line(err)), err


def test_show_checks_threshold_before_loading(tmp_path, capsys):
    code, _, err = run(["show", tmp_path / "missing.npz", "--threshold", "0"], capsys)
    assert code == 2 and "--threshold must be between 0 and 1" in one_error_line(err)


def test_inputs_of_the_wrong_shape(tmp_path, lstm_pt, capsys):
    torch.save(torch.randn(3, 3), tmp_path / "x.pt")
    code, _, err = run(["report", lstm_pt, "--model", "torch.nn:LSTM", "--model-args",
                        '{"input_size": 4, "hidden_size": 8}', "--inputs", tmp_path / "x.pt"], capsys)
    assert code == 2
    assert "(shapes [[3, 3]]) does not fit the model: its forward raised RuntimeError" in one_error_line(err)


def test_inputs_errors_name_the_keyword_and_the_cli_the_flag(tmp_path, lstm_pt, capsys):
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "lin.pt")
    with pytest.raises(InputsError, match=r"cannot make synthetic inputs for this model.*pass inputs= a file") as e:
        report_checkpoint(tmp_path / "lin.pt", model_spec="torch.nn:Linear",
                          model_args={"in_features": 3, "out_features": 2}, progress=False)
    assert e.value.path is None and "--" not in str(e.value)
    code, _, err = run(["report", tmp_path / "lin.pt", "--model", "torch.nn:Linear", "--model-args",
                        '{"in_features": 3, "out_features": 2}'], capsys)
    assert code == 2 and one_error_line(err).endswith("On the command line: --inputs FILE.pt.")
    with pytest.raises(InputsError, match=r"^inputs='.*missing\.pt': no such file") as e:
        report_checkpoint(lstm_pt, model_spec="torch.nn:LSTM", model_args={"input_size": 4, "hidden_size": 8},
                          inputs=tmp_path / "missing.pt", progress=False)
    assert e.value.path == str(tmp_path / "missing.pt")
    for kwargs, pattern in (({"seq_len": 1}, r"^seq_len= must be at least 2, got 1\.$"),
                            ({"batch": 0}, r"^batch= must be at least 1, got 0\.$"),
                            ({"input_scale": -1.0}, r"^input_scale= must be a positive number, got -1\.0\.$")):
        with pytest.raises(GradscopeError, match=pattern):
            report_checkpoint(lstm_pt, progress=False, **kwargs)


def test_probe_estimate_skips_large_modules_with_a_note(tmp_path, capsys):
    assert estimate_probe_seconds(nn.LSTM(8, 32), 100, 8) < 0.1
    assert estimate_probe_seconds(nn.RNN(8, 4096), 100, 8) > 3600
    assert estimate_probe_seconds(nn.LSTM(8, 64, num_layers=2, bidirectional=True), 100, 8) == pytest.approx(
        4 * estimate_probe_seconds(nn.LSTM(8, 64), 100, 8))
    model = nn.ModuleDict({"small": nn.GRU(3, 8), "big": nn.LSTM(3, 64)})
    torch.save(model.state_dict(), tmp_path / "two.pt")
    budget = estimate_probe_seconds(nn.LSTM(3, 64), 30, 8) / 2     # the big one does not fit, the small one does
    code, out, _ = run(["report", tmp_path / "two.pt", "--seq-len", "30", "--max-probe-seconds", budget], capsys)
    assert code == 0
    assert "probe skipped for LSTM 'big' (size 64): estimated ~0 s at --seq-len 30, --batch 8" in out
    assert "small.l0" in out.split("probe skipped")[0]       # the small GRU was still probed
    code, out, _ = run(["report", tmp_path / "two.pt", "--seq-len", "30", "--max-probe-seconds", "0"], capsys)
    assert code == 0 and "probe skipped" not in out
    # the library's report advises its own keyword arguments, not the command's flags
    rep = report_checkpoint(tmp_path / "two.pt", seq_len=30, max_probe_seconds=budget, progress=False,
                            inputs=tmp_path / "two.pt")
    skipped = [n for n in rep.all_notes if n.startswith("probe skipped")]
    assert len(skipped) == 1 and "estimated ~0 s at seq_len=30, batch=8, beyond max_probe_seconds=" in skipped[0]
    assert "Probe it with a shorter seq_len=, or raise max_probe_seconds= (0: no limit)." in skipped[0]
    assert "inputs= is used with model_spec= only; rebuilt modules get synthetic inputs." in rep.all_notes
    assert "--" not in rep.to_text() and "--" not in rep.to_json()


def test_large_recurrent_weights_get_iterative_spectra():
    from gradscope.checkpoint.static import _spectrum
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((1100, 1100)))
    m = q * np.linspace(0.1, 2.0, 1100)            # singular values known exactly: 2.0, 1.998…, …
    got = _spectrum(m)
    exact = np.sort(np.linspace(0.1, 2.0, 1100))[::-1][:16]
    np.testing.assert_allclose(got["singular_values"], exact, rtol=1e-6)
    np.testing.assert_allclose(got["spectral_radius"], np.abs(np.linalg.eigvals(m)).max(), rtol=1e-6)
