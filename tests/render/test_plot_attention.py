"""gradscope.plot.attention_entropy and rank_collapse: real and synthetic recordings, bad values, errors.

Rendered pictures go to ``$GRADSCOPE_REVIEW_DIR`` when set (for looking at them), else to a
temporary folder; each is checked to be non-blank and to have the expected number of Axes.
"""
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

import gradscope  # noqa: E402
from gradscope import GradscopeError, MissingMeasureError, Recording  # noqa: E402
from gradscope import plot as gp  # noqa: E402

REFERENCE_LINES = 2  # the dotted lines at 0 and 1


from plotting import save_and_check  # noqa: E402


def data_lines(ax):
    """Lines that carry data (not the dotted reference lines at 0 and 1)."""
    return [ln for ln in ax.get_lines() if ln.get_linestyle() != ":"]


def notes(ax):
    return [t.get_text() for t in ax.texts]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def finite_points(line):
    return int(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).sum())


def crosses(ax):
    """x positions of the crosses that mark values not drawn (on the bottom edge)."""
    return sorted(x for c in ax.collections for x in c.get_offsets()[:, 0])


# ------------------------------------------------------------------------------- recordings
@pytest.fixture(scope="module")
def trained():
    """A 4-block Post-LN encoder (4 heads) on a token-regression task, watched for 8 SGD steps."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.05)
    with gradscope.watch(enc, every=1) as scope:
        for step in range(8):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(6, 9, 16, generator=g)
            loss = (head(enc(x)).squeeze(-1) - x[..., 0]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return scope.recording


@pytest.fixture(scope="module")
def probed():
    """A probe of a 2-block encoder: one step."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return gradscope.probe(enc, torch.randn(6, 3, 8), jacobians=False)


def attention_rec(L=3, S=5, H=4, measures=None, stacks=("layers",), steps=None):
    """A synthetic attention Recording: ``L`` blocks per stack, entropy ``[S, H]``, residual/cosine ``[S]``."""
    sites, ms = {}, {}
    rng = np.random.default_rng(0)
    for stack in stacks:
        for d in range(L):
            s = f"{stack}.{d}"
            sites[s] = {"kind": "attention", "module": s, "states": ["h"], "layer": d, "direction": "forward",
                        "stack": stack, "depth": d, "heads": H}
            ms[(s, "attention_entropy")] = np.clip(0.9 - 0.1 * d - 0.05 * np.arange(S)[:, None]
                                                   + 0.03 * rng.standard_normal((S, H)), 0, 1)
            ms[(s, "rank_residual")] = np.linspace(0.9, 0.8, S) * 0.7 ** d
            ms[(s, "token_cosine")] = 1 - np.linspace(0.9, 0.8, S) * 0.7 ** d
    ms.update(measures or {})
    return Recording(sites=sites, steps=steps if steps is not None else list(range(0, 3 * S, 3)),
                     grads={}, seq_lens={}, params={}, measures=ms, meta={"source": "synthetic"})


def with_measures(rec, measures, steps=None):
    """``rec``'s sites with only ``measures`` (a dict ``{(site, name): array}``)."""
    return Recording(sites={s: rec.site_info(s) for s in rec.sites}, steps=rec.steps if steps is None else steps,
                     grads={}, seq_lens={}, params={}, measures=measures)


def rnn_recording():
    return gradscope.probe(torch.nn.RNN(2, 4), torch.randn(5, 1, 2), jacobians=False, lyapunov=False)


# ------------------------------------------------------------------------------------ api
def test_exported_with_examples():
    for name in ("attention_entropy", "rank_collapse"):
        assert name in gp.__all__
        assert "Example:" in getattr(gp, name).__doc__


# --------------------------------------------------------------------------- attention_entropy
def test_entropy_small_multiples_one_axes_per_block_in_stack_order(trained, review_dir):
    axes = gp.attention_entropy(trained)
    assert isinstance(axes, np.ndarray) and axes.shape == (4,)
    assert [a.get_title() for a in axes] == list(trained.attention_stacks["layers"])
    fig = axes[0].figure
    assert len(fig.axes) == 4  # four blocks; the head legend hangs on the last one, no colour bar
    for a, site in zip(axes, trained.attention_stacks["layers"]):
        lines = data_lines(a)
        assert len(lines) == 4  # one per head
        E = trained.attention_entropy(site)
        np.testing.assert_allclose(lines[2].get_ydata(), E[:, 2])
        np.testing.assert_array_equal(lines[2].get_xdata(), trained.steps)
        assert a.get_ylim()[0] <= 0 and a.get_ylim()[1] >= 1
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert any("one-hot" in t for t in labels) and any("uniform" in t for t in labels)
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == [f"head {h}" for h in range(4)]
    assert "1 = uniform, 0 = one-hot" in fig.get_suptitle()
    save_and_check(fig, os.path.join(review_dir, "attn_entropy_small_multiples.png"))


