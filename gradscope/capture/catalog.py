"""Which sites a watch knows and which of them it records: the :class:`SiteTable`.

Fused ``nn.RNN/LSTM/GRU`` modules give one site per layer and direction, attention blocks one
site each (:mod:`.attention`), both known when the watch starts; user cells are added by
:mod:`.discovery` after the first scheduled pass, or named in ``watch(sites=[...])``. Modules
gradscope cannot hook (TorchScript) are listed as unsupported, as data.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import GradscopeError, did_you_mean
from .attention import find_attention, qkv_of
from .sites import FUSED_TYPES, SiteSpec, fused_sites, unsupported_reason

__all__ = ["SiteTable"]


class SiteTable:
    """The sites of one watched model, by name, and the user's selection among them.

    Args:
        model: the watched (eager) module.
        sites: ``watch(sites=...)``: names to record, or None for every site found.

    Attributes:
        sites: the :class:`SiteSpec` of every site, by name, in discovery order.
        fused: fused recurrent modules by qualified name.
        tracked_fused: the site specs of each fused module.
        explicit_cells: modules named in ``sites=`` that are no fused or attention site.
        selected: the selected site names, or None (every site).
        unsupported: ``{"module", "type", "reason"}`` of each module that cannot be watched.
        attn_layout: the attention blocks found (:func:`~.attention.find_attention`).
        modules: ``model.named_modules()`` as a dict.

    Raises:
        GradscopeError: ``sites`` is a string, or names something the model does not have.
    """

    def __init__(self, model: nn.Module, sites: Optional[Sequence[str]] = None):
        self.model = model
        self.modules: Dict[str, nn.Module] = dict(model.named_modules())
        self.module_names = {id(m): n for n, m in self.modules.items()}
        self.sites: Dict[str, SiteSpec] = {}
        self.fused: Dict[str, nn.Module] = {}
        self.unsupported: List[Dict[str, Any]] = []
        scripted: List[str] = []
        for name, m in self.modules.items():
            if any(name.startswith(s + ".") for s in scripted):
                continue  # inside a TorchScript module: reported once, at its top
            reason = unsupported_reason(m)
            if reason:
                self.unsupported.append({"module": name, "type": type(m).__name__, "reason": reason})
                if isinstance(m, torch.jit.ScriptModule):
                    scripted.append(name)
                continue
            if isinstance(m, FUSED_TYPES):
                self.fused[name] = m
                for spec in fused_sites(name, m):
                    self.sites[spec.name] = spec
        self.attn_layout = find_attention(model, _attention_extra(sites, self.modules))
        for spec in self.attn_layout.specs():
            self.sites[spec.name] = spec
        self.explicit_cells: Dict[str, nn.Module] = {}
        self.selected: Optional[set] = None
        if sites is not None:
            self._select(list(sites))
        self.tracked_fused = {n: [s for s in self.sites.values() if s.module_name == n] for n in self.fused}

    def wanted(self, site: str) -> bool:
        """Whether ``site`` is recorded (every site is, without a selection)."""
        return self.selected is None or site in self.selected

    def module(self, name: str) -> nn.Module:
        """The submodule of qualified name ``name``."""
        return dict(self.model.named_modules())[name]

    def _select(self, wanted: List[str]) -> None:
        if isinstance(wanted, str):
            raise GradscopeError(f"sites must be a list of names, got the string {wanted!r}; "
                                 f"write sites=[{wanted!r}].")
        names = self.modules
        selected = set()
        for w in wanted:
            w = w[len("attention:"):] if isinstance(w, str) and w.startswith("attention:") else w
            attn = self.attn_layout.resolve(w) if w not in self.sites else None
            if attn:
                selected |= set(attn)
            elif w in self.sites:
                selected.add(w)
            elif w in self.fused:
                selected |= {s for s, spec in self.sites.items() if spec.module_name == w}
            elif w in names and w != "":
                m = names[w]
                self.explicit_cells[w] = m
                self.sites[w] = SiteSpec(w, w, "cell", ("h",), info={"module_type": type(m).__name__,
                                                                       "explicit": True})
                selected.add(w)
            else:
                cands = list(self.sites) + [n for n in names if n]
                raise GradscopeError(
                    f"unknown site {w!r}: no module or site of that name in {type(self.model).__name__}."
                    f"{did_you_mean(w, cands)} Site names are qualified module names "
                    f"(model.named_modules()), with '.l<k>' / '.l<k>_reverse' for fused layers.")
        self.selected = selected


def _attention_extra(sites, names: Dict[str, nn.Module]) -> List[str]:
    """Modules named in ``sites=`` to treat as attention modules: ``"attention:NAME"`` entries and
    modules with recognisable query/key/value projections."""
    if sites is None or isinstance(sites, str):
        return []
    out = []
    for w in sites:
        if not isinstance(w, str):
            continue
        if w.startswith("attention:"):
            out.append(w[len("attention:"):])
        elif w and w in names and qkv_of(names[w], "") is not None:
            out.append(w)
    return out
