"""Pictures of the recurrence's dynamics from probe measures: Jacobians by lag, exponents, spectra.

Index letters: B probed samples, T sequence length, k lag or exponent index, K singular values.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np

from ..errors import GradscopeError, MissingMeasureError, did_you_mean
from . import _common as C

__all__ = ["jacobian_decay", "lyapunov_spectrum", "hidden_spectrum", "probe_history"]


def _bad_note(ax, n_bad: int, total: int, what: str) -> None:
    if n_bad:
        ax.text(0.99, 0.01, f"{n_bad} of {total} {what} zero or non-finite: not drawn", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=7, color=C.BAD_COLORS["nonfinite"], parse_math=False)


def jacobian_decay(rec, site: Optional[str] = None, *, ax=None):
    """‖∂h_T/∂h_{T−k}‖₂ against lag k on a log scale, with the fitted rate, horizon and threshold.

    For every site: the median over the probed samples (solid; the median of the logarithms, as
    the decay fit uses) and their min–max range (band); the fitted line exp(intercept + rate·k)
    (dashed; from ``rec.site_measures(site)["jacobian"]`` — the intercept when stored, otherwise
    the line starts at the lag-0 value); the gradient horizon (dotted vertical) and, if the norm
    grows past 1/threshold, the explosion lag (dash-dot vertical). The threshold is the grey
    horizontal line. Several sites share the axes, one colour each. Entries that are zero or
    non-finite are left out and counted in a note.

    Args:
        rec: a :class:`~gradscope.Recording` with Jacobian norms (from :func:`gradscope.probe`, or
            :func:`gradscope.watch` with ``probe_every``), or an array ``[T+1]`` / ``[B, T+1]`` of
            norms by lag (drawn as site ``"array"``, without fit or horizon).
        site: one site, or ``None`` for every site that has the measure.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: the site (or every site) lacks ``jacobian_norms``; the message says
            how to record it.
        GradscopeError: an unknown site, with a suggestion.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.RNN(2, 8), torch.randn(30, 2, 2))
        >>> ax = gradscope.plot.jacobian_decay(rec)
        >>> ax.get_yscale()
        'log'
    """
    from matplotlib.lines import Line2D

    rec = C.as_recording(rec, "jacobian_decay")
    sites = C.sites_with(rec, C.sites_of(rec, site, "jacobian_decay"), "jacobian_norms", "jacobian_decay",
                         explicit=site is not None)
    ax = C.new_axes(ax, (7.0, 4.2))
    data_lo: List[float] = []
    data_hi: List[float] = [1.0]
    thresholds = set()
    explodes = False
    n_bad = total = 0
    handles = []
    for i, s in enumerate(sites):
        color = f"C{i % 10}"
        jn = np.asarray(rec.jacobian_norms(s), dtype=np.float64)
        med, lo, hi, cnt = C.log_quantiles(jn)
        n_bad += int((~C.classify(jn)["ok"]).sum())
        total += jn.size
        jm = rec.site_measures(s).get("jacobian") or {}
        rate = float(jm.get("rate", math.nan))
        horizon = float(jm.get("horizon", math.inf))
        expl = float(jm.get("explosion_lag", math.inf))
        thr = jm.get("threshold")
        if thr is not None:
            thresholds.add(float(thr))
        k = np.arange(len(med))
        label = f"{s}: rate {C.fmt(rate)}/step, horizon {C.fmt(horizon)} of {len(med) - 1}" if jm else s
        if cnt.any():
            ax.fill_between(k, lo, hi, color=color, alpha=0.15, lw=0)
            ax.plot(k, med, color=color, lw=1.8)
            data_lo.append(float(np.nanmin(lo)))
            data_hi.append(float(np.nanmax(hi)))
        handles.append(Line2D([], [], color=color, lw=1.8, label=label))
        if math.isfinite(rate):
            b = jm.get("intercept")
            if b is None:  # no intercept stored: start the line at the lag-0 value (the identity: 1)
                b = math.log(med[0]) if np.isfinite(med[0]) and med[0] > 0 else 0.0
            ln = np.clip(float(b) + rate * k, -700.0, 700.0)
            ax.plot(k, np.exp(ln), color=color, lw=1.0, ls="--", alpha=0.9)
        if math.isfinite(horizon):
            ax.axvline(horizon, color=color, ls=":", lw=1.3)
        if math.isfinite(expl):
            explodes = True
            ax.axvline(expl, color=color, ls="-.", lw=1.1)
    if not data_lo:
        C.message(ax, "no finite, non-zero Jacobian norm to draw (all zero, NaN or inf)", backgroundcolor="white")
    ax.set_yscale("log")
    thr_list = sorted(thresholds) or [1e-3]
    for thr in thr_list:
        ax.axhline(thr, color="0.35", lw=0.9)
        if explodes:
            ax.axhline(1.0 / thr, color="0.35", lw=0.9)
    lo_all = min(data_lo + thr_list)
    hi_all = max(data_hi + ([1.0 / t for t in thr_list] if explodes else []))
    # float64 norms reach denormals (~1e-320); keep the limits representable and positive
    ax.set_ylim(max(lo_all / 10 ** 0.5, 1e-300), min(hi_all * 10 ** 0.5, 1e300))
    C.decade_ticks(ax.yaxis, *ax.get_ylim())
    ax.set_xlim(0, max(len(rec.jacobian_norms(s)[0]) - 1 for s in sites))
    ax.set_xlabel("lag k (steps back from the last state T)", fontsize=8)
    ax.set_ylabel(r"$\|\partial h_T/\partial h_{T-k}\|_2$", fontsize=9)
    ax.set_title("Jacobian norm by lag — line: median over samples, band: min–max", fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25, which="major")
    thr_txt = ", ".join(C.fmt(t) for t in thr_list)
    handles += [Line2D([], [], color="0.35", lw=0.9, label=f"threshold {thr_txt}" + (" and its inverse" if explodes else "")),
                Line2D([], [], color="0.35", lw=1.0, ls="--", label="fitted rate"),
                Line2D([], [], color="0.35", lw=1.3, ls=":", label="horizon")]
    if explodes:
        handles.append(Line2D([], [], color="0.35", lw=1.1, ls="-.", label="explosion lag"))
    ax.legend(handles=handles, fontsize=7, loc="best", framealpha=0.85)
    _bad_note(ax, n_bad, total, "norms")
    return ax


def lyapunov_spectrum(rec, site: Optional[str] = None, *, ax=None):
    """The top-k Lyapunov exponents λ_i of each site: median over samples and min–max range.

    λ_i is the average log growth per step of the i-th perturbation direction
    (``rec.lyapunov(site)``, natural log per step). The line at 0 separates shrinking (λ < 0:
    gradients vanish at rate λ₁) from growing perturbations (λ > 0: exploding, chaotic).

    Args:
        rec: a :class:`~gradscope.Recording` with exponents (from :func:`gradscope.probe`, or
            :func:`gradscope.watch` with ``probe_every``), or an array ``[k]`` / ``[B, k]``.
        site: one site, or ``None`` for every site that has the measure.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: no ``lyapunov`` measure (the message says how to record it).
        GradscopeError: an unknown site, with a suggestion.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.GRU(2, 6), torch.randn(25, 2, 2))
        >>> ax = gradscope.plot.lyapunov_spectrum(rec, "l0")
        >>> len(ax.lines) >= 2
        True
    """
    from matplotlib.ticker import MaxNLocator

    rec = C.as_recording(rec, "lyapunov_spectrum")
    sites = C.sites_with(rec, C.sites_of(rec, site, "lyapunov_spectrum"), "lyapunov", "lyapunov_spectrum",
                         explicit=site is not None)
    ax = C.new_axes(ax, (6.0, 4.0))
    ax.axhline(0.0, color="0.3", lw=0.9)
    n_bad = total = 0
    drew = False
    kmax = 1
    for i, s in enumerate(sites):
        color = f"C{i % 10}"
        ly = np.asarray(rec.lyapunov(s), dtype=np.float64)
        if ly.ndim == 1:
            ly = ly[None, :]
        med, lo, hi = C.finite_quantiles(ly)
        n_bad += int((~np.isfinite(ly)).sum())
        total += ly.size
        idx = np.arange(1, ly.shape[1] + 1)
        kmax = max(kmax, ly.shape[1])
        lam1 = (rec.site_measures(s).get("lyapunov") or {}).get("lambda1", med[0] if med.size else math.nan)
        ok = np.isfinite(med)
        label = f"{s}: λ₁ = {C.fmt(lam1)}/step"
        if ok.any():
            drew = True
            ax.fill_between(idx, lo, hi, color=color, alpha=0.15, lw=0)
            ax.plot(idx[ok], med[ok], "o-", color=color, ms=3.5, lw=1.3, label=label)
        else:
            ax.plot([], [], "o-", color=color, label=label + " (no finite value)")
    if not drew:
        C.message(ax, "no finite Lyapunov exponent to draw", backgroundcolor="white")
    ax.set_xlim(0.5, kmax + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    ax.set_xlabel("exponent index i", fontsize=8)
    ax.set_ylabel(r"$\lambda_i$ (natural log per step)", fontsize=9)
    ax.set_title("Lyapunov spectrum — > 0 grows (exploding), < 0 shrinks (vanishing)", fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    _bad_note(ax, n_bad, total, "exponents")
    return ax


def hidden_spectrum(rec, site: Optional[str] = None, *, ax=None):
    """Singular values of each site's hidden-state matrix ``[samples·time, H]``, relative to the largest.

    A fast fall means the states use few directions (low effective rank): information carried
    through time is squeezed into a small subspace. The legend gives each site's effective rank
    and participation ratio (``rec.hidden_spectrum(site)``).

    Args:
        rec: a :class:`~gradscope.Recording` with hidden spectra (from :func:`gradscope.probe`, or
            :func:`gradscope.watch` with ``probe_every``), or an array ``[K]`` of singular values.
        site: one site, or ``None`` for every site that has the measure.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: no ``hidden_sv`` measure (the message says how to record it).
        GradscopeError: an unknown site, with a suggestion.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.LSTM(2, 6), torch.randn(25, 2, 2))
        >>> gradscope.plot.hidden_spectrum(rec).get_yscale()
        'log'
    """
    from matplotlib.ticker import MaxNLocator

    rec = C.as_recording(rec, "hidden_spectrum")
    sites = C.sites_with(rec, C.sites_of(rec, site, "hidden_spectrum"), "hidden_sv", "hidden_spectrum",
                         explicit=site is not None)
    ax = C.new_axes(ax, (6.0, 4.0))
    n_bad = total = 0
    kmax = 1
    lows = []
    for i, s in enumerate(sites):
        color = f"C{i % 10}"
        hs = rec.hidden_spectrum(s)
        sv = np.asarray(hs["singular_values"], dtype=np.float64).ravel()
        total += sv.size
        kmax = max(kmax, sv.size)
        ok = C.classify(sv)["ok"]
        n_bad += int((~ok).sum())
        label = s
        if hs.get("effective_rank") is not None:
            label += f": effective rank {C.fmt(hs['effective_rank'])} of {sv.size}"
        if hs.get("participation_ratio") is not None:
            label += f", participation ratio {C.fmt(hs['participation_ratio'])}"
        if ok.any():
            top = float(sv[ok].max())
            rel = np.where(ok, sv, np.nan) / top
            idx = np.arange(1, sv.size + 1)
            ax.plot(idx[ok], rel[ok], "o-", color=color, ms=3.5, lw=1.3, label=label)
            lows.append(float(np.nanmin(rel)))
        else:
            ax.plot([], [], "o-", color=color, label=label + " (no positive value)")
    ax.set_yscale("log")
    if lows:
        ax.set_ylim(max(min(lows) / 10 ** 0.4, 1e-300), 10 ** 0.3)
        C.decade_ticks(ax.yaxis, *ax.get_ylim())
    else:
        ax.set_ylim(1e-3, 2.0)
        C.message(ax, "no positive singular value to draw (states all zero or non-finite)", backgroundcolor="white")
    ax.set_xlim(0.5, kmax + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    ax.set_xlabel("index i", fontsize=8)
    ax.set_ylabel(r"$\sigma_i\,/\,\sigma_1$", fontsize=9)
    ax.set_title("Hidden-state spectrum (singular values of the states)", fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25, which="major")
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    _bad_note(ax, n_bad, total, "singular values")
    return ax


_HISTORY = {"lambda1": ("λ₁ (per step)", "top Lyapunov exponent"),
            "horizon": ("gradient horizon (steps)", "gradient horizon"),
            "rate": ("decay rate (per step)", "Jacobian decay rate"),
            "memory_time": ("memory time τ (steps)", "keep-gate memory time")}


def probe_history(rec, site: Optional[str] = None, *, measure: str = "lambda1", ax=None):
    """A probe measure over training, from ``watch(model, probe_every=N)``.

    One line per site: ``rec.measure(site, "probe_" + measure)`` against the training steps at
    which the probes ran (``"probe_steps"``). An infinite horizon (the gradient never fell below
    the threshold) is drawn as an open triangle at the top edge.

    Args:
        rec: a :class:`~gradscope.Recording` from :func:`gradscope.watch` with ``probe_every``.
        site: one site, or ``None`` for every site with a history.
        measure: ``"lambda1"``, ``"horizon"``, ``"rate"`` or ``"memory_time"``.
        ax: an Axes to draw into (default: a new figure).

    Returns:
        The Axes.

    Raises:
        MissingMeasureError: no probe history (``probe()`` measures one batch; histories need
            ``watch(model, probe_every=N)``).
        GradscopeError: an unknown measure or site, with a suggestion.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(2, 8)
        >>> with gradscope.watch(rnn, probe_every=2) as scope:
        ...     for _ in range(4):
        ...         rnn(torch.randn(12, 2, 2))[0].sum().backward()
        >>> ax = gradscope.plot.probe_history(scope.recording, measure="horizon")
        >>> ax.get_xlabel()
        'training step'
    """
    C.check_recording(rec, "probe_history")
    if measure not in _HISTORY:
        raise GradscopeError(f"probe_history: unknown measure {measure!r}; choose one of {list(_HISTORY)}."
                             f"{did_you_mean(str(measure), _HISTORY)}")
    sites = C.sites_of(rec, site, "probe_history")
    name = "probe_" + measure
    have = [s for s in sites if rec.has_measure(s, name) and rec.has_measure(s, "probe_steps")]
    if not have:
        raise MissingMeasureError(
            f"probe_history needs the measure {name!r} (a history of probes during training), which "
            f"{'site ' + repr(site) if site else 'no site of this recording'} has. Record it with "
            f"gradscope.watch(model, probe_every=N); gradscope.probe() measures a single batch.")
    ax = C.new_axes(ax, (6.0, 3.6))
    top = None
    for i, s in enumerate(have):
        color = f"C{i % 10}"
        x = np.asarray(rec.measure(s, "probe_steps"), dtype=np.float64)
        y = np.asarray(rec.measure(s, name), dtype=np.float64)
        fin = np.isfinite(y)
        ax.plot(x[fin], y[fin], "o-", color=color, ms=4, lw=1.3, label=s)
        if (np.isposinf(y)).any():
            top = True
            ax.plot(x[np.isposinf(y)], np.full(int(np.isposinf(y).sum()), 1.0), "^", mfc="none", mec=color, ms=7,
                    transform=ax.get_xaxis_transform(), clip_on=False)
    if measure == "lambda1":
        ax.axhline(0.0, color="0.3", lw=0.9)
    from matplotlib.ticker import MaxNLocator

    ylab, title = _HISTORY[measure]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel(ylab, fontsize=8)
    ax.set_title(f"{title} over training" + (" (△: never below threshold)" if top else ""), fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return ax
