"""Calling a model on a batch the way every gradscope entry point accepts one.

A batch is a Tensor (one positional argument), a tuple or list (positional arguments) or a dict
(keyword arguments). Plain Python (torch is not imported here).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

__all__ = ["call_model", "fused_args"]


def call_model(model, inputs):
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``.

    Example:
        >>> call_model(lambda a, b=0: a + b, {"a": 1, "b": 2}), call_model(max, (1, 3)), call_model(abs, -4)
        (3, 3, 4)
    """
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def fused_args(args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
    """``(input, hx)`` of a call to a fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, as a forward hook
    with ``with_kwargs=True`` sees it (``hx`` None when not passed).

    Example:
        >>> fused_args(("x",), {"hx": "h0"}), fused_args((), {"input": "x"})
        (('x', 'h0'), ('x', None))
    """
    input = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return input, hx
