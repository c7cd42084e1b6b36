"""Tests of gradscope.checkpoint: safe loading, finding the state dict, rebuilding modules from
keys and shapes, the user's model spec, and static weight analysis."""
from __future__ import annotations

import importlib
import io
import json
import math
import os
import pickle
import shlex
import sys
import uuid
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradscope.checkpoint import (
    Checkpoint,
    FoundModule,
    build_user_model,
    find_modules,
    load_checkpoint,
    memory_time,
    static_analysis,
)
from gradscope.errors import CheckpointError, GradscopeError, ModelSpecError, PlainPickleError, UnsafeCheckpointError

safetensors_torch = pytest.importorskip("safetensors.torch")

T, B = 5, 2


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Problems as data: recurrent modules and their inputs

def _recurrent_cases():
    cases = []
    for kind in ("LSTM", "GRU", "RNN"):
        for layers in (1, 2, 3):
            for bidirectional in (False, True):
                for bias in (True, False):
                    projs = (0, 2) if kind == "LSTM" else (0,)
                    for proj in projs:
                        kw = dict(num_layers=layers, bidirectional=bidirectional, bias=bias)
                        if proj:
                            kw["proj_size"] = proj
                        cases.append(dict(
                            id=f"{kind}-L{layers}-{'bi' if bidirectional else 'uni'}-"
                               f"{'bias' if bias else 'nobias'}" + (f"-proj{proj}" if proj else ""),
                            module_fn=lambda kind=kind, kw=kw: getattr(nn, kind)(3, 4, **kw),
                            input_fn=lambda: torch.randn(T, B, 3),
                            seed=len(cases)))
    cases.append(dict(id="RNN-relu", module_fn=lambda: nn.RNN(3, 4, num_layers=2, nonlinearity="relu"),
                      input_fn=lambda: torch.randn(T, B, 3), seed=99, nonlinearity="relu"))
    cases.append(dict(id="LSTM-float64", module_fn=lambda: nn.LSTM(3, 4, dtype=torch.float64),
                      input_fn=lambda: torch.randn(T, B, 3, dtype=torch.float64), seed=98))
    return cases


CELL_CASES = [
    dict(id=f"{k}-{'bias' if b else 'nobias'}", module_fn=lambda k=k, b=b: getattr(nn, k)(3, 5, bias=b),
         input_fn=lambda: torch.randn(B, 3), seed=i)
    for i, (k, b) in enumerate((k, b) for k in ("LSTMCell", "GRUCell", "RNNCell") for b in (True, False))
]

MHA_CASES = [
    dict(id="mha-16", module_fn=lambda: nn.MultiheadAttention(16, 2), E=16),
    dict(id="mha-nobias", module_fn=lambda: nn.MultiheadAttention(16, 2, bias=False), E=16),
    dict(id="mha-bias-kv", module_fn=lambda: nn.MultiheadAttention(16, 2, add_bias_kv=True), E=16),
    dict(id="mha-kdim-vdim", module_fn=lambda: nn.MultiheadAttention(16, 2, kdim=6, vdim=7), E=16, kdim=6, vdim=7),
    dict(id="mha-12-one-head", module_fn=lambda: nn.MultiheadAttention(12, 1), E=12),
]

WRAPPERS = {
    "bare": lambda sd: sd,
    "epoch+state_dict": lambda sd: {"epoch": 7, "state_dict": sd, "vocab": ["a", "b"]},
    "model.state_dict": lambda sd: {"model": {"state_dict": sd}, "step": 10},
    "ddp-prefix": lambda sd: {"model_state_dict": {"module." + k: v for k, v in sd.items()}},
}
SOURCE = {"bare": "checkpoint", "epoch+state_dict": "checkpoint['state_dict']",
          "model.state_dict": "checkpoint['model']['state_dict']", "ddp-prefix": "checkpoint['model_state_dict']"}


def _save(obj, path):
    torch.save(obj, str(path))
    return path


def _run(module, x, kind):
    """Outputs as a flat tuple of tensors."""
    with torch.no_grad():
        if kind == "MultiheadAttention":
            q, k, v = x
            out, weights = module(q, k, v)
            return (out, weights)
        out = module(x)
    if isinstance(out, tuple):
        flat = []
        for o in out:
            flat.extend(o if isinstance(o, tuple) else (o,))
        return tuple(flat)
    return (out,)


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("case", _recurrent_cases(), ids=lambda c: c["id"])
def test_recurrent_round_trip_is_bitwise(case, wrapper, tmp_path):
    torch.manual_seed(case["seed"])
    module = case["module_fn"]()
    path = _save(WRAPPERS[wrapper](module.state_dict()), tmp_path / "m.pt")
    ckpt = load_checkpoint(path)
    assert ckpt.source_key == SOURCE[wrapper]
    assert ckpt.stripped_prefix == ("module." if wrapper == "ddp-prefix" else "")
    found = find_modules(ckpt.state_dict, rnn_nonlinearity=case.get("nonlinearity", "tanh"))
    assert len(found) == 1 and found[0].prefix == ""
    assert found[0].kind == type(module).__name__
    rebuilt = found[0].build()
    assert type(rebuilt) is type(module)
    x = case["input_fn"]()
    _assert_bitwise(_run(rebuilt, x, found[0].kind), _run(module, x, found[0].kind))
    cfg = found[0].config
    assert (cfg["num_layers"], cfg["bidirectional"], cfg["bias"], cfg["hidden_size"], cfg["input_size"]) == (
        module.num_layers, module.bidirectional, module.bias, module.hidden_size, module.input_size)
    assert cfg.get("proj_size", 0) == getattr(module, "proj_size", 0)


