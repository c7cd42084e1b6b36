"""Gradient flow pictures: ‖∂L/∂h_t‖ over time and training, parameter gradients, depth × position.

Index letters: S recorded training steps, T time steps, L layers, G parameter groups.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import GradscopeError, MissingMeasureError
from . import _common as C

__all__ = ["gradient_heatmap", "gradient_profile", "param_flow", "depth_heatmap", "SCALES"]

#: colour scales of the heatmaps of several sites: each its own range, or one range for all
SCALES = ("site", "shared")

_STATE_TEX = {"h": r"$\|\partial L/\partial h_t\|$", "c": r"$\|\partial L/\partial c_t\|$"}


def _check_steps(rec, what: str) -> None:
    if len(rec.steps) == 0:
        raise GradscopeError(
            f"{what}: empty recording: no training step was recorded, so there is no gradient to draw. "
            f"Inside `with gradscope.watch(model)`, run at least one forward and backward pass, or "
            f"use gradscope.probe(model, batch).")


def _decade_ticks(lo: float, hi: float) -> Tuple[List[float], List[str]]:
    """Colour-bar ticks for log10 values in [lo, hi]: whole decades, or 1-2-5 within a decade."""
    ticks = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(ticks) > 8:
        step = math.ceil(len(ticks) / 7)
        ticks = ticks[::step]
    if len(ticks) >= 2:
        return [float(t) for t in ticks], [f"$10^{{{t}}}$" for t in ticks]
    for mantissas in ((1, 2, 5), range(1, 10)):
        out = [math.log10(m) + e for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mantissas]
        out = [v for v in out if lo - 1e-9 <= v <= hi + 1e-9]
        if len(out) >= 2:
            return out, [f"{10 ** v:.2g}" for v in out]
    out = list(np.linspace(lo, hi, 4))  # a range narrower than the gap between two 1–9 ticks
    return out, [f"{10 ** v:.3g}" for v in out]


def _draw_grid(ax, values: np.ndarray, valid: Optional[np.ndarray], vmin: float, vmax: float,
               cmap: str = "viridis"):
    """Draw ``values`` ``[rows, cols]`` as log10 colours; zeros / NaN / inf / padding as flat colours.

    Returns ``(mappable or None, categories present)``.
    """
    from matplotlib.colors import ListedColormap

    masks = C.classify(values, valid)
    rows, cols = values.shape
    extent = (-0.5, cols - 0.5, -0.5, rows - 0.5)
    im = None
    if masks["ok"].any():
        im = ax.imshow(C.safe_log10(values, masks["ok"]), aspect="auto", origin="lower", cmap=cmap,
                       vmin=vmin, vmax=vmax, interpolation="nearest", extent=extent)
    present = [k for k in ("zero", "nonfinite", "notrun") if masks[k].any()]
    if present:
        codes = np.zeros(values.shape)
        for i, k in enumerate(("zero", "nonfinite", "notrun"), 1):
            codes[masks[k]] = i
        cm = ListedColormap([C.BAD_COLORS[k] for k in ("zero", "nonfinite", "notrun")])
        ax.imshow(np.ma.masked_equal(codes, 0), aspect="auto", origin="lower", cmap=cm, vmin=0.5,
                  vmax=3.5, interpolation="nearest", extent=extent)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return im, present


def _heatmap_site(ax, rec, site: str, state: str, vmin: float, vmax: float):
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    g = rec.grad_norms(site, state)
    steps = np.asarray(rec.steps)
    direction = C.direction_of(rec, site)
    ax.set_title(f"{site}  ({state})", fontsize=9, parse_math=False)
    if rec.site_info(site).get("kind") == "attention":  # no recurrence: positions of the block input
        ax.set_xlabel("position p (block input)", fontsize=8)
    else:
        ax.set_xlabel(f"time step t    {C.travel_text(direction)}", fontsize=8)
    ax.set_ylabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)
    if g.shape[1] == 0:
        C.message(ax, f"no gradient reached {site} ({state}) in the recorded steps")
        return None, []
    lens = rec.seq_lens(site)
    valid = np.arange(g.shape[1])[None, :] < lens[:, None]
    im, present = _draw_grid(ax, g, valid, vmin, vmax)
    if len(steps) <= 6:
        ax.set_yticks(range(len(steps)))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda y, _p: str(int(steps[int(round(y))])) if 0 <= round(y) < len(steps) and abs(y - round(y)) < 1e-6 else ""))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    if im is None:
        C.message(ax, f"no finite, non-zero gradient at {site} (state {state})", backgroundcolor="white")
    return im, present


def _limits(rec, sites: Sequence[str], state: str) -> Tuple[float, float]:
    vals = []
    for s in sites:
        g = rec.grad_norms(s, state)
        ok = C.classify(g)["ok"]
        if ok.any():
            lg = C.safe_log10(g, ok).compressed()
            vals += [lg.min(), lg.max()]
    return C.decade_limits(np.array(vals))


def _colorbar(fig, im, axes, state: str, vmin: float, vmax: float):
    cb = fig.colorbar(im, ax=axes, shrink=0.95, pad=0.02, aspect=30 if len(np.atleast_1d(axes)) > 2 else 20)
    ticks, labels = _decade_ticks(vmin, vmax)
    cb.set_ticks(ticks, labels=labels)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(_STATE_TEX.get(state, f"‖∂L/∂{state}_t‖") + " (log scale)", fontsize=8)
    return cb


def gradient_heatmap(rec, site: Optional[str] = None, *, state: str = "h", scale: str = "site", ax=None):
    """‖∂L/∂h_t‖ as colour over time step (x) and training step (y), in decades.

    Every row is one recorded training step, every column one position t of the sequence
    (``rec.grad_norms(site, state)``). Colour is log10 of the norm; the colour bar is labelled in
    decades. The label of the time axis says which way the gradient travels: ← for forward sites
    (backpropagation through time runs from t = T−1 down to 0), → for the reverse direction of a
    bidirectional layer. Values a log scale cannot show are drawn in flat colours named in a
    legend below the axes: exactly zero (grey), NaN or inf (crimson), and positions beyond a
    step's sequence length (light grey).

    Args:
        rec: a :class:`~gradscope.Recording` with at least one recorded step, or an array
            ``[S, T]`` of norms (drawn as the forward site ``"array"``).
        site: one site name; ``None`` draws every site as small multiples.
        state: ``"h"``, or ``"c"`` for the cell state of an LSTM site.
        scale: for small multiples, ``"site"`` (default): each site's colours span its own range,
            with a colour bar per site, so a site whose gradient is 10⁶ times smaller than another's
            still shows its structure; ``"shared"``: one range and one colour bar for all sites, to
            compare magnitudes across sites.
        ax: an Axes to draw into. With ``site=None`` a sequence of Axes, one per site (a single
            Axes is accepted when the recording has one site). Default: a new figure.

    Returns:
        The Axes for one site; with ``site=None`` a 1-D ``numpy`` array of Axes, one per site in
        ``rec.sites`` order.

    Raises:
        GradscopeError: an empty recording, an unknown site, state or scale (with a suggestion),
            or the wrong number of Axes.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(2, 8)
        >>> rec = gradscope.probe(rnn, torch.randn(20, 3, 2))
        >>> ax = gradscope.plot.gradient_heatmap(rec, "l0")
        >>> ax.get_title()
        'l0  (h)'
    """
    rec = C.as_recording(rec, "gradient_heatmap")
    _check_steps(rec, "gradient_heatmap")
    _check_scale(scale, "gradient_heatmap")
    sites = C.sites_of(rec, site, "gradient_heatmap")
    for s in sites:
        rec.grad_norms(s, state)  # unknown state: the Recording's error, with a suggestion
    if site is not None:
        vmin, vmax = _limits(rec, sites, state)
        if ax is not None and not hasattr(ax, "imshow"):
            raise GradscopeError("gradient_heatmap: with a site, ax must be one matplotlib Axes.")
        ax = C.new_axes(ax, (7.0, 3.2 if len(rec.steps) > 2 else 2.2))
        im, present = _heatmap_site(ax, rec, site, state, vmin, vmax)
        if im is not None:
            _colorbar(ax.figure, im, ax, state, vmin, vmax)
        C.bad_legend(ax, present, anchor=(0.0, -0.22))
        return ax
    axes = _axes_for(ax, len(sites), "gradient_heatmap", rows_height=2.3 if len(rec.steps) > 2 else 1.6)
    small_multiples(rec, sites, axes, state, scale=scale)
    return np.array(axes, dtype=object)


def _check_scale(scale: str, what: str) -> None:
    if scale not in SCALES:
        from ..errors import did_you_mean

        raise GradscopeError(f"{what}: scale must be one of {list(SCALES)}, got {scale!r}."
                             f"{did_you_mean(str(scale), SCALES)}")


def small_multiples(rec, sites: Sequence[str], axes: Sequence, state: str = "h", *, scale: str = "site") -> None:
    """Heatmaps of ``sites`` into ``axes`` (one each), each with its own colour range and colour
    bar (``scale="site"``) or with one shared range and colour bar (``scale="shared"``).

    The building block of :func:`gradient_heatmap` with ``site=None``, for layouts of your own
    (the dashboard draws a subset of the sites this way).

    Args:
        rec: a :class:`~gradscope.Recording` with at least one recorded step.
        sites: site names, one per Axes.
        axes: the Axes, in the order of ``sites``.
        state: ``"h"`` or ``"c"``.
        scale: ``"site"`` or ``"shared"`` (see :func:`gradient_heatmap`).

    Example:
        >>> import torch, gradscope
        >>> from matplotlib.figure import Figure
        >>> rec = gradscope.probe(torch.nn.GRU(2, 4, num_layers=2), torch.randn(9, 2, 2))
        >>> axes = Figure(layout="constrained").subplots(1, 2)
        >>> small_multiples(rec, ["l0", "l1"], axes, scale="shared")
        >>> len(axes[0].figure.axes)  # two heatmaps and their shared colour bar
        3
    """
    _check_scale(scale, "small_multiples")
    ims, present = [], set()
    if scale == "shared":
        vmin, vmax = _limits(rec, sites, state)
        for a, s in zip(axes, sites):
            im, pr = _heatmap_site(a, rec, s, state, vmin, vmax)
            ims.append(im)
            present.update(pr)
        im = next((i for i in ims if i is not None), None)
        if im is not None:
            cb = _colorbar(axes[0].figure, im, list(axes), state, vmin, vmax)
            cb.set_label(cb.ax.get_ylabel() + ", shared by all sites", fontsize=8)
    else:
        for a, s in zip(axes, sites):
            vmin, vmax = _limits(rec, [s], state)
            im, pr = _heatmap_site(a, rec, s, state, vmin, vmax)
            present.update(pr)
            if im is not None:
                cb = _colorbar(a.figure, im, a, state, vmin, vmax)
                cb.set_label(_STATE_TEX.get(state, f"‖∂L/∂{state}_t‖") + ", this site's scale", fontsize=7)
    C.bad_legend(axes[-1], [k for k in ("zero", "nonfinite", "notrun") if k in present], anchor=(0.0, -0.3))


def gradient_profile(rec, site: Optional[str] = None, *, state: str = "h", ax=None):
    """‖∂L/∂h_t‖ against the time step t, one line per site, on a logarithmic y axis.

    The picture of a recording with a single pass (a probe, or one watched step), where a heatmap
    would be one row of colour: the line shows how many decades the gradient loses along the
    sequence. With several recorded steps each line is the median over them (of the logarithms).
    Zeros, NaN and inf are left out of the lines and counted in the title. The x label says which
    way the gradient travels (← for forward sites).

    Args:
        rec: a :class:`~gradscope.Recording` with at least one recorded step, or an array
            ``[S, T]`` (or ``[T]``) of norms (drawn as the forward site ``"array"``).
        site: one site name; ``None`` draws every site.
        state: ``"h"``, or ``"c"`` for the cell state of an LSTM site.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        GradscopeError: an empty recording, or an unknown site or state (with a suggestion).

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.LSTM(2, 8, num_layers=2), torch.randn(20, 3, 2))
        >>> ax = gradscope.plot.gradient_profile(rec)
        >>> len(ax.get_lines()), ax.get_yscale()
        (2, 'log')
    """
    rec = C.as_recording(rec, "gradient_profile")
    _check_steps(rec, "gradient_profile")
    sites = C.sites_of(rec, site, "gradient_profile")
    for s in sites:
        rec.grad_norms(s, state)  # unknown state: the Recording's error, with a suggestion
    return draw_profile(C.new_axes(ax, (7.0, 3.4)), rec, sites, state)


def draw_profile(ax, rec, sites: Sequence[str], state: str = "h"):
    """The lines of :func:`gradient_profile` for ``sites`` into ``ax`` (for layouts of your own:
    the dashboard draws a subset of the sites this way). Returns the Axes."""
    S = len(rec.steps)
    dirs, bad, drawn = set(), 0, 0
    for i, s in enumerate(sites):
        g = np.asarray(rec.grad_norms(s, state), dtype=np.float64)
        if g.ndim == 1:
            g = g[None, :]
        lens = rec.seq_lens(s)
        valid = np.arange(g.shape[1])[None, :] < np.asarray(lens)[:, None] if g.shape[1] else g.astype(bool)
        g = np.where(valid, g, np.nan)
        masks = C.classify(g, valid)
        bad += int(masks["zero"].sum() + masks["nonfinite"].sum())
        med = C.log_quantiles(np.where(masks["ok"], g, np.nan))[0] if g.shape[1] else np.array([])
        if not np.isfinite(med).any():
            continue
        dirs.add(C.direction_of(rec, s))
        ax.plot(np.arange(len(med)), med, lw=1.4, marker="." if len(med) <= 40 else None, ms=3,
                color=f"C{i % 10}", label=s)
        drawn += 1
    ax.set_yscale("log")
    what = _STATE_TEX.get(state, f"‖∂L/∂{state}_t‖")
    ax.set_ylabel(what, fontsize=8)
    travel = C.travel_text(dirs.pop()) if len(dirs) == 1 else "forward sites: ←, reverse sites: →"
    ax.set_xlabel(f"time step t    {travel}", fontsize=8)
    one = "one pass" if S == 1 else f"median over {S} recorded steps"
    ax.set_title(f"Gradient reaching each position ({one})" + (f"; {bad} zero/NaN/inf value(s) left out"
                                                                if bad else ""), fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="major")
    if drawn:
        lo, hi = ax.get_ylim()
        if hi / lo < 100:  # at least two decades, so that a flat profile looks flat
            mid = math.sqrt(lo * hi)
            lo, hi = mid / 10, mid * 10
            ax.set_ylim(lo, hi)
        C.decade_ticks(ax.yaxis, lo, hi)
        ax.legend(fontsize=7, ncols=1 if drawn <= 4 else 2, loc="best", framealpha=0.85)
    else:
        C.message(ax, "no finite, non-zero gradient reached any site", backgroundcolor="white")
    return ax


def _axes_for(ax, n: int, what: str, rows_height: float) -> List:
    """``n`` Axes: the ones given (checked), or a new grid (2 columns when there are several)."""
    if ax is not None:
        axes = [ax] if hasattr(ax, "imshow") else list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != n:
            raise GradscopeError(f"{what}: got {len(axes)} Axes for {n} site(s); pass one Axes per site, "
                                 f"or site=... to draw one.")
        return axes
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = C.new_figure((11.0 if ncols == 2 else 7.0, 0.9 + rows_height * nrows))
    grid = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(grid.ravel())
    for extra in flat[n:]:
        extra.remove()
    return flat[:n]


# ---------------------------------------------------------------------------------------- params
def _group_names(names: Sequence[str], max_groups: int) -> Tuple[Dict[str, List[str]], int]:
    """Parameters grouped by module so that at most ``max_groups`` groups remain.

    The finest module level whose number of modules fits is used (each parameter alone, then its
    module, then the module's parent, …). When that level is much coarser than needed (say 2
    groups for a limit of 40), the next finer level is used instead with runs of consecutive
    siblings merged (``blocks.0 … blocks.3``). Returns ``({label: [names]}, depth)`` (depth 0:
    no grouping).
    """
    if len(names) <= max_groups:
        return {n: [n] for n in names}, 0
    levels: Dict[int, Dict[str, List[str]]] = {}
    for d in range(max(n.count(".") for n in names), 0, -1):
        groups: Dict[str, List[str]] = {}
        for n in names:
            parts = n.split(".")
            groups.setdefault(".".join(parts[:min(d, len(parts) - 1)]) or n, []).append(n)
        levels[d] = groups
    fits = [d for d, g in levels.items() if len(g) <= max_groups]
    best = max(fits) if fits else None
    if best is not None and (len(levels[best]) * 3 >= max_groups or best + 1 not in levels):
        return levels[best], best
    finer = best + 1 if best is not None else min(levels)
    return _merge_runs(levels[finer], max_groups), finer


def _merge_runs(groups: Dict[str, List[str]], max_groups: int) -> Dict[str, List[str]]:
    """Merge runs of consecutive groups with the same parent until at most ``max_groups`` remain."""
    keys = list(groups)
    per = 2
    while True:
        merged: Dict[str, List[str]] = {}
        i = 0
        while i < len(keys):
            parent = keys[i].rpartition(".")[0]
            run = [keys[i]]
            while len(run) < per and i + len(run) < len(keys) and keys[i + len(run)].rpartition(".")[0] == parent:
                run.append(keys[i + len(run)])
            label = run[0] if len(run) == 1 else f"{run[0]} … {run[-1].rpartition('.')[2] or run[-1]}"
            merged[label] = [n for k in run for n in groups[k]]
            i += len(run)
        if len(merged) <= max_groups or per >= len(keys):
            return merged
        per += 1


def _group_norms(pn: Dict[str, np.ndarray], members: Sequence[str]) -> np.ndarray:
    """``[S]`` gradient norm of a group: sqrt of the sum of its members' squared norms.

    Members without a gradient (NaN) at a step are left out; NaN when none had one; inf if any
    member's norm is inf.
    """
    v = np.vstack([pn[m] for m in members])
    if len(members) == 1:
        return v[0]
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.where(np.isnan(v), 0.0, v * v)
        tot = np.sqrt(sq.sum(axis=0))
    tot[np.isnan(v).all(axis=0)] = np.nan
    return tot


def param_flow(rec, *, ax=None, max_groups: int = 40):
    """Gradient norm of every parameter over training: median (dot) and min–max range (bar).

    The informed successor of the ``plot_grad_flow`` bar chart: one row per parameter in model
    order, a logarithmic x axis (so 1e-12 and 1e+2 are both visible), and the spread over the
    recorded steps instead of a single step. With more than ``max_groups`` parameters they are
    grouped by module (the finest module level that fits) and a group's norm is the norm of its
    parameters' gradients together, √Σ‖g_p‖². Rows whose gradient was never finite and positive
    are marked at the left edge: grey "zero", crimson "NaN/inf", light grey "no gradient"
    (NaN at every step: the parameter was not used or is frozen).

    Args:
        rec: a :class:`~gradscope.Recording` with at least one recorded step, or a dict
            ``{name: [S]}`` of gradient norms.
        ax: an Axes to draw into (default: a new figure sized to the number of rows).
        max_groups: the most rows to draw before grouping by module.

    Returns:
        The Axes.

    Raises:
        GradscopeError: an empty recording, or ``max_groups`` < 1.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.LSTM(2, 8, num_layers=2)
        >>> rec = gradscope.probe(rnn, torch.randn(15, 3, 2))
        >>> ax = gradscope.plot.param_flow(rec)
        >>> [t.get_text() for t in ax.get_yticklabels()][:2]
        ['weight_ih_l0', 'weight_hh_l0']
    """
    from matplotlib.lines import Line2D

    rec = C.as_recording(rec, "param_flow")
    _check_steps(rec, "param_flow")
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise GradscopeError(f"param_flow: max_groups must be a positive integer, got {max_groups!r}.")
    pn = rec.param_grad_norms()
    groups, depth = _group_names(list(pn), max_groups)
    G = len(groups)
    ax = C.new_axes(ax, (7.5, 1.3 + 0.21 * max(G, 3)))
    S = len(rec.steps)
    ax.set_xlabel(r"gradient norm $\|\partial L/\partial \theta\|$"
                  + (f"  (dot: median, bar: min–max over {S} steps)" if S > 1 else "  (the one recorded step)"),
                  fontsize=8)
    title = "Parameter gradients"
    if depth:
        title += f" — {len(pn)} parameters grouped into {G} modules"
    ax.set_title(title, fontsize=9, loc="left")
    if not G:
        C.message(ax, "the recording has no parameter gradient norms (no parameter requires grad)")
        ax.set_yticks([])
        return ax
    nonfinite_params = {e.get("param") for e in rec.events if e.get("kind") == "nonfinite" and e.get("param")}
    labels, meds, los, his, flags = [], [], [], [], []
    for label, members in groups.items():
        v = _group_norms(pn, members)
        m = C.classify(v)
        ok = v[m["ok"]]
        labels.append(label + (f"  ({len(members)} params)" if depth else ""))
        if ok.size:
            meds.append(math.exp(float(np.median(np.log(ok)))))
            los.append(float(ok.min()))
            his.append(float(ok.max()))
        else:
            meds.append(np.nan)
            los.append(np.nan)
            his.append(np.nan)
        isnan = np.isnan(v)
        if np.isinf(v).any() or any(p in nonfinite_params for p in members):
            flags.append("nonfinite")
        elif isnan.all():
            flags.append("notrun")
        elif m["zero"].any() and not ok.size:
            flags.append("zero")
        else:
            flags.append("")
    y = np.arange(G)[::-1]  # model order from the top
    meds, los, his = np.array(meds), np.array(los), np.array(his)
    have = np.isfinite(meds)
    ax.set_xscale("log")
    if have.any():
        lo, hi = float(np.nanmin(los)), float(np.nanmax(his))
        ax.hlines(y[have], los[have], his[have], color="C0", alpha=0.35, lw=5)
        ax.plot(meds[have], y[have], "o", color="C0", ms=4)
        left, right = max(lo / 10 ** 0.6, 1e-300), min(hi * 10 ** 0.3, 1e300)
        ax.set_xlim(left, right)
        C.decade_ticks(ax.xaxis, left, right)
    else:
        left = 1e-3
        ax.set_xlim(left, 1.0)
        C.message(ax, "no parameter gradient was finite and positive in any recorded step",
                  backgroundcolor="white")
    marks = {"zero": "s", "nonfinite": "X", "notrun": "o"}
    for kind in ("zero", "nonfinite", "notrun"):
        idx = [i for i, f in enumerate(flags) if f == kind]
        if idx:
            ax.plot(np.full(len(idx), left), y[idx], marks[kind], color=C.BAD_COLORS[kind] if kind != "notrun" else "0.6",
                    mfc=C.BAD_COLORS[kind], mec="0.3", ms=6, clip_on=False, zorder=3)
    ax.set_yticks(y, labels=labels, fontsize=8 if G <= 30 else 6.5)
    ax.set_ylim(-0.7, G - 0.3)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", which="major", alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color="C0", ms=4, label="median" if S > 1 else "norm")]
    if S > 1:
        handles.append(Line2D([], [], color="C0", alpha=0.35, lw=5, label="min–max"))
    names = {"zero": "zero", "nonfinite": "NaN / inf", "notrun": "no gradient"}
    for kind in ("zero", "nonfinite", "notrun"):
        if kind in flags:
            handles.append(Line2D([], [], marker=marks[kind], ls="", mfc=C.BAD_COLORS[kind], mec="0.3", ms=6,
                                  label=names[kind]))
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    return ax


# ----------------------------------------------------------------------------------------- depth
def depth_heatmap(rec, *, stack: Optional[str] = None, ax=None):
    """Attention models: the gradient reaching each block's input, by depth (y) and position (x).

    Draws ``rec.depth_grad_norms(stack)`` — ‖∂L/∂x_{ℓ,p}‖ at the input of block ℓ of an attention
    stack at position p — at the last recorded step, in decades, with zeros / NaN / inf marked as
    in :func:`gradient_heatmap`. Where the loss enters at the top block, a gradient that fades
    toward block 0 shows as a colour fall from top to bottom.

    Args:
        rec: a :class:`~gradscope.Recording` of a model with attention sites, or an array
            ``[L, P]`` / ``[S, L, P]``.
        stack: the attention stack (``rec.attention_stacks``); may be omitted when there is one.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: the recording has no attention sites, hence no depth flow; the
            message says so.
        GradscopeError: an unknown stack (with a suggestion), or several stacks and none named.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.RNN(2, 4), torch.randn(5, 1, 2))
        >>> gradscope.plot.depth_heatmap(rec)
        Traceback (most recent call last):
        ...
        gradscope.errors.MissingMeasureError: depth_heatmap needs the measure 'depth_grad_norms' ...
    """
    from matplotlib.ticker import MaxNLocator

    rec = C.as_recording(rec, "depth_heatmap")
    name, a = _depth_data(rec, stack)
    a = np.asarray(a, dtype=np.float64)
    step_txt = ""
    if a.ndim == 3:
        if a.shape[0] == 0:
            raise GradscopeError(f"depth_heatmap: stack {name!r} has no recorded step.")
        if len(rec.steps) == a.shape[0] and a.shape[0] > 1:
            step_txt = f", training step {int(rec.steps[-1])}"
        a = a[-1]
    if a.ndim != 2:
        raise GradscopeError(f"depth_heatmap: 'depth_grad_norms' of {name!r} has shape {list(a.shape)}, "
                             f"expected [L, P] or [S, L, P].")
    ax = C.new_axes(ax, (7.0, 1.2 + 0.35 * max(a.shape[0], 4)))
    ok = C.classify(a)["ok"]
    vmin, vmax = C.decade_limits(C.safe_log10(a, ok).compressed() if ok.any() else np.array([]))
    im, present = _draw_grid(ax, a, None, vmin, vmax)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position p", fontsize=8)
    ax.set_ylabel("block (depth ℓ)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{name}: gradient at each block's input{step_txt}", fontsize=9, loc="left", parse_math=False)
    if im is not None:
        cb = _colorbar(ax.figure, im, ax, "h", vmin, vmax)
        cb.set_label(r"$\|\partial L/\partial x_{\ell,p}\|$ (log scale)", fontsize=8)
    else:
        C.message(ax, "no finite, non-zero value", backgroundcolor="white")
    C.bad_legend(ax, present, anchor=(0.0, -0.25))
    return ax


def _depth_data(rec, stack: Optional[str]):
    """(name, ``[S, L, P]`` or ``[L, P]``): the Recording's depth flow of a stack, or a stored measure."""
    stacks = getattr(rec, "attention_stacks", None)  # Recordings of gradscope with attention capture
    if stacks:
        a = rec.depth_grad_norms(stack)  # raises for an unknown stack, or several and none named
        return (stack or next(iter(stacks))), a
    found = [(s, a) for (s, m), a in rec.measures().items()
             if m == "depth_grad_norms" and (stack is None or s == stack)]
    if not found:
        raise MissingMeasureError(
            "depth_heatmap needs the measure 'depth_grad_norms' (gradient norm per attention block and "
            "position, [S, L, P]), which this recording does not have: it exists for models with "
            "attention blocks (nn.MultiheadAttention, nn.TransformerEncoderLayer, Hugging Face or user "
            "attention modules) recorded by gradscope.watch(model) or gradscope.probe(model, batch). "
            "Recurrent sites are drawn by gradient_heatmap().")
    return found[0]
