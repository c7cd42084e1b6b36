"""Attention pictures: entropy of every head over training, rank collapse of the tokens by depth.

Both draw what the attention capture recorded (``rec.attention_entropy``, ``rec.rank_residual``,
``rec.token_cosine``) and compute nothing new. Index letters: S recorded training steps, L blocks
of a stack (depth ℓ = 0 … L−1), H heads.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..analysis.attention_rules import AttentionRules
from ..analysis.diagnose import Diagnosis
from ..errors import GradscopeError, MissingMeasureError
from ..recording import Recording
from . import _common as C

__all__ = ["attention_entropy", "rank_collapse"]

HOW_TO_RECORD = ("Attention measures exist for models with attention blocks (nn.MultiheadAttention, "
                 "nn.Transformer* layers, Hugging Face or user attention modules): record them with "
                 "gradscope.watch(model) during training (every recorded step) or gradscope.probe(model, batch).")

_MAX_LEGEND_HEADS = 10          # more heads: a colour scale instead of a legend entry per head
_ENTROPY_TICKS = ([0.0, 0.25, 0.5, 0.75, 1.0], ["0  one-hot", "0.25", "0.5", "0.75", "1  uniform"])
_RESIDUAL_COLOR, _COSINE_COLOR = "C0", "C3"


# --------------------------------------------------------------------------------- helpers
def _recording(obj, what: str, allow_array: bool):
    """A Recording from a Recording, a Diagnosis or (``attention_entropy``) an ``[S, H]`` array."""
    if isinstance(obj, (Recording, Diagnosis)):
        return C.recording_of(obj, what)
    if not allow_array:
        raise GradscopeError(f"{what} expects a gradscope Recording (scope.recording or gradscope.probe(...)) "
                             f"or a Diagnosis, got {type(obj).__name__}.")
    a = C._to_numpy(obj, what)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise GradscopeError(f"{what} expects a gradscope Recording or an array [S, H] (training step × head) "
                             f"or [H] of normalised entropies, got an array of shape {list(np.shape(obj))}.")
    site = {C.ARRAY_SITE: {"kind": "attention", "module": "", "states": ["h"], "layer": None,
                           "direction": "forward", "stack": C.ARRAY_SITE, "depth": 0}}
    return Recording(sites=site, steps=range(a.shape[0]), grads={}, seq_lens={}, params={},
                     measures={(C.ARRAY_SITE, "attention_entropy"): a}, meta={"source": "array"})


def _check_steps(rec, what: str) -> None:
    if len(rec.steps) == 0:
        raise GradscopeError(f"{what}: empty recording: no training step was recorded. Inside "
                             f"`with gradscope.watch(model)`, run at least one forward and backward pass, "
                             f"or use gradscope.probe(model, batch).")


def _no_attention(rec, what: str) -> MissingMeasureError:
    kinds = sorted({str(rec.site_info(s).get("kind")) for s in rec.sites})
    have = f"its sites are of kind {kinds}" if kinds else "it has no sites"
    return MissingMeasureError(f"{what} needs attention sites, and this recording has none ({have}; "
                               f"source: {rec.meta.get('source', '?')}). {HOW_TO_RECORD}")


def _attention_sites(rec, what: str) -> List[str]:
    """Every attention site, stack by stack (``rec.attention_stacks`` order), by depth within a stack."""
    stacks = getattr(rec, "attention_stacks", None) or {}
    sites = [s for blocks in stacks.values() for s in blocks]
    if not sites:
        raise _no_attention(rec, what)
    return sites


def _stack_of(rec, stack: Optional[str], what: str) -> str:
    if not getattr(rec, "attention_stacks", None):
        raise _no_attention(rec, what)
    # the Recording's own check: an unknown stack gets a suggestion, several stacks unnamed their names
    return rec._stack(stack)


def _series(rec, site: str, getter) -> Optional[np.ndarray]:
    """The measure of one site as float64, or None where the site has none."""
    try:
        return np.asarray(getter(site), dtype=np.float64)
    except MissingMeasureError:
        return None


def _step_axis(ax, steps: np.ndarray) -> None:
    """Training steps on the x axis (two or more; one step puts the heads there instead)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    pad = 0.03 * float(steps[-1] - steps[0])
    ax.set_xlim(steps[0] - pad, steps[-1] + pad)


