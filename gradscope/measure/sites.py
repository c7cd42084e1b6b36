"""Measurement on a model's recorded calls: the estimators along each site's trajectory.

:func:`measure_sites` rebuilds the trajectory of every wanted site from the calls recorded in one
forward pass (:mod:`gradscope.measure.trajectories`) and runs the estimators on it: Jacobian norms by
lag, Lyapunov exponents, the hidden-state spectrum, gate and weight statistics. It is called by
:func:`gradscope.probe` (one batch) and by :class:`~gradscope.Scope` on its probe schedule.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .._batch import fused_args
from ..errors import GradscopeError, NonFiniteWarning
from ..estimators import decay_rate, hidden_spectrum, jacobian_norms, lyapunov_spectrum
from ..estimators._util import progress_iter
from .trajectories import CellStep, Trajectory, cell_trajectory, fused_trajectories

__all__ = ["measure_sites", "measure_trajectory", "WORKING_DTYPE"]

# Half precision has too little range and resolution for products of T Jacobians (and torch's
# linear algebra refuses it): such sites are measured in float32, and the Recording says so.
WORKING_DTYPE = torch.float32



def _step_tensors(step) -> List[Tensor]:
    if isinstance(step, CellStep):
        return list(step.module.parameters()) + list(step.module.buffers())
    return [w for w in (getattr(step, n, None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
            if isinstance(w, Tensor)]


def _all_finite(x) -> bool:
    parts = x if isinstance(x, (tuple, list)) else (x,)
    return all(bool(torch.isfinite(p).all()) for p in parts
               if isinstance(p, Tensor) and (p.is_floating_point() or p.is_complex()))


def _unmeasurable(tr: Trajectory) -> Optional[str]:
    """Why no estimator can run on this trajectory (non-finite weights or inputs), or None."""
    if not _all_finite(_step_tensors(tr.step)):
        return "its weights hold NaN or inf"
    if not (_all_finite(tr.inputs) and _all_finite(tr.h0)):
        return "its inputs or initial state hold NaN or inf (from non-finite weights upstream, or in the batch)"
    return None


class _Float32Cell:
    """``step(h, x)`` of a user cell whose weights are half precision, run with float32 copies of its
    parameters and buffers (``torch.func.functional_call``: the module itself is left as it is)."""

    def __init__(self, step: CellStep):
        self.step = step
        m = step.module
        self.params = {n: (t.detach().to(WORKING_DTYPE) if t.is_floating_point() else t)
                       for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        self.leaves = [v.to(WORKING_DTYPE) if isinstance(v, Tensor) and v.dtype in _LOW else v for v in step.leaves]

    def __call__(self, h, x):
        from torch.func import functional_call

        st = self.step
        args, kwargs = st.inputs(h, x, self.leaves)
        return st.state_of(functional_call(st.module, self.params, tuple(args), dict(kwargs)))


def _stored_dtype(tr: Trajectory) -> Optional[torch.dtype]:
    """The half-precision dtype a trajectory's weights or states are stored in, or None."""
    for t in _step_tensors(tr.step) + [tr.states]:
        if isinstance(t, Tensor) and t.dtype in _LOW:
            return t.dtype
    return None


def _working_precision(tr: Trajectory) -> Tuple[Trajectory, Optional[torch.dtype]]:
    """The trajectory in float32 when its weights or states are half precision: (trajectory, stored
    dtype or None). Built-in steps are cast by the estimators; a user cell gets float32 copies."""
    stored = _stored_dtype(tr)
    step = tr.step
    if stored is not None and isinstance(step, CellStep):
        step = _Float32Cell(step)
    return Trajectory(tr.site, step, _upcast(tr.h0), _upcast(tr.inputs), _upcast(tr.states), tr.gate_stats), stored


