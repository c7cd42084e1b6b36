"""Write a Recording (and its diagnosis) to TensorBoard.

Needs the ``tensorboard`` package (``pip install "gradscope[tensorboard]"``); gradscope imports it
only when this is used. Works with any writer that has ``add_scalar``, ``add_image`` and
``add_text`` (``torch.utils.tensorboard.SummaryWriter``).

What is written, per site (tags start with ``gradscope/``):

* scalars over the recorded training steps: ``grad_first_over_last/<site>`` (‖∂L/∂h‖ at the
  first position the backward pass reaches divided by the last; the decay across the sequence),
  ``grad_norm_mean/<site>``, the global parameter-gradient norm ``param_grad_norm``;
* probe scalars when present: ``horizon/<site>``, ``rate/<site>``, ``lambda1/<site>``,
  ``memory_time/<site>``;
* one image per site: the gradient heatmap (log10 ‖∂L/∂h_t‖, time × training step) as rendered by
  :func:`gradscope.plot.gradient_heatmap`;
* the findings of :func:`gradscope.diagnose` as markdown text (``gradscope/diagnosis``).

:func:`recording_to_tensorboard` registers itself in :mod:`gradscope._renderers`, where
``Recording.to_tensorboard`` finds it. ``import gradscope`` imports this module and must work
without numpy, so numpy, matplotlib, the scalar helpers and ``diagnose`` are imported inside the
functions.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from .._renderers import register
from ..errors import GradscopeError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["recording_to_tensorboard", "heatmap_image"]

INSTALL_HINT = 'pip install "gradscope[tensorboard]"'


def _check_writer(writer) -> None:
    missing = [m for m in ("add_scalar", "add_image", "add_text") if not callable(getattr(writer, m, None))]
    if missing:
        raise GradscopeError(
            f"to_tensorboard() needs a SummaryWriter (torch.utils.tensorboard.SummaryWriter), got "
            f"{type(writer).__name__} without {', '.join(missing)}. Install TensorBoard with {INSTALL_HINT}.")


def heatmap_image(rec, site: str) -> Optional[np.ndarray]:
    """The gradient heatmap of one site as an ``[H, W, 3]`` uint8 image (Agg, no window)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..plot import gradient_heatmap

    fig = Figure(figsize=(6, 3), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    gradient_heatmap(rec, site, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return img


@register("recording.tensorboard")
def recording_to_tensorboard(rec, writer, *, step: Optional[int] = None, images: bool = True,
                             diagnosis: bool = True) -> None:
    """Write ``rec`` to a TensorBoard ``writer`` (see the module docstring for the tags).

    Args:
        rec: a :class:`~gradscope.Recording`.
        writer: ``torch.utils.tensorboard.SummaryWriter`` (or anything with its three methods).
        step: global step for the image and text entries (default: the last recorded step).
            Scalars use each recorded training step.
        images: also write the gradient heatmap of every site.
        diagnosis: also write ``str`` of :func:`gradscope.diagnose` as text.

    Example:
        >>> import torch, gradscope
        >>> from gradscope.render.tensorboard import recording_to_tensorboard
        >>> class Log:  # any object with add_scalar / add_image / add_text
        ...     def __init__(self): self.tags = set()
        ...     def add_scalar(self, tag, value, step): self.tags.add(tag)
        ...     def add_image(self, tag, img, step, dataformats="CHW"): self.tags.add(tag)
        ...     def add_text(self, tag, text, step): self.tags.add(tag)
        >>> rnn = torch.nn.RNN(2, 4)
        >>> with gradscope.watch(rnn) as scope:
        ...     out, _ = rnn(torch.randn(6, 1, 2)); out.sum().backward()
        >>> log = Log(); recording_to_tensorboard(scope.recording, log)
        >>> sorted(t for t in log.tags if "l0" in t)[:2]
        ['gradscope/grad_first_over_last/l0', 'gradscope/grad_norm_mean/l0']
    """
    from ..analysis.diagnose import diagnose
    from ..integrations._scalars import param_grad_total, probe_series, profile_scalars, update_ratio_total

    _check_writer(writer)
    steps = [int(s) for s in rec.steps]
    last = step if step is not None else (steps[-1] if steps else 0)
    for site in rec.sites:
        g = rec.grad_norms(site)
        if g.size:
            reverse = rec.site_info(site).get("direction") == "reverse"
            lens = rec.seq_lens(site)
            for i, s in enumerate(steps):
                n = int(lens[i])
                if n < 1:
                    continue
                for key, v in profile_scalars(g[i, :n], reverse).items():
                    writer.add_scalar(f"gradscope/{key}/{site}", v, s)
        for key, pts in probe_series(rec, site, last).items():
            for s, v in pts:
                writer.add_scalar(f"gradscope/{key}/{site}", v, s)
        if images and len(rec) and rec.grad_norms(site).size:
            img = heatmap_image(rec, site)
            writer.add_image(f"gradscope/heatmap/{site}", img, last, dataformats="HWC")
    for s, v in zip(steps, param_grad_total(rec)):
        if math.isfinite(v):
            writer.add_scalar("gradscope/param_grad_norm", float(v), s)
    for s, v in zip(steps, update_ratio_total(rec)):
        if math.isfinite(v):
            writer.add_scalar("gradscope/update_ratio", float(v), s)
    if diagnosis and (len(rec) or rec.measure_meta):
        writer.add_text("gradscope/diagnosis", diagnose(rec).to_markdown(), last)
