"""The dataset card: ``README.md`` in every finished run directory, in the Hugging Face dataset-card style.

Written by the results plugin's ``btkit_run_end`` hook (so it is a plugin like any other, and a run
without this plugin simply has no card), from what the run knows at its end: the ``stats`` about to
become ``stats.json``, ``run.json`` (command, template hashes), the stages with their options,
models and backends, ``data.jsonl`` (fields, a language guess) and the input's own ``license`` field.

YAML front matter (``license``, ``task_categories``, ``size_categories``, ``language``, ``tags``,
``pretty_name``) then markdown: method and paper, models with their specs, prompts with hashes, counts
through each stage, filters and drop reasons, calls/tokens/cost, the source corpus and its licence, the
fields of a record, and how to reproduce. Deterministic: a resumed run, or the same run again, writes
the same card byte for byte (no clock, no cache hit counts; nothing that differs between invocations).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

#: How many input rows are read for their ``license`` and ``language`` fields at most.
MAX_INPUT_ROWS = 1_000_000
#: How many data.jsonl rows the language guess reads.
LANGUAGE_SAMPLE = 200
_EN_WORDS = frozenset("the and of to a in is that for it with as on are be this by or from which an".split())


#: The card's last line: tells a card btkit may rewrite from a README.md of the user's (never overwritten).
MARKER = "<!-- btkit dataset card: rewritten each time this run finishes -->"
#: Where the card goes when the run directory holds a README.md that is not btkit's.
FALLBACK_NAME = "dataset-card.md"


def card_path(out: Path) -> Path:
    """``README.md``, unless the directory holds a README.md btkit did not write (then :data:`FALLBACK_NAME`)."""
    readme = Path(out) / "README.md"
    try:
        if readme.exists() and MARKER not in readme.read_text(encoding="utf-8", errors="replace"):
            return Path(out) / FALLBACK_NAME
    except OSError:
        return Path(out) / FALLBACK_NAME
    return readme


def write_card(run: Any, stats: dict[str, Any]) -> Path | None:
    """Write ``RUN/README.md``; a failure is one warning line, never a failed run."""
    from btkit.io import atomic_write_text

    try:
        text = render_card(run, stats)
        path = card_path(run.out)
        if path.name != "README.md" and not run.config.quiet:
            print(f"warning: {run.out}/README.md is not a btkit dataset card; the card is written to {path} instead",
                  file=sys.stderr)
        atomic_write_text(path, text)
        return path
    except Exception as e:  # noqa: BLE001 (the card must never cost the run)
        print(f"warning: dataset card not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, name in bounds:
        if n < bound:
            return name
    return "n>1T" if n >= 10**12 else "1B<n<10B"


def license_id(value: Any) -> str:
    """A licence as the Hub spells its ids: lower case, spaces and underscores as dashes."""
    return re.sub(r"[\s_]+", "-", str(value).strip()).lower()


def scan_input(path: Path, limit: int | None) -> dict[str, Any]:
    """The input's ``license``/``licence`` and ``language``/``lang`` values (counted) over the rows the run read."""
    licenses: Counter = Counter()
    languages: Counter = Counter()
    rows = 0
    cap = MAX_INPUT_ROWS if limit is None else min(limit, MAX_INPUT_ROWS)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                if rows >= cap:
                    break
                rows += 1
                if '"licen' not in line and '"lang' not in line:  # most corpora: no need to parse the line
                    licenses["unknown"] += 1
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(row, dict):
                    continue
                lic = row.get("license", row.get("licence"))
                licenses[license_id(lic) if isinstance(lic, str) and lic.strip() else "unknown"] += 1
                lang = row.get("language", row.get("lang"))
                if isinstance(lang, str) and lang.strip():
                    languages[lang.strip().lower()] += 1
    except OSError:
        pass
    return {"rows": rows, "licenses": licenses, "languages": languages}


def data_summary(path: Path) -> dict[str, Any]:
    """Field names of data.jsonl's rows, and a language guess from a sample of their text."""
    fields: dict[str, None] = {}
    english = total = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                for k in row:
                    fields.setdefault(k, None)
                if n < LANGUAGE_SAMPLE:
                    text = " ".join(str(row.get(k) or "") for k in ("instruction", "response", "text"))
                    words = re.findall(r"[^\W\d_]+", text.lower())
                    english += sum(w in _EN_WORDS for w in words)
                    total += len(words)
    except OSError:
        pass
    guess = "en" if total and english / total > 0.08 else None
    return {"fields": list(fields), "language": guess}