def measure_trajectory(tr: Trajectory, *, jacobians: bool, lyapunov: bool, k: Optional[int],
                       jacobian_samples: int, threshold: float, progress) -> Tuple[Dict, Dict]:
    """Run the estimators on one trajectory: (arrays, metadata) for the Recording.

    Half-precision trajectories (float16, bfloat16) are measured in float32; the metadata keeps
    ``stored_dtype`` and ``working_dtype``.
    """
    arrays: Dict[str, np.ndarray] = {}
    tr, stored = _working_precision(tr)
    meta: Dict[str, Any] = {"seq_len": int(tr.inputs.shape[0]), "batch": int(tr.inputs.shape[1])}
    if stored is not None:
        meta["stored_dtype"] = str(stored).replace("torch.", "")
        meta["working_dtype"] = str(WORKING_DTYPE).replace("torch.", "")
    T, B = tr.inputs.shape[0], tr.inputs.shape[1]
    nb = min(B, jacobian_samples)
    sub = lambda s: s[:nb]  # noqa: E731
    h0 = tuple(sub(p) for p in tr.h0) if isinstance(tr.h0, tuple) else sub(tr.h0)
    x = tr.inputs[:, :nb]
    N = sum(p.shape[-1] for p in tr.h0) if isinstance(tr.h0, tuple) else tr.h0.shape[-1]
    meta["state_size"] = int(N)
    if jacobians:
        t0 = time.perf_counter()
        jn = jacobian_norms(tr.step, h0, x, ord=2, progress=progress)
        arrays["jacobian_norms"] = jn
        fit = decay_rate(jn, threshold=threshold)
        meta["jacobian"] = {"ord": 2, "samples": nb, "rate": fit.rate, "intercept": fit.intercept,
                            "horizon": fit.horizon,
                            "explosion_lag": fit.explosion_lag, "threshold": threshold,
                            "seconds": time.perf_counter() - t0}
    if lyapunov:
        kk = min(N, 16) if k is None else k
        if kk > N:
            raise GradscopeError(f"k={k} exceeds the state size {N} of site {tr.site!r}; use k <= {N}.")
        warm = T // 5
        t0 = time.perf_counter()
        ly = lyapunov_spectrum(tr.step, h0, x, k=kk, warmup=warm, progress=progress)
        arrays["lyapunov"] = ly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # every sample NaN: noted as non-finite already
            lam1 = float(np.nanmedian(ly[:, 0])) if ly.size else math.nan
        meta["lyapunov"] = {"k": kk, "warmup": warm, "samples": nb, "lambda1": lam1,
                            "seconds": time.perf_counter() - t0}
    hs = hidden_spectrum(tr.states)
    arrays["hidden_sv"] = hs.singular_values
    meta["hidden"] = {"effective_rank": hs.effective_rank, "participation_ratio": hs.participation_ratio,
                      "n_samples": hs.n_samples}
    meta["gates"] = dict(tr.gate_stats)
    w = getattr(tr.step, "weight_hh", None)
    if w is not None:
        meta["weights"] = _weight_stats(tr.step)
    return arrays, meta


@torch.no_grad()
def _weight_stats(step) -> Dict[str, float]:
    """‖W_hh‖₂ and the spectral radius of the recurrent map (per gate block for LSTM/GRU)."""
    W = step.weight_hh.detach().double()
    out = {"w_hh_norm": float(torch.linalg.matrix_norm(W, ord=2))}
    G = W.shape[0] // step.hidden_size
    names = {1: ["h"], 3: ["r", "z", "n"], 4: ["i", "f", "g", "o"]}[G]
    wr = getattr(step, "weight_hr", None)
    radii = {}
    for gi, name in enumerate(names):
        block = W[gi * step.hidden_size:(gi + 1) * step.hidden_size]
        if wr is not None:
            block = block @ wr.detach().double()
        radii[name] = float(torch.linalg.eigvals(block).abs().max())
        out[f"w_hh_{name}_norm"] = float(torch.linalg.matrix_norm(block, ord=2))
    out["spectral_radius"] = max(radii.values())
    for name, r in radii.items():
        out[f"spectral_radius_{name}"] = r
    # effective bias of the gate that keeps memory: LSTM forget (block 1), GRU update (block 1)
    if G in (3, 4):
        H = step.hidden_size
        b = torch.zeros(H, dtype=torch.float64, device=W.device)
        for bias in (step.bias_ih, step.bias_hh):
            if bias is not None:
                b = b + bias.detach().double()[H:2 * H]
        key = "forget_bias" if G == 4 else "update_bias"
        out[key] = float(b.mean())
        out[key + "_min"] = float(b.min())
        out[key + "_max"] = float(b.max())
    return out


