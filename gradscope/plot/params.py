"""Per-parameter time series: the gradient norm, or the update-to-weight ratio, over training."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from ..errors import GradscopeError, MissingMeasureError, did_you_mean
from . import _common as C
from .flow import _check_steps, _group_names, _group_norms

__all__ = ["param_norms"]

QUANTITIES = ("grad_norm", "update_ratio")
RULE_OF_THUMB = 1e-3  # ‖Δw‖/‖w‖ near 1e-3 (Karpathy, CS231n notes): a rule of thumb, not a law


def _series(rec, quantity: str, groups: Dict[str, List[str]]) -> Dict[str, np.ndarray]:
    """``{label: [S]}`` the drawn value of every group (its members' norms combined)."""
    if quantity == "grad_norm":
        pn = rec.param_grad_norms()
        return {g: _group_norms(pn, m) for g, m in groups.items()}
    un, wn = rec.update_norms(), rec.weight_norms()
    out = {}
    for g, m in groups.items():
        d, w = _group_norms(un, m), _group_norms(wn, m)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = d / w
        r[(d == 0) & (w == 0)] = 0.0  # nothing moved: 0, as Recording.update_ratios() says
        out[g] = r
    return out


def _nonfinite(rec, quantity: str, groups: Dict[str, List[str]], values: Dict[str, np.ndarray]):
    """``{label: [S] bool}`` steps whose value is non-finite (not merely missing).

    A gradient norm is NaN both where the parameter got no gradient and where its gradient was NaN:
    NaN counts as non-finite from the parameter's first non-finite event on (``rec.events``). An
    update ratio is missing where neither norm was measured; any other NaN, and inf, is non-finite.
    """
    steps = np.asarray(rec.steps)
    out = {}
    if quantity == "grad_norm":
        first: Dict[str, int] = {}
        for e in rec.events:
            if e.get("kind") == "nonfinite" and e.get("param") and e.get("step") is not None:
                first[e["param"]] = min(first.get(e["param"], e["step"]), e["step"])
        for g, members in groups.items():
            v = values[g]
            bad = np.isinf(v)
            since = [first[m] for m in members if m in first]
            if since:
                bad |= np.isnan(v) & (steps >= min(since))
            out[g] = bad
        return out
    un, wn = rec.update_norms(), rec.weight_norms()
    for g, members in groups.items():
        measured = np.zeros(len(steps), dtype=bool)
        for m in members:
            measured |= ~(np.isnan(un[m]) & np.isnan(wn[m]))
        out[g] = measured & ~np.isfinite(values[g])
    return out


def param_norms(rec, *, quantity: str = "grad_norm", max_lines: int = 12, ax=None):
    """Every parameter's gradient norm (or update-to-weight ratio) over the recorded steps.

    One line per parameter on a logarithmic y axis, against the training step; where
    :func:`param_flow` summarises each parameter by its median and range, this shows when it
    changed. With more than ``max_lines`` parameters they are grouped by module (the finest module
    level that fits, as in :func:`param_flow`): a group's gradient norm is √Σ‖g_p‖², its update
    ratio √Σ‖Δw_p‖² / √Σ‖w_p‖² (the ratio of the module's weights taken together).

    Values the log axis cannot show are marked, not dropped: zeros (no update, or no gradient
    reaching the parameter) as grey squares on the bottom edge, NaN and inf as crimson crosses on
    the top edge. A gradient norm is NaN also where a parameter got no gradient at all (a gap);
    only its NaNs from the parameter's first non-finite event on are marked. ``update_ratio``
    adds a dotted line at 1e-3, the common rule of thumb for a healthy learning rate (Karpathy's
    CS231n notes) — a rule of thumb, not a target.

    Args:
        rec: a :class:`~gradscope.Recording` with at least one recorded step, or (for
            ``quantity="grad_norm"``) a dict ``{name: [S]}`` of gradient norms.
        quantity: ``"grad_norm"`` (‖∂L/∂θ‖, default) or ``"update_ratio"`` (‖Δw‖/‖w‖, recorded
            by :func:`gradscope.watch`; see :meth:`Recording.update_ratios`).
        max_lines: the most lines before parameters are grouped by module.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes (one ``Line2D`` per parameter or group, labelled with its name).

    Raises:
        GradscopeError: an empty recording, an unknown ``quantity``, ``max_lines`` < 1.
        MissingMeasureError: ``update_ratio`` of a recording without it (a probe, an older file,
            ``watch(update_ratio=False)``).

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.LSTM(2, 8)
        >>> opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
        >>> with gradscope.watch(rnn, every=1, probe_every=None) as scope:
        ...     for _ in range(3):
        ...         rnn(torch.randn(15, 3, 2))[0].pow(2).mean().backward()
        ...         opt.step(); opt.zero_grad()
        >>> ax = gradscope.plot.param_norms(scope.recording, quantity="update_ratio")
        >>> [line.get_label() for line in ax.get_lines()][:2]
        ['weight_ih_l0', 'weight_hh_l0']
    """
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    if quantity not in QUANTITIES:
        raise GradscopeError(f"param_norms: unknown quantity {quantity!r}; choose one of {list(QUANTITIES)}."
                             f"{did_you_mean(str(quantity), QUANTITIES)}")
    if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1:
        raise GradscopeError(f"param_norms: max_lines must be a positive integer, got {max_lines!r}.")
    rec = C.as_recording(rec, "param_norms")
    _check_steps(rec, "param_norms")
    if quantity == "update_ratio":
        names = list(rec.update_norms())
        if not names and rec.param_grad_norms():
            raise MissingMeasureError(
                "param_norms: the recording has no update-to-weight ratios. gradscope.watch(model) records "
                "them (update_ratio=True, the default); gradscope.probe and files from older gradscope "
                "versions have none.")
    else:
        names = list(rec.param_grad_norms())
    groups, depth = _group_names(names, max_lines) if names else ({}, 0)
    G = len(groups)
    ax = C.new_axes(ax, (8.0 if G > 6 else 7.0, 4.2))
    what = "gradient norm" if quantity == "grad_norm" else "update-to-weight ratio"
    title = ("Parameter gradient norms over training" if quantity == "grad_norm"
             else "Update-to-weight ratio over training")
    if depth:
        title += f" — {len(names)} parameters grouped into {G} modules"
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel(r"$\|\partial L/\partial \theta\|$" if quantity == "grad_norm"
                  else r"$\|\Delta w\| \,/\, \|w\|$", fontsize=9)
    if not G:
        C.message(ax, "the recording has no parameters that require grad")
        return ax
    steps = np.asarray(rec.steps, dtype=np.float64)
    values = _series(rec, quantity, groups)
    bad = _nonfinite(rec, quantity, groups, values)
    ax.set_yscale("log")
    cmap = C.pyplot().get_cmap("tab10")
    styles = ("-", "--", ":", "-.")  # beyond ten lines the colours repeat with another line style
    marker = "o" if len(steps) <= 40 else None
    edge = blended_transform_factory(ax.transData, ax.transAxes)
    lo, hi = np.inf, 0.0
    n_zero = n_bad = 0
    missing = "no gradient" if quantity == "grad_norm" else "not measured"
    for i, (label, v) in enumerate(values.items()):
        m = C.classify(v)
        y = np.where(m["ok"], v, np.nan)
        n = len(groups[label])
        color = cmap(i % 10)
        text = label + (f" ({n} params)" if depth and n > 1 else "")
        if np.isnan(v).all() and not bad[label].any():
            text += f" ({missing})"
        elif m["zero"].any() and not (m["ok"] | bad[label]).any():
            text += " (always 0)"
        ax.plot(steps, y, color=color, ls=styles[(i // 10) % len(styles)], lw=1.3, marker=marker, ms=3, label=text)
        if m["ok"].any():
            lo, hi = min(lo, float(v[m["ok"]].min())), max(hi, float(v[m["ok"]].max()))
        # marks on the bottom (zero) and top (NaN / inf) edges, outlined in the line's colour
        for mask, y_edge, mk, face, ms in ((m["zero"], 0.0, "s", C.BAD_COLORS["zero"], 5),
                                           (bad[label], 1.0, "X", C.BAD_COLORS["nonfinite"], 7)):
            if mask.any():
                ax.plot(steps[mask], np.full(int(mask.sum()), y_edge), mk, transform=edge, clip_on=False,
                        ms=ms, mfc=face, mec=color, mew=1.2, zorder=4, label="_mark")
        n_zero += int(m["zero"].sum())
        n_bad += int(bad[label].sum())
    if hi > 0:
        if quantity == "update_ratio":
            lo, hi = min(lo, RULE_OF_THUMB), max(hi, RULE_OF_THUMB)
        lo_, hi_ = lo / 10 ** 0.3, hi * 10 ** 0.3
        ax.set_ylim(lo_, hi_)
        C.decade_ticks(ax.yaxis, lo_, hi_)
    else:
        ax.set_ylim(1e-3, 1.0)
        C.message(ax, f"no {what} was finite and positive in any recorded step", backgroundcolor="white")
    extra = []
    if n_zero:
        extra.append(Line2D([], [], marker="s", ls="", mfc=C.BAD_COLORS["zero"], mec="0.3", ms=5,
                            label=f"zero, {n_zero}× (" + ("no update)" if quantity == "update_ratio"
                                                         else "gradient 0)")))
    if n_bad:
        extra.append(Line2D([], [], marker="X", ls="", mfc=C.BAD_COLORS["nonfinite"], mec="0.3", ms=7,
                            label=f"NaN / inf, {n_bad}×"))
    if quantity == "update_ratio" and hi > 0:
        ax.axhline(RULE_OF_THUMB, color="0.45", ls=":", lw=1, label="_rule")
        extra.append(Line2D([], [], color="0.45", ls=":", lw=1, label="1e-3 (rule of thumb)"))
    ax.tick_params(labelsize=7)
    ax.grid(which="major", alpha=0.3)
    handles = [h for h in ax.get_lines() if not h.get_label().startswith("_")] + extra
    ax.legend(handles=handles, fontsize=7 if G <= 12 else 6, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, frameon=False)
    return ax
