"""The recorded steps of a watch, in growable numpy arrays."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

__all__ = ["History"]


class History:
    """The recorded steps in growable numpy arrays (no Python object per value).

    One float64 array ``[capacity, T]`` per site state (NaN right-padding, widened when a longer
    sequence arrives), one int array of sequence lengths per site, one ``[capacity, P]`` array of
    parameter norms, and the attention rows (dicts) only when the model has attention sites.
    """

    def __init__(self, n_params: int):
        self.n = 0
        self.cap = 64
        self.steps = np.zeros(self.cap, dtype=np.int64)
        self.params = np.full((self.cap, n_params), np.nan)
        self.upd = np.full((self.cap, n_params), np.nan)  # ‖Δw‖, filled at the next forward (updates.py)
        self.wn = np.full((self.cap, n_params), np.nan)   # ‖w‖ at the step's forward
        self.grads: Dict[Tuple[str, str], np.ndarray] = {}
        self.seq: Dict[str, np.ndarray] = {}
        self.attn: List[Any] = []

    def _grow(self) -> None:
        self.cap *= 2
        self.steps = np.resize(self.steps, self.cap)
        self.params = _grow_rows(self.params, self.cap, np.nan)
        self.upd = _grow_rows(self.upd, self.cap, np.nan)
        self.wn = _grow_rows(self.wn, self.cap, np.nan)
        self.grads = {k: _grow_rows(a, self.cap, np.nan) for k, a in self.grads.items()}
        self.seq = {k: _grow_rows(a, self.cap, 0) for k, a in self.seq.items()}

    def append(self, step: int, grads: Dict[Tuple[str, str], np.ndarray], seq: Dict[str, int],
               params: np.ndarray, attn) -> None:
        if self.n == self.cap:
            self._grow()
        i = self.n
        self.steps[i] = step
        self.params[i] = params
        self.upd[i] = self.wn[i] = np.nan
        for a in self.grads.values():  # rows past n may hold data from before a thinning
            a[i] = np.nan
        for a in self.seq.values():
            a[i] = 0
        for key, row in grads.items():
            a = self.grads.get(key)
            if a is None:
                a = self.grads[key] = np.full((self.cap, len(row)), np.nan)
            elif a.shape[1] < len(row):  # a longer sequence: widen, padding earlier rows with NaN
                wide = np.full((self.cap, len(row)), np.nan)
                wide[:, :a.shape[1]] = a
                a = self.grads[key] = wide
            a[i, :len(row)] = row
        for site, n in seq.items():
            if site not in self.seq:
                self.seq[site] = np.zeros(self.cap, dtype=np.int64)
            self.seq[site][i] = n
        self.attn.append(attn)
        self.n += 1

    def thin(self) -> None:
        """Keep every other recorded step (the first included)."""
        keep = np.arange(0, self.n, 2)
        self.steps[:len(keep)] = self.steps[keep]
        self.params[:len(keep)] = self.params[keep]
        self.upd[:len(keep)] = self.upd[keep]
        self.wn[:len(keep)] = self.wn[keep]
        for a in list(self.grads.values()) + list(self.seq.values()):
            a[:len(keep)] = a[keep]
        self.attn = self.attn[::2]
        self.n = len(keep)

    def nbytes(self) -> int:
        return (self.steps.nbytes + self.params.nbytes + self.upd.nbytes + self.wn.nbytes
                + sum(a.nbytes for a in self.grads.values())
                + sum(a.nbytes for a in self.seq.values()))

    def set_update(self, step: int, upd: np.ndarray, wn: np.ndarray) -> None:
        """The update norms of recorded step ``step`` (dropped if thinning removed its row)."""
        if self.n and self.steps[self.n - 1] == step:
            self.upd[self.n - 1] = upd
            self.wn[self.n - 1] = wn

    def rows(self) -> List[Dict[str, Any]]:
        """Per-step dicts for the attention capture (``{"step": …, "attn": …}``)."""
        return [{"step": int(self.steps[i]), "attn": self.attn[i]} for i in range(self.n)]


def _grow_rows(a: np.ndarray, cap: int, fill) -> np.ndarray:
    out = np.full((cap,) + a.shape[1:], fill, dtype=a.dtype)
    out[:a.shape[0]] = a
    return out
