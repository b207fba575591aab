"""Model calls as a stage makes them: :class:`StageCtx` (what ``Stage.process`` gets as ``ctx``) and
:class:`Calls` (the run-wide cache, in-flight sharing, limits and failing fast behind it).

A stage asks for a completion by template and variables; the context renders it, asks
:class:`Calls` (which serves it from the cache, from an identical call in flight, or from the
backend), parses it with the stage's parser (re-sampling a failed parse when asked), and records
every call, failed ones included, as a lineage step on the record, which is what stats count.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
from typing import Any, Awaitable, Callable

from .backends import ATTEMPTS, END_OF_TURN, MULTI_SAMPLE, SCORE_CONTINUATION, Backend, Completion, choices_of
from .cache import Cache, NullCache, cache_key
from .config import RunConfig
from .errors import BackendError, BtkitError
from .io import scrub_text
from .methods import ParseError, Stage
from .prompts import PromptLibrary
from .records import Record
from .scheduling import PrefixGroupedLimiter


class Calls:
    """Every model call of one run goes through here: looked up in the content-addressed cache, shared
    with an identical call already in flight (paid once), bounded per backend (``--concurrency``, or
    less where the backend says so), and counted, so an endpoint that looks dead stops the run.

    Failing fast has two stated bounds (:class:`btkit.config.RunConfig`): ``max_failures_in_a_row``
    calls to one backend failing with no success in between, or (after ``min_calls_for_share`` calls)
    more than ``max_failure_share`` of all calls failing. Either sets :attr:`fatal` with one line
    naming the endpoint; the run loop stops on it, finished units stay in the journal.
    """

    def __init__(self, cache: Cache | NullCache, config: RunConfig):
        self.cache = cache
        self.config = config
        self._pending: dict[str, asyncio.Future] = {}  # cache key -> the call in flight for it
        self._limiters: dict[int, PrefixGroupedLimiter] = {}
        self._counts: dict[int, list[int]] = {}  # per backend: calls, failures, failures in a row
        self._calls_total = self._failures_total = 0
        #: Set (with the reason as its exception) when the run must stop; made by :meth:`start`.
        self.fatal: asyncio.Future | None = None
        #: Called after every call that reached a backend and succeeded (the run checks ``--max-cost`` there).
        self.after_call: Callable[[], None] | None = None
        #: Once set (``--max-cost`` reached), no further request is sent: each raises this instead.
        self.closed: BtkitError | None = None

    def start(self) -> asyncio.Future:
        """A fresh stop signal for the running event loop."""
        self.fatal = asyncio.get_running_loop().create_future()
        return self.fatal

    def stop(self, error: BaseException) -> None:
        """Stop the run with ``error`` (the first reason wins)."""
        if self.fatal is not None and not self.fatal.done():
            self.fatal.set_exception(error)

    def limiter_for(self, backend: Backend) -> PrefixGroupedLimiter:
        """Each backend's bound on calls in flight: ``--concurrency``, or less if the backend says so."""
        if id(backend) not in self._limiters:
            limit = self.config.concurrency
            if backend.max_concurrency:
                limit = min(limit, backend.max_concurrency)
            self._limiters[id(backend)] = PrefixGroupedLimiter(max(1, limit))
        return self._limiters[id(backend)]

    async def cached(self, kind: str, backend: Backend, payload: dict[str, Any], call: Callable[[], Awaitable[Any]],
                     valid: Callable[[Any], bool] = lambda v: True, group: str | None = None) -> tuple[Any, bool, int]:
        """``(value, cached, attempts)`` of one call: from the cache, from an identical call in flight,
        or from ``call()`` (stored when ``valid``). ``attempts`` counts the requests a backend sent."""
        key = cache_key(kind, backend.identity(), payload)
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True, 0
        pending = self._pending.get(key)
        if pending is not None:  # the same request is already in flight: share its answer, pay once
            try:
                value, _ = await asyncio.shield(pending)
            except BackendError as e:  # its failure, but no request of ours: counted as shared
                shared = BackendError(str(e), raw=e.raw, attempts=0)
                shared.shared = True
                raise shared from e
            return json.loads(json.dumps(value)), True, 0  # a copy, as a cache hit would be

        async def call_and_store() -> tuple[Any, int]:
            # Calls of one kind and template share their prompt prefix: the limiter sends them back to back.
            async with self.limiter_for(backend).slot(group or kind):
                if self.closed is not None:  # the budget is spent: a call waiting for its slot is not sent
                    raise BtkitError(str(self.closed))
                ATTEMPTS.set(1)
                try:
                    value = await call()
                except BackendError as e:
                    e.attempts = max(e.attempts, ATTEMPTS.get())
                    self.finished(backend, e)
                    raise
                attempts = ATTEMPTS.get()
            self.finished(backend, None)
            if self.after_call is not None:
                self.after_call()
            if valid(value):  # another process may have stored this request first: use its answer, as a re-run would
                value = self.cache.put(key, kind, backend.spec, value)
            return value, attempts

        task = asyncio.ensure_future(call_and_store())
        self._pending[key] = task
        try:
            value, attempts = await task
            return value, False, attempts
        finally:
            self._pending.pop(key, None)

    def finished(self, backend: Backend, error: BaseException | None) -> None:
        """Count a model call's outcome; stop the run when an endpoint looks dead (see the class)."""
        counts = self._counts.setdefault(id(backend), [0, 0, 0])
        counts[0] += 1
        self._calls_total += 1
        if error is None:
            counts[2] = 0
            return
        counts[1] += 1
        counts[2] += 1
        self._failures_total += 1
        cfg = self.config
        why = None
        if counts[2] >= cfg.max_failures_in_a_row:
            why = f"{counts[2]} calls in a row"
        elif self._calls_total >= cfg.min_calls_for_share and self._failures_total > cfg.max_failure_share * self._calls_total:
            why = f"{self._failures_total} of {self._calls_total} calls"
        if why:
            where = backend.spec
            url = (backend.identity() or {}).get("base_url")
            if url:
                where += f" at {url}"
            self.stop(BtkitError(
                f"{why} to {where} failed (last: {str(error)[:200]}); stopped. Finished units are kept: "
                f"re-run the same command once the endpoint answers (failed units are retried)"))