def _md(value: Any) -> str:
    """A value for a markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _command(run: Any) -> str:
    """The command from run.json, as a user would type it (``btkit`` for the program)."""
    try:
        argv = json.loads((Path(run.out) / "run.json").read_text(encoding="utf-8")).get("command") or []
    except (OSError, ValueError):
        argv = []
    if not argv:
        return ""
    head = Path(str(argv[0])).name
    if head in ("btkit", "cli.py", "__main__.py"):
        argv = ["btkit", *argv[1:]]
    return shlex.join(str(a) for a in argv)


def render_card(run: Any, stats: dict[str, Any]) -> str:
    cfg = run.config
    out = Path(run.out)
    registry = run.registry
    methods = list(dict.fromkeys(s.method for s in cfg.stages))
    data = data_summary(out / "data.jsonl")
    source = scan_input(Path(cfg.input), cfg.limit)
    try:
        fingerprint = json.loads((out / "run.json").read_text(encoding="utf-8")).get("fingerprint") or {}
    except (OSError, ValueError):
        fingerprint = {}

    licenses = source["licenses"]
    known = sorted(k for k in licenses if k != "unknown")
    license_value = known[0] if len(known) == 1 and not licenses.get("unknown") else "other" if known else "unknown"
    fields = data["fields"]
    pairs = "instruction" in fields and "response" in fields
    tasks = ["text-generation"] if pairs else (["token-classification", "text-classification"] if "tags" in fields else ["text-generation"])
    languages = sorted(source["languages"]) or ([data["language"]] if data["language"] else [])
    kept = int(stats.get("kept", 0))
    front = {
        "license": license_value,
        "task_categories": tasks,
        "size_categories": [size_category(kept)],
        "language": languages,
        "tags": ["synthetic", "btkit", "instruction-backtranslation", *methods],
        "pretty_name": f"{' + '.join(methods)} data from {Path(cfg.input).name}",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {front['pretty_name']}", "",
              f"Instruction-tuning data made by btkit {stats.get('btkit', '')} with "
              f"{', '.join(methods)} from `{Path(cfg.input).name}`: **{kept} records kept** of {stats.get('records', 0)} "
              f"({stats.get('units', 0)} work units). The records are in `data.jsonl`; every record the run produced, "
              f"kept or dropped with its reason, is in `candidates.jsonl`.", ""]

    lines += ["## Method", ""]
    for name in methods:
        try:
            m = registry.method(name)
            desc, paper, version = m.description, m.paper, m.version
        except Exception:  # noqa: BLE001
            desc, paper, version = "", "", ""
        lines.append(f"- **{name}**{f' {version}' if version else ''}: {desc}")
        if paper:
            lines.append(f"  - Paper: {paper}")
    lines += ["", "Stages, in order: " + " -> ".join(f"`{s.label}`" for s in run.stages) + ".", ""]

    lines += ["## Models", "", "| stage | model spec | backend |", "|---|---|---|"]
    for stage in run.stages:
        spec = run.model_for(stage)
        try:
            ident = json.dumps(run.backend_for(stage).identity(), sort_keys=True, default=str)
        except Exception:  # noqa: BLE001
            ident = ""
        lines.append(f"| `{stage.label}` | `{_md(spec)}` | `{_md(ident)}` |")
    lines.append("")

    templates = fingerprint.get("templates") or {}
    lines += ["## Prompts", "", "Templates as rendered by this run (a user override shows its own hash); "
              "`btkit prompts show NAME` prints a built-in one.", "", "| template | hash |", "|---|---|"]
    for name, digest in sorted(templates.items()):
        lines.append(f"| `{_md(name)}` | `{_md(digest)}` |")
    lines.append("")

    per_stage = stats.get("stages") or {}
    lines += ["## Counts through each stage", "", "| stage | in | out | dropped | dropped at the end of the run |", "|---|---|---|---|---|"]
    for label, st in per_stage.items():
        lines.append(f"| `{label}` | {st.get('in', 0)} | {st.get('out', 0)} | {sum((st.get('dropped') or {}).values())} "
                     f"| {sum((st.get('dropped_at_end') or {}).values())} |")
    preparing = stats.get("dropped_while_preparing") or {}
    lines += ["", f"Units: {stats.get('units', 0)}; records: {stats.get('records', 0)}; kept: {kept}; "
              f"dropped: {stats.get('dropped', 0)} (of which {sum(preparing.values())} while preparing the input).", ""]

    lines += ["## Filters and drop reasons", "", "| where | reason | records |", "|---|---|---|"]
    for reason, n in sorted(preparing.items()):
        lines.append(f"| preparing | `{_md(reason)}` | {n} |")
    for label, st in per_stage.items():
        for reason, n in sorted((st.get("dropped") or {}).items()):
            lines.append(f"| `{label}` | `{_md(reason)}` | {n} |")
        for reason, n in sorted((st.get("dropped_at_end") or {}).items()):
            lines.append(f"| `{label}` (end of run) | `{_md(reason)}` | {n} |")
    lines += ["", "Settings of each stage (thresholds, judge modes, sampling):", ""]
    for spec in fingerprint.get("stages") or []:
        opts = {k: v for k, v in sorted((spec.get("options") or {}).items()) if v not in (None, [], "")}
        lines.append(f"- `{spec.get('method')}.{spec.get('stage')}`: `{_md(json.dumps(opts, sort_keys=True, ensure_ascii=False))}`")
    lines.append("")

    lines += ["## Calls, tokens and cost", "", "| stage | calls | failed calls | parse failures | tokens in | tokens out | cost (USD) |",
              "|---|---|---|---|---|---|---|"]
    for label, st in per_stage.items():
        lines.append(f"| `{label}` | {st.get('calls', 0)} | {st.get('failed_calls', 0)} | {st.get('parse_failures_total', 0)} "
                     f"| {st.get('tokens_in', 0)} | {st.get('tokens_out', 0)} | {round(float(st.get('cost_usd') or 0), 6)} |")
    lines += ["", f"Total: {stats.get('calls', 0)} calls, {stats.get('tokens_in', 0)}+{stats.get('tokens_out', 0)} tokens, "
              f"${stats.get('cost_usd', 0)} (a cost of 0 means no price is known for the model, e.g. a local one).", ""]

    lines += ["## Source corpus and licence", "", f"Input: `{Path(cfg.input).name}`, {source['rows']} rows read"
              f"{f' (--limit {cfg.limit})' if cfg.limit is not None else ''}.", ""]
    if known:
        lines.append("Licence as given in the input records' `license` field:")
        lines.append("")
        for lic, n in sorted(licenses.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"- `{_md(lic)}`: {n} records")
    else:
        lines.append("Licence: **unknown**: the input records carry no `license` field. Check the source's terms "
                     "before sharing this data, and set `license:` above.")
    if not languages:
        lines += ["", "Language: not detected (the records carry no `language` field); set `language:` above."]
    lines.append("")

    lines += ["## Fields", "", "Each line of `data.jsonl` has: " + ", ".join(f"`{f}`" for f in fields) + "."
              if fields else "`data.jsonl` is empty.", ""]
    if pairs:
        lines += ["`system` holds the method's source tag where it sets one (Humpback's and Back-and-Forth's "
                  "`Answer with knowledge from web search.`); `meta` holds the score, the source id and the lineage "
                  "(each model call's model, template and hash, raw reply and parsed fields).",
                  "`btkit export RUN_DIR --format alpaca|sharegpt|openai|messages|trl|hf|parquet` writes it for a trainer.", ""]

    lines += ["## How to reproduce", ""]
    command = _command(run)
    if command.startswith("btkit "):
        lines += ["The command that made this run (from `run.json`):", "", "```bash", command, "```", ""]
    elif command:  # btkit driven from another program (a test, a notebook): its command line, as recorded
        lines += ["This run was started from another program; its command line, as `run.json` recorded it:", "",
                  "```", command, "```", "", "The stages and their settings are listed above.", ""]
    lines += ["Re-running it on the same directory resumes the run (nothing is paid twice: every model call is cached by content); "
              "the same command in a new directory with the same input, models and templates remakes it.", "", MARKER, ""]
    return "\n".join(lines)
