"""Saved checkpoints: safe loading, finding the state dict, rebuilding modules, static analysis.

This is what ``gradscope report model.pt`` stands on:

1. :func:`load_checkpoint` reads ``.pt/.pth/.bin/.ckpt`` files with
   ``torch.load(weights_only=True)`` and ``.safetensors`` files with safetensors (optional:
   ``pip install "gradscope[ckpt]"``). A file that would need to run code to load is refused with
   :class:`~gradscope.errors.UnsafeCheckpointError` unless ``unsafe=True``.
2. The returned :class:`Checkpoint` holds the model's ``state_dict`` wherever the file kept it
   (bare, under ``state_dict``/``model``/..., DDP ``module.`` prefixes stripped) and a JSON-able
   summary of everything else (epoch, optimizer state, ...).
3. :func:`find_modules` recognises ``nn.RNN/LSTM/GRU``, their ``*Cell`` versions and
   ``nn.MultiheadAttention`` from parameter names and shapes alone; :meth:`FoundModule.build`
   constructs the module with exactly those weights. With the model's own code at hand,
   :func:`build_user_model` builds the whole model instead.
4. :func:`static_analysis` reports, per recurrent layer and direction, the spectra of the
   recurrent weight blocks and the memory time implied by the forget (LSTM) or update (GRU) bias.

Modules, one job each:

- :mod:`~gradscope.checkpoint.io`: reading a file safely and within limits (format sniffing,
  weights-only torch loading, safetensors, naming the code a pickle asks to run) → :class:`Checkpoint`;
- :mod:`~gradscope.checkpoint.contents`: finding the state dict inside whatever the file held, and
  summarising the rest as metadata;
- :mod:`~gradscope.checkpoint.locate`: recognising recurrent and attention modules from state-dict keys
  and shapes (:class:`FoundModule`, which rebuilds its own torch module);
- :mod:`~gradscope.checkpoint.rebuild`: building the user's own model from ``package.module:factory``
  and loading the weights strictly;
- :mod:`~gradscope.checkpoint.static`: spectra, gate-bias memory times and probe-time estimates from the
  weights alone, without running the model;
- :mod:`~gradscope.checkpoint.report`: all of the above and a probe and diagnosis of the rebuilt
  modules, as one :class:`~gradscope.checkpoint.report.CheckpointReport` (``gradscope report
  PATH``). Not imported here: it needs the probe, and loading a checkpoint does not.

The size limits shared with :func:`gradscope.load` live in :mod:`gradscope._archive`.

Index letters: G gates (RNN 1, GRU 3, LSTM 4), H hidden units, P projection size (LSTM
``proj_size``), I input features, D directions, E attention embedding size, d head size.
Nothing here needs a GPU: everything is loaded to the CPU.
"""
from __future__ import annotations

from .._archive import DEFAULT_MAX_LOAD_BYTES
from ..errors import CheckpointError, ModelSpecError, UnsafeCheckpointError
from ..estimators.gates import memory_time  # τ = −1/ln σ(b), re-exported here
from .io import INSTALL_HINT, Checkpoint, load_checkpoint
from .locate import FoundModule, default_num_heads, find_modules
from .rebuild import build_user_model
from .static import estimate_probe_seconds, static_analysis

__all__ = [
    "Checkpoint",
    "FoundModule",
    "load_checkpoint",
    "find_modules",
    "static_analysis",
    "build_user_model",
    "memory_time",
    "default_num_heads",
    "CheckpointError",
    "UnsafeCheckpointError",
    "ModelSpecError",
    "INSTALL_HINT",
    "DEFAULT_MAX_LOAD_BYTES",
    "estimate_probe_seconds",
]