class StageCtx:
    """What a stage sees while processing one record (:class:`btkit.methods.StageContext`): model
    calls that are rendered, cached, shared in flight and recorded as lineage steps on the record.

    ``run`` is the :class:`btkit.engine.Run`; this uses its ``calls`` (:class:`Calls`),
    ``backend_for``, ``prompts_for``, ``count_usage`` and ``live_counts``.
    """

    def __init__(self, run: Any, stage: Stage, record: Record):
        self.run = run
        self.stage = stage
        self.record = record

    def backend(self) -> Backend:
        return self.run.backend_for(self.stage)

    @property
    def prompts(self) -> PromptLibrary:
        """The templates this stage renders (its own override folders first, then the run's)."""
        return self.run.prompts_for(self.stage)

    def for_record(self, record: Record) -> "StageCtx":
        """The same stage's context for another record (e.g. one of several candidates)."""
        return StageCtx(self.run, self.stage, record)

    def count(self, key: str, n: int = 1) -> None:
        c = self.run.live_counts.setdefault(self.stage.label, collections.Counter())
        c[key] += n

    def _step(self, kind: str, backend: Backend, template: str | None, template_hash: str | None, **extra: Any) -> dict[str, Any]:
        step = {
            "step": f"{self.record.id}/{self.stage.label}/{len(self.record.lineage)}",
            "stage": self.stage.label,
            "kind": kind,
            "model": backend.spec,
            "template": template,
            "template_hash": template_hash,
            **extra,
        }
        self.record.lineage.append(step)
        return step

    async def _cached_call(self, kind: str, backend: Backend, payload: dict[str, Any], call: Callable[[], Awaitable[Any]],
                           valid: Callable[[Any], bool] = lambda v: True, group: str | None = None) -> tuple[Any, bool, int]:
        return await self.run.calls.cached(kind, backend, payload, call, valid=valid, group=group)

    async def complete(self, template: str, variables: dict[str, Any], *, parse: Callable[[str | None], Any] | None = None,
                       retries: int | None = None, accept_truncated: bool = False, **params: Any) -> Completion:
        """Render ``template`` with ``variables``, call the stage's model, record the step.

        The returned completion carries ``.step`` (its lineage entry): the stage adds ``parsed``
        or ``parse_error`` to it. A backend failure raises :class:`BackendError` (the engine records it).

        With ``parse`` (text -> value, raising :class:`ParseError`), parsing happens here and the
        completion comes back with ``.parsed`` (the value) or ``.parse_error`` (the ParseError), both
        also written to the step; a reply cut at max tokens or by a content filter is a parse failure
        ('truncated', 'content_filter'). A failed parse is re-sampled with a different seed up to
        ``retries`` times (default: the stage's ``parse_retries`` option, 0 = never): each attempt is
        its own lineage step with ``attempt`` and ``retry_of``, counted in stats. A greedy request
        (temperature 0) is retried at ``parse_retry_temperature`` (default 0.7), since re-sampling
        greedily would only return the same reply.

        ``accept_truncated=True`` hands a reply cut at max tokens to ``parse`` anyway, for parsers
        that read a label from the reply's start (a Yes/No verdict): the step keeps
        ``finish_reason: length`` and says ``accepted_truncated``.
        """
        comp = await self._complete_once(template, variables, params)
        if parse is None:
            return comp
        self._parse_into(comp, parse, accept_truncated)
        return await self._retry_parse(comp, template, variables, params, parse, retries, accept_truncated)

    async def _retry_parse(self, comp: Completion, template: str, variables: dict[str, Any], params: dict[str, Any],
                           parse: Callable[[str | None], Any], retries: int | None, accept_truncated: bool) -> Completion:
        """Re-sample ``comp`` while it fails to parse (see :meth:`complete`); the seeds follow ``params['seed']``."""
        retries = int(self.stage.options.get("parse_retries") or 0) if retries is None else int(retries)
        attempt = 0
        while comp.parse_error is not None and attempt < retries:
            attempt += 1
            retry_params = {k: v for k, v in params.items() if v is not None}
            retry_params["seed"] = retry_seed(retry_params.get("seed"), attempt)
            if retry_params.get("temperature") == 0:
                retry_params["temperature"] = float(self.stage.options.get("parse_retry_temperature") or 0.7)
            previous = comp.step["step"]
            comp = await self._complete_once(template, variables, retry_params, attempt=attempt, retry_of=previous)
            self._parse_into(comp, parse, accept_truncated)
        return comp

    async def complete_choices(self, template: str, variables: dict[str, Any], records: list[Record], *,
                               parse: Callable[[str | None], Any], retries: int | None = None,
                               **params: Any) -> list[Completion | Exception]:
        """``len(records)`` sampled completions of one prompt; candidate i's lineage goes to ``records[i]``.

        On a backend that samples several choices per request (``MULTI_SAMPLE``: vllm:, openai:,
        litellm:) this is one request with ``n``; otherwise one request per candidate, issued
        together. Candidate i is sampled with seed ``seed + i`` (one request: ``seed``), so
        candidates differ and reproduce. Each is parsed and, under parse retries, re-sampled on its
        own with the seeds its own request would use. A failed call comes back as its exception
        (never raised, except :class:`BtkitError`), so one failure never takes its siblings:
        :func:`btkit.records.failed_record` turns it into the dropped record the engine would have written.
        """
        n = len(records)
        seed = int(params.get("seed") or 0)
        if n > 1 and self.backend().supports(MULTI_SAMPLE):
            return await self._one_request_choices(template, variables, records, parse, retries, {**params, "seed": seed})

        async def one(i: int, record: Record) -> Completion | Exception:
            try:
                return await self.for_record(record).complete(template, variables, parse=parse, retries=retries, **{**params, "seed": seed + i})
            except BtkitError:
                raise
            except Exception as e:  # noqa: BLE001 (returned, recorded by the caller)
                return e

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(records))))

    async def _one_request_choices(self, template: str, variables: dict[str, Any], records: list[Record],
                                   parse: Callable[[str | None], Any], retries: int | None, params: dict[str, Any]) -> list[Completion | Exception]:
        """The ``n=len(records)`` request of :meth:`complete_choices`; each choice gets its own step.

        Choice i's step is a copy of the request's step with that choice's reply, ``request`` (the
        request's step id) and ``choice``; tokens and cost stay on choice 0's, and stats count the
        request once (:meth:`Run.compute_stats`).
        """
        n = len(records)
        # receives the request's step, numbered as a call on records[0] would be
        holder = Record(id=records[0].id, source_id=records[0].source_id, fields={}, lineage=list(records[0].lineage))
        try:
            comp = await self.for_record(holder)._complete_once(template, variables, {**params, "n": n})
        except BtkitError:
            raise
        except Exception as e:  # noqa: BLE001
            return [e] * n
        choices = choices_of(comp)  # a backend may answer with one completion
        base = comp.step

        async def finish(i: int, record: Record) -> Completion | Exception:
            if i >= len(choices) or not isinstance(choices[i], dict):
                return BackendError(f"the backend returned {len(choices)} of the {n} choices asked for")
            step = json.loads(json.dumps(base))
            step.update(request=base["step"], choice=i, raw=scrub_text(choices[i].get("text")), finish_reason=choices[i].get("finish_reason"))
            if i:
                step.update(step=f"{base['step']}#{i}", tokens=[0, 0])
                step.pop("cost", None)
            record.lineage.append(step)
            choice = Completion(text=step["raw"], finish_reason=step["finish_reason"], prompt_tokens=comp.prompt_tokens if not i else 0,
                                completion_tokens=comp.completion_tokens if not i else 0)
            choice.cached, choice.step = comp.cached, step
            self._parse_into(choice, parse)
            retry_params = {**params, "seed": int(params["seed"]) + i}
            return await self.for_record(record)._retry_parse(choice, template, variables, retry_params, parse, retries, False)

        return list(await asyncio.gather(*(finish(i, r) for i, r in enumerate(records))))

    @staticmethod
    def _parse_into(comp: Completion, parse: Callable[[str | None], Any], accept_truncated: bool = False) -> None:
        comp.parsed, comp.parse_error = None, None
        try:
            if comp.finish_reason == "length" and not accept_truncated:
                raise ParseError("truncated", "the reply hit max_tokens")
            if comp.finish_reason == "content_filter":
                raise ParseError("content_filter", "the provider filtered the reply")
            try:
                comp.parsed = parse(comp.text)
            except ParseError as e:
                if comp.finish_reason == "length":  # cut short and not readable: the cut is why
                    raise ParseError("truncated", f"the reply hit max_tokens ({e.reason})") from None
                raise
            if comp.finish_reason == "length":
                comp.step["accepted_truncated"] = True
        except ParseError as e:
            comp.parse_error = e
            comp.step["parse_error"] = e.reason
            if e.detail:
                comp.step["parse_error_detail"] = e.detail[:500]
            return
        comp.step["parsed"] = _jsonable_value(comp.parsed)

    async def _complete_once(self, template: str, variables: dict[str, Any], params: dict[str, Any], **step_extra: Any) -> Completion:
        prompt = self.prompts.render(template, variables)
        backend = self.backend()
        params = {k: v for k, v in params.items() if v is not None}
        payload = {"messages": prompt.messages, "assistant_prefix": prompt.assistant_prefix, "params": params}
        if prompt.assistant_prefix:
            params = {**params, "assistant_prefix": prompt.assistant_prefix}

        async def call():
            comp = await backend.chat(prompt.messages, params)
            comp.text = scrub_text(comp.text)  # lone surrogates from a backend must not break cache or journal
            self.run.count_usage(comp)
            return comp.to_json()

        # A reply with text is stored raw even when cut at max_tokens or filtered: it is what the
        # request returns, and is parsed as a failure again on every read (never served as a
        # success), so changing a parser or threshold never pays for it twice. Errors and empty
        # replies are not stored: they are asked again.
        try:
            value, cached, attempts = await self._cached_call("chat", backend, payload, call, valid=_has_text, group=f"chat:{template}")
        except BackendError as e:
            self._failed_step("chat", backend, template, prompt.template_hash, e, params=_recorded_params(params), **step_extra)
            raise
        comp = Completion.from_json(value)
        comp.cached = cached
        comp.step = self._step(
            "chat", backend, template, prompt.template_hash,
            params=_recorded_params(params), raw=comp.text, finish_reason=comp.finish_reason,
            tokens=[comp.prompt_tokens, comp.completion_tokens], cached=cached,
            **({"cost": comp.extra["cost"]} if comp.extra.get("cost") and not cached else {}),
            **_retries(attempts, cached),
            **step_extra,
        )
        return comp

    def _failed_step(self, kind: str, backend: Backend, template: str | None, template_hash: str | None,
                     error: BackendError, **extra: Any) -> None:
        """A call that finally failed is a lineage step too: stats count it, with the retries it cost."""
        self._step(kind, backend, template, template_hash, error=str(error)[:500], cached=error.shared,
                   **_retries(error.attempts, error.shared), **extra)

    async def next_token_logprobs(self, template: str, variables: dict[str, Any], candidates: list[str]) -> dict[str, float]:
        """Log-probabilities of ``candidates`` as the next token after the template's assistant prefix."""
        prompt = self.prompts.render(template, variables)
        backend = self.backend()
        backend.require("next_token_logprobs", f"stage {self.stage.label}")
        payload = {"messages": prompt.messages, "assistant_prefix": prompt.assistant_prefix, "candidates": candidates}

        async def call():
            return self._counted(await backend.next_token_logprobs(prompt.messages, prompt.assistant_prefix, candidates))

        try:
            stored, cached, attempts = await self._cached_call("next_token_logprobs", backend, payload, call, group=f"next_token_logprobs:{template}")
        except BackendError as e:
            self._failed_step("next_token_logprobs", backend, template, prompt.template_hash, e)
            raise
        value, tokens_in = _uncounted(stored)
        self._step("next_token_logprobs", backend, template, prompt.template_hash, logprobs=value, tokens=[tokens_in, 0], cached=cached,
                   **_retries(attempts, cached))
        return value

    async def score_continuation(self, template: str | None, variables: dict[str, Any], continuation: str, *,
                                 end_of_turn: bool = False) -> list[float]:
        """Per-token logprobs of ``continuation`` after the rendered template (None: unconditional).

        ``end_of_turn=True``: one more value at the end, log P(end-of-turn token) right after the
        continuation (backends with :data:`btkit.backends.END_OF_TURN`); cached under its own key."""
        backend = self.backend()
        backend.require(SCORE_CONTINUATION, f"stage {self.stage.label}")
        if end_of_turn:
            backend.require(END_OF_TURN, f"stage {self.stage.label}")
        messages = None
        template_hash = None
        if template is not None:
            prompt = self.prompts.render(template, variables)
            messages, template_hash = prompt.messages, prompt.template_hash
        extra = {"end_of_turn": True} if end_of_turn else {}  # the other scores keep their cache keys
        payload = {"messages": messages, "continuation": continuation, **extra}

        async def call():
            return self._counted(await backend.score_continuation(messages, continuation, **extra))

        try:
            stored, cached, attempts = await self._cached_call("score_continuation", backend, payload, call, group=f"score_continuation:{template}")
        except BackendError as e:
            self._failed_step("score_continuation", backend, template, template_hash, e)
            raise
        value, tokens_in = _uncounted(stored)
        self._step("score_continuation", backend, template, template_hash, n_tokens=len(value), tokens=[tokens_in, 0], cached=cached,
                   **_retries(attempts, cached))
        return value

    def _counted(self, value: Any) -> dict[str, Any]:
        """A scoring answer as the cache keeps it: the values, and the tokens the backend read for them
        (``value.prompt_tokens`` where the backend says, as llamacpp: does), counted for progress now
        and for stats from every step that uses it, served from the cache or not."""
        tokens_in = int(getattr(value, "prompt_tokens", 0) or 0)
        self.run.count_usage(Completion(text=None, prompt_tokens=tokens_in))
        return {"value": value, "prompt_tokens": tokens_in}