@pytest.mark.parametrize("case", CELL_CASES, ids=lambda c: c["id"])
def test_cell_round_trip_is_bitwise(case, tmp_path):
    torch.manual_seed(case["seed"])
    module = case["module_fn"]()
    ckpt = load_checkpoint(_save({"net": module.state_dict()}, tmp_path / "cell.pth"))
    (found,) = find_modules(ckpt.state_dict)
    assert found.kind == type(module).__name__
    assert found.sites == [""]
    x = case["input_fn"]()
    _assert_bitwise(_run(found.build(), x, found.kind), _run(module, x, found.kind))


@pytest.mark.parametrize("case", MHA_CASES, ids=lambda c: c["id"])
def test_attention_round_trip_is_bitwise(case, tmp_path):
    torch.manual_seed(0)
    module = case["module_fn"]()
    ckpt = load_checkpoint(_save(module.state_dict(), tmp_path / "mha.pt"))
    (found,) = find_modules(ckpt.state_dict, num_heads=module.num_heads)
    assert found.kind == "MultiheadAttention"
    assert found.config["embed_dim"] == case["E"]
    assert (found.config["kdim"], found.config["vdim"]) == (case.get("kdim", case["E"]), case.get("vdim", case["E"]))
    x = (torch.randn(4, B, case["E"]), torch.randn(6, B, case.get("kdim", case["E"])),
         torch.randn(6, B, case.get("vdim", case["E"])))
    _assert_bitwise(_run(found.build(), x, found.kind), _run(module, x, found.kind))


def test_attention_num_heads_default_is_noted():
    (found,) = find_modules(nn.MultiheadAttention(64, 4).state_dict())
    assert found.config["num_heads"] == 8
    assert any("num_heads cannot be told from weights; assumed 8" in n for n in found.notes)
    assert found.build(num_heads=4).num_heads == 4


def test_rnn_nonlinearity_is_a_noted_guess():
    relu = nn.RNN(3, 4, nonlinearity="relu")
    (found,) = find_modules(relu.state_dict())
    assert found.config["nonlinearity"] == "tanh"
    assert found.notes[0] == ("RNN nonlinearity tanh vs relu cannot be told from weights; assumed tanh "
                              "(change with rnn_nonlinearity='relu')")
    assert found.build(nonlinearity="relu").nonlinearity == "relu"
    with pytest.raises(CheckpointError, match="rnn_nonlinearity must be 'tanh' or 'relu'"):
        find_modules(relu.state_dict(), rnn_nonlinearity="sigmoid")


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.encoder = nn.ModuleDict({"lstm": nn.LSTM(3, 4, num_layers=2, bidirectional=True)})
        self.bridge = nn.Linear(8, 4)
        self.decoder = nn.GRU(4, 5, batch_first=True)
        self.cell = nn.LSTMCell(5, 6)
        self.attn = nn.TransformerEncoderLayer(16, 2, dim_feedforward=8)
        self.heads = nn.ModuleList([nn.RNN(5, 2), nn.RNN(2, 2, bias=False)])


def test_nested_model_finds_every_module_and_rebuilds_each(tmp_path):
    torch.manual_seed(1)
    model = Seq2Seq().eval()  # eval: the transformer layer's attention has dropout 0.1
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # torch.compile prefix
    ckpt = load_checkpoint(_save({"epoch": 2, "model": {"state_dict": sd}}, tmp_path / "s2s.ckpt"))
    assert ckpt.stripped_prefix == "_orig_mod."
    found = find_modules(ckpt.state_dict)
    assert [(f.prefix, f.kind) for f in found] == [
        ("encoder.lstm", "LSTM"), ("decoder", "GRU"), ("cell", "LSTMCell"),
        ("attn.self_attn", "MultiheadAttention"), ("heads.0", "RNN"), ("heads.1", "RNN")]
    assert found[0].sites == ["encoder.lstm.l0", "encoder.lstm.l0_reverse",
                              "encoder.lstm.l1", "encoder.lstm.l1_reverse"]
    assert found[0].keys["weight_hh_l1_reverse"] == "encoder.lstm.weight_hh_l1_reverse"
    originals = {"encoder.lstm": model.encoder["lstm"], "decoder": model.decoder, "cell": model.cell,
                 "attn.self_attn": model.attn.self_attn, "heads.0": model.heads[0], "heads.1": model.heads[1]}
    inputs = {"encoder.lstm": torch.randn(T, B, 3), "decoder": torch.randn(T, B, 4), "cell": torch.randn(B, 5),
              "attn.self_attn": (torch.randn(T, B, 16),) * 3, "heads.0": torch.randn(T, B, 5),
              "heads.1": torch.randn(T, B, 2)}
    # batch_first cannot be told from weights (noted); the decoder was built batch-first.
    assert "batch_first cannot be told from weights; assumed False" in found[1].notes
    overrides = {"decoder": {"batch_first": True}}
    for f in found:
        rebuilt = f.build(**overrides.get(f.prefix, {})).eval()
        _assert_bitwise(_run(rebuilt, inputs[f.prefix], f.kind), _run(originals[f.prefix], inputs[f.prefix], f.kind))


