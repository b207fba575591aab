"""llama.cpp's thread count: half the CPUs the process may use, for generating and for reading prompts alike.

On a 2-core machine with other work, two llama.cpp threads stall each other (they wait by spinning),
and llama-cpp-python reads prompts with every CPU unless told, whatever ``n_threads`` says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

_PROBE = """
import json, os, sys
os.sched_setaffinity(0, set(json.loads(sys.argv[1])))
from btkit_plugins.backends.llamacpp import LlamaCppBackend
b = LlamaCppBackend("default", json.loads(sys.argv[2]))
llm = b.llm()
print(json.dumps({"n_threads": llm.n_threads, "n_threads_batch": llm.n_threads_batch,
                  "ctx": [llm.context_params.n_threads, llm.context_params.n_threads_batch]}))
"""


def threads(cpus: list[int], options: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cpus), json.dumps(options)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    return cpus[:2]


def test_on_two_cpus_llama_cpp_gets_one_thread_for_generating_and_for_prompts(two_cpus):
    assert threads(two_cpus, {}) == {"n_threads": 1, "n_threads_batch": 1, "ctx": [1, 1]}


def test_n_threads_sets_both_and_n_threads_batch_only_prompts(two_cpus):
    """Counts other than the CPUs' (2), so neither can come from llama-cpp-python's own default."""
    assert threads(two_cpus, {"n_threads": 3}) == {"n_threads": 3, "n_threads_batch": 3, "ctx": [3, 3]}
    assert threads(two_cpus, {"n_threads": 1, "n_threads_batch": 3}) == {"n_threads": 1, "n_threads_batch": 3, "ctx": [1, 3]}


def test_a_thread_count_below_one_is_refused():
    from btkit.errors import BtkitError
    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    with pytest.raises(BtkitError, match="n_threads_batch=0"):
        LlamaCppBackend("default", {"n_threads_batch": 0})