def _uncounted(stored: Any) -> tuple[Any, int]:
    """(values, tokens read) of a stored scoring answer; one stored before counts were kept read 0."""
    if isinstance(stored, dict) and set(stored) == {"value", "prompt_tokens"}:
        return stored["value"], int(stored["prompt_tokens"] or 0)
    return stored, 0


def _retries(attempts: Any, cached: bool) -> dict[str, int]:
    """``{"retries": n}`` for a step whose call took n extra requests (nothing for a cache hit)."""
    try:
        n = int(attempts or 1) - 1
    except (TypeError, ValueError):
        n = 0
    return {"retries": n} if n > 0 and not cached else {}


def _recorded_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampling params for a lineage step; a JSON schema (kilobytes, the same on every call) as its hash."""
    if "json_schema" not in params:
        return params
    blob = json.dumps(params["json_schema"], sort_keys=True, default=str).encode()
    return {**params, "json_schema": "sha256:" + hashlib.sha256(blob).hexdigest()[:16]}


def _has_text(value: dict[str, Any]) -> bool:
    """A chat reply worth storing: the model wrote something (see ``StageCtx._complete_once``).

    For an ``n>1`` request, any choice with text: the request was paid for, and its empty choices
    are stored with the rest (each parses as ``empty_reply`` again; another seed is another request).
    """
    texts = [c.get("text") for c in choices_of(Completion.from_json(value)) if isinstance(c, dict)]
    return any(isinstance(t, str) and t.strip() for t in texts)


def _jsonable_value(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def retry_seed(seed: Any, attempt: int) -> int:
    """A seed for the n-th parse retry, far from ``seed + i`` (which stages use for candidates)."""
    digest = hashlib.blake2b(f"{seed}|parse-retry|{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF
