"""Sharded runs and their merge: one run split over processes or machines, the same data at the end.

``btkit run ... -o OUT --shards N --shard K`` processes the units :func:`shard_of` assigns to
shard K, in ``OUT/shards/K-of-N/``: its own run directory with its own journal, lock and resume,
so it works under any job launcher (a Slurm or Kubernetes job array, a Ray task, a shell loop).
Every shard reads the whole input and prepares it as one process would (segments, de-duplication,
id checks over the whole corpus) and keeps its own units with their positions in the whole
stream; what differs between shards is only which units reach a model.

A shard stops before anything that needs the whole run in view: no end-of-run decision (keep-top,
de-duplication across units), no stage after a whole-run cut, no ``data.jsonl``. It writes
``shard.json`` last: complete, the run's settings, its unit count and its journal's digest.

``btkit merge OUT`` (:func:`merge`) checks that all N shards are complete with one count, one
assignment and the same settings (else one line says what differs), merges their journals by
position into ``OUT/candidates.jsonl`` (exactly the journal one process writes), and then runs
the engine on OUT as a resumed run: every unit is found finished, so what runs is what a resume
does at the end: the stages after a whole-run cut for the records that survive it (the only model
calls a merge makes), the end-of-run decisions over every shard's records, then ``data.jsonl``,
``stats.json``, ``failures.jsonl`` and the plugins' files (the dataset card). ``manifest.json``,
written last, records N, the assignment, the settings and each shard's journal digest; merging
again is a no-op until a shard changes (a shard re-run that retried its failed calls), and a merge
under another N or other settings is refused. Units whose calls failed stay as their shard
recorded them: re-running that shard retries them, then merge again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BtkitError
from .io import atomic_write_json
from .records import ExtraUnit, Record
from .rundir import redact_argv

#: How units are assigned to shards (recorded in every shard's settings and in the manifest).
SHARD_ASSIGNMENT = "blake2b-64 of the unit's text (its fields as JSON when it has none) mod N; extra records in shard 0"
SHARDS_DIR = "shards"
SHARD_FILE = "shard.json"
MANIFEST_FILE = "manifest.json"
_SECRET = re.compile(r"(?i)(key|token|secret|password|passwd)$")
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def shard_of(unit: Record, shards: int) -> int:
    """The shard (0..shards-1) that processes ``unit``: a stable hash of its text, so identical texts
    (and a resumed or retried shard) always land in the same shard. The method's extra records
    (Humpback's seed pairs) are one unit, in shard 0."""
    if isinstance(unit, ExtraUnit):
        return 0
    text = unit.fields.get("text")
    if not isinstance(text, str):
        text = json.dumps(unit.fields, sort_keys=True, default=str, ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def shard_dir(out: Path, shard: int, shards: int) -> Path:
    """Where shard K of N of the run ``out`` lives."""
    return Path(out) / SHARDS_DIR / f"{shard}-of-{shards}"


def check_shard_args(shards: int | None, shard: int | None) -> None:
    """``--shards N`` is at least 1 and ``--shard K`` in 0..N-1 (and only with ``--shards``)."""
    if shard is not None and shards is None:
        raise BtkitError("--shard K needs --shards N (how many shards the run is split into)")
    if shards is not None and shards < 1:
        raise BtkitError(f"--shards {shards}: must be at least 1")
    if shard is not None and not 0 <= shard < shards:
        raise BtkitError(f"--shard {shard}: must be between 0 and {shards - 1} (--shards {shards})")


def check_layout(out: Path, shards: int) -> None:
    """Refuse a shard count other than the one ``out`` already holds shards (or a merge) of."""
    out = Path(out)
    others = sorted({int(m.group(2)) for p in (out / SHARDS_DIR).glob("*-of-*") if (m := _SHARD_NAME.match(p.name))} - {shards})
    if others:
        raise BtkitError(f"{out / SHARDS_DIR} holds shards of a {others[0]}-shard run; a run's shard count is fixed "
                         f"(units are assigned by hash mod N): use --shards {others[0]}, or another -o")
    manifest = _read_json(out / MANIFEST_FILE)
    if manifest and manifest.get("shards") != shards:
        raise BtkitError(f"{out} holds a merge of {manifest.get('shards')} shards; a run's shard count is fixed: "
                         f"use --shards {manifest.get('shards')}, or another -o")


# -- a run's settings, as a shard records them --------------------------------------------------
def config_to_dict(config: Any, secrets: bool = True) -> dict[str, Any]:
    """A :class:`btkit.config.RunConfig` as JSON (what a shard process or task is started with, and
    what ``shard.json`` keeps for the merge). ``secrets=False`` leaves out backend options named like
    a credential (``api_key``...): those come from the environment or ``btkit merge -B``."""
    backend_options = {k: v for k, v in config.backend_options.items() if secrets or not _SECRET.search(k)}
    d = {
        "input": str(config.input),
        "out_dir": str(config.out_dir),
        "stages": [{"method": s.method, "stage": s.stage, "options": s.options,
                    "prompt_overrides": [str(Path(p).resolve()) for p in s.prompt_overrides]} for s in config.stages],
        "model": config.model,
        "options": config.options,
        "backend_options": backend_options,
        "prompt_overrides": [str(Path(p).resolve()) for p in config.prompt_overrides],
        "concurrency": config.concurrency,
        "limit": config.limit,
        "quiet": config.quiet,
        "cache_path": str(Path(config.cache_path).resolve()) if config.cache_path else None,
        "use_cache": config.use_cache,
        "overwrite": config.overwrite,
        "shard": list(config.shard) if config.shard is not None else None,
        "cwd": os.getcwd(),  # relative paths (the input, a seed file) resolve against it
        "command": config.command or redact_argv(sys.argv),
    }
    return json.loads(json.dumps(d, default=str))


def config_from_dict(d: dict[str, Any]) -> Any:
    """The :class:`btkit.config.RunConfig` :func:`config_to_dict` wrote."""
    from .config import RunConfig, StageSpec

    return RunConfig(
        input=Path(d["input"]), out_dir=Path(d["out_dir"]),
        stages=[StageSpec(s["method"], s["stage"], dict(s["options"]), [Path(p) for p in s.get("prompt_overrides", [])]) for s in d["stages"]],
        model=d["model"], options=dict(d["options"]), backend_options=dict(d["backend_options"]),
        prompt_overrides=[Path(p) for p in d.get("prompt_overrides", [])], concurrency=int(d["concurrency"]),
        limit=d.get("limit"), quiet=bool(d.get("quiet")), cache_path=Path(d["cache_path"]) if d.get("cache_path") else None,
        use_cache=bool(d.get("use_cache", True)), overwrite=bool(d.get("overwrite")),
        shard=tuple(d["shard"]) if d.get("shard") else None, command=d.get("command"),
    )


@contextlib.contextmanager
def working_directory(path: str | None) -> Any:
    """Run in the directory the shards ran in (relative paths in method options mean the same), if it exists."""
    before = os.getcwd()
    if path and Path(path).is_dir():
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard_marker(shard_out: Path, config: Any, units: int) -> None:
    """``shard.json``, written last by a shard that finished all its units (see the module docstring)."""
    k, n = config.shard
    atomic_write_json(Path(shard_out) / SHARD_FILE, {
        "status": "complete", "shard": k, "shards": n, "assignment": SHARD_ASSIGNMENT, "units": units,
        "journal_sha256": file_sha256(Path(shard_out) / "candidates.jsonl"), "finished": time.time(),
        "config": config_to_dict(config, secrets=False),
    })


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


# -- the merge -----------------------------------------------------------------------------------
@dataclass
class Shard:
    """One complete shard as the merge found it."""

    shard: int
    dir: Path
    marker: dict[str, Any]
    fingerprint: dict[str, Any]
    elapsed_s: float


def _unsharded(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fingerprint.items() if k != "shard"}


def _changed(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def complete_shards(out: Path) -> list[Shard]:
    """Every shard of ``out``, checked: one count N, all N present and complete, journals as their
    markers say, one assignment and the same settings; else one line saying what is wrong."""
    out = Path(out)
    found: dict[int, dict[int, Path]] = {}
    for p in sorted((out / SHARDS_DIR).glob("*-of-*")):
        m = _SHARD_NAME.match(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise BtkitError(f"{out / SHARDS_DIR}: no shards to merge (run `btkit run ... -o {out} --shards N --shard K` for each K first)")
    if len(found) > 1:
        raise BtkitError(f"{out / SHARDS_DIR} holds shards of {' and of '.join(str(n) for n in sorted(found))}-shard runs; "
                         f"a merge takes one shard count: move the others away")
    (n, dirs), = found.items()
    missing = [k for k in range(n) if k not in dirs]
    if missing:
        raise BtkitError(f"{out}: shard {missing[0]} of {n} was never started ({len(missing)} of {n} missing); "
                         f"run it with --shards {n} --shard {missing[0]}, then merge")
    shards = []
    for k in range(n):
        d = dirs[k]
        marker = _read_json(d / SHARD_FILE)
        if not marker or marker.get("status") != "complete":
            done = JournalTail(d / "candidates.jsonl").read().units
            raise BtkitError(f"{d}: shard {k} of {n} is not complete ({done} units journalled); re-run it "
                             f"(the same command with --shard {k}) to finish it, then merge")
        if marker.get("shards") != n or marker.get("shard") != k or marker.get("assignment") != SHARD_ASSIGNMENT:
            raise BtkitError(f"{d / SHARD_FILE}: says shard {marker.get('shard')} of {marker.get('shards')} "
                             f"({marker.get('assignment')}); expected shard {k} of {n} ({SHARD_ASSIGNMENT})")
        journal_path = d / "candidates.jsonl"
        if not journal_path.exists() or file_sha256(journal_path) != marker.get("journal_sha256"):
            raise BtkitError(f"{journal_path}: changed since shard {k} finished (its digest is not the one in {SHARD_FILE}); "
                             f"re-run the shard to check it, then merge")
        run_json = _read_json(d / "run.json") or {}
        fp = run_json.get("fingerprint") or {}
        if shards and _unsharded(fp) != _unsharded(shards[0].fingerprint):
            raise BtkitError(f"{d}: shard {k} ran with other settings than shard 0 (changed: {_changed(_unsharded(fp), _unsharded(shards[0].fingerprint))}); "
                             f"every shard of a run needs the same settings: re-run it with them (--overwrite), then merge")
        shards.append(Shard(k, d, marker, fp, float(run_json.get("elapsed_s") or 0.0)))
    return shards


def merged_command(command: list[str]) -> list[str]:
    """What makes a merged run again, for its run.json and dataset card: the shards' command without
    ``--shard K``, which runs every shard (the local executor by default) and merges them: the same
    data, since the merge of any N shards is the run one process makes."""
    out = list(command)
    for i, arg in enumerate(out):
        if arg == "--shard" and i + 1 < len(out):
            return out[:i] + out[i + 2:]
        if arg.startswith("--shard="):
            return out[:i] + out[i + 1:]
    return out


class JournalTail:
    """Units and kept records of a journal another process may be writing, read without touching it:
    each :meth:`read` takes only the whole lines appended since the last (a rewritten file is read again)."""

    UNIT = re.compile(rb'"unit_seq": ?(-?\d+)')
    KEPT = re.compile(rb'"status": ?"kept"')

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset, self.units, self.kept, self._last = 0, 0, 0, None

    def read(self) -> "JournalTail":
        try:
            if self.path.stat().st_size < self.offset:  # rewritten (sorted at the end, a torn line cut on resume)
                self.offset, self.units, self.kept, self._last = 0, 0, 0, None
            with self.path.open("rb") as f:
                f.seek(self.offset)
                for raw in f:  # one line in memory at a time
                    if not raw.endswith(b"\n"):
                        break  # being written: read it next time
                    self.offset += len(raw)
                    m = self.UNIT.search(raw)
                    if m and m.group(1) != self._last:
                        self.units, self._last = self.units + 1, m.group(1)
                    self.kept += self.KEPT.search(raw) is not None
        except OSError:
            pass
        return self


def _merge_run(out: Path, shards: list[Shard], config: Any, registry: Any, expected: dict[str, Any]) -> dict[str, Any]:
    """The engine on ``out`` as a resumed run whose journal is the shards' journals merged (see :func:`merge`)."""
    from . import journal
    from .engine import HELD_JOURNAL, Run, execute_run

    run = Run(config, registry)
    now = run.fingerprint()
    if now != expected:
        raise BtkitError(f"settings changed since the shards of {out} ran (changed: {_changed(expected, now)}); "
                         f"a merge under other settings is refused: restore them, or re-run the shards")
    run.retry_failed = False
    # stats.json's wall_time_s of a merged run is the merge's own: each shard's active time is here
    run.stats_sections["shards"] = {"count": len(shards), "units": [s.marker.get("units") for s in shards],
                                    "elapsed_s": [round(s.elapsed_s, 3) for s in shards],
                                    "busiest_shard_s": round(max(s.elapsed_s for s in shards), 3)}
    run.calls_expected = run.hold_index() is not None  # only the stages after a whole-run cut call a model

    def merged_journal(path: Path) -> None:
        streams = []
        for s in shards:
            p = s.dir / "candidates.jsonl"
            streams.append(journal.iter_sorted(p, journal.scan(p)))
        journal.rewrite(path, journal.merge(*streams))
        (out / HELD_JOURNAL).unlink(missing_ok=True)  # a stopped merge's second pass: its calls come back from the cache

    run.journal_source = merged_journal
    stats = execute_run(run)
    return stats


def merge(out: Path, registry: Any, *, overwrite: bool = False, quiet: bool = False, cache_path: Path | None = None,
          backend_options: dict[str, Any] | None = None, concurrency: int | None = None,
          executor: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge the complete shards of ``out`` into ``out`` (see the module docstring); returns the run's stats.

    ``backend_options`` are laid over the shards' (credentials are not recorded in ``shard.json``);
    ``executor`` is what the executor that ran the shards reports (name, timings), for the manifest.
    """
    out = Path(out).resolve()
    shards = complete_shards(out)
    n = len(shards)
    expected = _unsharded(shards[0].fingerprint)
    digests = [s.marker["journal_sha256"] for s in shards]
    old = _read_json(out / MANIFEST_FILE)
    if old and not overwrite:
        if old.get("shards") != n:
            raise BtkitError(f"{out} was merged from {old.get('shards')} shards; {out / SHARDS_DIR} now holds {n}: a merge under "
                             f"another shard count is refused (pass --overwrite to replace the merged files, moved aside)")
        if old.get("fingerprint") != expected:
            raise BtkitError(f"{out} was merged from shards with other settings (changed: {_changed(old.get('fingerprint') or {}, expected)}); "
                             f"pass --overwrite to replace the merged files (moved aside), or use another -o")
        if [s.get("journal_sha256") for s in old.get("shard_list", [])] == digests and (out / "data.jsonl").exists():
            stats = _read_json(out / "stats.json") or {}
            return {**stats, "already_merged": True}
    config = config_from_dict(shards[0].marker["config"])
    config.out_dir, config.shard, config.overwrite, config.quiet = out, None, overwrite, quiet
    config.backend_options.update(backend_options or {})
    config.command = merged_command(shards[0].marker["config"].get("command") or [])
    if cache_path is not None:
        config.cache_path = Path(cache_path).resolve()
    if concurrency is not None:
        config.concurrency = concurrency
    t0 = time.time()
    with working_directory(shards[0].marker["config"].get("cwd")):
        stats = _merge_run(out, shards, config, registry, expected)
    atomic_write_json(out / MANIFEST_FILE, {
        "shards": n, "assignment": SHARD_ASSIGNMENT, "fingerprint": expected, "merged": time.time(),
        "merge_s": round(time.time() - t0, 3), "executor": executor or {},
        "shard_list": [{"shard": s.shard, "dir": str(s.dir.relative_to(out)), "units": s.marker.get("units"),
                        "journal_sha256": s.marker["journal_sha256"], "elapsed_s": s.elapsed_s} for s in shards],
    })
    return stats


__all__ = ["SHARD_ASSIGNMENT", "JournalTail", "Shard", "check_layout", "check_shard_args", "complete_shards", "config_from_dict",
           "config_to_dict", "merge", "shard_dir", "shard_of", "write_shard_marker"]
