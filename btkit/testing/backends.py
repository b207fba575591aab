"""Test doubles: backends that answer without a model, for tests and dry runs.

They are not production backends (``btkit backends`` does not list them): a test registers a
:class:`Doubles` on its registry (the ``registry`` fixture of :mod:`btkit.testing.pytest_plugin`
does), and a process loads this module with ``BTKIT_EXTRA_PLUGINS=btkit.testing.backends`` (the
pytest plugin sets it for the whole session, so ``btkit`` child processes of a test have them).

- ``echo:`` replies with the last user message (or ``echo:TEXT`` with TEXT), handy to see prompts.
- ``scripted:NAME`` is the :class:`ScriptedBackend` added under NAME with :meth:`Doubles.script`:
  a queue of replies (strings, :class:`Completion` objects, exceptions to raise, or callables of
  ``(messages, params)``) and a ``history`` of every request, for asserting what was sent.
  With ``multi_sample=True`` it declares ``MULTI_SAMPLE`` and answers a request with ``n > 1`` as
  the OpenAI-compatible backends do (``extra["choices"]``): a reply that is a list gives the
  choices, anything else takes ``n`` replies from the queue, one per choice.
  ``scripted:FILE.json`` loads ``{"replies": [...], "logprobs": {...}, "multi_sample": false}`` from
  a file instead, so a subprocess (e.g. a ``btkit run`` killed for real in a test) can use a script too.
- ``det:FILE.json`` replies with a pure function of the request, so a request sent again (after a
  kill) gets the same answer: see :class:`DeterministicBackend`.

Named scripts belong to one :class:`Doubles` instance, never to the module: each test's registry
has its own, so no script outlives its test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from btkit.backends import CHAT, END_OF_TURN, MULTI_SAMPLE, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, Backend, Completion
from btkit.errors import BackendError, BtkitError
from btkit.hookspecs import hookimpl

__all__ = ["DOUBLES_PLUGIN", "DeterministicBackend", "Doubles", "EchoBackend", "ScriptedBackend"]


class ScriptedBackend(Backend):
    """Replies from a queue; ``default`` answers when the queue is empty (None: raise)."""

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION})

    def __init__(self, replies: list[Any] | None = None, default: Any = None, logprobs: Callable[..., dict[str, float]] | dict[str, float] | None = None,
                 continuation_logprobs: Callable[..., list[float]] | None = None, delay: float = 0.0, name: str = "test",
                 multi_sample: bool = False, end_of_turn_logprob: Callable[..., float] | None = None):
        self.replies = list(replies or [])
        if multi_sample:  # an instance attribute, so other scripted backends keep the class's set
            self.capabilities = self.capabilities | {MULTI_SAMPLE}
        if end_of_turn_logprob is not None:  # declares END_OF_TURN: --judge-mode complete (and auto) can use it
            self.capabilities = self.capabilities | {END_OF_TURN}
        self.end_of_turn_logprob = end_of_turn_logprob
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
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        n = int(params.get("n") or 1)
        if n > 1 and self.supports(MULTI_SAMPLE):
            replies = list(reply) if isinstance(reply, (list, tuple)) else [reply] + [self._next(messages, params) for _ in range(n - 1)]
            for r in replies:
                if isinstance(r, BaseException):
                    raise r  # one bad choice fails the whole request, as an HTTP error would
            choices = [_choice(r) for r in replies]
            return Completion(text=choices[0]["text"], finish_reason=choices[0]["finish_reason"], prompt_tokens=prompt_tokens,
                              completion_tokens=sum(len((c["text"] or "").split()) for c in choices), extra={"choices": choices})
        text = None if reply is ... else str(reply)
        return Completion(text=text, finish_reason="stop", prompt_tokens=prompt_tokens, completion_tokens=len((text or "").split()))

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        self.history.append({"kind": "next_token_logprobs", "messages": messages, "assistant_prefix": assistant_prefix, "candidates": candidates})
        lp = self.logprobs
        if lp is None:
            raise BackendError("scripted backend has no logprobs script")
        if callable(lp):
            return lp(messages, assistant_prefix, candidates)
        return {c: float(lp.get(c, -30.0)) for c in candidates}

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str, *,
                                 end_of_turn: bool = False) -> list[float]:
        """``continuation_logprobs(messages, continuation)``; with ``end_of_turn`` (asked only when the
        script declares ``END_OF_TURN``), ``end_of_turn_logprob(messages, continuation)`` appended."""
        self.history.append({"kind": "score_continuation", "messages": messages, "continuation": continuation,
                             **({"end_of_turn": True} if end_of_turn else {})})
        if self.continuation_logprobs is None:
            raise BackendError("scripted backend has no continuation script")
        values = list(self.continuation_logprobs(messages, continuation))
        if end_of_turn:
            if self.end_of_turn_logprob is None:
                raise BackendError("scripted backend has no end-of-turn script")
            values.append(float(self.end_of_turn_logprob(messages, continuation)))
        return values


def _choice(reply: Any) -> dict[str, Any]:
    """One choice of a multi-sample reply: a string, ``...`` (no text), a Completion or a ``{"text", "finish_reason"}`` dict."""
    if isinstance(reply, dict):
        return {"text": reply.get("text"), "finish_reason": reply.get("finish_reason", "stop")}
    if isinstance(reply, Completion):
        return {"text": reply.text, "finish_reason": reply.finish_reason}
    return {"text": None if reply is ... else str(reply), "finish_reason": "stop"}


class EchoBackend(Backend):
    """Replies with a fixed text, or with the last user message."""

    capabilities = frozenset({CHAT})

    def __init__(self, rest: str, options: dict[str, Any]):
        self.text = rest or None
        self.spec = f"echo:{rest}"

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        text = self.text if self.text is not None else messages[-1]["content"]
        return Completion(text=text, finish_reason="stop", prompt_tokens=sum(len(m["content"].split()) for m in messages), completion_tokens=len(text.split()))


class DeterministicBackend(Backend):
    """Replies that depend only on the request, configured by a JSON file::

        {"rules": [{"contains": "5-point scale", "reply": "Fine.\\nScore: {digit}"}],
         "default": "What does note {hash} explain?", "delay": 0.02, "log": "requests.jsonl"}

    The first rule whose ``contains`` occurs in the messages gives the reply, else ``default``;
    ``{hash}`` is 8 hex digits of the request's hash and ``{digit}`` a digit 1..5 drawn from it.
    Logprobs put most mass on one candidate picked by the hash. With ``log``, every request is
    appended to that file (one ``os.write`` per request) when it arrives, so a test can count what
    was sent across processes.
    """

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS})

    def __init__(self, rest: str, options: dict[str, Any]):
        path = Path(rest)
        if not path.is_file():
            raise BtkitError(f"det: needs a JSON file, got '{rest}'")
        conf = json.loads(path.read_text(encoding="utf-8"))
        self.rules = list(conf.get("rules", []))
        self.default = str(conf.get("default", "What does note {hash} explain in detail?"))
        self.delay = float(conf.get("delay", 0))
        self.log = conf.get("log")
        self.spec = f"det:{rest}"

    def _record(self, request: dict[str, Any]) -> str:
        blob = json.dumps(request, sort_keys=True, ensure_ascii=True)
        if self.log:
            fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (json.dumps({"pid": os.getpid(), **request}, ensure_ascii=True) + "\n").encode())
            finally:
                os.close(fd)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        h = self._record({"kind": "chat", "messages": messages, "params": params})
        if self.delay:
            await asyncio.sleep(self.delay)
        text = "\n".join(m["content"] for m in messages)
        reply = next((r["reply"] for r in self.rules if r.get("contains", "") in text), self.default)
        reply = reply.replace("{hash}", h).replace("{digit}", str(1 + int(h, 16) % 5))
        return Completion(text=reply, finish_reason="stop", prompt_tokens=len(text.split()), completion_tokens=len(reply.split()))

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        h = self._record({"kind": "next_token_logprobs", "messages": messages, "assistant_prefix": assistant_prefix, "candidates": candidates})
        if self.delay:
            await asyncio.sleep(self.delay)
        pick = int(h, 16) % len(candidates)
        return {c: (-0.05 if i == pick else -4.0) for i, c in enumerate(candidates)}


class Doubles:
    """The test doubles as one plugin object; :attr:`scripts` are its named ``scripted:`` backends.

    Register an instance on a registry (``registry.register(Doubles(), name=DOUBLES_PLUGIN)``), then
    :meth:`script` makes ``scripted:NAME`` resolve to a backend built in the test.
    """

    def __init__(self) -> None:
        self.scripts: dict[str, ScriptedBackend] = {}

    def script(self, name: str, backend: ScriptedBackend) -> ScriptedBackend:
        """Make ``scripted:NAME`` resolve to ``backend`` (its spec becomes ``scripted:NAME``)."""
        backend.spec = f"scripted:{name}"
        self.scripts[name] = backend
        return backend

    def make_scripted(self, rest: str, options: dict[str, Any]) -> Backend:
        """The factory of ``scripted:``: a named script of this instance, else a ``.json`` script file."""
        if rest in self.scripts:
            return self.scripts[rest]
        path = Path(rest)
        if path.suffix == ".json" and path.is_file():
            spec = json.loads(path.read_text(encoding="utf-8"))
            return ScriptedBackend(replies=spec.get("replies", []), default=spec.get("default"), logprobs=spec.get("logprobs"),
                                   delay=float(spec.get("delay", 0)), name=rest, multi_sample=bool(spec.get("multi_sample")))
        raise BtkitError(f"no scripted backend named '{rest}' (add one with btkit.testing.backends.Doubles.script, or give a .json file)")

    @hookimpl
    def btkit_register_backends(self, register: Callable[..., None]) -> None:
        register("echo", EchoBackend, description="test double: replies with the prompt (or echo:TEXT)")
        register("scripted", self.make_scripted, description="test double: scripted replies with a request history (scripted:FILE.json)")
        register("det", DeterministicBackend, description="test double: replies are a function of the request (det:FILE.json)")


#: The name the doubles are registered under: this module's path, as ``BTKIT_EXTRA_PLUGINS`` names it.
DOUBLES_PLUGIN = __name__


@hookimpl
def btkit_register_backends(register: Callable[..., None]) -> None:
    """This module as a plugin (``BTKIT_EXTRA_PLUGINS=btkit.testing.backends``): a fresh, empty
    :class:`Doubles` each time, so ``scripted:`` takes only ``.json`` files here."""
    Doubles().btkit_register_backends(register)
