"""``btkit report``: one self-contained HTML page per run directory or eval-judge JSON.

Fast tests make run directories with the scripted backend (every drop reason and a failed call,
hostile record text); the slow ones run three methods with the embedded model. The page is opened
in a real headless Chromium (Debian's ``/usr/bin/chromium``; skipped, saying why, where it is absent)
and the screenshot is checked by its pixels: the plots' colours are drawn, the section headings'
rules are there, the page is not blank.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from btkit.errors import BackendError
from btkit_plugins.results import report as rep

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it): the page is not rendered")

RUN_HEADINGS = ("Run overview", "Records through each stage", "Drops by reason", "Scores", "Instruction and response lengths",
                "Tokens, cost and time per stage", "Failures by kind", "Sample of kept and dropped records")
HOSTILE = 'What does <script>alert("x")</script> <img src=x onerror=alert(1)> list?'


# -- helpers ----------------------------------------------------------------------------------------
def screenshot(page: Path, out: Path, height: int = 3000) -> "np.ndarray":  # noqa: F821
    """Render ``page`` in headless Chromium (no network, no profile of its own left behind) and return the pixels (RGB floats)."""
    import matplotlib.image as mpimg

    profile = out.parent / f"{out.stem}-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           f"--window-size=1200,{height}", f"--screenshot={out}", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.exists(), f"chromium wrote no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    img = mpimg.imread(out)
    assert img.shape[0] == height and img.shape[1] == 1200, img.shape
    return img[..., :3]


def dump_dom(page: Path, tmp: Path) -> str:
    """The DOM Chromium built from the page (what a browser makes of it, not what we wrote)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'dom-profile'}",
           "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def colour_pixels(img, hex_colour: str, tol: float = 0.03) -> int:
    """How many pixels are ``hex_colour`` (within ``tol`` per channel)."""
    import numpy as np

    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb) <= tol).all(axis=-1).sum())


def heading_rules(img) -> int:
    """Section headings seen in the screenshot: horizontal rules of the heading colour, at least 600 px long, counted as bands."""
    import numpy as np

    rgb = np.array([int(rep.HEADING_RULE[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    rows = (np.abs(img - rgb) <= 0.03).all(axis=-1).sum(axis=1) >= 600
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def assert_page_is_rendered(img, colours: tuple[str, ...], min_headings: int) -> None:
    import numpy as np

    assert float(np.std(img)) > 0.05, "the screenshot is (nearly) one colour: a blank page"
    for colour in colours:
        least = 100 if colour == rep.THRESHOLD else 400  # a dashed line, not an area
        assert colour_pixels(img, colour) > least, f"no plot drawn in {colour} on the screenshot"
    assert heading_rules(img) >= min_headings, f"only {heading_rules(img)} section headings rendered"


def assert_self_contained(page: str) -> None:
    """Nothing to run or fetch at view time: no script, no element with ``src``, no external
    stylesheet or ``url(...)``, every link an anchor within the page (record text that looks like
    markup is escaped, so it is text, not a tag)."""
    from html.parser import HTMLParser

    tags: list[tuple[str, dict]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    Collect().feed(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "iframe", "img", "object", "embed", "image"}, names
    for tag, attrs in tags:
        assert "src" not in attrs, (tag, attrs)
        for key in ("href", "xlink:href"):
            assert attrs.get(key) is None or attrs[key].startswith("#"), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
    assert "@import" not in page
    assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", page)), "a url() outside the page"


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]*)</h2>", page)


# -- a run made with the scripted backend -------------------------------------------------------------
def reply_for(messages, params):
    """Keyed by document (units run concurrently): d0 kept (5), d1 below threshold (3), d2 an
    unparseable judgement, d3 a refused instruction, d4 a failed judge call, d5 kept (4) with hostile text."""
    content = messages[-1]["content"]
    judge = "Score: <rating>" in content
    for i, (instruction, verdict) in enumerate([
        ("What does the first list hold?", "Complete and helpful.\nScore: 5"),
        ("What does the second list hold?", "Partly useful.\nScore: 3"),
        ("What does the third list hold?", "I cannot decide on a rating."),
        ("Sorry, I cannot do that.", None),
        ("What does the fifth list hold?", BackendError("judge server returned HTTP 503", raw="<html>busy</html>")),
        (HOSTILE, "Fine.\nScore: 4"),
    ]):
        if words(1, i * 100) in content:
            if not judge:
                return instruction
            if isinstance(verdict, Exception):
                raise verdict
            return verdict
    raise AssertionError("unexpected prompt")


@pytest.fixture
def scripted_run(cli, scripted, tmp_path):
    backend, spec = scripted(default=reply_for)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, i * 100)} for i in range(6)])
    out = tmp_path / "run"
    r = cli("run", "humpback", corpus, "-o", out, "--model", spec, "--judge-mode", "rubric", "--threshold", "4", "-q")
    assert r.exit_code == 0, r.output
    return out


