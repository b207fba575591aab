"""The backend interface. Backends are plugins; the core only knows this contract.

A backend is named by a spec string ``prefix:rest`` (split on the first colon only), e.g.
``llamacpp:/models/x.gguf``, ``openai:gpt-4o-mini``, ``vllm:MODEL``. It states its capabilities so a
stage can pick the best way to get what it needs (read a score from logprobs instead of parsing
free text) and fall back otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from contextvars import ContextVar

from .errors import CapabilityError

#: Requests a backend sent for the call in progress, retries included. A backend that retries sets
#: it on every attempt (``ATTEMPTS.set(n)``); the engine reads it after the call, in the same task,
#: so ``stats.json`` counts what the server saw (a backend that never retries leaves it at 1).
ATTEMPTS: ContextVar[int] = ContextVar("btkit_attempts", default=1)

#: Capability names a backend may declare.
CHAT = "chat"  # chat completion with the model's own chat template
NEXT_TOKEN_LOGPROBS = "next_token_logprobs"  # distribution over given candidate next tokens
SCORE_CONTINUATION = "score_continuation"  # per-token logprobs of a given continuation
MULTI_SAMPLE = "n"  # several candidates per prompt in one request
JSON_SCHEMA = "json_schema"  # structured output
#: ``score_continuation(..., end_of_turn=True)`` appends log P(the chat template's end-of-turn token)
#: right after the continuation (``--judge-mode complete``).
END_OF_TURN = "end_of_turn_logprob"

#: Sampling options every backend understands; others pass through as backend-specific extras.
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop", "repetition_penalty", "n")


#: The frame ``Backend.score_continuation(None, ...)`` scores in: the reply to an empty user turn in the
#: same chat frame (system prompt and role headers as the chat template writes them), so a conditional
#: and an unconditional score differ by the instruction text alone (PMI, IFD). Every backend uses this.
UNCONDITIONAL_MESSAGES: tuple[dict[str, str], ...] = ({"role": "user", "content": ""},)

#: ``Completion.extra[CHOICES]`` of an ``n > 1`` reply (``MULTI_SAMPLE``): one ``{"text": str | None,
#: "finish_reason": str | None}`` per sampled choice, in order; the completion's own ``text`` and
#: ``finish_reason`` are choice 0's. Backends write it; stages read it through :func:`choices_of`.
CHOICES = "choices"


@dataclass
class Completion:
    """What a chat call returned. ``finish_reason`` is kept: 'length' means truncated."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set by the engine (``StageContext.complete``), never by a backend: whether the reply came from
    #: the cache, the lineage step that records the call, and, when a parser was given, the parsed
    #: value or the :class:`btkit.methods.ParseError` that says why there is none.
    cached: bool = False
    step: dict[str, Any] | None = None
    parsed: Any = None
    parse_error: Exception | None = None

    @property
    def ok(self) -> bool:
        """Usable output: text present and not cut off or filtered."""
        return bool(self.text and self.text.strip()) and self.finish_reason not in ("length", "content_filter")

    def to_json(self) -> dict[str, Any]:
        """What the cache stores (``cached`` is about this call, not the reply). ``extra`` is copied
        deeply enough that later edits of the completion never reach the stored value."""
        return {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "extra": json.loads(json.dumps(self.extra)) if self.extra else {}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Completion":
        return cls(**{k: v for k, v in d.items() if k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "extra")})


class Backend:
    """Base class for backends. Subclasses override what they support and list it in ``capabilities``.

    All model calls are ``async`` so the engine can keep many in flight; a backend that can only do
    one at a time (in-process llama.cpp) says so with ``max_concurrency = 1``.
    """

    spec: str = ""
    capabilities: frozenset[str] = frozenset({CHAT})
    max_concurrency: int | None = None

    def identity(self) -> dict[str, Any]:
        """What identifies this backend's outputs in the cache: spec, base URL, model. Never secrets."""
        return {"spec": self.spec}

    def supports(self, capability: str) -> bool:
        """Whether this backend can do ``capability`` now. Static by default; a backend whose
        abilities depend on the server it talks to (``vllm:`` against a server that is not vLLM)
        overrides this and may ask the server, so ``auto`` modes fall back before any call."""
        return capability in self.capabilities

    def unsupported_reason(self, capability: str) -> str:
        """Why ``capability`` is missing, for the error message (a backend may say more)."""
        return f"backend '{self.spec}' cannot do '{capability}'"

    def require(self, capability: str, why: str) -> None:
        if not self.supports(capability):
            raise CapabilityError(
                f"{self.unsupported_reason(capability)}, needed for {why}; "
                f"use a backend that can (e.g. llamacpp:PATH.gguf)"
            )

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        raise NotImplementedError

    async def next_token_logprobs(
        self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]
    ) -> dict[str, float]:
        """Log-probabilities of each candidate string as the assistant's next token after ``assistant_prefix``."""
        self.require(NEXT_TOKEN_LOGPROBS, "reading a score distribution")
        raise NotImplementedError

    async def score_continuation(
        self, messages: list[dict[str, str]] | None, continuation: str, *, end_of_turn: bool = False
    ) -> list[float]:
        """Per-token logprobs of ``continuation`` as the assistant's reply to ``messages``.

        With ``end_of_turn`` (only asked of a backend that declares :data:`END_OF_TURN`), one more
        value: the logprob of the end-of-turn token right after the continuation.

        ``messages=None`` scores it unconditionally, as the reply to :data:`UNCONDITIONAL_MESSAGES`.
        """
        self.require(SCORE_CONTINUATION, "likelihood scoring")
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections, models, threads."""


def split_spec(spec: str) -> tuple[str, str]:
    """``'openai:gpt-4o:mini'`` -> ``('openai', 'gpt-4o:mini')``: split on the first colon only."""
    prefix, sep, rest = spec.partition(":")
    if not sep:
        return spec, ""
    return prefix, rest


def public_url(url: str) -> str:
    """``url`` without ``user:password@``: the one form of a base URL that is recorded anywhere
    (cache keys, run.json, messages, logs), so a credential written into the URL stays in memory."""
    import urllib.parse

    if "@" not in url:
        return url
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host: cannot tell userinfo apart, so keep none of it
        return "<unparsable URL>"
    if "@" not in p.netloc:
        return url
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rsplit("@", 1)[1], p.path, p.query, p.fragment))


def choices_of(completion: Completion) -> list[dict[str, Any]]:
    """The sampled choices of a reply (see :data:`CHOICES`); a reply of one choice as a list of one."""
    choices = completion.extra.get(CHOICES)
    if isinstance(choices, list) and choices:
        return choices
    return [{"text": completion.text, "finish_reason": completion.finish_reason}]


__all__ = ["ATTEMPTS", "CHAT", "NEXT_TOKEN_LOGPROBS", "SCORE_CONTINUATION", "MULTI_SAMPLE", "JSON_SCHEMA", "END_OF_TURN", "SAMPLING_KEYS",
           "UNCONDITIONAL_MESSAGES", "CHOICES", "Completion", "Backend", "split_spec", "public_url", "choices_of"]
