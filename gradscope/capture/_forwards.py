"""Forwards that gradscope installs on a user's module for the whole of a watch.

They are objects rather than closures for two reasons: a deep copy or a pickle of the module (a
copy of the best model, an EMA copy, ``torch.save(model)``) must not call back into the original
module and its weights — it gets the module's own forward instead and runs unwatched — and
``inspect.signature(module.forward)`` must still give the module's own signature (libraries such
as Hugging Face's read it to route arguments).
"""
from __future__ import annotations

import copy
import inspect
import types

from torch import nn

__all__ = ["unwatched_forward", "OwnForward", "OWN_SLOTS", "PatchedForward", "ScopeHook", "noop_hook", "remove_leaf_hooks"]


def unwatched_forward(module: nn.Module, prev=None):
    """The forward a copy of a watched module gets: the instance forward the user had, or the
    class's own (bound, so it behaves as if no instance forward were set)."""
    if prev is not None and not getattr(prev, "__gradscope__", False):
        return prev
    return types.MethodType(type(module).forward, module)


class OwnForward:
    """Base: remembers the module and the instance forward it replaced (``prev``, or None).
    Subclasses declare ``OWN_SLOTS``."""

    __slots__ = ()
    __gradscope__ = True

    def _init(self, module: nn.Module, prev, like) -> None:
        self.module, self.prev = module, prev
        try:
            self.__signature__ = inspect.signature(like)
        except (TypeError, ValueError):
            pass

    def _user_prev(self):
        return None if self.prev is None or getattr(self.prev, "__gradscope__", False) else self.prev

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.module), self.module)  # the module's copy, made before its __dict__
        prev = self._user_prev()
        return unwatched_forward(twin, copy.deepcopy(prev, memo) if prev is not None else None)

    def __reduce__(self):
        return (unwatched_forward, (self.module, self._user_prev()))


OWN_SLOTS = ("module", "prev", "__signature__", "__weakref__")


class PatchedForward(OwnForward):
    """Calls ``fn`` (a replaying or capturing forward) in place of the module's forward."""

    __slots__ = ("fn",) + OWN_SLOTS

    def __init__(self, fn, module: nn.Module, prev, like):
        self.fn = fn
        self._init(module, prev, like)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def noop_hook(*args, **kwargs):
    """What a copy of a watched module keeps in place of gradscope's module hooks."""
    return None


def _noop_hook_factory():
    return noop_hook


class ScopeHook:
    """A module hook of gradscope's: a deep copy or a pickle of the module gets ``noop_hook``
    instead (not a copy of the watch, which would go on recording the copy)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return noop_hook

    def __reduce__(self):
        return (_noop_hook_factory, ())


def remove_leaf_hooks(handles, tensors) -> None:
    """Remove gradscope's tensor hooks from leaf tensors (parameters) and, where no hook is left on
    a tensor, torch's Python hook wrapper with them. A removed handle only empties the tensor's
    ``_backward_hooks`` dict: the wrapper that walks it stays on the tensor and would enter Python
    (take the GIL, wrap the gradient) for every parameter in every later backward pass — ~0.75 µs
    per parameter and step, measured; setting the empty dict to None drops it (torch's own
    setter). A dict that still holds a user's hook is left as it is."""
    for h in handles:
        h.remove()
    for t in tensors:
        hooks = getattr(t, "_backward_hooks", None)
        if hooks is not None and len(hooks) == 0:
            t._backward_hooks = None