def measure_sites(mods: Dict[str, nn.Module], site_specs, wanted, calls: Dict[str, list], *,
                  jacobians: bool = True, lyapunov: bool = True, k: Optional[int] = None,
                  jacobian_samples: int = 4, threshold: float = 1e-3, progress=None,
                  order: Sequence[str] = ()) -> Tuple[Dict, Dict, List[str]]:
    """Trajectories of the recorded calls of every wanted site, then the estimators on each.

    ``calls[module] = [((args, kwargs), output), …]`` as recorded during one forward pass.
    Returns ``(measures {(site, name): array}, metadata {site: dict}, notes)``.
    """
    # The estimators measure in the weights' precision: autocast (a watched step may probe inside
    # the user's autocast region) is switched off while trajectories are rebuilt and measured.
    with contextlib.ExitStack() as stack:
        for dt in sorted({p.device.type for m in mods.values() for p in m.parameters()} & _AUTOCAST_TYPES):
            stack.enter_context(torch.autocast(device_type=dt, enabled=False))
        return _measure_sites(mods, site_specs, wanted, calls, jacobians=jacobians, lyapunov=lyapunov, k=k,
                              jacobian_samples=jacobian_samples, threshold=threshold, progress=progress,
                              order=order)


_AUTOCAST_TYPES = {"cpu", "cuda", "xpu", "mps"}
_LOW = (torch.float16, torch.bfloat16)


def _upcast(x):
    """Half-precision tensors (of autocast regions) → float32; everything else as it is."""
    if isinstance(x, tuple):
        return tuple(_upcast(v) for v in x)
    return x.float() if isinstance(x, Tensor) and x.dtype in _LOW else x


def _measure_sites(mods, site_specs, wanted, calls, *, jacobians, lyapunov, k, jacobian_samples, threshold,
                   progress, order):
    trajectories: List[Trajectory] = []
    notes: List[str] = []
    fused = {s.module_name for s in site_specs.values() if s.kind != "cell" and s.name in wanted}
    cells = {s.module_name for s in site_specs.values() if s.kind == "cell" and s.name in wanted}
    for name in sorted(fused):
        mcalls = calls.get(name) or []
        if not mcalls:
            continue
        if len(mcalls) > 1:
            notes.append(f"{name!r} ran {len(mcalls)} times in one forward; measured its first call.")
        name_of = {(s.layer, s.reverse): s.name for s in site_specs.values()
                   if s.module_name == name and s.name in wanted}
        trajectories += fused_trajectories(name_of, mods[name], *fused_args(*mcalls[0][0]))
    for name in sorted(cells):
        tr, reason = cell_trajectory(name, mods[name], calls.get(name) or [])
        if tr is None:
            notes.append(f"site {name!r}: no Jacobians or exponents: {reason}.")
        else:
            trajectories.append(tr)
    measures, mmeta = {}, {}
    rank = {s: i for i, s in enumerate(order)}
    trajectories.sort(key=lambda t: rank.get(t.site, 1 << 30))
    work = sum(float(t.inputs.shape[0]) * float(t.states.shape[-1]) ** 3 * min(jacobian_samples, t.inputs.shape[1])
               for t in trajectories) if jacobians else 0.0
    for tr in progress_iter(trajectories, len(trajectories), progress, work, desc="gradscope probe"):
        why = _unmeasurable(tr)
        if why is not None:  # NaN in, NaN out: nothing to measure, and the SVDs would refuse it
            notes.append(f"site {tr.site!r}: not measured: {why}; Jacobians, exponents, spectra and gate "
                         f"statistics need finite values.")
            mmeta[tr.site] = {"seq_len": int(tr.inputs.shape[0]), "batch": int(tr.inputs.shape[1]),
                              "skipped": why}
            continue
        # Non-finite values inside a recurrence are findings, not crashes: the estimators mark
        # the affected entries NaN and warn; the warning text goes into the recording's notes.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonFiniteWarning)
            arrays, meta = measure_trajectory(tr, jacobians=jacobians, lyapunov=lyapunov, k=k,
                                              jacobian_samples=jacobian_samples, threshold=threshold,
                                              progress=progress)
        for w in caught:
            if issubclass(w.category, NonFiniteWarning):
                notes.append(f"site {tr.site!r}: {w.message}")
                meta.setdefault("warnings", []).append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if "stored_dtype" in meta:
            notes.append(f"site {tr.site!r}: weights stored in {meta['stored_dtype']}; measured in "
                         f"{meta['working_dtype']}.")
        for key, a in arrays.items():
            measures[(tr.site, key)] = a
        mmeta[tr.site] = meta
    return measures, mmeta, notes
