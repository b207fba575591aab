"""``--executor local``: one ``btkit`` process per shard on this machine, a dead one started again.

Each shard runs as ``python -m btkit.executors`` with its settings on standard input (no credential
on disk or in a process list) and its output in ``OUT/shards/K-of-N/shard.log``. A process that
dies (killed, out of memory) is started again up to ``-E retries=N`` times (default 2) and resumes
its shard's journal; one that stops on a problem no retry fixes (exit status 3: a bad input or
option) stops the others and the run, with its ``error:`` line. ``-E parallel=P`` runs at most P
shards at once (default: all of them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Callable

from btkit.errors import BtkitError
from btkit.executors import NOT_RETRYABLE, Executor, ShardFailed, ShardJob
from btkit.hookspecs import hookimpl


def _last_error(job: ShardJob) -> str:
    """The shard's last ``error:`` line (else its last line) from its log."""
    try:
        lines = (job.dir / "shard.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")


def _why(rc: int) -> str:
    return f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"


class LocalExecutor(Executor):
    name = "local"

    def run(self, jobs: list[ShardJob], poll: Callable[[], None]) -> dict[str, Any]:
        parallel = int(self.options.get("parallel") or len(jobs))
        retries = int(self.options.get("retries", 2))
        if parallel < 1 or retries < 0:
            raise BtkitError(f"--executor local: parallel must be at least 1 and retries at least 0 (got {parallel}, {retries})")
        pending = list(jobs)
        running: dict[int, tuple[ShardJob, subprocess.Popen]] = {}
        restarts: dict[int, int] = {}
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    job = pending.pop(0)
                    running[job.shard] = (job, self._start(job))
                for k, (job, proc) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[k]
                    if rc == 0:
                        continue
                    if rc == NOT_RETRYABLE:
                        raise ShardFailed(f"shard {k} of {job.shards}: {_last_error(job)}")
                    restarts[k] = restarts.get(k, 0) + 1
                    if restarts[k] > retries:
                        raise BtkitError(f"shard {k} of {job.shards} failed {restarts[k]} times ({_why(rc)}: {_last_error(job)}); "
                                         f"finished units are kept in {job.dir}: run the same command again to resume")
                    print(f"shard {k} of {job.shards}: {_why(rc)}; starting it again (retry {restarts[k]} of {retries}), "
                          f"it resumes its journal", file=sys.stderr)
                    pending.insert(0, job)
                poll()
                time.sleep(0.2)
        finally:
            for _, proc in running.values():  # only the processes this executor started, by their handle
                proc.terminate()
            for _, proc in running.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return {"parallel": parallel, "restarts": restarts}

    def _start(self, job: ShardJob) -> subprocess.Popen:
        job.dir.mkdir(parents=True, exist_ok=True)
        with (job.dir / "shard.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "btkit.executors"], stdin=subprocess.PIPE, stdout=log, stderr=log)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job.config).encode())
        proc.stdin.close()
        return proc


@hookimpl
def btkit_register_executors(register) -> None:
    register("local", LocalExecutor, description="one btkit process per shard on this machine (default)")
