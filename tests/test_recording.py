"""Recording: frozen data, versioned save/load, clear errors on bad files."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError, RecordingFormatError


@pytest.fixture
def rec():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    with gradscope.watch(lstm, every=2, probe_every=None) as scope:
        for T in (6, 4, 5, 3, 7):
            out, _ = lstm(torch.randn(T, 2, 3))
            out.pow(2).sum().backward()
    return scope.recording


def test_recording_is_frozen_numpy(rec):
    g = rec.grad_norms("l0")
    assert isinstance(g, np.ndarray) and g.shape == (3, 7)
    with pytest.raises(ValueError):
        g[0, 0] = 1.0
    assert list(rec.steps) == [0, 2, 4]
    assert list(rec.seq_lens("l0")) == [6, 5, 7]
    assert np.isnan(g[0, 6]) and np.all(np.isfinite(g[0, :6]))


def test_save_load_roundtrip(rec, tmp_path):
    path = rec.save(tmp_path / "run.npz")
    back = gradscope.load(path)
    assert back.sites == rec.sites
    np.testing.assert_array_equal(back.steps, rec.steps)
    for site in rec.sites:
        for state in rec.states(site):
            np.testing.assert_array_equal(back.grad_norms(site, state), rec.grad_norms(site, state))
        assert back.site_info(site) == rec.site_info(site)
    for k, v in rec.param_grad_norms().items():
        np.testing.assert_array_equal(back.param_grad_norms()[k], v)
    assert back.meta == rec.meta and back.events == rec.events and back.notes == rec.notes


def test_unknown_site_and_state(rec):
    with pytest.raises(GradscopeError, match="unknown site 'l0_revers'.*Did you mean 'l0_reverse'"):
        rec.grad_norms("l0_revers")
    with pytest.raises(GradscopeError, match="has states \\('h', 'c'\\), not 'x'"):
        rec.grad_norms("l0", "x")


def test_missing_measure_says_how_to_record(rec):
    with pytest.raises(gradscope.MissingMeasureError, match="gradscope.probe"):
        rec.measure("l0", "jacobian_norms")


def test_load_refuses_unknown_version(rec, tmp_path):
    path = rec.save(tmp_path / "run.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["version"] = 99
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(tmp_path / "v99.npz", **arrays)
    with pytest.raises(RecordingFormatError, match="version 99.*reads version 1.*Upgrade"):
        gradscope.load(tmp_path / "v99.npz")


def test_load_refuses_bad_files(rec, tmp_path):
    with pytest.raises(RecordingFormatError, match="no such file"):
        gradscope.load(tmp_path / "missing.npz")
    with pytest.raises(RecordingFormatError, match="a directory"):
        gradscope.load(tmp_path)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(RecordingFormatError, match="not a readable gradscope recording"):
        gradscope.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(RecordingFormatError, match="not a gradscope recording"):
        gradscope.load(tmp_path / "other.npz")
    data = rec.save(tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordingFormatError, match="corrupt or truncated"):
        gradscope.load(tmp_path / "trunc.npz")
    torch.save({"a": 1}, tmp_path / "model.pt")
    with pytest.raises(RecordingFormatError):
        gradscope.load(tmp_path / "model.pt")


def test_load_never_unpickles(tmp_path):
    # an npz holding a pickled object array must not be loaded with pickle
    np.savez(tmp_path / "obj.npz", __meta__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(RecordingFormatError):
        gradscope.load(tmp_path / "obj.npz")
