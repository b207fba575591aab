"""``--executor ray``: one Ray task per shard, on a local Ray instance or a cluster.

``ray`` is imported only when this executor runs (install it with ``pip install 'btkit[ray]'``:
plain ``ray``, never ``ray[llm]``, which pulls a GPU stack). Options (``-E KEY=VALUE``):

- ``address``: the cluster to join (``auto`` for the one ``ray start`` made on this node,
  ``HOST:6379``, ``ray://HOST:10001``); default ``$RAY_ADDRESS``, else a local instance is started
  for this run (and stopped after it) with ``num_cpus`` CPUs (default: this machine's).
- ``retries`` (default 3): Ray starts a task again when its worker dies (a node lost, a process
  killed); the retried task resumes its shard's journal. A shard that fails on a problem no retry
  fixes (a bad input or option) is not retried: its one line stops the run.
- ``cpus_per_shard`` (default 1): what Ray reserves for each shard task. A shard spends its time
  waiting on model servers, so this is about how many shards a node runs at once, not compute.

Every node must see the same paths: btkit installed in the same environment, the input and the
run directory on shared storage (the shards' run directories are written there and merged by the
driver). ``BTKIT_*`` environment variables of the driver are passed to the tasks.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from btkit.errors import BtkitError
from btkit.executors import Executor, ShardFailed, ShardJob
from btkit.hookspecs import hookimpl


def run_shard_task(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: run one shard in the worker (a configuration problem comes back as ``error``)."""
    from btkit.executors import run_shard_job

    try:
        return run_shard_job(config)
    except BtkitError as e:
        return {"error": str(e)}


class RayExecutor(Executor):
    name = "ray"

    def run(self, jobs: list[ShardJob], poll: Callable[[], None]) -> dict[str, Any]:
        try:
            import ray
        except ImportError:
            raise BtkitError("--executor ray needs Ray: pip install 'btkit[ray]' (plain ray, not ray[llm])") from None
        retries = int(self.options.get("retries", 3))
        cpus = float(self.options.get("cpus_per_shard", 1))
        address = self.options.get("address") or os.environ.get("RAY_ADDRESS") or None
        t0 = time.monotonic()
        started_here = not ray.is_initialized()
        if started_here:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = int(self.options.get("num_cpus") or os.cpu_count() or 1)
            env = {k: v for k, v in os.environ.items() if k.startswith("BTKIT_")}
            if env:
                kwargs["runtime_env"] = {"env_vars": env}
            ray.init(**kwargs)
        init_s = time.monotonic() - t0
        try:
            task = ray.remote(run_shard_task).options(max_retries=retries, retry_exceptions=False, num_cpus=cpus)
            refs = {task.remote(job.config): job for job in jobs}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    job = refs[ref]
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        raise BtkitError(f"shard {job.shard} of {job.shards} failed after {retries} retries "
                                         f"({type(e).__name__}); finished units are kept in {job.dir}: run the same command "
                                         f"again to resume") from None
                    if isinstance(result, dict) and result.get("error"):
                        raise ShardFailed(f"shard {job.shard} of {job.shards}: {result['error']}")
                poll()
        finally:
            for ref in pending if "pending" in locals() else []:
                ray.cancel(ref, force=True)  # the run stops: the other shards stop too (each resumes later)
            if started_here:
                ray.shutdown()
        return {"address": address or "local", "ray_init_s": round(init_s, 3), "retries": retries}


@hookimpl
def btkit_register_executors(register) -> None:
    register("ray", RayExecutor, description="one Ray task per shard (pip install 'btkit[ray]'); -E address=... for a cluster")
