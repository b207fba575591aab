"""Shared plumbing for remote backends: settings, retries with a run-wide budget, one aiohttp session.

Why aiohttp and not the openai SDK: the SDK's default httpx transport caps at ~150 req/s and runs
8.9x the ideal wall time at 100 ms / c=64 on this machine (see PERF-NOTES.md); one aiohttp session
talking JSON directly stays within a few percent of a bare aiohttp loop.

Fault policy (per request, then per run):
- retried, with exponential backoff and jitter, honouring ``Retry-After`` / ``retry-after-ms``:
  HTTP 408, 409, 425, 429, 5xx, connection errors (refused, reset, dropped mid-reply), the
  per-attempt timeout, and a 2xx reply whose body is not JSON (a truncated or garbled body is almost
  always a proxy or transport fault, and retrying costs one request; it is bounded like any retry)
  or is JSON without the shape of a reply (the backend says: no choices, a message that is not an
  object, content that is not text; :class:`MalformedReply`);
- not retried: other 4xx (bad request, context too long...): the record is dropped as
  ``backend_error`` with the server's reply as ``raw``;
- stop the run (a :class:`BtkitError`, printed as one line): 401/403 (bad key) and 404 (unknown model
  or endpoint), since every further call would fail the same way;
- a run-wide retry budget (``retry_budget`` + ``retry_ratio`` x requests made) keeps a dead or
  overloaded server from costing ``max_retries`` x backoff per record: once spent, failures are final.
The API key lives only in the Authorization header; any reply text that echoes it, an error body or
a successful reply's text, is redacted before it can reach an error message, ``failures.jsonl``, a
log line, the cache or the data. ``user:password@`` in a base URL travels as Basic auth, in place of
the key, and every recorded form of the URL is :func:`public_url`'s, without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import os
import random
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from btkit.backends import ATTEMPTS, public_url  # noqa: F401  (public_url re-exported: the one helper for credential-free URLs)
from btkit.errors import BackendError, BtkitError

log = logging.getLogger("btkit.remote")
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 425, 429})
RAW_LIMIT = 20_000  # characters of a reply kept for failures.jsonl


@dataclass
class RemoteSettings:
    """Backend options (``-B KEY=VALUE``) every remote backend understands."""

    timeout: float = 600.0  # seconds per attempt (a long generation on a busy server can take minutes)
    connect_timeout: float = 30.0
    max_retries: int = 5  # retries per request after the first attempt
    backoff_base: float = 0.5  # first backoff in seconds, doubled each retry
    max_backoff: float = 30.0
    max_retry_wait: float = 120.0  # a Retry-After longer than this makes the failure final
    retry_budget: float = 100.0  # retries allowed in the whole run ...
    retry_ratio: float = 0.2  # ... plus this many per request made
    max_connections: int = 0  # 0: no cap of our own; the engine's --concurrency bounds calls in flight

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "RemoteSettings":
        positive = ("timeout", "connect_timeout")  # 0 would fail every call at once; the rest may be 0
        kwargs: dict[str, Any] = {}
        for name, default in cls.__dataclass_fields__.items():
            if name in options and options[name] is not None:
                value, kind = options[name], type(default.default)
                try:
                    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                        raise ValueError
                    number = kind(value)
                except (TypeError, ValueError, OverflowError):
                    raise BtkitError(f"backend option {name}={value!r} is not a {'whole number' if kind is int else 'number'}") from None
                # a negative max_connections makes aiohttp wait forever for a connection; NaN never times out
                if not math.isfinite(number) or number < 0 or (number == 0 and name in positive):
                    raise BtkitError(f"backend option {name}={value!r} must be a finite number {'> 0' if name in positive else '>= 0'}")
                kwargs[name] = number
        return cls(**kwargs)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based): the server's word, else exponential."""
        if retry_after is not None:
            return retry_after * random.uniform(1.0, 1.1)  # never earlier than asked; spread the herd
        cap = min(self.max_backoff, self.backoff_base * (2 ** attempt))
        return cap / 2 + random.uniform(0, cap / 2)  # "equal jitter": spread, but keep a floor


class RetryableError(BackendError):
    """A failure worth another attempt; ``retry_after`` is the server's requested wait, if any."""

    def __init__(self, message: str, raw: str | None = None, retry_after: float | None = None):
        super().__init__(message, raw=raw)
        self.retry_after = retry_after


