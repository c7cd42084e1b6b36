"""The watch schedule: fixed every=N, and the overhead budget (deep passes and probes spaced by cost)."""
import pytest
import torch
from torch import nn

import gradscope
from gradscope import GradscopeError
from gradscope.capture.schedule import RESERVE, Schedule


def simulate(s: Schedule, steps: int, plain=1.0, deep_extra=0.4, probe_extra=20.0):
    """Feed the schedule a loop whose step takes ``plain`` seconds, plus the extra of its work."""
    now, marks = 0.0, []
    for step in range(steps):
        deep, probe = s.begin(step, now)
        marks.append((deep, probe))
        now += plain + (deep_extra if deep else 0.0) + (probe_extra if probe else 0.0)
    s.begin(steps, now)  # closes the last step's account
    return marks


def test_fixed_schedule():
    s = Schedule(every=3, probe_every=4)
    marks = simulate(s, 9)
    assert [i for i, (d, _) in enumerate(marks) if d] == [0, 3, 6]
    assert [i for i, (_, p) in enumerate(marks) if p] == [0, 4, 8]
    s.thin()
    assert [i for i in range(10, 30) if s.begin(i, 100.0 + i)[0]] == [12, 18, 24]
    assert Schedule(every=1, probe_every=None).meta()["mode"] == "fixed"


@pytest.mark.parametrize("overhead", [0.01, 0.03, 0.1])
def test_budget_keeps_the_realised_overhead_near_the_budget(overhead):
    s = Schedule(overhead=overhead, max_interval=10 ** 6)
    marks = simulate(s, 20_000)
    meta = s.meta()
    assert meta["mode"] == "budget" and marks[0] == (True, True)   # the first step gets both
    # deep passes and probes each get half the budget less the reserve for untimed costs: their
    # counts follow from their costs
    spend = overhead * (1 - RESERVE)
    assert meta["deep_passes"] == pytest.approx(20_000 * spend / 2 / 0.4, rel=0.15)
    assert meta["probes"] == pytest.approx(20_000 * spend / 2 / 20.0, rel=0.25, abs=2)
    assert meta["realised_overhead"] == pytest.approx(spend, rel=0.15)
    assert meta["realised_overhead"] < overhead
    assert meta["deep_passes"] == sum(d for d, _ in marks) and meta["probes"] == sum(p for _, p in marks)


def test_the_light_tier_is_paid_from_the_same_budget():
    """Hooks costing 1% of every plain step leave 1.55% of a 3% budget (2.55% after the reserve)
    for deep passes and probes."""
    def run(light):
        s = Schedule(overhead=0.03, max_interval=10 ** 6)
        now = 0.0
        for step in range(20_000):
            deep, probe = s.begin(step, now)
            if not (deep or probe):
                s.light(light)
            now += 1.0 + light + (0.4 if deep else 0.0) + (20.0 if probe else 0.0)
        s.begin(20_000, now)
        return s.meta()

    free, paid = run(0.0), run(0.01)
    spend = 0.03 * (1 - RESERVE)
    assert paid["deep_passes"] == pytest.approx(free["deep_passes"] * (spend - 0.01) / spend, rel=0.1)
    # every plain step paid (steps with both a deep pass and a probe counted once: rel 1e-3)
    assert paid["light_seconds"] == pytest.approx(0.01 * (20_000 - paid["deep_passes"] - paid["probes"]), rel=1e-3)
    assert paid["realised_overhead"] == pytest.approx(spend, rel=0.15)   # light tier included
    # hooks that cost more than the budget leave nothing for deep passes beyond the first, and
    # the meta says what the hooks alone took
    over = run(0.05)
    assert over["deep_passes"] == 1
    assert over["light_overhead"] == pytest.approx(0.05, rel=0.05)
    assert paid["light_overhead"] == pytest.approx(0.01, rel=0.05) and free["light_overhead"] == 0.0


def test_budget_adapts_to_the_measured_cost():
    cheap, dear = Schedule(), Schedule()
    simulate(cheap, 5000, deep_extra=0.1)
    simulate(dear, 5000, deep_extra=1.0)
    assert cheap.meta()["deep_passes"] > 5 * dear.meta()["deep_passes"]


