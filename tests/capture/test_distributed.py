"""DDP: watch() on a DistributedDataParallel model, scope.gather() merging ranks (gloo, 2 processes)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.capture.distributed import merge_recordings
from gradscope.errors import GradscopeError
from gradscope.examples import ddp as example
from gradscope.recording import Recording

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

STEPS = 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two gloo ranks train the example model (float64) with DDP; rank 0 saves the merged recording."""
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("ddp")
    out = str(d / "merged.npz")
    mp.spawn(example.spawn_worker, args=(2, str(d / "init"), out, STEPS, "float64"), nprocs=2, join=True)
    return out


def test_ddp_merged_norms_equal_one_process_on_the_global_batch(ddp_run):
    merged = gradscope.load(ddp_run)
    single = example.train(example.make_model(dtype=torch.float64), STEPS, dtype=torch.float64).recording
    assert merged.sites == single.sites == ("lstm.l0", "lstm.l1")  # no "module." prefix
    assert merged.meta["ddp"] is True and merged.meta["merged_ranks"] == 2
    np.testing.assert_array_equal(merged.steps, single.steps)
    for site in single.sites:
        for state in ("h", "c"):
            a, b = merged.grad_norms(site, state), single.grad_norms(site, state)
            assert a.shape == b.shape == (STEPS, example.T)
            assert np.all(b > 0)
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"{site}/{state}")
    pm, ps = merged.param_grad_norms(), single.param_grad_norms()
    assert set(pm) == set(ps) and not any(n.startswith("module.") for n in pm)
    for name in ps:
        np.testing.assert_allclose(pm[name], ps[name], rtol=1e-6, err_msg=name)


def test_gather_returns_none_off_the_destination_rank(ddp_run):
    assert Path(ddp_run + ".rank0").read_text() == "merged"
    assert Path(ddp_run + ".rank1").read_text() == "None"


def test_merged_norms_are_sums_of_squares_not_averages(ddp_run):
    merged = gradscope.load(ddp_run)
    # rank-local norms of the same steps, recomputed in this process for each half of the batch
    halves = []
    for rank in range(2):
        model = example.make_model(dtype=torch.float64)
        halves.append(example.train(model, 1, rank, 2, dtype=torch.float64).recording.grad_norms("lstm.l0")[0])
    n0, n1 = halves
    expect = np.sqrt(n0 ** 2 + n1 ** 2) / 2
    np.testing.assert_allclose(merged.grad_norms("lstm.l0")[0], expect, rtol=1e-9)
    assert not np.allclose(expect, (n0 + n1) / 2, rtol=1e-3)  # the naive average differs


def test_merged_recording_diagnoses():
    recs = []
    for rank in range(2):
        recs.append(example.train(example.make_model(dtype=torch.float64), 2, rank, 2,
                                  dtype=torch.float64).recording)
    merged = merge_recordings(recs)
    diag = gradscope.diagnose(merged)
    assert diag.sites == ("lstm.l0", "lstm.l1")
    assert "lstm.l0" in str(diag)


def _rec(sites, T, steps=(0, 1), value=1.0, params=None):
    info = {s: {"kind": "rnn_tanh", "module": s, "states": ["h"]} for s in sites}
    grads = {(s, "h"): np.full((len(steps), T), value) for s in sites}
    lens = {s: np.full(len(steps), T) for s in sites}
    params = params if params is not None else {"w": np.full(len(steps), 2.0)}
    return Recording(sites=info, steps=list(steps), grads=grads, seq_lens=lens, params=params)


def test_merge_pads_different_sites_and_lengths_with_nan():
    a = _rec(["x", "y"], T=4, value=3.0)
    b = _rec(["x", "z"], T=6, value=4.0)
    m = merge_recordings([a, b])
    assert m.sites == ("x", "y", "z")
    x = m.grad_norms("x")
    np.testing.assert_allclose(x[:, :4], 5.0 / 2)          # sqrt(3² + 4²) / R
    np.testing.assert_allclose(x[:, 4:], 4.0 / 2)          # only rank 1 reached t = 4, 5
    np.testing.assert_allclose(m.grad_norms("y"), 3.0 / 2)  # rank 1 has no "y": contributes nothing
    assert m.grad_norms("z").shape == (2, 6)
    assert list(m.seq_lens("x")) == [6, 6]
    assert any("site sets differ" in n for n in m.notes)
    assert any("sequence lengths" in n for n in m.notes)
    np.testing.assert_allclose(m.param_grad_norms()["w"], 2.0)  # taken once, not summed


def test_merge_keeps_nan_where_no_rank_recorded_and_inf_where_one_exploded():
    a = _rec(["x"], T=3, value=1.0)
    b = _rec(["x"], T=3, value=1.0)
    ga = a.grad_norms("x").copy()
    ga[0, 2] = np.nan
    gb = b.grad_norms("x").copy()
    gb[0, 2] = np.nan
    gb[1, 0] = np.inf
    a = a.replace(grads={("x", "h"): ga})
    b = b.replace(grads={("x", "h"): gb}, events=[{"kind": "nonfinite", "step": 1, "site": "x"}])
    m = merge_recordings([a, b])
    g = m.grad_norms("x")
    assert np.isnan(g[0, 2]) and np.isinf(g[1, 0])
    assert m.events == ({"kind": "nonfinite", "step": 1, "site": "x", "rank": 1},)


def test_merge_rejects_bad_input():
    with pytest.raises(GradscopeError, match="non-empty sequence of Recordings"):
        merge_recordings([])
    with pytest.raises(GradscopeError, match="got \\['dict'\\]"):
        merge_recordings([{}])
    with pytest.raises(GradscopeError, match="primary=3 is not a rank"):
        merge_recordings([_rec(["x"], 2)], primary=3)


def test_gather_without_a_process_group_says_how_to_fix():
    assert not dist.is_initialized()
    rnn = nn.RNN(2, 3)
    with gradscope.watch(rnn, every=1) as scope:
        rnn(torch.randn(4, 1, 2))[0].sum().backward()
    with pytest.raises(GradscopeError, match="init_process_group.*single process use scope.recording"):
        scope.gather()


def test_data_parallel_is_refused_with_the_alternative():
    with pytest.raises(GradscopeError, match="DataParallel.*DistributedDataParallel"):
        gradscope.watch(nn.DataParallel(nn.LSTM(2, 3)), every=1)


@pytest.mark.slow
def test_torchrun_example_runs(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    out = tmp_path / "merged.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                        "gradscope.examples.ddp", "--steps", "3", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged 2 ranks, 3 steps" in r.stdout
    assert "gradscope diagnosis" in r.stdout
    rec = gradscope.load(out)
    assert rec.sites == ("lstm.l0", "lstm.l1") and len(rec) == 3
