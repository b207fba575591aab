"""``openai:MODEL`` and ``vllm:MODEL``: OpenAI-compatible HTTP endpoints, spoken to directly with aiohttp.

- ``openai:MODEL``: any OpenAI-compatible chat endpoint. Base URL from ``--base-url`` (backend option
  ``base_url``) or ``OPENAI_BASE_URL`` (default https://api.openai.com/v1); key from ``OPENAI_API_KEY``.
  Capabilities: chat, ``n`` candidates per request, JSON-schema output (``response_format``). No
  logprob scoring: the OpenAI chat API cannot continue an assistant prefix, so a judge's
  ``Score: `` prefill cannot be read there (``--curate-mode auto`` picks the rubric).
- ``vllm:MODEL`` (``vllm:`` alone: the first model of ``GET /v1/models``): OpenAI-compatible plus
  vLLM's extensions: assistant prefill (``continue_final_message``), next-token logprobs
  (``top_logprobs`` after the prefill), continuation scores (``prompt_logprobs``), guided decoding
  (``guided_json`` and friends pass through, ``json_schema`` becomes ``response_format``).
  Key from ``VLLM_API_KEY`` or ``OPENAI_API_KEY`` (``vllm serve --api-key``).
  Those extensions are only used after ``GET /v1/models`` shows a vLLM server (``owned_by: vllm``):
  other servers silently ignore unknown fields, which would give wrong scores rather than an error.
  ``-B vllm_extensions=true`` vouches for a compatible server that does not say so (SGLang...).

Backend options (``-B``): timeout, connect_timeout, max_retries, backoff_base, max_backoff,
max_retry_wait, retry_budget, retry_ratio, max_connections (see ``remote_http``), api_key (prefer the
environment: a command line is stored in run.json), top_logprobs (vllm, default 20).
Sampling params come per call: temperature, top_p, max_tokens, stop, seed, n, repetition_penalty
(vllm), json_schema; any other key is sent as-is in the request body.

With ``n > 1`` the completion's text is the first choice and ``extra["choices"]`` lists every
choice as ``{"text", "finish_reason"}``; token counts are the request's (all choices).
``extra["cost"]`` is set where litellm's price table (read as a file, no import) knows the model.

Request order: requests go out in the order the engine issues them (input order), so a method's
shared system prompt and few-shot turns reach the server back to back; vLLM's automatic prefix cache
matches blocks by content hash, not arrival order, so no reordering is done here.
"""

from __future__ import annotations

import math
from typing import Any

from btkit.backends import CHAT, JSON_SCHEMA, MULTI_SAMPLE, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, Backend, Completion
from btkit.errors import BackendError, BtkitError, CapabilityError
from btkit.hookspecs import hookimpl

from .remote_http import (
    RAW_LIMIT, HttpClient, RemoteSettings, RetryableError, RetryBudget, Secret, call_with_retries, cost_usd, env_first,
    normalize_base_url, public_url,
)

#: Params that shape the request body itself, never sent as extra fields.
_CONTROL = ("assistant_prefix", "json_schema", "json_schema_name")


