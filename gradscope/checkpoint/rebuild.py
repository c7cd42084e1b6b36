"""Building the user's own model from ``package.module:factory`` and loading the weights strictly.

Without the model's code, :meth:`gradscope.checkpoint.FoundModule.build` rebuilds single torch
modules from keys and shapes; with it, :func:`build_user_model` builds the whole model.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys
from typing import Any, Dict, List, Mapping, Optional, Union

from torch import Tensor, nn

from .._format import one_line
from ..errors import ModelSpecError, did_you_mean

__all__ = ["build_user_model", "parse_model_args"]


def parse_model_args(model_args: Union[None, str, Mapping[str, Any]], name: str = "model_args") -> Dict[str, Any]:
    """The keyword arguments for the user's factory: a dict, a JSON object string, or None (none).

    Args:
        model_args: The arguments.
        name: What the caller calls them, for the messages (the CLI passes its option's name).

    Raises:
        ModelSpecError: The string is not JSON, or not an object with string keys.
    """
    if model_args is None:
        return {}
    if isinstance(model_args, str):
        try:
            model_args = json.loads(model_args)
        except json.JSONDecodeError as exc:
            raise ModelSpecError(
                f"{name} is not valid JSON ({exc.msg} at character {exc.pos}); pass an object "
                f"such as '{{\"hidden_size\": 64}}'.") from None
    if not isinstance(model_args, Mapping) or not all(isinstance(k, str) for k in model_args):
        raise ModelSpecError(
            f"{name} must be a JSON object of keyword arguments, got {type(model_args).__name__}; "
            f"pass e.g. '{{\"hidden_size\": 64}}'.")
    return dict(model_args)


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if missing != module_name and not module_name.startswith(missing + "."):
            raise ModelSpecError(
                f"importing {module_name!r} for {spec!r} failed: it imports {missing!r}, which is "
                f"not installed; install it.", spec=spec) from None
        if module_name.endswith(".py"):
            raise ModelSpecError(
                f"{spec!r} names a file; give the module's import name instead, e.g. "
                f"{module_name[:-3].replace(os.sep, '.') + ':' + spec.split(':')[1]!r}, with its folder on "
                f"PYTHONPATH.", spec=spec) from None
        parent, _, leaf = missing.rpartition(".")
        siblings: List[str] = []
        try:
            if parent:
                pkg = importlib.import_module(parent)
                siblings = [m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))]
            else:
                siblings = [m.name for m in pkgutil.iter_modules()] + list(sys.builtin_module_names)
        except Exception:
            pass
        raise ModelSpecError(
            f"no module named {missing!r} (from {spec!r}); check the spelling, and that its "
            f"package is installed or on PYTHONPATH.{did_you_mean(leaf, siblings)}", spec=spec) from None
    except Exception as exc:
        raise ModelSpecError(
            f"importing {module_name!r} for {spec!r} raised {type(exc).__name__}: "
            f"{one_line(str(exc), 100)}; fix the module.", spec=spec) from None


def _key_list(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _extra_prefix(keys: List[str], other: set) -> Optional[str]:
    """A prefix every key in ``keys`` carries, and without which each is a key of ``other``."""
    for k in keys[:20]:
        parts = k.split(".")
        for i in range(1, len(parts)):
            pre = ".".join(parts[:i]) + "."
            if k[len(pre):] in other and all(x.startswith(pre) and x[len(pre):] in other for x in keys):
                return pre
    return None


def _prefix_hint(missing: List[str], unexpected: List[str]) -> str:
    pre = _extra_prefix(unexpected, set(missing))
    if pre is not None:
        return f" (every checkpoint key carries an extra prefix {pre!r} the model lacks)"
    pre = _extra_prefix(missing, set(unexpected))
    if pre is not None:
        return f" (the model's keys carry a prefix {pre!r} the checkpoint lacks)"
    return ""


def build_user_model(spec: str, model_args: Union[None, str, Mapping[str, Any]],
                     state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Build the user's model from ``package.module:factory_or_class`` and load the weights strictly.

    This backs the CLI's ``--model pkg.module:factory [--model-args JSON]``: the module is imported
    (it must be importable: installed, or on ``sys.path``/``PYTHONPATH``; a console script does not
    search the current directory, so the CLI should put it on ``sys.path`` first), the attribute after the
    colon (dots allowed: ``pkg.mod:Outer.make``) is called with ``model_args`` as keyword arguments,
    and ``load_state_dict(state_dict, strict=True)`` is applied.

    Args:
        spec: ``"package.module:attribute"``.
        model_args: Keyword arguments: a dict, a JSON object string, or None.
        state_dict: The weights, e.g. :attr:`Checkpoint.state_dict`.

    Returns:
        The model with the weights, as the factory left it (training mode unless it set eval).

    Raises:
        ModelSpecError: A malformed spec or model_args, a missing module (with the closest
            importable sibling name) or attribute (with the closest name in the module), something
            not callable, a call that raised, a result that is not an ``nn.Module``, or weights that
            do not fit: "missing keys (N): ...; unexpected keys (M): ...; shape mismatches (K): ...".

    Example:
        >>> sd = nn.GRU(3, 4).state_dict()
        >>> model = build_user_model("torch.nn:GRU", {"input_size": 3, "hidden_size": 4}, sd)
        >>> type(model).__name__
        'GRU'
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ModelSpecError(
            f"a model spec is 'package.module:factory_or_class', got {spec!r}; separate the module "
            f"from the attribute with one ':' (e.g. 'mypkg.models:build_model').", spec=spec)
    module_name, attr_path = spec.split(":")
    kwargs = parse_model_args(model_args)
    module = _import_module(module_name, spec)
    obj: Any = module
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelSpecError(
                f"{walked!r} has no attribute {part!r} (from {spec!r}); name a function or "
                f"class defined there.{did_you_mean(part, names)}", spec=spec)
        obj = getattr(obj, part)
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(obj):
        raise ModelSpecError(
            f"{spec!r} is a {type(obj).__name__}, not callable; the spec must name a class or a "
            f"function that returns the model.", spec=spec)
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ModelSpecError(
            f"calling {spec}(**{one_line(json.dumps(kwargs, default=str), 80)}) raised "
            f"{type(exc).__name__}: {one_line(str(exc), 120)}; check the model arguments.", spec=spec) from None
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise ModelSpecError(
            f"{spec!r} returned the class {model.__name__}, not an instance; point the spec at the "
            f"class itself or at a function that instantiates it.", spec=spec)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec!r} returned a {type(model).__name__}, expected an nn.Module; point the spec at a "
            f"class or a function that builds the model.", spec=spec)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state_dict and isinstance(state_dict[k], Tensor)
                  and isinstance(own[k], Tensor) and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_key_list(mismatched, 3)}")
    if problems:
        raise ModelSpecError(
            f"the checkpoint does not fit {spec}: {'; '.join(problems)}"
            f"{_prefix_hint(missing, unexpected)}; check the model arguments or that the checkpoint belongs to "
            f"this model.", spec=spec)
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise ModelSpecError(
            f"load_state_dict(strict=True) on {spec} failed ({one_line(str(exc), 160)}); check "
            f"the model arguments or that the checkpoint belongs to this model.", spec=spec) from None
    return model
