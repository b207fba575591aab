"""SeenSet: exact de-duplication whose memory does not grow with the number of keys."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from btkit.dedup import SeenSet


def test_exact_across_memory_and_disk():
    rng = random.Random(7)
    keys = [f"k{rng.randrange(3000)}" for _ in range(10_000)]
    with SeenSet(memory_items=100) as seen:
        firsts = [seen.add(k) for k in keys]
        expected, reference = [], set()
        for k in keys:
            expected.append(k not in reference)
            reference.add(k)
        assert firsts == expected
        assert len(seen) == len(reference) and seen.spilled == len(reference) - 100
        assert all(k in seen for k in reference) and "never-added" not in seen


def _peak_bytes(n: int, memory_items: int) -> int:
    tracemalloc.start()
    with SeenSet(memory_items=memory_items) as seen:
        for i in range(n):
            seen.add(f"{i:024x}")
        _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.slow
def test_memory_stays_flat_past_the_in_memory_part():
    small, large = _peak_bytes(20_000, 5_000), _peak_bytes(200_000, 5_000)
    assert large < small * 1.5, (small, large)  # ten times the keys
    assert _peak_bytes(200_000, 200_000) > 4 * large  # a plain set of them would not be
