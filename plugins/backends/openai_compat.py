"""``openai:MODEL`` and ``vllm:MODEL``: OpenAI-compatible HTTP endpoints, spoken to directly with aiohttp.

- ``openai:MODEL``: any OpenAI-compatible chat endpoint. Base URL from ``--base-url`` (backend option
  ``base_url``) or ``OPENAI_BASE_URL`` (default https://api.openai.com/v1); key from ``OPENAI_API_KEY``.
  Capabilities: chat, ``n`` candidates per request, JSON-schema output (``response_format``), and
  continuation scores (``--judge-mode pmi|ifd``) through the legacy completions API where the
  server supports ``echo`` with ``logprobs`` (see :func:`text_frame` and :meth:`OpenAICompatBackend.score_continuation`).
  No next-token logprobs: the OpenAI chat API cannot continue an assistant prefix, so a judge's
  ``Score: `` prefill cannot be read there (``--judge-mode auto`` picks the rubric).
- ``vllm:MODEL`` (``vllm:`` alone: the first model of ``GET /v1/models``): OpenAI-compatible plus
  vLLM's extensions: assistant prefill (``continue_final_message``), next-token logprobs
  (``top_logprobs`` after the prefill), continuation scores (``prompt_logprobs``), guided decoding
  (``guided_json`` and friends pass through, ``json_schema`` becomes ``response_format``).
  Key from ``VLLM_API_KEY`` or ``OPENAI_API_KEY`` (``vllm serve --api-key``).
  Those extensions are only offered (``supports()``) and used after ``GET /v1/models`` shows a vLLM
  server (``owned_by: vllm``), checked once: other servers silently ignore unknown fields, which
  would give wrong scores rather than an error. So ``--judge-mode auto`` falls back to the rubric
  on another server, and ``logprob``/``pmi``/``ifd`` stop before the first model call.
  ``-B vllm_extensions=true`` vouches for a compatible server that does not say so (SGLang...).

Backend options (``-B``): timeout, connect_timeout, max_retries, backoff_base, max_backoff,
max_retry_wait, retry_budget, retry_ratio, max_connections (see ``remote_http``), api_key (prefer the
environment: a command line is stored in run.json), top_logprobs (vllm, default 20).
Sampling params come per call: temperature, top_p, max_tokens, stop, seed, n, repetition_penalty
(vllm), json_schema; any other key is sent as-is in the request body.

With ``n > 1`` the completion's text is the first choice and ``extra["choices"]`` lists every
choice as ``{"text", "finish_reason"}``; token counts are the request's (all choices).
``extra["cost"]`` is set where litellm's price table (read as a file, no import) knows the model.

Replies are checked before use (:func:`reply_choices`): a 200 reply without choices, a choice whose
``message`` is not an object, or ``content`` that is neither text, null nor a list of text parts
(``[{"type": "text", "text": ...}]``, joined without a separator, as the parts of one message are)
is a malformed reply, retried like a garbled body and, once retries are spent, the record's
``backend_error`` with the raw body. ``usage`` that is not an object of non-negative counts (a
string, NaN) counts 0 tokens and never costs the reply. Every reply text has the API key (and a
password written in the base URL) replaced by ``***`` before it leaves the backend, as error bodies
do, so an echoed key never reaches the cache or the data.

Base URL: ``openai:`` and ``vllm:`` are the only backends that read ``OPENAI_BASE_URL``, and only
when no ``base_url`` option is given. A ``user:password@`` in the base URL is sent as HTTP Basic auth,
in place of the API key (as the OpenAI SDK does), and recorded nowhere (``public_url``).

Request order: requests go out in the order the engine issues them (input order), so a method's
shared system prompt and few-shot turns reach the server back to back; vLLM's automatic prefix cache
matches blocks by content hash, not arrival order, so no reordering is done here.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, TypeVar

from btkit.backends import CHAT, JSON_SCHEMA, MULTI_SAMPLE, NEXT_TOKEN_LOGPROBS, SAMPLING_KEYS, SCORE_CONTINUATION, UNCONDITIONAL_MESSAGES, Backend, Completion
from btkit.errors import BackendError, BtkitError, CapabilityError
from btkit.hookspecs import hookimpl

from btkit.kit.http import (
    RAW_LIMIT, RETRY_STATUSES, HttpClient, RemoteSettings, RetryableError, RetryBudget, Secret, _error_message,
    MalformedReply, call_with_retries, content_text, cost_usd, env_first, public_url, split_base_urls, token_count,
    url_secrets,
)

T = TypeVar("T")

#: Params that shape the request body itself, never sent as extra fields.
_CONTROL = ("assistant_prefix", "json_schema", "json_schema_name")

#: Role names in :func:`text_frame`.
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}

#: The one-time probe of ``/completions`` echo: a reply any language model predicts well, so a server
#: that reads each token's logprob from the wrong position is plain to see (see ``_probe_echo``).
PROBE_MESSAGES = ({"role": "user", "content": "Count from 1 to 12."},)
PROBE_CONTINUATION = ", ".join(str(i) for i in range(1, 13))


#: Why ``score_continuation(..., end_of_turn=True)`` (``--judge-mode complete``) is refused here.
_NO_END_OF_TURN = ("backend '{spec}' cannot read the end-of-turn logprob after a continuation (a remote text frame has no chat "
                   "end-of-turn token), needed for --judge-mode complete; use --judge-mode pmi, or llamacpp:")


def text_frame(messages: list[dict[str, str]] | tuple[dict[str, str], ...] | None) -> str:
    """The plain text ``openai:`` scores a continuation after (the completions API takes text, and an
    endpoint does not publish its chat template).

    Each message is ``Role: content`` (System, User, Assistant), turns are separated by a blank line,
    and the frame ends with ``Assistant:`` and a newline, right before the continuation:
    ``"User: Why?\n\nAssistant:\n"``. ``None`` frames an empty user turn (``"User: \n\nAssistant:\n"``),
    so PMI/IFD compare the same text with and without the instruction. The final newline keeps
    the boundary clean for BPE tokenizers, which glue a leading space to the next word.
    """
    msgs = UNCONDITIONAL_MESSAGES if messages is None else messages
    turns = [f"{ROLE_LABELS.get(str(m['role']), str(m['role']).capitalize())}: {m['content']}" for m in msgs]
    return "\n\n".join([*turns, "Assistant:\n"])


class NoEchoLogprobs(Exception):
    """A completions reply that does not give the prompt's token logprobs (the message says how)."""


