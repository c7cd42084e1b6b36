"""The only code that swaps a module's ``forward``; each swap hands back a handle that undoes it.

gradscope shadows a module's forward with an instance attribute in four places: the fused
nn.RNN/LSTM/GRU replay (:meth:`.cells.Cells.patch_fused`), the per-pass wrappers of user cells and accelerator
LSTMCells, and the attention blocks. :func:`swap_forward` installs one and returns a
:class:`ForwardHandle`, shaped like torch's ``RemovableHandle``: ``remove()`` undoes the swap, and
removing twice is harmless. The owner keeps its handles and removes them in ``close()`` (or at the
end of a pass for the per-pass forwards), newest first.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import nn

__all__ = ["ForwardHandle", "swap_forward", "is_ours", "remove_all"]


def is_ours(fn: Any) -> bool:
    """Whether ``fn`` is a forward gradscope installed (marked ``__gradscope__``)."""
    return bool(getattr(fn, "__gradscope__", False))


class ForwardHandle:
    """Undoes one :func:`swap_forward`.

    ``remove()`` acts only while the module's instance forward is gradscope's — this one or, with
    ``only_this=False``, any gradscope forward — so a forward the user set during the watch is left
    alone. It then puts back ``restore`` (the instance forward found at the swap unless told
    otherwise), or deletes the attribute so the class's forward runs again.
    """

    __slots__ = ("module", "fn", "restore", "only_this", "removed")

    def __init__(self, module: nn.Module, fn: Callable, restore: Optional[Callable], only_this: bool):
        self.module, self.fn, self.restore, self.only_this = module, fn, restore, only_this
        self.removed = False

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        d = self.module.__dict__
        cur = d.get("forward")
        if cur is not self.fn and (self.only_this or not is_ours(cur)):
            return
        if self.restore is None:
            del d["forward"]
        else:
            d["forward"] = self.restore


_FOUND = object()


def swap_forward(module: nn.Module, fn: Callable, *, restore: Any = _FOUND,
                 only_this: bool = False) -> ForwardHandle:
    """Install ``fn`` as ``module.forward`` (an instance attribute) and return the handle that undoes it.

    Args:
        module: the module whose forward is shadowed.
        fn: the new forward; marked ``__gradscope__`` (functions get the attribute, gradscope's
            forward objects carry it on their class).
        restore: what ``remove()`` puts back: by default the instance forward the module had, None
            to delete the attribute (the replay of a fused module runs the class's forward, so
            nothing else is restored there).
        only_this: ``remove()`` acts only while ``fn`` itself is installed (else while any gradscope
            forward is).
    """
    if restore is _FOUND:
        restore = module.__dict__.get("forward")
    if not is_ours(fn):
        fn.__gradscope__ = True  # type: ignore[attr-defined]
    module.forward = fn
    return ForwardHandle(module, fn, restore, only_this)


def remove_all(handles: List[Any]) -> None:
    """Remove handles newest first (forwards stacked on one module unwind in order); empties the list."""
    while handles:
        handles.pop().remove()
