"""Recurrent modules as capture runs them: nn.LSTMCell op by op where it is one fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fused_cell_device", "lstm_cell_ops", "dense_len"]


def fused_cell_device(device: torch.device) -> bool:
    """Whether nn.LSTMCell runs as one fused kernel there (CUDA and other accelerators; the CPU
    composes it from ordinary ops)."""
    return device.type != "cpu"


def lstm_cell_ops(m: nn.Module, input: Tensor, hx=None):
    """nn.LSTMCell's forward written op by op (gate order i, f, g, o), so c_t is an ordinary
    graph node whose gradient includes the path through h_t."""
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    if hx is None:
        zeros = x.new_zeros(x.shape[0], m.hidden_size)
        h, c = zeros, zeros
    else:
        h, c = (hx[0], hx[1]) if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    gates = F.linear(x, m.weight_ih, m.bias_ih) + F.linear(h, m.weight_hh, m.bias_hh)
    i, f, g, o = gates.chunk(4, dim=1)
    c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h1 = torch.sigmoid(o) * torch.tanh(c1)
    return (h1, c1) if batched else (h1.squeeze(0), c1.squeeze(0))


def dense_len(m: nn.Module, input) -> int:
    """Sequence length of a dense input to a fused module."""
    if input.dim() == 2:
        return input.shape[0]
    return input.shape[1] if m.batch_first else input.shape[0]
