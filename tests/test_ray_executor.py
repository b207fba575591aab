"""``--executor ray``: four shards as Ray tasks on a local Ray instance (``num_cpus=2``; Ray has no local
mode any more), one task's worker SIGKILLed mid-run. Ray runs the task again, it resumes its shard's
journal, and the merged run is the one-process run, with no completed call sent twice."""

from __future__ import annotations

import json
import subprocess

import pytest

from btkit.testing.fake_openai import FakeOpenAIServer
from sharding import assert_no_completed_call_resent, btkit_args, env, kill_shard_when, run, without_cache_flags, write_corpus

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'btkit[ray]')")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    s = FakeOpenAIServer(latency=0.03).start()
    yield s
    s.stop()


def test_ray_shards_with_a_killed_task_merge_to_the_one_process_run(server, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 60)
    whole, out = tmp_path / "whole", tmp_path / "ray"
    done = run(btkit_args(server, corpus, whole, "humpback", "--cache", str(tmp_path / "whole.sqlite")), tmp_path)
    assert done.returncode == 0, done.stderr
    server.reset()
    run_env = {k: v for k, v in env(tmp_path).items() if k != "RAY_ADDRESS"}  # a local instance, never a cluster
    args = btkit_args(server, corpus, out, "humpback", "--shards", "4", "--executor", "ray", "-E", "num_cpus=2",
                      "--concurrency", "2", "--cache", str(tmp_path / "ray.sqlite"))
    driver = subprocess.Popen([a for a in args if a != "-q"],  # not quiet: the driver's progress line is checked
                              env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_at = kill_shard_when(out / "shards" / "1-of-4", 3, driver, limit_s=240)
    _, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err
    assert without_cache_flags(whole / "data.jsonl") == without_cache_flags(out / "data.jsonl")
    assert without_cache_flags(whole / "candidates.jsonl") == without_cache_flags(out / "candidates.jsonl")
    assert_no_completed_call_resent(server, [kill_at], in_flight=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == 4 and manifest["executor"]["name"] == "ray" and manifest["executor"]["address"] == "local"
    assert "shards: 4/4 complete" in err  # the driver's progress over all shards
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == json.loads((whole / "stats.json").read_text())["kept"]
