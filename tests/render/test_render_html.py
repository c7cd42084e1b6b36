"""The HTML report and notebook displays: self-contained, well-formed, escaped, with real figures.

No browser is available to the suite, so the embedded figures are decoded and checked as PNG
(non-blank, expected count) and the page structure is checked with html.parser. Set
``$GRADSCOPE_REVIEW_DIR`` to keep the report and the decoded figures for looking at them.
"""
import base64
import io
import os
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gradscope  # noqa: E402
from gradscope import GradscopeError, Recording  # noqa: E402
from gradscope.render.html import (diagnosis_repr_html, diagnosis_to_html, recording_repr_html,  # noqa: E402
                                   trials_repr_html)

VOID = {"meta", "img", "br", "hr", "input", "link"}


class Structure(HTMLParser):
    """Tag balance, ids, images, scripts and external references of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.ids, self.imgs, self.tags = [], [], [], [], []
        self.external = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k in ("src", "href"):
            v = a.get(k)
            if v and not (v.startswith("data:") or v.startswith("#")):
                self.external.append(v)
        if tag == "link":
            self.external.append(str(a))
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Structure:
    p = Structure()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert not p.stack, f"unclosed tags {p.stack}"
    return p


def decode_images(p: Structure, out_dir=None, prefix="fig"):
    imgs = []
    for i, a in enumerate(p.imgs):
        src = a["src"]
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1])
        img = mpimg.imread(io.BytesIO(raw), format="png")[..., :3]
        assert img.std() > 0.02, f"figure {a.get('alt')!r} looks blank"
        imgs.append((a.get("alt"), img))
        if out_dir:
            name = re.sub(r"[^A-Za-z0-9]+", "_", a.get("alt") or str(i)).strip("_")
            with open(os.path.join(out_dir, f"{prefix}_{i:02d}_{name}.png"), "wb") as f:
                f.write(raw)
    return imgs


@pytest.fixture
def review_dir():  # overrides conftest's: None unless $GRADSCOPE_REVIEW_DIR is set
    d = os.environ.get("GRADSCOPE_REVIEW_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def watched_diag():
    """A 2-layer LSTM watched for 5 steps with a probe every 2: every kind of figure."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(2, 6, num_layers=2)
    opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
    with gradscope.watch(lstm, every=1, probe_every=2) as scope:
        for _ in range(5):
            out, _ = lstm(torch.randn(15, 4, 2))
            opt.zero_grad()
            out[-1].pow(2).mean().backward()
            opt.step()
    return scope.diagnose()


@pytest.fixture(scope="module")
def vanishing_diag():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(2, 8)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.3)
    return gradscope.diagnose(gradscope.probe(rnn, torch.randn(40, 3, 2)))


def hostile_recording():
    """Site names, notes and events carrying markup, which must come out escaped."""
    site = "enc.<b>x</b>"
    sites = {site: {"kind": "rnn_tanh", "module": "enc.<b>", "states": ["h"], "layer": 0, "direction": "forward"}}
    g = 10.0 ** -np.arange(8)[::-1] * np.ones((3, 1))
    return Recording(sites=sites, steps=[0, 1, 2], grads={(site, "h"): g}, seq_lens={site: np.full(3, 8)},
                     params={"w<script>": np.ones(3)}, notes=["<script>alert('note')</script> & more"],
                     events=[{"kind": "nonfinite", "step": 2, "param": "w<script>", "value": "nan"}],
                     meta={"model": "M<i>odel</i>", "source": "watch"})


