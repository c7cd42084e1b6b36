"""gradscope.plot: every function on real and synthetic recordings, bad values, errors, and pictures.

Rendered pictures go to ``$GRADSCOPE_REVIEW_DIR`` when set (for looking at them), else to a
temporary folder; each is checked to be non-blank and to have the expected number of Axes.
"""
import math
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import gradscope  # noqa: E402
from gradscope import GradscopeError, MissingMeasureError, Recording  # noqa: E402
from gradscope import plot as gp  # noqa: E402


from plotting import save_and_check  # noqa: E402


def colorbars(fig):
    return [a for a in fig.axes if a.get_label() == "<colorbar>"]


# ------------------------------------------------------------------------------- recordings
@pytest.fixture(scope="module")
def watched():
    """A 2-layer bidirectional LSTM regressor, watched for 6 steps with probes every 3."""
    torch.manual_seed(0)

    class Reg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(2, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.head = torch.nn.Linear(12, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Reg()
    x, y = gradscope.zoo.adding_problem(8, 12, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=1, probe_every=3) as scope:
        for _ in range(6):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return scope.recording


@pytest.fixture(scope="module")
def probed():
    """A probe of a vanishing tanh RNN: one step, Jacobian norms that fall by 40 decades."""
    torch.manual_seed(0)
    rnn = torch.nn.RNN(2, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.2)
    return gradscope.probe(rnn, torch.randn(40, 3, 2))


def synthetic(grads=None, seq_lens=None, measures=None, measure_meta=None, params=None, events=(),
              sites=None, steps=None):
    """A Recording built from arrays: one forward site 'a' and one reverse site 'a_reverse'."""
    S, T = 4, 6
    sites = sites if sites is not None else {
        "a": {"kind": "rnn_tanh", "module": "", "states": ["h"], "layer": 0, "direction": "forward"},
        "a_reverse": {"kind": "rnn_tanh", "module": "", "states": ["h"], "layer": 0, "direction": "reverse"}}
    g = 10.0 ** -np.arange(T)[::-1] * np.ones((S, 1))
    grads = grads if grads is not None else {(s, "h"): g for s in sites}
    if grads:
        S, T = next(iter(grads.values())).shape
    elif steps is not None:
        S = len(steps)
    elif params:
        S = len(next(iter(params.values())))
    return Recording(sites=sites, steps=steps if steps is not None else list(range(0, 2 * S, 2)), grads=grads,
                     seq_lens=seq_lens or {s: np.full(S, T) for s in sites},
                     params=params if params is not None else {"w": np.linspace(0.1, 1.0, S), "b": np.full(S, 0.5)},
                     events=events, measures=measures, measure_meta=measure_meta, meta={"model": "Synthetic"})


# ------------------------------------------------------------------------------------ import
def test_import_picks_no_backend():
    code = ("import sys, gradscope.plot, gradscope.render.html; "
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api():
    assert set(gp.__all__) >= {"gradient_heatmap", "jacobian_decay", "lyapunov_spectrum", "hidden_spectrum",
                               "param_flow", "depth_heatmap", "dashboard"}
    for name in gp.__all__:
        assert getattr(gp, name).__doc__ and "Example:" in getattr(gp, name).__doc__, name


# ---------------------------------------------------------------------------- gradient_heatmap
def test_heatmap_one_site(watched, review_dir):
    ax = gp.gradient_heatmap(watched, "rnn.l0")
    assert isinstance(ax, Axes)
    fig = ax.figure
    assert len(colorbars(fig)) == 1 and len(fig.axes) == 2
    img = ax.images[0].get_array()
    assert img.shape == (6, 12)  # [S, T]
    np.testing.assert_allclose(img.data, np.log10(watched.grad_norms("rnn.l0")))
    assert "←" in ax.get_xlabel() and "backward" in ax.get_xlabel()
    assert ax.get_ylabel() == "training step"
    save_and_check(fig, os.path.join(review_dir, "plot_heatmap_one.png"))


def test_heatmap_reverse_direction_and_cell_state(watched):
    ax = gp.gradient_heatmap(watched, "rnn.l1_reverse", state="c")
    assert "→" in ax.get_xlabel()
    assert ax.get_title() == "rnn.l1_reverse  (c)"
    assert "partial c_t" in colorbars(ax.figure)[0].get_ylabel()


def test_heatmap_small_multiples(watched, review_dir):
    axes = gp.gradient_heatmap(watched)
    assert isinstance(axes, np.ndarray) and axes.shape == (4,)
    assert [a.get_title().split()[0] for a in axes] == list(watched.sites)
    fig = axes[0].figure
    # by default each site has its own colour range and colour bar
    assert len(colorbars(fig)) == 4 and len(fig.axes) == 8
    for a in axes:
        g = watched.grad_norms(a.get_title().split()[0])
        lg = np.log10(g[np.isfinite(g) & (g > 0)])
        assert a.images[0].norm.vmin == pytest.approx(lg.min()) and a.images[0].norm.vmax == pytest.approx(lg.max())
    save_and_check(fig, os.path.join(review_dir, "plot_heatmap_multiples.png"))


def test_heatmap_small_multiples_shared_scale(watched, review_dir):
    axes = gp.gradient_heatmap(watched, scale="shared")
    fig = axes[0].figure
    assert len(colorbars(fig)) == 1 and len(fig.axes) == 5
    # one colour scale shared by every panel, and the colour bar says so
    assert len({(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in axes}) == 1
    assert "shared by all sites" in colorbars(fig)[0].get_ylabel()
    save_and_check(fig, os.path.join(review_dir, "plot_heatmap_multiples_shared.png"))
    with pytest.raises(GradscopeError, match=r"scale must be one of \['site', 'shared'\], got 'sharde'.*Did you mean 'shared'"):
        gp.gradient_heatmap(watched, scale="sharde")


def test_heatmap_scale_per_site_of_very_different_magnitudes(review_dir):
    """Two sites 10⁶ apart: per site, each spans the full colour range; shared, the small one is dark."""
    sites = {s: {"kind": "rnn_tanh", "module": "", "states": ["h"], "layer": 0, "direction": "forward"}
             for s in ("big", "small")}
    g = 10.0 ** -np.arange(8.0)[::-1] * np.ones((4, 1))  # 1e-7 … 1 along t
    rec = synthetic(sites=sites, grads={("big", "h"): g, ("small", "h"): g * 1e-6})
    own = gp.gradient_heatmap(rec)
    assert [(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in own] == [(-7, 0), (-13, -6)]
    assert len(colorbars(own[0].figure)) == 2
    save_and_check(own[0].figure, os.path.join(review_dir, "plot_heatmap_scale_site.png"))
    shared = gp.gradient_heatmap(rec, scale="shared")
    assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in shared} == {(-13, 0)}
    fig = gp.dashboard(rec, scale="shared")
    assert len(colorbars(fig)) == 1
    fig = gp.dashboard(rec)
    assert len(colorbars(fig)) == 2


# ---------------------------------------------------------------------------- gradient_profile
def test_gradient_profile_of_a_probe(probed, review_dir):
    ax = gp.gradient_profile(probed)
    assert ax.get_yscale() == "log" and "time step t" in ax.get_xlabel() and "one pass" in ax.get_title(loc="left")
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == list(probed.sites)
    g = probed.grad_norms(probed.sites[0], "h")[0]
    np.testing.assert_allclose(lines[0].get_ydata(), np.where(g > 0, g, np.nan))
    save_and_check(ax.figure, os.path.join(review_dir, "plot_gradient_profile.png"))
    one = gp.gradient_profile(probed, probed.sites[0])
    assert len(one.get_lines()) == 1
    with pytest.raises(GradscopeError, match="unknown site"):
        gp.gradient_profile(probed, "nope")


def test_heatmap_into_given_axes(watched):
    fig, axes = plt.subplots(2, 2)
    out = gp.gradient_heatmap(watched, ax=axes)
    assert list(out) == list(axes.ravel())
    one = plt.figure().add_subplot()
    assert gp.gradient_heatmap(watched, "rnn.l0", ax=one) is one
    with pytest.raises(GradscopeError, match="got 1 Axes for 4 site"):
        gp.gradient_heatmap(watched, ax=one)


def test_heatmap_marks_zero_nan_inf_and_padding(review_dir):
    g = np.array([[1e-3, 0.0, 1e-1, 1.0, np.nan, np.nan],   # step 0 ran 4 positions: NaN is padding
                  [1e-4, 1e-3, np.inf, 1e-1, 1.0, 2.0],
                  [1e-5, np.nan, 1e-3, 1e-2, 1e-1, 1.0],  # a NaN inside the sequence: non-finite
                  [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, -1.0]])
    rec = synthetic(grads={("a", "h"): g, ("a_reverse", "h"): g},
                    seq_lens={"a": np.array([4, 6, 6, 6]), "a_reverse": np.array([4, 6, 6, 6])})
    ax = gp.gradient_heatmap(rec, "a")
    main, bad = ax.images
    assert main.get_array().mask.sum() == 6  # 1 zero, 2 padding, inf, NaN, negative
    codes = bad.get_array()
    assert codes[0, 1] == 1 and codes[1, 2] == 2 and codes[2, 1] == 2 and codes[3, 5] == 2  # zero / nonfinite
    assert codes[0, 4] == 3 and codes[0, 5] == 3                                           # not run
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["zero (underflow / no gradient)", "NaN or inf", "not run (shorter sequence)"]
    save_and_check(ax.figure, os.path.join(review_dir, "plot_heatmap_bad_values.png"))


def test_heatmap_all_nan_is_a_message_not_a_crash(review_dir):
    g = np.full((3, 5), np.nan)
    rec = synthetic(grads={("a", "h"): g, ("a_reverse", "h"): g})
    axes = gp.gradient_heatmap(rec)
    fig = axes[0].figure
    assert not colorbars(fig)
    assert any("no finite, non-zero" in t.get_text() for t in axes[0].texts)
    save_and_check(fig, os.path.join(review_dir, "plot_heatmap_all_nan.png"))


def test_heatmap_constant_and_single_step(probed, review_dir):
    ax = gp.gradient_heatmap(probed, "l0")
    assert ax.images[0].get_array().shape == (1, 40)
    assert len(ax.images[0].colorbar.get_ticks()) >= 2  # a range narrower than a decade still gets tick labels
    save_and_check(ax.figure, os.path.join(review_dir, "plot_heatmap_probe.png"))
    rec = synthetic(grads={("a", "h"): np.ones((2, 3)), ("a_reverse", "h"): np.ones((2, 3))})
    ax = gp.gradient_heatmap(rec, "a")
    assert len(ax.images[0].colorbar.get_ticks()) >= 1


def test_heatmap_errors(watched):
    with pytest.raises(GradscopeError, match=r"unknown site 'rnn\.l9'.*Did you mean"):
        gp.gradient_heatmap(watched, "rnn.l9")
    with pytest.raises(GradscopeError, match="has states .* not 'x'"):
        gp.gradient_heatmap(watched, "rnn.l0", state="x")
    with pytest.raises(GradscopeError, match="expects a gradscope Recording .*or a numeric array, got str"):
        gp.gradient_heatmap("run.npz")
    with pytest.raises(GradscopeError, match=r"an array \[S, T\] .* got an array of shape \[3\]"):
        gp.gradient_heatmap(np.zeros(3))
    empty = synthetic(grads={}, steps=[], params={})
    with pytest.raises(GradscopeError, match="empty recording: no training step was recorded"):
        gp.gradient_heatmap(empty)
    nosite = synthetic(grads={}, sites={}, params={"w": np.ones(4)})
    with pytest.raises(GradscopeError, match="no sites"):
        gp.gradient_heatmap(nosite)


# ------------------------------------------------------------------------------ jacobian_decay
def test_jacobian_decay_all_sites(watched, review_dir):
    ax = gp.jacobian_decay(watched)
    assert ax.get_yscale() == "log"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    for s in watched.sites:
        jm = watched.site_measures(s)["jacobian"]
        assert any(t.startswith(f"{s}: rate {gradscope._format.fmt(jm['rate'])}/step") for t in texts)
    assert any(t.startswith("threshold 0.001") for t in texts)
    save_and_check(ax.figure, os.path.join(review_dir, "plot_jacobian_decay.png"))


def test_jacobian_decay_draws_the_stored_fit(probed):
    ax = gp.jacobian_decay(probed, "l0")
    jm = probed.site_measures("l0")["jacobian"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(ln.get_xdata()) > 2]
    assert len(dashed) == 1
    x, y = dashed[0].get_xdata(), dashed[0].get_ydata()
    slope = (math.log(y[5]) - math.log(y[1])) / (x[5] - x[1])
    assert slope == pytest.approx(jm["rate"], rel=1e-9)
    assert y[0] == pytest.approx(math.exp(jm["intercept"]))  # probe stores the fit's intercept
    verticals = [ln for ln in ax.lines if ln.get_linestyle() == ":" and len(set(ln.get_xdata())) == 1]
    assert verticals and verticals[0].get_xdata()[0] == jm["horizon"]
    median = [ln for ln in ax.lines if ln.get_linestyle() == "-" and len(ln.get_xdata()) == 41][0]
    jn = probed.jacobian_norms("l0")
    np.testing.assert_allclose(median.get_ydata(), np.exp(np.median(np.log(jn), axis=0)), rtol=1e-12)


def test_jacobian_decay_uses_a_stored_intercept_and_marks_bad_values(review_dir):
    jn = np.array([[1.0, 0.5, 0.25, 0.0, np.nan, 0.01], [1.0, 0.4, 0.2, 0.1, np.inf, 0.02]])
    meta = {s: {"jacobian": {"rate": -0.7, "intercept": -0.1, "horizon": math.inf, "explosion_lag": 4,
                             "threshold": 0.01}} for s in ("a", "a_reverse")}
    rec = synthetic(measures={("a", "jacobian_norms"): jn}, measure_meta=meta)
    ax = gp.jacobian_decay(rec)
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(ln.get_xdata()) > 2][0]
    assert dashed.get_ydata()[0] == pytest.approx(math.exp(-0.1))
    assert any("3 of 12 norms zero or non-finite" in t.get_text() for t in ax.texts)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "explosion lag" in labels and "threshold 0.01 and its inverse" in labels
    save_and_check(ax.figure, os.path.join(review_dir, "plot_jacobian_bad_values.png"))


def test_jacobian_decay_underflowing_norms_keep_round_decades(review_dir):
    jn = np.exp(-8.0 * np.arange(120))[None, :].repeat(2, 0)  # reaches 1e-300 and zero
    jn[:, 95:] = 0.0
    meta = {"a": {"jacobian": {"rate": -8.0, "horizon": 1, "explosion_lag": math.inf, "threshold": 1e-3}}}
    rec = synthetic(measures={("a", "jacobian_norms"): jn}, measure_meta=meta)
    ax = gp.jacobian_decay(rec, "a")
    lo, hi = ax.get_ylim()
    assert 0 < lo and hi > 1
    exps = [round(math.log10(t)) for t in ax.get_yticks()]
    assert exps == sorted(exps) and len(set(np.diff(exps))) == 1 and exps[-1] == 0
    save_and_check(ax.figure, os.path.join(review_dir, "plot_jacobian_underflow.png"))


def test_jacobian_decay_missing_measure(watched):
    rnn = torch.nn.RNN(2, 3)
    with gradscope.watch(rnn, every=1, probe_every=None) as scope:
        rnn(torch.randn(5, 1, 2))[0].sum().backward()
    with pytest.raises(MissingMeasureError, match=r"'jacobian_norms'.*probe\(model, batch\).*probe_every=N"):
        gp.jacobian_decay(scope.recording)
    with pytest.raises(MissingMeasureError, match=r"no 'jacobian_norms' for site 'l0'.*probe_every=N"):
        gp.jacobian_decay(scope.recording, "l0")
    for fn, measure in ((gp.lyapunov_spectrum, "lyapunov"), (gp.hidden_spectrum, "hidden_sv")):
        with pytest.raises(MissingMeasureError, match=f"'{measure}'.*probe_every=N"):
            fn(scope.recording)
    with pytest.raises(GradscopeError, match="Did you mean 'rnn.l0'"):
        gp.jacobian_decay(watched, "rnn.l0x")


# ------------------------------------------------------------------------ spectra and history
def test_lyapunov_spectrum(watched, review_dir):
    ax = gp.lyapunov_spectrum(watched)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == 4 and all("λ₁ = " in t for t in texts)
    ly = watched.lyapunov("rnn.l0")
    line = [ln for ln in ax.lines if ln.get_label().startswith("rnn.l0:")][0]
    np.testing.assert_allclose(line.get_ydata(), np.median(ly, axis=0))
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, ly.shape[1] + 1))
    zero = [ln for ln in ax.lines if list(ln.get_ydata()) == [0, 0]]
    assert zero, "the λ = 0 line separating growth from decay"
    save_and_check(ax.figure, os.path.join(review_dir, "plot_lyapunov.png"))


def test_lyapunov_all_nan_is_a_message():
    meta = {"a": {"lyapunov": {"lambda1": math.nan}}}
    rec = synthetic(measures={("a", "lyapunov"): np.full((2, 3), np.nan)}, measure_meta=meta)
    ax = gp.lyapunov_spectrum(rec, "a")
    assert any("no finite Lyapunov exponent" in t.get_text() for t in ax.texts)


def test_hidden_spectrum(watched, review_dir):
    ax = gp.hidden_spectrum(watched)
    first = ax.lines[0]
    assert first.get_ydata()[0] == pytest.approx(1.0)
    hs = watched.hidden_spectrum("rnn.l0")
    np.testing.assert_allclose(first.get_ydata(), hs["singular_values"] / hs["singular_values"].max())
    assert "effective rank" in ax.get_legend().get_texts()[0].get_text()
    save_and_check(ax.figure, os.path.join(review_dir, "plot_hidden_spectrum.png"))


def test_hidden_spectrum_zero_singular_values():
    rec = synthetic(measures={("a", "hidden_sv"): np.array([2.0, 1.0, 0.0, 0.0])},
                    measure_meta={"a": {"hidden": {"effective_rank": 1.9}}})
    ax = gp.hidden_spectrum(rec)
    assert len(ax.lines[0].get_ydata()) == 2
    assert any("2 of 4 singular values zero or non-finite" in t.get_text() for t in ax.texts)


def test_probe_history(watched, review_dir):
    ax = gp.probe_history(watched)
    assert ax.get_xlabel() == "training step"
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), watched.measure("rnn.l0", "probe_steps"))
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), watched.measure("rnn.l0", "probe_lambda1"))
    save_and_check(ax.figure, os.path.join(review_dir, "plot_probe_history.png"))
    ax = gp.probe_history(watched, measure="horizon")
    horizons = watched.measure("rnn.l0", "probe_horizon")
    assert len(ax.lines[0].get_xdata()) == np.isfinite(horizons).sum()
    if np.isinf(horizons).any():
        assert "never below threshold" in ax.get_title(loc="left")
    with pytest.raises(GradscopeError, match="unknown measure 'lamda1'.*Did you mean 'lambda1'"):
        gp.probe_history(watched, measure="lamda1")


