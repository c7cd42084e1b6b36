"""The values one watched step measures, keyed, normed in batches and copied to the host once.

Hooks hand the :class:`Collector` either a value already reduced on the device (``add``: a norm, a
vector of norms over positions, an attention statistic) or a gradient to be normed
(``add_gradient``: kept, then normed with the others in one multi-tensor op per dtype and device).
At the end of the step :meth:`Collector.take` returns every value on the host: one float64 buffer
per device, a single copy each, no ``.item()`` per value.

Keys say what a value is (types, not tagged tuples):

* :class:`StateKey` — ‖∂L/∂h_t‖ of one state at one position ``t``;
* :class:`SiteKey` — that norm at every position of one site state (a vector: fast replay,
  attention blocks);
* :class:`ParamKey` — the gradient norm of parameter ``index``;
* :class:`AttentionKey` — an attention statistic, combined over the step's passes by ``mode``
  (``"avg"``: mean; ``"sum"`` / ``"cnt"``: a sum and its count).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, NamedTuple, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._norms import norms as _norms

__all__ = ["StateKey", "SiteKey", "ParamKey", "AttentionKey", "UpdateKey", "Key", "Collector", "sum_squares"]


class StateKey(NamedTuple):
    site: str
    state: str
    t: int


class SiteKey(NamedTuple):
    site: str
    state: str


class ParamKey(NamedTuple):
    index: int


class AttentionKey(NamedTuple):
    site: str
    rel: str
    measure: str
    mode: str


class UpdateKey(NamedTuple):
    """‖Δw‖ then ‖w‖ of one device's parameters for the update ratio of recorded step ``step``
    (:mod:`.updates`); carried by the next host copy, whichever step makes it."""
    step: int
    group: int


Key = Union[StateKey, SiteKey, ParamKey, AttentionKey, UpdateKey]


class Collector:
    """This step's values until :meth:`take`.

    Args:
        chunk: kept gradients are normed as soon as this many are waiting, so a long sequence does
            not hold every state gradient until the end of the backward pass.
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self._vals: List[Tensor] = []
        self._keys: List[Any] = []  # a Key, or a list of Keys for a batch of norms
        self.kept: List[Tensor] = []  # gradients waiting to be normed
        self._kept_keys: List[Key] = []

    def add(self, key: Key, value: Tensor) -> None:
        """A value reduced on the device: a 0-d norm, or a vector (``SiteKey``, attention statistics)."""
        self._vals.append(value)
        self._keys.append(key)

    def add_gradient(self, key: Key, grad: Tensor) -> None:
        """A gradient whose norm is taken later, batched with the others."""
        self.kept.append(grad.detach())
        self._kept_keys.append(key)
        if len(self.kept) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Norm the kept gradients: one multi-tensor op per dtype and device, no copy of the
        gradients, float64 accumulation (a finite gradient never gets an overflowed norm)."""
        kept, keys = self.kept, self._kept_keys
        self.kept, self._kept_keys = [], []
        groups: Dict[Tuple, List[int]] = defaultdict(list)
        for i, g in enumerate(kept):
            groups[(g.dtype, g.device)].append(i)
        for idx in groups.values():
            self._vals.append(_norms([kept[i] for i in idx]))
            self._keys.append([keys[i] for i in idx])

    def take(self) -> List[Tuple[Any, Key]]:
        """Every value of the step on the host, as ``(value, key)`` in the order added: a float for
        a 0-d value, a float64 numpy array for a vector. Empties the collector.

        One host copy per device: the values go into one float64 buffer on their device (float32
        on MPS, which has no float64), then a single copy. Accumulation downstream runs on Python
        floats, far cheaper than numpy scalars.
        """
        self.flush()
        vals, keys = self._vals, self._keys
        self._vals, self._keys = [], []
        host: List[Any] = [None] * len(vals)
        groups: Dict[Any, List[int]] = defaultdict(list)
        for i, v in enumerate(vals):
            groups[v.device].append(i)
        for idx in groups.values():
            wide = torch.float32 if idx and vals[idx[0]].device.type == "mps" else torch.float64
            flat = torch.cat([vals[i].reshape(-1) for i in idx]).to(wide).cpu().numpy()
            lst = flat.tolist() if any(vals[i].dim() == 0 for i in idx) else None
            pos = 0
            for i in idx:
                v = vals[i]
                if v.dim() == 0:
                    host[i] = lst[pos]
                    pos += 1
                else:
                    n = v.numel()
                    host[i] = flat[pos:pos + n]
                    pos += n
        out: List[Tuple[Any, Key]] = []
        for v, key in zip(host, keys):
            if isinstance(key, list):  # a batch of norms from flush()
                out += zip(v.tolist(), key)
            else:
                out.append((v, key))
        return out

    def clear(self) -> None:
        self._vals, self._keys, self.kept, self._kept_keys = [], [], [], []


def sum_squares(items: List[Tuple[Any, Key]], seq_len: Dict[str, int], n_params: int):
    """Sums of squared norms over the values of one step (its passes together).

    Args:
        items: :meth:`Collector.take`'s ``(value, key)`` pairs.
        seq_len: site -> the longest sequence the step's passes ran; raised where a site's values
            reach further (updated in place).
        n_params: number of watched parameters.

    Returns:
        ``(sumsq, fired, params, got_param, attention)``: per ``(site, state)`` a list of sums per
        position ``t``; the sites any gradient reached; per parameter the sum of squares
        (``[P]`` float64) and whether it got a gradient (``[P]`` bool); the attention values as
        ``(AttentionKey, value)`` pairs, for the attention capture to combine.
    """
    sumsq: Dict[Tuple[str, str], Any] = {}  # (site, state) -> list of floats (per position)
    attn_items: List[Tuple[AttentionKey, Any]] = []
    fired_sites = set()
    params = [0.0] * n_params
    got_param = np.zeros(n_params, dtype=bool)
    for v, key in items:
        kind = type(key)
        if kind is StateKey:
            site, sname, t = key
            arr = sumsq.get((site, sname))
            if arr is None:
                arr = sumsq[(site, sname)] = [0.0] * max(seq_len.get(site, 0), t + 1)
            elif len(arr) <= t:
                arr.extend([0.0] * (t + 1 - len(arr)))
            arr[t] += v * v
            fired_sites.add(site)
        elif kind is ParamKey:
            params[key.index] += v * v
            got_param[key.index] = True
        elif kind is SiteKey:  # all positions of one site state at once (fast replay, attention)
            site, sname = key
            sq = (v * v).tolist()
            arr = sumsq.get((site, sname))
            if arr is None:
                sumsq[(site, sname)] = sq
            else:
                if len(arr) < len(sq):
                    arr.extend([0.0] * (len(sq) - len(arr)))
                for t, x in enumerate(sq):
                    arr[t] += x
            fired_sites.add(site)
        elif kind is AttentionKey:
            attn_items.append((key, v))
    for (site, _), arr in sumsq.items():
        if len(arr) > seq_len.get(site, 0):
            seq_len[site] = len(arr)
    params = np.array(params)
    return sumsq, fired_sites, params, got_param, attn_items
