"""Nothing lost, nothing duplicated, no busy loop: the run loop, the run directory and the cache
under faults (issue 11). Real files, a real SQLite cache, real processes where a lock or a signal
is what is tested."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btkit.cache import Cache
from btkit.errors import BackendError
from btkit.testing.backends import ScriptedBackend

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
CURATE = "Reasoning: fine.\nScore: 5"


def corpus(tmp_path: Path, n: int, name: str = "corpus.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"id": f"doc{i}", "text": words(40, 50 * i)} for i in range(n)])


def reply(messages, params) -> str:
    text = messages[-1]["content"]
    return CURATE if "5-point" in text or "Score" in text else "What does this passage explain?"


def humpback(cli, data: Path, out: Path, spec: str, *extra):
    return cli("run", "humpback", data, "-o", out, "--model", spec, "--judge-mode", "rubric", "--threshold", "3", "-q", *extra)


def error_line(result) -> str:
    lines = [l for l in (result.stderr or result.output).splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- 0: the run loop waits, it does not spin ---------------------------------------------------
class JitteredBackend(ScriptedBackend):
    """Replies after 50-400 ms, so later units routinely finish before the head of the window."""

    def __init__(self):
        super().__init__(default=reply)
        self.rng = random.Random(3)

    async def chat(self, messages, params):
        import asyncio

        await asyncio.sleep(self.rng.uniform(0.05, 0.4))
        return await super().chat(messages, params)


@pytest.mark.slow
def test_waiting_for_out_of_order_replies_costs_no_cpu(cli, doubles, tmp_path):
    backend = doubles.script("jitter", JitteredBackend())
    data = corpus(tmp_path, 100)
    wall0, cpu0 = time.monotonic(), time.process_time()
    r = humpback(cli, data, tmp_path / "out", backend.spec, "--concurrency", "8")
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "out" / "data.jsonl")) == 100
    # Measured here: 0.06 of the wall time waiting on the head unit, 0.28 for a loop that wakes
    # whenever any later unit is done (it wakes again at once until the head is done).
    assert cpu < 0.15 * wall, (cpu, wall)


# -- 1: a cache that fails is a saving lost, not records lost --------------------------------
def test_a_full_cache_loses_no_reply(cli, scripted, tmp_path, monkeypatch):
    _, spec = scripted(default=reply)
    original = Cache.__init__

    def full_after_open(self, *a, **k):
        original(self, *a, **k)
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL from here on

    monkeypatch.setattr(Cache, "__init__", full_after_open)
    r = humpback(cli, corpus(tmp_path, 30), tmp_path / "out", spec)
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["kept"] == 30 and stats["dropped"] == 0
    assert stats["cache_errors"] > 0
    assert not [c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl") if c["reason"] == "stage_error"]
    assert r.output.count("warning: cache") == 1


@pytest.mark.slow
def test_damaged_cache_pages_lose_no_reply(cli, scripted, tmp_path):
    _, spec = scripted(default=reply)
    cache = tmp_path / "c.sqlite"
    data = write_jsonl(tmp_path / "big.jsonl", [{"id": f"d{i}", "text": words(40, 50 * i) + " " + "x" * 3000} for i in range(60)])
    assert humpback(cli, data, tmp_path / "a", spec, "--cache", cache).exit_code == 0
    db = sqlite3.connect(cache)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    size = cache.stat().st_size
    with cache.open("r+b") as fh:  # garble pages past the header and the first pages
        for offset in range(8 * 4096, size - 4096, 8192):
            fh.seek(offset)
            fh.write(os.urandom(2048))
    r = humpback(cli, data, tmp_path / "b", spec, "--cache", cache)
    if r.exit_code == 2:  # the damage reached the schema: refused at open, before any call
        assert str(cache) in error_line(r)
        return
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["kept"] == 60 and stats["cache_errors"] > 0


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_a_cache_file_that_is_not_a_database_stops_before_any_call(cli, scripted, tmp_path, damage):
    backend, spec = scripted(default=reply)
    cache = tmp_path / "c.sqlite"
    assert humpback(cli, corpus(tmp_path, 2), tmp_path / "a", spec, "--cache", cache).exit_code == 0
    calls = len(backend.history)
    if damage == "garbled":
        with cache.open("r+b") as fh:
            fh.write(b"this is not SQLite" * 6)
    else:
        with cache.open("r+b") as fh:
            fh.truncate(40)
    r = humpback(cli, corpus(tmp_path, 2), tmp_path / "b", spec, "--cache", cache)
    assert r.exit_code == 2 and str(cache) in error_line(r) and "--no-cache" in error_line(r)
    assert len(backend.history) == calls


def test_a_cache_path_under_a_regular_file_is_one_line(cli, scripted, tmp_path):
    _, spec = scripted(default=reply)
    (tmp_path / "plain").write_text("x")
    r = humpback(cli, corpus(tmp_path, 2), tmp_path / "out", spec, "--cache", tmp_path / "plain" / "c.sqlite")
    assert r.exit_code == 2 and "plain" in error_line(r)


def test_the_first_writer_of_a_key_wins(tmp_path):
    a, b = Cache(tmp_path / "c.sqlite"), Cache(tmp_path / "c.sqlite")
    assert a.put("k", "chat", "t", {"text": "first"}) == {"text": "first"}
    assert b.put("k", "chat", "t", {"text": "second"}) == {"text": "first"}
    assert b.get("k") == {"text": "first"}


# -- 2: one run per directory -------------------------------------------------------------------
def det(workdir: Path, delay: float) -> str:
    (workdir / "det.json").write_text(json.dumps({"rules": [{"contains": "5-point scale", "reply": CURATE}],
                                                  "default": "What does note {hash} explain?", "delay": delay}))
    return "det:det.json"


def run_cmd(data: Path, out: Path, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "btkit.cli", "run", "humpback", str(data), "-o", str(out), "--model", model,
            "--judge-mode", "rubric", "--threshold", "1", "--concurrency", "2", "-q", *extra]


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_run_on_the_same_directory_is_refused_and_the_lock_dies_with_the_first(tmp_path):
    model = det(tmp_path, 0.05)
    data, out = corpus(tmp_path, 40), tmp_path / "out"
    first = subprocess.Popen(run_cmd(data, out, model), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "candidates.jsonl").exists() and (out / "candidates.jsonl").stat().st_size > 0)
        second = subprocess.run(run_cmd(data, out, model), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"in use by another btkit run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS released the lock with the process: the same command resumes, each record once
    again = subprocess.run(run_cmd(data, out, model), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    ids = [d["meta"]["id"] for d in read_jsonl(out / "data.jsonl")]
    assert len(ids) == len(set(ids)) == 40


# -- 3: ids -----------------------------------------------------------------------------------
def test_duplicate_ids_are_refused_with_their_lines(cli, scripted, tmp_path):
    backend, spec = scripted(default=reply)
    rows = [{"id": f"d{i}", "text": words(40, 50 * i)} for i in range(6)]
    rows[4]["id"] = "d1"
    r = humpback(cli, write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "out", spec)
    assert r.exit_code == 2
    assert "c.jsonl:5: field 'id': duplicate id 'd1' (first on line 2)" in error_line(r)
    assert backend.history == [] and not (tmp_path / "out").exists()


def test_an_id_called_extra_or_seed_is_an_ordinary_id(cli, scripted, tmp_path):
    """Ids may look like btkit's own names: keep-top then cuts exactly the records it ranks."""
    seed = write_jsonl(tmp_path / "seed.jsonl", [{"instruction": f"Question {i}?", "response": words(40, 900 + i)} for i in range(3)])
    rows = [{"id": name, "text": words(40, 50 * i)} for i, name in enumerate(["extra", "seed", "a", "b"])]
    # pmi 4, 1, 3, 2 for extra, seed, a, b: the document "seed" (segment "seed#0") is cut, the seed pair "seed#0" is not
    by_doc = {words(40, 50 * i)[:30]: v for i, v in enumerate([-1.0, -4.0, -2.0, -3.0])}

    def logprobs(messages, continuation):
        if messages is None:
            return [-5.0] * 3
        return [next(v for k, v in by_doc.items() if continuation.startswith(k))] * 3

    _, spec = scripted(default=reply, continuation_logprobs=logprobs)
    r = cli("run", "humpback", write_jsonl(tmp_path / "c.jsonl", rows), "-o", tmp_path / "out", "--model", spec,
            "--seed", seed, "--mix-seed", "--judge-mode", "pmi", "--keep-top", "50", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert sum(1 for d in data if d["meta"].get("source") == "seed") == 3  # "seed#0" the seed pair survives
    assert sorted(d["meta"]["source_id"] for d in data if d["meta"].get("source") != "seed") == ["a", "extra"]


# -- 4: a re-run retries what failed ------------------------------------------------------------
def test_rerun_after_an_outage_retries_failed_calls_and_repays_nothing(cli, scripted, tmp_path):
    down = {"on": True}

    def flaky(messages, params):
        text = messages[-1]["content"]
        if down["on"] and (words(40, 150)[:40] in text or words(40, 350)[:40] in text):
            raise BackendError("503 Service Unavailable")
        return reply(messages, params)

    backend, spec = scripted(default=flaky)
    data, out = corpus(tmp_path, 10), tmp_path / "out"
    assert humpback(cli, data, out, spec).exit_code == 0
    first = json.loads((out / "stats.json").read_text())
    assert first["backend_failures"] == 2 and first["kept"] == 8
    calls_before = len(backend.history)
    down["on"] = False
    assert humpback(cli, data, out, spec).exit_code == 0
    second = json.loads((out / "stats.json").read_text())
    assert second["backend_failures"] == 0 and second["kept"] == 10 and second["units_retried"] == 2
    # only the two failed units were asked again: one augment + one curate each
    assert len(backend.history) - calls_before == 4
    ids = [d["meta"]["source_id"] for d in read_jsonl(out / "data.jsonl")]
    assert ids == [f"doc{i}" for i in range(10)]  # published in input order


# -- 5, 7: in-place edits, --overwrite, --limit ------------------------------------------------------
def test_an_input_edited_in_place_never_deletes_the_published_output(cli, scripted, tmp_path):
    _, spec = scripted(default=reply)
    data, out = corpus(tmp_path, 5), tmp_path / "out"
    assert humpback(cli, data, out, spec).exit_code == 0
    published = (out / "data.jsonl").read_bytes()
    rows = read_jsonl(data)
    rows[2]["text"] = rows[2]["text"].replace("alpha", "ALPHA")  # same size, same ids
    write_jsonl(data, rows)
    r = humpback(cli, data, out, spec)
    assert r.exit_code == 2 and "changed since" in error_line(r) and "--overwrite" in error_line(r)
    assert (out / "data.jsonl").read_bytes() == published
    # the suggested way out works, twice in the same second, and moves the old files aside
    assert humpback(cli, data, out, spec, "--overwrite").exit_code == 0
    assert humpback(cli, data, out, spec, "--overwrite").exit_code == 0
    backups = sorted(p for p in out.iterdir() if p.name.startswith("previous-"))
    assert len(backups) == 2 and (backups[0] / "data.jsonl").read_bytes() == published
    assert "ALPHA" in (out / "data.jsonl").read_text()


def test_resuming_with_a_smaller_limit_is_refused_and_a_larger_one_extends(cli, scripted, tmp_path):
    _, spec = scripted(default=reply)
    data, out = corpus(tmp_path, 12), tmp_path / "out"
    assert humpback(cli, data, out, spec, "--limit", "8").exit_code == 0
    r = humpback(cli, data, out, spec, "--limit", "4")
    assert r.exit_code == 2 and "--limit 4" in error_line(r)
    assert len(read_jsonl(out / "data.jsonl")) == 8
    assert humpback(cli, data, out, spec, "--limit", "12").exit_code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert len(read_jsonl(out / "data.jsonl")) == 12 and stats["units_resumed"] == 8
    assert stats["wall_time_s"] > stats["this_invocation_s"]  # the whole run, both invocations


# -- 6: an input that changes while the run reads it -------------------------------------------------
@pytest.mark.parametrize("change", ["truncate", "append"])
def test_an_input_changed_mid_run_stops_the_run_and_resumes(cli, scripted, tmp_path, change):
    data, out = corpus(tmp_path, 30), tmp_path / "out"
    original = data.read_bytes()
    lines = original.splitlines(keepends=True)
    done = {"changed": False}

    def changing(messages, params):
        if not done["changed"]:
            done["changed"] = True
            data.write_bytes(b"".join(lines[:10]) if change == "truncate" else original + lines[0].replace(b"doc0", b"appended-late-doc"))
        return reply(messages, params)

    backend, spec = scripted(default=changing)
    r = humpback(cli, data, out, spec, "--concurrency", "1")
    assert r.exit_code == 2 and "changed while the run read it" in error_line(r)
    assert not (out / "data.jsonl").exists()
    assert not any("appended-late-doc" in json.dumps(c) for c in read_jsonl(out / "candidates.jsonl"))
    data.write_bytes(original)
    assert humpback(cli, data, out, spec).exit_code == 0
    assert [d["meta"]["source_id"] for d in read_jsonl(out / "data.jsonl")] == [f"doc{i}" for i in range(30)]


# -- 7b: Ctrl-C ------------------------------------------------------------------------------------
@pytest.mark.model
def test_ctrl_c_during_a_llamacpp_call_exits_130_and_resumes(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(EXAMPLES / "corpus.jsonl"), "-o", str(out), "--limit", "3",
           "--cache", str(tmp_path / "c.sqlite")]
    # A shell that starts a job in the background makes it ignore SIGINT, and Python keeps an ignored
    # SIGINT ignored: give the child the default disposition a terminal's foreground job has.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "BTKIT_STATUS_EVERY": "0"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: (out / "run.json").exists(), 60)
    time.sleep(3)  # the model is loaded and decoding
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "interrupted" in err and "re-run the same command to resume" in err
    assert "Segmentation" not in err and "Traceback" not in err


# -- 7c: a dead endpoint stops the run -----------------------------------------------------------------
def test_a_dead_endpoint_stops_the_run_naming_it(tmp_path, registry, cli, monkeypatch):
    import socket

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path, 30), "-o", out, "--model", "openai:m", "--base-url", url,
            "-B", "max_retries=0", "--judge-mode", "rubric", "-q")
    assert r.exit_code != 0
    line = error_line(r)
    assert url in line and "failed" in line and "re-run the same command" in line
    assert not (out / "data.jsonl").exists()
    stats_lines = read_jsonl(out / "candidates.jsonl") if (out / "candidates.jsonl").exists() else []
    assert len(stats_lines) < 30  # stopped early, not a "complete" run of failures


