"""Helpers of the sharded-run tests (test_shards.py, test_ray_executor.py): a corpus, btkit processes
against the deterministic fake server, a shard killed for real, and the comparisons users rely on."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from btkit.testing.fake_openai import FakeOpenAIServer

WORDS = ("apt dpkg package mirror kernel module archive release security update source binary "
         "maintainer changelog upload bug report policy section priority").split()


def write_corpus(path: Path, docs: int, seed: int = 3, duplicate: bool = True) -> Path:
    """``docs`` documents of 45 words (text written here), plus one repeated document (dropped as a duplicate)."""
    rng = random.Random(seed)
    lines = [{"id": f"doc{i}", "text": " ".join(rng.choice(WORDS) for _ in range(45))} for i in range(docs)]
    if duplicate:
        lines.append({"id": "again", "text": lines[0]["text"]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def btkit_args(server: FakeOpenAIServer, corpus: Path, out: Path, method: str = "humpback", *extra: str) -> list[str]:
    return [sys.executable, "-m", "btkit.cli", "run", method, str(corpus), "-o", str(out), "--model", "openai:fake-model",
            "--base-url", server.base_url, "--judge-mode", "rubric", "--keep-top", "50", "--min-words", "10", "-q", *extra]


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "BTKIT_CACHE_DIR": str(tmp / "default-cache"), "OPENAI_API_KEY": "sk-test", "BTKIT_STATUS_EVERY": "1"}


def run(args: list[str], tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env(tmp), capture_output=True, text=True, timeout=timeout)


def journal_units(path: Path) -> int:
    try:
        return len({json.loads(line)["unit_seq"] for line in path.read_text().splitlines() if line.strip()})
    except (OSError, ValueError):
        return 0  # not there yet, or a line being written


def kill_shard_when(shard_dir: Path, units: int, proc: subprocess.Popen, limit_s: float = 120) -> float:
    """SIGKILL the process that holds ``shard_dir``'s lock once its journal holds ``units`` units; the kill's time."""
    deadline = time.monotonic() + limit_s
    journal = shard_dir / "candidates.jsonl"
    while journal_units(journal) < units:
        assert proc.poll() is None, f"the run ended before shard {shard_dir.name} reached {units} units"
        assert time.monotonic() < deadline, f"shard {shard_dir.name} did not reach {units} units in {limit_s}s"
        time.sleep(0.02)
    pid = int((shard_dir / ".lock").read_text().split()[0])
    assert pid != os.getpid()
    at = time.time()
    os.kill(pid, signal.SIGKILL)
    return at


def without_cache_flags(path: Path) -> list[dict[str, Any]]:
    """The file's lines with each lineage step's ``cached`` flag removed: a call answered before a kill and
    journalled after it comes back from the cache; everything else must be byte-for-byte the same data."""
    lines = []
    for raw in path.read_text().splitlines():
        line = json.loads(raw)
        meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
        for step in (line.get("lineage") or []) + (meta.get("lineage") or []):  # journal lines; data.jsonl lines
            step.pop("cached", None)
        lines.append(line)
    return lines


def resent_requests(server: FakeOpenAIServer) -> list[tuple[Any, Any]]:
    """``(first copy, later copy)`` for every request the server got more than once."""
    first: dict[str, Any] = {}
    again = []
    for r in list(server.requests):
        if r.digest in first:
            again.append((first[r.digest], r))
        else:
            first[r.digest] = r
    return again


def assert_no_completed_call_resent(server: FakeOpenAIServer, kills: list[float], in_flight: int, margin_s: float = 2.0) -> None:
    """A request may reach the server twice only if its first copy was in flight when a shard was killed:
    not answered long before the kill (an answered call is cached at once) and not sent long after it
    (``received`` is when the server's handler read it, which may be a moment after the client sent it)."""
    again = resent_requests(server)
    assert len(again) <= in_flight * len(kills), f"{len(again)} requests sent twice; at most {in_flight} per kill were in flight"
    for first, later in again:
        assert any(first.received <= k + margin_s and (first.answered is None or first.answered >= k - margin_s) for k in kills), (
            f"request {first.digest[:12]} was answered at {first.answered:.2f} (kills at {kills}) and sent again at {later.received:.2f}")