class RetryBudget:
    """Run-wide cap on retries: ``budget + ratio * requests`` (a retry budget as in Finagle)."""

    def __init__(self, budget: float, ratio: float):
        self.budget, self.ratio = budget, ratio
        self.requests = 0
        self.retries = 0

    def note_request(self) -> None:
        self.requests += 1

    def try_spend(self) -> bool:
        if self.retries + 1 > self.budget + self.ratio * self.requests:
            return False
        self.retries += 1
        return True


async def call_with_retries(attempt: Callable[[], Awaitable[T]], settings: RemoteSettings, budget: RetryBudget, what: str) -> T:
    """Run ``attempt`` until it succeeds, a failure is final, or retries/budget run out."""
    budget.note_request()
    last: RetryableError | None = None
    for n in range(settings.max_retries + 1):
        ATTEMPTS.set(n + 1)  # the engine counts every request a server saw (stats.json: retries)
        try:
            return await attempt()
        except RetryableError as e:
            last = e
        if n == settings.max_retries:
            break
        if last.retry_after is not None and last.retry_after > settings.max_retry_wait:
            raise BackendError(f"{what}: {last}; the server asked to retry after {last.retry_after:g}s, "
                               f"more than max_retry_wait={settings.max_retry_wait:g}s", raw=last.raw)
        if not budget.try_spend():
            raise BackendError(f"{what}: {last} (not retried: the run's retry budget of {budget.retries} retries is spent)", raw=last.raw)
        delay = settings.backoff(n, last.retry_after)
        log.warning("%s: %s; retry %d/%d in %.2fs", what, last, n + 1, settings.max_retries, delay)  # on stderr (see btkit.engine)
        await asyncio.sleep(delay)
    assert last is not None
    raise BackendError(f"{what}: {last} (gave up after {settings.max_retries + 1} attempts)", raw=last.raw)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def normalize_base_url(url: str) -> str:
    """Strip a trailing slash; a bare ``http://host:port`` gets ``/v1`` (what every OpenAI server serves)."""
    url = url.strip().rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BtkitError(f"base URL '{public_url(url)}' is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    if parsed.path in ("", "/"):
        url += "/v1"
    return url


def split_base_urls(value: str) -> list[str]:
    """Several endpoints serving one model, comma-separated (``http://a:8000/v1,http://b:8000/v1``), each normalized:
    an :class:`HttpClient` sends its requests to them in turn."""
    urls = [normalize_base_url(u) for u in str(value).split(",") if u.strip()]
    if not urls:
        raise BtkitError(f"base URL '{public_url(str(value))}' names no endpoint")
    return urls


def url_secrets(url: str | None) -> list[str]:
    """The password of ``user:password@`` in a base URL (as written, decoded, and as the Basic auth
    token that carries it), to scrub from reply and error text like a key: a server or library may
    echo the URL or the header it was called with. Passwords under 8 characters are left alone:
    scrubbing a short word would garble replies."""
    basic = basic_auth(url)
    if basic is None:
        return []
    raw = urllib.parse.urlsplit(url or "").password or ""
    return [v for v in {raw, urllib.parse.unquote(raw), basic.split(" ", 1)[1]} if len(v) >= 8]


def basic_auth(url: str | None) -> str | None:
    """The ``Authorization: Basic ...`` value for ``user:password@`` in ``url``, or None."""
    import base64

    if not url or "@" not in url:
        return None
    try:
        p = urllib.parse.urlsplit(url)
        user, password = p.username, p.password
    except ValueError:
        return None
    if user is None and password is None:
        return None
    pair = f"{urllib.parse.unquote(user or '')}:{urllib.parse.unquote(password or '')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


class MalformedReply(ValueError):
    """A 200 reply whose JSON does not have the shape of a chat completion (the message says where)."""


def content_text(content: Any) -> tuple[str | None, str | None]:
    """A message's ``content`` as (text, refusal): a string; null (no text: filtered or refused); or a
    list of parts, whose ``text`` parts are joined without a separator (they are pieces of one
    message) and whose ``refusal`` parts become the refusal. Anything else is a :class:`MalformedReply`."""
    if content is None or isinstance(content, str):
        return content, None
    if isinstance(content, list):
        texts, refusals = [], []
        for part in content:
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
            else:
                raise MalformedReply(f"message content has a part that is not text: {json.dumps(part, default=str)[:100]}")
        return ("".join(texts) if texts else None), ("".join(refusals) or None)
    raise MalformedReply(f"message content is {type(content).__name__}, not text")


def token_count(value: Any) -> int:
    """A usage count as a non-negative int; 0 for anything else (a string, NaN, a negative number):
    a malformed ``usage`` never costs the reply it came with."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return int(value)
    return 0


SECRET_ENV_SUFFIXES = ("_API_KEY", "_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


def env_secrets() -> list[str]:
    """Values of environment variables named like credentials: a library (litellm) may send any of them."""
    return [v for k, v in os.environ.items() if k.upper().endswith(SECRET_ENV_SUFFIXES) and len(v) >= 8]


class Secret:
    """Holds an API key; its repr never shows it (a backend printed in a traceback or a debugger).

    ``also`` lists other values to scrub from reply text (keys a library picked from the environment).
    """

    def __init__(self, value: str | None, also: list[str] | None = None):
        self._value = value or None
        self._scrub = sorted({v for v in [self._value, *(also or [])] if v}, key=len, reverse=True)

    def get(self) -> str | None:
        return self._value

    def redact(self, text: str | None) -> str | None:
        if text:
            for v in self._scrub:
                text = text.replace(v, "***")
        return text

    def __repr__(self) -> str:
        return "Secret(***)" if self._value else "Secret(None)"

    __str__ = __repr__


class HttpClient:
    """One aiohttp session per event loop, JSON in and out, one attempt per call (no retries here).

    ``base_url`` may name several endpoints of one model, comma-separated: calls go to them in turn
    (round robin; a retried call may land on another one), one-off probes to the first.
    """

    def __init__(self, base_url: str, api_key: Secret, settings: RemoteSettings, headers: dict[str, str] | None = None):
        # ``user:password@`` in the base URL travels as Basic auth (in place of the key, as the OpenAI
        # SDK does), never in the URL itself: so no request line, message or log can carry it
        urls = [u.strip() for u in base_url.split(",") if u.strip()] or [base_url]
        self.base_urls = [public_url(u) for u in urls]
        self.base_url = self.base_urls[0]
        self._turn = 0
        self._basic_auth = Secret(basic_auth(urls[0]))
        self.api_key = api_key
        self.settings = settings
        self.headers = dict(headers or {})
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _auth_headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", **self.headers}
        if self._basic_auth.get():
            h["Authorization"] = self._basic_auth.get()
        elif self.api_key.get():
            h["Authorization"] = f"Bearer {self.api_key.get()}"
        return h

    def session(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, limit_per_host=0, ttl_dns_cache=300)
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout, sock_connect=min(self.settings.connect_timeout, self.settings.timeout))
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self._auth_headers())
            self._loop = loop
        return self._session

    async def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One attempt. Returns the parsed JSON object or raises Retryable/Backend/Btkit errors.

        The hot path does no more than a bare aiohttp loop: encode, send, read, parse. Reply text is
        decoded and redacted only when it becomes part of an error.
        """
        import aiohttp

        base = self.base_urls[self._turn % len(self.base_urls)]
        self._turn += 1
        url = base + path
        data = json.dumps(body).encode("utf-8") if body is not None else None
        try:
            async with self.session().request(method, url, data=data) as resp:
                raw = await resp.read()
                status = resp.status
                if status >= 400:
                    self.raise_for_status(status, resp.headers, self._text(raw), f"{method} {public_url(url)}")
        except asyncio.TimeoutError:
            raise RetryableError(f"no complete reply within timeout={self.settings.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise RetryableError(f"connection failed: {type(e).__name__}: {self.api_key.redact(str(e))}") from None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise RetryableError(f"HTTP {status} with a body that is not JSON", raw=self._text(raw)) from None
        if not isinstance(obj, dict):
            raise BackendError(f"{method} {public_url(url)}: HTTP {status} with JSON that is not an object", raw=self._text(raw))
        return obj

    def _text(self, raw: bytes) -> str:
        """A reply body as it may be stored: decoded, key redacted, cut to RAW_LIMIT characters."""
        return self.api_key.redact(raw.decode("utf-8", "replace"))[:RAW_LIMIT]

    def raise_for_status(self, status: int, headers: Any, text: str, what: str) -> None:
        message = _error_message(text)
        if status in RETRY_STATUSES or status >= 500:
            raise RetryableError(f"HTTP {status}{': ' + message if message else ''}", raw=text[:RAW_LIMIT], retry_after=parse_retry_after(headers))
        if status in (401, 403):
            raise BtkitError(f"{what}: HTTP {status}, the server refused the API key ({message or 'no detail'}); "
                             "set OPENAI_API_KEY (or the provider's key variable) for this endpoint")
        if status == 404:
            raise BtkitError(f"{what}: HTTP 404 ({message or 'not found'}); check --base-url and the model name")
        raise BackendError(f"{what}: HTTP {status}{': ' + message if message else ''}", raw=text[:RAW_LIMIT])

    def get_json_sync(self, path: str, timeout: float | None = None) -> dict[str, Any]:
        """A blocking GET, for the one-off model discovery that a cache key needs before any call."""
        import urllib.error
        import urllib.request

        url = self.base_url + path
        req = urllib.request.Request(url, headers=self._auth_headers(), method="GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout or min(self.settings.timeout, 30)) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = self.api_key.redact(e.read().decode("utf-8", "replace"))
            raise BtkitError(f"GET {public_url(url)}: HTTP {e.code} ({_error_message(text) or 'no detail'})") from None
        except (urllib.error.URLError, OSError) as e:
            raise BtkitError(f"GET {public_url(url)}: cannot reach the server ({getattr(e, 'reason', e)}); check --base-url") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise BtkitError(f"GET {public_url(url)}: the reply is not JSON: {self.api_key.redact(raw[:200].decode('utf-8', 'replace'))!r}") from None

    def post_json_sync(self, path: str, body: dict[str, Any], timeout: float | None = None) -> tuple[int, Any, str]:
        """A blocking POST for a one-off check before the run (a capability probe).

        Returns (status, headers, reply text with the key redacted, whole: the caller parses it)
        whatever the status, so the caller decides what an error means; a connection failure or
        timeout is a RetryableError.
        """
        import urllib.error
        import urllib.request

        url = self.base_url + path
        req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=self._auth_headers(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout or min(self.settings.timeout, 60)) as resp:
                return resp.status, resp.headers, self.api_key.redact(resp.read().decode("utf-8", "replace"))
        except urllib.error.HTTPError as e:
            return e.code, e.headers, self._text(e.read())
        except (urllib.error.URLError, OSError) as e:
            raise RetryableError(f"POST {public_url(url)}: cannot reach the server ({self.api_key.redact(str(getattr(e, 'reason', e)))})") from None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                await session.close()
            except RuntimeError:  # created on a loop that is gone
                pass


def _error_message(text: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the first 300 characters."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or "")[:300] or text.strip()[:300]
        return str(err)[:300]
    return text.strip()[:300]


# -- prices ------------------------------------------------------------------------------------
_PRICES: dict[str, Any] | None = None


def price_table() -> dict[str, Any]:
    """litellm's model price table, read from its JSON file without importing litellm (3 s)."""
    global _PRICES
    if _PRICES is None:
        _PRICES = {}
        spec = importlib.util.find_spec("litellm")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "model_prices_and_context_window_backup.json"
            try:
                _PRICES = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.debug("no readable litellm price table at %s", path)
    return _PRICES


def price_per_token(model: str) -> tuple[float, float] | None:
    """Dollars per (prompt, completion) token from the price table (the model's name, or its last
    ``/`` part), or None for a model it does not list."""
    table = price_table()
    entry = table.get(model) or table.get(model.rsplit("/", 1)[-1])
    if not isinstance(entry, dict):
        return None
    pin, pout = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if pin is None and pout is None:
        return None
    return float(pin or 0), float(pout or 0)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Dollar cost of one call from the price table, or None for a model it does not list."""
    price = price_per_token(model)
    return None if price is None else price[0] * prompt_tokens + price[1] * completion_tokens


def env_first(*names: str) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


__all__ = ["RETRY_STATUSES", "RAW_LIMIT", "SECRET_ENV_SUFFIXES", "RemoteSettings", "RetryableError", "RetryBudget", "call_with_retries",
           "parse_retry_after", "normalize_base_url", "split_base_urls", "url_secrets", "basic_auth", "MalformedReply", "content_text", "token_count",
           "env_secrets", "env_first", "Secret", "HttpClient", "price_table", "price_per_token", "cost_usd"]