def test_entropy_one_site(trained, review_dir):
    ax = gp.attention_entropy(trained, "layers.2")
    assert isinstance(ax, Axes) and len(ax.figure.axes) == 1
    assert ax.get_title() == "layers.2: attention entropy per head"
    assert ax.get_ylabel() == "normalised attention entropy" and ax.get_xlabel() == "training step"
    assert len(data_lines(ax)) == 4
    save_and_check(ax.figure, os.path.join(review_dir, "attn_entropy_one_site.png"))


def test_entropy_draws_into_given_axes(trained):
    fig = plt.figure()
    given = fig.subplots(2, 2)
    out = gp.attention_entropy(trained, ax=given)
    assert list(out) == list(given.ravel())
    assert [a.get_ylabel() for a in out] == ["normalised attention entropy", "", "normalised attention entropy", ""]
    one = fig.add_subplot(3, 3, 9)
    assert gp.attention_entropy(trained, "layers.0", ax=one) is one
    with pytest.raises(GradscopeError, match=r"got 3 Axes for 4 attention block\(s\)"):
        gp.attention_entropy(trained, ax=list(given.ravel())[:3])
    with pytest.raises(GradscopeError, match="with a site, ax must be one matplotlib Axes"):
        gp.attention_entropy(trained, "layers.0", ax=given)


def test_entropy_of_a_probe_draws_one_point_per_head(probed, review_dir):
    axes = gp.attention_entropy(probed)
    assert len(axes) == 2 and len(axes[0].figure.axes) == 2
    for a in axes:
        lines = data_lines(a)
        assert len(lines) == 2 and all(ln.get_marker() == "o" and len(ln.get_xdata()) == 1 for ln in lines)
        xs = [float(ln.get_xdata()[0]) for ln in lines]
        assert xs == [0.0, 1.0]  # one recorded step: the heads along the x axis
        assert a.get_xlim()[0] < 0 and a.get_xlim()[1] > 1
        assert a.get_xlabel().startswith("head")
        E = probed.attention_entropy(a.get_title())
        assert [float(ln.get_ydata()[0]) for ln in lines] == pytest.approx(list(E[0]))
    save_and_check(axes[0].figure, os.path.join(review_dir, "attn_entropy_probe.png"), min_std=0.01)


def test_entropy_nan_and_inf_are_left_out_and_counted(review_dir):
    E = np.array([[0.9, 0.5, np.nan], [0.8, np.inf, 0.2], [0.7, 0.4, 0.1], [0.75, 0.3, 0.05]])
    ax = gp.attention_entropy(E, "array")
    lines = data_lines(ax)
    assert [finite_points(ln) for ln in lines] == [4, 3, 3]  # the line breaks where a value is not finite
    assert np.isfinite(ax.get_ylim()).all()
    assert crosses(ax) == [0, 1]
    assert legend_texts(ax)[-1] == "NaN/inf, not drawn (2 values)"
    save_and_check(ax.figure, os.path.join(review_dir, "attn_entropy_nan_inf.png"))


def test_entropy_all_nan_site_and_site_without_measure():
    rec = attention_rec(L=3, measures={("layers.1", "attention_entropy"): np.full((5, 4), np.nan)})
    rec = with_measures(rec, {k: v for k, v in rec.measures().items() if k != ("layers.2", "attention_entropy")})
    axes = gp.attention_entropy(rec)
    assert len(axes) == 3
    assert any("no finite attention entropy" in t for t in notes(axes[1])) and not data_lines(axes[1])
    assert any("no attention entropy\nrecorded for this block" in t for t in notes(axes[2]))
    assert crosses(axes[1]) == [0, 3, 6, 9, 12]
    assert legend_texts(axes[-1])[-1] == "NaN/inf, not drawn (20 values)"
    with pytest.raises(MissingMeasureError, match="no 'attention_entropy' for attention site 'layers.2'"):
        gp.attention_entropy(rec, "layers.2")


def test_entropy_many_heads_get_a_colour_scale(review_dir):
    rec = attention_rec(L=6, H=12, stacks=("enc", "dec"))
    axes = gp.attention_entropy(rec)
    assert len(axes) == 12
    fig = axes[0].figure
    cbs = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(cbs) == 1 and len(fig.axes) == 13 and cbs[0].get_ylabel() == "head"
    assert [a.get_title() for a in axes][:7] == [f"enc.{d}" for d in range(6)] + ["dec.0"]
    spec = axes[6].get_subplotspec()  # each stack starts a row of its own: 4 + 2 panels, then 4 + 2
    assert (spec.rowspan.start, spec.colspan.start) == (2, 0)
    assert all(len(data_lines(a)) == 12 for a in axes)
    save_and_check(fig, os.path.join(review_dir, "attn_entropy_12_heads_two_stacks.png"))


def test_entropy_of_cross_attention_by_module(review_dir):
    torch.manual_seed(0)
    t = torch.nn.Transformer(8, 2, 1, 2, 16, dropout=0.0, batch_first=True)
    rec = gradscope.probe(t, (torch.randn(2, 5, 8), torch.randn(2, 4, 8)), jacobians=False)
    assert rec.attention_stacks == {"encoder.layers": ("encoder.layers.0",),
                                    "decoder.layers": ("decoder.layers.0", "decoder.layers.1")}
    ax = gp.attention_entropy(rec, "decoder.layers.1", module="multihead_attn")
    assert ax.get_title().startswith("decoder.layers.1 [multihead_attn]")
    np.testing.assert_allclose(data_lines(ax)[1].get_ydata(),
                               rec.attention_entropy("decoder.layers.1", "multihead_attn")[:, 1])
    axes = gp.attention_entropy(rec, module="multihead_attn")  # the encoder block has no cross-attention
    assert len(axes) == 3 and any("no attention entropy" in t for t in notes(axes[0]))
    # one step: the x axis is the head (two here), the same on the panel without the measure
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "1"]
    assert axes[0].get_xlabel().startswith("head")
    save_and_check(axes[0].figure, os.path.join(review_dir, "attn_entropy_cross_attention.png"), min_std=0.01)


def test_entropy_errors(trained):
    with pytest.raises(MissingMeasureError, match=r"attention_entropy needs attention sites.*kind \['rnn_tanh'\]"
                                                  r".*gradscope.watch\(model\).*gradscope.probe\(model, batch\)"):
        gp.attention_entropy(rnn_recording())
    with pytest.raises(GradscopeError, match=r"unknown site 'layers\.9'.*Did you mean"):
        gp.attention_entropy(trained, "layers.9")
    with pytest.raises(GradscopeError, match="empty recording"):
        gp.attention_entropy(Recording(sites={}, steps=[], grads={}, seq_lens={}, params={}))
    with pytest.raises(GradscopeError, match=r"an array \[S, H\].*got an array of shape \[2, 3, 4\]"):
        gp.attention_entropy(np.ones((2, 3, 4)))
    with pytest.raises(MissingMeasureError, match="no attention site of this recording has the attention entropy "
                                                  "for attention module 'cross'"):
        gp.attention_entropy(trained, module="cross")


def test_entropy_accepts_a_diagnosis(probed):
    axes = gp.attention_entropy(gradscope.diagnose(probed))
    assert len(axes) == 2


# ------------------------------------------------------------------------------ rank_collapse
def test_rank_collapse_by_depth_first_and_last_step(trained, review_dir):
    ax = gp.rank_collapse(trained)
    assert isinstance(ax, Axes) and len(ax.figure.axes) == 1
    lines = data_lines(ax)
    assert len(lines) == 4  # residual and cosine, at the last (solid) and first (dashed) step
    res = np.array([trained.rank_residual(s) for s in trained.attention_stacks["layers"]]).T  # [S, L]
    cos = np.array([trained.token_cosine(s) for s in trained.attention_stacks["layers"]]).T
    np.testing.assert_allclose(lines[0].get_ydata(), res[-1])
    np.testing.assert_allclose(lines[1].get_ydata(), cos[-1])
    np.testing.assert_allclose(lines[2].get_ydata(), res[0])
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(4))
    assert lines[0].get_linestyle() == "-" and lines[2].get_linestyle() == "--"
    labels = legend_texts(ax)
    assert labels[0] == "rank residual ‖X − 1x̄ᵀ‖/‖X‖, last step (7)"
    assert labels[3] == "token cosine, first step (0)"
    assert ax.get_xlabel() == "block (depth ℓ) of stack 'layers'"
    save_and_check(ax.figure, os.path.join(review_dir, "attn_rank_collapse_trained.png"))


