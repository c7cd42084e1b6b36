"""Rendering of diagnoses and checkpoint reports (text, markdown, JSON, HTML).

Text, markdown and JSON of a Diagnosis are its methods (``str(diag)``, ``diag.to_markdown()``,
``diag.to_json()``); :mod:`.html` writes the self-contained HTML report (``diag.to_html(path)``)
and the notebook displays; :mod:`.checkpoint_report` is ``gradscope report PATH``.
"""
from __future__ import annotations

from .html import diagnosis_repr_html, diagnosis_to_html, figure_to_data_uri, recording_repr_html, trials_repr_html

__all__ = ["diagnosis_to_html", "diagnosis_repr_html", "recording_repr_html", "trials_repr_html",
           "figure_to_data_uri"]
