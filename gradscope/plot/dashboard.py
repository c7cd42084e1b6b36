"""dashboard(): the one-figure summary — gradient heatmaps, Jacobian decay, exponents, parameters, findings."""
from __future__ import annotations

import math
import textwrap
from typing import List, Optional, Tuple

import numpy as np

from ..analysis.diagnose import Diagnosis, diagnose
from ..errors import MissingMeasureError
from . import _common as C
from .dynamics import jacobian_decay, lyapunov_spectrum
from .flow import depth_heatmap, draw_profile, param_flow, small_multiples

__all__ = ["dashboard", "findings_panel"]

MAX_HEATMAPS = 8


def _summary_lines(diag) -> List[Tuple[str, str, str]]:
    """``(text, colour, weight)`` lines: one per site, then one block per finding."""
    lines: List[Tuple[str, str, str]] = []
    names = list(diag.sites)
    w = max([len(n) for n in names] + [4])
    for n in names:
        s = diag.site_summary(n)
        reg = s["regime"]
        lines.append((f"{n:<{w}}  {reg:<9}  horizon {C.fmt(s['horizon']):>4} of {C.fmt(s['seq_len']):<4} "
                      f"λ₁ {C.fmt(s['lambda1'])}", C.REGIME_COLORS.get(reg, "0.2"), "bold"))
    t = getattr(diag, "trainability", None)
    if t is not None:
        reach = t.evidence.get("reach")
        lines.append((f"trainability (prediction): {t.verdict}, confidence {t.confidence:.2f}"
                      + (f", reach 10^{reach:.2g} over T {C.fmt(t.evidence.get('seq_len'))}" if reach is not None else ""),
                      "0.1", "bold"))
    if names:
        lines.append(("", "0.2", "normal"))
    if not diag.findings:
        lines.append(("No findings: every site is stable on this evidence." if names
                      else "No recurrent or attention site to diagnose.", "0.2", "normal"))
    sev_color = {"critical": "#b00020", "warning": "#b35c00", "info": "0.35"}
    for f in diag.findings:
        ev = f.evidence
        bits = []
        for key, label in (("horizon", "horizon"), ("seq_len", "T"), ("rate", "rate/step"), ("lambda1", "λ₁"),
                           ("memory_time", "τ"), ("saturated", "saturated"), ("spike_ratio", "spike ×")):
            if key in ev:
                bits.append(f"{label} {C.fmt(ev[key])}")
        lines.append((f"[{f.severity}] {f.kind} at {f.site}" + (f": {', '.join(bits)}" if bits else ""),
                      sev_color.get(f.severity, "0.2"), "normal"))
        if f.remedies:
            r = f.remedies[0]
            lines.append(("    → " + str(getattr(r, "title", getattr(r, "name", r))), "0.25", "normal"))
    return lines


def findings_panel(ax, diag, *, max_lines: Optional[int] = None, width: int = 88):
    """Write a Diagnosis as text into ``ax``: the regime of every site, then each finding and its
    first remedy. Lines that do not fit are summarised as "… n more".

    Args:
        ax: the Axes (its frame and ticks are switched off).
        diag: a :class:`~gradscope.Diagnosis`.
        max_lines: the most lines to write (default: as many as fit the Axes at 8 pt).
        width: wrap long lines at this many characters.

    Returns:
        The Axes.

    Example:
        >>> import torch, gradscope
        >>> import matplotlib.pyplot as plt
        >>> diag = gradscope.diagnose(gradscope.probe(torch.nn.RNN(2, 4), torch.randn(10, 2, 2)))
        >>> ax = findings_panel(plt.figure().add_subplot(), diag)
        >>> ax.texts[0].get_text().startswith("l0")
        True
    """
    ax.set_axis_off()
    raw = _summary_lines(diag)
    lines = []
    for text, color, weight in raw:
        parts = textwrap.wrap(text, width=width, subsequent_indent="      ") or [""]
        lines += [(p, color, weight) for p in parts]
    size = 8.0
    step = size * 1.45
    if max_lines is None:
        h_pt = ax.get_position().height * ax.figure.get_figheight() * 72
        max_lines = max(3, int(h_pt / step) - 1)
    if len(lines) > max_lines:
        hidden = len(lines) - (max_lines - 1)
        lines = lines[:max_lines - 1] + [(f"… {hidden} more line(s): print(diagnosis) for the full report",
                                          "0.35", "normal")]
    for i, (text, color, weight) in enumerate(lines):
        ax.annotate(text, xy=(0.0, 1.0), xycoords="axes fraction", xytext=(0, -i * step), textcoords="offset points",
                    va="top", ha="left", fontsize=size, family="DejaVu Sans Mono", color=color,
                    fontweight=weight, parse_math=False, annotation_clip=False)
    return ax


