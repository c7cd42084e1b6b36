"""probe(): a one-shot measurement of a model on one batch, without a training loop.

One forward and backward pass under a :class:`~gradscope.capture.watch.Scope` that probes once;
its probe (:mod:`gradscope.capture.probing`) calls :func:`gradscope.measure.sites.measure_sites`
for the Jacobians and exponents.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._batch import call_model
from ..capture.options import check_model
from ..capture.sites import FUSED_TYPES, flatten_tensors
from ..capture.watch import Scope
from ..errors import GradscopeError
from ..recording import Recording
from .sites import WORKING_DTYPE

__all__ = ["probe", "default_loss", "nonfinite_tensors"]


def default_loss(output, target=None) -> Tensor:
    """The loss probe() uses when none is given.

    The first tensor of the output (``out`` of ``(out, (h, c))``; ``.data`` of a PackedSequence)
    is the prediction ``y``. Without a target: ``½·mean(y²)`` — every output position receives
    gradient, so the measurement shows how far back it travels. With an integer target:
    cross-entropy over the last dimension of ``y``; with a floating target: mean squared error.
    """
    leaves = flatten_tensors(output)
    if not leaves:
        raise GradscopeError(
            f"the model returned {type(output).__name__} with no tensor in it; pass loss_fn= to "
            f"probe() to turn the output into a scalar loss.")
    y = leaves[0]
    if not y.is_floating_point():
        raise GradscopeError(f"the model's first output has dtype {y.dtype}; pass loss_fn=.")
    if target is None:
        return 0.5 * y.float().pow(2).mean()
    if not target.is_floating_point():
        if y.shape[:-1] != target.shape:
            raise GradscopeError(
                f"integer target of shape {tuple(target.shape)} does not fit an output of shape "
                f"{tuple(y.shape)} (cross-entropy expects target = output shape without the class "
                f"dimension). Pass loss_fn= for another loss.")
        return F.cross_entropy(y.reshape(-1, y.shape[-1]).float(), target.reshape(-1))
    if y.shape != target.shape:
        raise GradscopeError(
            f"target shape {tuple(target.shape)} differs from the output shape {tuple(y.shape)} "
            f"(mean squared error needs equal shapes). Pass loss_fn= for another loss.")
    return F.mse_loss(y.float(), target.float())



def _describe(inputs) -> str:
    """Shapes and dtypes of a batch, for the recording's metadata."""
    if isinstance(inputs, Tensor):
        return f"{list(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_describe(v) for v in inputs)
    return type(inputs).__name__



@torch.no_grad()
def nonfinite_tensors(named) -> List[Dict[str, Any]]:
    """``[{"name", "nan", "inf", "numel"}, …]`` for the floating tensors of ``named`` that hold NaN or inf.

    ``named`` yields ``(name, tensor)`` pairs (``model.named_parameters()``, a state dict's items).
    Sparse tensors count their stored values.

    Example:
        >>> nonfinite_tensors([("w", torch.tensor([1.0, float("nan"), float("inf")])), ("b", torch.ones(2))])
        [{'name': 'w', 'nan': 1, 'inf': 1, 'numel': 3}]
    """
    out = []
    for name, t in named:
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        v = t.detach()
        if v.layout == torch.sparse_coo:
            v = v.coalesce().values()
        elif v.layout != torch.strided:
            v = v.to_dense()
        nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        if nan or inf:
            out.append({"name": str(name), "nan": nan, "inf": inf, "numel": int(t.numel())})
    return out



