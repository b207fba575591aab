"""``btkit report``: one self-contained HTML page about a run directory or an ``eval-judge --json`` file.

The page holds everything it shows: plots are inline SVG made with matplotlib (figures drawn
without a display, imported only when a plot is drawn), styles are one inline ``<style>``, and there is no script, font, image or
link to fetch, so it opens offline and can be mailed or attached to an issue as one file.

What a run shows is read from the run itself, never from a table of methods: stage labels and their
order from ``stats.json`` (or ``run.json``'s stages while a run is unfinished, counted from the
journal with :func:`btkit.stats.journal_stats`), drop reasons and scores from ``candidates.jsonl``,
failures from ``failures.jsonl``. Scores are found wherever a stage put them in a record's meta: a
number under ``score`` or ``*_score``, at the top of ``meta`` or one dict down (Kun's ``judge.score``);
the keep threshold is the ``threshold`` the stage recorded beside it, else the stage's
``score_threshold``/``threshold`` option in ``run.json``.

Sections are plugins. Each is ``(name, render, order)`` with ``render(run_dir, context) -> str | None``
returning an HTML fragment (None: nothing to show for this input); :data:`SECTIONS` are the built-in
ones, and a plugin adds its own through the ``btkit_register_report_sections(register)`` hook. The
``context`` a section gets is described in :func:`load_context`; record text must be escaped with
``context["escape"]`` (``html.escape``). A section that raises is replaced by a note naming it, so
one broken plugin never costs the whole page.
"""

from __future__ import annotations

import collections
import html
import json
import math
import random
import sys
from pathlib import Path
from array import array
from typing import Any, Callable

import click

from btkit.kit.runfiles import iter_jsonl

#: Colours the plots use; the page's own styles use none of them (the tests look for them in a screenshot).
KEPT = "#2a9d8f"
DROPPED = "#e76f51"
BAR = "#3d5a80"
SECOND = "#ee9b00"
THRESHOLD = "#9b2226"
NEGATIVE_COLOURS = ("#e76f51", "#8338ec", "#ee9b00", "#3a86ff", "#6a994e")

#: How many kept and how many dropped records the sample section shows (``--sample``).
DEFAULT_SAMPLE = 6
#: Characters of a field or a raw completion shown in the sample before it is cut (the rest is counted).
TEXT_LIMIT = 1200

Render = Callable[[Path, dict[str, Any]], "str | None"]


# -- reading a run -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise click.ClickException(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def stage_labels(run: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """The run's stage labels in order: ``stats.json``'s, else ``run.json``'s ``method.stage`` list."""
    if isinstance(stats.get("stages"), dict) and stats["stages"]:
        return list(stats["stages"])
    stages = (run.get("fingerprint") or {}).get("stages") or []
    return [f"{s.get('method')}.{s.get('stage')}" for s in stages if isinstance(s, dict)]