def test_rank_collapse_of_a_probe_has_one_step(probed, review_dir):
    ax = gp.rank_collapse(probed)
    assert len(data_lines(ax)) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()][1] == "token cosine, step 0"
    save_and_check(ax.figure, os.path.join(review_dir, "attn_rank_collapse_probe.png"))


def test_rank_collapse_nan_inf_and_collapsed_blocks(review_dir):
    L, S = 8, 4
    res = {f"layers.{d}": np.full(S, 0.6 * 0.5 ** d) for d in range(L)}
    res["layers.3"] = np.array([0.1, np.nan, 0.1, np.nan])   # not measured at the last step
    res["layers.5"] = np.array([0.01, 0.01, 0.01, np.inf])
    measures = {(s, "rank_residual"): v for s, v in res.items()}
    measures.update({(s, "token_cosine"): 1 - np.nan_to_num(v, posinf=0) for s, v in res.items()})
    rec = attention_rec(L=L, S=S, measures=measures)
    ax = gp.rank_collapse(rec)
    lines = data_lines(ax)
    assert finite_points(lines[0]) == L - 2  # last step: layers.3 (NaN) and layers.5 (inf) break the line
    assert crosses(ax) == [3, 5]
    assert legend_texts(ax)[-1] == "NaN/inf, not drawn (2 values)"
    assert any("collapsed" in t for t in notes(ax))
    assert np.isfinite(ax.get_ylim()).all()
    save_and_check(ax.figure, os.path.join(review_dir, "attn_rank_collapse_nan_inf.png"))


def test_rank_collapse_only_one_measure_and_later_steps_unmeasured():
    measures = {(f"layers.{d}", "token_cosine"): np.array([0.2, 0.3, np.nan]) for d in range(3)}
    rec = with_measures(attention_rec(L=3, S=3), measures, steps=[0, 5, 10])
    ax = gp.rank_collapse(rec)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["token cosine, last step (5)", "token cosine, first step (0)"]  # step 10 measured nothing


def test_rank_collapse_into_given_axes_and_stacks(review_dir):
    rec = attention_rec(L=5, stacks=("encoder.layers", "decoder.layers"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), layout="constrained")
    assert gp.rank_collapse(rec, "encoder.layers", ax=axes[0]) is axes[0]
    assert gp.rank_collapse(rec, stack="decoder.layers", ax=axes[1]) is axes[1]
    assert len(fig.axes) == 2
    with pytest.raises(GradscopeError, match=r"2 attention stacks.*name one, e.g. stack='encoder.layers'"):
        gp.rank_collapse(rec)
    with pytest.raises(GradscopeError, match=r"unknown attention stack 'encoder.layer'.*Did you mean 'encoder.layers'"):
        gp.rank_collapse(rec, "encoder.layer")
    save_and_check(fig, os.path.join(review_dir, "attn_rank_collapse_two_stacks.png"))


def test_rank_collapse_errors():
    with pytest.raises(MissingMeasureError, match=r"rank_collapse needs attention sites.*gradscope.watch\(model\)"):
        gp.rank_collapse(rnn_recording())
    with pytest.raises(GradscopeError, match="rank_collapse expects a gradscope Recording .* got ndarray"):
        gp.rank_collapse(np.ones((3, 4)))
    with pytest.raises(GradscopeError, match="empty recording"):
        gp.rank_collapse(attention_rec(S=0, steps=[]))
    bare = with_measures(attention_rec(L=2), {})
    with pytest.raises(MissingMeasureError, match=r"no block of stack 'layers' has the rank residual or the token "
                                                  r"cosine \(blocks: \['layers.0', 'layers.1'\]\)"):
        gp.rank_collapse(bare)
