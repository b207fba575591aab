"""Sharded runs without Ray: shards as separate btkit processes (one SIGKILLed), the merge, its refusals.

Every run talks to the deterministic fake OpenAI server on 127.0.0.1 (its reply is a function of
the request), so a sharded run and a one-process run must produce the same data; the server counts
every request, which is how "no completed call sent twice" is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from btkit.records import ExtraUnit, Record
from btkit.shards import merged_command, shard_of
from btkit.testing.fake_openai import FakeOpenAIServer
from sharding import (assert_no_completed_call_resent, btkit_args, env, kill_shard_when, run, without_cache_flags,
                      write_corpus)


@pytest.fixture(scope="module")
def server():
    s = FakeOpenAIServer(latency=0.06).start()  # slow enough that a shard is still running when the test kills it
    yield s
    s.stop()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", 60)


@pytest.fixture
def whole(server, corpus, tmp_path):
    """The one-process run of ``corpus`` (its own cache, so every call reaches the server)."""
    out = tmp_path / "whole"
    done = run(btkit_args(server, corpus, out, "humpback", "--cache", str(tmp_path / "whole.sqlite")), tmp_path)
    assert done.returncode == 0, done.stderr
    return out


def same_run(a: Path, b: Path) -> None:
    """What a user compares: the data, the journal, and the counts of stats.json."""
    assert without_cache_flags(a / "data.jsonl") == without_cache_flags(b / "data.jsonl")
    assert without_cache_flags(a / "candidates.jsonl") == without_cache_flags(b / "candidates.jsonl")
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    for key in ("units", "records", "kept", "dropped", "dropped_by_reason", "tokens_in", "tokens_out"):
        assert sa[key] == sb[key], key
    assert sa["stages"]["humpback.curate"]["dropped_at_end"] == sb["stages"]["humpback.curate"]["dropped_at_end"]


def test_shard_of_is_a_stable_partition():
    units = [Record(id=f"u{i}", source_id="s", fields={"text": f"text number {i % 40}"}) for i in range(200)]
    for n in (1, 2, 3, 4, 7):
        shards = [shard_of(u, n) for u in units]
        assert all(0 <= k < n for k in shards)
        assert shards == [shard_of(u, n) for u in units]  # stable: a retried shard finds the same units
        for u, k in zip(units, shards):  # identical texts land in one shard
            assert k == shard_of(Record(id="other", source_id="x", fields={"text": u.fields["text"]}), n)
    assert len({shard_of(u, 4) for u in units}) == 4
    assert shard_of(ExtraUnit([]), 5) == 0  # the seed pairs are one unit, in shard 0
    no_text = Record(id="p", source_id="p", fields={"instruction": "a", "response": "b"})
    assert shard_of(no_text, 3) == shard_of(Record(id="q", source_id="q", fields={"response": "b", "instruction": "a"}), 3)


def test_merged_command_reruns_every_shard():
    cmd = ["btkit", "run", "humpback", "c.jsonl", "-o", "out", "--shards", "4", "--shard", "2", "-q"]
    assert merged_command(cmd) == ["btkit", "run", "humpback", "c.jsonl", "-o", "out", "--shards", "4", "-q"]
    assert merged_command(["btkit", "run", "x", "--shard=1", "--shards=2"]) == ["btkit", "run", "x", "--shards=2"]


@pytest.mark.slow
def test_job_array_shards_with_one_killed_merge_to_the_one_process_run(server, corpus, whole, tmp_path):
    """``--shards 4 --shard K`` as four separate processes (a job array), shard 1 SIGKILLed mid-run and
    started again by the same command: the merge is the one-process run, and no completed call was sent twice."""
    out, cache = tmp_path / "sharded", str(tmp_path / "shards.sqlite")
    args = lambda k: btkit_args(server, corpus, out, "humpback", "--shards", "4", "--shard", str(k), "--cache", cache,
                                "--concurrency", "2")  # noqa: E731
    server.reset()
    procs = {k: subprocess.Popen(args(k), env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)}
    kill_at = kill_shard_when(out / "shards" / "1-of-4", 3, procs[1])
    assert procs[1].wait(60) == -9
    for k in (0, 2, 3):
        assert procs[k].wait(120) == 0, procs[k].communicate()[1]
    merged = run([sys.executable, "-m", "btkit.cli", "merge", str(out)], tmp_path)
    assert merged.returncode != 0 and "shard 1 of 4 is not complete" in merged.stderr  # one line, naming what to do
    again = run(args(1), tmp_path)  # the same command resumes the killed shard
    assert again.returncode == 0, again.stderr
    assert "shard done" in again.stderr and "btkit merge" in again.stderr
    merged = run([sys.executable, "-m", "btkit.cli", "merge", str(out)], tmp_path)
    assert merged.returncode == 0, merged.stderr
    same_run(whole, out)
    assert_no_completed_call_resent(server, [kill_at], in_flight=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == 4 and [s["shard"] for s in manifest["shard_list"]] == [0, 1, 2, 3]
    assert sum(s["units"] for s in manifest["shard_list"]) == json.loads((whole / "stats.json").read_text())["units"]
    # keep-top was decided over every shard: per shard it would have kept other pairs
    dropped_at_end = json.loads((out / "stats.json").read_text())["stages"]["humpback.curate"]["dropped_at_end"]
    assert dropped_at_end.get("below_keep_top", 0) > 0
    # the dataset card's command makes the same data again: the shards' command without --shard
    card = (out / "README.md").read_text()
    assert "--shards 4" in card and "--shard 1" not in card
    # merging again changes nothing
    before = (out / "data.jsonl").read_bytes()
    again = run([sys.executable, "-m", "btkit.cli", "merge", str(out)], tmp_path)
    assert again.returncode == 0 and "already merged" in again.stderr
    assert (out / "data.jsonl").read_bytes() == before


@pytest.mark.slow
def test_local_executor_restarts_a_killed_shard_process(server, corpus, whole, tmp_path):
    """``--shards 4`` (the local executor): one shard process SIGKILLed; the executor starts it again, it
    resumes its journal, and the merged run is the one-process run."""
    out = tmp_path / "local"
    server.reset()
    driver = subprocess.Popen(btkit_args(server, corpus, out, "humpback", "--shards", "4", "--concurrency", "2",
                                         "--cache", str(tmp_path / "local.sqlite")),
                              env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_at = kill_shard_when(out / "shards" / "2-of-4", 3, driver)
    _, err = driver.communicate(timeout=240)
    assert driver.returncode == 0, err
    assert "shard 2 of 4: killed by signal 9; starting it again" in err
    same_run(whole, out)
    assert_no_completed_call_resent(server, [kill_at], in_flight=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executor"]["name"] == "local" and manifest["executor"]["restarts"] == {"2": 1}


@pytest.mark.slow
def test_stages_after_a_whole_run_cut_run_at_the_merge(server, corpus, tmp_path):
    """Back-and-Forth with keep-top: the shards stop at the cut (their records held), the merge cuts over
    every shard and rewrites only the survivors; the result is the one-process run's."""
    whole, out = tmp_path / "bf-whole", tmp_path / "bf-sharded"
    done = run(btkit_args(server, corpus, whole, "backforth", "--cache", str(tmp_path / "bf1.sqlite")), tmp_path)
    assert done.returncode == 0, done.stderr
    done = run(btkit_args(server, corpus, out, "backforth", "--shards", "3", "--cache", str(tmp_path / "bf2.sqlite")), tmp_path)
    assert done.returncode == 0, done.stderr
    assert without_cache_flags(whole / "data.jsonl") == without_cache_flags(out / "data.jsonl")
    held = [json.loads(line) for k in range(3) for line in (out / "shards" / f"{k}-of-3" / "candidates.jsonl").read_text().splitlines()]
    assert any(line.get("held") for line in held)
    assert not any("backforth.rewrite" in json.dumps(line.get("lineage")) for line in held)  # no shard rewrote anything
    merged = without_cache_flags(out / "candidates.jsonl")
    assert merged == without_cache_flags(whole / "candidates.jsonl")
    assert any(step.get("stage") == "backforth.rewrite" for line in merged for step in line["lineage"])  # made by the merge


