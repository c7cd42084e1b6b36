"""Reports worth reading: the same notes in every format, each remedy's code once, text at 100 columns.

One rich case runs through all four formats: ``gradscope report`` of a 2-layer LSTM checkpoint
(several findings, remedies shared between findings and between layers, notes), plus a checkpoint
without recurrent weights (the "no recurrent weights found" note) and ``scope.diagnose()`` of a
watch (its notes say a probe is missing).
"""
import html
import json
import re

import pytest
import torch

import gradscope
from gradscope._format import WIDTH, remedy_index, text_table, wrap
from gradscope.cli import main
from gradscope.checkpoint.report import report_checkpoint

FORMATS = ("text", "markdown", "json", "html")


def flat(s: str) -> str:
    """Whitespace collapsed, HTML entities undone: a note wrapped over lines still matches."""
    return " ".join(html.unescape(s).split())


@pytest.fixture(scope="module")
def lstm_report(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "lstm2.pt"
    # saved from a DistributedDataParallel wrapper: the "module." prefix is stripped, with a note
    torch.save({"module." + k: v for k, v in torch.nn.LSTM(8, 64, num_layers=2).state_dict().items()}, path)
    return report_checkpoint(path, seq_len=60, progress=False)


@pytest.fixture(scope="module")
def no_recurrent(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "linear.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return report_checkpoint(path, progress=False)


@pytest.fixture(scope="module")
def watched_diag():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 16, num_layers=2)
    with gradscope.watch(lstm, every=1, probe_every=None) as scope:
        for _ in range(3):
            lstm(torch.randn(30, 4, 3))[0][-1].sum().backward()
    return scope.diagnose()


def test_every_format_carries_the_same_notes(lstm_report, no_recurrent, watched_diag):
    cases = [(lstm_report.all_notes, lstm_report.render), (no_recurrent.all_notes, no_recurrent.render),
             (watched_diag.notes, lambda f: {"text": watched_diag.to_text, "markdown": watched_diag.to_markdown,
                                             "json": watched_diag.to_json, "html": watched_diag.to_html}[f]())]
    assert any("no recurrent or attention weights found" in n for n in no_recurrent.all_notes)
    assert any("need a probe" in n for n in watched_diag.notes)
    for notes, render in cases:
        assert notes
        for fmt in FORMATS:
            page = render(fmt)
            if fmt == "json":
                assert json.loads(page)["notes"] == list(notes)
                continue
            body = flat(page)
            for n in notes:
                assert flat(n) in body, (fmt, n)


def test_each_remedy_code_once_and_findings_point_to_it(lstm_report):
    diag = lstm_report.diagnosis
    snippets = {r.code for f in diag.findings for r in f.remedies if r.code}
    proposals = sum(1 for f in diag.findings for r in f.remedies if r.code)
    assert proposals > len(snippets)  # the case has remedies proposed by several findings
    entries, refs = remedy_index(diag.findings)
    assert sorted(e["code"] for e in entries if e["code"]) == sorted(snippets)
    md, text, page = lstm_report.render("markdown"), lstm_report.render("text"), lstm_report.render("html")
    assert md.count("```python") == len(snippets)
    assert page.count("<pre><code>") == len(snippets)
    for code in snippets:
        block = "\n".join(("       " + line) if line.strip() else "" for line in code.rstrip("\n").splitlines())
        assert text.count(block) == 1 and md.count(code.rstrip("\n")) == 1 and page.count(html.escape(code)) == 1
    # every finding points to its remedies, by number, in text, markdown and HTML
    n_refs = sum(len(ids) for ids in refs)
    assert len(re.findall(r"→ remedy \d+: ", text)) == n_refs
    assert len(re.findall(r"→ \[remedy \d+\]\(#remedy-\d+\)", md)) == n_refs
    assert len(re.findall(r'→ <a href="#remedy-\d+">remedy \d+: ', page)) == n_refs
    # JSON: the code once, at the top level; findings hold pointers
    d = json.loads(lstm_report.render("json"))
    assert sorted(r["code"] for r in d["remedies"] if r["code"]) == sorted(snippets)
    for f, ids in zip(d["findings"], refs):
        assert f["remedy_ids"] == ids and [r["id"] for r in f["remedies"]] == ids
        assert all("code" not in r for r in f["remedies"])


def _prose(md: str):
    """Markdown lines outside code blocks and tables."""
    out, code = [], False
    for line in md.splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and not line.startswith("|"):
            out.append(line)
    return out


def test_text_and_markdown_prose_wrapped_at_100(lstm_report, watched_diag, capsys, tmp_path):
    text = lstm_report.render("text")
    assert len(lstm_report.findings) >= 4 and "remedies (each once" in text and "note:" in text
    assert max(map(len, text.splitlines())) <= WIDTH
    assert max(map(len, _prose(lstm_report.render("markdown")))) <= WIDTH
    assert max(map(len, watched_diag.to_text().splitlines())) <= WIDTH
    assert max(map(len, _prose(watched_diag.to_markdown()))) <= WIDTH
    # the CLI prints the same text
    path = tmp_path / "lstm2.pt"
    torch.manual_seed(0)
    torch.save({"module." + k: v for k, v in torch.nn.LSTM(8, 64, num_layers=2).state_dict().items()}, path)
    assert main(["report", str(path), "--seq-len", "60"]) == 0
    out = capsys.readouterr().out
    assert "remedy 1" in out and max(map(len, out.splitlines())) <= WIDTH


def test_wrap_helpers():
    lines = wrap("word " * 60, "  ", "    ", width=40)
    assert all(len(x) <= 40 for x in lines) and lines[0].startswith("  w") and lines[1].startswith("      w")
    assert wrap("x" * 90, hang="", width=40) == ["x" * 40, "x" * 40, "x" * 10]  # never wider than the line
    rows = [["l0", "lstm", "jacobian_norms, lyapunov, weights, gate_stats"]]
    table = text_table(["site", "kind", "evidence"], rows, width=40)
    assert all(len(x) <= 40 for x in table) and table[2].startswith(" " * 12 + "weights")
    long = text_table(["site", "evidence"], [["a" * 45, "jacobian_norms"]], width=40)
    assert all(len(x) <= 40 for x in long) and long[0].startswith("site=")


def test_probe_only_html_shows_the_profile_not_a_heatmap(lstm_report):
    page = lstm_report.render("html")
    assert 'alt="gradient profile of l0"' in page and 'alt="gradient profile, all sites"' in page
    assert "gradient heatmap of" not in page
