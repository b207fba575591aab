"""Resume after a crash: a real ``btkit run`` killed with SIGKILL at random points loses nothing,
duplicates nothing, and never pays twice for a request whose answer already reached the cache."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btkit.cache import cache_key
from btkit.io import read_journal

from conftest import read_jsonl, write_jsonl

VOCAB = "river stone cloud market engine garden letter window signal harbor forest lantern copper meadow quartz ribbon".split()
DET_RULES = [{"contains": "5-point scale", "reply": "Reasoning: it answers the request.\nScore: {digit}"}]


def make_corpus(path: Path, docs: int, seed: int = 7) -> Path:
    """Documents of 1-3 paragraphs; with --max-words 40 most paragraphs are one segment, a few too short."""
    rng = random.Random(seed)
    rows = []
    for i in range(docs):
        paras = [" ".join(f"{rng.choice(VOCAB)}{rng.randint(0, 999)}" for _ in range(rng.choice([12, 32, 35, 38])))
                 for _ in range(rng.randint(1, 3))]
        rows.append({"id": f"doc{i}", "text": "\n\n".join(paras)})
    return write_jsonl(path, rows)


def det_backend(workdir: Path, delay: float = 0.01) -> str:
    """A deterministic backend configured in ``workdir``; run btkit there (the spec and the request
    log are relative, so two runs in two folders have identical prompts, lineage and cache keys)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "det.json").write_text(json.dumps({"rules": DET_RULES, "default": "What does note {hash} explain about the topic?",
                                                  "delay": delay, "log": "requests.jsonl"}))
    return "det:det.json"


def btkit_cmd(corpus: Path, out: Path, model: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(out), "--model", model,
            "--cache", str(cache), "--judge-mode", "rubric", "--threshold", "3", "--candidates", "2",
            "--max-words", "40", "--concurrency", "4", "-q", *extra]


def normalised(lines: list[dict]) -> list[dict]:
    """Output lines minus what legitimately differs between runs (whether a call was a cache hit)."""
    out = []
    for line in lines:
        line = json.loads(json.dumps(line))
        for step in line.get("meta", {}).get("lineage", []):
            step.pop("cached", None)
        out.append(line)
    return out


def cache_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    db = sqlite3.connect(str(path))
    try:
        return {r[0] for r in db.execute("SELECT key FROM entries")}
    finally:
        db.close()


def request_key(model: str, request: dict) -> str:
    """The engine's cache key for a request the det backend logged (checked against the cache below)."""
    if request["kind"] == "chat":
        params = dict(request["params"])
        prefix = params.pop("assistant_prefix", "")
        payload = {"messages": request["messages"], "assistant_prefix": prefix, "params": params}
    else:
        payload = {"messages": request["messages"], "assistant_prefix": request["assistant_prefix"], "candidates": request["candidates"]}
    return cache_key(request["kind"], {"spec": model}, payload)


def logged_requests(log: Path) -> list[dict]:
    """Requests the backend received; a line torn by the kill is a request that never got an answer."""
    out = []
    if log.exists():
        for raw in log.read_bytes().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
    return out


def journal_copy(out: Path, tmp: Path) -> list[dict]:
    """The journal as a resuming run will read it (torn tail cut), read from a copy so the kill
    point is left untouched for the next process."""
    src = out / "candidates.jsonl"
    if not src.exists():
        return []
    copy = tmp / "journal-copy.jsonl"
    shutil.copyfile(src, copy)
    return list(read_journal(copy, "unit_seq", "unit_records"))


def run_json_mtime(out: Path) -> int | None:
    try:
        return (out / "run.json").stat().st_mtime_ns
    except FileNotFoundError:
        return None