@pytest.mark.slow
def test_merge_refuses_what_would_mix_runs(server, corpus, tmp_path):
    out, cache = tmp_path / "out", str(tmp_path / "c.sqlite")
    shard = lambda k, n, *extra: run(btkit_args(server, corpus, out, "humpback", "--shards", str(n), "--shard", str(k),  # noqa: E731
                                                "--cache", cache, *extra), tmp_path)
    merge = lambda *extra: run([sys.executable, "-m", "btkit.cli", "merge", str(out), *extra], tmp_path)  # noqa: E731
    assert merge().stderr.strip().endswith("run `btkit run ... -o " + str(out) + " --shards N --shard K` for each K first)")
    assert shard(0, 2).returncode == 0
    refused = merge()
    assert refused.returncode == 2 and "shard 1 of 2 was never started" in refused.stderr
    # another shard count in the same run directory: refused before any call
    other = shard(0, 3)
    assert other.returncode == 2 and "holds shards of a 2-shard run" in other.stderr
    # a shard with other settings: the merge names what differs
    assert shard(1, 2, "--min-words", "12").returncode == 0
    refused = merge()
    assert refused.returncode == 2 and "shard 1 ran with other settings than shard 0 (changed: stages)" in refused.stderr
    assert shard(1, 2, "--overwrite").returncode == 0
    assert merge().returncode == 0
    assert json.loads((out / "manifest.json").read_text())["shards"] == 2
    # the input changed since the shards ran: the merge is refused, nothing published is touched
    data = (out / "data.jsonl").read_bytes()
    (out / "manifest.json").unlink()  # a merge from scratch, so the input is checked
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "late", "text": "a document added after the shards ran " * 3}) + "\n")
    refused = merge()
    assert refused.returncode == 2 and "settings changed since the shards" in refused.stderr and "input" in refused.stderr
    assert (out / "data.jsonl").read_bytes() == data
    assert len(refused.stderr.strip().splitlines()) == 1


