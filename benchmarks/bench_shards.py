"""Throughput of a sharded run against one process, and what Ray's start-up costs.

A fake OpenAI server (``btkit.testing.fake_openai``, its own process) answers every request after
``--latency`` seconds (100 ms: a slow model, not a busy server; it serves hundreds at once). The
same Humpback run (augment + rubric curate, 2 calls per document, no cache) is made three ways,
interleaved ``--repeats`` times: one process at ``--concurrency C``; ``--shards 4`` with the local
executor (4 processes, each at ``--concurrency C``); ``--shards 4 --executor ray`` (a local Ray
instance started by the run, 4 logical CPUs so the 4 tasks run at once). Printed: wall time per
run (median), the throughput ratio of each sharded form to one process, and the Ray run's extra
time over the local executor (its start-up: ``ray.init`` and worker processes), with
``ray.init``'s own share from the manifest. Every sharded run's data is checked to equal the
one-process run's.

    .venv/bin/python benchmarks/bench_shards.py --docs 800 --concurrency 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "apt dpkg package mirror kernel module archive release security update source binary maintainer changelog".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=800)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    rng = random.Random(1)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(45))}) + "\n"
                              for i in range(args.docs)))
    port_file = work / "port"
    server = subprocess.Popen([sys.executable, "-m", "btkit.testing.fake_openai", "--latency", str(args.latency), "--port-file", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline and server.poll() is None, "fake server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}/v1"
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "BTKIT_CACHE_DIR": str(work / "cache")}
        env.pop("RAY_ADDRESS", None)
        base = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "--model", "openai:fake-model", "--base-url", url,
                "--judge-mode", "rubric", "--min-words", "10", "--no-cache", "-q", "--concurrency", str(args.concurrency)]
        forms = {"one process": [], f"{args.shards} shards, local": ["--shards", str(args.shards)]}
        if not args.no_ray:
            forms[f"{args.shards} shards, ray"] = ["--shards", str(args.shards), "--executor", "ray", "-E", f"num_cpus={args.shards}"]
        times: dict[str, list[float]] = {name: [] for name in forms}
        ray_init: list[float] = []
        reference = None
        for r in range(args.repeats):
            for name, extra in forms.items():
                out = work / f"run-{r}-{len(times[name])}-{name.split()[0]}{name.split()[-1]}"
                t0 = time.perf_counter()
                done = subprocess.run([*base, "-o", str(out), *extra], env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.exit(f"{name} failed: {done.stderr[-2000:]}")
                data = [{k: v for k, v in json.loads(line).items() if k != "lineage"} for line in (out / "data.jsonl").read_text().splitlines()]
                if reference is None:
                    reference = data
                assert data == reference, f"{name}: data differs from the one-process run"
                times[name].append(elapsed)
                if "ray" in name:
                    ray_init.append(json.loads((out / "manifest.json").read_text())["executor"]["ray_init_s"])
                print(f"repeat {r + 1}: {name:<18} {elapsed:6.1f}s", flush=True)
                shutil.rmtree(out)
        calls = 2 * args.docs
        one = statistics.median(times["one process"])
        print(f"\n{args.docs} documents, {calls} calls, {args.latency * 1000:.0f} ms per call, --concurrency {args.concurrency} per process, "
              f"median of {args.repeats} (interleaved), {os.cpu_count()} cores:")
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"  {name:<18} {m:6.1f}s  {calls / m:6.1f} calls/s  {one / m:4.2f}x one process")
        if ray_init:
            local, ray = statistics.median(times[f"{args.shards} shards, local"]), statistics.median(times[f"{args.shards} shards, ray"])
            print(f"  Ray over the local executor: +{ray - local:.1f}s per run (ray.init alone {statistics.median(ray_init):.1f}s)")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