def probe(model: nn.Module, inputs, *, loss_fn: Optional[Callable] = None, target=None,
          jacobians: bool = True, lyapunov: bool = True, k: Optional[int] = None,
          sites=None, jacobian_samples: int = 4, threshold: float = 1e-3,
          progress: Optional[bool] = None) -> Recording:
    """Measure a model on one batch: gradient flow, Jacobians by lag, Lyapunov exponents, spectra.

    One forward and backward pass under :func:`~gradscope.watch` records ‖∂L/∂h_t‖ and parameter
    gradient norms (the model's ``.grad`` fields are left as they were). Then, for every site, the
    estimators run along the site's trajectory on this batch: Jacobian norms ‖∂h_T/∂h_{T−k}‖ for
    every lag (``jacobian_samples`` samples), the top-k Lyapunov exponents (warm-up: the first
    fifth of the sequence), the hidden-state spectrum, gate statistics (LSTM/GRU: share of gate
    activations below 0.1 / above 0.9, mean forget/update gate and its memory time τ = −1/ln f)
    and the dead-unit share of ReLU RNNs, plus ‖W_hh‖₂ and the spectral radius.

    Half-precision weights (float16, bfloat16) are measured in float32 (noted per site, and
    ``meta["precision"]``). Non-finite weights are listed in ``meta["nonfinite_weights"]``
    (:func:`~gradscope.diagnose` turns them into a critical finding per site naming the tensors);
    sites whose weights or inputs hold NaN/inf are not measured (noted; ``measure_meta[site]
    ["skipped"]`` says why). Sparse parameters are refused (:class:`~gradscope.GradscopeError`).

    Args:
        model: any ``nn.Module``; it is left unchanged (parameters, ``.grad``, hooks, mode).
        inputs: a Tensor, a tuple of positional arguments, or a dict of keyword arguments.
        loss_fn: ``loss_fn(output) -> scalar`` or, with ``target``, ``loss_fn(output, target)``.
            Default: :func:`default_loss` (½·mean(y²), or cross-entropy / MSE against ``target``).
        target: optional target for the loss.
        jacobians, lyapunov: switch those measures off to save time.
        k: number of Lyapunov exponents (default: min(state size, 16)).
        sites: as in :func:`~gradscope.watch`.
        jacobian_samples: samples of the batch the Jacobian norms and exponents use.
        threshold: the gradient horizon threshold stored with the decay fit.
        progress: tqdm bars (None: only when stderr is a terminal and the work is long).

    Returns:
        A :class:`~gradscope.Recording` with one step; ``rec.jacobian_norms(site)``,
        ``rec.lyapunov(site)``, ``rec.hidden_spectrum(site)``, ``rec.gate_stats(site)``.

    Example:
        >>> import torch, gradscope
        >>> rnn = torch.nn.RNN(3, 16)
        >>> rec = gradscope.probe(rnn, torch.randn(20, 2, 3))
        >>> rec.jacobian_norms("l0").shape
        (2, 21)
    """
    check_model(model)
    if isinstance(inputs, Tensor) and not inputs.is_floating_point() and not _has_embedding(model):
        raise GradscopeError(
            f"probe() got inputs of dtype {inputs.dtype} for a model without an embedding; "
            f"recurrent layers need floating-point inputs.")
    sparse = [n for n, p in model.named_parameters() if p.layout != torch.strided]
    if sparse:
        raise GradscopeError(
            f"parameter {sparse[0]!r} is a sparse tensor ({model.get_parameter(sparse[0]).layout}); gradscope "
            f"measures dense weights: replace it with torch.nn.Parameter(p.to_dense()) before probing.")
    nonfinite = nonfinite_tensors(list(model.named_parameters()) + list(model.named_buffers()))
    grads_before = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    opts = dict(jacobians=jacobians, lyapunov=lyapunov, k=k, jacobian_samples=jacobian_samples,
                threshold=threshold, progress=progress)
    scope = Scope(model, every=1, sites=sites, probe_every=1, probe_options=opts, update_ratio=False)
    try:
        out = call_model(model, inputs)
        loss = (loss_fn(out) if target is None else loss_fn(out, target)) if loss_fn else default_loss(out, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise GradscopeError(f"the loss must be a scalar tensor, got {type(loss).__name__}"
                                 f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))}.")
        params = [p for p in model.parameters() if p.requires_grad]
        if loss.requires_grad and scope.passes.reruns_in_backward():
            # Reentrant torch.utils.checkpoint refuses torch.autograd.grad: a plain backward,
            # and the .grad it writes is put back (parameters below, input leaves here).
            leaves = [t for t in flatten_tensors(inputs) if t.requires_grad and t.is_leaf]
            before = [t.grad for t in leaves]
            try:
                loss.backward()
            finally:
                for t, g in zip(leaves, before):
                    t.grad = g
        elif loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
        else:
            raise GradscopeError("the loss does not depend on any parameter that requires grad; "
                                 "nothing to measure.")
    finally:
        scope.close()
        for n, p in model.named_parameters():  # autograd.grad leaves .grad alone; be sure anyway
            p.grad = grads_before[n]
    rec = scope.recording

    meta = dict(rec.meta, source="probe", loss=float(loss.detach()),
                inputs=f"the batch given to probe() ({_describe(inputs)})",
                mode="train" if model.training else "eval")
    meta.pop("schedule", None)  # one measurement, no watch schedule
    stored = sorted({m.get("stored_dtype") or (m.get("depth_jacobian") or {}).get("stored_dtype")
                     for m in rec.measure_meta.values()} - {None})
    if stored:
        meta["precision"] = {"stored": ", ".join(stored), "measured": str(WORKING_DTYPE).replace("torch.", "")}
    if nonfinite:
        meta["nonfinite_weights"] = nonfinite
    measures = {k: v for k, v in rec.measures().items() if not k[1].startswith("probe_")}
    mmeta = {site: {k: v for k, v in m.items() if k != "probe_step"} for site, m in rec.measure_meta.items()}
    return rec.replace(measures=measures, measure_meta=mmeta, meta=meta)


def _has_embedding(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()) or \
        not any(isinstance(m, FUSED_TYPES) for m in model.modules())