def test_report_of_a_scripted_run_has_every_section_and_the_runs_own_figures(cli, scripted_run):
    r = cli("report", scripted_run)
    assert r.exit_code == 0, r.output
    page_path = scripted_run / "report.html"
    assert f"wrote {page_path}" in r.output
    page = page_path.read_text(encoding="utf-8")
    assert headings(page) == list(RUN_HEADINGS)
    stats = json.loads((scripted_run / "stats.json").read_text())
    # stage labels and drop reasons come from the run
    for label in stats["stages"]:
        assert label in page
    for key in stats["dropped_by_reason"]:
        stage, _, reason = key.rpartition(":")
        assert f"{stage}: {reason}" in page
    assert "humpback.curate: below_threshold" in page and "humpback.augment: instruction_refusal" in page
    # the threshold the stage applied is drawn on the score histogram (SVG text stays text)
    assert "keep threshold 4" in page
    assert page.count("<svg") >= 6
    # failures by kind: the failed judge call, with its error and raw reply, escaped
    assert "humpback.curate: backend_error" in page and "HTTP 503" in page and "&lt;html&gt;busy&lt;/html&gt;" in page
    assert "unparseable reply (no_score)" in page
    # the sample shows kept and dropped records side by side, with lineage steps
    assert 'class="card kept"' in page and 'class="card dropped"' in page and "humpback/augment@" in page
    # hostile record text is escaped, never markup
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "<img src=x" not in page
    assert_self_contained(page)


