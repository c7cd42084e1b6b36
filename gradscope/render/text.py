"""Text and markdown reports of a Diagnosis (``str(diag)``, ``diag.to_text()``, ``diag.to_markdown()``)
and of remedy trials (``str(trials)``, ``trials.to_markdown()``).

Prose is wrapped at 100 characters (:data:`gradscope._format.WIDTH`); tables and remedy code are
not (code must paste). Findings point to the remedies, which follow once each. The JSON of a
Diagnosis is its own ``to_dict()`` / ``to_json()``: that is the data's schema, not a rendering.

The functions register themselves in :mod:`gradscope._renderers`, where the methods of Diagnosis
and RemedyTrials find them; this module imports nothing but the formatting helpers (``import gradscope`` imports
it, without numpy).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from .._format import WIDTH, fmt, remedy_index, text_table, wrap, wrap_lines
from .._renderers import register

__all__ = ["diagnosis_to_text", "diagnosis_to_markdown", "trials_to_text", "trials_to_markdown"]


def _site_rows(diag) -> Tuple[List[str], List[List[str]]]:
    """The header and one row per site of the summary table (shared by text and markdown)."""
    head = ["site", "kind", "regime", "horizon", "T", "rate/step", "λ₁", "τ", "evidence"]
    rows = []
    for n in diag.sites:
        s = diag.site_summary(n)
        ev = s["evidence"]
        rows.append([n, s["kind"], s["regime"], fmt(ev.get("horizon")), fmt(ev.get("seq_len")),
                     fmt(ev.get("rate")), fmt(ev.get("lambda1")), fmt(ev.get("memory_time")),
                     ", ".join(s["evidence_used"]) or "—"])
    return head, rows


@register("diagnosis.text")
def diagnosis_to_text(diag, notes: Optional[List[str]] = None) -> str:
    """The plain-text report (``str(diag)``), no line wider than 100 characters except code
    lines of a remedy that are longer themselves (code is never wrapped: it must paste).

    Findings point to the remedies ("→ remedy 2: …"), which follow once each, with their code.

    Args:
        diag: a :class:`~gradscope.Diagnosis`.
        notes: the notes to show (default ``diag.notes``; a checkpoint report adds its own).

    Returns:
        The text, ending with a newline.

    Example:
        >>> import torch, gradscope
        >>> diag = gradscope.diagnose(gradscope.probe(torch.nn.RNN(2, 4), torch.randn(12, 2, 2)))
        >>> diagnosis_to_text(diag).startswith("gradscope diagnosis — 1 site(s)")
        True
    """
    notes = diag.notes if notes is None else notes
    src = diag.meta.get("source", "?")
    lines = wrap(f"gradscope diagnosis — {len(diag.sites)} site(s), {len(diag.findings)} finding(s) "
                 f"[source: {src}, {diag.meta.get('steps', 0)} recorded step(s)]")
    if diag.meta.get("measured_on"):
        lines += wrap(f"measured on: {diag.meta['measured_on']}")
    if diag.schedule_line():
        lines += wrap(diag.schedule_line())
    lines.append("")
    if diag.sites:
        lines += text_table(*_site_rows(diag), width=WIDTH)
        lines.append("")
    if diag.trainability is not None:
        lines += wrap_lines(str(diag.trainability).splitlines())
        lines.append("")
    for m in diag.modules:
        lines += wrap(f"module {m['line']}")
    if diag.modules:
        lines.append("")
    remedies, refs = remedy_index(diag.findings)
    for f, ids in zip(diag.findings, refs):
        lines += wrap(f"[{f.severity}] {f.kind} at {f.site}: {f.explanation}")
        if f.evidence:
            lines += wrap("evidence: " + ", ".join(f"{k}={fmt(v)}" for k, v in f.evidence.items()),
                          "    ", "  ")
        lines += [x for i in ids for x in wrap(f"→ remedy {i}: {remedies[i - 1]['title']}", "    ", "    ")]
    if not diag.findings:
        lines.append("No findings: every site is stable on this evidence." if diag.sites
                     else "No recurrent or attention site to diagnose.")
    if remedies:
        lines += ["", "remedies (each once; the findings above point to them)"]
    for r in remedies:
        lines.append("")
        head = f"{r['id']}. {r['title']}" + (f" [{r['name']}]" if r["name"] else "")
        lines += wrap(head + " — for " + ", ".join(r["sites"]), "", "   ")
        for w in r["why"]:
            lines += wrap((f"at {w['site']}: " if len(r["sites"]) > 1 else "") + w["why"], "   ", "  ")
        lines += ["       " + c if c.strip() else "" for c in r["code"].splitlines()]
        if r["reference"]:
            lines += wrap(f"({r['reference']})", "   ", " ")
    if notes:
        lines.append("")
    for n in notes:
        lines += wrap(f"note: {n}", "", "      ")
    return "\n".join(lines).rstrip() + "\n"

@register("diagnosis.markdown")
def diagnosis_to_markdown(diag, notes: Optional[List[str]] = None) -> str:
    """The markdown report: prose wrapped at 100 characters (tables and code are not), the
    remedies once each under "Remedies" with the findings pointing to them.

    Args:
        diag: a :class:`~gradscope.Diagnosis`.
        notes: the notes to show (default ``diag.notes``).

    Returns:
        The markdown, ending with a newline.

    Example:
        >>> import torch, gradscope
        >>> diag = gradscope.diagnose(gradscope.probe(torch.nn.RNN(2, 4), torch.randn(12, 2, 2)))
        >>> diagnosis_to_markdown(diag).splitlines()[0]
        '# gradscope diagnosis'
    """
    notes = diag.notes if notes is None else notes
    src = diag.meta.get("source", "?")
    out = ["# gradscope diagnosis", ""]
    out += wrap(f"{len(diag.sites)} site(s), {len(diag.findings)} finding(s) — source: {src}, "
                f"{diag.meta.get('steps', 0)} recorded step(s)." + (f" {diag.schedule_line()}."
                                                                   if diag.schedule_line() else "")
                + (f" Measured on: {diag.meta['measured_on']}." if diag.meta.get("measured_on") else ""),
                hang="")
    out.append("")
    if diag.sites:
        head, rows = _site_rows(diag)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            out.append("| " + " | ".join(str(c) for c in r) + " |")
        out.append("")
    if diag.trainability is not None:
        t = diag.trainability
        out += ["## Trainability", ""]
        out += wrap(f"**{t.verdict}** (confidence {t.confidence:.2f}) — a prediction calibrated on "
                    "labelled training runs, not a measurement.", hang="")
        out.append("")
        out += [x for r in t.reasons for x in wrap(f"- {r}", hang="  ")]
        out.append("")
    if diag.modules:
        out.append("## Modules")
        out.append("")
        out += [x for m in diag.modules for x in wrap(f"- {m['line']}", hang="  ")]
        out.append("")
    remedies, refs = remedy_index(diag.findings)
    if diag.findings:
        out.append("## Findings")
        out.append("")
    for f, ids in zip(diag.findings, refs):
        out.append(f"### {f.severity}: {f.kind} at `{f.site}`")
        out.append("")
        out += wrap(f.explanation, hang="")
        out.append("")
        if f.evidence:
            out.append("| evidence | value |")
            out.append("|---|---|")
            out += [f"| {k} | {fmt(v)} |" for k, v in f.evidence.items()]
            out.append("")
        for i in ids:
            out += wrap(f"- → [remedy {i}](#remedy-{i}): {remedies[i - 1]['title']}", hang="  ")
        if ids:
            out.append("")
    if not diag.findings:
        out.append("No findings." if diag.sites else "No recurrent or attention site to diagnose.")
        out.append("")
    if remedies:
        out += ["## Remedies", ""]
    for r in remedies:
        out += [f'<a id="remedy-{r["id"]}"></a>', ""]
        out += wrap(f"### {r['id']}. {r['title']}", hang="")
        out.append("")
        out += wrap((f"`{r['name']}`, " if r["name"] else "") + "for "
                    + ", ".join(f"`{s}`" for s in r["sites"]) + ".", hang="")
        out.append("")
        for w in r["why"]:
            out += wrap("- " + (f"at `{w['site']}`: " if len(r["sites"]) > 1 else "") + w["why"], hang="  ")
        if r["why"]:
            out.append("")
        if r["code"]:
            out += ["```python", *r["code"].rstrip("\n").splitlines(), "```", ""]
        if r["reference"]:
            out += wrap(f"_{r['reference']}_", hang="")
            out.append("")
    if notes:
        out.append("## Notes")
        out.append("")
        out += [x for n in notes for x in wrap(f"- {n}", hang="  ")]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------ remedy trials
def _trial_rows(trials) -> Tuple[List[str], List[List[str]]]:
    """The header and rows of the trials table: one row per remedy and targeted site."""
    trained = trials.baseline is not None
    head = ["remedy", "site", "regime before → after", "horizon before → after", "T",
            "λ₁ before → after", "score", "improved"]
    if trained:
        head[-1:-1] = ["final loss", "loss AUC"]
    rows = []
    for r in trials.results:
        for i, ch in enumerate(r.changes):
            site = ch.site if ch.site == ch.site_after else f"{ch.site} (now {ch.site_after})"
            row = [r.remedy if i == 0 else "", site,
                   f"{ch.regime_before} → {ch.regime_after}",
                   f"{fmt(ch.horizon_before)} → {fmt(ch.horizon_after)}", fmt(ch.seq_len),
                   f"{fmt(ch.lambda1_before)} → {fmt(ch.lambda1_after)}",
                   f"{r.score:+.2f}" if i == 0 else "", ("yes" if r.improved else "no") if i == 0 else ""]
            if trained:
                tr = r.training
                row[-1:-1] = ([fmt(tr.final_loss) + (" (diverged)" if tr.diverged else ""), fmt(tr.loss_auc)]
                              if i == 0 and tr is not None else ["", ""])
            rows.append(row)
    return head, rows


def _trials_intro(trials) -> str:
    """What was done and how the trials are ranked."""
    if trials.baseline is not None:
        b = trials.baseline
        return (f"Remedy trials: each remedy applied to a copy of the model and trained for {b.steps} "
                f"steps on your data, as was the original (same seed {trials.seed}, same optimizer "
                f"settings; original: final loss {fmt(b.final_loss)}, loss AUC {fmt(b.loss_auc)}). "
                f"Ranked by the measured final loss, then the loss AUC; the Jacobian effect (score: "
                f"change of reach = min(horizon, explosion lag, T)/T) is shown beside it.")
    return (f"Remedy trials: each remedy applied to a copy of the model, probed on the same batch "
            f"(seed {trials.seed}). Ranked by the change of reach = min(horizon, explosion lag, T)/T, "
            f"then by |λ₁| moving toward 0 — a prediction from the Jacobians, not a training result "
            f"(train_steps=N trains every copy and ranks by loss).")


@register("trials.text")
def trials_to_text(trials) -> str:
    """The remedy trials as text (``str(trials)``): how they were run and ranked, the table of
    regimes, horizons and λ₁ before → after per remedy and site, what each remedy changed, and the
    remedies skipped with the reason.

    Args:
        trials: a :class:`~gradscope.RemedyTrials` (:func:`gradscope.try_remedies`).

    Returns:
        The text, ending with a newline.

    Example:
        >>> from gradscope.analysis.trials import RemedyTrials, SkippedRemedy
        >>> skipped = [SkippedRemedy("clip_grad_norm", (), "acts on training, not on the weights")]
        >>> print(trials_to_text(RemedyTrials([], skipped, [], {}, seed=0)).splitlines()[-1])
          clip_grad_norm: acts on training, not on the weights
    """
    lines = [_trials_intro(trials), ""]
    if trials.results:
        lines += text_table(*_trial_rows(trials))
        lines.append("")
        for r in trials.results:
            lines.append(f"{r.remedy}: {r.applied}")
    else:
        lines.append("No remedy was tried" + (": the diagnosis found nothing to remedy."
                                              if not trials.findings else "."))
    if trials.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {s.remedy}" + (f" ({', '.join(s.sites)})" if s.sites else "") + f": {s.reason}"
                  for s in trials.skipped]
    return "\n".join(lines).rstrip() + "\n"


@register("trials.markdown")
def trials_to_markdown(trials) -> str:
    """The remedy trials as markdown (``trials.to_markdown()``): the same as
    :func:`trials_to_text`, under a "Remedy trials" heading.

    Args:
        trials: a :class:`~gradscope.RemedyTrials` (:func:`gradscope.try_remedies`).

    Returns:
        The markdown, ending with a newline.

    Example:
        >>> from gradscope.analysis.trials import RemedyTrials
        >>> trials_to_markdown(RemedyTrials([], [], [], {}, seed=0)).splitlines()[0]
        '## Remedy trials'
    """
    out = ["## Remedy trials", "", _trials_intro(trials), ""]
    if trials.results:
        head, rows = _trial_rows(trials)
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        out.append("")
        out += [f"- **{r.remedy}** ({r.title}): {r.applied}" for r in trials.results]
    else:
        out.append("No remedy was tried.")
    if trials.skipped:
        out += ["", "### Skipped", ""]
        out += [f"- **{s.remedy}**" + (f" ({', '.join(s.sites)})" if s.sites else "") + f": {s.reason}"
                for s in trials.skipped]
    return "\n".join(out).rstrip() + "\n"