def echo_span(data: dict[str, Any], start: int, end: int) -> tuple[list[int], dict[str, Any]]:
    """Indices of the echoed prompt tokens that spell ``prompt[start:end]``, and the ``logprobs`` object.

    Token ``i`` spans ``text_offset[i]`` up to the next token's offset. It is picked when it starts
    inside ``[start, end)``, or when it starts before ``start`` and ends after it: a token straddling
    the frame's end (a tokenizer merging the frame's last newline with the continuation's first
    character) is counted as the continuation's, since it spells part of it, and the frame text it
    also covers is the same in the conditional and the unconditional call. Tokens from ``end`` on
    are the generated one(s) and left out.
    """
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise NoEchoLogprobs("answered without logprobs")
    offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
    if not isinstance(offsets, list) or not isinstance(values, list) or len(offsets) != len(values):
        raise NoEchoLogprobs("answered without text_offset and token_logprobs for the prompt")
    picked = []
    for i, off in enumerate(offsets):
        if not isinstance(off, int) or off >= end:
            continue
        nxt = offsets[i + 1] if i + 1 < len(offsets) and isinstance(offsets[i + 1], int) else end
        if off >= start or nxt > start:
            picked.append(i)
    if not picked:
        raise NoEchoLogprobs("did not echo the prompt's tokens with their logprobs")
    if any(not isinstance(values[i], (int, float)) for i in picked):
        raise NoEchoLogprobs("gave no logprob for some echoed prompt tokens")
    return picked, lp