def dashboard(rec_or_diag, *, fig=None, max_sites: int = MAX_HEATMAPS, scale: str = "site"):
    """One figure that sums up a recording: where the gradient goes, how fast it decays, and what to do.

    Rows, top to bottom: the gradient heatmaps of up to ``max_sites`` sites (small multiples, each
    with its own colour scale unless ``scale="shared"``) — or, for a recording of a single pass
    (a probe), the gradient profile ‖∂L/∂h_t‖ by time step, a line per site on a log axis; the
    Jacobian norm by lag and the Lyapunov spectrum of every probed site (or a
    note saying how to record them when the recording has no probe) and, for attention models,
    the depth flow of up to two attention stacks; the parameter gradient flow
    and the findings as text (regime per site, each finding with its key numbers and first remedy).

    Args:
        rec_or_diag: a :class:`~gradscope.Recording` (diagnosed here with the default rules) or a
            :class:`~gradscope.Diagnosis` (its ``recording`` is drawn).
        fig: a Figure to draw into (default: a new pyplot figure). It should have been made with
            ``layout="constrained"``.
        max_sites: the most heatmaps (or profile lines) to draw; the rest are named in the title
            of the row.
        scale: ``"site"`` (default) or ``"shared"``: the heatmaps' colour ranges (see
            :func:`~gradscope.plot.gradient_heatmap`).

    Returns:
        The Figure.

    Raises:
        GradscopeError: an empty recording (nothing was recorded), or a Diagnosis without its
            Recording.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.LSTM(2, 8), torch.randn(20, 2, 2))
        >>> fig = gradscope.plot.dashboard(rec)
        >>> len(fig.axes) >= 5
        True
    """
    if isinstance(rec_or_diag, Diagnosis):
        diag = rec_or_diag
        rec = C.recording_of(diag, "dashboard")
    else:
        rec = C.recording_of(rec_or_diag, "dashboard")
        diag = diagnose(rec)
    sites = list(rec.sites)
    shown = sites[:max_sites]
    S = len(rec.steps)
    profile = S == 1  # one pass: a heatmap would be one row; draw the profile by position instead
    ncols = 1 if len(shown) <= 1 or profile else 2
    nrows_hm = (1 if profile else math.ceil(len(shown) / ncols)) if shown and S else 0
    row_h = 1.5 if S <= 2 else 2.2
    hm_h = 3.4 if profile else 0.6 + row_h * nrows_hm
    probed = any(rec.has_measure(s, m) for s in sites for m in ("jacobian_norms", "lyapunov"))
    stacks = list(getattr(rec, "attention_stacks", None) or {})
    mid_h = 3.6 if probed or stacks else 0.7
    groups = min(len(rec.param_grad_norms()), 24)
    bot_h = max(3.6, 1.2 + 0.2 * groups)
    if fig is None:
        fig = C.new_figure((14.0, hm_h + mid_h + bot_h + 0.5))
    model = rec.meta.get("model", "model")
    fig.suptitle(f"gradscope — {model}: {len(sites)} site(s), {S} recorded step(s), source {rec.meta.get('source', '?')}",
                 fontsize=11, parse_math=False)
    heights = ([hm_h] if nrows_hm else []) + [mid_h, bot_h]
    subs = list(np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights)))
    if nrows_hm:
        top = subs.pop(0)
        more = "" if len(shown) == len(sites) else f" (first {len(shown)} of {len(sites)} sites)"
        if profile:
            a = draw_profile(top.subplots(), rec, shown, "h")
            a.set_title(a.get_title(loc="left") + more, fontsize=9, loc="left")
        else:
            grid = top.subplots(nrows_hm, ncols, squeeze=False)
            flat = list(grid.ravel())
            for extra in flat[len(shown):]:
                extra.remove()
            axes = flat[:len(shown)]
            small_multiples(rec, shown, axes, "h", scale=scale)
            scale_txt = "each site its own colour scale" if scale == "site" else "one colour scale for all sites"
            top.suptitle(f"Gradient reaching each site, by position t and training step ({scale_txt})" + more,
                         fontsize=9, x=0.01, ha="left")
    mid, bot = subs
    panels = []
    if probed:
        panels += [(jacobian_decay, {}, "Jacobian norms by lag", 1.4), (lyapunov_spectrum, {}, "Lyapunov exponents", 1.0)]
    for stack in stacks[:2]:
        panels.append((depth_heatmap, {"stack": stack}, f"depth flow of {stack}", 1.2))
    if not panels:
        a = mid.subplots()
        a.set_axis_off()
        C.message(a, ("Jacobian norms by lag and Lyapunov exponents: not recorded. " + C.PROBE_HINT) if sites
                  else "No recurrent or attention site: no Jacobians or exponents to draw.")
    else:
        axes = np.atleast_1d(mid.subplots(1, len(panels), width_ratios=[p[3] for p in panels]))
        for (fn, kw, what, _w), a in zip(panels, axes):
            try:
                fn(rec, ax=a, **kw)
            except MissingMeasureError:
                a.set_axis_off()
                C.message(a, f"{what}: not recorded.\n{C.PROBE_HINT}")
    a_pf, a_txt = bot.subplots(1, 2, width_ratios=[1.0, 1.15])
    if S:
        param_flow(rec, ax=a_pf, max_groups=24)
    else:
        a_pf.set_axis_off()
        C.message(a_pf, "no recorded step: no parameter gradients")
    findings_panel(a_txt, diag, max_lines=int((bot_h - 0.3) * 72 / (8 * 1.45)))
    return fig

