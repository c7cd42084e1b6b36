"""What a watch tells the user besides numbers: notes, events, and live alerts.

* :class:`Notes` — one line per fact the recording cannot show as data (a site that got no
  gradient, an option that was skipped), each said once.
* :class:`Events` — the first non-finite value per site state and per parameter
  (:meth:`Events.check_finite`) and each critical finding of a probe
  (:meth:`Events.critical_findings`); new ones are handed to ``on_event`` and raise
  :class:`~gradscope.errors.GradscopeAlert` for a kind in ``raise_on`` at the end of the step
  (:meth:`Events.deliver`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import GradscopeAlert

__all__ = ["Notes", "Events"]


class Notes:
    """Notes for the Recording, each added once per key.

    Attributes:
        lines: the notes, in the order they were first added.
    """

    def __init__(self):
        self.lines: List[str] = []
        self._keys: set = set()

    def add(self, key, text: str) -> None:
        """Add ``text`` unless a note of the same ``key`` was added before."""
        if key not in self._keys:
            self._keys.add(key)
            self.lines.append(text)


class Events:
    """The events of a watch, and their delivery as alerts.

    Args:
        on_event: called with a copy of each new event, or None.
        raise_on: event kinds that raise :class:`~gradscope.errors.GradscopeAlert`.

    Attributes:
        events: every event so far (the Recording's ``events``).
    """

    def __init__(self, on_event: Optional[Callable], raise_on: Sequence[str]):
        self.on_event, self.raise_on = on_event, tuple(raise_on)
        self.events: List[Dict[str, Any]] = []
        self._keys: set = set()
        self._undelivered: List[Dict[str, Any]] = []  # events of this step not yet delivered

    def add(self, key, event: Dict[str, Any]) -> None:
        """Record ``event`` unless one of the same ``key`` was recorded before."""
        if key not in self._keys:
            self._keys.add(key)
            self.events.append(event)
            self._undelivered.append(event)

    def check_finite(self, step: int, grads: Dict[Tuple[str, str], np.ndarray], params: np.ndarray,
                     got_param: np.ndarray, param_names: List[str]) -> None:
        """Record the first non-finite value per site state and per parameter as an event.

        Args:
            step: the training step.
            grads: ``(site, state) -> ‖∂L/∂h_t‖ [T]``.
            params: parameter gradient norms ``[P]``.
            got_param: which parameters received a gradient ``[P]``.
            param_names: the parameters' names, in that order.
        """
        for (site, sname), row in grads.items():
            bad = np.flatnonzero(~np.isfinite(row))
            if bad.size:
                # backward runs from the last position: the highest index is where it showed first
                self.add(("site", site, sname), {"kind": "nonfinite", "step": step, "site": site,
                                                  "state": sname, "t": int(bad[-1]),
                                                  "value": repr(float(row[bad[-1]])),
                                                  "count": int(bad.size)})
        for i in np.flatnonzero(got_param & ~np.isfinite(params)):
            name = param_names[i]
            self.add(("param", name), {"kind": "nonfinite", "step": step, "param": name,
                                       "value": repr(float(params[i]))})

    @property
    def wants_findings(self) -> bool:
        """Whether anyone listens for critical findings (else a probe skips the diagnosis)."""
        return self.on_event is not None or "critical" in self.raise_on

    def critical_findings(self, step: int, findings) -> None:
        """After a probe: a critical finding not seen before becomes an event (for alerts)."""
        for f in findings:
            if f.severity == "critical" and f.kind != "nonfinite":
                self.add(("finding", f.kind, f.site), {"kind": "critical", "finding": f.kind, "site": f.site,
                                                      "step": step, "explanation": f.explanation})

    def deliver(self) -> None:
        """Hand this step's new events to ``on_event``; raise for a kind in ``raise_on``."""
        alerts, self._undelivered = self._undelivered, []
        for e in alerts:
            if self.on_event is not None:
                self.on_event(dict(e))
        for e in alerts:
            if e["kind"] in self.raise_on:
                where = e.get("site") or e.get("param")
                at = f", position {e['t']}" if e.get("t") is not None else ""
                what = (f"a {e.get('value')} gradient" if e["kind"] == "nonfinite"
                        else f"a critical {e.get('finding')} finding")
                raise GradscopeAlert(f"gradscope: {what} at {where}{at} in training step {e['step']} "
                                     f"(watch(raise_on={tuple(self.raise_on)!r})).", dict(e))