def test_max_interval_bounds_the_gap_even_over_budget():
    s = Schedule(max_interval=50)
    marks = simulate(s, 1000, deep_extra=500.0, probe_extra=500.0)
    deep = [i for i, (d, _) in enumerate(marks) if d]
    probes = [i for i, (_, p) in enumerate(marks) if p]
    assert deep[0] == 0 and max(b - a for a, b in zip(deep, deep[1:])) <= 50
    assert max(b - a for a, b in zip(probes, probes[1:])) <= 50
    assert s.meta()["realised_overhead"] > 0.03   # said, not hidden


def test_passes_of_one_step_share_its_decision():
    s = Schedule(every=2, probe_every=None)
    assert s.begin(0, 0.0) == s.begin(0, 0.5) == (True, False)   # gradient accumulation
    assert s.begin(1, 1.0) == (False, False)


def test_free_looking_work_is_still_charged():
    # timing noise can make a deep step look no slower than a plain one: it still costs something
    s = Schedule(probe_every=None)
    marks = simulate(s, 2000, deep_extra=0.0)
    assert s.meta()["deep_passes"] < 2000 * 0.015 / 0.1 * 1.2


@pytest.mark.parametrize("kw,match", [
    ({"every": 0}, "every must be a positive integer"),
    ({"every": 2.5}, "every must be a positive integer"),
    ({"probe_every": "sometimes"}, "probe_every must be a positive integer, 'auto'"),
    ({"overhead": 0}, r"overhead must be a fraction in \(0, 1\]"),
    ({"overhead": 1.5}, r"overhead must be a fraction in \(0, 1\]"),
    ({"max_interval": 0}, "max_interval must be a positive integer"),
])
def test_bad_options_are_refused_before_anything_is_hooked(kw, match):
    rnn = nn.RNN(2, 3)
    with pytest.raises(GradscopeError, match=match):
        gradscope.watch(rnn, **kw)
    assert not rnn._forward_pre_hooks and not rnn._forward_hooks


def test_default_watch_records_the_schedule_and_states_it_in_reports():
    torch.manual_seed(0)
    model = nn.LSTM(3, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model) as scope:
        for _ in range(30):
            out, _ = model(torch.randn(12, 4, 3))
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    sched = scope.recording.meta["schedule"]
    assert sched["mode"] == "budget" and sched["overhead_budget"] == 0.03
    assert sched["probes"] >= 1 and sched["deep_passes"] >= 1
    assert sched["deep_passes"] == len(scope.recording)      # every deep pass is a history row
    assert scope.recording.steps[0] == 0 and scope.step == 30
    diag = scope.diagnose()
    assert "jacobian_norms" in diag.site_summary("l0")["evidence_used"]
    text = str(diag)
    assert "deep pass" in text and "overhead" in text
    assert "overhead" in diag.to_markdown() and "overhead" in diag.to_html()


@pytest.mark.parametrize("kw,says", [
    ({}, "budget 3% of the loop's time"),
    ({"every": 3}, "deep pass every 3 step(s) (fixed), probes within a 3% budget"),
    ({"probe_every": 5}, "deep passes within a 3% budget, probe every 5 step(s)"),
    ({"probe_every": None}, "deep passes within a 3% budget, no probes"),
    ({"every": 2, "probe_every": 5}, "fixed: every 2 step(s), probe every 5"),
])
def test_the_schedule_line_says_which_part_the_budget_spaces(kw, says):
    """every=3 with budgeted probes is not 'a 3% budget' for everything: a fixed deep pass may cost
    far more, and the realised overhead next to it must not read as a broken budget."""
    model = nn.RNN(3, 4)
    with gradscope.watch(model, **kw) as scope:
        for _ in range(4):
            model(torch.randn(5, 2, 3))[0].sum().backward()
    assert scope.diagnose().schedule_line().startswith(f"schedule: {says} — ")


def test_the_schedule_line_says_when_the_hooks_alone_exceed_the_budget():
    model = nn.RNN(3, 4)
    with gradscope.watch(model) as scope:
        for _ in range(4):
            model(torch.randn(5, 2, 3))[0].sum().backward()
    diag = scope.diagnose()
    sched = diag.meta["schedule"]
    assert isinstance(sched["light_overhead"], float) and sched["light_overhead"] > 0
    sched.update(light_overhead=0.052, overhead_budget=0.03)
    line = diag.schedule_line()
    assert "of which 5.2% the hooks on every step alone — over the budget" in line
    sched.update(light_overhead=0.004)
    assert "hooks on every step" not in diag.schedule_line()