# -- 7d: progress a user can read ------------------------------------------------------------------
@pytest.mark.slow
def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    model = det(tmp_path, 0.05)
    data, out = corpus(tmp_path, 30), tmp_path / "out"
    cmd = [c for c in run_cmd(data, out, model) if c != "-q"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "BTKIT_STATUS_EVERY": "0.3"})
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("progress:")]
    assert lines, r.stderr
    assert "/30 units (" in lines[-1] and "units/s" in lines[-1] and "ETA" in lines[-1]


# -- 17: truthful counts --------------------------------------------------------------------------------
def test_stats_count_real_stage_flow_and_failed_calls(cli, scripted, tmp_path):
    rows = [{"id": f"d{i}", "text": words(40, 50 * i)} for i in range(6)] + [{"id": "short", "text": "Too short to use."}]

    def failing_one(messages, params):
        if words(40, 100)[:40] in messages[-1]["content"] and "5-point" not in messages[-1]["content"]:
            raise BackendError("500 boom", attempts=3)
        return reply(messages, params)

    _, spec = scripted(default=failing_one)
    out = tmp_path / "out"
    assert humpback(cli, write_jsonl(tmp_path / "c.jsonl", rows), out, spec).exit_code == 0
    stats = json.loads((out / "stats.json").read_text())
    augment, curate = stats["stages"]["humpback.augment"], stats["stages"]["humpback.curate"]
    assert stats["dropped_while_preparing"] == {"too_short": 1}
    assert augment["in"] == 6 and augment["out"] == 5 and augment["dropped"] == {"backend_error": 1}
    assert curate["in"] == 5 and curate["out"] == 5
    assert augment["calls"] == 6 and augment["failed_calls"] == 1 and augment["retries"] == 2
    assert augment["requests_sent"] == 8  # 6 requests + 2 retries, as a server would count them


