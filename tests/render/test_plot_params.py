"""plot.param_norms: each parameter's gradient norm or update-to-weight ratio over training."""
import os

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradscope  # noqa: E402
from gradscope import GradscopeError, MissingMeasureError, Recording  # noqa: E402
from gradscope import plot as gp  # noqa: E402

from plotting import save_and_check  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    """An LSTM with a readout trained 12 steps with Adam; ``spare`` is outside the optimizer."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(2, 8)
            self.head = torch.nn.Linear(8, 1)
            self.spare = torch.nn.Linear(8, 1)

        def forward(self, x):
            h = self.lstm(x)[0]
            return self.head(h) + 0.0 * self.spare(h)

    model = Net()
    opt = torch.optim.Adam(list(model.lstm.parameters()) + list(model.head.parameters()), lr=1e-2)
    with gradscope.watch(model, every=1, probe_every=None) as scope:
        for _ in range(12):
            x = torch.randn(10, 4, 2)
            (model(x) - x[..., :1]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return scope.recording


def _lines(ax):
    """The data lines (not the edge marks or the reference line)."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_one_line_per_parameter(trained, review_dir):
    ax = gp.param_norms(trained)
    lines = _lines(ax)
    names = list(trained.param_grad_norms())
    # spare's gradient is exactly 0 (it enters the loss times 0.0): labelled, drawn as edge marks
    assert [ln.get_label() for ln in lines] == [n + (" (always 0)" if n.startswith("spare") else "") for n in names]
    assert ax.get_yscale() == "log"
    np.testing.assert_array_equal(lines[0].get_xdata(), trained.steps)
    np.testing.assert_array_equal(lines[0].get_ydata(), trained.param_grad_norms()[names[0]])
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_norms.png"))


def test_update_ratio(trained, review_dir):
    ax = gp.param_norms(trained, quantity="update_ratio")
    lines = _lines(ax)
    ratios = trained.update_ratios()
    assert [ln.get_label() for ln in lines] == [n + (" (always 0)" if n.startswith("spare") else "") for n in ratios]
    y = lines[0].get_ydata()
    np.testing.assert_allclose(y, ratios["lstm.weight_ih_l0"])
    assert any(ln.get_label() == "_rule" and ln.get_ydata()[0] == 1e-3 for ln in ax.get_lines())
    # the parameter outside the optimizer: 0 at every step, drawn as marks on the bottom edge
    assert np.all(ratios["spare.weight"] == 0)
    marks = [ln for ln in ax.get_lines() if ln.get_label() == "_mark" and ln.get_marker() == "s"]
    assert sum(len(m.get_xdata()) for m in marks) == 2 * len(trained.steps)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "1e-3 (rule of thumb)" in legend and any(t.startswith("zero, 24×") for t in legend)
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_update_ratio.png"))


def test_grouped_beyond_max_lines(trained, review_dir):
    ax = gp.param_norms(trained, quantity="update_ratio", max_lines=3)
    labels = [ln.get_label() for ln in _lines(ax)]
    assert labels == ["lstm (4 params)", "head (2 params)", "spare (2 params) (always 0)"]
    assert "8 parameters grouped into 3 modules" in ax.get_title(loc="left")
    # a group's ratio is the ratio of its weights taken together
    un, wn = trained.update_norms(), trained.weight_norms()
    members = [n for n in un if n.startswith("lstm.")]
    want = (np.sqrt(sum(un[m] ** 2 for m in members)) / np.sqrt(sum(wn[m] ** 2 for m in members)))
    np.testing.assert_allclose(_lines(ax)[0].get_ydata(), want, rtol=1e-12)
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_update_ratio_grouped.png"))


def test_many_parameters_and_nonfinite_marks(review_dir):
    S = 20
    rng = np.random.default_rng(0)
    pn = {f"blocks.{b}.{m}.weight": np.exp(rng.normal(size=S) * 0.3 - b) for b in range(12) for m in ("attn", "mlp")}
    pn["blocks.3.attn.weight"][12] = np.inf
    ax = gp.param_norms(pn)   # a plain dict {name: [S]}
    lines = _lines(ax)
    assert 2 <= len(lines) <= 12 and all("params)" in ln.get_label() for ln in lines)
    bad = [ln for ln in ax.get_lines() if ln.get_label() == "_mark" and ln.get_marker() == "X"]
    assert len(bad) == 1 and list(bad[0].get_xdata()) == [12]
    assert any("NaN / inf, 1×" == t.get_text() for t in ax.get_legend().get_texts())
    save_and_check(ax.figure, os.path.join(review_dir, "plot_param_norms_grouped.png"))
    ax = gp.param_norms(pn, max_lines=24)   # every parameter: colours repeat with another line style
    styles = {ln.get_linestyle() for ln in _lines(ax)}
    assert len(_lines(ax)) == 24 and len(styles) == 3


def test_nan_gradient_marked_from_its_event_on():
    params = {"w": np.array([1.0, np.nan, 2.0, np.nan]), "b": np.array([np.nan, np.nan, 1.0, 1.0])}
    rec = Recording(sites={}, steps=range(4), grads={}, seq_lens={}, params=params,
                    events=[{"kind": "nonfinite", "step": 3, "param": "w", "value": "nan"}])
    ax = gp.param_norms(rec)
    bad = [ln for ln in ax.get_lines() if ln.get_label() == "_mark"]
    assert len(bad) == 1 and list(bad[0].get_xdata()) == [3]   # step 1: no gradient, a gap


def test_errors(trained):
    probe = gradscope.probe(torch.nn.RNN(2, 4), torch.randn(5, 2, 2))
    with pytest.raises(MissingMeasureError, match="no update-to-weight ratios.*update_ratio=True"):
        gp.param_norms(probe, quantity="update_ratio")
    with pytest.raises(GradscopeError, match="unknown quantity 'update_ratios'.*Did you mean 'update_ratio'"):
        gp.param_norms(trained, quantity="update_ratios")
    with pytest.raises(GradscopeError, match="max_lines must be a positive integer, got 0"):
        gp.param_norms(trained, max_lines=0)
    with pytest.raises(GradscopeError, match="param_norms expects a gradscope Recording"):
        gp.param_norms([1.0, 2.0])