def reply_choices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Each choice of a chat reply as ``{"text", "finish_reason", "refusal"}``, or a :class:`MalformedReply`."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedReply("reply has no choices" if not choices else f"reply's choices is {type(choices).__name__}, not a list")
    out = []
    for c in choices:
        msg = c.get("message") if isinstance(c, dict) else None
        if not isinstance(msg, dict):
            raise MalformedReply(f"reply has a choice whose message is {type(msg).__name__}, not an object")
        text, refusal = content_text(msg.get("content"))
        if isinstance(msg.get("refusal"), str) and msg["refusal"]:
            refusal = msg["refusal"]
        finish = c.get("finish_reason")
        out.append({"text": text, "finish_reason": finish if isinstance(finish, str) else None, "refusal": refusal})
    return out


def echo_logprobs(data: dict[str, Any], start: int, end: int) -> list[float]:
    """The logprobs of the echoed prompt tokens spelling ``prompt[start:end]`` (see :func:`echo_span`)."""
    picked, lp = echo_span(data, start, end)
    return [float(lp["token_logprobs"][i]) for i in picked]


class OpenAICompatBackend(Backend):
    """Chat over HTTP with an OpenAI-compatible server; retries and budget from ``remote_http``."""

    kind = "openai"
    capabilities = frozenset({CHAT, MULTI_SAMPLE, JSON_SCHEMA, SCORE_CONTINUATION})
    default_base_url = "https://api.openai.com/v1"
    key_env: tuple[str, ...] = ("OPENAI_API_KEY",)
    #: Sampling keys this endpoint kind accepts (others in SAMPLING_KEYS are left out, e.g. OpenAI has no repetition_penalty).
    sampling_keys: tuple[str, ...] = ("temperature", "top_p", "max_tokens", "seed", "stop", "n")

    def __init__(self, rest: str, options: dict[str, Any]):
        self.requested_model = rest.strip()
        self._model: str | None = self.requested_model or None
        urls = split_base_urls(str(options.get("base_url") or env_first("OPENAI_BASE_URL") or self.default_base_url))
        base_url = ",".join(urls)  # several: one model behind several servers, called in turn
        self.api_key = Secret(options.get("api_key") or env_first(*self.key_env), also=[s for u in urls for s in url_secrets(u)])
        self.settings = RemoteSettings.from_options(options)
        self.budget = RetryBudget(self.settings.retry_budget, self.settings.retry_ratio)
        self.client = HttpClient(base_url, self.api_key, self.settings)
        self.base_url = self.client.base_url  # without user:password, which the client sends as Basic auth
        self.spec = f"{self.kind}:{rest}"
        self._models_cache: list[dict[str, Any]] | None = None
        self._echo_reason: str | None = None  # why /completions echo cannot score, once probed
        self._echo_checked = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} at {public_url(self.base_url)}>"

    # -- identity and model discovery --------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"backend": self.kind, "base_url": ",".join(self.client.base_urls), "model": self.model}

    @property
    def model(self) -> str:
        """The model name; discovered once from ``GET /models`` when the spec names none."""
        if self._model is None:
            cards = self.models()
            if not cards:
                raise BtkitError(f"{public_url(self.base_url)}/models lists no model; name one, e.g. --model {self.kind}:MODEL")
            self._model = str(cards[0]["id"])
        return self._model

    def models(self) -> list[dict[str, Any]]:
        """The server's model cards (``GET /models``), fetched once."""
        if self._models_cache is None:
            data = self.client.get_json_sync("/models")
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list):
                raise BtkitError(f"{public_url(self.base_url)}/models: unexpected reply (no 'data' list)")
            self._models_cache = [c for c in cards if isinstance(c, dict) and c.get("id")]
        return self._models_cache

    # -- requests ----------------------------------------------------------------------------
    async def post(self, path: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], T] | None = None) -> Any:
        """POST with retries; ``parse`` turns each reply into the result inside the attempt, so a
        malformed reply it rejects (a :class:`RetryableError`) is retried like a garbled body."""

        async def attempt() -> Any:
            data = await self.client.request_json("POST", path, body)
            return parse(data) if parse is not None else data

        return await call_with_retries(attempt, self.settings, self.budget, f"{self.spec} POST {path}")

    def chat_body(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        for key, value in params.items():
            if value is None or key in _CONTROL:
                continue
            if key in SAMPLING_KEYS:
                if key not in self.sampling_keys:
                    continue
                if key == "stop" and not value:
                    continue
                if key == "n" and int(value) == 1:
                    continue
            body[key] = value
        schema = params.get("json_schema")
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": str(params.get("json_schema_name") or "output"), "schema": schema, "strict": True}}
        prefix = params.get("assistant_prefix")
        if prefix:
            self.add_prefill(body, prefix)
        return body

    def add_prefill(self, body: dict[str, Any], prefix: str) -> None:
        raise CapabilityError(f"backend '{self.spec}' cannot continue an assistant prefix ({prefix!r}): the OpenAI "
                              "chat API has no prefill; use vllm: (a vLLM server) or llamacpp:, or a template without one")

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        body = self.chat_body(messages, params)
        return await self.post("/chat/completions", body, lambda data: self.completion_from(data, body))

    def completion_from(self, data: dict[str, Any], body: dict[str, Any]) -> Completion:
        """An OpenAI chat reply -> Completion, every text with the key redacted. A malformed reply
        (see :func:`reply_choices`) is a RetryableError carrying the raw JSON."""
        try:
            choices = reply_choices(data)
        except MalformedReply as e:
            raise RetryableError(f"HTTP 200 with a malformed reply: {e}", raw=self.api_key.redact(json.dumps(data)[:RAW_LIMIT])) from None
        redact = self.api_key.redact
        texts = [{"text": redact(c["text"]), "finish_reason": c["finish_reason"]} for c in choices]
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        prompt_tokens = token_count(usage.get("prompt_tokens"))
        completion_tokens = token_count(usage.get("completion_tokens"))
        extra: dict[str, Any] = {}
        if int(body.get("n") or 1) > 1:
            extra["choices"] = texts
        refusal = redact(choices[0]["refusal"])
        if refusal:
            extra["refusal"] = refusal
        cost = self.cost(prompt_tokens, completion_tokens)
        if cost:
            extra["cost"] = cost
        return Completion(text=texts[0]["text"], finish_reason=texts[0]["finish_reason"] or ("refusal" if refusal else None),
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, extra=extra)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return cost_usd(self.model, prompt_tokens, completion_tokens)

    # -- continuation scores through /completions echo ----------------------------------------
    def supports(self, capability: str) -> bool:
        """Continuation scores only where ``/completions`` echoes aligned prompt logprobs: asked once
        (one small request, see ``_probe_echo``) so a run that needs them stops before any work."""
        if capability == SCORE_CONTINUATION and capability in self.capabilities:
            return self.echo_reason() is None
        return capability in self.capabilities

    def unsupported_reason(self, capability: str) -> str:
        if capability == SCORE_CONTINUATION and self._echo_reason:
            return f"backend '{self.spec}' cannot do '{capability}': {self._echo_reason}"
        return super().unsupported_reason(capability)

    def echo_body(self, prompt: str) -> dict[str, Any]:
        """A completions request that echoes ``prompt`` with each token's logprob and generates one
        token (llama-cpp-python reads ``max_tokens: 0`` as "no limit"; 1 works everywhere)."""
        return {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}

    def echo_reason(self) -> str | None:
        """None when this endpoint can score continuations; else why not (one line). Probed once."""
        if not self._echo_checked:
            self._echo_reason = self._probe_echo()
            self._echo_checked = True
        return self._echo_reason

    def _probe_echo(self) -> str | None:
        """Score :data:`PROBE_CONTINUATION` once and judge the reply.

        No: a 4xx (echo or logprobs rejected, no completions endpoint for this model), a 5xx that
        names logprobs or echo (llama-cpp-python's server without ``--logits_all True``), a reply
        without prompt logprobs, offsets that do not spell the prompt, or logprobs read one position
        late: in a counting reply the most likely token at each position should be the token there;
        a server whose top token matches the *next* one instead (llama-cpp-python's server with a
        model that adds no BOS token, abetlen/llama-cpp-python#1983) would give wrong numbers.
        Transient failures are retried twice, then stop the run: the answer is unknown.
        """
        frame = text_frame(PROBE_MESSAGES)
        prompt = frame + PROBE_CONTINUATION
        what = f"POST {public_url(self.base_url)}/completions with echo and logprobs"
        last = ""
        for attempt in range(3):
            if attempt:
                time.sleep(self.settings.backoff(attempt - 1, None))
            try:
                status, headers, text = self.client.post_json_sync("/completions", self.echo_body(prompt))
            except RetryableError as e:
                last = str(e)
                continue
            message = " ".join(_error_message(text).split())[:300]
            if status in (401, 403):
                self.client.raise_for_status(status, headers, text, what)  # a refused key stops the run as usual
            names_it = "logprob" in message.lower() or "echo" in message.lower()
            if status >= 400 and (names_it or (status < 500 and status not in RETRY_STATUSES)):
                return f"{what} answered HTTP {status} ({message or 'no detail'}), so this endpoint cannot score continuations {_CAN_SCORE}"
            if status >= 400:
                last = f"HTTP {status}: {message}"
                continue
            try:
                data = json.loads(text)
                picked, lp = echo_span(data if isinstance(data, dict) else {}, len(frame), len(prompt))
            except ValueError:
                return f"{what} answered with a body that is not JSON, so this endpoint cannot score continuations {_CAN_SCORE}"
            except NoEchoLogprobs as e:
                return f"{what} {e}, so this endpoint cannot score continuations {_CAN_SCORE}"
            tokens = lp.get("tokens") if isinstance(lp.get("tokens"), list) else []
            spelled = "".join(str(tokens[i]) for i in picked) if len(tokens) == len(lp["text_offset"]) else PROBE_CONTINUATION
            straddle = spelled[: len(spelled) - len(PROBE_CONTINUATION)]  # frame text in a token that straddles the boundary
            if not spelled.endswith(PROBE_CONTINUATION) or not frame.endswith(straddle):
                return (f"{what}: the echoed tokens' text_offset does not match the prompt text, so this endpoint "
                        f"cannot score continuations: their tokens cannot be located {_CAN_SCORE}")
            here, next_ = _top_token_matches(lp, picked)
            if next_ > 2 * here + 2:
                return (f"{what}: the echoed logprobs are one token late (each token's logprob read from the distribution "
                        "after it, as llama-cpp-python's server does for a model that adds no BOS token), so this endpoint "
                        f"cannot score continuations: scores read there would be wrong {_CAN_SCORE}")
            return None
        raise BtkitError(f"{what}: could not check whether this endpoint can score continuations ({last}); check --base-url")

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str, *,
                                 end_of_turn: bool = False) -> list[float]:
        """Per-token logprobs of ``continuation`` after :func:`text_frame` of ``messages``, through
        ``POST /completions`` with ``echo`` and ``logprobs`` (the echoed prompt's token logprobs).

        A reply without them is a :class:`CapabilityError` (the run stops with one line), not a
        record failure: every other pair would fail the same way. ``end_of_turn`` is refused: a
        text frame has no chat end-of-turn token whose logprob could be read.
        """
        if end_of_turn:
            raise CapabilityError(_NO_END_OF_TURN.format(spec=self.spec))
        self.require(SCORE_CONTINUATION, "continuation scores")
        if not continuation:
            return []
        frame = text_frame(messages)
        prompt = frame + continuation
        data = await self.post("/completions", self.echo_body(prompt))
        try:
            return echo_logprobs(data, len(frame), len(prompt))
        except NoEchoLogprobs as e:
            raise CapabilityError(f"backend '{self.spec}': POST {public_url(self.base_url)}/completions {e}, so this endpoint "
                                  f"cannot score continuations {_CAN_SCORE}; use one of those or --judge-mode rubric") from None

    async def aclose(self) -> None:
        await self.client.aclose()