# -------------------------------------------------------------------------------- the report
def test_report_is_self_contained_and_complete(watched_diag, tmp_path, review_dir):
    path = tmp_path / "report.html"
    page = diagnosis_to_html(watched_diag, path=path)
    assert path.read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>")
    p = parse(page)
    assert not p.external, f"external references: {p.external[:3]}"
    assert "script" in p.tags and "style" in p.tags
    assert not re.search(r"https?://", page.split("</head>")[0]), "no network in the head"
    rec = watched_diag.recording
    # summary table: one row per site, regime coloured, linked to the site's section
    for s in watched_diag.sites:
        assert f'href="#site-{s.replace(".", "-")}"' in page
        assert f"site-{s.replace('.', '-')}" in p.ids
    assert page.count('class="regime ') >= 2 * len(watched_diag.sites)
    for f in watched_diag.findings:
        assert f.explanation.replace("'", "&#x27;") in page
    # figures: 3 overview + per site (heatmap, Jacobian, Lyapunov, λ₁ history) + parameter flow
    history = all(len(rec.measure(s, "probe_steps")) >= 2 for s in rec.sites)
    expected = 3 + len(rec.sites) * (3 + history) + 1
    imgs = decode_images(p, review_dir, "report")
    assert len(imgs) == expected, [a for a, _ in imgs]
    if review_dir:
        with open(os.path.join(review_dir, "report_lstm.html"), "w", encoding="utf-8") as f:
            f.write(page)


def test_report_remedies_have_copyable_code(vanishing_diag, review_dir):
    page = diagnosis_to_html(vanishing_diag)
    p = parse(page)
    codes = {(r.name, r.code) for f in vanishing_diag.findings for r in f.remedies if getattr(r, "code", "")}
    n_code = len(codes)  # each distinct snippet once, however many findings propose it
    assert n_code > 0
    assert page.count('<button class="copy"') == n_code
    assert page.count("<pre><code>") == n_code
    n_refs = sum(len(f.remedies) for f in vanishing_diag.findings)  # every finding links to its remedies
    assert len(re.findall(r'<a href="#remedy-\d+">', page)) == n_refs
    for i in range(1, n_code + 1):
        assert page.count(f'id="remedy-{i}"') == 1
    first = next(r for f in vanishing_diag.findings for r in f.remedies if getattr(r, "code", ""))
    assert first.code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") \
        .replace("'", "&#x27;") in page
    assert "function gsCopy" in page
    decode_images(p, review_dir, "report_rnn")
    # evidence tables with the numbers of each finding
    for f in vanishing_diag.findings:
        for k in f.evidence:
            assert f"<code>{k}</code>" in page


def test_report_escapes_all_text(tmp_path):
    diag = gradscope.diagnose(hostile_recording())
    page = diagnosis_to_html(diag)
    p = parse(page)
    assert "<script>alert" not in page and "<b>x</b>" not in page and "M<i>odel" not in page
    assert "&lt;script&gt;alert(&#x27;note&#x27;)&lt;/script&gt; &amp; more" in page
    assert "enc.&lt;b&gt;x&lt;/b&gt;" in page
    assert p.tags.count("script") == 1  # only the copy helper
    assert "Non-finite values" in page


def test_report_without_recording_and_without_sites(vanishing_diag, tmp_path):
    bare = gradscope.Diagnosis(dict(vanishing_diag._sites), vanishing_diag.findings, vanishing_diag.modules,
                               ["a note"], dict(vanishing_diag.meta), vanishing_diag.rules, recording=None)
    page = diagnosis_to_html(bare)
    p = parse(page)
    assert not p.imgs and "vanishing" in page and "a note" in page
    lin = torch.nn.Linear(3, 1)
    with gradscope.watch(lin, every=1) as scope:
        lin(torch.randn(4, 3)).sum().backward()
    page = diagnosis_to_html(gradscope.diagnose(scope.recording))
    p = parse(page)
    assert "No recurrent or attention site to diagnose." in page
    assert len(p.imgs) == 1  # parameter flow only


def test_report_errors(vanishing_diag, tmp_path):
    with pytest.raises(GradscopeError, match="expects a gradscope Diagnosis"):
        diagnosis_to_html(vanishing_diag.recording)
    with pytest.raises(GradscopeError, match="cannot write the HTML report to"):
        diagnosis_to_html(vanishing_diag, path=tmp_path / "missing" / "r.html")


def test_diagnosis_to_html_method_and_checkpoint_report_insert(vanishing_diag):
    page = vanishing_diag.to_html()
    assert "<body>\n<main" in page  # gradscope report (checkpoint) inserts its header after <body>
    parse(page)