def stage_options(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: options}`` from ``run.json`` (what the run was started with)."""
    out: dict[str, dict[str, Any]] = {}
    for s in (run.get("fingerprint") or {}).get("stages") or []:
        if isinstance(s, dict):
            out.setdefault(f"{s.get('method')}.{s.get('stage')}", dict(s.get("options") or {}))
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


#: Keys of a dict that records its own ``threshold`` whose number is the value compared with it
#: (TeGit's word-overlap grounding, say).
THRESHOLDED_VALUES = ("score", "overlap", "pmi", "gain")


def record_scores(meta: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """``{series: (score, threshold recorded beside it or None)}`` found in a record's meta.

    Found at the top of ``meta`` or one dict down (named ``parent.key``; ``drop_details`` is skipped,
    it repeats the score): a number under ``score`` or a key ending in ``_score``; in a dict with its
    own numeric ``threshold``, the value compared with it (:data:`THRESHOLDED_VALUES`); in a yes/no
    verdict of :mod:`btkit.kit.verdict` (a dict with ``verdict_mode``), its ``p_<label>``, kept at
    p >= 0.5 (Kun's ``judge.p_good``).
    """
    found: dict[str, tuple[float, float | None]] = {}

    def scan(d: dict[str, Any], prefix: str) -> None:
        own = _number(d.get("threshold"))
        for key, value in d.items():
            if key == "drop_details":
                continue
            if isinstance(value, dict) and not prefix:
                scan(value, f"{key}.")
                continue
            v = _number(value)
            if v is None:
                continue
            if key == "score" or key.endswith("_score"):
                found[prefix + key] = (v, own if key == "score" else None)
            elif prefix and own is not None and key in THRESHOLDED_VALUES:
                found[prefix + key] = (v, own)
            elif prefix and "verdict_mode" in d and key.startswith("p_"):
                found[prefix + key] = (v, 0.5)

    scan(meta, "")
    return found


#: Measures stages record at the top of ``meta`` under these names (the kit's ROUGE-L, likelihood
#: gain, perplexity) are plotted like scores, without a threshold unless an option gives one.
METRIC_KEYS = ("rouge_l", "gain", "perplexity")


def option_thresholds(options: dict[str, dict[str, Any]]) -> dict[str, tuple[float, str]]:
    """``{meta key: (threshold, ">=" or "<=")}`` from numeric ``min_KEY``/``max_KEY`` stage options in
    run.json (``--min-gain 0.1`` keeps ``meta.gain >= 0.1``; ``--max-perplexity`` keeps ``meta.perplexity <=``)."""
    out: dict[str, tuple[float, str]] = {}
    for opts in options.values():
        for key, value in opts.items():
            if key.startswith(("min_", "max_")) and (v := _number(value)) is not None:
                out.setdefault(key[4:], (v, ">=" if key.startswith("min_") else "<="))
    return out


def measured(meta: dict[str, Any], linked: dict[str, tuple[float, str]]) -> dict[str, tuple[float, float | None]]:
    """:func:`record_scores` plus the top-level measures of :data:`METRIC_KEYS` and those an option thresholds."""
    found = record_scores(meta)
    for key in (*METRIC_KEYS, *linked):
        if key not in found and (v := _number(meta.get(key))) is not None:
            found[key] = (v, linked[key][0] if key in linked else None)
    return found


def _words(text: Any) -> int | None:
    return len(text.split()) if isinstance(text, str) else None


class Summary:
    """What the report needs from ``candidates.jsonl``, gathered in one pass with bounded memory
    (lengths and scores are numbers; the record sample is a seeded reservoir)."""

    def __init__(self, sample: int = DEFAULT_SAMPLE, seed: int = 0, linked: dict[str, tuple[float, str]] | None = None):
        self.sample_size = sample
        #: Meta keys a stage option thresholds (:func:`option_thresholds`).
        self.linked = dict(linked or {})
        self.rng = random.Random(seed)
        self.records = 0
        self.status: collections.Counter = collections.Counter()
        self.reasons: collections.Counter = collections.Counter()  # "stage: reason"
        #: ``{field: {"kept": [words...], "dropped": [...]}}`` for instruction and response.
        self.lengths: dict[str, dict[str, list[int]]] = {}
        #: ``{series: {"kept": [...], "dropped": [...], "thresholds": Counter, "stages": Counter}}``.
        self.scores: dict[str, dict[str, Any]] = {}
        self.keep_top_cutoffs: collections.Counter = collections.Counter()
        self.kept_seen = 0
        self.kept_sample: list[dict[str, Any]] = []
        self.dropped_by_reason: dict[str, list[dict[str, Any]]] = {}
        self.dropped_seen: collections.Counter = collections.Counter()

    def add(self, line: dict[str, Any]) -> None:
        self.records += 1
        status = "kept" if line.get("status") == "kept" else "dropped"
        self.status[status] += 1
        fields = line.get("fields") if isinstance(line.get("fields"), dict) else {}
        meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
        reason = None
        if status == "dropped":
            reason = f"{line.get('dropped_at') or '?'}: {line.get('reason') or '?'}"
            self.reasons[reason] += 1
            details = meta.get("drop_details") or {}
            if line.get("reason") == "below_keep_top" and _number(details.get("cutoff")) is not None:
                self.keep_top_cutoffs[float(details["cutoff"])] += 1
        for name in ("instruction", "response"):
            n = _words(fields.get(name))
            if n is not None:
                self.lengths.setdefault(name, {"kept": array("l"), "dropped": array("l")})[status].append(n)
        for series, (value, threshold) in measured(meta, self.linked).items():
            s = self.scores.setdefault(series, {"kept": array("d"), "dropped": array("d"), "thresholds": collections.Counter(),
                                                "stages": collections.Counter()})
            s[status].append(value)
            if threshold is not None:
                s["thresholds"][threshold] += 1
            if meta.get("scored_by") and series == "score":
                s["stages"][meta["scored_by"]] += 1
        self._sample(line, status, reason)

    def _sample(self, line: dict[str, Any], status: str, reason: str | None) -> None:
        k = self.sample_size
        if k <= 0:
            return
        if status == "kept":
            self.kept_seen += 1
            _reservoir(self.kept_sample, line, self.kept_seen, k, self.rng)
        else:
            self.dropped_seen[reason] += 1
            _reservoir(self.dropped_by_reason.setdefault(reason, []), line, self.dropped_seen[reason], k, self.rng)

    def dropped_sample(self) -> list[dict[str, Any]]:
        """Up to ``sample`` dropped records, taken in turn from each reason (commonest first)."""
        queues = [list(self.dropped_by_reason[r]) for r, _ in self.reasons.most_common() if r in self.dropped_by_reason]
        out: list[dict[str, Any]] = []
        while len(out) < self.sample_size and any(queues):
            for q in queues:
                if q and len(out) < self.sample_size:
                    out.append(q.pop(0))
        return out


def _reservoir(bucket: list[Any], item: Any, seen: int, k: int, rng: random.Random) -> None:
    if len(bucket) < k:
        bucket.append(item)
    else:
        j = rng.randrange(seen)
        if j < k:
            bucket[j] = item


def load_context(path: Path, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> dict[str, Any]:
    """What every section gets. Keys:

    - ``kind``: ``"run"`` (a run directory) or ``"eval_judge"`` (an ``eval-judge --json`` file);
    - ``path``: what the report was made from;
    - ``escape``: :func:`html.escape`; ``svg(fig)``: a matplotlib figure as an inline ``<svg>`` (closes it);
      ``pyplot()``: ``matplotlib.pyplot`` with the Agg backend; ``table(header, rows)``: an HTML table
      (cells escaped unless they are :class:`Markup`); ``colours``: the palette;
    - for a run: ``run`` (run.json), ``stats`` (stats.json, or counted from the journal while the run
      is unfinished), ``complete`` (bool), ``labels`` (stage labels in order), ``stage_options``,
      ``summary`` (:class:`Summary`), ``iter_failures()`` (a pass over failures.jsonl) and
      ``iter_candidates()`` (a fresh pass over candidates.jsonl);
    - for eval-judge: ``results`` (one report dict per judge mode).
    """
    ctx: dict[str, Any] = {"path": path, "escape": html.escape, "svg": svg, "pyplot": pyplot, "table": table,
                           "colours": {"kept": KEPT, "dropped": DROPPED, "bar": BAR, "second": SECOND, "threshold": THRESHOLD}}
    if path.is_file():
        payload = _read_json(path)
        results = payload.get("modes") if isinstance(payload.get("modes"), list) else [payload]
        if not results or not all(isinstance(r, dict) and "item_scores" in r for r in results):
            raise click.ClickException(f"{path}: neither a run directory nor a 'btkit eval-judge --json' report (no item_scores)")
        ctx.update(kind="eval_judge", results=results)
        return ctx
    if not path.is_dir():
        raise click.ClickException(f"{path}: no such run directory or eval-judge JSON file")
    journal = path / "candidates.jsonl"
    if not journal.exists() and not (path / "run.json").exists():
        raise click.ClickException(f"{path}: not a run directory (no candidates.jsonl or run.json)")
    run = _read_json(path / "run.json")
    stats = _read_json(path / "stats.json")
    complete = (path / "data.jsonl").exists() and bool(stats)
    if not stats and journal.exists():
        from btkit.stats import journal_stats

        labels = stage_labels(run, {})
        try:
            stats = {"status": "unfinished", "model": (run.get("fingerprint") or {}).get("model"), **journal_stats(journal, labels)}
        except Exception as e:  # noqa: BLE001 (a damaged journal: show what the records give)
            stats = {"status": f"unfinished (journal not countable: {e})"}
    summary = Summary(sample, seed, linked=option_thresholds(stage_options(run)))
    for line in iter_jsonl(journal):
        summary.add(line)
    ctx.update(kind="run", run=run, stats=stats, complete=complete, labels=stage_labels(run, stats),
               stage_options=stage_options(run), summary=summary, iter_failures=lambda: iter_jsonl(path / "failures.jsonl"),
               iter_candidates=lambda: iter_jsonl(journal))
    return ctx


# -- HTML and plot helpers -----------------------------------------------------------------------
class Markup(str):
    """A string that is already HTML (not escaped again by :func:`table`)."""


def _cell(value: Any) -> str:
    if isinstance(value, Markup):
        return str(value)
    if isinstance(value, float):
        return html.escape(_fmt(value))
    return html.escape("" if value is None else str(value))


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x.is_integer() and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.{nd}g}" if abs(x) < 1e-3 or abs(x) >= 1e6 else f"{round(x, nd)}"
    return str(x)


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are :class:`Markup` (no header row when ``header`` is empty)."""
    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


def pyplot():
    """``matplotlib.pyplot`` for sections that like it, on the Agg backend (no display) unless the
    process chose a backend before (a notebook's is left alone). The built-in plots use
    :class:`matplotlib.figure.Figure` directly: no global figure state."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_SVG_COUNT = [0]


def svg(fig: Any, alt: str = "") -> str:
    """``fig`` as an inline ``<svg>`` element (text kept as text; ids unique within the page); closes ``fig``."""
    import io

    import matplotlib

    _SVG_COUNT[0] += 1
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"btkit-report-{_SVG_COUNT[0]}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    if "matplotlib.pyplot" in sys.modules:  # a figure a section made with pyplot is released
        sys.modules["matplotlib.pyplot"].close(fig)
    text = buf.getvalue()
    start = text.find("<svg")
    label = f' role="img" aria-label="{html.escape(alt)}"' if alt else ""
    return f'<div class="plot"{label}>{text[start:]}</div>'


def _figure(width: float = 7.5, height: float = 3.2, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    for ax in axes[0]:
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return fig, list(axes[0])


def _short(label: str, n: int = 48) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _barh(pairs: list[tuple[str, float]], xlabel: str, colour: str = BAR, alt: str = "") -> str:
    height = max(1.4, 0.38 * len(pairs) + 0.8)
    fig, (ax,) = _figure(7.5, height)
    labels = [_short(k) for k, _ in pairs][::-1]
    values = [v for _, v in pairs][::-1]
    ax.barh(range(len(values)), values, color=colour)
    ax.set_yticks(range(len(values)), labels)
    ax.set_xlabel(xlabel)
    for i, v in enumerate(values):
        ax.text(v, i, f" {_fmt(float(v))}", va="center", fontsize=8)
    return svg(fig, alt)


# -- run sections --------------------------------------------------------------------------------
def render_overview(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    stats, run, esc = ctx["stats"], ctx["run"], html.escape
    fp = run.get("fingerprint") or {}
    stages = fp.get("stages") or [{"method": l.split(".")[0], "stage": l.partition(".")[2], "options": {}} for l in ctx["labels"]]
    rows = [
        ["status", stats.get("status") or ("complete" if ctx["complete"] else "unfinished")],
        ["method / stages", ", ".join(f"{s.get('method')}.{s.get('stage')}" for s in stages)],
        ["model", stats.get("model") or fp.get("model")],
        ["input", stats.get("input") or (fp.get("input") or {}).get("path")],
        ["records (kept / dropped)", f"{stats.get('records', ctx['summary'].records)} "
                                    f"({stats.get('kept', ctx['summary'].status['kept'])} / {stats.get('dropped', ctx['summary'].status['dropped'])})"],
        ["units (input documents)", stats.get("units")],
        ["model calls (failed)", f"{stats.get('calls', '-')} ({stats.get('failed_calls', 0)})"],
        ["tokens in / out", f"{stats.get('tokens_in', '-')} / {stats.get('tokens_out', '-')}"],
        ["cost (USD)", stats.get("cost_usd")],
        ["paid over every invocation (spent.json, USD)", _number(_read_json(run_dir / "spent.json").get("cost_usd")) if run_dir.is_dir() else None],
        ["wall time (s)", stats.get("wall_time_s", run.get("elapsed_s"))],
        ["btkit", stats.get("btkit") or fp.get("btkit")],
    ]
    shards = stats.get("shards") if isinstance(stats.get("shards"), dict) else None
    if shards:  # a merged run: its wall time is the merge's, each shard's is its own
        rows.insert(-1, ["shards (active time of each, s)", f"{shards.get('count')}: "
                         + ", ".join(_fmt(t) for t in shards.get("elapsed_s") or [])])
    if run.get("command"):
        rows.append(["command", " ".join(str(a) for a in run["command"])])
    # run-wide options reach every stage: shown once, then what each stage has of its own
    all_opts = [s.get("options") or {} for s in stages]
    common = {k: v for k, v in (all_opts[0] if all_opts else {}).items() if all(o.get(k, object()) == v for o in all_opts[1:])}
    options = [["every stage", Markup(esc(json.dumps(common, sort_keys=True)))]] if common and len(stages) > 1 else []
    for s, opts in zip(stages, all_opts):
        own = {k: v for k, v in opts.items() if k not in common or len(stages) == 1}
        if own:
            options.append([f"{s.get('method')}.{s.get('stage')}", Markup(esc(json.dumps(own, sort_keys=True)))])
    out = table([], [[k, v] for k, v in rows if v is not None], "kv")
    if options:
        out += "<h3>Stage options</h3>" + table(["stage", "options"], options)
    if not ctx["complete"]:
        out = '<p class="note">This run is not finished (no data.jsonl): counts come from its journal so far.</p>' + out
    return out


def render_funnel(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    stages = (ctx["stats"].get("stages") or {})
    labels = [l for l in ctx["labels"] if l in stages]
    if not labels:
        return None
    preparing = sum((ctx["stats"].get("dropped_while_preparing") or {}).values())
    rows, bars = [], []
    units = ctx["stats"].get("units")
    if units is not None:
        bars.append(("input units", float(units), float(units)))
    for label in labels:
        st = stages[label]
        dropped = sum((st.get("dropped") or {}).values())
        at_end = sum((st.get("dropped_at_end") or {}).values())
        rows.append([label, st.get("in", 0), st.get("out", 0), dropped, at_end or ""])
        bars.append((label, float(st.get("in", 0)), float(st.get("out", 0))))
    kept = ctx["stats"].get("kept", ctx["summary"].status["kept"])
    bars.append(("kept", float(kept), float(kept)))
    fig, (ax,) = _figure(7.5, max(1.6, 0.5 * len(bars) + 0.9))
    ys = list(range(len(bars)))[::-1]
    ax.barh([y + 0.18 for y in ys], [b[1] for b in bars], height=0.36, color=BAR, label="in")
    ax.barh([y - 0.18 for y in ys], [b[2] for b in bars], height=0.36, color=KEPT, label="out")
    for y, b in zip(ys, bars):
        ax.text(b[1], y + 0.18, f" {int(b[1])}", va="center", fontsize=8)
        ax.text(b[2], y - 0.18, f" {int(b[2])}", va="center", fontsize=8)
    ax.set_yticks(ys, [_short(b[0]) for b in bars])
    ax.set_xlabel("records")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    note = (f'<p class="note">{preparing} record(s) were dropped while units were prepared, before any stage.</p>'
            if preparing else "")
    return (svg(fig, "records in and out of each stage")
            + '<p class="note">A stage can make several records from one (candidates), so <i>out</i> may exceed <i>in</i>.</p>'
            + note + table(["stage", "in", "out", "dropped", "dropped at end of run"], rows))


def render_drops(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    reasons: collections.Counter = collections.Counter()
    for key, n in (ctx["stats"].get("dropped_by_reason") or {}).items():
        stage, _, reason = key.rpartition(":")
        reasons[f"{stage}: {reason}"] += n
    if not reasons:
        reasons = ctx["summary"].reasons
    if not reasons:
        return f'<p class="note">{"No record was dropped." if ctx["summary"].records else "The journal holds no record yet."}</p>'
    pairs = [(k, float(v)) for k, v in reasons.most_common()]
    return _barh(pairs, "records dropped", DROPPED, "drops by reason") + table(["stage: reason", "records"], [[k, int(v)] for k, v in pairs])


def _threshold(series: str, s: dict[str, Any], ctx: dict[str, Any]) -> tuple[float | None, str]:
    """The keep threshold of a score series and where it came from."""
    linked = ctx["summary"].linked
    if series in linked:
        value, keep = linked[series]
        return value, f"run.json: {'min' if keep == '>=' else 'max'}_{series}"
    if s["thresholds"]:
        value, _ = s["thresholds"].most_common(1)[0]
        return value, "recorded with the scores"
    stages = list(s["stages"]) or list(ctx["stage_options"])
    for label in stages:
        opts = ctx["stage_options"].get(label) or {}
        for key in ("score_threshold", "threshold"):
            if _number(opts.get(key)) is not None and (series == "score" or len(ctx["stage_options"]) == 1):
                return float(opts[key]), f"run.json: {label} {key}"
    return None, ""


def render_scores(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    scores = ctx["summary"].scores
    if not scores:
        return '<p class="note">No record carries a score.</p>'
    out = []
    for series, s in sorted(scores.items(), key=lambda kv: (kv[0] != "score", kv[0])):
        values = s["kept"] + s["dropped"]
        threshold, source = _threshold(series, s, ctx)
        fig, (ax,) = _figure(7.5, 3.0)
        lo, hi = min(values), max(values)
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
        integral = all(float(v).is_integer() for v in values)
        if integral and hi - lo <= 20:
            bins = [x - 0.5 for x in range(int(lo), int(hi) + 2)]
        else:
            n = min(30, max(5, int(math.sqrt(len(values))) + 1))
            bins = [lo + (hi - lo) * i / n for i in range(n + 1)] if hi > lo else [lo - 0.5, lo + 0.5]
        ax.hist([list(s["kept"]), list(s["dropped"])], bins=bins, stacked=True, color=[KEPT, DROPPED], label=[f"kept ({len(s['kept'])})", f"dropped ({len(s['dropped'])})"])
        if threshold is not None:
            keep = ctx["summary"].linked[series][1] if series in ctx["summary"].linked else ">="
            ax.axvline(threshold, color=THRESHOLD, linestyle="--", linewidth=2, label=f"keep threshold {_fmt(threshold)} (keep {keep})")
        for cutoff in ctx["summary"].keep_top_cutoffs if series == "score" else ():
            ax.axvline(cutoff, color=THRESHOLD, linestyle=":", linewidth=2, label=f"keep-top cutoff {_fmt(cutoff)}")
        ax.set_xlabel(series)
        ax.set_ylabel("records")
        ax.legend(fontsize=8, frameon=False)
        stages = ", ".join(s["stages"]) if s["stages"] else ""
        caption = f"<h3>{html.escape(series)}{' (' + html.escape(stages) + ')' if stages else ''}</h3>"
        where = f" (threshold from {html.escape(source)})" if source else " (no keep threshold recorded for this score)"
        out.append(caption + svg(fig, f"histogram of {series}") + f'<p class="note">{len(values)} scored records; '
                   f"min {_fmt(min(values))}, max {_fmt(max(values))}{where}.</p>")
    return "".join(out)


def render_lengths(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    lengths = ctx["summary"].lengths
    names = [n for n in ("instruction", "response") if n in lengths]
    if not names:
        return None
    fig, axes = _figure(4.0 * len(names), 3.0, len(names))
    rows = []
    for ax, name in zip(axes, names):
        d = lengths[name]
        both = d["kept"] + d["dropped"]
        bins = min(30, max(5, int(math.sqrt(len(both))) + 1))
        ax.hist([list(d["kept"]), list(d["dropped"])], bins=bins, stacked=True, color=[KEPT, DROPPED], label=["kept", "dropped"])
        ax.set_xlabel(f"{name} length (words)")
        ax.set_ylabel("records")
        ax.legend(fontsize=8, frameon=False)
        for status in ("kept", "dropped"):
            v = sorted(d[status])
            if v:
                rows.append([name, status, len(v), v[0], v[len(v) // 2], v[-1], round(sum(v) / len(v), 1)])
    return svg(fig, "instruction and response lengths") + table(["field", "records", "n", "min", "median", "max", "mean"], rows)


def render_usage(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    stages = ctx["stats"].get("stages") or {}
    labels = [l for l in ctx["labels"] if l in stages]
    if not labels:
        return None
    rows = []
    time_keys = ("time_s", "seconds", "wall_time_s", "elapsed_s")
    has_time = any(any(k in stages[l] for k in time_keys) for l in labels)
    for label in labels:
        st = stages[label]
        row = [label, st.get("calls", 0), st.get("cache_hits", 0), st.get("failed_calls", 0), st.get("requests_sent", ""),
               st.get("tokens_in", 0), st.get("tokens_out", 0), round(float(st.get("cost_usd") or 0.0), 6)]
        if has_time:
            row.append(next((st[k] for k in time_keys if k in st), ""))
        rows.append(row)
    header = ["stage", "calls", "cache hits", "failed", "requests sent", "tokens in", "tokens out", "cost (USD)"] + (["time (s)"] if has_time else [])
    fig, (ax,) = _figure(7.5, max(1.6, 0.5 * len(labels) + 0.9))
    ys = list(range(len(labels)))[::-1]
    tin = [float(stages[l].get("tokens_in", 0)) for l in labels]
    tout = [float(stages[l].get("tokens_out", 0)) for l in labels]
    ax.barh(ys, tin, color=BAR, label="tokens in")
    ax.barh(ys, tout, left=tin, color=SECOND, label="tokens out")
    ax.set_yticks(ys, [_short(l) for l in labels])
    ax.set_xlabel("tokens")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    stats = ctx["stats"]
    total = (f'<p class="note">Whole run: {stats.get("calls", "-")} calls, {stats.get("tokens_in", "-")} tokens in, '
             f'{stats.get("tokens_out", "-")} out, cost {html.escape(_fmt(stats.get("cost_usd")))} USD, '
             f'wall time {html.escape(_fmt(stats.get("wall_time_s", ctx["run"].get("elapsed_s"))))} s'
             + ("" if has_time else " (the run records no time per stage)") + ".</p>")
    return svg(fig, "tokens per stage") + total + table(header, rows)


def _failure_kind(line: dict[str, Any]) -> str:
    error = str(line.get("error") or "")
    head = error.split(":", 1)[0].strip() if error else ""
    return f"{line.get('stage') or '?'}: {line.get('reason') or '?'}" + (f" ({_short(head, 40)})" if head else "")


def render_failures(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    kinds: collections.Counter = collections.Counter()
    examples = {}  # the first failure of each kind
    for f in ctx["iter_failures"]():
        kind = _failure_kind(f)
        kinds[kind] += 1
        if kind not in examples:
            examples[kind] = [kind, f.get("id"), _clip(str(f.get("error") or "")), _clip(str(f.get("raw") or ""), 300)]
    parse: collections.Counter = collections.Counter()
    for label, st in (ctx["stats"].get("stages") or {}).items():
        for reason, n in (st.get("parse_failures") or {}).items():
            parse[f"{label}: unparseable reply ({reason})"] += n
    if not kinds and not parse:
        return '<p class="note">No model call failed and every reply parsed.</p>'
    pairs = [(k, float(v)) for k, v in (kinds + parse).most_common()]
    out = _barh(pairs, "count", DROPPED, "failures by kind")
    out += table(["kind", "count"], [[k, int(v)] for k, v in pairs])
    if examples:
        out += "<h3>One failure of each kind</h3>" + table(["kind", "record", "error", "raw reply"], list(examples.values()))
    if parse:
        out += ('<p class="note">Unparseable replies are counted per call (retried calls included); a record is dropped only '
                "when its last attempt fails.</p>")
    return out


def _clip(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more characters]"


def _value_html(value: Any) -> str:
    if isinstance(value, str):
        return f"<pre>{html.escape(_clip(value))}</pre>"
    return f"<code>{html.escape(_clip(json.dumps(value, ensure_ascii=False, default=str), 600))}</code>"


def record_card(line: dict[str, Any]) -> str:
    """One record with its fields, scores and lineage, every text escaped."""
    esc = html.escape
    status = "kept" if line.get("status") == "kept" else "dropped"
    head = f'<div class="card {status}"><div class="rid">{esc(str(line.get("id")))} <span class="src">source {esc(str(line.get("source_id")))}</span></div>'
    if status == "dropped":
        head += f'<div class="why">dropped at <b>{esc(str(line.get("dropped_at")))}</b>: <b>{esc(str(line.get("reason")))}</b></div>'
    fields = line.get("fields") if isinstance(line.get("fields"), dict) else {}
    order = [k for k in ("system", "instruction", "input", "response") if k in fields] + [k for k in fields if k not in ("system", "instruction", "input", "response")]
    body, shown = "", {}
    for k in order:
        value = fields[k]
        same = next((name for name, v in shown.items() if isinstance(value, str) and len(value) > 40 and v == value), None)
        inner = f'<p class="note">(same as {esc(same)})</p>' if same else _value_html(value)
        body += f'<div class="field"><span class="fname">{esc(k)}</span>{inner}</div>'
        shown[k] = value
    meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
    scores = record_scores(meta)
    if scores:
        body += '<div class="scores">' + ", ".join(f"{esc(k)} = {esc(_fmt(v))}" + (f" (threshold {esc(_fmt(t))})" if t is not None else "")
                                                  for k, (v, t) in scores.items()) + "</div>"
    plain = {k: v for k, v in meta.items() if k != "drop_details" and not isinstance(v, (dict, list))}
    if plain:
        body += (f'<details class="meta"><summary>meta ({len(plain)} values)</summary>'
                 + table([], [[k, _fmt(v) if isinstance(v, float) else _clip(str(v), 300)] for k, v in plain.items()]) + "</details>")
    details = meta.get("drop_details")
    if details:
        body += f'<div class="field"><span class="fname">drop details</span>{_value_html(details)}</div>'
    steps = line.get("lineage") or []
    if steps:
        items = []
        for st in steps:
            if not isinstance(st, dict):
                continue
            label = " · ".join(str(x) for x in (st.get("stage"), st.get("kind"), st.get("model")) if x)
            tmpl = f"{st.get('template')}@{str(st.get('template_hash') or '')[:10]}" if st.get("template") else ""
            flags = []
            if st.get("cached"):
                flags.append("cached")
            if st.get("tokens"):
                flags.append(f"tokens {st['tokens'][0]}/{st['tokens'][1]}" if isinstance(st["tokens"], list) and len(st["tokens"]) == 2 else "")
            if st.get("attempt"):
                flags.append(f"retry {st['attempt']}")
            if st.get("error"):
                flags.append("failed")
            inner = ""
            if st.get("raw") is not None:
                inner += f'<div class="field"><span class="fname">raw</span>{_value_html(st["raw"])}</div>'
            if "parsed" in st:
                inner += f'<div class="field"><span class="fname">parsed</span>{_value_html(st["parsed"])}</div>'
            if st.get("parse_error"):
                inner += f'<div class="field"><span class="fname">parse error</span>{_value_html(st["parse_error"] + (": " + st["parse_error_detail"] if st.get("parse_error_detail") else ""))}</div>'
            if st.get("error"):
                inner += f'<div class="field"><span class="fname">error</span>{_value_html(st["error"])}</div>'
            summary = esc(" ".join(x for x in (label, tmpl, *[f for f in flags if f]) if x))
            items.append(f"<li><details><summary>{summary}</summary>{inner}</details></li>")
        body += f'<div class="lineage"><span class="fname">lineage ({len(items)} step{"s" if len(items) != 1 else ""})</span><ol>{"".join(items)}</ol></div>'
    return head + body + "</div>"


def render_samples(run_dir: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "run":
        return None
    summary: Summary = ctx["summary"]
    if summary.sample_size <= 0 or not summary.records:
        return None
    kept, dropped = summary.kept_sample, summary.dropped_sample()
    left = "".join(record_card(r) for r in kept) or '<p class="note">No record was kept.</p>'
    right = "".join(record_card(r) for r in dropped) or '<p class="note">No record was dropped.</p>'
    return (f'<p class="note">A seeded random sample: up to {summary.sample_size} kept records, and up to {summary.sample_size} dropped ones '
            "taken in turn from each drop reason. Open a lineage step to see its raw reply and what was parsed from it.</p>"
            f'<div class="sides"><div class="side"><h3>Kept ({summary.status["kept"]})</h3>{left}</div>'
            f'<div class="side"><h3>Dropped ({summary.status["dropped"]})</h3>{right}</div></div>')


# -- eval-judge sections -------------------------------------------------------------------------
def roc_points(scores: list[float | None], labels: list[int]) -> list[tuple[float, float]]:
    """ROC curve points ``(false positive rate, true positive rate)`` from the top score down; ties
    move together, and unscored items (None) rank below every number, as eval-judge counts them."""
    pos = sum(1 for l in labels if l == 1)
    neg = len(labels) - pos
    if not pos or not neg:
        return []
    keyed = sorted(zip(scores, labels), key=lambda sl: -math.inf if sl[0] is None else sl[0], reverse=True)
    points = [(0.0, 0.0)]
    tp = fp = 0
    i = 0
    while i < len(keyed):
        value = keyed[i][0]
        while i < len(keyed) and keyed[i][0] == value:
            tp += keyed[i][1] == 1
            fp += keyed[i][1] != 1
            i += 1
        points.append((fp / neg, tp / pos))
    return points


def _mode_name(r: dict[str, Any]) -> str:
    mode = r.get("mode")
    return ", ".join(mode) if isinstance(mode, list) else str(mode)


def render_eval_summary(path: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "eval_judge":
        return None
    results = ctx["results"]
    first = results[0]
    negs = ", ".join(f"{k} {v}" for k, v in (first.get("negatives") or {}).items())
    intro = (f"<p>Judge <b>{html.escape(str(first.get('method_stage')))}</b> with model <code>{html.escape(str(first.get('model')))}</code> "
             f"on {html.escape(str(first.get('gold')))}: {first.get('pairs')} gold pairs, {first.get('items')} items (negatives: {html.escape(negs)}).</p>")
    rows = []
    for r in results:
        rule = (f"top {_fmt(r.get('keep_top'))}% (score ≥ {_fmt(r.get('keep_top_cutoff'))})" if r.get("keep_top") is not None
                else f"score ≥ {_fmt(r.get('threshold'))}")
        rows.append([_mode_name(r), r.get("auc"), r.get("auc_scored_only"), r.get("precision"), r.get("recall"), rule,
                     f"{r.get('scored')}/{r.get('items')}", r.get("seconds_per_item"),
                     ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("auc_by_negative") or {}).items())])
    return intro + table(["mode", "AUC", "AUC (scored only)", "precision", "recall", "keep rule", "scored", "s/item", "AUC by negative kind"], rows)


def _kinds(r: dict[str, Any]) -> list[str]:
    return [k for k in dict.fromkeys(it.get("kind") for it in r["item_scores"]) if k and k != "gold"]


def render_roc(path: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "eval_judge":
        return None
    results = ctx["results"]
    fig, axes = _figure(4.2 * min(len(results), 3), 4.0, min(len(results), 3))
    drawn = False
    for ax, r in zip(axes, results):
        items = r["item_scores"]
        pts = roc_points([it.get("score") for it in items], [int(it.get("label", 0)) for it in items])
        if pts:
            drawn = True
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=BAR, linewidth=2.5, label=f"all negatives (AUC {_fmt(r.get('auc'))})")
        for colour, kind in zip(NEGATIVE_COLOURS, _kinds(r)):
            sub = [it for it in items if it.get("kind") in ("gold", kind)]
            p = roc_points([it.get("score") for it in sub], [int(it.get("label", 0)) for it in sub])
            if p:
                ax.plot([x[0] for x in p], [x[1] for x in p], color=colour, linewidth=1.5, linestyle="--",
                        label=f"{kind} (AUC {_fmt((r.get('auc_by_negative') or {}).get(kind))})")
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"mode {_mode_name(r)}", fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    if not drawn:
        return '<p class="note">No ROC curve: the items hold only one class.</p>'
    return svg(fig, "ROC curves") + ('<p class="note">Only the first three modes are drawn.</p>' if len(results) > 3 else "")


def render_eval_distributions(path: Path, ctx: dict[str, Any]) -> str | None:
    if ctx["kind"] != "eval_judge":
        return None
    out = []
    for r in ctx["results"]:
        items = r["item_scores"]
        kinds = ["gold", *_kinds(r)]
        series = {k: [float(it["score"]) for it in items if it.get("kind") == k and _number(it.get("score")) is not None] for k in kinds}
        unscored = {k: sum(1 for it in items if it.get("kind") == k and _number(it.get("score")) is None) for k in kinds}
        values = [v for s in series.values() for v in s]
        rows = [[k, len(series[k]), unscored[k], *(_quartiles(series[k]))] for k in kinds]
        head = f"<h3>mode {html.escape(_mode_name(r))}</h3>"
        if not values:
            out.append(head + '<p class="note">No item got a score.</p>' + table(["kind", "scored", "unscored", "min", "median", "max"], rows))
            continue
        fig, axes = _figure(3.2 * len(kinds), 2.8, len(kinds))
        lo, hi = min(values), max(values)
        threshold = r.get("keep_top_cutoff") if r.get("keep_top") is not None else r.get("threshold")
        if _number(threshold) is not None:
            lo, hi = min(lo, float(threshold)), max(hi, float(threshold))
        integral = all(v.is_integer() for v in values)
        bins = [x - 0.5 for x in range(int(lo), int(hi) + 2)] if integral and hi - lo <= 20 else (
            [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else [lo - 0.5, lo + 0.5])
        for ax, kind, colour in zip(axes, kinds, (KEPT, *NEGATIVE_COLOURS)):
            ax.hist(series[kind], bins=bins, color=colour, label=kind)
            if kind != "gold" and series["gold"]:  # the gold pairs' outline beside each negative kind
                ax.hist(series["gold"], bins=bins, histtype="step", color=KEPT, linewidth=1.5, label="gold")
                ax.legend(fontsize=7, frameon=False)
            if _number(threshold) is not None:
                ax.axvline(float(threshold), color=THRESHOLD, linestyle="--", linewidth=2)
            ax.set_title(f"{kind} ({len(series[kind])} scored, {unscored[kind]} not)", fontsize=9)
            ax.set_xlabel("score")
        axes[0].set_ylabel("items")
        out.append(head + svg(fig, f"score distributions for mode {_mode_name(r)}")
                   + (f'<p class="note">Dashed line: keep threshold {_fmt(threshold)}.</p>' if _number(threshold) is not None else "")
                   + table(["kind", "scored", "unscored", "min", "median", "max"], rows))
    return "".join(out)


def _quartiles(values: list[float]) -> list[Any]:
    if not values:
        return ["-", "-", "-"]
    v = sorted(values)
    return [round(v[0], 4), round(v[len(v) // 2], 4), round(v[-1], 4)]


#: The built-in sections: ``(name, render, order)``; lower order comes first.
SECTIONS: list[tuple[str, Render, int]] = [
    ("Run overview", render_overview, 10),
    ("Records through each stage", render_funnel, 20),
    ("Drops by reason", render_drops, 30),
    ("Scores", render_scores, 40),
    ("Instruction and response lengths", render_lengths, 50),
    ("Tokens, cost and time per stage", render_usage, 60),
    ("Failures by kind", render_failures, 70),
    ("Sample of kept and dropped records", render_samples, 80),
    ("Judge evaluation", render_eval_summary, 10),
    ("ROC curve", render_roc, 20),
    ("Score distributions per negative kind", render_eval_distributions, 30),
]


def _as_section(item: Any) -> tuple[str, Render, int] | None:
    if isinstance(item, (tuple, list)) and len(item) >= 2 and callable(item[1]):
        return str(item[0]), item[1], float(item[2]) if len(item) > 2 and item[2] is not None else 100.0
    name, render = getattr(item, "name", None), getattr(item, "render", None)
    if name and callable(render):
        order = getattr(item, "order", 100)
        return str(name), render, float(100 if order is None else order)
    return None


def collect_sections(registry: Any = None) -> list[tuple[str, Render, int]]:
    """The built-in sections plus those plugins register (``Registry.report_sections()``), by order then name.

    A section registered twice (the built-ins come back through the registry when this package is
    loaded as a plugin) appears once.
    """
    found: list[tuple[str, Render, int]] = list(SECTIONS)
    if registry is None:
        try:
            from btkit.plugins import get_registry

            registry = get_registry()
        except Exception:  # noqa: BLE001 (no registry: the built-ins alone)
            registry = None
    getter = getattr(registry, "report_sections", None)
    if callable(getter):
        extra = getter()
        items = extra.values() if isinstance(extra, dict) else extra
        for item in items or ():
            section = _as_section(item)
            if section is not None:
                found.append(section)
    seen, out = set(), []
    for name, render, order in found:
        key = (name, getattr(render, "__module__", None), getattr(render, "__qualname__", id(render)))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, render, order))
    return sorted(out, key=lambda s: (s[2], s[0]))


#: Section headings are underlined in HEADING_RULE (the tests count those rules in a screenshot).
HEADING_RULE = "#5e548e"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#22333b;color:#fff;padding:18px 28px}header h1{margin:0;font-size:24px}header p{margin:4px 0 0;opacity:.85}
main{padding:8px 28px 40px;max-width:1280px}nav{margin:12px 0 4px;font-size:14px}nav a{margin-right:14px;color:#22577a}
section{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:6px 18px 16px;margin:16px 0}
h2{font-size:19px;border-bottom:3px solid #5e548e;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:10px 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f7}table.kv td:first-child{font-weight:600;background:#f6f8fa}
.plot svg{max-width:100%;height:auto}.note{color:#555;font-size:13px}.error{color:#b00020}
.sides{display:flex;gap:16px;align-items:flex-start}.side{flex:1;min-width:0}
.card{border:1px solid #ddd;border-left:6px solid #74c69d;border-radius:6px;padding:8px 10px;margin:10px 0;font-size:13px;background:#fff}
.card.dropped{border-left-color:#f4a3a3}.rid{font-weight:600;word-break:break-all}.src{font-weight:400;color:#666;margin-left:8px}
.why{color:#b00020;margin:4px 0}.fname{display:block;font-size:11px;text-transform:uppercase;color:#777;margin-top:6px}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;background:#f6f8fa;padding:6px;border-radius:4px;font-size:12px}
code{word-break:break-word;font-size:12px}.scores{margin-top:6px;font-weight:600;color:#22577a}
.lineage ol{margin:4px 0;padding-left:22px}.lineage summary{cursor:pointer;word-break:break-all}
"""


def build_report(path: Path, *, sections: list[tuple[str, Render, int]] | None = None, sample: int = DEFAULT_SAMPLE,
                 seed: int = 0, title: str | None = None) -> str:
    """The whole HTML page for a run directory or an eval-judge JSON file."""
    path = Path(path)
    _SVG_COUNT[0] = 0  # plot ids restart per page: the same run gives the same page
    ctx = load_context(path, sample=sample, seed=seed)
    ctx["sections"] = sections = collect_sections() if sections is None else sections
    parts, nav = [], []
    for i, (name, render, _order) in enumerate(sections):
        try:
            body = render(path, ctx)
        except Exception as e:  # noqa: BLE001 (a broken section is named, the rest of the page stays)
            body = f'<p class="error">This section failed: {html.escape(type(e).__name__)}: {html.escape(str(e))}</p>'
        if body is None:
            continue
        anchor = f"s{i}"
        nav.append(f'<a href="#{anchor}">{html.escape(name)}</a>')
        parts.append(f'<section id="{anchor}"><h2>{html.escape(name)}</h2>{body}</section>')
    if ctx["kind"] == "eval_judge":
        heading = title or "btkit eval-judge report"
        sub = f"{path.name}: {len(ctx['results'])} judge mode(s)"
    else:
        heading = title or "btkit run report"
        labels = ctx["labels"]
        sub = f"{path.resolve().name}: {' → '.join(labels) if labels else 'no stages recorded'}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(heading)}: {html.escape(path.name)}</title>"
            f"<style>{STYLE}</style></head><body><header><h1>{html.escape(heading)}</h1><p>{html.escape(sub)}</p></header>"
            f"<main><nav>{''.join(nav)}</nav>{''.join(parts)}</main></body></html>\n")


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the page (default: RUN_DIR/report.html, or JSON_FILE's name with .html).")
@click.option("--sample", type=click.IntRange(0), default=DEFAULT_SAMPLE, show_default=True,
              help="Kept records, and dropped records, shown side by side (0: no sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing the sample.")
def report_command(run_dir: Path, output: Path | None, sample: int, seed: int) -> None:
    """Write one self-contained HTML page about a run directory (or an 'eval-judge --json' file).

    The page shows records through each stage, drops by reason, score histograms with the keep
    threshold, instruction and response lengths, calls, tokens and cost per stage with the run's
    time, failures by kind and a sample of kept and dropped records with their lineage; for
    eval-judge JSON, ROC curves and score distributions per negative kind. Plots are inline SVG:
    the page needs no network.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("error: btkit report draws its plots with matplotlib: pip install 'btkit[report]'", err=True)
        sys.exit(2)
    if output is None:
        output = run_dir / "report.html" if run_dir.is_dir() else run_dir.with_suffix(".html")
    from btkit.errors import BtkitError

    try:
        page = build_report(run_dir, sample=sample, seed=seed)
    except BtkitError as e:  # e.g. two plugins registering one section name
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    click.echo(f"wrote {output} ({len(page) // 1024} KiB)")