def test_probe_history_needs_watch_probe_every(probed):
    with pytest.raises(MissingMeasureError, match=r"'probe_lambda1'.*watch\(model, probe_every=N\)"):
        gp.probe_history(probed)


# ------------------------------------------------------------------------------- param_flow
def test_param_flow(watched, review_dir):
    ax = gp.param_flow(watched)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(watched.param_grad_norms())
    assert ax.get_xscale() == "log"
    dots = ax.lines[0]
    w = watched.param_grad_norms()["rnn.weight_ih_l0"]
    assert dots.get_xdata()[0] == pytest.approx(math.exp(np.median(np.log(w))))
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_flow.png"))


def test_param_flow_groups_hundreds_of_parameters(review_dir):
    names = [f"blocks.{i}.{j}.{p}" for i in range(30) for j in range(3) for p in ("weight", "bias")] + ["head.weight"]
    S = 3
    params = {n: np.full(S, 10.0 ** -(k % 7)) for k, n in enumerate(names)}
    rec = synthetic(params=params, grads={}, sites={})
    ax = gp.param_flow(rec, max_groups=40)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 10 <= len(labels) <= 40
    assert labels[0].startswith("blocks.0") and labels[-1].startswith("head")
    assert "181 parameters grouped into" in ax.get_title(loc="left")
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_flow_grouped.png"))
    ax = gp.param_flow(rec, max_groups=5)
    assert len(ax.get_yticklabels()) <= 5


