"""Reference models and a task: the seed article's three models, made to run, and the adding problem.

The article that started gradscope (``shared/seed-article.txt``, §4) shows three PyTorch models for
long-range dependencies: an LSTM, a GRU and a self-attention block. Two of them do not run as
printed; the versions here keep their intent and say what was changed.

Index letters: B batch, T sequence length, I input features, H hidden units, O outputs.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import GradscopeError

__all__ = ["SequenceLSTM", "SequenceGRU", "SelfAttentionBlock", "adding_problem", "recall_problem",
           "RECALL_TOKENS"]

#: classes of the recall task
RECALL_TOKENS = 8


class SequenceLSTM(nn.Module):
    """The seed article's LSTM (§4.1), unchanged: stacked ``nn.LSTM`` → last step → ``nn.Linear``.

    ``[B, T, input_size]`` → ``[B, output_size]``. The initial state ``(h0, c0)`` is zeros, made
    explicitly as in the article (``nn.LSTM`` would do the same without them).

    Example:
        >>> SequenceLSTM()(torch.randn(3, 7, 10)).shape
        torch.Size([3, 5])
    """

    def __init__(self, input_size: int = 10, hidden_size: int = 20, num_layers: int = 2,
                 output_size: int = 5):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size, device=x.device, dtype=x.dtype)
        c0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size, device=x.device, dtype=x.dtype)
        out, _ = self.lstm(x, (h0, c0))
        return self.fc(out[:, -1, :])


class SequenceGRU(nn.Module):
    """The seed article's GRU (§4.2), corrected: stacked ``nn.GRU`` → last step → ``nn.Linear``.

    ``[B, T, input_size]`` → ``[B, output_size]``. The article calls ``self.gru(x, (h0, c0))``,
    copied from its LSTM; ``nn.GRU`` has no cell state and takes one tensor ``h0``, so that call
    raises (torch 2.x: ``AttributeError: 'tuple' object has no attribute 'dim'``). Here ``h0``
    alone is passed, which is what the article meant.

    Example:
        >>> SequenceGRU()(torch.randn(3, 7, 10)).shape
        torch.Size([3, 5])
    """

    def __init__(self, input_size: int = 10, hidden_size: int = 20, num_layers: int = 2,
                 output_size: int = 5):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.gru = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.zeros(self.num_layers, x.size(0), self.hidden_size, device=x.device, dtype=x.dtype)
        out, _ = self.gru(x, h0)
        return self.fc(out[:, -1, :])


class SelfAttentionBlock(nn.Module):
    """Single-head scaled dot-product self-attention: ``[B, T, input_size]`` → ``[B, T, input_size]``.

    The article's ``SelfAttention`` (§4.3) cannot run: it applies softmax to a projection of the
    features (not to query–key scores), and its first ``torch.bmm`` gets the 4-D tensors
    ``[B, T, H, 1]`` and ``[B, T, 1, H]`` (``RuntimeError: batch1 must be a 3D tensor``; with 2-D
    input the second ``bmm`` fails instead).
    Its intent — every position attends to every other, softmax-weighted, projected back to the
    input size — is written here the standard way (Vaswani et al. 2017, one head)::

        q, k, v = W_q x, W_k x, W_v x                 # [B, T, H]
        A = softmax(q kᵀ / √H, over the keys)          # [B, T, T], rows sum to 1
        y = W_o (A v)                                  # [B, T, input_size]

    There is no residual connection or normalisation, as in the article. ``forward(x,
    return_attention=True)`` also returns ``A``.

    Example:
        >>> blk = SelfAttentionBlock()
        >>> y, A = blk(torch.randn(2, 6, 10), return_attention=True)
        >>> tuple(y.shape), tuple(A.shape), bool(torch.allclose(A.sum(-1), torch.ones(2, 6)))
        ((2, 6, 10), (2, 6, 6), True)
    """

    def __init__(self, input_size: int = 10, hidden_size: int = 20):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.query = nn.Linear(input_size, hidden_size)
        self.key = nn.Linear(input_size, hidden_size)
        self.value = nn.Linear(input_size, hidden_size)
        self.out = nn.Linear(hidden_size, input_size)

    def forward(self, x: Tensor, return_attention: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise GradscopeError(f"SelfAttentionBlock expects input [B, T, {self.input_size}], got "
                                 f"shape {list(x.shape)}.")
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.hidden_size)   # [B, T(query), T(key)]
        attn = torch.softmax(scores, dim=-1)                            # over the keys
        y = self.out(attn @ v)
        return (y, attn) if return_attention else y


def adding_problem(n: int, T: int, seed: int = 0, *, generator: Optional[torch.Generator] = None
                   ) -> Tuple[Tensor, Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997, §5.4; the form of Le et al. 2015).

    Each sequence has two channels: values drawn from U[0, 1] and a marker that is 1 at exactly two
    positions — one drawn uniformly from the first half, one from the second half — and 0
    elsewhere. The target is the sum of the two marked values. Predicting the mean (1.0) gives a
    mean squared error of about 1/6; solving the task needs memory over up to T − 1 steps.

    Args:
        n: number of sequences.
        T: sequence length (at least 2).
        seed: seed of a private generator (the global RNG is not touched).
        generator: draw from this generator instead (``seed`` is then ignored), e.g. to take
            successive training batches from one stream.

    Returns:
        ``x`` ``[n, T, 2]`` (channel 0 values, channel 1 markers) and ``y`` ``[n, 1]``, float32,
        batch first.

    Example:
        >>> x, y = adding_problem(4, 50, seed=1)
        >>> tuple(x.shape), tuple(y.shape), x[..., 1].sum(1).tolist()
        ((4, 50, 2), (4, 1), [2.0, 2.0, 2.0, 2.0])
        >>> bool(torch.allclose(y[:, 0], (x[..., 0] * x[..., 1]).sum(1)))
        True
    """
    for name, v, lo in (("n", n, 1), ("T", T, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise GradscopeError(f"adding_problem: {name} must be an integer >= {lo}, got {v!r}.")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    values = torch.rand(n, T, generator=g)
    half = T // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, T, (n,), generator=g)
    markers = torch.zeros(n, T)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(1, keepdim=True)
    return x, y


def recall_problem(n: int, T: int, seed: int = 0, *, generator: Optional[torch.Generator] = None
                   ) -> Tuple[Tensor, Tensor]:
    """The recall task of gradscope's trainability benchmark: report the first of T tokens.

    Each sequence is T tokens drawn uniformly from 8 classes, one-hot; the target is the class of
    the first token. The T − 1 later tokens are distractors from the same classes, so the only
    signal lies T − 1 steps back and no shorter dependency helps (chance: 1/8).

    Args:
        n: number of sequences.
        T: sequence length (at least 1).
        seed: seed of a private generator (the global RNG is not touched).
        generator: draw from this generator instead (``seed`` is then ignored).

    Returns:
        ``x`` ``[n, T, 8]`` float32 one-hot, batch first, and ``y`` ``[n]`` int64 classes.

    Example:
        >>> x, y = recall_problem(3, 10, seed=1)
        >>> tuple(x.shape), bool(torch.equal(x[:, 0].argmax(-1), y))
        ((3, 10, 8), True)
    """
    for name, v, lo in (("n", n, 1), ("T", T, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise GradscopeError(f"recall_problem: {name} must be an integer >= {lo}, got {v!r}.")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, RECALL_TOKENS, (n, T), generator=g)
    return torch.nn.functional.one_hot(tokens, RECALL_TOKENS).float(), tokens[:, 0].clone()