# -- 18: no call for a record the whole-run cut drops -------------------------------------------------
def test_keep_top_holds_later_stages_until_the_cut_is_known(cli, scripted, tmp_path):
    texts = [words(40, 50 * i) for i in range(10)]

    def logprobs(messages, continuation):  # pmi rises with the document's index
        if messages is None:
            return [-5.0] * 3
        return [-4.0 + 0.3 * next(i for i, t in enumerate(texts) if continuation.startswith(t[:30]))] * 3

    def answer(messages, params):
        text = messages[-1]["content"]
        return "Here is a clear answer in an assistant's voice about it." if "Rewrite the document" in text else "What does it explain?"

    backend, spec = scripted(default=answer, continuation_logprobs=logprobs)
    data = write_jsonl(tmp_path / "c.jsonl", [{"id": f"doc{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    r = cli("run", "backforth", data, "-o", out, "--model", spec, "--judge-mode", "pmi", "--keep-top", "30", "-q")
    assert r.exit_code == 0, r.output
    rewrites = [h for h in backend.history if "Rewrite the document" in json.dumps(h)]
    kept = read_jsonl(out / "data.jsonl")
    assert sorted(d["meta"]["source_id"] for d in kept) == ["doc7", "doc8", "doc9"]
    assert len(rewrites) == 3  # before: one per pair above the streaming threshold, 10 here
    assert all(d["meta"]["original_response"] for d in kept)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["backforth.rewrite"]["in"] == 3
    assert stats["stages"]["backforth.curate"]["dropped_at_end"] == {"below_keep_top": 7}
    assert not (out / "candidates.held.jsonl").exists()
    assert not [c for c in read_jsonl(out / "candidates.jsonl") if c.get("held")]


@pytest.mark.slow
def test_a_kill_in_the_second_pass_resumes_without_paying_twice(tmp_path):
    (tmp_path / "det.json").write_text(json.dumps({"rules": [{"contains": "5-point scale", "reply": "Fine.\nScore: {digit}"},
                                                             {"contains": "Rewrite the document", "reply": "An answer about note {hash} in five words or more."}],
                                                   "default": "What does note {hash} explain?", "delay": 0.03, "log": "requests.jsonl"}))
    data, out = corpus(tmp_path, 40), tmp_path / "out"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "backforth", str(data), "-o", str(out), "--model", "det:det.json",
           "--judge-mode", "rubric", "--keep-top", "50", "--concurrency", "2", "--cache", str(tmp_path / "c.sqlite"), "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE)
    held = out / "candidates.held.jsonl"
    wait_for(lambda: held.exists() and held.read_bytes().count(b"\n") >= 3, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = tmp_path / "requests.jsonl"
    before = [json.loads(l) for l in log.read_bytes().splitlines() if l.endswith(b"}")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    after = [json.loads(l) for l in log.read_bytes().splitlines() if l.endswith(b"}")][len(before):]
    assert not any("5-point scale" in json.dumps(a) for a in after)  # every curate reply came from the cache
    rewrites = [json.dumps(a["messages"], sort_keys=True) for a in before + after if "Rewrite the document" in json.dumps(a)]
    assert len(rewrites) - len(set(rewrites)) <= 2  # at most the calls in flight at the kill were asked twice
    # the same output as a run that was never killed
    ref = subprocess.run([*cmd[:cmd.index("-o") + 1], str(tmp_path / "ref"), *cmd[cmd.index("-o") + 2:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    strip = lambda rows: [{k: v for k, v in row.items() if k != "meta"} | {"id": row["meta"]["id"]} for row in rows]  # noqa: E731
    assert strip(read_jsonl(out / "data.jsonl")) == strip(read_jsonl(tmp_path / "ref" / "data.jsonl"))


# -- 20: a missing extra is named before anything is written --------------------------------------------
def test_a_missing_litellm_is_named_before_the_run_directory_exists(cli, registry, tmp_path, monkeypatch):
    import importlib.util

    from btkit_plugins.backends import litellm_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(litellm_backend.importlib.util, "find_spec", lambda name, *a: None if name == "litellm" else real(name, *a))
    r = cli("run", "humpback", corpus(tmp_path, 2), "-o", tmp_path / "out", "--model", "litellm:anthropic/claude-x", "-q")
    assert r.exit_code == 2 and "pip install 'btkit[remote]'" in error_line(r)
    assert not (tmp_path / "out").exists()


def test_a_journal_left_with_holes_and_out_of_order_units_is_published_in_input_order(cli, scripted, tmp_path):
    """What a killed retrying run leaves: a unit missing (to redo) and a redone unit after later ones."""
    _, spec = scripted(default=reply)
    data, out = corpus(tmp_path, 10), tmp_path / "out"
    assert humpback(cli, data, out, spec).exit_code == 0
    expected = (out / "data.jsonl").read_text().replace('"cached":false', '"cached":true')
    lines = read_jsonl(out / "candidates.jsonl")
    lines = [l for l in lines if l["unit_seq"] not in (3, 5)] + [l for l in lines if l["unit_seq"] == 5]
    write_jsonl(out / "candidates.jsonl", lines)
    (out / "data.jsonl").unlink()
    assert humpback(cli, data, out, spec).exit_code == 0
    assert (out / "data.jsonl").read_text().replace('"cached":false', '"cached":true') == expected  # unit 3 redone from the cache
    assert [l["unit_seq"] for l in read_jsonl(out / "candidates.jsonl")] == list(range(10))