def test_custom_module_with_recurrent_names_is_skipped():
    sd = nn.LSTM(3, 4).state_dict()
    sd["gain"] = torch.ones(4)          # a custom module at the root: not an nn.LSTM
    sd["cell.weight_ih"] = torch.randn(4, 3)
    sd["cell.weight_hh"] = torch.randn(4, 4)
    sd["cell.sub.scale"] = torch.ones(1)  # cell has a child: not an nn.RNNCell
    assert find_modules(sd) == []


# ---------------------------------------------------------------------------------------------
# Finding the state dict and the metadata

def test_metadata_is_summarised_and_json_able(tmp_path):
    model = nn.LSTM(3, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(T, B, 3))[0].sum().backward()
    opt.step()
    ckpt = load_checkpoint(_save({
        "epoch": 12, "best": torch.tensor(0.25), "vocab": ["<pad>", "a"], "lr": 1e-3,
        "embedding": torch.zeros(10, 3), "optimizer": opt.state_dict(), "config": {"hidden": 4, "tag": None},
        "model_state_dict": model.state_dict()}, tmp_path / "full.pt"))
    assert ckpt.source_key == "checkpoint['model_state_dict']"
    assert ckpt.format == "torch-zip"
    n_opt = 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq per parameter
    assert ckpt.metadata == {
        "epoch": 12, "best": 0.25, "vocab": ["<pad>", "a"], "lr": 1e-3,
        "embedding": "tensor float32 [10, 3]", "optimizer": f"optimizer state ({n_opt} tensors)",
        "config": {"hidden": 4, "tag": None}}
    json.dumps(ckpt.metadata)
    assert ckpt.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["state_dict", "model_state_dict", "model", "net", "module"])
def test_each_usual_entry_name_is_found(name, tmp_path):
    sd = nn.GRU(2, 3).state_dict()
    ckpt = load_checkpoint(_save({name: sd, "epoch": 1}, tmp_path / "c.pt"))
    assert ckpt.source_key == f"checkpoint[{name!r}]"
    assert ckpt.metadata == {"epoch": 1}
    assert ckpt.state_dict.keys() == sd.keys()


def test_nested_one_level_under_any_entry_keeps_siblings_in_metadata(tmp_path):
    sd = nn.GRU(2, 3).state_dict()
    ckpt = load_checkpoint(_save({"checkpoint": {"net": sd, "arch": "gru"}, "epoch": 1}, tmp_path / "c.pt"))
    assert ckpt.source_key == "checkpoint['checkpoint']['net']"
    assert ckpt.metadata == {"checkpoint": {"arch": "gru"}, "epoch": 1}


def test_prefixes_stripped_only_when_every_key_has_them(tmp_path):
    sd = nn.GRU(2, 3).state_dict()
    both = {"module._orig_mod." + k: v for k, v in sd.items()}
    ckpt = load_checkpoint(_save(both, tmp_path / "a.pt"))
    assert ckpt.stripped_prefix == "module._orig_mod." and ckpt.state_dict.keys() == sd.keys()
    partial = {("module." + k if i else k): v for i, (k, v) in enumerate(sd.items())}
    ckpt = load_checkpoint(_save(partial, tmp_path / "b.pt"))
    assert ckpt.stripped_prefix == "" and ckpt.state_dict.keys() == partial.keys()


