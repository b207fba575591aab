"""The request limiter: bounded like a semaphore, and calls sharing a prompt prefix go out together."""

from __future__ import annotations

import asyncio

from btkit.scheduling import PrefixGroupedLimiter

from conftest import words, write_jsonl


async def _order_of(limiter: PrefixGroupedLimiter, first: str, queued: list[str]) -> list[str]:
    """Hold one slot with group ``first``, queue ``queued``, release: the order the waiters run in."""
    order: list[str] = []
    await limiter.acquire(first)

    async def waiter(name: str) -> None:
        async with limiter.slot(name.rstrip("0123456789")):
            order.append(name)
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(waiter(n)) for n in queued]
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(*tasks)
    return order


def test_the_group_that_ran_last_goes_first_then_fifo():
    order = asyncio.run(_order_of(PrefixGroupedLimiter(1), "a", ["b1", "a1", "c1", "b2", "a2"]))
    assert order == ["a1", "a2", "b1", "b2", "c1"]


def test_a_group_cannot_keep_the_slot_for_ever():
    order = asyncio.run(_order_of(PrefixGroupedLimiter(1, max_streak=2), "a", ["b1", "a1", "a2", "a3", "a4"]))
    assert order.index("b1") <= 2  # after at most two more grants to 'a'


def test_never_more_than_the_limit_in_flight_and_cancelled_waiters_give_way():
    async def go() -> tuple[int, int]:
        limiter = PrefixGroupedLimiter(3)
        peak = current = 0

        async def call(i: int) -> None:
            nonlocal peak, current
            async with limiter.slot(i % 2):
                current += 1
                peak = max(peak, current)
                await asyncio.sleep(0.001)
                current -= 1

        tasks = [asyncio.ensure_future(call(i)) for i in range(40)]
        await asyncio.sleep(0)
        for t in tasks[10:20]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return peak, limiter.active

    peak, active = asyncio.run(go())
    assert peak == 3 and active == 0


def test_a_run_groups_its_calls_by_kind_and_template(cli, scripted, tmp_path, monkeypatch):
    """The engine names each call's group by kind and template, so the limiter can keep them together."""
    seen: list[str] = []
    acquire = PrefixGroupedLimiter.acquire

    async def spy(self, group):
        seen.append(group)
        await acquire(self, group)

    monkeypatch.setattr(PrefixGroupedLimiter, "acquire", spy)
    backend, spec = scripted(default="What do the listed words mean?", logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(3)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "o", "--model", spec, "--judge-mode", "logprob", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(seen) == ["chat:humpback/augment"] * 3 + ["next_token_logprobs:humpback/curate"] * 3
