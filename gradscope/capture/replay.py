"""Step-by-step replay of fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` modules.

A fused recurrent module runs as one kernel: its per-step states are not nodes of the autograd
graph, so a hook on ``output[:, t]`` sees only the direct term of ∂L/∂h_t. The replay recomputes
the module with the same parameters, one time step at a time, so every h_t (and c_t) is a graph
node whose tensor hook receives the *total* gradient. It reproduces every option: layers,
bidirectional, ``batch_first``, ``proj_size``, ``bias=False``, ``nonlinearity="relu"``,
``PackedSequence`` input, unbatched input, given or default initial state, and inter-layer dropout
in training mode (drawn with the same ``torch.dropout`` call on the same shapes as the CPU kernel,
so a seeded run draws the same mask there).

Index letters: T time, B batch, I input features, H hidden, P projection, D directions, L layers.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..estimators.steps import RecurrentStep, step_from_module
from . import bptt

# on_state(layer, reverse, t, state) is called once per layer, direction and time step with the
# freshly computed state (a Tensor, or (h, c) for LSTM) for the samples active at step t.
OnState = Callable[[int, bool, int, object], None]
# on_norms(layer, reverse, {"h": Tensor[T], "c": Tensor[T]}) is called during backward by the fast path.
OnNorms = Callable[[int, bool, dict], None]

__all__ = ["replay_fused", "OnState"]


def _run_direction(step: RecurrentStep, xs: Tensor, state0, reverse: bool,
                   batch_sizes: Optional[Sequence[int]], layer: int, on_state: Optional[OnState]):
    """One layer and direction. ``xs`` is ``[T, B, I]`` (or packed data ``[ΣT, I]``).

    Returns the output sequence (same layout as ``xs``) and the final state.
    """
    is_lstm = isinstance(state0, tuple)
    # All time steps' input projections in one matmul. unbind/split (not xw[t]) keep the backward
    # linear in T: indexing would make every step's backward fill a zero tensor of the whole sequence.
    xw = step.project_inputs(xs)
    state = state0
    if batch_sizes is None:
        xws = xw.unbind(0)
        T = len(xws)
        outs: List[Optional[Tensor]] = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            state = step.recur(state, xws[t])
            if on_state is not None:
                on_state(layer, reverse, t, state)
            outs[t] = state[0] if is_lstm else state
        return torch.stack(outs), state

    # PackedSequence: at step t the first batch_sizes[t] samples (sorted by length) are active.
    T = len(batch_sizes)
    xws = xw.split(list(batch_sizes))
    outs = [None] * T
    full = state  # states of all B samples; finished (forward) / not yet started (reverse) rows wait
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        bs = batch_sizes[t]
        if is_lstm:
            cur = tuple(s[:bs] for s in full)
        else:
            cur = full[:bs]
        new = step.recur(cur, xws[t])
        if on_state is not None:
            on_state(layer, reverse, t, new)
        outs[t] = new[0] if is_lstm else new
        n_all = (full[0] if is_lstm else full).shape[0]
        if bs == n_all:
            full = new
        elif is_lstm:
            full = tuple(torch.cat((a, b[bs:])) for a, b in zip(new, full))
        else:
            full = torch.cat((new, full[bs:]))
    return torch.cat(outs), full


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def replay_fused(module: nn.Module, input, hx=None, on_state: Optional[OnState] = None,
                 on_norms: Optional[OnNorms] = None):
    """Compute ``module(input, hx)`` step by step; same outputs and parameter gradients.

    Args:
        module: an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (any options).
        input: ``[T, B, I]`` (``[B, T, I]`` if ``batch_first``), unbatched ``[T, I]``, or a
            ``PackedSequence``.
        hx: initial state as the module takes it, or None for zeros.
        on_state: called with ``(layer, reverse, t, state)`` for every new state (the autograd
            replay: hooks on those tensors receive the total gradients).
        on_norms: when given, dense input outside autocast takes the fast path
            (:mod:`.bptt`): ``on_norms(layer, reverse, {"h": [T], "c": [T]})`` receives the
            per-position norms of the total gradients during backward, and ``on_state`` is not
            called for those layers.

    Returns:
        What the module returns: ``(output, h_n)`` or ``(output, (h_n, c_n))``.
    """
    is_lstm = isinstance(module, nn.LSTM)
    L, D = module.num_layers, 2 if module.bidirectional else 1
    packed = isinstance(input, PackedSequence)
    unbatched = False
    sorted_idx = unsorted_idx = None
    if packed:
        x, bs_tensor, sorted_idx, unsorted_idx = input
        batch_sizes = [int(b) for b in bs_tensor]
        B = batch_sizes[0]
    else:
        batch_sizes = None
        if input.dim() == 2:  # unbatched [T, I]
            unbatched = True
            input = input.unsqueeze(0 if module.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
        elif input.dim() != 3:
            # Let the module raise its own, familiar error.
            return type(module).forward(module, input, hx)
        x = input.transpose(0, 1) if module.batch_first else input
        B = x.shape[1]
    real_hidden = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    if hx is None:
        zeros = dict(dtype=x.dtype, device=x.device)
        h0 = torch.zeros(L * D, B, real_hidden, **zeros)
        hx = (h0, torch.zeros(L * D, B, module.hidden_size, **zeros)) if is_lstm else h0
    elif packed and sorted_idx is not None:
        hx = tuple(h.index_select(1, sorted_idx) for h in hx) if is_lstm else hx.index_select(1, sorted_idx)
    # The module's own argument checks give the user the messages they know.
    module.check_forward_args(x if packed else input, hx, bs_tensor if packed else None)

    fast = on_norms is not None and not packed and not _autocast_on(x.device.type)
    layer_input = x
    finals_h, finals_c = [], []
    for layer in range(L):
        dir_outs = []
        for d in range(D):
            step = step_from_module(module, layer, reverse=bool(d))
            idx = layer * D + d
            state0 = (hx[0][idx], hx[1][idx]) if is_lstm else hx[idx]
            if fast:
                sink = functools.partial(on_norms, layer, bool(d))
                if is_lstm:
                    out, *final = bptt.lstm_layer(layer_input, state0[0], state0[1], step, bool(d), sink)
                elif isinstance(module, nn.GRU):
                    out, final = bptt.gru_layer(layer_input, state0, step, bool(d), sink)
                else:
                    out, final = bptt.elman_layer(layer_input, state0, step, bool(d), sink)
            else:
                out, final = _run_direction(step, layer_input, state0, bool(d), batch_sizes, layer, on_state)
            dir_outs.append(out)
            if is_lstm:
                finals_h.append(final[0])
                finals_c.append(final[1])
            else:
                finals_h.append(final)
        layer_output = dir_outs[0] if D == 1 else torch.cat(dir_outs, dim=-1)
        if module.dropout and module.training and layer < L - 1:
            layer_output = torch.dropout(layer_output, module.dropout, True)
        layer_input = layer_output

    h_n = torch.stack(finals_h)
    c_n = torch.stack(finals_c) if is_lstm else None
    if packed:
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if is_lstm else None
        output = PackedSequence(layer_input, bs_tensor, sorted_idx, unsorted_idx)
    else:
        output = layer_input.transpose(0, 1) if module.batch_first else layer_input
        if unbatched:
            output = output.squeeze(0 if module.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else None
    return (output, (h_n, c_n)) if is_lstm else (output, h_n)
