"""``btkit export RUN_DIR --format FORMAT -o OUT``: a finished run's ``data.jsonl`` in the shape a trainer reads.

Formats are plugins (the ``btkit_register_export_formats`` hook); these are btkit's own:

============  =================================================================================
alpaca        ``instruction``/``input``/``output`` (+ ``system``) JSON lines (Alpaca, LLaMA-Factory);
              TeGit's task input lands in ``input``
sharegpt      ``conversations`` of ``from``/``value`` turns (+ ``system``) (ShareGPT, axolotl, LLaMA-Factory)
openai        OpenAI fine-tuning chat JSONL: ``messages`` (system, user, assistant)
messages      plain chat JSONL: ``messages`` (the shape of most chat-template trainers)
trl           TRL's conversational prompt/completion: ``prompt`` (system + user turns), ``completion``
hf            a Hugging Face ``datasets`` DatasetDict (``save_to_disk``), split train/validation
parquet       ``train.parquet`` (and ``validation.parquet``) in a folder, for ``load_dataset("parquet", ...)``
============  =================================================================================

``--preference`` writes chosen/rejected pairs instead, for methods whose records keep a worse
variant: Back-and-Forth (the rewrite is chosen, the original response ``meta.original_response``
rejected), AIR (for the final instruction, the document is chosen and the model's answer of the
last round that missed a constraint, ``meta.rounds``, rejected), or any record with
``meta.rejected``. Records without a worse variant are skipped and counted.

``--split 0.1`` holds out a share as a validation set, chosen by a hash of each record's id and
``--split-seed``, so the same run and seed always split the same way. The system prompt (Humpback's
and Back-and-Forth's source tags) lands in every format that has a place for it. What a format
cannot hold (``meta``: scores and lineage; fields of a method that writes no instruction/response
pairs) is named once in a ``warning:`` line; ``hf`` and ``parquet`` keep everything (``meta`` as a
JSON string column). ``datasets`` is imported only by those two formats.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from btkit.errors import BtkitError

#: Fields the chat formats read from a data.jsonl line; any other top-level field is named as lost.
PAIR_FIELDS = ("instruction", "response", "system")
#: Top-level fields no format needs to warn about: ``alpaca`` is TeGit's Alpaca triple, already the user turn.
QUIET_FIELDS = ("alpaca",)


# -- reading a run ---------------------------------------------------------------------------
def read_run(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/data.jsonl``, or one clear error saying what is wrong with the directory."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise BtkitError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise BtkitError(f"{run_dir}: not a run directory (a file; give the folder a run wrote with -o)")
    data = run_dir / "data.jsonl"
    if not data.exists():
        if (run_dir / "data.jsonl.partial").exists() or (run_dir / "candidates.jsonl").exists():
            raise BtkitError(f"{run_dir}: the run is not finished (no data.jsonl yet); re-run the same btkit run command to finish it")
        raise BtkitError(f"{run_dir}: not a btkit run directory (no data.jsonl)")
    rows = []
    with data.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BtkitError(f"{data}: line {n} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise BtkitError(f"{data}: line {n} is not a JSON object")
            rows.append(row)
    return rows


# -- shared shaping --------------------------------------------------------------------------
class Notes:
    """Warnings of one export, each said once however many rows it concerns."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.lines: list[str] = []

    def once(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    def lost(self, rows: list[dict[str, Any]], kept: tuple[str, ...]) -> None:
        """One line per top-level field the format has no place for."""
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                if k not in kept and k not in QUIET_FIELDS:
                    seen.setdefault(k, None)
        for k in seen:
            what = " (scores, lineage; it stays in data.jsonl)" if k == "meta" else ""
            self.once(f"format {self.fmt} has no place for field {k}{what}")


def require_pairs(rows: list[dict[str, Any]], fmt: str) -> None:
    """Chat formats need instruction/response pairs: a run of another kind (LINGUIST) is refused in one line."""
    bad = next((r for r in rows if not isinstance(r.get("instruction"), str) or not isinstance(r.get("response"), str)), None)
    if bad is not None:
        method = (bad.get("meta") or {}).get("method", "?")
        raise BtkitError(f"format {fmt} needs instruction/response pairs, and this run's records (method {method}) have "
                         f"fields {', '.join(sorted(bad))}; use --format hf or parquet, which keep any fields")


def messages_of(row: dict[str, Any], with_response: bool = True) -> list[dict[str, str]]:
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
    msgs.append({"role": "user", "content": row["instruction"]})
    if with_response:
        msgs.append({"role": "assistant", "content": row["response"]})
    return msgs


def alpaca_triple(row: dict[str, Any]) -> tuple[str, str]:
    """(instruction, input): TeGit's task apart (its ``alpaca`` field), else the whole user turn and no input."""
    a = row.get("alpaca")
    if isinstance(a, dict) and isinstance(a.get("instruction"), str):
        return a["instruction"], str(a.get("input") or "")
    return row["instruction"], str(row.get("input") or "")


def preference_pairs(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """``(pairs, skipped)``: each pair is the row with ``chosen`` and ``rejected`` (see the module docstring)."""
    pairs, skipped = [], 0
    for r in rows:
        meta = r.get("meta") or {}
        rejected = meta.get("rejected")
        if not isinstance(rejected, str):
            rejected = meta.get("original_response")  # Back-and-Forth: the response before its rewrite
        if not isinstance(rejected, str) and isinstance(meta.get("rounds"), list):  # AIR
            missed = [x for x in meta["rounds"] if isinstance(x, dict) and x.get("status") == "added" and x.get("answer")]
            rejected = missed[-1]["answer"] if missed else None
        if not isinstance(rejected, str) or not rejected.strip() or rejected == r.get("response"):
            skipped += 1
            continue
        pairs.append({**r, "chosen": r["response"], "rejected": rejected})
    return pairs, skipped


def split_rows(rows: list[dict[str, Any]], share: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, validation)``: ``round(share * n)`` rows (at least 1 when share > 0 and n > 1) held out,
    chosen by a hash of (seed, id), in their original order."""
    if share <= 0 or len(rows) < 2:
        return list(rows), []
    k = min(len(rows) - 1, max(1, round(share * len(rows))))

    def key(i: int) -> str:
        rid = str((rows[i].get("meta") or {}).get("id", i))
        return hashlib.blake2b(f"{seed}\x00{rid}\x00{i}".encode(), digest_size=8).hexdigest()

    held = set(sorted(range(len(rows)), key=key)[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def jsonl_writer(fmt: str, shape: Callable[[dict[str, Any]], dict[str, Any]], pref: Callable[[dict[str, Any]], dict[str, Any]],
                 kept: tuple[str, ...] = PAIR_FIELDS) -> Callable[..., dict[str, Any]]:
    """A writer of one JSON line per row (``shape``, or ``pref`` for a preference pair), split into
    ``OUT.train.jsonl``/``OUT.validation.jsonl`` when ``split`` > 0."""

    def writer(rows: list[dict[str, Any]], out: Path, options: dict[str, Any]) -> dict[str, Any]:
        require_pairs(rows, fmt)
        notes = Notes(fmt)
        notes.lost(rows, kept)
        summary: dict[str, Any] = {"format": fmt}
        if options.get("preference"):
            rows, skipped = preference_pairs(rows)
            summary["skipped_without_rejected"] = skipped
            if not rows:
                raise BtkitError("--preference: no record of this run keeps a worse variant (Back-and-Forth's original response, "
                                 "AIR's missed-constraint answers, meta.rejected); nothing to export")
            make = pref
        else:
            make = shape
        train, val = split_rows(rows, float(options.get("split") or 0), int(options.get("split_seed") or 0))
        out = Path(out)
        if val:
            stem = out.name[: -len(out.suffix)] if out.suffix else out.name
            files = {"train": out.with_name(f"{stem}.train{out.suffix or '.jsonl'}"),
                     "validation": out.with_name(f"{stem}.validation{out.suffix or '.jsonl'}")}
            write_jsonl(files["train"], [make(r) for r in train])
            write_jsonl(files["validation"], [make(r) for r in val])
        else:
            files = {"train": out}
            write_jsonl(out, [make(r) for r in train])
        summary.update(rows=len(train) + len(val), train=len(train), validation=len(val),
                       files={k: str(v) for k, v in files.items()}, warnings=notes.lines)
        return summary

    return writer


# -- the formats -----------------------------------------------------------------------------
def _alpaca(r: dict[str, Any]) -> dict[str, Any]:
    ins, inp = alpaca_triple(r)
    out = {"instruction": ins, "input": inp, "output": r["response"]}
    if r.get("system"):
        out["system"] = r["system"]
    return out


def _alpaca_pref(r: dict[str, Any]) -> dict[str, Any]:
    ins, inp = alpaca_triple(r)
    out = {"instruction": ins, "input": inp, "chosen": r["chosen"], "rejected": r["rejected"]}
    if r.get("system"):
        out["system"] = r["system"]
    return out


def _sharegpt(r: dict[str, Any]) -> dict[str, Any]:
    out = {"conversations": [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": r["response"]}]}
    if r.get("system"):
        out["system"] = r["system"]
    return out


def _sharegpt_pref(r: dict[str, Any]) -> dict[str, Any]:  # LLaMA-Factory's ShareGPT preference shape
    out = {"conversations": [{"from": "human", "value": r["instruction"]}],
           "chosen": {"from": "gpt", "value": r["chosen"]}, "rejected": {"from": "gpt", "value": r["rejected"]}}
    if r.get("system"):
        out["system"] = r["system"]
    return out


def _openai(r: dict[str, Any]) -> dict[str, Any]:
    return {"messages": messages_of(r)}


def _openai_pref(r: dict[str, Any]) -> dict[str, Any]:  # OpenAI's preference (DPO) fine-tuning shape
    return {"input": {"messages": messages_of(r, with_response=False)},
            "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}]}


def _messages_pref(r: dict[str, Any]) -> dict[str, Any]:  # TRL's implicit-prompt conversational preference
    prompt = messages_of(r, with_response=False)
    return {"chosen": prompt + [{"role": "assistant", "content": r["chosen"]}],
            "rejected": prompt + [{"role": "assistant", "content": r["rejected"]}]}


def _trl(r: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": messages_of(r, with_response=False), "completion": [{"role": "assistant", "content": r["response"]}]}


def _trl_pref(r: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": messages_of(r, with_response=False), "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}]}


def table_rows(rows: list[dict[str, Any]], preference: bool) -> list[dict[str, Any]]:
    """Rows for a ``datasets`` table: every field kept (``meta`` and other nested values as JSON
    strings, so the columns have one type), plus ``messages`` (or ``prompt``/``chosen``/``rejected``)
    where the rows are instruction/response pairs, and ``id``."""
    pairs = all(isinstance(r.get("instruction"), str) and isinstance(r.get("response"), str) for r in rows)
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            keys.setdefault(k, None)
    out = []
    for r in rows:
        t: dict[str, Any] = {"id": str((r.get("meta") or {}).get("id", ""))}
        for k in keys:
            v = r.get(k)
            t[k] = v if isinstance(v, str) else None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)
        if pairs:
            if preference:
                t["prompt"] = messages_of(r, with_response=False)
                t["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
                t["rejected"] = [{"role": "assistant", "content": r["rejected"]}]
            else:
                t["messages"] = messages_of(r)
        out.append(t)
    return out


def _table_writer(fmt: str) -> Callable[..., dict[str, Any]]:
    def writer(rows: list[dict[str, Any]], out: Path, options: dict[str, Any]) -> dict[str, Any]:
        try:
            import datasets  # noqa: F401 (heavy: only when this format is asked for)
        except ImportError:
            raise BtkitError(f"format {fmt} needs the datasets package: pip install 'btkit[export]'") from None
        datasets.disable_progress_bars()  # one summary line is what the command prints
        summary: dict[str, Any] = {"format": fmt}
        if options.get("preference"):
            require_pairs(rows, fmt)
            rows, skipped = preference_pairs(rows)
            summary["skipped_without_rejected"] = skipped
            if not rows:
                raise BtkitError("--preference: no record of this run keeps a worse variant; nothing to export")
        train, val = split_rows(rows, float(options.get("split") or 0), int(options.get("split_seed") or 0))
        parts = {"train": table_rows(train, bool(options.get("preference")))}
        if val:
            parts["validation"] = table_rows(val, bool(options.get("preference")))
        dd = datasets.DatasetDict({name: datasets.Dataset.from_list(part) for name, part in parts.items()})
        out = Path(out)
        if fmt == "hf":
            dd.save_to_disk(str(out))
            files = {"dataset": str(out)}
        else:
            out.mkdir(parents=True, exist_ok=True)
            files = {}
            for name, ds in dd.items():
                ds.to_parquet(str(out / f"{name}.parquet"))
                files[name] = str(out / f"{name}.parquet")
            stale = out / "validation.parquet"
            if "validation" not in dd and stale.exists():
                stale.unlink()  # from an earlier export with a split: it would be read as this one's
        summary.update(rows=len(train) + len(val), train=len(train), validation=len(val), files=files, warnings=[])
        return summary

    return writer


#: name -> (writer, description, suffix): what the plugin registers.
FORMATS: dict[str, tuple[Callable[..., dict[str, Any]], str, str]] = {
    "alpaca": (jsonl_writer("alpaca", _alpaca, _alpaca_pref), "instruction/input/output (+system) JSONL (Alpaca, LLaMA-Factory)", ".jsonl"),
    "sharegpt": (jsonl_writer("sharegpt", _sharegpt, _sharegpt_pref), "conversations of from/value turns (+system) JSONL (axolotl, LLaMA-Factory)", ".jsonl"),
    "openai": (jsonl_writer("openai", _openai, _openai_pref), "OpenAI fine-tuning chat JSONL (messages)", ".jsonl"),
    "messages": (jsonl_writer("messages", _openai, _messages_pref), "plain chat messages JSONL", ".jsonl"),
    "trl": (jsonl_writer("trl", _trl, _trl_pref), "TRL conversational prompt/completion JSONL", ".jsonl"),
    "hf": (_table_writer("hf"), "Hugging Face datasets DatasetDict (save_to_disk), train/validation", ""),
    "parquet": (_table_writer("parquet"), "train.parquet / validation.parquet in a folder", ""),
}
#: Formats that split 10% off for validation unless --split says otherwise.
SPLIT_BY_DEFAULT = {"hf": 0.1, "parquet": 0.1}


class _ExportCommand(click.Command):
    """``btkit export``, whose help lists every registered format (plugins' included) with its description."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            from btkit.plugins import get_registry

            rows = [(n, f.description) for n, f in sorted(get_registry().export_formats().items())]
        except Exception:  # noqa: BLE001 (help must never fail)
            rows = [(n, d) for n, (_, d, _) in FORMATS.items()]
        with formatter.section("Formats"):
            formatter.write_dl(rows)


@click.command("export", cls=_ExportCommand)
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "-f", "fmt", required=True, help="Export format (see below; plugins may add more).")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output file (a folder for hf and parquet). Default: RUN_DIR/export/FORMAT[.jsonl].")
@click.option("--split", type=click.FloatRange(0, 0.9), default=None,
              help="Share held out for validation (default 0.1 for hf/parquet, 0 for the JSONL formats).")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--preference", is_flag=True, help="Chosen/rejected pairs from records that keep a worse variant (Back-and-Forth, AIR).")
def export_command(run_dir: Path, fmt: str, out: Path | None, split: float | None, split_seed: int, preference: bool) -> None:
    """Export a finished run's data.jsonl for training: alpaca, sharegpt, openai, messages, trl, hf, parquet."""
    from btkit.plugins import get_registry

    spec = get_registry().export_format(fmt)
    rows = read_run(run_dir)
    if not rows:  # (a datasets table of no rows does not even load back)
        raise BtkitError(f"{run_dir}: data.jsonl holds no records (the run kept none); nothing to export")
    if out is None:
        out = Path(run_dir) / "export" / f"{fmt}{'-preference' if preference else ''}{spec.suffix}"
    options = {"split": SPLIT_BY_DEFAULT.get(fmt, 0.0) if split is None else split, "split_seed": split_seed,
               "preference": preference, "run_dir": Path(run_dir)}
    summary = spec.writer(rows, Path(out), options) or {}
    for line in dict.fromkeys(summary.get("warnings") or []):
        click.echo(f"warning: {line}", err=True)
    counts = ", ".join(f"{k} {summary[k]}" for k in ("train", "validation", "skipped_without_rejected") if summary.get(k))
    click.echo(f"exported {summary.get('rows', len(rows))} {'pairs' if preference else 'records'} as {fmt}"
               f"{f' ({counts})' if counts else ''} -> {out}", err=True)