def test_several_state_dicts_are_merged_under_their_names(tmp_path):
    enc, dec = nn.LSTM(2, 3), nn.GRU(3, 4)
    ckpt = load_checkpoint(_save({"encoder": enc.state_dict(), "decoder": dec.state_dict(),
                                  "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "ed.pt"))
    assert ckpt.source_key == "checkpoint['encoder'] + checkpoint['decoder']"
    assert [(f.prefix, f.kind) for f in find_modules(ckpt.state_dict)] == [("encoder", "LSTM"), ("decoder", "GRU")]
    assert ckpt.metadata == {"optimizer": "optimizer state (0 tensors)"}


def test_list_checkpoint_and_flat_mixed_mapping(tmp_path):
    sd = nn.GRU(2, 3).state_dict()
    ckpt = load_checkpoint(_save([sd, {"epoch": 3}], tmp_path / "l.pt"))
    assert ckpt.source_key == "checkpoint[0]" and ckpt.metadata == {"1": {"epoch": 3}}
    ckpt = load_checkpoint(_save({**sd, "epoch": 3}, tmp_path / "f.pt"))
    assert ckpt.source_key == "checkpoint (its tensor entries)" and ckpt.state_dict.keys() == sd.keys()


def test_no_tensors_and_lone_tensor_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="holds no tensors at all") as e:
        load_checkpoint(_save({"epoch": 3, "vocab": ["a"]}, tmp_path / "none.pt"))
    _one_line(e)
    with pytest.raises(CheckpointError, match=r"single tensor \[3, 4\], not a state dict"):
        load_checkpoint(_save(torch.zeros(3, 4), tmp_path / "t.pt"))
    with pytest.raises(CheckpointError, match="found 2 tensors but no state dict"):
        load_checkpoint(_save([[torch.zeros(1), torch.zeros(2)]], tmp_path / "odd.pt"))


def test_other_formats_load(tmp_path):
    sd = nn.LSTM(2, 3).state_dict()
    torch.save({"state_dict": sd}, str(tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt").format == "torch-legacy"
    safetensors_torch.save_file(sd, str(tmp_path / "m.safetensors"), metadata={"arch": "lstm"})
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.format == "safetensors" and ckpt.source_key == "checkpoint"
    assert ckpt.metadata == {"safetensors_metadata": {"arch": "lstm"}}
    assert all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)
    # Unknown suffixes are sniffed from the content.
    torch.save(sd, str(tmp_path / "weights.data"))
    assert load_checkpoint(str(tmp_path / "weights.data")).format == "torch-zip"
    os.replace(tmp_path / "m.safetensors", tmp_path / "m.bin")
    assert load_checkpoint(tmp_path / "m.bin").format == "safetensors"


# ---------------------------------------------------------------------------------------------
# Refusing code from the file

class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class _EvalPayload:
    """Creates the marker and then returns a real state dict, so an unsafe load succeeds."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        code = (f"(open({self.marker!r}, 'w').close(), "
                f"{{'weight_hh_l0': __import__('torch').zeros(4, 4), 'weight_ih_l0': __import__('torch').zeros(4, 2)}})[1]")
        return (eval, (code,))


def test_torch_save_payload_is_refused_and_runs_only_with_unsafe(tmp_path):
    marker = tmp_path / "pwned"
    path = _save({"state_dict": nn.RNN(2, 4).state_dict(), "evil": _SystemPayload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|nt\.system") as e:
        load_checkpoint(path)
    msg = _one_line(e)
    assert "unsafe=True" in msg and "--" not in msg and e.value.loadable   # the CLI adds --unsafe-load
    assert not marker.exists()
    ckpt = load_checkpoint(path, unsafe=True)
    assert marker.exists()
    assert ckpt.unsafe and ckpt.metadata == {"evil": 0}
    assert find_modules(ckpt.state_dict)[0].kind == "RNN"


def test_raw_pickle_payload_is_refused_and_runs_only_with_unsafe(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_EvalPayload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"it asks to run code from the file \(builtins\.eval\)") as e:
        load_checkpoint(path)
    _one_line(e)
    assert not marker.exists()
    ckpt = load_checkpoint(path, unsafe=True)
    assert marker.exists()
    assert ckpt.format == "pickle" and sorted(ckpt.state_dict) == ["weight_hh_l0", "weight_ih_l0"]


def test_whole_pickled_module_needs_unsafe_then_gives_its_state_dict(tmp_path):
    lstm = nn.LSTM(2, 3)
    path = _save({"model": lstm, "epoch": 4}, tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.rnn\.LSTM"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, unsafe=True)
    assert ckpt.source_key == "checkpoint['model'].state_dict()" and ckpt.metadata == {"epoch": 4}
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in lstm.state_dict().items())


def test_plain_pickle_without_code_is_explained(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"epoch": 1}, protocol=2))
    with pytest.raises(CheckpointError, match=r"is a plain pickle \(pickle\.dump\), not a torch\.save file") as e:
        load_checkpoint(path)
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert isinstance(e.value, PlainPickleError) and "--" not in str(e.value)   # the CLI adds --unsafe-load


# ---------------------------------------------------------------------------------------------
# Bad input: one-line CheckpointError naming problem and fix

def _valid_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"epoch": 1, "state_dict": nn.LSTM(2, 3).state_dict()}, buf)
    return buf.getvalue()


def test_bad_inputs(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(_valid_bytes())
    cases = {
        "missing": (tmp_path / "run" / "modle.pt", r"no checkpoint file at .*modle\.pt.*check the path\. Did you mean 'model\.pt'\?"),
        "missing-folder": (tmp_path / "nope" / "x.pt", r"its folder .* does not exist either"),
        "directory": (tmp_path / "run", r"is a directory \(it holds model\.pt\); pass the checkpoint file itself, e\.g\. '.*model\.pt'"),
    }
    data = _valid_bytes()
    files = {
        "empty.pt": (b"", r"is empty \(0 bytes\).*re-save or re-download"),
        "trunc.pt": (data[: len(data) // 2], r"truncated or corrupt zip archive.*re-save or re-download"),
        "random.pt": (bytes(range(7, 250)) * 3, r"not a recognised checkpoint \(expected torch\.save zip, pickle or safetensors"),
        "config.json": (b'{"hidden_size": 64}\n', r"is a JSON file, not a checkpoint \(a config\?\); pass the weights file"),
        "notes.pt": (b"trained for 3 epochs\n", r"is a text file, not a checkpoint"),
        "bad.safetensors": (b"\xff" * 64, r"is not a readable safetensors file \(SafetensorError.*re-save it with safetensors"),
        "cut.safetensors": (None, r"is not a readable safetensors file"),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    files["other.zip"] = (buf.getvalue(), r"is a zip archive but not one written by torch\.save")
    safetensors_torch.save_file({"w": torch.zeros(8)}, str(tmp_path / "ok.safetensors"))
    st_bytes = (tmp_path / "ok.safetensors").read_bytes()
    files["cut.safetensors"] = (st_bytes[:-5], files["cut.safetensors"][1])
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
        cases[name] = (tmp_path / name, files[name][1])
    for label, (path, pattern) in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_checkpoint(path)
        _one_line(e)
        assert type(e.value) is CheckpointError, label


def test_missing_safetensors_names_the_install_line(tmp_path, monkeypatch):
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r'run: pip install "gradscope\[ckpt\]"$') as e:
        load_checkpoint(tmp_path / "m.safetensors")
    _one_line(e)


def test_errors_are_gradscope_errors():
    assert issubclass(UnsafeCheckpointError, CheckpointError)
    assert issubclass(ModelSpecError, CheckpointError) and issubclass(CheckpointError, GradscopeError)


# Fuzzing: only CheckpointError may escape, from loading and from everything downstream of it.

_VALID = _valid_bytes()
_buf = io.BytesIO()
torch.save(nn.LSTM(2, 3, proj_size=1).state_dict(), _buf, _use_new_zipfile_serialization=False)
_VALID_LEGACY = _buf.getvalue()
_VALID_ST = safetensors_torch.save(nn.GRU(2, 3).state_dict())


@st.composite
def _mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _load_and_analyse(path):
    try:
        ckpt = load_checkpoint(path)
        assert isinstance(ckpt, Checkpoint)
        json.dumps(ckpt.metadata)
        for found in find_modules(ckpt.state_dict):
            static_analysis(found, ckpt.state_dict)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


_FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".pt", ".safetensors", ".bin", ".ckpt", ""]))
def test_fuzz_random_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(data)
    _load_and_analyse(path)


@_FUZZ
@given(data=st.one_of(_mutated(_VALID), _mutated(_VALID_LEGACY)))
def test_fuzz_mutated_torch_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "m.pt"
    path.write_bytes(data)
    _load_and_analyse(path)


@_FUZZ
@given(data=_mutated(_VALID_ST))
def test_fuzz_mutated_safetensors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(data)
    _load_and_analyse(path)


# ---------------------------------------------------------------------------------------------
# Inconsistent keys and shapes

def _sd(module):
    return dict(module.state_dict())


def _without(sd, *keys):
    return {k: v for k, v in sd.items() if k not in keys}


INCONSISTENT = [
    ("missing-layer", lambda: _without(_sd(nn.LSTM(3, 4, num_layers=3)), "weight_ih_l1", "weight_hh_l1",
                                       "bias_ih_l1", "bias_hh_l1"),
     r"layer 1 is missing at the top level: found weights for layers \[0, 2\] but no 'weight_ih_l1'"),
    ("missing-reverse", lambda: {k: v for k, v in _sd(nn.GRU(3, 4, num_layers=2, bidirectional=True)).items()
                                 if not k.endswith("l1_reverse")},
     r"'weight_ih_l1_reverse' is missing: layers \[0\] have reverse-direction weights"),
    ("layer-input", lambda: {**_sd(nn.LSTM(3, 4, num_layers=2)), "weight_ih_l1": torch.zeros(16, 5)},
     r"'weight_ih_l1' has shape \[16, 5\], expected \[16, 4\] \(G·H rows and layer 0's output \(4 features × 1 directions\)\)"),
    ("layer-input-bidir", lambda: {**_sd(nn.GRU(3, 4, num_layers=2, bidirectional=True)), "weight_ih_l1": torch.zeros(12, 4)},
     r"'weight_ih_l1' has shape \[12, 4\], expected \[12, 8\]"),
    ("gate-ratio", lambda: {"weight_ih_l0": torch.zeros(8, 3), "weight_hh_l0": torch.zeros(8, 4)},
     r"'weight_hh_l0' has shape \[8, 4\]: rows / columns = 2, expected 1 \(RNN\), 3 \(GRU\) or 4 \(LSTM\)"),
    ("missing-hh", lambda: _without(_sd(nn.RNN(3, 4)), "weight_hh_l0"), r"'weight_hh_l0' is missing at the top level"),
    ("one-bias", lambda: _without(_sd(nn.RNN(3, 4)), "bias_hh_l0"),
     r"'bias_hh_l0' is missing while 'bias_ih_l0' is present"),
    ("bias-per-layer", lambda: _without(_sd(nn.RNN(3, 4, num_layers=2)), "bias_hh_l1", "bias_ih_l1"),
     r"disagree on having biases"),
    ("proj-shape", lambda: {**_sd(nn.LSTM(3, 4, proj_size=2)), "weight_hr_l0": torch.zeros(2, 5)},
     r"'weight_hh_l0' has shape \[16, 2\] but with 'weight_hr_l0' of shape \[2, 5\] an LSTM needs"),
    ("not-2d", lambda: {**_sd(nn.RNN(3, 4)), "weight_ih_l0": torch.zeros(4, 3, 1)},
     r"'weight_ih_l0' has shape \[4, 3, 1\], expected a 2-D tensor"),
    ("bias-shape", lambda: {**_sd(nn.GRU(3, 4)), "bias_ih_l0": torch.zeros(11)},
     r"'bias_ih_l0' has shape \[11\], expected \[12\]"),
    ("cell-no-hh", lambda: {"rnn.cell.weight_ih": torch.zeros(4, 3)}, r"'rnn.cell.weight_hh' is missing"),
    ("cell-rows", lambda: {"weight_ih": torch.zeros(8, 3), "weight_hh": torch.zeros(12, 4)},
     r"'weight_ih' has shape \[8, 3\], expected 12 rows"),
    ("mha-in-proj", lambda: {**_sd(nn.MultiheadAttention(8, 1)), "in_proj_weight": torch.zeros(20, 8)},
     r"'in_proj_weight' has shape \[20, 8\], expected \[24, 8\]"),
    ("mha-one-bias", lambda: _without(_sd(nn.MultiheadAttention(8, 1)), "out_proj.bias"),
     r"only one of in_proj_bias / out_proj.bias is present"),
]


@pytest.mark.parametrize("name,sd_fn,pattern", INCONSISTENT, ids=[c[0] for c in INCONSISTENT])
def test_inconsistent_shapes_are_named(name, sd_fn, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        find_modules(sd_fn())
    _one_line(e)


def test_nested_prefix_is_named_in_errors():
    sd = {"enc.rnn." + k: v for k, v in _without(_sd(nn.RNN(3, 4, num_layers=3)), "weight_ih_l1",
                                                 "weight_hh_l1", "bias_ih_l1", "bias_hh_l1").items()}
    with pytest.raises(CheckpointError, match=r"under 'enc.rnn'.*'enc.rnn.weight_ih_l1'"):
        find_modules(sd)


def test_num_heads_must_divide():
    with pytest.raises(CheckpointError, match="num_heads 3 does not divide embed_dim 16"):
        find_modules(nn.MultiheadAttention(16, 2).state_dict(), num_heads=3)


def test_bad_override_in_build_is_a_checkpoint_error():
    (found,) = find_modules(nn.LSTM(3, 4).state_dict())
    with pytest.raises(CheckpointError, match=r"do not fit nn.LSTM.*fix the overrides"):
        found.build(hidden_size=5)


# ---------------------------------------------------------------------------------------------
# build_user_model

USER_MODULE = '''
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.rnn = nn.GRU(3, hidden)
        self.out = nn.Linear(hidden, 1)

def make_model(hidden=4):
    return Model(hidden)

def make_wrapped(hidden=4):
    m = nn.Module()
    m.inner = Model(hidden)
    return m

def not_a_model():
    return 42

def boom():
    raise ValueError("no GPU here")

def give_class():
    return Model

HIDDEN = 4
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"gs_user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_build_user_model_loads_strictly(user_module):
    ref = importlib.import_module(user_module).Model(hidden=6)
    model = build_user_model(f"{user_module}:make_model", {"hidden": 6}, ref.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.state_dict().items())
    model = build_user_model(f"{user_module}:Model", '{"hidden": 6}', ref.state_dict())
    assert type(model).__name__ == "Model"


def test_build_user_model_errors(user_module):
    ref = importlib.import_module(user_module).Model()
    sd = ref.state_dict()
    cases = [
        ("no_colon.module", None, sd, r"a model spec is 'package.module:factory_or_class', got 'no_colon.module'"),
        (f"{user_module[:-1]}:make_model", None, sd, rf"no module named '{user_module[:-1]}'.*Did you mean '{user_module}'\?"),
        ("json:nothing", None, sd, r"'json' has no attribute 'nothing'"),
        (f"{user_module}:make_modle", None, sd, r"has no attribute 'make_modle'.*Did you mean 'make_model'\?"),
        (f"{user_module}.py:make_model", None, sd, rf"names a file; give the module's import name instead, e\.g\. '{user_module}:make_model'"),
        (f"{user_module}:HIDDEN", None, sd, r"is a int, not callable; the spec must name a class or a function"),
        (f"{user_module}:not_a_model", None, sd, r"returned a int, expected an nn.Module"),
        (f"{user_module}:give_class", None, sd, r"returned the class Model, not an instance"),
        (f"{user_module}:boom", None, sd, r"raised ValueError: no GPU here; check the model arguments"),
        (f"{user_module}:make_model", {"hiden": 4}, sd, r"raised TypeError: .*unexpected keyword argument 'hiden'"),
        (f"{user_module}:make_model", "{hidden: 4}", sd, r"model_args is not valid JSON"),
        (f"{user_module}:make_model", "[4]", sd, r"model_args must be a JSON object of keyword arguments, got list"),
        (f"{user_module}:make_model", {"hidden": 5}, sd,
         r"does not fit .*: shape mismatches \(5\): rnn.weight_ih_l0 checkpoint \[12, 3\] vs model \[15, 3\]"),
        (f"{user_module}:make_model", None, {**sd, "extra.w": torch.zeros(1)}, r"unexpected keys \(1\): extra.w;"),
        (f"{user_module}:make_model", None, {k: v for k, v in sd.items() if not k.startswith("out.")},
         r"missing keys \(2\): out.weight, out.bias; check the model arguments"),
        (f"{user_module}:make_wrapped", None, sd,
         r"missing keys \(6\): inner.rnn.weight_ih_l0, inner.rnn.weight_hh_l0, inner.rnn.bias_ih_l0, "
         r"inner.rnn.bias_hh_l0, … \(2 more\); unexpected keys \(6\).*prefix 'inner.' the checkpoint lacks"),
        (f"{user_module}:make_model", None, {"enc." + k: v for k, v in sd.items()},
         r"every checkpoint key carries an extra prefix 'enc.' the model lacks"),
    ]
    for spec, args, state, pattern in cases:
        with pytest.raises(ModelSpecError, match=pattern) as e:
            build_user_model(spec, args, state)
        _one_line(e)
        assert "--" not in str(e.value), "library messages name no CLI flags; the CLI adds them"
        assert e.value.spec == (None if isinstance(args, str) else spec)


def test_missing_submodule_suggests_sibling(tmp_path, monkeypatch):
    pkg = f"gs_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "models.py").write_text("def f():\n    return 1\n")
    (tmp_path / pkg / "broken.py").write_text("import gs_not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSpecError, match=rf"no module named '{pkg}.model'.*Did you mean 'models'\?"):
        build_user_model(f"{pkg}.model:f", None, {})
    with pytest.raises(ModelSpecError, match=r"it imports 'gs_not_installed_dependency', which is not installed"):
        build_user_model(f"{pkg}.broken:f", None, {})
    for m in [k for k in sys.modules if k.startswith(pkg)]:
        sys.modules.pop(m)


# ---------------------------------------------------------------------------------------------
# Static analysis against exact answers

def _orthogonal(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def test_scaled_orthogonal_rnn_has_exact_spectral_norm():
    rnn = nn.RNN(3, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    scales = {"weight_hh_l0": 0.9, "weight_hh_l0_reverse": 1.1, "weight_hh_l1": 0.5, "weight_hh_l1_reverse": 2.0}
    with torch.no_grad():
        for i, (name, s) in enumerate(scales.items()):
            getattr(rnn, name).copy_(s * _orthogonal(6, i))
    sd = {"encoder.rnn." + k: v for k, v in rnn.state_dict().items()}
    (found,) = find_modules(sd)
    rows = static_analysis(found, sd)
    assert [r["site"] for r in rows] == ["encoder.rnn.l0", "encoder.rnn.l0_reverse",
                                         "encoder.rnn.l1", "encoder.rnn.l1_reverse"]
    assert [(r["layer"], r["direction"]) for r in rows] == [(0, "forward"), (0, "reverse"), (1, "forward"), (1, "reverse")]
    for row, s in zip(rows, scales.values()):
        gate = row["gates"]["h"]
        assert gate["spectral_norm"] == pytest.approx(s, rel=1e-12)
        assert gate["spectral_radius"] == pytest.approx(s, rel=1e-12)
        assert gate["singular_values"] == pytest.approx([s] * 6, rel=1e-12)
        assert row["recurrent_map"] == "W_hh[gate]" and "memory_time" not in row
    json.dumps(rows)


def test_lstm_gate_blocks_and_forget_memory_time():
    lstm = nn.LSTM(2, 5, dtype=torch.float64)
    with torch.no_grad():
        lstm.weight_hh_l0.copy_(torch.cat([s * _orthogonal(5, i) for i, s in enumerate((0.5, 1.0, 1.5, 2.0))]))
    rows = []
    for b in (0.0, 1.0, 2.0, 3.0):
        with torch.no_grad():
            lstm.bias_ih_l0.zero_()
            lstm.bias_hh_l0.zero_()
            lstm.bias_ih_l0[5:10] = b / 2      # the forget bias is split over both vectors
            lstm.bias_hh_l0[5:10] = b / 2
        rows.append(static_analysis(find_modules(lstm.state_dict())[0])[0])
    for s, g in zip((0.5, 1.0, 1.5, 2.0), "ifgo"):
        assert rows[0]["gates"][g]["spectral_norm"] == pytest.approx(s, rel=1e-12)
    # SCIENCE.md: b_f = 0 -> 1.4 steps, 1 -> 3.2, 2 -> 7.9, 3 -> 20.6
    assert [round(r["memory_time"], 1) for r in rows] == [1.4, 3.2, 7.9, 20.6]
    assert rows[0]["memory_time"] == pytest.approx(1 / math.log(2), rel=1e-12)
    assert [r["forget_bias"] for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert rows[3]["memory_time_median"] == pytest.approx(rows[3]["memory_time"], rel=1e-12)
    assert rows[0]["memory_gate"] == "f"


def test_forget_bias_spread_median_and_no_bias():
    lstm = nn.LSTM(2, 3, dtype=torch.float64)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.bias_hh_l0[3:6] = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    row = static_analysis(find_modules(lstm.state_dict())[0])[0]
    assert (row["forget_bias"], row["forget_bias_min"], row["forget_bias_max"]) == pytest.approx((4 / 3, 0.0, 3.0))
    assert row["memory_time"] == pytest.approx(memory_time(4 / 3))
    assert row["memory_time_median"] == pytest.approx(memory_time(1.0))
    nobias = static_analysis(find_modules(nn.LSTM(2, 3, bias=False).state_dict())[0])[0]
    assert nobias["forget_bias"] == 0.0 and nobias["memory_time"] == pytest.approx(1 / math.log(2))
    assert memory_time(1000.0) == math.inf and memory_time(40.0) == pytest.approx(math.exp(40.0), rel=1e-9)


def test_gru_update_gate_memory_time_and_cells():
    gru = nn.GRU(2, 4, dtype=torch.float64)
    with torch.no_grad():
        gru.bias_ih_l0.zero_()
        gru.bias_hh_l0.fill_(-7.0)
        gru.bias_hh_l0[4:8] = 2.0          # gate order r, z, n
    row = static_analysis(find_modules(gru.state_dict())[0])[0]
    assert sorted(row["gates"]) == ["n", "r", "z"] and row["memory_gate"] == "z"
    assert row["update_bias"] == 2.0 and row["memory_time"] == pytest.approx(memory_time(2.0))
    cell = nn.LSTMCell(2, 4)
    (found,) = find_modules({"dec.cell." + k: v for k, v in cell.state_dict().items()})
    (crow,) = static_analysis(found)
    assert crow["site"] == "dec.cell" and crow["kind"] == "LSTMCell" and crow["direction"] == "forward"
    w = cell.weight_hh.detach().double().numpy()[4:8]
    assert crow["gates"]["f"]["spectral_norm"] == pytest.approx(np.linalg.norm(w, 2), rel=1e-10)


def test_projected_lstm_uses_the_square_recurrent_map():
    lstm = nn.LSTM(3, 6, proj_size=2, bidirectional=True, dtype=torch.float64)
    rows = static_analysis(find_modules(lstm.state_dict())[0])
    assert [r["site"] for r in rows] == ["l0", "l0_reverse"]
    w_hh = lstm.weight_hh_l0_reverse.detach().numpy()
    w_hr = lstm.weight_hr_l0_reverse.detach().numpy()
    for k, g in enumerate("ifgo"):
        m = w_hh[6 * k:6 * (k + 1)] @ w_hr        # [6, 2] @ [2, 6] -> [6, 6], rank <= 2
        got = rows[1]["gates"][g]
        assert got["spectral_norm"] == pytest.approx(np.linalg.norm(m, 2), rel=1e-10)
        assert got["spectral_radius"] == pytest.approx(np.max(np.abs(np.linalg.eigvals(m))), rel=1e-8)
        assert len(got["singular_values"]) == 6 and got["singular_values"][2] < 1e-12
    assert rows[1]["recurrent_map"] == "W_hh[gate] @ W_hr" and rows[1]["proj_size"] == 2


def test_singular_values_truncated_to_16_and_nonfinite_weights():
    rnn = nn.RNN(2, 20)
    row = static_analysis(find_modules(rnn.state_dict())[0])[0]
    sv = row["gates"]["h"]["singular_values"]
    assert len(sv) == 16 and sv == sorted(sv, reverse=True)
    sd = dict(rnn.state_dict())
    sd["weight_hh_l0"] = sd["weight_hh_l0"].clone()
    sd["weight_hh_l0"][0, 0] = float("nan")
    row = static_analysis(find_modules(sd)[0], sd)[0]
    assert row["finite"] is False and math.isnan(row["gates"]["h"]["spectral_norm"])


def test_attention_static_analysis_matches_oracle():
    mha = nn.MultiheadAttention(16, 2, dtype=torch.float64)
    (found,) = find_modules(mha.state_dict())
    (row,) = static_analysis(found, mha.state_dict())
    w = mha.in_proj_weight.detach().numpy()
    for h in range(2):
        q, k = w[8 * h:8 * (h + 1)], w[16 + 8 * h:16 + 8 * (h + 1)]
        assert row["qk_spectral_norm"][h] == pytest.approx(np.linalg.norm(q.T @ k, 2) / math.sqrt(8), rel=1e-10)
    assert row["site"] == "" and row["num_heads"] == 2


def test_static_analysis_checks_the_state_dict():
    (found,) = find_modules(nn.GRU(2, 3).state_dict())
    assert isinstance(found, FoundModule)
    with pytest.raises(CheckpointError, match="the state dict lacks 'weight_ih_l0'"):
        static_analysis(found, {})