def test_shard_options_are_checked(tmp_path, corpus):
    base = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(tmp_path / "o"), "-q"]
    cases = {("--shards", "4", "--shard", "4"): "--shard 4: must be between 0 and 3",
             ("--shard", "1"): "--shard K needs --shards N",
             ("--executor", "ray"): "--executor ray: needs --shards N",
             ("--shards", "2", "--executor", "nope"): "unknown executor 'nope'; known executors: local, ray",
             ("--shards", "2", "--max-cost", "1"): "--max-cost counts one run directory's calls"}
    for extra, message in cases.items():
        done = run([*base, *extra], tmp_path, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)


def test_no_ray_anywhere_but_its_executor(server, corpus, tmp_path):
    """A run and a sharded run (local executor) work with ``import ray`` impossible; only the ray executor imports it."""
    root = Path(__file__).resolve().parents[1]
    importers = [p.relative_to(root).as_posix() for d in ("btkit", "plugins") for p in (root / d).rglob("*.py")
                 if any(line.strip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())]
    assert importers == ["plugins/executors/ray_executor.py"]
    blocked = ("import sys; sys.modules['ray'] = None; sys.argv = ['btkit'] + sys.argv[1:]; "
               "from btkit.cli import main; main()")
    args = btkit_args(server, corpus, tmp_path / "noray", "humpback", "--shards", "2", "--limit", "8")[3:]
    done = run([sys.executable, "-c", blocked, *args], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "noray" / "data.jsonl").exists()
    no_ray = run([sys.executable, "-c", blocked, *btkit_args(server, corpus, tmp_path / "r", "humpback", "--shards", "2",
                                                               "--executor", "ray")[3:]], tmp_path)
    assert no_ray.returncode == 2 and "--executor ray needs Ray: pip install 'btkit[ray]'" in no_ray.stderr


@pytest.mark.slow
def test_a_pipeline_file_runs_sharded_too(server, corpus, whole, tmp_path):
    """``btkit run FILE.yaml --shards 2 --shard K`` and ``btkit merge``: the pipeline's run, as one process makes it."""
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""name: humpback-two-stages
input: {corpus}
model: openai:fake-model
base_url: {server.base_url}
stages:
  - use: humpback.augment
    min_words: 10
  - use: humpback.curate
    judge_mode: rubric
    keep_top: 50
""")
    out = tmp_path / "piped"
    for k in (0, 1):
        done = run([sys.executable, "-m", "btkit.cli", "run", str(pipeline), "-o", str(out), "--shards", "2", "--shard", str(k), "-q",
                    "--cache", str(tmp_path / "p.sqlite")], tmp_path)
        assert done.returncode == 0, done.stderr
        assert not (out / "data.jsonl").exists()  # nothing is published before the merge
    done = run([sys.executable, "-m", "btkit.cli", "merge", str(out), "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert without_cache_flags(out / "data.jsonl") == without_cache_flags(whole / "data.jsonl")


def test_a_third_party_executor_runs_the_shards(registry, cli, scripted, corpus, tmp_path):
    """An executor registered by a plugin (as docs/plugins.md shows) gets every shard job; the merge follows."""
    from btkit.errors import BtkitError
    from btkit.executors import Executor, run_shard_job
    from btkit.hookspecs import hookimpl

    ran = []

    class Inline(Executor):
        def run(self, jobs, poll):
            for job in jobs:
                ran.append((job.shard, job.shards, job.dir.name))
                run_shard_job(job.config)
                poll()
            return {"inline": True, "option": self.options.get("note")}

    class Plugin:
        @hookimpl
        def btkit_register_executors(self, register):
            register("inline", Inline, description="shards one after another, in this process")

    registry.register(Plugin(), name="inline-executor")
    _, spec = scripted(default=lambda messages, params: "Score: 4" if "Score" in messages[-1]["content"] else "What is this about?")
    for name, extra in (("one", ()), ("sharded", ("--shards", "3", "--executor", "inline", "-E", "note=hi"))):
        r = cli("run", "humpback", corpus, "-o", tmp_path / name, "--model", spec, "--judge-mode", "rubric", "--min-words", "10",
                "--no-cache", "-q", *extra)
        assert r.exit_code == 0, r.output
    assert ran == [(0, 3, "0-of-3"), (1, 3, "1-of-3"), (2, 3, "2-of-3")]
    assert without_cache_flags(tmp_path / "one" / "data.jsonl") == without_cache_flags(tmp_path / "sharded" / "data.jsonl")
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest["executor"] == {"name": "inline", "shards_s": manifest["executor"]["shards_s"], "inline": True, "option": "hi"}

    class Clash:
        @hookimpl
        def btkit_register_executors(self, register):
            register("local", Inline)

    registry.register(Clash(), name="clash")
    with pytest.raises(BtkitError, match="executor 'local' registered twice"):
        registry.executors()
