"""The two small data types every diagnosis rule shares: :class:`Rules` (the thresholds) and
:class:`Finding` (one thing found, with its evidence and remedies).

They live apart from :mod:`.diagnose` so that the recurrent rules there and the attention rules
in :mod:`.attention_rules` both import them, and ``diagnose`` imports ``attention_rules`` without
a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from .._format import jsonable
from ..errors import GradscopeError
from .evidence import HORIZON_THRESHOLD, LYAPUNOV_MARGIN

__all__ = ["Rules", "Finding"]


@dataclass(frozen=True)
class Rules:
    """Thresholds of the regime rules (see :mod:`gradscope.analysis.diagnose` for the rules)."""

    threshold: float = HORIZON_THRESHOLD
    lyapunov_margin: float = LYAPUNOV_MARGIN
    short_memory_ratio: float = 0.1
    saturation: float = 0.3
    spike_ratio: float = 100.0
    steps: int = 20

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1):
            raise GradscopeError(
                f"threshold must be in (0, 1) (the norm ratio that ends the gradient horizon), got "
                f"{self.threshold!r}; the default is 1e-3.")
        if not 0 < self.short_memory_ratio <= 1:
            raise GradscopeError(f"short_memory_ratio must be in (0, 1], got {self.short_memory_ratio!r}.")
        if not 0 < self.saturation < 1:
            raise GradscopeError(f"saturation must be in (0, 1), got {self.saturation!r}.")
        if self.lyapunov_margin < 0:
            raise GradscopeError(f"lyapunov_margin must be >= 0, got {self.lyapunov_margin!r}.")
        if self.spike_ratio <= 1:
            raise GradscopeError(f"spike_ratio must be > 1, got {self.spike_ratio!r}.")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise GradscopeError(f"steps must be a positive integer, got {self.steps!r}.")


@dataclass
class Finding:
    """One thing gradscope found, with the numbers that show it and what to do about it."""

    kind: str
    site: str
    severity: str
    evidence: Dict[str, float]
    explanation: str
    remedies: List[Any] = field(default_factory=list)
    evidence_used: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "site": self.site, "severity": self.severity,
                "evidence": jsonable(self.evidence), "explanation": self.explanation,
                "evidence_used": list(self.evidence_used),
                "remedies": [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in self.remedies]}
