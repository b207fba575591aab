"""Fake backends for tests and dry runs: ``echo:`` and ``scripted:NAME``.

- ``echo:`` replies with the last user message (or ``echo:TEXT`` with TEXT), handy to see prompts.
- ``scripted:NAME`` uses the :class:`ScriptedBackend` registered under NAME with :func:`script`:
  a queue of replies (strings, :class:`Completion` objects, exceptions to raise, or callables of
  ``(messages, params)``) and a ``history`` of every request, for asserting what was sent.
  ``scripted:FILE.json`` loads ``{"replies": [...], "logprobs": {...}}`` from a file instead, so a
  subprocess (e.g. a ``btkit run`` killed for real in a test) can use a script too.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

from btkit.backends import CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, Backend, Completion
from btkit.errors import BackendError, BtkitError
from btkit.hookspecs import hookimpl

SCRIPTS: dict[str, "ScriptedBackend"] = {}


class ScriptedBackend(Backend):
    """Replies from a queue; ``default`` answers when the queue is empty (None: raise)."""

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION})

    def __init__(self, replies: list[Any] | None = None, default: Any = None, logprobs: Callable[..., dict[str, float]] | dict[str, float] | None = None,
                 continuation_logprobs: Callable[..., list[float]] | None = None, delay: float = 0.0, name: str = "test"):
        self.replies = list(replies or [])
        self.default = default
        self.logprobs = logprobs
        self.continuation_logprobs = continuation_logprobs
        self.delay = delay
        self.history: list[dict[str, Any]] = []
        self.spec = f"scripted:{name}"

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def _next(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Any:
        reply = self.replies.pop(0) if self.replies else self.default
        if reply is None:
            raise BackendError("scripted backend ran out of replies")
        if callable(reply) and not isinstance(reply, type):
            reply = reply(messages, params)
        return reply

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        self.history.append({"kind": "chat", "messages": messages, "params": params})
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = self._next(messages, params)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Completion):
            return reply
        text = None if reply is ... else str(reply)
        return Completion(text=text, finish_reason="stop", prompt_tokens=sum(len(m["content"].split()) for m in messages), completion_tokens=len((text or "").split()))

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        self.history.append({"kind": "next_token_logprobs", "messages": messages, "assistant_prefix": assistant_prefix, "candidates": candidates})
        lp = self.logprobs
        if lp is None:
            raise BackendError("scripted backend has no logprobs script")
        if callable(lp):
            return lp(messages, assistant_prefix, candidates)
        return {c: float(lp.get(c, -30.0)) for c in candidates}

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str) -> list[float]:
        self.history.append({"kind": "score_continuation", "messages": messages, "continuation": continuation})
        if self.continuation_logprobs is None:
            raise BackendError("scripted backend has no continuation script")
        return list(self.continuation_logprobs(messages, continuation))


class EchoBackend(Backend):
    """Replies with a fixed text, or with the last user message."""

    capabilities = frozenset({CHAT})

    def __init__(self, rest: str, options: dict[str, Any]):
        self.text = rest or None
        self.spec = f"echo:{rest}"

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        text = self.text if self.text is not None else messages[-1]["content"]
        return Completion(text=text, finish_reason="stop", prompt_tokens=sum(len(m["content"].split()) for m in messages), completion_tokens=len(text.split()))


def script(name: str, backend: ScriptedBackend) -> ScriptedBackend:
    """Make ``scripted:NAME`` resolve to ``backend``."""
    backend.spec = f"scripted:{name}"
    SCRIPTS[name] = backend
    return backend


def _scripted(rest: str, options: dict[str, Any]) -> Backend:
    if rest in SCRIPTS:
        return SCRIPTS[rest]
    path = Path(rest)
    if path.suffix == ".json" and path.is_file():
        spec = json.loads(path.read_text(encoding="utf-8"))
        lp = spec.get("logprobs")
        b = ScriptedBackend(replies=spec.get("replies", []), default=spec.get("default"), logprobs=lp, delay=float(spec.get("delay", 0)), name=rest)
        return b
    raise BtkitError(f"no scripted backend named '{rest}' (register one with btkit_plugins.fake.script, or give a .json file)")


@hookimpl
def btkit_register_backends(register):
    register("echo", EchoBackend, description="test backend: replies with the prompt (or echo:TEXT)")
    register("scripted", _scripted, description="test backend: scripted replies with a request history")
