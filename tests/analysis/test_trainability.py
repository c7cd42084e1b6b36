"""Diagnosis.trainability: the calibrated prediction, its feature, its wording and its rendering."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.analysis import _trainability_table as table
from gradscope.analysis.trainability import VERDICTS, reach_of


def scaled_orthogonal_rnn(s: float, H: int = 16) -> nn.RNN:
    """A ReLU RNN whose recurrence is exactly linear on positive states: W_hh = s·I, zero bias."""
    rnn = nn.RNN(2, H, nonlinearity="relu").double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(s * torch.eye(H, dtype=torch.float64))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.fill_(1.0)   # states stay positive, so every ReLU is active: J = s·I
        rnn.weight_ih_l0.zero_()
    return rnn


@pytest.mark.parametrize("s,T", [(0.5, 30), (0.9, 60), (1.0, 40), (1.05, 50)])
def test_reach_of_a_linear_recurrence_is_T_log10_s(s, T):
    rec = gradscope.probe(scaled_orthogonal_rnn(s), torch.rand(T, 3, 2, dtype=torch.float64), lyapunov=False)
    diag = gradscope.diagnose(rec)
    t = diag.trainability
    assert t.sites["l0"]["reach"] == pytest.approx(T * math.log10(s), abs=1e-9)
    assert t.evidence["reach"] == pytest.approx(T * math.log10(s), abs=1e-9)
    assert t.evidence["seq_len"] == T


def test_reach_of_takes_the_median_of_finite_positive_norms():
    jn = np.array([[1, 0.1, 0.01], [1, 0.1, 0.001], [1, 0.1, 0.0], [1, 1, np.nan]])
    assert reach_of(jn) == pytest.approx(np.median([-2.0, -3.0]))
    assert math.isnan(reach_of(np.array([[1.0, 0.0]])))
    assert math.isnan(reach_of(np.ones(3)))


def _verdict_for(reach: float, T: int) -> str:
    s = 10 ** (reach / T)
    rec = gradscope.probe(scaled_orthogonal_rnn(s), torch.rand(T, 2, 2, dtype=torch.float64), lyapunov=False)
    return gradscope.diagnose(rec).trainability


def test_verdict_follows_the_calibrated_cells():
    # far below the window at a length the calibration covers with many failed runs
    t = _verdict_for(table.LO - 10, 60)
    n, learned = table.CELLS[("below", 1)]
    assert t.verdict == "unlikely" and n >= table.MIN_RUNS and learned / n <= 1 - table.PURITY
    assert t.confidence == pytest.approx((n - learned + 1) / (n + 2))
    # inside the window at a short length: every calibration run there learned
    t = _verdict_for((table.LO + min(table.HI, 0.0)) / 2, 20)
    n, learned = table.CELLS[("window", 0)]
    expected = "likely" if n >= table.MIN_RUNS and learned / n >= table.PURITY else "uncertain"
    assert t.verdict == expected
    assert any(f"of {n} benchmark run(s)" in r and f"{learned} learned" in r for r in t.reasons)


def test_cells_with_few_calibration_runs_are_uncertain():
    few = [(cell, v) for cell, v in table.CELLS.items() if v[0] < table.MIN_RUNS]
    if not few:
        pytest.skip("every calibration cell has enough runs")
    (rb, tb), _ = few[0]
    from gradscope.analysis.trainability import _cell_verdict
    reach = {"below": table.LO - 1, "window": (table.LO + table.HI) / 2, "above": table.HI + 1}[rb]
    T = ([10] + [e + 1 for e in table.T_EDGES])[tb]
    assert _cell_verdict(reach, T)[0] == "uncertain"


def test_reasons_quote_the_numbers_and_say_it_is_a_prediction():
    t = _verdict_for(-12.0, 60)
    assert "10^-12" in t.reasons[0] and "T = 60" in t.reasons[0]
    assert t.verdict in VERDICTS and 0 <= t.confidence <= 1
    assert "calibration" in t.reasons[1]


def test_gated_sites_say_the_gates_can_lengthen_memory():
    lstm = nn.LSTM(2, 8)   # default init: forget gates near 0.5, reach far below the window at T 80
    t = gradscope.diagnose(gradscope.probe(lstm, torch.randn(80, 4, 2), lyapunov=False)).trainability
    assert t.evidence["reach"] < table.LO
    gated = [r for r in t.reasons if "gates can lengthen memory" in r]
    assert gated and f"{table.GATED_ADDING[1]} of {table.GATED_ADDING[0]}" in gated[0]
    v = [f for f in gradscope.diagnose(gradscope.probe(lstm, torch.randn(80, 4, 2), lyapunov=False)).findings
         if f.kind == "vanishing"]
    assert v and "gates can open during training" in v[0].explanation
    assert "barely influence learning" not in v[0].explanation


def test_no_jacobians_means_uncertain():
    rec = gradscope.probe(nn.RNN(2, 4), torch.randn(20, 2, 2), jacobians=False, lyapunov=False)
    t = gradscope.diagnose(rec).trainability
    assert t.verdict == "uncertain" and "no Jacobian norms" in t.reasons[0]


def test_attention_only_model_has_no_trainability():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    diag = gradscope.diagnose(gradscope.probe(layer, torch.randn(2, 6, 8)))
    assert diag.trainability is None
    assert json.loads(diag.to_json())["trainability"] is None


def test_every_format_carries_the_verdict():
    diag = gradscope.diagnose(gradscope.probe(nn.RNN(2, 8), torch.randn(40, 2, 2), lyapunov=False))
    t = diag.trainability
    assert f"trainability: {t.verdict}" in str(diag)
    md = " ".join(diag.to_markdown().split())  # prose is wrapped at 100 columns
    assert "## Trainability" in md and f"**{t.verdict}**" in md and "not a measurement" in md
    d = json.loads(diag.to_json())
    assert d["trainability"]["verdict"] == t.verdict and d["trainability"]["reasons"] == t.reasons
    assert d["trainability"]["calibration"] == table.SOURCE
    html = diag.to_html()
    assert "Trainability" in html and t.verdict in html and "not a measurement" in html
    assert "Trainability" in diag._repr_html_()


def test_calibration_table_is_consistent():
    assert table.LO < table.HI
    assert list(table.T_EDGES) == sorted(table.T_EDGES) and len(table.T_NAMES) == len(table.T_EDGES) + 1
    for (rb, tb), (n, learned) in table.CELLS.items():
        assert rb in ("below", "window", "above") and 0 <= tb <= len(table.T_EDGES)
        assert 0 <= learned <= n