class OpenAICompatBackend(Backend):
    """Chat over HTTP with an OpenAI-compatible server; retries and budget from ``remote_http``."""

    kind = "openai"
    capabilities = frozenset({CHAT, MULTI_SAMPLE, JSON_SCHEMA})
    default_base_url = "https://api.openai.com/v1"
    key_env: tuple[str, ...] = ("OPENAI_API_KEY",)
    #: Sampling keys this endpoint kind accepts (others in SAMPLING_KEYS are left out, e.g. OpenAI has no repetition_penalty).
    sampling_keys: tuple[str, ...] = ("temperature", "top_p", "max_tokens", "seed", "stop", "n")

    def __init__(self, rest: str, options: dict[str, Any]):
        self.requested_model = rest.strip()
        self._model: str | None = self.requested_model or None
        self.base_url = normalize_base_url(str(options.get("base_url") or env_first("OPENAI_BASE_URL") or self.default_base_url))
        self.api_key = Secret(options.get("api_key") or env_first(*self.key_env))
        self.settings = RemoteSettings.from_options(options)
        self.budget = RetryBudget(self.settings.retry_budget, self.settings.retry_ratio)
        self.client = HttpClient(self.base_url, self.api_key, self.settings)
        self.spec = f"{self.kind}:{rest}"
        self._models_cache: list[dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} at {public_url(self.base_url)}>"

    # -- identity and model discovery --------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"backend": self.kind, "base_url": public_url(self.base_url), "model": self.model}

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
    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await call_with_retries(lambda: self.client.request_json("POST", path, body), self.settings, self.budget,
                                       f"{self.spec} POST {path}")

    def chat_body(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        for key, value in params.items():
            if value is None or key in _CONTROL:
                continue
            if key in ("temperature", "top_p", "max_tokens", "seed", "stop", "n", "repetition_penalty"):
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
        data = await self.post("/chat/completions", body)
        return self.completion_from(data, body)

    def completion_from(self, data: dict[str, Any], body: dict[str, Any]) -> Completion:
        """An OpenAI chat reply -> Completion. A reply without choices is a BackendError with the raw JSON."""
        import json

        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"{self.spec}: reply has no choices", raw=self.api_key.redact(json.dumps(data)[:RAW_LIMIT]))
        texts = []
        for c in choices:
            msg = c.get("message") or {}
            texts.append({"text": msg.get("content"), "finish_reason": c.get("finish_reason")})
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        extra: dict[str, Any] = {}
        if int(body.get("n") or 1) > 1:
            extra["choices"] = texts
        refusal = (choices[0].get("message") or {}).get("refusal")
        if refusal:
            extra["refusal"] = refusal
        cost = self.cost(prompt_tokens, completion_tokens)
        if cost:
            extra["cost"] = cost
        return Completion(text=texts[0]["text"], finish_reason=texts[0]["finish_reason"] or ("refusal" if refusal else None),
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, extra=extra)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return cost_usd(self.model, prompt_tokens, completion_tokens)

    async def aclose(self) -> None:
        await self.client.aclose()


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

    def require_extensions(self, feature: str) -> None:
        """vLLM-only request fields are ignored by other servers: check the server is vLLM first."""
        if self._extensions_ok is None:
            self._owners = sorted({str(c.get("owned_by")) for c in self.models()})
            self._extensions_ok = "vllm" in self._owners
        if not self._extensions_ok:
            owners = ", ".join(getattr(self, "_owners", None) or ["not checked"])
            raise CapabilityError(
                f"{public_url(self.base_url)} does not say it is vLLM (GET /models owned_by: {owners}), "
                f"so {feature} cannot be trusted there: other servers ignore vLLM's fields and would return wrong numbers. "
                "Use --curate-mode rubric (or a method mode without logprobs), or -B vllm_extensions=true for a vLLM-compatible server"
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
        except (KeyError, IndexError, TypeError, ValueError):
            import json

            raise BackendError(f"{self.spec}: reply has no top_logprobs for the first token", raw=json.dumps(data)[:RAW_LIMIT]) from None
        out: dict[str, float] = {}
        for cand in candidates:
            vals = [lp for tok, lp in pairs if tok.strip() and tok.strip() == cand.strip()]
            if vals:
                top_v = max(vals)
                out[cand] = top_v + math.log(sum(math.exp(v - top_v) for v in vals))
        return out

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str) -> list[float]:
        """Per-token logprobs of ``continuation`` via vLLM's ``prompt_logprobs``.

        With messages: the continuation is prefilled as the assistant's reply and the trailing prompt
        tokens that spell it are read. Without: ``/completions`` on the bare text; the first token
        has no logprob (nothing precedes it) and is left out.
        """
        self.require_extensions("continuation scores (prompt_logprobs)")
        if not continuation:
            return []
        if messages is None:
            body: dict[str, Any] = {"model": self.model, "prompt": continuation, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            data = await self.post("/completions", body)
        else:
            body = {"model": self.model, "messages": list(messages) + [{"role": "assistant", "content": continuation}],
                    "continue_final_message": True, "add_generation_prompt": False,
                    "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
            data = await self.post("/chat/completions", body)
        return continuation_logprobs(data, continuation, self.spec)


def continuation_logprobs(data: dict[str, Any], continuation: str, spec: str = "vllm") -> list[float]:
    """The logprobs of the trailing prompt tokens that spell ``continuation`` in a vLLM reply."""
    import json

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
        if len(entry) != 1:
            raise BackendError(f"{spec}: prompt_logprobs entry has {len(entry)} tokens, expected the prompt token alone",
                               raw=json.dumps(entry)[:RAW_LIMIT])
        info = next(iter(entry.values()))
        picked.append(float(info["logprob"]))
        covered += len(info.get("decoded_token") or "")
        if covered >= len(continuation):
            break
    picked.reverse()
    return picked


@hookimpl
def btkit_register_backends(register):
    register("openai", OpenAICompatBackend, description="OpenAI-compatible HTTP endpoint (openai:MODEL; --base-url or OPENAI_BASE_URL, key OPENAI_API_KEY)")
    register("vllm", VLLMBackend, description="vLLM server (vllm:MODEL, or vllm: for its first model; --base-url): prefill, logprobs, n>1, guided JSON")