def line_count(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return fh.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.jsonl", docs=80)

    # The uninterrupted reference run: its own cache, log and output.
    ref_dir = tmp_path / "ref"
    model = det_backend(ref_dir)
    ref_out = ref_dir / "out"
    proc = subprocess.run(btkit_cmd(corpus, ref_out, model, ref_dir / "cache.sqlite"), cwd=ref_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reference = normalised(read_jsonl(ref_out / "data.jsonl"))
    ref_journal = list(read_journal(ref_out / "candidates.jsonl"))
    ref_stats = json.loads((ref_out / "stats.json").read_text())
    assert len(reference) > 40 and ref_stats["dropped_by_reason"].get("humpback.segment:too_short")
    ref_ids = [l["id"] for l in ref_journal]
    assert len(ref_ids) == len(set(ref_ids))

    # The same run, killed with SIGKILL again and again, each time resumed with the same command.
    work = tmp_path / "killed"
    det_backend(work)
    out, cache = work / "out", work / "cache.sqlite"
    cmd = btkit_cmd(corpus, out, model, cache)
    rng = random.Random(20261122)
    kills, points = 0, []
    cached_at_start: dict[int, set[str]] = {}  # pid -> cache keys present when that process started
    for attempt in range(60):
        before = cache_keys(cache)
        start_lines = line_count(out / "candidates.jsonl")
        run_json_before = run_json_mtime(out)
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cached_at_start[proc.pid] = before
        # Kill points: a random time after spawning (imports, validation, resume bookkeeping); a
        # random time after the run started working (run.json rewritten: calls, cache writes,
        # journal appends); or right after the journal grew by k lines (between journal and data).
        kind = rng.choice(["startup", "working", "working", "lines", "lines"]) if kills < 12 else "none"
        point = (kind, {"startup": rng.uniform(0.05, 0.9), "working": rng.uniform(0.0, 0.3), "lines": rng.randint(1, 15), "none": 0}[kind])
        t0, t_working = time.monotonic(), None
        while proc.poll() is None:
            if kind == "startup" and time.monotonic() - t0 >= point[1]:
                break
            if kind == "working":
                if t_working is None and run_json_mtime(out) != run_json_before:
                    t_working = time.monotonic()
                if t_working is not None and time.monotonic() - t_working >= point[1]:
                    break
            if kind == "lines" and line_count(out / "candidates.jsonl") >= start_lines + point[1]:
                break
            if time.monotonic() - t0 > 60:
                break
            time.sleep(0.002)
        if proc.poll() is None and point[0] != "none":
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            points.append(point)
            # After every kill: no published output unless complete, the journal is a prefix of
            # the reference journal with no duplicate records.
            if (out / "data.jsonl").exists():
                assert normalised(read_jsonl(out / "data.jsonl")) == reference
            journal = journal_copy(out, tmp_path)
            ids = [l["id"] for l in journal]
            assert len(ids) == len(set(ids)), f"duplicate records after kill {kills} at {point}"
            assert ids == ref_ids[: len(ids)], f"journal is not a prefix of the reference after kill {kills} at {point}"
            continue
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.wait()
        assert proc.returncode == 0, stderr
        if kills >= 10:
            break
    assert kills >= 10, f"only {kills} kills landed: {points}"

    # Nothing lost, nothing duplicated: the final output equals the uninterrupted run's.
    assert normalised(read_jsonl(out / "data.jsonl")) == reference
    journal = list(read_journal(out / "candidates.jsonl"))
    assert [l["id"] for l in journal] == ref_ids
    stats = json.loads((out / "stats.json").read_text())
    for key in ("units", "records", "kept", "dropped", "dropped_by_reason", "parse_failures"):
        assert stats[key] == ref_stats[key], key
    assert not (out / "data.jsonl.partial").exists()

    # No request whose answer had reached the cache was ever sent again.
    requests = logged_requests(work / "requests.jsonl")
    final_keys = cache_keys(cache)
    keys_by_pid: dict[int, set[str]] = {}
    for r in requests:
        keys_by_pid.setdefault(r["pid"], set()).add(request_key(model, r))
    assert set().union(*keys_by_pid.values()) == final_keys  # the key reconstruction is the engine's
    for pid, sent in keys_by_pid.items():
        resent = sent & cached_at_start[pid]
        assert not resent, f"process {pid} re-sent {len(resent)} requests that were already answered in the cache"
    # Re-sent requests are only those in flight at a kill (at most --concurrency per kill).
    ref_requests = logged_requests(ref_dir / "requests.jsonl")
    assert len(requests) - len(ref_requests) <= 4 * kills, (len(requests), len(ref_requests), kills)


def _small_run(cli, tmp_path, out: Path, *extra) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        make_corpus(corpus, docs=8)
    model = det_backend(tmp_path / "det", delay=0)
    os.chdir(tmp_path / "det")
    r = cli("run", "humpback", corpus, "-o", out, "--model", model, "--judge-mode", "rubric", "--threshold", "3",
            "--candidates", "2", "--max-words", "40", "-q", *extra)
    assert r.exit_code == 0, r.output
    return out


def test_a_unit_cut_short_in_the_journal_is_redone_whole(cli, tmp_path, monkeypatch):
    """One os.write per unit can still be cut short by a kill (Linux checks for fatal signals
    between pages): a last unit with fewer lines than it announced is redone, not half kept."""
    monkeypatch.chdir(tmp_path)
    ref_out = _small_run(cli, tmp_path, tmp_path / "ref")
    ref = normalised(read_jsonl(ref_out / "data.jsonl"))
    ref_ids = [l["id"] for l in read_jsonl(ref_out / "candidates.jsonl")]
    out = _small_run(cli, tmp_path, tmp_path / "out")
    lines = (out / "candidates.jsonl").read_bytes().splitlines(keepends=True)
    groups = [json.loads(l)["unit_records"] for l in lines]
    cut = max(i for i, n in enumerate(groups) if n == 2 and (i == 0 or json.loads(lines[i - 1])["unit_seq"] != json.loads(lines[i])["unit_seq"]))
    # keep the first line of the last two-record unit and half of its second line
    (out / "candidates.jsonl").write_bytes(b"".join(lines[: cut + 1]) + lines[cut + 1][:40])
    for name in ("data.jsonl", "stats.json", "failures.jsonl"):
        (out / name).unlink()
    _small_run(cli, tmp_path, out)
    assert normalised(read_jsonl(out / "data.jsonl")) == ref
    assert [l["id"] for l in read_jsonl(out / "candidates.jsonl")] == ref_ids


def test_a_damaged_line_inside_the_journal_stops_with_a_clear_error(cli, tmp_path, monkeypatch):
    """Only a torn *end* is cut; damage in the middle must not silently discard what follows."""
    monkeypatch.chdir(tmp_path)
    out = _small_run(cli, tmp_path, tmp_path / "out")
    lines = (out / "candidates.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = b"{not json\n"
    (out / "candidates.jsonl").write_bytes(b"".join(lines))
    before = (out / "candidates.jsonl").read_bytes()
    corpus = tmp_path / "corpus.jsonl"
    r = cli("run", "humpback", corpus, "-o", out, "--model", "det:det.json", "--judge-mode", "rubric", "--threshold", "3",
            "--candidates", "2", "--max-words", "40", "-q")
    assert r.exit_code == 2
    assert "candidates.jsonl:4: damaged journal line" in r.output
    assert (out / "candidates.jsonl").read_bytes() == before


def _killed_half_way(cli, tmp_path):
    """A finished small run cut back to half its journal and no data.jsonl, as a kill would leave it."""
    out = _small_run(cli, tmp_path, tmp_path / "out")
    (out / "data.jsonl").unlink()
    journal = out / "candidates.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[: len(lines) // 2]))
    return out


def test_resume_notices_an_input_that_changed_under_it(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _killed_half_way(cli, tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    rows = read_jsonl(corpus)
    rows[0]["id"], rows[1]["id"] = rows[1]["id"], rows[0]["id"]  # same size, different units
    write_jsonl(corpus, rows)
    r = cli("run", "humpback", corpus, "-o", out, "--model", "det:det.json", "--judge-mode", "rubric", "--threshold", "3",
            "--candidates", "2", "--max-words", "40", "-q")
    assert r.exit_code == 2 and "changed since" in r.output and "--overwrite" in r.output


def test_resume_notices_text_edited_in_place_with_the_same_ids_and_size(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _killed_half_way(cli, tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    before = corpus.stat().st_size
    rows = read_jsonl(corpus)
    words = rows[0]["text"].split(" ")
    words[0], words[1] = words[1], words[0]  # same ids, same byte size, other text
    rows[0]["text"] = " ".join(words)
    write_jsonl(corpus, rows)
    assert corpus.stat().st_size == before
    r = cli("run", "humpback", corpus, "-o", out, "--model", "det:det.json", "--judge-mode", "rubric", "--threshold", "3",
            "--candidates", "2", "--max-words", "40", "-q")
    assert r.exit_code == 2 and "changed since" in r.output


def test_resume_with_nothing_left_to_do_republishes_the_same_output(cli, tmp_path, monkeypatch):
    """Killed after data.jsonl was published but before stats.json: re-running completes it."""
    monkeypatch.chdir(tmp_path)
    out = _small_run(cli, tmp_path, tmp_path / "out")
    first = (out / "data.jsonl").read_bytes()
    (out / "stats.json").unlink()
    _small_run(cli, tmp_path, out)
    assert normalised(read_jsonl(out / "data.jsonl")) == normalised([json.loads(l) for l in first.splitlines()])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["units_resumed"] == stats["units"] and stats["model_calls_this_invocation"] == 0
