"""Which waiting model call goes next: keep calls that share a prompt prefix together.

Servers cache prompt prefixes: vLLM's automatic prefix caching keeps the KV blocks of recent
prompts, hosted APIs discount cached prefixes, and the in-process llama.cpp backend reuses its KV
cache for the prefix a call shares with the one before. All of them gain when calls built from the
same template (same system prompt, same rubric, same few-shot turns) reach the model back to back
rather than interleaved with another stage's calls, which is what a plain FIFO semaphore does when
units at different stages share the concurrency limit.

:class:`PrefixGroupedLimiter` bounds the calls in flight like a semaphore. When a slot frees it
hands it to the oldest waiter of the *same group* as the call started last (a group is what the
caller names it: the engine uses the call kind and template), and to the oldest waiter overall
otherwise. A group keeps the slots for at most ``max_streak`` grants in a row while other groups
wait, so no call waits for ever.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import Any, Hashable


class PrefixGroupedLimiter:
    """At most ``limit`` holders at once; freed slots go to the group that ran last, then FIFO."""

    def __init__(self, limit: int, max_streak: int | None = None):
        self.limit = max(1, int(limit))
        self.max_streak = max_streak if max_streak is not None else max(16, 4 * self.limit)
        self.active = 0
        self._waiting: dict[Hashable, collections.deque[tuple[int, asyncio.Future]]] = {}
        self._ticket = itertools.count()
        self._last: Hashable | None = None
        self._streak = 0

    def slot(self, group: Hashable) -> "_Slot":
        """``async with limiter.slot(group):`` holds one slot for the block."""
        return _Slot(self, group)

    async def acquire(self, group: Hashable) -> None:
        if self.active < self.limit and not self._waiting:
            self._grant(group)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(group, collections.deque()).append((next(self._ticket), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just before the cancel: give the slot back
                self.release()
            else:
                self._discard(group, fut)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _grant(self, group: Hashable) -> None:
        self.active += 1
        self._streak = self._streak + 1 if group == self._last else 1
        self._last = group

    def _discard(self, group: Hashable, fut: asyncio.Future) -> None:
        queue = self._waiting.get(group)
        if queue is not None:
            for i, (_, f) in enumerate(queue):
                if f is fut:
                    del queue[i]
                    break
            if not queue:
                del self._waiting[group]

    def _next_group(self) -> Hashable | None:
        """The last group again while it has waiters and its streak allows; else the oldest waiter's."""
        heads = {g: q[0][0] for g, q in self._waiting.items() if q}
        if not heads:
            return None
        if self._last in heads and (len(heads) == 1 or self._streak < self.max_streak):
            return self._last
        return min((g for g in heads if g != self._last), key=heads.__getitem__)

    def _wake(self) -> None:
        while self.active < self.limit:
            group = self._next_group()
            if group is None:
                return
            queue = self._waiting[group]
            _, fut = queue.popleft()
            if not queue:
                del self._waiting[group]
            if fut.done():  # cancelled while waiting
                continue
            self._grant(group)
            fut.set_result(None)


class _Slot:
    def __init__(self, limiter: PrefixGroupedLimiter, group: Hashable):
        self.limiter = limiter
        self.group = group

    async def __aenter__(self) -> None:
        await self.limiter.acquire(self.group)

    async def __aexit__(self, *exc: Any) -> None:
        self.limiter.release()