# ------------------------------------------------------------------------- notebook displays
def test_diagnosis_repr_html(watched_diag, review_dir):
    frag = watched_diag._repr_html_()
    assert frag == diagnosis_repr_html(watched_diag)
    p = parse(frag)
    assert "<!DOCTYPE" not in frag and "<table>" in frag
    assert frag.count("<details>") >= len(watched_diag.findings)
    assert len(p.imgs) == 1
    decode_images(p, review_dir, "repr_diagnosis")
    assert 'onclick=' not in frag  # notebooks strip scripts; no dead buttons


def test_recording_repr_html(watched_diag, review_dir):
    rec = watched_diag.recording
    frag = rec._repr_html_()
    assert frag == recording_repr_html(rec)
    p = parse(frag)
    for s in rec.sites:
        assert f"<code>{s}</code>" in frag
    assert "jacobian_norms" in frag and "+ history" in frag
    assert len(p.imgs) == 1
    decode_images(p, review_dir, "repr_recording")


def test_recording_repr_html_watch_only_and_empty(review_dir):
    rnn = torch.nn.GRU(2, 3, num_layers=2)
    with gradscope.watch(rnn, every=1, probe_every=None) as scope:
        for _ in range(3):
            rnn(torch.randn(6, 2, 2))[0].sum().backward()
    frag = recording_repr_html(scope.recording)
    p = parse(frag)
    assert "— (watch only)" in frag and len(p.imgs) == 1  # the heatmaps
    decode_images(p, review_dir, "repr_recording_watch")
    with gradscope.watch(torch.nn.RNN(2, 3), every=1) as scope:
        pass
    frag = recording_repr_html(scope.recording)
    p = parse(frag)
    assert "0 recorded step(s)" in frag and not p.imgs
    frag = recording_repr_html(hostile_recording())
    assert "<script>" not in frag.replace("<style>", "")
    parse(frag)


def _fake_trials():
    class Fake:
        def to_dict(self):
            change = {"site": "rnn.l0", "site_after": "rnn.lstm.l0", "kind_before": "rnn_tanh", "kind_after": "lstm",
                      "seq_len": 40.0, "regime_before": "vanishing", "regime_after": "stable",
                      "horizon_before": 6.0, "horizon_after": "inf", "lambda1_before": -1.2, "lambda1_after": -0.1,
                      "reach_before": 0.15, "reach_after": 1.0}
            return {"seed": 0, "best": "switch_to_lstm",
                    "results": [{"remedy": "switch_to_lstm", "title": "Switch <to> LSTM", "sites": ["rnn.l0"],
                                 "applied": "nn.RNN → nn.LSTM", "changes": [change], "score": 0.85,
                                 "lambda_gain": 1.1, "improved": True},
                                {"remedy": "xavier_init", "title": "Xavier", "sites": ["rnn.l0", "rnn.l1"],
                                 "applied": "xavier", "changes": [dict(change, site_after="rnn.l0", regime_after="vanishing"),
                                                                  dict(change, site="rnn.l1", site_after="rnn.l1")],
                                 "score": "nan", "lambda_gain": 0.0, "improved": False}],
                    "skipped": [{"remedy": "clip_grad_norm", "sites": [], "reason": "acts on training"}]}
    return Fake()


def test_trials_repr_html_duck_typed():
    frag = trials_repr_html(_fake_trials())
    p = parse(frag)
    assert "Switch &lt;to&gt; LSTM" in frag and "rnn.l0 (now rnn.lstm.l0)" in frag
    assert "6 → ∞" in frag and "+0.85" in frag and 'rowspan="2"' in frag
    assert "acts on training" in frag and not p.imgs
    with pytest.raises(GradscopeError, match="expects RemedyTrials"):
        trials_repr_html(object())


def test_trials_repr_html_of_real_trials():
    trials_mod = pytest.importorskip("gradscope.analysis.trials")
    torch.manual_seed(0)
    rnn = torch.nn.RNN(2, 6)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.3)
    trials = trials_mod.try_remedies(rnn, torch.randn(30, 2, 2), remedies=["orthogonal_init", "switch_to_gru"])
    frag = trials_repr_html(trials)
    parse(frag)
    assert "orthogonal_init" in frag and "switch_to_gru" in frag
    if hasattr(trials, "_repr_html_"):
        parse(trials._repr_html_())