def test_param_flow_group_norm_is_the_norm_of_the_parts():
    params = {f"m{i}.w": np.array([3.0, np.nan]) for i in range(3)}
    params.update({f"m{i}.b": np.array([4.0, np.nan]) for i in range(3)})
    ax = gp.param_flow(synthetic(params=params, grads={}, steps=[0, 1], sites={}), max_groups=3)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["m0  (2 params)", "m1  (2 params)", "m2  (2 params)"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [5.0, 5.0, 5.0])


def test_param_flow_marks_missing_zero_and_nonfinite(review_dir):
    params = {"ok": np.array([1.0, 2.0, 3.0]), "unused": np.full(3, np.nan), "dead": np.zeros(3),
              "blown": np.array([1.0, np.inf, 2.0]), "nanned": np.array([1.0, np.nan, 1.0])}
    events = [{"kind": "nonfinite", "step": 1, "param": "nanned", "value": "nan"}]
    ax = gp.param_flow(synthetic(params=params, events=events, grads={}, sites={}))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["median", "min–max", "zero", "NaN / inf", "no gradient"]
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_flow_bad_values.png"))
    ax = gp.param_flow(synthetic(params={"a": np.full(4, np.nan)}, grads={}, sites={}))
    assert any("no parameter gradient was finite" in t.get_text() for t in ax.texts)
    with pytest.raises(GradscopeError, match="max_groups must be a positive integer"):
        gp.param_flow(synthetic(), max_groups=0)


