"""``litellm:PROVIDER/MODEL``: every provider litellm supports (Anthropic, Gemini, Bedrock, Azure...).

litellm is optional (``pip install 'btkit[remote]'``) and imported on the first call only: its import
takes seconds. Before importing it, ``LITELLM_LOCAL_MODEL_COST_MAP`` defaults to ``True`` so the
import does not fetch a price list from the internet (reproducible costs, no stall when offline);
set it to ``False`` yourself for the live list.

- Keys come from the provider's own variables (``ANTHROPIC_API_KEY``...) or ``-B api_key=...``;
  ``--base-url`` becomes litellm's ``api_base`` (e.g. ``litellm:openai/NAME`` on a local server).
  ``OPENAI_BASE_URL`` is read for the ``openai/`` provider only (as litellm itself does), never
  for another provider: a ``litellm:anthropic/...`` run goes to Anthropic whatever it says.
- litellm reads each reply itself first. One it cannot read (a message that is not an object,
  content that is a number or, with litellm 1.110, a list of text parts, a ``usage`` that is a string
  or NaN) is the error litellm raises, retried as a 5xx and then the record's ``backend_error`` with
  litellm's message, which quotes the reply. What it does hand back is checked as ``openai:`` checks
  a reply (no choices: retried; a count that is not a number: 0 tokens). ``openai:`` keeps a reply
  whose ``usage`` alone is malformed and joins text parts: prefer it for OpenAI-compatible servers.
- Every reply text has the key, the credential-like environment values and a password written in
  the base URL replaced by ``***`` before it leaves the backend, as error text does.
- ``user:password@`` in the base URL is sent as a Basic ``Authorization`` header (litellm's HTTP
  client refuses credentials in the URL next to its own header) and recorded nowhere.
- Retries are btkit's (same options and run-wide budget as ``openai:``; litellm's own are off), so
  every backend fails the same way: 429/5xx/connection/timeout retried, other errors final.
- ``extra["cost"]`` comes from litellm's price table where it knows the model.
- An assistant prefix is sent as a final assistant message where litellm says the model supports
  prefill (Anthropic, DeepSeek...); elsewhere it is a configuration error.
Capabilities: chat, ``n`` candidates, JSON-schema output. No logprob scoring (providers differ too
much); methods fall back to rubric parsing.

Secrets: litellm's loggers do not propagate to the root logger and, at debug level
(``litellm._turn_on_debug()``), log every request; the version tested masks the key there, and a
filter on those loggers and their handlers (:class:`RedactSecrets`) scrubs the key btkit gave it and
the credential-like environment values it may pick up, whatever the version. Errors are raised
without litellm's exception attached as ``__context__``: its message may quote the key (a provider
echoing the Authorization header), and a traceback printer or error reporter could show it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from btkit.backends import CHAT, JSON_SCHEMA, MULTI_SAMPLE, Backend, Completion
from btkit.errors import BackendError, BtkitError, CapabilityError
from btkit.hookspecs import hookimpl

from btkit.kit.http import (
    RAW_LIMIT, RETRY_STATUSES, MalformedReply, RemoteSettings, RetryableError, RetryBudget, Secret, basic_auth,
    call_with_retries, content_text, env_first, env_secrets, normalize_base_url, parse_retry_after, public_url, token_count, url_secrets,
)

#: litellm providers that speak to an OpenAI-compatible endpoint, the only ones ``OPENAI_BASE_URL`` is for.
OPENAI_BASE_URL_PROVIDERS = ("openai", "text-completion-openai")

_CONTROL = ("assistant_prefix", "json_schema", "json_schema_name", "repetition_penalty")


#: litellm's own loggers (``propagate=False``, with their own handlers).
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


class RedactSecrets(logging.Filter):
    """Replaces known secrets with ``***`` in a log record's message and traceback text."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[Secret] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not format: leave it to the handler
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = secret.redact(text) or text
        return text


_REDACT = RedactSecrets()