def _mark_nonfinite(ax, x: np.ndarray) -> None:
    """Crimson crosses on the bottom edge of ``ax`` at the x positions of values not drawn."""
    from matplotlib.transforms import blended_transform_factory

    if len(x):
        ax.scatter(x, np.zeros(len(x)), marker="x", s=22, color=C.BAD_COLORS["nonfinite"], linewidths=1.2,
                   transform=blended_transform_factory(ax.transData, ax.transAxes), clip_on=False, zorder=4)


def _nonfinite_handle(n: int):
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="", marker="x", ms=5, mew=1.2, color=C.BAD_COLORS["nonfinite"],
                  label=f"NaN/inf, not drawn ({n} value{'s' if n != 1 else ''})")


# ------------------------------------------------------------------------------ entropy
def _head_colors(H: int) -> List:
    from matplotlib import colormaps

    if H <= _MAX_LEGEND_HEADS:
        return [f"C{h}" for h in range(H)]
    cmap = colormaps["viridis"]
    return [cmap(h / max(H - 1, 1)) for h in range(H)]


def _entropy_panel(ax, steps: np.ndarray, E: Optional[np.ndarray], colors: Sequence, title: str,
                   label_y: bool = True) -> int:
    """Lines of ``E`` ``[S, H]`` over ``steps`` into ``ax`` (with one step: a point per head, the
    heads along the x axis, ``len(colors)`` of them); returns how many values were not finite.

    Non-finite values break their head's line and are marked by crosses on the bottom edge.
    """
    ax.set_title(title, fontsize=9, parse_math=False)
    one = len(steps) == 1  # one recorded step (a probe): heads along the x axis
    ax.set_xlabel(f"head (step {int(steps[0])}, the only recorded step)" if one else "training step", fontsize=8)
    if label_y:
        ax.set_ylabel("normalised attention entropy", fontsize=8)
    ax.tick_params(labelsize=7)
    for y in (0.0, 1.0):
        ax.axhline(y, color="0.75", lw=0.8, ls=":", zorder=0)
    lo, hi = -0.04, 1.04
    bad = 0
    if E is None:
        C.message(ax, "no attention entropy\nrecorded for this block")
    else:
        E = E.reshape(len(steps), -1)
        fin = np.isfinite(E)
        marker = "o" if len(steps) <= 40 else None
        H = E.shape[1]
        for h in range(H):
            if not fin[:, h].any():
                continue
            if one:  # a lollipop per head: its value, and a stem down to 0 (one-hot)
                ax.vlines(h, 0.0, E[0, h], color=colors[h], lw=1.0, alpha=0.5, zorder=1)
                ax.plot([h], E[0, h:h + 1], color=colors[h], ls="", marker="o", ms=5, label=f"head {h}", zorder=2)
            else:
                ax.plot(steps, np.where(fin[:, h], E[:, h], np.nan), color=colors[h], lw=1.3,
                        marker=marker, ms=3, label=f"head {h}")
        if fin.any():
            lo = min(lo, float(E[fin].min()) - 0.04)
            hi = max(hi, float(E[fin].max()) + 0.04)
        else:
            C.message(ax, "no finite attention entropy\nin the recorded steps", backgroundcolor="white")
        bad = int((~fin).sum())
        _mark_nonfinite(ax, np.flatnonzero(~fin[0]) if one else steps[(~fin).any(axis=1)])
    ax.set_ylim(lo, hi)
    ax.set_yticks(*_ENTROPY_TICKS)
    if one:  # the same limits on every panel of a grid (their x axes are shared)
        H = len(colors)
        ax.set_xticks(range(0, H, max(1, -(-H // 12))))  # ≤ 12 tick labels
        ax.set_xlim(-0.6, H - 0.4)
    else:
        _step_axis(ax, steps)
    ax.grid(axis="y", alpha=0.25)
    return bad


def _head_key(fig, axes: Sequence, legend_ax, H: int, colors: Sequence, bad: int) -> None:
    """A legend naming each head (≤ 10 heads), else one colour bar from head 0 to H−1; the legend
    also says what the crosses mean, and how many values they stand for, when values were left out."""
    from matplotlib.lines import Line2D

    handles = []
    if H <= _MAX_LEGEND_HEADS:
        handles = [Line2D([], [], color=colors[h], lw=1.3, marker="o", ms=3, label=f"head {h}") for h in range(H)]
    else:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm

        norm = BoundaryNorm(np.arange(H + 1) - 0.5, 256)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=colormaps["viridis"]), ax=list(axes), shrink=0.9,
                          pad=0.02, aspect=30)
        cb.set_ticks(sorted({0, H // 2, H - 1}))
        cb.ax.tick_params(labelsize=7)
        cb.set_label("head", fontsize=8)
    if bad:
        handles.append(_nonfinite_handle(bad))
    if handles:
        legend_ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
                         frameon=False, borderaxespad=0.0, handlelength=1.6)


def attention_entropy(rec, site: Optional[str] = None, *, module: Optional[str] = None, ax=None):
    """Normalised attention entropy of every head over training: one line per head.

    Draws ``rec.attention_entropy(site)`` ``[S, H]`` against the training step: each query row's
    entropy −Σ_j A_ij ln A_ij divided by ln(number of keys it attends), averaged over samples and
    rows, so that **1 is uniform attention** (every key weighted alike) and **0 is one-hot**
    (every query attends a single key); the y axis is labelled so. Heads falling toward 0 while
    training is the attention-entropy collapse of Zhai et al. (2023); heads stuck at 1 attend
    nothing in particular. With one recorded step (a probe) the x axis is the head instead: one
    point per head on a stem from 0. A non-finite value breaks its head's line; a cross on the
    bottom edge marks its step (its head, with one step) and the legend counts them.

    Args:
        rec: a :class:`~gradscope.Recording` (or a :class:`~gradscope.Diagnosis` of one) of a model
            with attention blocks, or an array ``[S, H]`` (or ``[H]``) of normalised entropies
            (drawn as site ``"array"``).
        site: one attention site (block), e.g. ``"encoder.layers.3"``. ``None`` draws **one Axes per
            attention block, in stack order** (``rec.attention_stacks``: stack by stack, block 0
            first), as small multiples with one shared y axis and one head legend: at most four
            blocks a row, and each stack on rows of its own.
        module: another attention module of the block (its path inside the block, e.g.
            ``"multihead_attn"`` for the cross-attention of a decoder layer); default the block's
            first (self-)attention.
        ax: an Axes to draw into; with ``site=None`` a sequence of Axes, one per block (a single
            Axes is accepted when there is one block). Default: a new figure.

    Returns:
        The Axes for one site; with ``site=None`` a 1-D ``numpy`` array of Axes in stack order.
        Blocks without the measure get a panel that says so.

    Raises:
        MissingMeasureError: the recording has no attention sites (the message says how to record
            them), or the named site / no site has the attention entropy.
        GradscopeError: an empty recording, an unknown or non-attention site (with a suggestion),
            or the wrong number of Axes.

    Example:
        >>> import torch, gradscope
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        >>> enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> rec = gradscope.probe(enc, torch.randn(6, 3, 8))
        >>> axes = gradscope.plot.attention_entropy(rec)
        >>> [a.get_title() for a in axes]
        ['layers.0', 'layers.1']
        >>> len(axes[0].get_lines()) - 2  # one line per head, besides the 0 and 1 reference lines
        2
    """
    what = "attention_entropy"
    rec = _recording(rec, what, allow_array=True)
    _check_steps(rec, what)
    steps = np.asarray(rec.steps, dtype=np.float64)
    if site is not None:
        if ax is not None and not hasattr(ax, "plot"):
            raise GradscopeError(f"{what}: with a site, ax must be one matplotlib Axes.")
        E = np.asarray(rec.attention_entropy(site, module), dtype=np.float64)  # raises with the reason
        H = E.shape[1] if E.ndim == 2 else 1
        colors = _head_colors(H)
        ax = C.new_axes(ax, (7.5, 3.0))
        title = f"{site}{f' [{module}]' if module else ''}: attention entropy per head"
        bad = _entropy_panel(ax, steps, E, colors, title)
        _head_key(ax.figure, [ax], ax, H, colors, bad)
        return ax
    sites = _attention_sites(rec, what)
    data = {s: _series(rec, s, lambda x: rec.attention_entropy(x, module)) for s in sites}
    if all(v is None for v in data.values()):
        mod = f" for attention module {module!r}" if module else ""
        raise MissingMeasureError(f"{what}: no attention site of this recording has the attention entropy{mod} "
                                  f"(sites: {sites}). {HOW_TO_RECORD}")
    H = max(v.reshape(len(steps), -1).shape[1] for v in data.values() if v is not None)
    colors = _head_colors(H)
    axes, legend_ax, first_col = _grid(ax, [len(b) for b in rec.attention_stacks.values()], what)
    bad = 0
    for a, s, label_y in zip(axes, sites, first_col):
        bad += _entropy_panel(a, steps, data[s], colors, s + (f" [{module}]" if module else ""), label_y=label_y)
    if ax is None and len(sites) > 1:
        axes[0].figure.suptitle("Attention entropy per head (normalised: 1 = uniform, 0 = one-hot)", fontsize=10)
    _head_key(axes[0].figure, axes, legend_ax, H, colors, bad)
    return np.array(axes, dtype=object)


def _first_column(ax) -> bool:
    """Whether ``ax`` is in the first column of its grid (True when it is not in a grid)."""
    spec = ax.get_subplotspec() if hasattr(ax, "get_subplotspec") else None
    return spec is None or spec.colspan.start == 0


def _grid(ax, blocks: Sequence[int], what: str) -> Tuple[List, object, List[bool]]:
    """Axes for stacks of ``blocks`` blocks each: ``(axes, the Axes for the legend, first-column flags)``.

    A new figure puts every stack on rows of its own (at most four blocks a row), so depth reads
    left to right within a stack and stacks never share a row; given Axes are used as they are.
    """
    n = sum(blocks)
    if ax is not None:
        axes = [ax] if hasattr(ax, "plot") else list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != n:
            raise GradscopeError(f"{what}: got {len(axes)} Axes for {n} attention block(s); pass one Axes "
                                 f"per block, or site=... to draw one.")
        return axes, axes[-1], [_first_column(a) for a in axes]
    ncols = min(max(blocks), 4)
    cells = []  # (row, col) of every block
    row = 0
    for L in blocks:
        cells += [(row + i // ncols, i % ncols) for i in range(L)]
        row += math.ceil(L / ncols)
    fig = C.new_figure((1.6 + 3.0 * ncols, 0.7 + 2.4 * row))
    grid = fig.subplots(row, ncols, squeeze=False, sharex=True, sharey=True)
    axes = [grid[r, c] for r, c in cells]
    used = set(cells)
    for r in range(row):
        for c in range(ncols):
            if (r, c) not in used:
                grid[r, c].remove()
    for a, (_r, c) in zip(axes, cells):  # shared axes hide inner labels; every panel keeps its steps
        a.tick_params(labelbottom=True, labelleft=c == 0)
    legend_ax = axes[max(i for i, (r, _c) in enumerate(cells) if r == 0)]  # rightmost panel of the top row
    return axes, legend_ax, [c == 0 for _r, c in cells]


# ------------------------------------------------------------------------- rank collapse
def rank_collapse(rec, stack: Optional[str] = None, *, ax=None):
    """Rank collapse by depth: the rank residual and the token cosine of every block's output.

    One Axes, depth ℓ (block) on x. Solid lines are the **last** recorded step that measured
    them, dashed lines the **first** one (drawn when it differs), so one picture shows both the
    profile over depth and how training moved it:

    * rank residual ‖X − 1x̄ᵀ‖_F / ‖X‖_F (``rec.rank_residual``): 1 when the mean token is a small
      part of X, **→ 0 as all tokens collapse onto one vector** (Dong et al. 2021);
    * mean cosine between distinct tokens (``rec.token_cosine``): 0 for unrelated tokens, **→ 1
      with collapse**. A common offset that residual paths accumulate raises it even while the
      tokens still differ, so read the residual first (``diagnose`` does the same).

    A dotted line marks 0.05, the residual below which ``diagnose`` reports ``rank_collapse`` (its
    default ``rank_low``). A non-finite value breaks its line; a cross on the bottom edge marks its
    block and the legend counts them.

    Args:
        rec: a :class:`~gradscope.Recording` (or a :class:`~gradscope.Diagnosis` of one) of a model
            with attention blocks.
        stack: the attention stack (``rec.attention_stacks``); may be omitted when there is one.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: the recording has no attention sites (the message says how to record
            them), or no block of the stack has either measure.
        GradscopeError: an empty recording, an unknown stack (with a suggestion), or several stacks
            and none named.

    Example:
        >>> import torch, gradscope
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        >>> enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        >>> rec = gradscope.probe(enc, torch.randn(6, 3, 8))
        >>> ax = gradscope.plot.rank_collapse(rec)
        >>> ax.get_xlabel()
        "block (depth ℓ) of stack 'layers'"
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    what = "rank_collapse"
    rec = _recording(rec, what, allow_array=False)
    _check_steps(rec, what)
    name = _stack_of(rec, stack, what)
    sites = rec.attention_stacks[name]
    S, L = len(rec.steps), len(sites)
    series = {}
    for key, getter in (("residual", rec.rank_residual), ("cosine", rec.token_cosine)):
        cols = [_series(rec, s, getter) for s in sites]
        if all(c is None for c in cols):
            series[key] = None
            continue
        series[key] = np.column_stack([np.full(S, np.nan) if c is None else c.reshape(S) for c in cols])  # [S, L]
    if series["residual"] is None and series["cosine"] is None:
        raise MissingMeasureError(f"{what}: no block of stack {name!r} has the rank residual or the token cosine "
                                  f"(blocks: {list(sites)}). {HOW_TO_RECORD}")
    measured = np.zeros(S, dtype=bool)
    for a in series.values():
        if a is not None:
            measured |= np.isfinite(a).any(axis=1)
    ax = C.new_axes(ax, (7.0, 3.6))
    ax.set_title(f"{name}: rank collapse by depth (collapse: residual → 0, cosine → 1)", fontsize=9, loc="left",
                 parse_math=False)
    ax.set_xlabel(f"block (depth ℓ) of stack {name!r}", fontsize=8)
    ax.set_ylabel("value at the block output", fontsize=8)
    ax.tick_params(labelsize=7)
    depth = np.arange(L)
    ax.set_xlim(-0.5 if L == 1 else -0.2, 0.5 if L == 1 else L - 0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(L, 12)))
    lo, hi = -0.05, 1.05
    handles = []
    if not measured.any():
        C.message(ax, "no finite rank residual or token cosine in the recorded steps", backgroundcolor="white")
    else:
        idx = np.flatnonzero(measured)
        rows = [(idx[-1], "-", 1.0, "last")] + ([(idx[0], "--", 0.55, "first")] if idx[0] != idx[-1] else [])
        labels = {"residual": "rank residual ‖X − 1x̄ᵀ‖/‖X‖", "cosine": "token cosine"}
        colors = {"residual": _RESIDUAL_COLOR, "cosine": _COSINE_COLOR}
        markers = {"residual": "o", "cosine": "s"}
        bad, bad_x = 0, set()
        for i, ls, alpha, which in rows:
            step = int(rec.steps[i])
            for key in ("residual", "cosine"):
                a = series[key]
                if a is None:
                    continue
                v = a[i]
                fin = np.isfinite(v)
                bad += int((~fin).sum())
                bad_x.update(depth[~fin].tolist())
                if fin.any():  # a block without a finite value breaks the line rather than being bridged
                    ax.plot(depth, np.where(fin, v, np.nan), ls=ls, color=colors[key], alpha=alpha,
                            lw=2.0 if ls == "-" else 1.3, marker=markers[key], ms=5,
                            mfc=colors[key] if ls == "-" else "white", zorder=3)
                    lo = min(lo, float(v[fin].min()) - 0.05)
                    hi = max(hi, float(v[fin].max()) + 0.05)
                handles.append(Line2D([], [], ls=ls, color=colors[key], alpha=alpha, marker=markers[key], ms=5,
                                      mfc=colors[key] if ls == "-" else "white",
                                      label=f"{labels[key]}, {which} step ({step})" if len(rows) > 1
                                      else f"{labels[key]}, step {step}"))
        if bad:
            _mark_nonfinite(ax, np.array(sorted(bad_x)))
            handles.append(_nonfinite_handle(bad))
    rank_low = AttentionRules().rank_low  # diagnose's default threshold for rank_collapse
    if series["residual"] is not None:
        ax.axhline(rank_low, color=_RESIDUAL_COLOR, lw=0.8, ls=":", alpha=0.8, zorder=1)
        ax.text(0.995, rank_low, f"residual < {rank_low:g}: collapsed ", transform=ax.get_yaxis_transform(),
                fontsize=7, color=_RESIDUAL_COLOR, va="bottom", ha="right", parse_math=False)
    for y in (0.0, 1.0):
        ax.axhline(y, color="0.75", lw=0.8, ls=":", zorder=1)
    ax.set_ylim(lo, hi)
    ax.grid(axis="y", alpha=0.25)
    if handles:
        # two rows (residual over cosine), one column per step, and the NaN/inf entry apart
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncols=math.ceil(len(handles) / 2), fontsize=7, frameon=False, borderaxespad=0.0)
    return ax