# ------------------------------------------------------------------------------ depth_heatmap
def test_depth_heatmap_needs_its_measure(watched):
    with pytest.raises(MissingMeasureError, match=r"'depth_grad_norms'.*attention blocks.*gradscope.watch\(model\)"):
        gp.depth_heatmap(watched)


def test_depth_heatmap_draws_layers_by_position(review_dir):
    site = {"blk": {"kind": "attention", "module": "blk", "states": ["h"], "layer": None, "direction": "forward"}}
    a = 10.0 ** -np.add.outer(np.arange(4), np.arange(10)[::-1] / 3)
    a[1, 2] = 0.0
    rec = synthetic(sites=site, grads={("blk", "h"): np.ones((4, 10))}, measures={("blk", "depth_grad_norms"): a})
    ax = gp.depth_heatmap(rec)
    assert ax.images[0].get_array().shape == (4, 10) and ax.get_ylabel() == "block (depth ℓ)"
    assert len(colorbars(ax.figure)) == 1
    save_and_check(ax.figure, os.path.join(review_dir, "plot_depth_heatmap.png"))


@pytest.mark.skipif(not hasattr(Recording, "attention_stacks"), reason="attention capture not in this build")
def test_depth_heatmap_of_a_transformer(review_dir):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    with gradscope.watch(enc, every=1) as scope:
        for _ in range(2):
            enc(torch.randn(7, 2, 8))[-1].pow(2).mean().backward()
    rec = scope.recording
    ax = gp.depth_heatmap(rec)
    assert ax.images[0].get_array().shape == (3, 7)
    assert len(colorbars(ax.figure)) == 1
    save_and_check(ax.figure, os.path.join(review_dir, "plot_depth_transformer.png"))
    assert "position p" in gp.gradient_heatmap(rec, rec.sites[0]).get_xlabel()
    fig = gp.dashboard(rec)
    assert any(a.get_ylabel() == "block (depth ℓ)" for a in fig.axes)
    save_and_check(fig, os.path.join(review_dir, "plot_dashboard_transformer.png"))
    with pytest.raises(GradscopeError, match="unknown attention stack 'layer'.*Did you mean 'layers'"):
        gp.depth_heatmap(rec, stack="layer")


