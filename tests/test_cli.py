"""The listing commands (methods, backends), the progress display, and the run start/end hooks."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

from btkit.progress import progress_text
from btkit.hookspecs import hookimpl

from conftest import ROOT, read_jsonl, words, write_jsonl


def test_methods_shows_each_methods_stages_inputs_outputs_and_paper(cli):
    r = cli("methods", "--json")
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.output)}
    assert {"humpback", "backforth", "kun", "crab", "air"} <= set(rows)
    hb = rows["humpback"]
    assert "2308.06259" in hb["paper"] and hb["default_stages"] == ["augment", "curate"]
    augment = next(s for s in hb["stages"] if s["name"] == "augment")
    assert "text" in augment["inputs"] and "instruction" in augment["outputs"]
    for m in rows.values():
        assert m["stages"] and all(s["inputs"] for s in m["stages"]), m["name"]  # a filter may output nothing new
    text = cli("methods").output
    assert "paper: " in text and "- curate (curate):" in text


def test_backends_lists_every_registered_prefix_with_its_plugin(cli):
    r = cli("backends")
    assert r.exit_code == 0, r.output
    prefixes = {line.split()[0] for line in r.output.splitlines() if line.strip()}
    assert {"llamacpp:", "openai:", "vllm:", "litellm:", "echo:", "scripted:"} <= prefixes
    assert "(plugin llamacpp)" in r.output


def test_progress_text_counts_records_tokens_and_cost():
    progress = {"kept": 3, "dropped": 1, "tokens_in": 12_345, "tokens_out": 678, "cost_usd": 0.0}
    assert progress_text(progress) == "kept=3 dropped=1 tokens=12.3k+678"
    assert progress_text({**progress, "cost_usd": 0.01234}).endswith("cost=$0.0123")


def _run_on_a_terminal(tmp_path, *extra: str) -> str:
    """Run `btkit run humpback` with stderr on a pseudo-terminal; return what the terminal showed."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(3)])
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    env = {**os.environ, "BTKIT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(out),
                             "--model", "echo:What do the listed words mean?", "--judge-mode", "rubric", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary, cwd=ROOT, env=env)
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(main)
    assert proc.returncode == 0, seen.decode("utf-8", "replace")
    assert read_jsonl(out / "candidates.jsonl")
    return seen.decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_and_quiet_otherwise(tmp_path, cli):
    shown = _run_on_a_terminal(tmp_path)
    assert "units" in shown and "kept=" in shown and "tokens=" in shown and "unit/s" in shown
    assert "kept=" not in _run_on_a_terminal(tmp_path, "--quiet")
    corpus = write_jsonl(tmp_path / "c2.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "o", "--model", "echo:What is it?", "--judge-mode", "rubric")
    assert r.exit_code == 0 and "kept=" not in r.output  # not a terminal: only the summary line
    assert r.output.startswith("done: ")


class _Observer:
    def __init__(self):
        self.events = []

    @hookimpl
    def btkit_run_start(self, run):
        self.events.append(("start", str(run.out), (run.out / "run.json").exists()))

    @hookimpl
    def btkit_run_end(self, run, stats):
        self.events.append(("end", stats["status"], stats["units"], (run.out / "data.jsonl").exists()))


def test_run_start_and_end_hooks_see_the_run_and_its_stats(registry, cli, scripted, tmp_path):
    observer = _Observer()
    registry.register(observer, name="observer")
    backend, spec = scripted(default="What do the listed words mean?", logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(2)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    assert observer.events == [("start", str(tmp_path / "out"), True), ("end", "complete", 2, True)]
