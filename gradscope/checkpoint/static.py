"""Static analysis of recurrent and attention weights, without running the model.

Spectra of the recurrent weight blocks, the memory time implied by a gate bias, the query–key
bilinear norms of attention heads, and a rough estimate of what probing a module would cost.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..estimators.gates import memory_time
from .locate import CELL_KINDS, GATE_NAMES, FoundModule, site_name

__all__ = ["static_analysis", "estimate_probe_seconds"]


#: Matrices larger than this get their top singular values and spectral radius from ARPACK: the dense
#: SVD and eigenvalues of a 4096² block take minutes (8·n³), the iterative ones about a second.
_DENSE_SPECTRUM_MAX = 1024


def _large_spectrum(m: np.ndarray, top: int) -> Tuple[np.ndarray, float]:
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigs, svds

    try:
        sv = np.sort(svds(m, k=min(top, min(m.shape) - 1), return_singular_vectors=False, tol=1e-8,
                          random_state=0))[::-1]
        radius = float("nan")
        if m.shape[0] == m.shape[1]:
            v0 = np.ones(m.shape[0]) / math.sqrt(m.shape[0])
            radius = float(np.max(np.abs(eigs(m, k=1, which="LM", return_eigenvectors=False, tol=1e-8,
                                              v0=v0, maxiter=20 * m.shape[0]))))
    except (ArpackError, ArpackNoConvergence) as exc:
        raise ArithmeticError(str(exc)) from None
    return sv, radius


def _spectrum(m: np.ndarray, top: int = 16) -> Dict[str, Any]:
    nan = {"spectral_norm": float("nan"), "spectral_radius": float("nan"), "singular_values": []}
    if not np.all(np.isfinite(m)):
        return nan
    try:
        if min(m.shape) > _DENSE_SPECTRUM_MAX:
            sv, radius = _large_spectrum(m, top)
        else:
            sv = np.linalg.svd(m, compute_uv=False)
            radius = float(np.max(np.abs(np.linalg.eigvals(m)))) if m.shape[0] == m.shape[1] and m.size else float("nan")
    except (np.linalg.LinAlgError, ArithmeticError):  # LAPACK/ARPACK did not converge (pathological values)
        return nan
    return {"spectral_norm": float(sv[0]) if sv.size else 0.0, "spectral_radius": radius,
            "singular_values": [float(s) for s in sv[:top]]}


def _bias_stats(b: np.ndarray, name: str) -> Dict[str, float]:
    if not np.all(np.isfinite(b)):
        nan = float("nan")
        return {name: nan, f"{name}_min": nan, f"{name}_max": nan, "memory_time": nan, "memory_time_median": nan}
    return {name: float(b.mean()), f"{name}_min": float(b.min()), f"{name}_max": float(b.max()),
            "memory_time": memory_time(float(b.mean())),
            "memory_time_median": float(np.median(memory_time(b)))}


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    if t is not None and t.layout != torch.strided:
        t = t.to_dense()
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def static_analysis(found: FoundModule, state_dict: Optional[Mapping[str, Tensor]] = None) -> List[Dict[str, Any]]:
    """Spectra of the recurrent weights and gate-bias memory times, per layer and direction.

    For each layer and direction of a fused module (one entry for a cell), and for each gate block
    W_g ``[H, H or P]`` of ``weight_hh`` (LSTM i, f, g, o; GRU r, z, n; RNN one block named ``h``):
    ``spectral_norm`` ‖M‖₂, ``spectral_radius`` max |eig M| and ``singular_values`` (descending,
    top 16) of the recurrent map M. Without projection M = W_g; with ``proj_size`` P the state
    fed back is h = W_hr m, so M = W_g @ W_hr, square ``[H, H]`` of rank ≤ P.

    LSTM: ``forget_bias`` = mean over units of b_f = b_ih,f + b_hh,f (``_min``, ``_max`` too) and
    ``memory_time`` τ = −1/ln σ(mean b_f) (SCIENCE.md: the cell path decays as σ(b_f)^k with small
    weights); ``memory_time_median`` is the median over units of their own τ. GRU: the same for the
    update gate, whose keep share is z (h' = (1−z) n + z h), as ``update_bias`` and
    ``memory_time``. Without biases b = 0. τ is ``inf`` when σ(b) rounds to 1. Non-finite weights
    give NaN values, ``finite`` False.

    Attention modules have no recurrence; their single entry holds ``qk_spectral_norm``, per head
    ‖W_q,hᵀ W_k,h‖₂ / √d (the bilinear form of the attention logits; it depends on the assumed
    ``num_heads``), and its maximum ``qk_spectral_norm_max``.

    Args:
        found: A module from :func:`find_modules`.
        state_dict: The state dict it was found in; defaults to the tensors ``found`` holds.

    Returns:
        One JSON-able dict per site: ``site`` (``"enc.lstm.l0"``, ``"enc.lstm.l0_reverse"``; the
        prefix for cells), ``kind``, ``layer``, ``direction`` (``"forward"``/``"reverse"``),
        ``hidden_size``, ``proj_size``, ``recurrent_map``, ``gates`` ({gate: spectra}), ``finite``
        and the bias entries above. Values are plain floats (``inf``/``nan`` possible) and lists.

    Example:
        >>> from gradscope.checkpoint import find_modules
        >>> sd = torch.nn.LSTM(2, 3).state_dict()
        >>> sd["bias_ih_l0"] = torch.zeros(12)
        >>> sd["bias_hh_l0"] = torch.tensor([0.0] * 3 + [1.0] * 3 + [0.0] * 6)  # gates i, f, g, o
        >>> row = static_analysis(find_modules(sd)[0], sd)[0]
        >>> row["site"], row["forget_bias"], round(row["memory_time"], 2), sorted(row["gates"])
        ('l0', 1.0, 3.19, ['f', 'g', 'i', 'o'])
    """
    tensors = dict(found.tensors)
    if state_dict is not None:
        missing = [k for k in found.keys.values() if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"the state dict lacks {missing[0]!r}, which {found.kind} {found.prefix or '<root>'!r} "
                f"was found with; pass the state dict given to find_modules.")
        tensors = {local: state_dict[key] for local, key in found.keys.items()}
    if found.kind == "MultiheadAttention":
        return [_attention_analysis(found, tensors)]
    kind = found.kind.replace("Cell", "")
    gate_names = GATE_NAMES[kind]
    cfg = found.config
    if found.kind in CELL_KINDS:
        units = [(0, False, "")]
    else:
        dirs = (False, True) if cfg["bidirectional"] else (False,)
        units = [(layer, rev, f"_l{layer}{'_reverse' if rev else ''}")
                 for layer in range(cfg["num_layers"]) for rev in dirs]
    rows = []
    hidden = cfg["hidden_size"]
    proj = cfg.get("proj_size", 0)
    for layer, rev, sfx in units:
        w_hh = _np(tensors["weight_hh" + sfx])
        w_hr = _np(tensors.get("weight_hr" + sfx))
        blocks = np.split(w_hh, len(gate_names), axis=0)
        maps = [b @ w_hr if w_hr is not None else b for b in blocks]
        finite = bool(np.all(np.isfinite(w_hh)) and (w_hr is None or np.all(np.isfinite(w_hr))))
        row: Dict[str, Any] = {
            "site": found.prefix if found.kind in CELL_KINDS else site_name(found.prefix, layer, "_reverse" if rev else ""),
            "kind": found.kind, "layer": layer, "direction": "reverse" if rev else "forward",
            "hidden_size": hidden, "proj_size": proj,
            "recurrent_map": "W_hh[gate] @ W_hr" if w_hr is not None else "W_hh[gate]",
            "gates": {g: _spectrum(m) for g, m in zip(gate_names, maps)},
            "finite": finite,
        }
        if kind in ("LSTM", "GRU"):
            b = np.zeros(hidden)
            for name in ("bias_ih", "bias_hh"):
                if name + sfx in tensors:
                    b = b + _np(tensors[name + sfx])[hidden:2 * hidden]  # gate 1: LSTM f, GRU z
            row["memory_gate"] = "f" if kind == "LSTM" else "z"
            row.update(_bias_stats(b, "forget_bias" if kind == "LSTM" else "update_bias"))
            row["finite"] = finite and bool(np.all(np.isfinite(b)))
        rows.append(row)
    return rows


def _attention_analysis(found: FoundModule, tensors: Dict[str, Tensor]) -> Dict[str, Any]:
    cfg = found.config
    embed, heads = cfg["embed_dim"], cfg["num_heads"]
    d = embed // heads
    if "in_proj_weight" in tensors:
        w = _np(tensors["in_proj_weight"])
        w_q, w_k = w[:embed], w[embed:2 * embed]
    else:
        w_q, w_k = _np(tensors["q_proj_weight"]), _np(tensors["k_proj_weight"])
    finite = bool(np.all(np.isfinite(w_q)) and np.all(np.isfinite(w_k)))
    norms = []
    for h in range(heads):
        a, b = w_q[h * d:(h + 1) * d], w_k[h * d:(h + 1) * d]     # [d, E], [d, kdim]
        if not finite:
            norms.append(float("nan"))
            continue
        # ‖aᵀ b‖₂ through thin QRs: aᵀ = Q_a R_a, bᵀ = Q_b R_b, so aᵀb = Q_a (R_a R_bᵀ) Q_bᵀ.
        try:
            r_a = np.linalg.qr(a.T, mode="r")
            r_b = np.linalg.qr(b.T, mode="r")
            norms.append(float(np.linalg.svd(r_a @ r_b.T, compute_uv=False)[0]) / math.sqrt(d))
        except np.linalg.LinAlgError:
            norms.append(float("nan"))
    return {"site": found.prefix, "kind": found.kind, "layer": 0, "direction": "forward",
            "embed_dim": embed, "num_heads": heads, "qk_spectral_norm": norms,
            "qk_spectral_norm_max": max(norms) if norms else float("nan"), "finite": finite}


#: Effective speed assumed for probe estimates; a rough CPU figure (measured 2.5–20 GFLOP/s for
#: LSTM/RNN probes of H 128–256 on one core), so estimates are right within a factor of a few.
PROBE_FLOPS_PER_SECOND = 1e10


def estimate_probe_seconds(module: nn.Module, seq_len: int, batch: int, k: Optional[int] = None,
                           jacobian_samples: int = 4) -> float:
    """A rough estimate of :func:`gradscope.probe`'s time on ``module`` for ``[seq_len, batch]`` inputs.

    The probe multiplies per-step state Jacobians over every lag: about ``2·N³`` operations per step
    and sample for a state of size N (H, or 2H for LSTM's (h, c)), plus the Lyapunov QR steps
    ``4·N²·k``, for ``min(batch, jacobian_samples)`` samples and every layer and direction. Attention
    modules and other layers are not counted. It is an estimate, not a promise: it only has to tell a
    report of seconds from one of hours before it starts.

    Example:
        >>> estimate_probe_seconds(torch.nn.LSTM(8, 64), 100, 8) < 1 < estimate_probe_seconds(
        ...     torch.nn.RNN(8, 4096), 100, 8)
        True
    """
    flops = 0.0
    samples = min(batch, jacobian_samples)
    for m in module.modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            h = m.hidden_size
            n = h + (getattr(m, "proj_size", 0) or h) if isinstance(m, (nn.LSTM, nn.LSTMCell)) else h
            units = getattr(m, "num_layers", 1) * (2 if getattr(m, "bidirectional", False) else 1)
            kk = min(k or 16, n)
            flops += units * samples * seq_len * (2.0 * n ** 3 + 4.0 * n ** 2 * kk)
    return flops / PROBE_FLOPS_PER_SECOND