# ------------------------------------------------------------------------------- plain arrays
def test_every_function_takes_plain_arrays(review_dir):
    g = 10.0 ** -np.arange(12)[::-1] * np.ones((5, 1))
    ax = gp.gradient_heatmap(g)[0]
    assert ax.get_title() == "array  (h)" and ax.images[0].get_array().shape == (5, 12)
    ax = gp.jacobian_decay(list(0.5 ** np.arange(20)))
    assert ax.get_legend().get_texts()[0].get_text() == "array"
    assert not [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(ln.get_xdata()) > 2]  # no fit given
    ax = gp.lyapunov_spectrum(torch.tensor([[-0.1, -0.5, -0.9], [-0.2, -0.4, -1.0]]))
    np.testing.assert_allclose(ax.lines[-1].get_ydata(), [-0.15, -0.45, -0.95])
    ax = gp.hidden_spectrum(np.array([4.0, 2.0, 1.0]))
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 0.5, 0.25])
    ax = gp.param_flow({"w": [0.1, 0.2], "b": [1.0, 2.0]})
    assert [t.get_text() for t in ax.get_yticklabels()] == ["w", "b"]
    ax = gp.depth_heatmap(np.ones((2, 3, 4)))
    assert ax.images[0].get_array().shape == (3, 4)
    save_and_check(ax.figure, os.path.join(review_dir, "plot_depth_from_array.png"), min_std=0.01)
    with pytest.raises(GradscopeError, match=r"an array \[K\] singular values, got an array of shape \[2, 2\]"):
        gp.hidden_spectrum(np.ones((2, 2)))
    with pytest.raises(GradscopeError, match="non-empty dict"):
        gp.param_flow({"w": [1.0], "b": [1.0, 2.0]})