#: Who can score continuations, for the messages of backends that cannot.
_CAN_SCORE = "(llamacpp:PATH.gguf in process or vllm: on a vLLM server can)"


def _top_token_matches(lp: dict[str, Any], picked: list[int]) -> tuple[int, int]:
    """How often each picked position's most likely token is the token there, and the token after."""
    tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tops) != len(tokens):
        return 0, 0  # no top tokens to compare: nothing to go on
    here = next_ = 0
    for i in picked:
        top = tops[i]
        if not isinstance(top, dict) or not top:
            continue
        best = max(top, key=lambda t: top[t] if isinstance(top[t], (int, float)) else -math.inf)
        here += best == tokens[i]
        next_ += i + 1 < len(tokens) and best == tokens[i + 1]
    return here, next_


class VLLMBackend(OpenAICompatBackend):
    """A vLLM server: OpenAI-compatible plus prefill, logprobs, prompt logprobs and guided decoding."""

    kind = "vllm"
    capabilities = frozenset({CHAT, MULTI_SAMPLE, JSON_SCHEMA, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION})
    default_base_url = "http://127.0.0.1:8000/v1"
    key_env = ("VLLM_API_KEY", "OPENAI_API_KEY")
    sampling_keys = ("temperature", "top_p", "max_tokens", "seed", "stop", "n", "repetition_penalty")

    def __init__(self, rest: str, options: dict[str, Any]):
        super().__init__(rest, options)
        self.top_logprobs = int(options.get("top_logprobs") or 20)
        flag = options.get("vllm_extensions")
        self._extensions_ok: bool | None = None if flag is None else str(flag).lower() in ("1", "true", "yes")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return None  # a self-hosted server has no list price

    #: What only a vLLM server does with these requests; other servers ignore the fields.
    vllm_only = frozenset({NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION})

    def extensions_ok(self) -> bool:
        """Whether vLLM's request fields will be honoured: ``-B vllm_extensions``, else ``GET /models``
        says ``owned_by: vllm`` (asked once and remembered)."""
        if self._extensions_ok is None:
            self._owners = sorted({str(c.get("owned_by")) for c in self.models()})
            self._extensions_ok = "vllm" in self._owners
        return self._extensions_ok

    def supports(self, capability: str) -> bool:
        """Prefill-based logprobs and prompt logprobs only on a server known to be vLLM, so
        ``--judge-mode auto`` reads the rubric elsewhere and explicit modes stop before any call."""
        if capability in self.vllm_only:
            return capability in self.capabilities and self.extensions_ok()
        return capability in self.capabilities

    def unsupported_reason(self, capability: str) -> str:
        if capability in self.vllm_only and capability in self.capabilities:
            also = ", and openai: scores continuations where /completions echoes logprobs" if capability == SCORE_CONTINUATION else ""
            return (f"backend '{self.spec}' cannot do '{capability}': {self._not_vllm()}; "
                    f"-B vllm_extensions=true vouches for a vLLM-compatible server{also}")
        return super().unsupported_reason(capability)

    def _not_vllm(self) -> str:
        owners = getattr(self, "_owners", None)
        if owners is None:  # never asked: the user said so
            return f"-B vllm_extensions=false turns vLLM's request fields off for {public_url(self.base_url)}"
        return (f"{public_url(self.base_url)} does not say it is vLLM (GET /models owned_by: {', '.join(owners)}), and other "
                "servers ignore vLLM's fields and would return wrong numbers")

    def require_extensions(self, feature: str) -> None:
        """A safety net under :meth:`supports`: never send a vLLM-only request to another server."""
        if not self.extensions_ok():
            raise CapabilityError(
                f"{self._not_vllm()}, so {feature} cannot be trusted there. "
                "Use --judge-mode rubric (or a method mode without logprobs), or -B vllm_extensions=true for a vLLM-compatible server"
            )

    def add_prefill(self, body: dict[str, Any], prefix: str) -> None:
        self.require_extensions("an assistant prefix (continue_final_message)")
        body["messages"] = body["messages"] + [{"role": "assistant", "content": prefix}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        """One decoding step after the prefill; candidates found among the top tokens (case kept,
        surrounding whitespace ignored, so ``' 4'`` and ``'4'`` both count for ``'4'``).
        Candidates outside the server's top-k are left out (callers treat them as -inf)."""
        self.require_extensions("next-token logprobs after a prefill")
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": 1, "temperature": 0.0,
                                "logprobs": True, "top_logprobs": self.top_logprobs}
        if assistant_prefix:
            self.add_prefill(body, assistant_prefix)
        data = await self.post("/chat/completions", body)
        try:
            top = data["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            pairs = [(str(t["token"]), float(t["logprob"])) for t in top]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise BackendError(f"{self.spec}: reply has no top_logprobs for the first token",
                               raw=self.api_key.redact(json.dumps(data)[:RAW_LIMIT])) from None
        out: dict[str, float] = {}
        for cand in candidates:
            vals = [lp for tok, lp in pairs if tok.strip() and tok.strip() == cand.strip()]
            if vals:
                top_v = max(vals)
                out[cand] = top_v + math.log(sum(math.exp(v - top_v) for v in vals))
        return out

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str, *,
                                 end_of_turn: bool = False) -> list[float]:
        """Per-token logprobs of ``continuation`` via vLLM's ``prompt_logprobs``.

        The continuation is prefilled as the assistant's reply to ``messages`` (``None``: to an empty
        user turn, :data:`UNCONDITIONAL_MESSAGES`, in the same chat template) and the trailing
        prompt tokens that spell it are read: both scores come from the same frame.
        """
        if end_of_turn:  # not read yet: the chat template's end token would need its own prompt_logprobs lookup
            raise CapabilityError(_NO_END_OF_TURN.format(spec=self.spec))
        self.require_extensions("continuation scores (prompt_logprobs)")
        if not continuation:
            return []
        turns = list(UNCONDITIONAL_MESSAGES if messages is None else messages)
        body = {"model": self.model, "messages": turns + [{"role": "assistant", "content": continuation}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        data = await self.post("/chat/completions", body)
        try:
            return continuation_logprobs(data, continuation, self.spec)
        except BackendError as e:
            raise BackendError(str(e), raw=self.api_key.redact(e.raw)) from None


def continuation_logprobs(data: dict[str, Any], continuation: str, spec: str = "vllm") -> list[float]:
    """The logprobs of the trailing prompt tokens that spell ``continuation`` in a vLLM reply."""
    entries = data.get("prompt_logprobs")
    if entries is None and isinstance(data.get("choices"), list) and data["choices"]:
        entries = data["choices"][0].get("prompt_logprobs")
    if not isinstance(entries, list):
        raise BackendError(f"{spec}: reply has no prompt_logprobs (is this a vLLM server?)", raw=json.dumps(data)[:RAW_LIMIT])
    picked: list[float] = []
    covered = 0
    for entry in reversed(entries):
        if not entry:
            break
        if not isinstance(entry, dict) or len(entry) != 1:
            raise BackendError(f"{spec}: prompt_logprobs entry is not one prompt token with its logprob",
                               raw=json.dumps(entry)[:RAW_LIMIT])
        info = next(iter(entry.values()))
        try:
            picked.append(float(info["logprob"]))
            covered += len(str(info.get("decoded_token") or ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackendError(f"{spec}: prompt_logprobs entry without a numeric logprob", raw=json.dumps(entry)[:RAW_LIMIT]) from None
        if covered >= len(continuation):
            break
    picked.reverse()
    return picked


@hookimpl
def btkit_register_backends(register):
    register("openai", OpenAICompatBackend, description="OpenAI-compatible HTTP endpoint (openai:MODEL; --base-url or OPENAI_BASE_URL, key OPENAI_API_KEY); continuation scores where /completions echoes logprobs")
    register("vllm", VLLMBackend, description="vLLM server (vllm:MODEL, or vllm: for its first model; --base-url): prefill, logprobs, n>1, guided JSON")