def redact_litellm_logs(secret: Secret) -> None:
    """Scrub ``secret`` from whatever litellm logs, at any level, from now on."""
    if secret not in _REDACT.secrets:
        _REDACT.secrets.append(secret)
    for name in LITELLM_LOGGERS:
        logger = logging.getLogger(name)
        for target in [logger, *logger.handlers]:
            if _REDACT not in target.filters:
                target.addFilter(_REDACT)


def import_litellm() -> Any:
    """Import litellm quietly and offline-safe; a clear message when it is not installed."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise BtkitError("the litellm: backend needs litellm: pip install 'btkit[remote]' (or pip install litellm)") from None
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


class LiteLLMBackend(Backend):
    """Chat through ``litellm.acompletion`` with btkit's retry policy."""

    capabilities = frozenset({CHAT, MULTI_SAMPLE, JSON_SCHEMA})

    def __init__(self, rest: str, options: dict[str, Any]):
        self.model = rest.strip()
        if not self.model:
            raise BtkitError("litellm: needs PROVIDER/MODEL, e.g. --model litellm:anthropic/claude-3-5-haiku-latest")
        if importlib.util.find_spec("litellm") is None:  # found out now, before the run directory exists (imported on first call)
            raise BtkitError("the litellm: backend needs litellm: pip install 'btkit[remote]' (or pip install litellm)")
        base = options.get("base_url") or options.get("api_base")
        if not base and self.model.split("/", 1)[0] in OPENAI_BASE_URL_PROVIDERS:
            base = env_first("OPENAI_BASE_URL")  # litellm would read it too: read here, so the cache key names the endpoint
        base = normalize_base_url(str(base)) if base else None
        # litellm reads provider keys from the environment; a password in the base URL is a key too
        self.api_key = Secret(options.get("api_key"), also=env_secrets() + url_secrets(base))
        # ``user:password@`` goes as a Basic auth header, never in the URL (litellm's HTTP client refuses
        # credentials in the URL next to its own Authorization header; and a URL ends up in messages)
        self.api_base = public_url(base) if base else None
        self._basic_auth = Secret(basic_auth(base))
        self.settings = RemoteSettings.from_options(options)
        self.budget = RetryBudget(self.settings.retry_budget, self.settings.retry_ratio)
        self.spec = f"litellm:{rest}"
        self._litellm: Any = None

    def __repr__(self) -> str:
        return f"<LiteLLMBackend {self.spec}>"

    def identity(self) -> dict[str, Any]:
        return {"backend": "litellm", "model": self.model, "base_url": self.api_base}

    def litellm(self) -> Any:
        if self._litellm is None:
            self._litellm = import_litellm()
            redact_litellm_logs(self.api_key)
        return self._litellm

    def request_kwargs(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model, "messages": list(messages), "timeout": self.settings.timeout, "num_retries": 0}
        if self.api_base:
            kw["api_base"] = self.api_base
        if self._basic_auth.get():
            kw["extra_headers"] = {"Authorization": self._basic_auth.get()}
        if self.api_key.get():
            kw["api_key"] = self.api_key.get()
        for key, value in params.items():
            if value is None or key in _CONTROL or (key == "stop" and not value) or (key == "n" and int(value) == 1):
                continue
            kw[key] = value
        if params.get("json_schema"):
            kw["response_format"] = {"type": "json_schema", "json_schema": {
                "name": str(params.get("json_schema_name") or "output"), "schema": params["json_schema"], "strict": True}}
        prefix = params.get("assistant_prefix")
        if prefix:
            if not self.supports_prefill():
                raise CapabilityError(f"backend '{self.spec}' cannot continue an assistant prefix ({prefix!r}): litellm does not "
                                      "list prefill support for this model; use a template without one, vllm: or llamacpp:")
            kw["messages"].append({"role": "assistant", "content": prefix})
        return kw

    def supports_prefill(self) -> bool:
        try:
            return bool(self.litellm().get_model_info(self.model).get("supports_assistant_prefill"))
        except Exception:  # unknown model: litellm raises
            return False

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        litellm = self.litellm()
        kwargs = self.request_kwargs(messages, params)

        async def attempt() -> Completion:
            try:
                resp = await litellm.acompletion(**kwargs)
            except Exception as e:
                err = self.classify(e)
            else:
                return self.completion_from(resp, int(kwargs.get("n") or 1))  # a malformed reply is retried too
            raise err  # outside the handler: no __context__ holding litellm's unredacted exception (and its frames)

        return await call_with_retries(attempt, self.settings, self.budget, f"{self.spec}")

    def classify(self, e: Exception) -> Exception:
        """litellm's exception -> btkit's: retryable, final for this record, or fatal for the run."""
        ex = self.litellm().exceptions
        status = getattr(e, "status_code", None)
        response = getattr(e, "response", None)
        headers = getattr(e, "litellm_response_headers", None) or getattr(response, "headers", None) or {}
        try:
            raw = self.api_key.redact(response.text) if response is not None else None
        except Exception:
            raw = None
        text = self.api_key.redact(f"{type(e).__name__}: {e}")
        raw = raw or text  # whole: litellm's conversion errors quote the reply they could not read
        # the message is one readable line: litellm appends its own traceback to some (an unreadable reply)
        message = " ".join(text.split(" Traceback (most recent call last)", 1)[0].split())[:2000]
        if isinstance(e, (ex.AuthenticationError, ex.PermissionDeniedError)) or status in (401, 403):
            return BtkitError(f"{self.spec}: the provider refused the API key ({message})")
        if isinstance(e, ex.NotFoundError) or status == 404:
            return BtkitError(f"{self.spec}: not found ({message}); check the model name and --base-url")
        retryable_types = (ex.RateLimitError, ex.APIConnectionError, ex.Timeout, ex.InternalServerError, ex.ServiceUnavailableError)
        if isinstance(e, retryable_types) or (isinstance(status, int) and (status in RETRY_STATUSES or status >= 500)):
            try:
                retry_after = parse_retry_after(headers)
            except Exception:
                retry_after = None
            return RetryableError(message, raw=raw[:RAW_LIMIT], retry_after=retry_after)
        return BackendError(message, raw=raw[:RAW_LIMIT])

    def completion_from(self, resp: Any, n: int) -> Completion:
        """litellm's reply -> Completion, texts redacted; a malformed reply is a RetryableError with the raw reply."""
        try:
            choices = []
            for c in resp.choices:
                message = getattr(c, "message", None)
                if message is None or isinstance(message, (str, int, float, list)):
                    raise MalformedReply(f"reply has a choice whose message is {type(message).__name__}, not an object")
                text, _ = content_text(_plain(getattr(message, "content", None)))
                finish = getattr(c, "finish_reason", None)
                choices.append({"text": self.api_key.redact(text), "finish_reason": finish if isinstance(finish, str) else None})
            if not choices:
                raise MalformedReply("reply has no choices")
        except (AttributeError, TypeError, MalformedReply) as e:
            why = str(e) if isinstance(e, MalformedReply) else "reply has no choices"
            raise RetryableError(f"malformed reply: {why}", raw=self.api_key.redact(str(resp))[:RAW_LIMIT]) from None
        usage = getattr(resp, "usage", None)
        prompt_tokens = token_count(getattr(usage, "prompt_tokens", 0))
        completion_tokens = token_count(getattr(usage, "completion_tokens", 0))
        extra: dict[str, Any] = {}
        if n > 1:
            extra["choices"] = choices
        cost = self.cost(resp)
        if cost:
            extra["cost"] = cost
        return Completion(text=choices[0]["text"], finish_reason=choices[0]["finish_reason"],
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, extra=extra)

    def cost(self, resp: Any) -> float | None:
        """Dollars from litellm's price table for the model we asked for (servers may echo another name)."""
        try:
            return float(self.litellm().completion_cost(completion_response=resp, model=self.model))
        except Exception:
            return None


def _plain(content: Any) -> Any:
    """Content parts as dicts (litellm may hand back its own part objects)."""
    if isinstance(content, list):
        return [p if isinstance(p, dict) else (p.model_dump() if hasattr(p, "model_dump") else p) for p in content]
    return content


@hookimpl
def btkit_register_backends(register):
    register("litellm", LiteLLMBackend, description="any provider litellm supports (litellm:PROVIDER/MODEL; needs btkit[remote])")