def test_same_run_gives_the_same_page(cli, scripted_run, tmp_path):
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert cli("report", scripted_run, "-o", a).exit_code == 0
    assert cli("report", scripted_run, "-o", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_sample_size_and_seed(cli, scripted_run, tmp_path):
    out = tmp_path / "one.html"
    assert cli("report", scripted_run, "-o", out, "--sample", "1").exit_code == 0
    page = out.read_text()
    assert page.count('class="card kept"') == 1 and page.count('class="card dropped"') == 1
    assert cli("report", scripted_run, "-o", out, "--sample", "0").exit_code == 0
    assert "Sample of kept and dropped records" not in headings(out.read_text())


def test_dropped_sample_takes_each_reason_in_turn(scripted_run):
    ctx = rep.load_context(scripted_run, sample=4)
    reasons = {line["reason"] for line in ctx["summary"].dropped_sample()}
    assert reasons == {"below_threshold", "unparseable_score", "instruction_refusal", "backend_error"}


def test_unfinished_run_is_counted_from_its_journal(cli, scripted_run, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(scripted_run, copy)
    (copy / "stats.json").unlink()
    (copy / "data.jsonl").unlink()
    out = tmp_path / "u.html"
    r = cli("report", copy, "-o", out)
    assert r.exit_code == 0, r.output
    page = out.read_text()
    assert "This run is not finished" in page
    assert headings(page)[:3] == list(RUN_HEADINGS[:3])
    stats = json.loads((scripted_run / "stats.json").read_text())
    curate = stats["stages"]["humpback.curate"]
    assert f"<td>humpback.curate</td><td>{curate['in']}</td><td>{curate['out']}</td>" in page


def test_not_a_run_directory_is_one_line(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("report", tmp_path / "empty")
    assert r.exit_code != 0 and "not a run directory" in r.output
    (tmp_path / "x.json").write_text('{"a": 1}')
    r = cli("report", tmp_path / "x.json")
    assert r.exit_code != 0 and "eval-judge" in r.output


# -- sections are plugins -------------------------------------------------------------------------------
def test_sections_from_a_plugin_appear_in_order_and_a_broken_one_is_named(cli, registry, scripted_run, tmp_path):
    from btkit.hookspecs import hookimpl

    seen = {}

    class Sections:
        @hookimpl
        def btkit_register_report_sections(self, register):
            def mine(run_dir, context):
                seen["labels"] = context["labels"]
                return f"<p>records: {context['summary'].records}</p>"

            def broken(run_dir, context):
                raise RuntimeError("no <data> here")

            register("My section", mine, order=25)
            register("Broken section", broken, order=26)
            register("Nothing to say", lambda run_dir, context: None, order=27)

    registry.register(Sections(), name="report-sections-test")
    registry._report_sections = None  # loaded before this plugin joined
    out = tmp_path / "p.html"
    r = cli("report", scripted_run, "-o", out)
    assert r.exit_code == 0, r.output
    page = out.read_text()
    names = headings(page)
    assert names.index("Records through each stage") < names.index("My section") < names.index("Drops by reason")
    assert "Nothing to say" not in names
    assert "<p>records: 6</p>" in page and seen["labels"] == ["humpback.augment", "humpback.curate"]
    assert "This section failed: RuntimeError: no &lt;data&gt; here" in page
    assert names.count("Run overview") == 1  # the built-ins, registered by the plugin too, appear once


def test_collect_sections_without_a_registry_hook():
    class Old:  # a registry from before report sections existed
        pass

    assert rep.collect_sections(Old()) == sorted(rep.SECTIONS, key=lambda s: (s[2], s[0]))


# -- scores found wherever a stage put them ------------------------------------------------------------
def test_record_scores_reads_scores_thresholds_and_verdicts():
    meta = {"score": 3, "threshold": 4, "length_score": 0.8, "judge": {"verdict_mode": "logprob", "p_good": 0.7, "label_mass": 0.1},
            "grounding": {"mode": "overlap", "overlap": 0.4, "threshold": 0.3}, "drop_details": {"score": 3}, "pmi": 0.2}
    assert rep.record_scores(meta) == {"score": (3.0, 4.0), "length_score": (0.8, None), "judge.p_good": (0.7, 0.5),
                                       "grounding.overlap": (0.4, 0.3)}
    assert rep.record_scores({"score": float("nan"), "x": {"score": True}}) == {}


def test_a_run_read_from_its_files_alone_with_option_thresholds(cli, tmp_path):
    """No method is looked up: a stage this btkit has never heard of, its labels, reasons and a measure
    (``meta.gain``) thresholded by its ``min_gain`` option are all read from the run directory."""
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": {"model": "x:y", "stages": [
        {"method": "zeta", "stage": "ask", "options": {}}, {"method": "zeta", "stage": "gate", "options": {"min_gain": 0.25}}]}}))
    lines = []
    for i in range(40):
        gain = round(-0.5 + i * 0.03, 3)
        kept = gain >= 0.25
        lines.append({"id": f"u{i}", "source_id": f"s{i}", "unit_seq": i, "unit": f"s{i}", "status": "kept" if kept else "dropped",
                      "dropped_at": None if kept else "zeta.gate", "reason": None if kept else "low_gain",
                      "fields": {"instruction": f"Question {i}?", "response": words(10 + i)}, "meta": {"gain": gain},
                      "lineage": [{"step": f"u{i}/zeta.ask/0", "stage": "zeta.ask", "kind": "chat", "model": "x:y", "tokens": [5, 7]},
                                  {"step": f"u{i}/zeta.gate/1", "stage": "zeta.gate", "kind": "score_continuation", "model": "x:y", "tokens": [9, 0]}]})
    write_jsonl(out / "candidates.jsonl", lines)
    r = cli("report", out, "-o", tmp_path / "f.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "f.html").read_text()
    assert "zeta.ask → zeta.gate" in page and "zeta.gate: low_gain" in page
    assert "<td>zeta.gate</td><td>40</td><td>15</td><td>25</td>" in page  # counted from the journal (no stats.json)
    assert "<h3>gain</h3>" in page and "keep threshold 0.25 (keep &gt;=)" in page and "run.json: min_gain" in page
    assert rep.option_thresholds({"a": {"max_perplexity": 80, "min_words": None, "max_name": "x"}}) == {"perplexity": (80.0, "<=")}


# -- eval-judge JSON ---------------------------------------------------------------------------------
def test_roc_points_match_eval_judges_auc():
    from btkit_plugins.commands.eval_judge import roc_auc

    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 30)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [None if rng.random() < 0.15 else float(rng.randint(1, 6)) for _ in range(n)]
        pts = rep.roc_points(scores, labels)
        area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
        assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
        assert math.isclose(area, roc_auc(scores, labels), abs_tol=1e-9)
    assert rep.roc_points([1.0, 2.0], [1, 1]) == []


