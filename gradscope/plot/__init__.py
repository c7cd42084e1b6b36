"""gradscope.plot: matplotlib pictures of a Recording (or a Diagnosis), computing nothing new.

Every function takes a :class:`~gradscope.Recording` (``dashboard`` also a
:class:`~gradscope.Diagnosis`) or the plain array it would draw (e.g. ``[S, T]`` gradient norms
for ``gradient_heatmap``, shown as site ``"array"``; ``rank_collapse``, which draws two measures,
takes a Recording only), accepts ``ax=`` to draw into an existing
Axes, and returns what it drew into (the Axes; ``dashboard`` the Figure). Without ``ax`` a new
pyplot figure is made, so notebooks show it. Importing this module imports neither pyplot nor a
backend.

Values a logarithmic scale cannot show — zeros, NaN, inf — are never dropped silently: heatmaps
colour them (grey, crimson) with a legend, line plots leave them out and count them in a note.
A measure the recording lacks raises :class:`~gradscope.MissingMeasureError` saying how to record
it; a recording with no step raises :class:`~gradscope.GradscopeError`.

========================  ==================================================================
``gradient_heatmap``      ‖∂L/∂h_t‖: time step × training step, per site or as small multiples
``gradient_profile``      ‖∂L/∂h_t‖ by time step, a line per site (one pass: a probe)
``jacobian_decay``        ‖∂h_T/∂h_{T−k}‖ by lag, with fitted rate, horizon and threshold
``lyapunov_spectrum``     the top-k Lyapunov exponents per site
``hidden_spectrum``       singular values of the hidden-state matrix per site
``probe_history``         λ₁ / horizon / rate / memory time over training (``probe_every``)
``param_flow``            gradient norm of every parameter (or module): median and range
``param_norms``           gradient norm or update-to-weight ratio of every parameter, per step
``depth_heatmap``         attention: layer × position (needs ``depth_grad_norms``)
``dashboard``             all of the above and the findings, in one Figure
``attention_entropy``     attention: normalised entropy of every head over training, per block
``rank_collapse``         attention: rank residual and token cosine by depth (first / last step)
========================  ==================================================================
"""
from __future__ import annotations

from .attention import attention_entropy, rank_collapse
from .dashboard import dashboard, findings_panel
from .dynamics import hidden_spectrum, jacobian_decay, lyapunov_spectrum, probe_history
from .flow import depth_heatmap, gradient_heatmap, gradient_profile, param_flow
from .params import param_norms

__all__ = ["gradient_heatmap", "gradient_profile", "jacobian_decay", "lyapunov_spectrum", "hidden_spectrum",
           "probe_history", "param_flow", "param_norms", "depth_heatmap", "attention_entropy", "rank_collapse",
           "dashboard", "findings_panel"]