# ---------------------------------------------------------------------------------- dashboard
def test_dashboard_watched_with_probes(watched, review_dir):
    fig = gp.dashboard(watched)
    assert isinstance(fig, Figure)
    # 4 heatmaps + their 4 colour bars (one scale per site) + Jacobian + Lyapunov + param flow + findings text
    assert len(fig.axes) == 12 and len(colorbars(fig)) == 4
    text = " ".join(t.get_text() for a in fig.axes for t in a.texts)
    assert "rnn.l0" in text and "vanishing" in text or "stable" in text
    save_and_check(fig, os.path.join(review_dir, "plot_dashboard_watched.png"))


def test_dashboard_of_a_diagnosis_and_of_a_probe(probed, review_dir):
    diag = gradscope.diagnose(probed)
    fig = gp.dashboard(diag)
    # one pass: the gradient profile by position (a line per site), not a one-row heatmap
    assert len(fig.axes) == 5 and not colorbars(fig)
    prof = fig.axes[0]
    assert prof.get_yscale() == "log" and not prof.images
    assert [ln.get_label() for ln in prof.get_lines()] == list(probed.sites)
    texts = [t.get_text() for a in fig.axes for t in a.texts]
    assert any(t.startswith("[") and "vanishing at l0" in t for t in texts)
    save_and_check(fig, os.path.join(review_dir, "plot_dashboard_probe.png"))