def gold_pairs(n):
    return [{"id": f"g{i}", "instruction": f"Q{i}: what is item {i}?", "response": f"A{i}_x item {i} is a thing with {i} parts."} for i in range(n)]


@pytest.fixture
def eval_json(cli, scripted, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", gold_pairs(6))

    def logprobs(messages, continuation):  # the response's own question makes it likelier
        n = len(continuation.split())
        if messages is None:
            return [-3.0] * n
        own = continuation.split()[0].split("_")[0][1:] in messages[-1]["content"].split(":")[0]
        return [(-2.0 if own else -3.5) - 0.01 * len(continuation)] * n

    backend, spec = scripted(continuation_logprobs=logprobs)
    out = tmp_path / "judge.json"
    r = cli("eval-judge", gold, "--judge-mode", "pmi", "--judge-mode", "ifd", "--model", spec, "--json", out)
    assert r.exit_code == 0, r.output
    return out


def test_report_of_eval_judge_json(cli, eval_json, tmp_path):
    r = cli("report", eval_json)
    assert r.exit_code == 0, r.output
    page = eval_json.with_suffix(".html").read_text()
    assert headings(page) == ["Judge evaluation", "ROC curve", "Score distributions per negative kind"]
    payload = json.loads(eval_json.read_text())
    for mode in payload["modes"]:
        assert f"<td>{mode['mode']}</td>" in page
        assert f"mode {mode['mode']}" in page  # its ROC panel and its distributions
        for kind in mode["negatives"]:
            assert f"{kind} (AUC" in page
    assert "all negatives (AUC" in page and page.count("<svg") == 3
    assert_self_contained(page)
    # one mode's report (what eval-judge writes for a single --judge-mode) works the same way
    single = tmp_path / "single.json"
    single.write_text(json.dumps(payload["modes"][0]))
    assert cli("report", single).exit_code == 0
    page = single.with_suffix(".html").read_text()
    assert headings(page) == ["Judge evaluation", "ROC curve", "Score distributions per negative kind"] and page.count("<svg") == 2


@needs_chromium
def test_eval_judge_page_in_chromium(cli, eval_json, tmp_path):
    out = tmp_path / "judge.html"
    assert cli("report", eval_json, "-o", out).exit_code == 0
    img = screenshot(out, tmp_path / "judge.png", height=2000)
    assert_page_is_rendered(img, (rep.BAR, rep.KEPT), min_headings=3)


@needs_chromium
def test_scripted_run_page_in_chromium(cli, scripted_run, tmp_path):
    assert cli("report", scripted_run).exit_code == 0
    page = scripted_run / "report.html"
    img = screenshot(page, tmp_path / "run.png")
    # funnel (in: BAR, out: KEPT), drops and failures (DROPPED), tokens out (SECOND), the threshold line
    assert_page_is_rendered(img, (rep.BAR, rep.KEPT, rep.DROPPED, rep.SECOND, rep.THRESHOLD), min_headings=5)
    dom = dump_dom(page, tmp_path)
    assert [h for h in re.findall(r"<h2>([^<]*)</h2>", dom)] == list(RUN_HEADINGS)
    assert dom.count("<svg") >= 6 and "<script" not in dom.replace("&lt;script", "")


# -- real runs with the embedded model, three methods ------------------------------------------------------
MODEL_RUNS = {
    "humpback": ["--seed", str(EXAMPLES / "seed.jsonl"), "--limit", "2"],
    "kun": ["--seed", str(EXAMPLES / "seed.jsonl"), "--limit", "2"],
    "air": ["--limit", "2", "-S", "augment.max_tokens=128", "--rounds", "1"],  # an instruction long enough to be scored
}


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    """One tiny run per method with the embedded SmolLM2 (about a minute each here), made once for the module."""
    base = tmp_path_factory.mktemp("model-runs")
    env = {**os.environ, "BTKIT_CACHE_DIR": str(base / "cache")}
    runs = {}
    for method, extra in MODEL_RUNS.items():
        out = base / method
        cmd = [sys.executable, "-m", "btkit.cli", "run", method, str(EXAMPLES / "corpus.jsonl"), "-o", str(out),
               "--max-tokens", "40", "-q", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[method] = out
    return runs


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("method", list(MODEL_RUNS))
def test_report_on_a_real_run(method, model_runs, tmp_path):
    run_dir = model_runs[method]
    out = tmp_path / f"{method}.html"
    r = subprocess.run([sys.executable, "-m", "btkit.cli", "report", str(run_dir), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = out.read_text(encoding="utf-8")
    stats = json.loads((run_dir / "stats.json").read_text())
    names = headings(page)
    for name in ("Run overview", "Records through each stage", "Tokens, cost and time per stage", "Failures by kind",
                 "Sample of kept and dropped records"):
        assert name in names
    if stats["dropped"]:
        assert "Drops by reason" in names
    # this method's own stages, in the run's order, with its counts
    labels = list(stats["stages"])
    assert labels[0].startswith(f"{method}.") and " → ".join(labels) in page
    for label, st in stats["stages"].items():
        assert f"<td>{label}</td><td>{st['in']}</td><td>{st['out']}</td>" in page
    for key in stats["dropped_by_reason"]:
        stage, _, reason = key.rpartition(":")
        assert f"{stage}: {reason}" in page
    # every score a stage recorded with its threshold gets a histogram with the threshold marked
    thresholds = {series: t for line in read_jsonl(run_dir / "candidates.jsonl")
                  for series, (_, t) in rep.record_scores(line.get("meta") or {}).items() if t is not None}
    for series, t in thresholds.items():
        assert f"<h3>{series}" in page and f"keep threshold {rep._fmt(t)}" in page
    assert_self_contained(page)
    if os.path.exists(CHROMIUM):
        img = screenshot(out, tmp_path / f"{method}.png", height=4000)
        drawn = (rep.BAR, rep.KEPT) + ((rep.DROPPED,) if stats["dropped"] else ()) + ((rep.THRESHOLD,) if thresholds else ())
        assert_page_is_rendered(img, drawn, min_headings=5)
        keep = os.environ.get("BTKIT_KEEP_SCREENSHOTS")
        if keep:  # to look at them: BTKIT_KEEP_SCREENSHOTS=/tmp/shots
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / f"{method}.png", Path(keep) / f"{method}.png")
