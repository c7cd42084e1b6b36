"""HTML rendering: a self-contained report file and the rich displays of notebooks.

Everything is in one string: CSS inline, figures as base64 PNG ``data:`` URIs, a few lines of
JavaScript for the "copy" buttons of the code blocks. Nothing is fetched from the network. All
text is escaped with :func:`html.escape`. Rendering computes nothing new: the numbers come from
the Diagnosis, the figures from :mod:`gradscope.plot`.

The public functions register themselves in :mod:`gradscope._renderers`, where ``Diagnosis.to_html``
and the ``_repr_html_`` methods find them. This module is imported by ``import gradscope``, so
the plots, matplotlib and the Diagnosis class (numpy) are imported inside the functions that use
them, not here.
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Sequence

from .._format import fmt, remedy_index
from .._renderers import register
from ..errors import GradscopeError, MissingMeasureError

__all__ = ["diagnosis_to_html", "diagnosis_repr_html", "recording_repr_html", "trials_repr_html",
           "figure_to_data_uri"]

_REGIME_BG = {"vanishing": "#dbe9f6", "exploding": "#f9d9d9", "stable": "#dcefdc", "inconclusive": "#eeeeee",
              "unmeasured": "#f9d9d9"}
_REGIME_FG = {"vanishing": "#174a7c", "exploding": "#8a1414", "stable": "#1d5e1d", "inconclusive": "#555555",
              "unmeasured": "#8a1414"}
_SEV_FG = {"critical": "#b00020", "warning": "#a35200", "info": "#555555"}

_CSS = """
.gs{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;line-height:1.45;font-size:14px}
.gs h1{font-size:1.6em;margin:.2em 0}.gs h2{font-size:1.25em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.gs h3{font-size:1.05em;margin:1.1em 0 .3em}.gs .sub{color:#57606a}
.gs table{border-collapse:collapse;margin:.4em 0 .8em;font-size:13px}
.gs th,.gs td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
.gs th{background:#f6f8fa}.gs td.num{text-align:right;font-variant-numeric:tabular-nums}
.gs .regime{font-weight:600;border-radius:3px;padding:1px 6px}
.gs .vanishing{background:#dbe9f6;color:#174a7c}.gs .exploding{background:#f9d9d9;color:#8a1414}
.gs .stable{background:#dcefdc;color:#1d5e1d}
.gs .sev{font-weight:700;text-transform:uppercase;font-size:.8em;letter-spacing:.03em}
.gs .critical{color:#b00020}.gs .warning{color:#a35200}.gs .info{color:#555}
.gs .finding{border-left:4px solid #d0d7de;padding:.2em .9em;margin:.8em 0}
.gs .finding.critical-b{border-color:#b00020}.gs .finding.warning-b{border-color:#a35200}.gs .finding.info-b{border-color:#8c959f}
.gs .code{position:relative;margin:.3em 0 .6em}
.gs pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;padding:8px 10px;overflow-x:auto;font-size:12.5px;margin:0}
.gs code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.gs button.copy{position:absolute;top:4px;right:4px;font-size:11px;padding:1px 7px;cursor:pointer;border:1px solid #d0d7de;border-radius:3px;background:#fff}
.gs .ref{color:#57606a;font-size:.9em}.gs .caveat{color:#6e5200;background:#fff8c5;padding:2px 6px;border-radius:3px}
.gs figure{margin:.4em 0;display:inline-block;vertical-align:top;max-width:100%}
.gs figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
.gs figcaption{font-size:12px;color:#57606a}.gs .figs{display:flex;flex-wrap:wrap;gap:10px}
.gs .remedy{border-left:4px solid #d0d7de;padding:.1em .9em;margin:.8em 0}.gs ul.refs{list-style:none;padding-left:.4em}
.gs nav a{margin-right:.9em}.gs ul.notes li{margin:.2em 0}.gs details{margin:.3em 0}
.gs summary{cursor:pointer}
"""

_JS = """
function gsCopy(btn){var c=btn.parentNode.querySelector('code').textContent;
function done(){btn.textContent='copied';setTimeout(function(){btn.textContent='copy'},1200)}
if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(c).then(done)}
else{var t=document.createElement('textarea');t.value=c;document.body.appendChild(t);t.select();
try{document.execCommand('copy');done()}catch(e){}document.body.removeChild(t)}}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _anchor(name: str) -> str:
    return "site-" + "".join(c if c.isalnum() else "-" for c in name)


def figure_to_data_uri(fig, *, dpi: int = 90) -> str:
    """A matplotlib Figure as a ``data:image/png;base64,…`` URI (the figure is left open).

    Example:
        >>> from matplotlib.figure import Figure
        >>> fig = Figure(figsize=(1, 1)); _ = fig.add_subplot().plot([0, 1])
        >>> figure_to_data_uri(fig).startswith("data:image/png;base64,")
        True
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(draw: Callable, figsize, alt: str, caption: str = "", dpi: int = 90) -> str:
    """Render ``draw(ax_or_fig)`` into a detached Figure (pyplot untouched) and return an <figure>."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig)
    uri = figure_to_data_uri(fig, dpi=dpi)
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{_e(alt)}">{cap}</figure>'


def _try_figure(draw: Callable, figsize, alt: str, caption: str = "", dpi: int = 90) -> str:
    """As :func:`_figure`, but a figure whose measure is missing is simply left out."""
    try:
        return _figure(draw, figsize, alt, caption, dpi)
    except MissingMeasureError:
        return ""


# ------------------------------------------------------------------------------------ pieces
def _regime(reg: str) -> str:
    return f'<span class="regime {_e(reg)}">{_e(reg)}</span>'


def _site_table(diag, links: bool) -> str:
    head = ["site", "kind", "regime", "horizon", "T", "rate/step", "λ₁", "τ", "evidence"]
    rows = []
    for n in diag.sites:
        s = diag.site_summary(n)
        ev = s["evidence"]
        name = f'<a href="#{_anchor(n)}">{_e(n)}</a>' if links else _e(n)
        rows.append(
            f"<tr><td><code>{name}</code></td><td>{_e(s['kind'])}</td><td>{_regime(s['regime'])}</td>"
            + "".join(f'<td class="num">{_e(fmt(ev.get(k)))}</td>' for k in ("horizon", "seq_len", "rate",
                                                                           "lambda1", "memory_time"))
            + f"<td>{_e(', '.join(s['evidence_used']) or '—')}</td></tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _code_block(code: str, copy: bool) -> str:
    btn = '<button class="copy" type="button" onclick="gsCopy(this)">copy</button>' if copy else ""
    return f'<div class="code">{btn}<pre><code>{_e(code)}</code></pre></div>'


def _remedy_refs(ids: Sequence[int], remedies: Sequence[Dict[str, Any]], link: bool) -> str:
    """The finding's pointers to the remedies section ("→ remedy 2: …")."""
    if not ids:
        return ""
    items = []
    for i in ids:
        label = f"remedy {i}: {remedies[i - 1]['title']}"
        items.append(f'<li>→ <a href="#remedy-{i}">{_e(label)}</a></li>' if link else f"<li>→ {_e(label)}</li>")
    return '<ul class="refs">' + "".join(items) + "</ul>"


def _remedy_list(remedies: Sequence[Dict[str, Any]], copy: bool) -> str:
    """Every remedy of the report once: title, the sites and why, the code, the source."""
    items = []
    for r in remedies:
        sites = ", ".join(f"<code>{_e(s)}</code>" for s in r["sites"])
        whys = "".join(f"<li>{(_e('at ' + w['site'] + ': ') if len(r['sites']) > 1 else '')}{_e(w['why'])}</li>"
                       for w in r["why"])
        items.append(
            f'<div class="remedy" id="remedy-{r["id"]}"><h3>{r["id"]}. {_e(r["title"])}'
            + (f' <code class="ref">{_e(r["name"])}</code>' if r["name"] else "") + "</h3>"
            + f'<p class="ref">for {sites}</p>' + (f"<ul>{whys}</ul>" if whys else "")
            + (_code_block(r["code"], copy) if r["code"] else "")
            + (f'<p class="ref">({_e(r["reference"])})</p>' if r["reference"] else "") + "</div>")
    return "".join(items)


def _evidence_table(ev: Dict[str, Any]) -> str:
    if not ev:
        return ""
    rows = "".join(f'<tr><td><code>{_e(k)}</code></td><td class="num">{_e(fmt(v))}</td></tr>' for k, v in ev.items())
    return f"<table><thead><tr><th>evidence</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"


def _finding(f, ids: Sequence[int], remedies: Sequence[Dict[str, Any]]) -> str:
    used = f" <span class=\"ref\">(from {_e(', '.join(f.evidence_used))})</span>" if f.evidence_used else ""
    return (f'<div class="finding {_e(f.severity)}-b"><h3><span class="sev {_e(f.severity)}">{_e(f.severity)}</span> '
            f"{_e(f.kind)} at <code>{_e(f.site)}</code>{used}</h3><p>{_e(f.explanation)}</p>"
            + _evidence_table(f.evidence) + _remedy_refs(ids, remedies, link=True) + "</div>")


def _notes(notes: Iterable[str]) -> str:
    notes = list(notes)
    if not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _trainability(diag) -> str:
    """The trainability prediction: verdict, confidence and its reasons (a prediction, labelled so)."""
    t = getattr(diag, "trainability", None)
    if t is None:
        return ""
    cls = {"likely": "stable", "unlikely": "vanishing"}.get(t.verdict, "")
    return (f'<p><b>Trainability</b>: <span class="regime {cls}">{_e(t.verdict)}</span> '
            f"(confidence {t.confidence:.2f}) — a prediction calibrated on labelled training runs, "
            f"not a measurement.</p><ul>" + "".join(f"<li>{_e(r)}</li>" for r in t.reasons) + "</ul>")


def _site_figures(rec, site: str) -> List[str]:
    from .. import plot as gp

    out = []
    if len(rec.steps) == 1:  # one pass (a probe): a heatmap would be a single row
        out.append(_figure(lambda f: gp.gradient_profile(rec, site, ax=f.add_subplot()), (6.0, 3.2),
                           f"gradient profile of {site}", "‖∂L/∂h_t‖ by time step (log scale), one pass"))
    elif len(rec.steps):
        out.append(_figure(lambda f: gp.gradient_heatmap(rec, site, ax=f.add_subplot()),
                           (6.4, 2.9 if len(rec.steps) > 2 else 2.2), f"gradient heatmap of {site}",
                           "‖∂L/∂h_t‖ by time step and training step (this site's colour scale)"))
    if rec.has_measure(site, "jacobian_norms"):
        out.append(_figure(lambda f: gp.jacobian_decay(rec, site, ax=f.add_subplot()), (6.0, 3.6),
                           f"Jacobian norm by lag at {site}", "‖∂h_T/∂h_{T−k}‖ by lag k"))
    if rec.has_measure(site, "lyapunov"):
        out.append(_figure(lambda f: gp.lyapunov_spectrum(rec, site, ax=f.add_subplot()), (5.0, 3.4),
                           f"Lyapunov spectrum of {site}", "Lyapunov exponents"))
    if rec.has_measure(site, "probe_lambda1") and len(rec.measure(site, "probe_steps")) >= 2:
        out.append(_figure(lambda f: gp.probe_history(rec, site, ax=f.add_subplot()), (5.0, 3.0),
                           f"λ₁ over training at {site}", "top Lyapunov exponent over training"))
    return out


def _meta_line(diag, rec) -> str:
    bits = [f"{len(diag.sites)} site(s)", f"{len(diag.findings)} finding(s)",
            f"source: {diag.meta.get('source', '?')}", f"{diag.meta.get('steps', 0)} recorded step(s)"]
    if rec is not None and rec.meta.get("model"):
        bits.insert(0, f"model {rec.meta['model']}")
    if diag.meta.get("gradscope_version"):
        bits.append(f"gradscope {diag.meta['gradscope_version']}")
    if diag.meta.get("measured_on"):
        bits.append(f"measured on: {diag.meta['measured_on']}")
    if hasattr(diag, "schedule_line") and diag.schedule_line():
        bits.append(diag.schedule_line())
    return " · ".join(bits)


# ------------------------------------------------------------------------------------ public
@register("diagnosis.html")
def diagnosis_to_html(diag, path=None, *, notes=None) -> str:
    """One self-contained HTML report of a Diagnosis (figures embedded, no network access).

    Sections: the summary table of sites (regime coloured, names link to their section), module
    lines, overview figures (Jacobian decay, Lyapunov and hidden-state spectra of all probed sites;
    depth flow of attention stacks),
    findings (explanation, evidence table, links to their remedies), the remedies once each
    (the sites and why, copyable code, source), one section per site with its caveats and
    figures (the gradient heatmap over training, or for a probe the gradient profile by
    position; Jacobian decay, Lyapunov spectrum, λ₁ over training), the parameter gradient
    flow, non-finite events, and the notes (the same list as the text, markdown and JSON). Figures
    come from :mod:`gradscope.plot` and need ``diag.recording``; without it the report has
    tables only.

    Args:
        diag: a :class:`~gradscope.Diagnosis`.
        path: if given, the HTML is also written there (UTF-8).
        notes: the notes to show (default ``diag.notes``; a checkpoint report adds its own).

    Returns:
        The HTML text.

    Raises:
        GradscopeError: ``diag`` is not a Diagnosis, or ``path`` cannot be written.

    Example:
        >>> import torch, gradscope
        >>> diag = gradscope.diagnose(gradscope.probe(torch.nn.RNN(2, 4), torch.randn(12, 2, 2)))
        >>> page = diagnosis_to_html(diag)
        >>> page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
        True
    """
    from .. import plot as gp
    from ..analysis.diagnose import Diagnosis

    if not isinstance(diag, Diagnosis):
        raise GradscopeError(f"diagnosis_to_html expects a gradscope Diagnosis (gradscope.diagnose(rec)), "
                             f"got {type(diag).__name__}.")
    if path is not None and not Path(path).parent.is_dir():  # say so before rendering the figures
        raise GradscopeError(f"cannot write the HTML report to {str(path)!r}: the folder "
                             f"{str(Path(path).parent)!r} does not exist.")
    rec = diag.recording
    notes = list(diag.notes if notes is None else notes)
    remedies, refs = remedy_index(diag.findings)
    title = "gradscope diagnosis" + (f" — {rec.meta['model']}" if rec is not None and rec.meta.get("model") else "")
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(_meta_line(diag, rec))}</p>']
    nav = ['<a href="#summary">Summary</a>', '<a href="#findings">Findings</a>']
    if remedies:
        nav.append('<a href="#remedies">Remedies</a>')
    if diag.sites:
        nav.append('<a href="#sites">Sites</a>')
    if rec is not None and len(rec.steps):
        nav.append('<a href="#parameters">Parameters</a>')
    if notes:
        nav.append('<a href="#notes">Notes</a>')
    parts.append("<nav>" + "".join(nav) + "</nav>")

    parts.append('<h2 id="summary">Summary</h2>')
    if diag.sites:
        parts.append(_site_table(diag, links=True))
    else:
        parts.append("<p>No recurrent or attention site to diagnose.</p>")
    parts.append(_trainability(diag))
    if diag.modules:
        parts.append("<ul>" + "".join(f"<li>{_regime(m.get('regime', 'stable'))} <code>{_e(m['line'])}</code></li>"
                                      for m in diag.modules) + "</ul>")
    if rec is not None and diag.sites:
        figs = [_figure(lambda f: gp.gradient_profile(rec, ax=f.add_subplot()), (7.0, 4.0),
                        "gradient profile, all sites", "‖∂L/∂h_t‖ by time step, all sites (one pass)")
                if len(rec.steps) == 1 else "",
                _try_figure(lambda f: gp.jacobian_decay(rec, ax=f.add_subplot()), (7.0, 4.0),
                            "Jacobian norm by lag, all sites", "Jacobian norm by lag, all probed sites"),
                _try_figure(lambda f: gp.lyapunov_spectrum(rec, ax=f.add_subplot()), (5.6, 4.0),
                            "Lyapunov spectra, all sites", "Lyapunov spectra, all probed sites"),
                _try_figure(lambda f: gp.hidden_spectrum(rec, ax=f.add_subplot()), (6.4, 4.0),
                            "hidden-state spectra, all sites", "singular values of the hidden states, all probed sites")]
        for stack in list(getattr(rec, "attention_stacks", None) or {}):
            figs.append(_try_figure(lambda f, st=stack: gp.depth_heatmap(rec, stack=st, ax=f.add_subplot()),
                                    (7.0, 1.4 + 0.3 * max(4, len(rec.attention_stacks[stack]))),
                                    f"depth flow of {stack}", f"gradient at each block's input: {stack}"))
        figs = [f for f in figs if f]
        if figs:
            parts.append('<div class="figs">' + "".join(figs) + "</div>")

    parts.append('<h2 id="findings">Findings</h2>')
    if diag.findings:
        parts += [_finding(f, ids, remedies) for f, ids in zip(diag.findings, refs)]
    else:
        parts.append("<p>No findings: every site is stable on this evidence.</p>" if diag.sites
                     else "<p>No findings.</p>")

    if remedies:
        parts.append('<h2 id="remedies">Remedies</h2><p class="sub">Each remedy once; the findings above '
                     "point to it.</p>" + _remedy_list(remedies, copy=True))

    if diag.sites:
        parts.append('<h2 id="sites">Sites</h2>')
        caveats_of = {s["name"]: list(s.get("caveats") or []) for s in diag.to_dict()["sites"]}
        for n in diag.sites:
            s = diag.site_summary(n)
            caveats = caveats_of.get(n, [])
            parts.append(f'<h3 id="{_anchor(n)}"><code>{_e(n)}</code> {_regime(s["regime"])}</h3>')
            parts.append(f"<p>{_e(s['kind'])} in module <code>{_e(s['module'] or '(model)')}</code> — "
                         f"{_e(s['reason'])}. Horizon {_e(fmt(s['horizon']))} of {_e(fmt(s['seq_len']))} steps, "
                         f"rate {_e(fmt(s['rate']))}/step, λ₁ {_e(fmt(s['lambda1']))}.</p>")
            parts += [f'<p><span class="caveat">{_e(c)}</span></p>' for c in caveats]
            if rec is not None and n in rec.sites:
                figs = _site_figures(rec, n)
                if figs:
                    parts.append('<div class="figs">' + "".join(figs) + "</div>")

    if rec is not None and len(rec.steps):
        parts.append('<h2 id="parameters">Parameter gradients</h2>')
        groups = len(rec.param_grad_norms())
        parts.append(_figure(lambda f: gp.param_flow(rec, ax=f.add_subplot()),
                             (7.5, 1.4 + 0.21 * max(3, min(groups, 40))), "parameter gradient flow",
                             "gradient norm of every parameter over the recorded steps"))
        events = [e for e in rec.events if e.get("kind") == "nonfinite"]
        if events:
            parts.append("<h3>Non-finite values</h3><table><thead><tr><th>step</th><th>where</th><th>value</th>"
                         "</tr></thead><tbody>" + "".join(
                             f"<tr><td class=\"num\">{_e(e.get('step'))}</td><td><code>"
                             f"{_e(e.get('site') or e.get('param'))}</code>"
                             + (f" state {_e(e.get('state'))} at t = {_e(e.get('t'))}" if e.get("site") else "")
                             + f"</td><td>{_e(e.get('value', ''))}</td></tr>" for e in events) + "</tbody></table>")

    if notes:
        parts.append('<h2 id="notes">Notes</h2>' + _notes(notes))
    parts.append(f'<p class="sub">Generated by gradscope {_e(diag.meta.get("gradscope_version") or "")}. '
                 "This file is self-contained: no network access is needed to view it.</p>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}\nbody{{max-width:1100px;margin:1.5em auto;padding:0 1em}}"
            f"</style><script>{_JS}</script></head>\n<body>\n<main class=\"gs\">\n" + "\n".join(parts)
            + "\n</main>\n</body></html>\n")
    if path is not None:
        p = Path(path)
        try:
            p.write_text(page, encoding="utf-8")
        except OSError as e:
            raise GradscopeError(f"cannot write the HTML report to {str(p)!r}: {e.strerror or e}.") from None
    return page


def _small_figure(rec) -> str:
    """The one figure of a notebook display: Jacobian decay when probed, else the heatmaps."""
    from .. import plot as gp

    if not rec.sites:
        return ""
    if any(rec.has_measure(s, "jacobian_norms") for s in rec.sites):
        return _figure(lambda f: gp.jacobian_decay(rec, ax=f.add_subplot()), (6.4, 3.4), "Jacobian norm by lag",
                       dpi=72)
    if len(rec.steps) == 1:
        return _figure(lambda f: gp.gradient_profile(rec, ax=f.add_subplot()), (6.4, 3.4), "gradient profile",
                       dpi=72)
    if len(rec.steps):
        n = len(rec.sites[:4])
        rows = math.ceil(n / (1 if n == 1 else 2))

        def draw(fig):
            grid = fig.subplots(rows, 1 if n == 1 else 2, squeeze=False).ravel()
            for extra in grid[n:]:
                extra.remove()
            _heatmaps(rec, list(grid[:n]), list(rec.sites[:n]))

        return _figure(draw, (8.0 if n > 1 else 6.0, 0.6 + rows * (1.9 if len(rec.steps) > 2 else 1.4)),
                       "gradient heatmaps", dpi=72)
    return ""


def _heatmaps(rec, axes, sites) -> None:
    from ..plot.flow import small_multiples

    small_multiples(rec, sites, axes, "h")


@register("diagnosis.repr_html")
def diagnosis_repr_html(diag) -> str:
    """The notebook display of a Diagnosis: summary table, findings (folded), one small figure.

    Args:
        diag: a :class:`~gradscope.Diagnosis`.

    Returns:
        An HTML fragment (no ``<html>`` wrapper; styles scoped to ``.gs``).

    Example:
        >>> import torch, gradscope
        >>> diag = gradscope.diagnose(gradscope.probe(torch.nn.RNN(2, 4), torch.randn(12, 2, 2)))
        >>> "<table>" in diagnosis_repr_html(diag)
        True
    """
    rec = diag.recording
    parts = [f"<style>{_CSS}</style>", '<div class="gs">',
             f"<b>gradscope diagnosis</b> <span class=\"sub\">{_e(_meta_line(diag, rec))}</span>"]
    if diag.sites:
        parts.append(_site_table(diag, links=False))
    parts.append(_trainability(diag))
    for m in diag.modules:
        parts.append(f"<div>{_regime(m.get('regime', 'stable'))} <code>{_e(m['line'])}</code></div>")
    remedies, refs = remedy_index(diag.findings)
    if diag.findings:
        for f, ids in zip(diag.findings, refs):
            parts.append(f'<details><summary><span class="sev {_e(f.severity)}">{_e(f.severity)}</span> '
                         f"{_e(f.kind)} at <code>{_e(f.site)}</code></summary>"
                         f"<p>{_e(f.explanation)}</p>" + _evidence_table(f.evidence)
                         + _remedy_refs(ids, remedies, link=False) + "</details>")
        if remedies:
            parts.append(f"<details><summary>remedies ({len(remedies)})</summary>"
                         + _remedy_list(remedies, copy=False) + "</details>")
    else:
        parts.append("<p>No findings.</p>")
    if rec is not None:
        try:
            parts.append(_small_figure(rec))
        except GradscopeError:  # a display never fails: the tables still show
            pass
    if diag.notes:
        parts.append("<details><summary>notes</summary>" + _notes(diag.notes) + "</details>")
    parts.append("</div>")
    return "\n".join(p for p in parts if p)


@register("recording.repr_html")
def recording_repr_html(rec) -> str:
    """The notebook display of a Recording: what was recorded per site, and one small figure.

    Args:
        rec: a :class:`~gradscope.Recording`.

    Returns:
        An HTML fragment.

    Example:
        >>> import torch, gradscope
        >>> rec = gradscope.probe(torch.nn.GRU(2, 4), torch.randn(12, 2, 2))
        >>> "jacobian_norms" in recording_repr_html(rec)
        True
    """
    S = len(rec.steps)
    head = (f"<b>gradscope Recording</b> <span class=\"sub\">{_e(rec.meta.get('model', ''))} · "
            f"source {_e(rec.meta.get('source', '?'))} · {S} recorded step(s) · {len(rec.sites)} site(s) · "
            f"{len(rec.param_grad_norms())} parameter(s) · {len(rec.events)} event(s)</span>")
    parts = [f"<style>{_CSS}</style>", '<div class="gs">', head]
    if rec.sites:
        rows = []
        for s in rec.sites:
            info = rec.site_info(s)
            lens = rec.seq_lens(s)
            T = int(lens.max()) if len(lens) else 0
            have = sorted({m for (site, m) in rec.measures() if site == s and not m.startswith("probe_")})
            hist = rec.has_measure(s, "probe_steps")
            rows.append(f"<tr><td><code>{_e(s)}</code></td><td>{_e(info.get('kind'))}</td>"
                        f"<td><code>{_e(info.get('module') or '(model)')}</code></td>"
                        f"<td class=\"num\">{_e('—' if info.get('layer') is None else info.get('layer'))}</td>"
                        f"<td>{_e(info.get('direction') or '—')}</td><td>{_e(', '.join(info.get('states', [])))}</td>"
                        f"<td class=\"num\">{T}</td><td>{_e(', '.join(have) or '— (watch only)')}"
                        f"{_e(' + history' if hist else '')}</td></tr>")
        parts.append("<table><thead><tr><th>site</th><th>kind</th><th>module</th><th>layer</th><th>direction</th>"
                     "<th>states</th><th>T</th><th>probe measures</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table>")
    else:
        parts.append("<p>No recurrent or attention site was found.</p>")
    try:
        parts.append(_small_figure(rec))
    except GradscopeError:  # e.g. nothing finite to draw: the table still shows
        pass
    if rec.notes:
        parts.append("<details><summary>notes</summary>" + _notes(rec.notes) + "</details>")
    parts.append("</div>")
    return "\n".join(p for p in parts if p)


@register("trials.repr_html")
def trials_repr_html(trials) -> str:
    """The notebook display of remedy trials (anything with the ``to_dict()`` of ``RemedyTrials``).

    One row per remedy and targeted site: regime, horizon and λ₁ before → after, the score, and
    whether it improved the model (green) or not; then the remedies skipped and why.

    Args:
        trials: a :class:`gradscope.analysis.trials.RemedyTrials`, or any object whose ``to_dict()``
            has ``results`` (with ``remedy``, ``title``, ``applied``, ``score``, ``improved`` and
            ``changes``) and ``skipped``.

    Returns:
        An HTML fragment.

    Example:
        >>> class T:
        ...     def to_dict(self):
        ...         return {"seed": 0, "best": None, "results": [], "skipped": [
        ...             {"remedy": "clip_grad_norm", "sites": [], "reason": "acts on training"}]}
        >>> "clip_grad_norm" in trials_repr_html(T())
        True
    """
    if not hasattr(trials, "to_dict"):
        raise GradscopeError(f"trials_repr_html expects RemedyTrials (try_remedies(...)), got {type(trials).__name__}.")
    d = trials.to_dict()
    parts = [f"<style>{_CSS}</style>", '<div class="gs">',
             f"<b>Remedy trials</b> <span class=\"sub\">each remedy applied to a copy of the model and "
             f"probed on the same batch (seed {_e(d.get('seed'))}); best: "
             f"{_e(d.get('best') or 'none improved')}</span>"]
    results = d.get("results") or []
    if results:
        rows = []
        for r in results:
            changes = r.get("changes") or [{}]
            for i, ch in enumerate(changes):
                site = ch.get("site", "")
                if ch.get("site_after") and ch.get("site_after") != site:
                    site = f"{site} (now {ch['site_after']})"
                first = i == 0
                span = f' rowspan="{len(changes)}"' if first and len(changes) > 1 else ""
                cells = []
                if first:
                    cells.append(f"<td{span}><b>{_e(r.get('remedy'))}</b><br><span class=\"ref\">{_e(r.get('title', ''))}"
                                 f"</span></td>")
                cells += [f"<td><code>{_e(site)}</code></td>",
                          f"<td>{_regime(ch.get('regime_before', '?'))} → {_regime(ch.get('regime_after', '?'))}</td>",
                          f"<td class=\"num\">{_e(fmt(_num(ch.get('horizon_before'))))} → "
                          f"{_e(fmt(_num(ch.get('horizon_after'))))}</td>",
                          f"<td class=\"num\">{_e(fmt(_num(ch.get('seq_len'))))}</td>",
                          f"<td class=\"num\">{_e(fmt(_num(ch.get('lambda1_before'))))} → "
                          f"{_e(fmt(_num(ch.get('lambda1_after'))))}</td>"]
                if first:
                    ok = bool(r.get("improved"))
                    cells += [f"<td{span} class=\"num\">{_e(_signed(r.get('score')))}</td>",
                              f"<td{span}><span class=\"regime {'stable' if ok else 'exploding'}\">"
                              f"{'yes' if ok else 'no'}</span></td>",
                              f"<td{span}>{_e(r.get('applied', ''))}</td>"]
                rows.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("<table><thead><tr><th>remedy</th><th>site</th><th>regime before → after</th>"
                     "<th>horizon before → after</th><th>T</th><th>λ₁ before → after</th><th>score</th>"
                     "<th>improved</th><th>applied</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    else:
        parts.append("<p>No remedy was tried.</p>")
    skipped = d.get("skipped") or []
    if skipped:
        parts.append("<details><summary>skipped (" + str(len(skipped)) + ")</summary><ul>" + "".join(
            f"<li><b>{_e(s.get('remedy'))}</b>" + (f" ({_e(', '.join(s.get('sites') or []))})" if s.get("sites") else "")
            + f": {_e(s.get('reason', ''))}</li>" for s in skipped) + "</ul></details>")
    parts.append("</div>")
    return "\n".join(parts)


def _num(v: Any) -> Any:
    """Numbers of a to_dict(): the strings 'inf' / '-inf' / 'nan' back to floats."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return v


def _signed(v: Any) -> str:
    v = _num(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return f"{v:+.2f}"
    return fmt(v)