def test_dashboard_without_probes_or_sites(review_dir):
    rnn = torch.nn.GRU(2, 3)
    with gradscope.watch(rnn, every=1, probe_every=None) as scope:
        for _ in range(3):
            rnn(torch.randn(6, 2, 2))[0].sum().backward()
    fig = gp.dashboard(scope.recording)
    assert any("not recorded" in t.get_text() for a in fig.axes for t in a.texts)
    save_and_check(fig, os.path.join(review_dir, "plot_dashboard_watch_only.png"))
    lin = torch.nn.Linear(3, 1)
    with gradscope.watch(lin, every=1) as scope:
        lin(torch.randn(4, 3)).sum().backward()
    fig = gp.dashboard(scope.recording)
    assert any("No recurrent or attention site" in t.get_text() for a in fig.axes for t in a.texts)
    save_and_check(fig, os.path.join(review_dir, "plot_dashboard_no_sites.png"))


def test_dashboard_truncates_long_findings_and_many_sites():
    sites = {f"s{i}": {"kind": "rnn_tanh", "module": "", "states": ["h"], "layer": 0, "direction": "forward"}
             for i in range(10)}
    g = 10.0 ** -np.arange(30)[::-1] * np.ones((3, 1))
    rec = synthetic(sites=sites, grads={(s, "h"): g for s in sites})
    fig = gp.dashboard(rec, max_sites=4)
    titles = [a.get_title() for a in fig.axes]
    assert sum(t.startswith("s") and "(h)" in t for t in titles) == 4
    assert any("first 4 of 10 sites" in sf._suptitle.get_text() for sf in fig.subfigs if sf._suptitle)
    texts = [t.get_text() for a in fig.axes for t in a.texts]
    assert any(t.startswith("… ") and "more line(s)" in t for t in texts)


def test_dashboard_errors():
    with pytest.raises(GradscopeError, match="empty recording"):
        gp.dashboard(synthetic(grads={}, steps=[], params={}))
    with pytest.raises(GradscopeError, match="expects a gradscope Recording"):
        gp.dashboard("rec.npz")
