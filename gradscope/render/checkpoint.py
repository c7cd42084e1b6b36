"""Text, markdown and HTML of a checkpoint report (``gradscope report PATH``; ``rep.to_text()``,
``rep.to_markdown()``, ``rep.to_html()`` of a :class:`~gradscope.checkpoint.report.CheckpointReport`).

Each is the checkpoint's header (file, hash, format, the modules found), the static analysis of
the recurrent weights, then the Diagnosis as :mod:`.text` and :mod:`.html` render it, with the
report's notes. The JSON is the report's own ``to_dict()`` / ``to_json()``.

The functions register themselves in :mod:`gradscope._renderers`, where the report's methods find
them; like :mod:`.text`, this module imports only the formatting helpers and the HTML page it
extends.
"""
from __future__ import annotations

import html
import math
from typing import List, Tuple

from .._format import WIDTH, fmt, text_table, wrap
from .._renderers import register
from .html import diagnosis_to_html

__all__ = ["checkpoint_report_to_text", "checkpoint_report_to_markdown", "checkpoint_report_to_html"]


def _static_rows(rep) -> Tuple[List[str], List[List[str]]]:
    """The header and rows of the static-analysis table: one row per gate block of ``W_hh`` (and
    one per attention module's ``QKᵀ/√d``)."""
    head = ["site", "kind", "gate", "‖W‖₂", "ρ", "bias", "τ"]
    rows = []
    for r in rep.static:
        gates = r.get("gates") or {}
        # NaN/inf weights have no spectrum: say so instead of printing nan
        f_ = fmt if r.get("finite", True) else (lambda v: "non-finite" if v is None or not math.isfinite(v)
                                                else fmt(v))
        for g, v in gates.items():
            tau = bias = "—"
            if g in (r.get("memory_gate"),):
                tau = f_(r.get("memory_time"))
                bias = f_(r.get("forget_bias", r.get("update_bias")))
            rows.append([r["site"], r.get("kind", ""), g, f_(v.get("spectral_norm")),
                         f_(v.get("spectral_radius")), bias, tau])
        if "qk_spectral_norm_max" in r:
            rows.append([r["site"], r.get("kind", ""), "QKᵀ/√d", f_(r["qk_spectral_norm_max"]), "—", "—", "—"])
    return head, rows


def _header(rep) -> List[str]:
    """The checkpoint's lines: file, hash, format, metadata, and each module found."""
    c = rep.checkpoint
    lines = wrap(f"checkpoint {rep.path}") + [f"  sha256 {rep.sha256}"]
    lines += wrap(f"format {c.get('format')}, state dict at {c.get('source_key')}, "
                  f"{c.get('num_tensors')} tensors, {c.get('num_parameters')} parameters", "  ")
    if c.get("metadata"):
        lines += wrap("metadata: " + ", ".join(f"{k}={v}" for k, v in list(c["metadata"].items())[:12]), "  ")
    for m in rep.modules:
        lines += wrap(f"found {m['kind']} at {m['prefix'] or '(root)'}: "
                      + ", ".join(f"{k}={v}" for k, v in m["config"].items()), "  ")
        for n in m.get("notes", []):
            lines += wrap(f"note: {n}", "    ", "      ")
    return lines


@register("checkpoint_report.text")
def checkpoint_report_to_text(rep) -> str:
    """The plain-text report, as ``gradscope report PATH`` prints it.

    Args:
        rep: a :class:`~gradscope.checkpoint.report.CheckpointReport`.

    Returns:
        The text, ending with a newline.
    """
    out = _header(rep) + [""]
    head, rows = _static_rows(rep)
    if rows:
        out.append("static analysis of the recurrent weights (per gate block of W_hh)")
        out += text_table(head, rows, indent="  ", width=WIDTH)
        out.append("")
    if rep.diagnosis is not None:
        out.append(rep.diagnosis.to_text(notes=rep.all_notes))
    for f in rep.extra_findings:
        out += wrap(f"[{f.severity}] {f.kind} at {f.site}: {f.explanation}", "", "    ")
    if rep.diagnosis is None:
        out += [x for n in rep.all_notes for x in wrap(f"note: {n}", "", "      ")]
    return "\n".join(out).rstrip() + "\n"


@register("checkpoint_report.markdown")
def checkpoint_report_to_markdown(rep) -> str:
    """The markdown report (``gradscope report PATH --format markdown``).

    Args:
        rep: a :class:`~gradscope.checkpoint.report.CheckpointReport`.

    Returns:
        The markdown, ending with a newline.
    """
    out = ["# gradscope checkpoint report", "", "```", *_header(rep), "```", ""]
    head, rows = _static_rows(rep)
    if rows:
        out += ["## Static analysis", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        out.append("")
    if rep.diagnosis is not None:
        md = rep.diagnosis.to_markdown(notes=rep.all_notes).replace("# gradscope diagnosis", "## Diagnosis", 1)
        out.append(md)
    if rep.extra_findings:
        out += ["## Findings", ""] + [x for f in rep.extra_findings
                                      for x in wrap(f"- **{f.severity}: {f.kind} at `{f.site}`** — "
                                                    f"{f.explanation}", hang="  ")] + [""]
    if rep.all_notes and rep.diagnosis is None:
        out += ["## Notes", ""] + [x for n in rep.all_notes for x in wrap(f"- {n}", hang="  ")]
    return "\n".join(out).rstrip() + "\n"


@register("checkpoint_report.html")
def checkpoint_report_to_html(rep) -> str:
    """The self-contained HTML page (``gradscope report PATH --format html``): the Diagnosis's page
    (:func:`~gradscope.render.html.diagnosis_to_html`) with the checkpoint's header inserted first.

    Args:
        rep: a :class:`~gradscope.checkpoint.report.CheckpointReport`.

    Returns:
        The page.
    """
    head = "<pre>" + html.escape("\n".join(_header(rep))) + "</pre>"
    if rep.diagnosis is None:
        extra = "".join(f"<p><b>{html.escape(f.severity)}: {html.escape(f.kind)} at "
                        f"<code>{html.escape(f.site)}</code></b> {html.escape(f.explanation)}</p>"
                        for f in rep.extra_findings)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in rep.all_notes)
        notes = f'<h2 id="notes">Notes</h2><ul class="notes">{notes}</ul>' if notes else ""
        return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>gradscope checkpoint '
                f"report</title></head><body><h1>gradscope checkpoint report</h1>{head}{extra}{notes}"
                "</body></html>")
    page = diagnosis_to_html(rep.diagnosis, notes=rep.all_notes)
    marker = '<main class="gs">' if '<main class="gs">' in page else "<body>"
    i = page.find(marker)
    block = f"<section class='checkpoint'><h2>Checkpoint</h2>{head}</section>"
    return page[:i + len(marker)] + block + page[i + len(marker):] if i >= 0 else block + page
