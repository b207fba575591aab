"""The engine: streams work units through a list of stages and writes results as they finish.

Shape of a run directory:
- ``candidates.jsonl`` is the journal: every record the run produced, kept or dropped with its
  reason, appended in input order, whole finished units per ``os.write``. It is the only source of
  truth: ``data.jsonl``, ``stats.json`` and ``failures.jsonl`` are all derived from it, which makes
  resume after ``kill -9`` simple (cut a torn last line, skip finished units, rebuild the rest).
  Each line carries ``unit_seq`` (the unit's position in the input) and ``unit_records`` (how
  many lines its unit has): a kill can cut a multi-line write short (Linux checks for fatal
  signals between pages), and a last unit with fewer lines than announced is cut and redone.
- ``data.jsonl`` appears only when a run is complete (written as ``data.jsonl.partial`` while it
  runs, then renamed), so a reader never mistakes a half-written file for a finished one.
- ``run.json`` records the settings, written first; re-running the same command continues the
  run. Finished units are always the first N of the deterministic unit stream, so resuming skips
  N units in constant memory, after checking that their ids and contents hash the same (an input
  edited in place stops the run instead of mixing two inputs).

Every model call goes through the content-addressed cache (:mod:`btkit.cache`) and is written there
the moment it returns, so a resumed run pays only for calls that were in flight at the kill.
Identical requests in flight at once are sent once. A stage that returns no record for a record
gets it recorded as dropped (``no_output``), never silently lost.

Memory stays flat: units are read lazily and at most ``window`` are in flight; finished units are
written in input order through a small reorder buffer; units dropped while preparing (too short,
duplicate) cost no task.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__, journal, rundir
from .backends import ATTEMPTS, MULTI_SAMPLE, Backend, Completion, choices_of
from .cache import Cache, NullCache, cache_key
from .dedup import SeenSet
from .errors import BackendError, BtkitError, InputError, Interrupted
from .io import AppendFile, atomic_write_json, iter_jsonl, read_journal, scrub_text, validate_jsonl
from .methods import Method, ParseError, Stage
from .plugins import Registry
from .prompts import PromptLibrary
from .records import ExtraUnit, Record, failed_record, journal_key
from .scheduling import PrefixGroupedLimiter

HELD_JOURNAL = "candidates.held.jsonl"


@dataclass
class StageSpec:
    """One stage of a pipeline: which method's stage, and its options (model, sampling, thresholds)."""

    method: str
    stage: str
    options: dict[str, Any] = field(default_factory=dict)
    #: Template folders for this stage only, searched before the run's own ``prompt_overrides``.
    prompt_overrides: list[Path] = field(default_factory=list)


@dataclass
class RunConfig:
    input: Path
    out_dir: Path
    stages: list[StageSpec]
    model: str
    options: dict[str, Any] = field(default_factory=dict)  # run-wide options every stage sees
    backend_options: dict[str, Any] = field(default_factory=dict)
    prompt_overrides: list[Path] = field(default_factory=list)
    concurrency: int = 8
    limit: int | None = None
    quiet: bool = False
    cache_path: Path | None = None
    use_cache: bool = True
    overwrite: bool = False
    #: Seconds between one-line status reports when stderr is not a terminal (0: none); $BTKIT_STATUS_EVERY.
    status_every: float = field(default_factory=lambda: float(os.environ.get("BTKIT_STATUS_EVERY") or 30))
    #: Stop the run when this many calls to one backend fail in a row ...
    max_failures_in_a_row: int = 10
    #: ... or when, after this many calls, more than this share of all calls failed.
    min_calls_for_share: int = 50
    max_failure_share: float = 0.5


class StageCtx:
    """What a stage sees while processing one record: model calls that are cached and recorded."""

    def __init__(self, run: "Run", stage: Stage, record: Record):
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

    async def _cached_call(self, kind: str, backend: Backend, payload: dict[str, Any], call, valid=lambda v: True,
                           group: str | None = None):
        key = cache_key(kind, backend.identity(), payload)
        hit = self.run.cache.get(key)
        if hit is not None:
            return hit, True, 0
        pending = self.run._pending.get(key)
        if pending is not None:  # the same request is already in flight: share its answer, pay once
            try:
                value, _ = await asyncio.shield(pending)
            except BackendError as e:  # its failure, but no request of ours: counted as shared
                shared = BackendError(str(e), raw=e.raw, attempts=0)
                shared.shared = True
                raise shared from e
            return json.loads(json.dumps(value)), True, 0  # a copy, as a cache hit would be

        async def call_and_store():
            # Calls of one kind and template share their prompt prefix: the limiter sends them back to back.
            async with self.run.limiter_for(backend).slot(group or kind):
                ATTEMPTS.set(1)
                try:
                    value = await call()
                except BackendError as e:
                    e.attempts = max(e.attempts, ATTEMPTS.get())
                    self.run.call_finished(backend, e)
                    raise
                attempts = ATTEMPTS.get()
            self.run.call_finished(backend, None)
            if valid(value):  # another process may have stored this request first: use its answer, as a re-run would
                value = self.run.cache.put(key, kind, backend.spec, value)
            return value, attempts

        task = asyncio.ensure_future(call_and_store())
        self.run._pending[key] = task
        try:
            value, attempts = await task
            return value, False, attempts
        finally:
            self.run._pending.pop(key, None)

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

    async def score_continuation(self, template: str | None, variables: dict[str, Any], continuation: str) -> list[float]:
        """Per-token logprobs of ``continuation`` after the rendered template (None: unconditional)."""
        backend = self.backend()
        backend.require("score_continuation", f"stage {self.stage.label}")
        messages = None
        template_hash = None
        if template is not None:
            prompt = self.prompts.render(template, variables)
            messages, template_hash = prompt.messages, prompt.template_hash
        payload = {"messages": messages, "continuation": continuation}

        async def call():
            return self._counted(await backend.score_continuation(messages, continuation))

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


class Run:
    """One execution of a pipeline over an input file into a run directory."""

    def __init__(self, config: RunConfig, registry: Registry):
        self.config = config
        self.registry = registry
        self.out = Path(config.out_dir)
        self.first_method: Method = registry.method(config.stages[0].method)
        self.stages: list[Stage] = []
        for spec in config.stages:
            method = registry.method(spec.method)
            known = {s.name for s in method.stages}
            if spec.stage not in known:
                raise BtkitError(f"method '{spec.method}' has no stage '{spec.stage}'; its stages: {', '.join(sorted(known))}")
            self.stages.append(method.stage_with_defaults(spec.stage, {**config.options, **spec.options}))
        #: The run-wide templates; a stage with override folders of its own gets its own library.
        self.prompts = PromptLibrary(roots=registry.prompt_roots(), overrides=config.prompt_overrides)
        self._stage_prompts = {
            id(stage): PromptLibrary(roots=registry.prompt_roots(), overrides=[*spec.prompt_overrides, *config.prompt_overrides])
            for stage, spec in zip(self.stages, config.stages) if spec.prompt_overrides
        }
        self.cache = (Cache(config.cache_path) if config.use_cache else NullCache())
        self._backends: dict[str, Backend] = {}
        self._stage_backends: dict[int, Backend] = {}
        self._limiters: dict[int, PrefixGroupedLimiter] = {}
        self._pending: dict[str, asyncio.Future] = {}  # cache key -> the call in flight for it
        self.live_counts: dict[str, collections.Counter] = {}
        self.progress: dict[str, Any] = {"finished": 0, "total": 0, "kept": 0, "dropped": 0, "skipped": 0,
                                         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        self.input_counts: dict[str, int] = {}
        self._fatal: asyncio.Future | None = None  # set with the reason when the run must stop
        self._call_counts: dict[int, list[int]] = {}
        self._calls_total = self._failures_total = 0
        self.retried_units = 0
        self._appends_in_order = True
        self.rows_read = self.survey_rows = 0
        self._elapsed_before = 0.0
        self.encoding_errors = str(config.options.get("encoding_errors") or "strict")

    # -- setup -----------------------------------------------------------------------------
    def model_for(self, stage: Stage) -> str:
        return stage.model or self.config.model

    def backend_for(self, stage: Stage) -> Backend:
        """The stage's backend; stages with the same spec and options share one (and its limiter)."""
        backend = self._stage_backends.get(id(stage))
        if backend is None:
            spec = self.model_for(stage)
            opts = {**self.config.backend_options, **{k: v for k, v in stage.options.items() if k in ("base_url",) and v}}
            key = spec + "|" + json.dumps(opts, sort_keys=True, default=str)
            if key not in self._backends:
                self._backends[key] = self.registry.make_backend(spec, opts)
            backend = self._stage_backends[id(stage)] = self._backends[key]
        return backend

    def limiter_for(self, backend: Backend) -> PrefixGroupedLimiter:
        """Each backend's bound on calls in flight: ``--concurrency``, or less if the backend says so."""
        if id(backend) not in self._limiters:
            limit = self.config.concurrency
            if backend.max_concurrency:
                limit = min(limit, backend.max_concurrency)
            self._limiters[id(backend)] = PrefixGroupedLimiter(max(1, limit))
        return self._limiters[id(backend)]

    def prompts_for(self, stage: Stage) -> PromptLibrary:
        return self._stage_prompts.get(id(stage), self.prompts)

    def count_usage(self, comp: Completion) -> None:
        """Tokens and cost of a call that reached the model, for the progress display."""
        self.progress["tokens_in"] += comp.prompt_tokens
        self.progress["tokens_out"] += comp.completion_tokens
        self.progress["cost_usd"] += float(comp.extra.get("cost") or 0.0)

    def check_templates(self) -> None:
        """Every template a stage uses exists, parses and has all its variables: before any call."""
        for stage in self.stages:
            for name in stage.templates:
                self.prompts_for(stage).check_variables(name, stage.variables)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change results. Not included: limit, concurrency, quiet, cache location."""
        st = self.config.input.stat()
        templates = {}
        for s in self.stages:
            lib = self.prompts_for(s)
            for n in s.templates:  # a stage's own override is told apart from the run-wide template
                templates[n if lib is self.prompts else f"{s.label}:{n}"] = lib.template_hash(n)
        return {
            "btkit": __version__,
            "input": {"path": str(self.config.input.resolve()), "size": st.st_size},
            "model": self.config.model,
            "backend_options": public_urls({k: v for k, v in self.config.backend_options.items() if "key" not in k.lower()}),
            "stages": [{"method": s.method, "stage": s.stage, "options": _jsonable(public_urls({**self.config.options, **s.options}))} for s in self.config.stages],
            "templates": templates,
        }

    # -- run directory and resume ------------------------------------------------------------
    def _open_run_dir(self) -> None:
        """Create and lock the run directory; move an old run aside under ``--overwrite``; write run.json.

        Nothing is deleted here: a run with other settings stops the run (``--overwrite`` moves
        its files to ``previous-<time>/``), and a resumed run's ``data.jsonl`` is only replaced
        once its finished units were checked against the input (:meth:`_survey`).
        """
        rundir.create(self.out)
        self.lock = rundir.RunLock(self.out).acquire()
        run_json = self.out / "run.json"
        fp = self.fingerprint()
        old: dict[str, Any] = {}
        if run_json.exists():
            try:
                old = json.loads(run_json.read_text(encoding="utf-8"))
            except ValueError:
                if not self.config.overwrite:
                    raise BtkitError(f"{run_json}: damaged (not JSON); pass --overwrite to start over or use another -o") from None
            if old.get("fingerprint") != fp and not self.config.overwrite:
                changed = sorted(k for k in set(fp) | set(old.get("fingerprint") or {}) if (old.get("fingerprint") or {}).get(k) != fp.get(k))
                raise BtkitError(
                    f"{self.out} holds a run with different settings (changed: {', '.join(changed)}); "
                    f"pass --overwrite to start over (old files move to {self.out}/previous-<time>/) or use another -o"
                )
        elif any((self.out / n).exists() for n in rundir.RUN_FILES) and not self.config.overwrite:
            raise BtkitError(f"{self.out} holds run files but no run.json; pass --overwrite to move them aside or use another -o")
        if self.config.overwrite:
            backup = rundir.move_aside(self.out)
            if backup is not None and not self.config.quiet:
                print(f"--overwrite: the previous run's files moved to {backup}", file=sys.stderr)
            old = {}
        self._elapsed_before = float(old.get("elapsed_s") or 0.0)
        self._run_json = {"fingerprint": fp, "command": redact_argv(sys.argv), "started": old.get("started", time.time()),
                          "elapsed_s": self._elapsed_before}
        # run.json first: a kill from here on leaves a directory that resumes.
        atomic_write_json(run_json, self._run_json)

    def _save_elapsed(self, t0: float) -> None:
        """Active time over every invocation, kept in run.json (stats' ``wall_time_s`` covers the whole run)."""
        self._run_json["elapsed_s"] = round(self._elapsed_before + time.monotonic() - t0, 3)
        atomic_write_json(self.out / "run.json", self._run_json)

    def _survey(self, found: journal.JournalScan) -> int:
        """One pass over the units before any model call; returns how many there are.

        It validates the input (file, line and field of the first bad line), refuses two units
        with one id (end-of-run decisions name records by id), and checks that every unit the
        journal holds is still the same unit of the input, so a resumed run never mixes two
        inputs and never publishes more units than the input (or ``--limit``) now yields.
        """
        path = self.out / "candidates.jsonl"
        finished = journal.unit_headers(journal.iter_sorted(path, found, skip=found.failed.__contains__))
        expected = next(finished, None)
        self.input_counts.clear()
        before = _input_state(self.config.input)
        count = 0
        with SeenSet() as ids:
            for seq, unit in enumerate(self.units(counts=self.input_counts)):
                count = seq + 1
                if not isinstance(unit, ExtraUnit) and not ids.add(unit.id):
                    raise self._duplicate_id_error(unit)
                if expected is not None and expected[0] == seq:
                    if expected[1] != unit_digest(unit):
                        raise BtkitError(
                            f"{self.config.input} changed since {self.out} was started: unit {seq + 1} ('{unit.id}') is not "
                            f"the one in the journal; pass --overwrite to start over (old files are moved aside) or use another -o"
                        )
                    expected = next(finished, None)
        if expected is not None:
            limit = f" with --limit {self.config.limit}" if self.config.limit is not None else ""
            raise BtkitError(
                f"{self.out} holds finished units beyond the {count} the input yields now{limit}; "
                f"raise --limit (or restore the input), pass --overwrite to start over, or use another -o"
            )
        if _input_state(self.config.input) != before:
            raise BtkitError(f"{self.config.input} changed while btkit read it; run again once nothing writes to it")
        self.survey_rows, self._input_before = self.rows_read, before
        return count

    def _duplicate_id_error(self, unit: Record) -> BtkitError:
        """Name the input lines that share a unit's id (one line; see :meth:`_survey`)."""
        opts = {**self.config.options, **self.config.stages[0].options}
        id_field = str(opts.get("id_field") or "id")
        lines = [n for n, row in iter_jsonl(self.config.input, (), None, self.encoding_errors)
                 if str(row.get(id_field)) == unit.source_id][:2]
        if len(lines) == 2:
            return InputError(str(self.config.input), f"duplicate id '{unit.source_id}' (first on line {lines[0]}); ids must be "
                              f"unique within a run: make them unique, or pick another field with --id-field", lines[1], id_field)
        return BtkitError(f"{self.config.input}: two units of this run would share the id '{unit.id}'; "
                          f"make the input's '{id_field}' values unique (an id may not look like another line's generated id)")

    def _resume(self, surveyed: int | None = None) -> tuple[journal.JournalScan, int]:
        """Survey the input against the journal, then make the journal one sorted run without failed units.

        Units whose calls failed (``backend_error``, ``stage_error``) are redone: re-running after
        an outage retries what failed, and every call that succeeded comes back from the cache.
        ``data.jsonl.partial`` is rebuilt from the journal, and a published ``data.jsonl`` is
        withdrawn only when there is work left to do.
        """
        path = self.out / "candidates.jsonl"
        found = journal.scan(path)
        n_units = surveyed if surveyed is not None and not found.units else self._survey(found)
        self.retried_units = len(found.failed)
        if found.failed or not found.sorted:
            journal.rewrite(path, journal.iter_sorted(path, found, skip=found.failed.__contains__))
            found = journal.scan(path)
        self._appends_in_order = found.gapless  # else units redone now land after later ones: sorted at the end
        self._rebuild_data(found)
        if found.units < n_units:
            (self.out / "data.jsonl").unlink(missing_ok=True)  # re-published when the run completes
        return found, n_units

    def _output_line(self, record: Record, method_name: str) -> dict[str, Any]:
        return self.registry.method(method_name).to_output(record)

    # -- execution -------------------------------------------------------------------------
    def units(self, counts: dict[str, int] | None = None, max_rows: int | None = None) -> Iterator[Record]:
        """The run's work units, in a deterministic order: the method's extra records, then ``prepare``'s units."""
        method = self.first_method
        opts = {**self.config.options, **self.config.stages[0].options}
        extra = list(method.extra_records(opts))
        if extra:
            yield ExtraUnit(extra)
        yield from method.prepare(self._rows(counts, max_rows), opts)

    def _rows(self, counts: dict[str, int] | None, max_rows: int | None) -> Iterator[dict[str, Any]]:
        """Input rows, at most ``--limit`` (or ``max_rows``: what the survey saw); sets ``rows_read``."""
        opts = {**self.config.options, **self.config.stages[0].options}
        required = method_required_fields(self.first_method, opts)
        limit = self.config.limit if max_rows is None else max_rows
        self.rows_read = 0
        if limit == 0:
            return
        for _, row in iter_jsonl(self.config.input, required, required, self.encoding_errors, counts):
            self.rows_read += 1
            yield row
            if limit is not None and self.rows_read >= limit:
                return

    def _units_as_surveyed(self) -> Iterator[Record]:
        """The units again, for the run itself: no more rows than the survey saw, and an input that
        changed since (cut short, appended to, rewritten) stops the run instead of mixing inputs."""
        cfg = self.config
        try:
            yield from self.units(max_rows=self.survey_rows)
        except InputError as e:  # it was valid when surveyed: it changed
            raise BtkitError(f"{cfg.input} changed while the run read it ({e}); finished units are kept: "
                             f"re-run the same command to resume") from None
        if self.rows_read != self.survey_rows or _input_state(cfg.input) != self._input_before:
            raise BtkitError(f"{cfg.input} changed while the run read it ({self.survey_rows} lines when it started, "
                             f"{self.rows_read} read now); finished units are kept: re-run the same command to resume")

    async def process_unit(self, unit: Record, stages: list[Stage] | None = None) -> list[Record]:
        """The unit's records after ``stages`` (default: all): dropped ones with their reason, the rest alive."""
        if isinstance(unit, ExtraUnit):
            return list(unit.records)
        if not unit.alive:  # dropped while preparing (too short, duplicate...)
            return [unit]
        return await self._through(self.stages if stages is None else stages, [unit])

    async def _through(self, stages: list[Stage], alive: list[Record]) -> list[Record]:
        terminal: list[Record] = []
        for stage in stages:
            if len(alive) == 1:  # the common case: no gather, no extra task
                results = [await self._run_stage(stage, alive[0])]
            else:
                results = await asyncio.gather(*(self._run_stage(stage, r) for r in alive))
            alive = []
            for outs in results:
                for rec in outs:
                    (alive if rec.alive else terminal).append(rec)
            if not alive:
                break
        return terminal + alive

    async def _run_stage(self, stage: Stage, record: Record) -> list[Record]:
        hook = self.registry.hook
        for reason in hook.btkit_before_stage(record=record, stage=stage, run=self):
            if reason:
                return [record.drop(stage.label, str(reason))]
        try:
            outs = await stage.process(record, StageCtx(self, stage, record))
        except BtkitError:  # configuration problems stop the run with their message
            raise
        except Exception as e:  # a backend fault, or a bug in a stage, loses one record, not the run
            return [failed_record(record, stage.label, e)]
        if not outs:  # a stage that returns nothing would make the record vanish: record why instead
            return [record.drop(stage.label, "no_output")]
        for rec in outs:
            if rec.alive:
                for reason in hook.btkit_after_stage(record=rec, stage=stage, run=self):
                    if reason:
                        rec.drop(stage.label, str(reason))
                        break
        return outs

    # -- failing fast ----------------------------------------------------------------------
    def call_finished(self, backend: Backend, error: BaseException | None) -> None:
        """Count a model call's outcome; stop the run when an endpoint looks dead.

        Two stated bounds: ``max_failures_in_a_row`` calls to one backend failing with no success
        in between, or (after ``min_calls_for_share`` calls) more than ``max_failure_share`` of all
        calls failing. Either stops the run with one line naming the endpoint; finished units stay
        in the journal and a re-run retries the failed ones.
        """
        counts = self._call_counts.setdefault(id(backend), [0, 0, 0])  # calls, failures, failures in a row
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
        if why and self._fatal is not None and not self._fatal.done():
            where = backend.spec
            url = (backend.identity() or {}).get("base_url")
            if url:
                where += f" at {url}"
            self._fatal.set_exception(BtkitError(
                f"{why} to {where} failed (last: {str(error)[:200]}); stopped. Finished units are kept: "
                f"re-run the same command once the endpoint answers (failed units are retried)"))

    def _unit_done(self, task: asyncio.Future) -> None:
        """A unit finished (in any order): progress counts it now, and a config error stops the run."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if self._fatal is not None and not self._fatal.done():
                self._fatal.set_exception(error)
            return
        self.progress["finished"] += 1
        records = task.result()
        kept = sum(1 for r in records if r.alive)
        self.progress["kept"] += kept
        self.progress["dropped"] += len(records) - kept
        self.bar.update(self.progress)

    async def _wait_for_head(self, in_flight: collections.deque) -> None:
        """Wait until the oldest unit is done (the only one the reorder buffer can write), or the run must stop.

        Waiting on "any unit" instead would return at once whenever a later unit is already done
        and spin the loop, taking a core from the model.
        """
        head = in_flight[0][2]
        if not head.done():
            await asyncio.wait([head, self._fatal], return_when=asyncio.FIRST_COMPLETED)
        if self._fatal.done():
            self._fatal.result()  # raises the reason

    async def execute(self) -> dict[str, Any]:
        cfg = self.config
        self.check_templates()
        for stage in self.stages:  # resolve every model spec now: a typo or a missing capability fails before any work
            stage.check_backend(self.backend_for(stage))
        # A bad input stops the run before its directory is created or touched.
        surveyed = None
        if not (self.out / "candidates.jsonl").exists():
            surveyed = self._survey(journal.JournalScan())
        else:  # the survey against the journal needs the directory's lock: check the rows alone first
            required = method_required_fields(self.first_method, {**cfg.options, **cfg.stages[0].options})
            validate_jsonl(cfg.input, required, required, self.encoding_errors)
        self._open_run_dir()
        try:
            return await self._execute_locked(surveyed)
        finally:
            self.lock.release()

    async def _execute_locked(self, surveyed: int | None) -> dict[str, Any]:
        cfg = self.config
        path = self.out / "candidates.jsonl"
        found, n_units = self._resume(surveyed)
        self.registry.hook.btkit_run_start(run=self)
        t0 = time.monotonic()
        self._fatal = asyncio.get_running_loop().create_future()
        self.progress["total"] = n_units - found.units
        self.progress["skipped"] = found.units
        self.bar = _Progress(cfg.quiet, self.progress["total"], cfg.status_every)
        ticker = asyncio.ensure_future(self.bar.tick_every(self.progress))
        hold = self.hold_index()
        try:
            finished = journal.unit_headers(journal.iter_sorted(path, found))
            await self._stream(self._first_pass_work(finished, hold), path, self.out / "data.jsonl.partial", t0,
                               hold_alive=hold is not None)
            if hold is not None:
                await self._second_pass(hold, t0)
        finally:
            ticker.cancel()
            self.bar.close()
            for backend in self._backends.values():
                await backend.aclose()  # after every unit unwound (see _stream): llama.cpp frees under no thread
            self._save_elapsed(t0)
        self._finish_journal()
        os.replace(self.out / "data.jsonl.partial", self.out / "data.jsonl")
        stats = self._write_failures(time.monotonic() - t0)
        atomic_write_json(self.out / "stats.json", stats)
        self.registry.hook.btkit_run_end(run=self, stats=stats)
        self.cache.close()
        return stats

    def hold_index(self) -> int | None:
        """The first stage, other than the last, whose end-of-run cut (``Stage.cuts_at_end``) later stages wait for.

        With one (e.g. ``--keep-top`` before Back-and-Forth's rewrite), the run goes in two passes:
        every unit through the stages up to it, then the cut over the whole run, then only the
        records that survive it through the rest, so no call is spent on a record the cut drops.
        """
        for i, stage in enumerate(self.stages[:-1]):
            if stage.cuts_at_end:
                return i
        return None

    def _first_pass_work(self, finished: Iterator[tuple[int, str]], hold: int | None) -> Iterator[tuple[int, Record, str, Any]]:
        """``(seq, unit, digest, work)`` for every unit not finished by an earlier invocation."""
        stages = self.stages if hold is None else self.stages[:hold + 1]
        next_finished = next(finished, None)
        for seq, unit in enumerate(self._units_as_surveyed()):
            if next_finished is not None and next_finished[0] == seq:
                next_finished = next(finished, None)
                continue
            digest = unit_digest(unit)  # before any stage touches the unit's fields
            if not isinstance(unit, ExtraUnit) and not unit.alive:  # dropped while preparing: no task needed
                yield seq, unit, digest, [unit]
            else:
                yield seq, unit, digest, self.process_unit(unit, stages)

    async def _stream(self, work: Iterator[tuple[int, Record, str, Any]], journal_path: Path, data_path: Path | None,
                      t0: float, hold_alive: bool = False, decorate: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run units with at most ``window`` in flight and journal each finished unit, in input order.

        ``work`` is a coroutine returning the unit's records, or the records themselves. Every
        finished unit at the head of the window goes to the journal in one write (then its kept
        records to ``data_path``); a kill cuts at most the unit being written, which resume redoes.
        With ``hold_alive``, records still alive are journalled ``held`` (a second pass finishes them).
        """
        loop = asyncio.get_running_loop()
        window = max(4, 2 * self.config.concurrency)
        in_flight: collections.deque = collections.deque()
        journal_out = AppendFile(journal_path)
        data = AppendFile(data_path) if data_path is not None else None
        last_saved = time.monotonic()

        def flush_ready() -> None:
            nonlocal last_saved
            journal_lines, data_lines = [], []
            while in_flight and in_flight[0][2].done():
                seq, unit, task, digest = in_flight.popleft()
                records = task.result()
                for r in records:
                    m = self._method_of(r)
                    line = {**r.to_candidate(), "unit": unit.id, "unit_seq": seq, "unit_records": len(records),
                            "unit_hash": digest, "method": m}
                    if hold_alive and r.alive:
                        line["held"] = True
                    elif r.alive and data is not None:
                        data_lines.append(self._output_line(r, m))
                    if decorate is not None:
                        decorate(line)
                    journal_lines.append(line)
            if journal_lines:  # journal first: data.jsonl.partial is rebuilt from it on resume
                journal_out.write_lines(journal_lines)
            if data_lines:
                data.write_lines(data_lines)
            if time.monotonic() - last_saved > 10:
                self._save_elapsed(t0)
                last_saved = time.monotonic()

        try:
            for seq, unit, digest, job in work:
                if isinstance(job, list):
                    task = loop.create_future()
                    task.set_result(job)
                    self._unit_done(task)  # now: a callback would wait for the loop, which need not run at all
                else:
                    task = asyncio.ensure_future(job)
                    task.add_done_callback(self._unit_done)
                in_flight.append((seq, unit, task, digest))
                if self._fatal.done():
                    self._fatal.result()
                flush_ready()
                while len(in_flight) >= window:
                    await self._wait_for_head(in_flight)
                    flush_ready()
            while in_flight:
                await self._wait_for_head(in_flight)
                flush_ready()
        finally:
            pending = [task for _, _, task, _ in in_flight if not task.done()]
            for task in pending:
                task.cancel()
            if pending:  # let cancelled units unwind before their backends close under them
                await asyncio.gather(*pending, return_exceptions=True)
            journal_out.close()
            if data is not None:
                data.close()

    async def _second_pass(self, hold: int, t0: float) -> None:
        """Cut the held records with the whole run in view, then finish the survivors (see :meth:`hold_index`).

        Each unit with held records is journalled again, whole, in ``candidates.held.jsonl`` (its
        own resumable journal); the two journals are merged when every unit is done, the newer
        group of a unit replacing the older.
        """
        path, held_path = self.out / "candidates.jsonl", self.out / HELD_JOURNAL
        found = journal.scan(path)
        drops = self._end_of_run_drops(self.stages[:hold + 1], lambda: journal.iter_sorted(path, found))
        done = journal.scan(held_path)
        if done.failed:  # units whose remaining stages failed are done again (their good calls are cached)
            journal.rewrite(held_path, journal.iter_sorted(held_path, done, skip=done.failed.__contains__))
            done = journal.scan(held_path)
        done_units = journal.unit_headers(journal.iter_sorted(held_path, done))
        rest = self.stages[hold + 1:]

        def work() -> Iterator[tuple[int, Record, str, Any]]:
            next_done = next(done_units, None)
            for seq, lines in journal.units_of(journal.iter_sorted(path, found)):
                if not any(line.get("held") for line in lines):
                    continue
                while next_done is not None and next_done[0] < seq:
                    next_done = next(done_units, None)
                if next_done is not None and next_done[0] == seq:
                    continue
                records, alive = [], []
                for line in lines:
                    rec = Record.from_candidate(line)
                    records.append(rec)
                    if line.get("held"):
                        decided = drops.get(journal_key(line))
                        if decided is not None:
                            label, reason, details = decided
                            rec.drop(label, reason, **details)
                        else:
                            alive.append(rec)
                unit = Record(id=lines[0]["unit"], source_id=lines[0].get("source_id", ""), fields={})
                yield seq, unit, lines[0].get("unit_hash", ""), self._finish_held(records, alive, rest)

        def mark_cut(line: dict[str, Any]) -> None:
            if line["status"] == "dropped" and journal_key(line) in drops:
                line["end_of_run"] = True
                line["cut_before"] = self.stages[hold + 1].label  # it never reached the stages after the cut

        self.bar.restart(self.progress, sum(1 for _, lines in journal.units_of(journal.iter_sorted(path, found))
                                            if any(line.get("held") for line in lines)) - done.units)
        await self._stream(work(), held_path, None, t0, decorate=mark_cut)
        held = journal.scan(held_path)
        newer = journal.unit_headers(journal.iter_sorted(held_path, held))
        replaced = set()  # a few ints per unit with held records; the lines themselves stream
        for seq, _ in newer:
            replaced.add(seq)
        journal.rewrite(path, journal.merge(journal.iter_sorted(path, found, skip=replaced.__contains__),
                                            journal.iter_sorted(held_path, held)))
        held_path.unlink()

    async def _finish_held(self, records: list[Record], alive: list[Record], stages: list[Stage]) -> list[Record]:
        """A unit's records after the cut: the survivors through the remaining stages, the rest as they are."""
        finished = await self._through(stages, alive) if alive else []
        going_on = {id(r) for r in alive}
        return [r for r in records if id(r) not in going_on] + finished

    def _end_of_run_drops(self, stages: list[Stage], lines: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """``{journal key: (stage label, reason, details)}``: what ``stages`` decide with the whole journal in view."""
        drops: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for stage in stages:
            decided = stage.end_of_run(lines)
            for key, (reason, details) in (decided or {}).items():
                drops.setdefault(key, (stage.label, reason, details))
        return drops

    def _finish_journal(self) -> None:
        """Put the journal in input order and apply end-of-run decisions (``Stage.end_of_run``).

        Drops are written into the journal (rewritten to a temporary file, then renamed) and
        ``data.jsonl.partial`` is rebuilt from it, so stats, failures and a resumed run agree.
        Decisions name records by :func:`btkit.records.journal_key` (unit and id), so a decision
        acts on exactly the record it means.
        """
        path = self.out / "candidates.jsonl"
        scanned: list[journal.JournalScan] = []

        def lines() -> Iterator[dict[str, Any]]:  # a pass over the journal only for a stage that asks for one
            if not scanned:
                scanned.append(journal.scan(path))
            return journal.iter_sorted(path, scanned[0])

        drops = self._end_of_run_drops(self.stages, lines)
        if not drops and self._appends_in_order and self.hold_index() is None:
            return  # written in input order by this invocation and the ones it resumed: nothing to do
        found = scanned[0] if scanned else journal.scan(path)

        def decided_lines() -> Iterator[dict[str, Any]]:
            for line in journal.iter_sorted(path, found):
                if line["status"] == "kept" and journal_key(line) in drops:
                    label, reason, details = drops[journal_key(line)]
                    line.update(status="dropped", dropped_at=label, reason=reason, end_of_run=True)
                    if details:
                        line.setdefault("meta", {}).setdefault("drop_details", {}).update(details)
                yield line

        journal.rewrite(path, decided_lines())
        self._rebuild_data(journal.scan(path))

    def _rebuild_data(self, found: journal.JournalScan) -> None:
        """``data.jsonl.partial`` from the journal's kept records, in input order (temporary file, then renamed)."""
        tmp = self.out / ".data.rebuild"
        tmp.unlink(missing_ok=True)
        kept = (self._output_line(Record.from_candidate(line), line["method"])
                for line in journal.iter_sorted(self.out / "candidates.jsonl", found) if line["status"] == "kept" and not line.get("held"))
        with _Closing(AppendFile(tmp)) as data:
            for chunk in _chunks(kept, 512):
                data.write_lines(chunk)
        os.replace(tmp, self.out / "data.jsonl.partial")

    def _method_of(self, record: Record) -> str:
        """The method that shapes a kept record's data.jsonl line: the last stage's, unless set."""
        return record.meta.get("output_method") or self.config.stages[-1].method

    # -- stats -----------------------------------------------------------------------------
    def compute_stats(self, elapsed: float, failures: AppendFile | None = None) -> dict[str, Any]:
        """Stats are derived from the journal alone, so a resumed run reports the whole run.

        Per stage: ``in``/``out`` count the records that reached and left it while the run
        streamed (records dropped while preparing units reach no stage: ``dropped_while_preparing``;
        records dropped by a whole-run decision left every stage and are counted under the
        deciding stage's ``dropped_at_end``); ``calls`` counts every call made, failed ones
        included (``failed_calls``), ``retries`` the extra requests a backend sent for them, and
        ``requests_sent`` what the servers saw (calls not served by the cache, plus retries).
        With ``failures``, the failed records' lines are written there in the same pass.
        """
        labels = [s.label for s in self.stages]
        per_stage = {l: {"in": 0, "out": 0, "dropped": collections.Counter(), "dropped_at_end": collections.Counter(),
                         "calls": 0, "cache_hits": 0, "failed_calls": 0, "retries": 0, "requests_sent": 0,
                         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "parse_failures": collections.Counter(),
                         "parse_retries": 0, "parse_retries_recovered": 0} for l in labels}
        totals = collections.Counter()
        dropped_by_reason: collections.Counter = collections.Counter()
        preparing: collections.Counter = collections.Counter()
        current_unit, seen_steps = None, set()
        for line in read_journal(self.out / "candidates.jsonl", "unit_seq", "unit_records"):
            totals["records"] += 1
            totals[line["status"]] += 1
            unit_key = line.get("unit_seq", line["unit"])
            if unit_key != current_unit:
                current_unit, seen_steps = unit_key, set()
                totals["units"] += 1
            dropped = line["status"] == "dropped"
            if dropped:
                dropped_by_reason[f"{line['dropped_at']}:{line['reason']}"] += 1
                if failures is not None and line["reason"] in journal.FAILURE_REASONS:
                    details = line.get("meta", {}).get("drop_details", {})
                    failures.write_lines([{"id": line["id"], "stage": line["dropped_at"], "reason": line["reason"], **details}])
            if line.get("meta", {}).get("source") == "seed":
                pass  # written as given: no stage saw it
            elif dropped and line["dropped_at"] not in per_stage:
                preparing[line["reason"]] += 1
            else:
                for label in labels:
                    if label == line.get("cut_before"):
                        break
                    st = per_stage[label]
                    st["in"] += 1
                    if dropped and line["dropped_at"] == label and not line.get("end_of_run"):
                        st["dropped"][line["reason"]] += 1
                        break
                    st["out"] += 1
                if dropped and line.get("end_of_run"):
                    per_stage[line["dropped_at"]]["dropped_at_end"][line["reason"]] += 1
            for step in line.get("lineage", []):
                if step.get("step") in seen_steps or step.get("stage") not in per_stage:
                    continue
                seen_steps.add(step.get("step"))
                st = per_stage[step["stage"]]
                if step.get("request", step.get("step")) == step.get("step"):  # one choice of an n>1 request counts no call
                    st["calls"] += 1
                    st["cache_hits"] += bool(step.get("cached"))
                    st["failed_calls"] += "error" in step
                    st["retries"] += int(step.get("retries") or 0)
                    st["requests_sent"] += (not step.get("cached")) + int(step.get("retries") or 0)
                toks = step.get("tokens") or [0, 0]
                st["tokens_in"] += toks[0]
                st["tokens_out"] += toks[1]
                st["cost_usd"] += float(step.get("cost") or 0.0)
                if step.get("parse_error"):
                    st["parse_failures"][step["parse_error"]] += 1
                if step.get("attempt"):
                    st["parse_retries"] += 1
                    st["parse_retries_recovered"] += "parsed" in step
        for st in per_stage.values():
            st["dropped"] = dict(st["dropped"])
            st["dropped_at_end"] = dict(st["dropped_at_end"])
            st["parse_failures_total"] = sum(st["parse_failures"].values())
            st["parse_failures"] = dict(st["parse_failures"])
        total = lambda key: sum(s[key] for s in per_stage.values())  # noqa: E731
        return {
            "status": "complete",
            "btkit": __version__,
            "input": str(self.config.input),
            "model": self.config.model,
            "stages": per_stage,
            "dropped_while_preparing": dict(preparing),
            "units": totals["units"],
            "records": totals["records"],
            "kept": totals["kept"],
            "dropped": totals["dropped"],
            "dropped_by_reason": dict(dropped_by_reason),
            "parse_failures": total("parse_failures_total"),
            "parse_failures_by_reason": dict(sum((collections.Counter(s["parse_failures"]) for s in per_stage.values()), collections.Counter())),
            "parse_retries": total("parse_retries"),
            "input_lines_with_replaced_text": self.input_counts.get("replaced_lines", 0),
            "backend_failures": sum(v for k, v in dropped_by_reason.items() if k.endswith(":backend_error")),
            "tokens_in": total("tokens_in"),
            "tokens_out": total("tokens_out"),
            "calls": total("calls"),
            "failed_calls": total("failed_calls"),
            "retries": total("retries"),
            "requests_sent": total("requests_sent"),
            "cost_usd": round(total("cost_usd"), 6),
            "cache_hits_this_invocation": self.cache.hits,
            "model_calls_this_invocation": self.cache.misses,
            "cache_errors": self.cache.errors,
            "units_resumed": self.progress["skipped"],
            "units_retried": self.retried_units,
            "wall_time_s": round(self._elapsed_before + elapsed, 3),
            "this_invocation_s": round(elapsed, 3),
        }

    def _write_failures(self, elapsed: float = 0.0) -> dict[str, Any]:
        """Write ``failures.jsonl`` (atomically) and return the stats, in one pass over the journal."""
        tmp = self.out / ".failures.tmp"
        tmp.unlink(missing_ok=True)
        with _Closing(AppendFile(tmp)) as out:
            stats = self.compute_stats(elapsed, failures=out)
        os.replace(tmp, self.out / "failures.jsonl")
        return stats


def redact_argv(argv: list[str]) -> list[str]:
    """The command line for run.json with credential-like values masked (``-B api_key=sk-...``) and
    ``user:password@`` cut from every URL in it (``--base-url http://user:KEY@host/v1``)."""
    import re

    from .backends import public_url

    masked = [re.sub(r"(?i)((?:key|token|secret|password)[\w-]*=).*", r"\1***", a) for a in argv]
    return [re.sub(r"[A-Za-z][\w+.-]*://\S+", lambda m: public_url(m.group(0)), a) for a in masked]


def public_urls(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as run.json records them: ``user:password@`` cut from every string value that is a URL."""
    from .backends import public_url

    return {k: public_url(v) if isinstance(v, str) else v for k, v in options.items()}


def method_required_fields(method: Method, options: dict[str, Any]) -> dict[str, str]:
    """Input fields the first method needs, mapped to the CLI option that renames each."""
    fn = getattr(method, "required_fields", None)
    if fn:
        return fn(options)
    return {options.get("text_field", "text"): "--text-field"}


class _Closing:
    def __init__(self, f: AppendFile):
        self.f = f

    def __enter__(self) -> AppendFile:
        return self.f

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _retries(attempts: Any, cached: bool) -> dict[str, int]:
    """``{"retries": n}`` for a step whose call took n extra requests (nothing for a cache hit)."""
    try:
        n = int(attempts or 1) - 1
    except (TypeError, ValueError):
        n = 0
    return {"retries": n} if n > 0 and not cached else {}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str, sort_keys=True))


def _recorded_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampling params for a lineage step; a JSON schema (kilobytes, the same on every call) as its hash."""
    if "json_schema" not in params:
        return params
    blob = json.dumps(params["json_schema"], sort_keys=True, default=str).encode()
    return {**params, "json_schema": "sha256:" + hashlib.sha256(blob).hexdigest()[:16]}


def unit_digest(unit: Record) -> str:
    """What a finished unit is checked against on resume: its id and its input fields, hashed."""
    blob = json.dumps({"id": unit.id, "fields": unit.fields}, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(blob.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


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


def progress_text(progress: dict[str, Any]) -> str:
    """The progress bar's counts: records kept and dropped, tokens (and cost) of this invocation's calls."""
    text = (f"kept={progress['kept']} dropped={progress['dropped']} "
            f"tokens={_short(progress['tokens_in'])}+{_short(progress['tokens_out'])}")
    if progress.get("cost_usd"):
        text += f" cost=${progress['cost_usd']:.4f}"
    return text


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.1f}k" if n >= 10**4 else str(n)


class _Progress:
    """Progress of finished units (in any order) against the units left to do.

    On a terminal: a tqdm bar with rate and ETA. Otherwise (a log file, CI, ``nohup``): one status
    line every ``every`` seconds, so a stalled server is visible there too. Silent when quiet.
    """

    def __init__(self, quiet: bool, total: int, every: float):
        self.bar = None
        self.every = 0.0 if quiet else float(every or 0)
        self.total = total
        self.t0 = time.monotonic()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc="units", unit="unit", total=total, dynamic_ncols=True, file=sys.stderr)
            self.every = 0.0

    def restart(self, progress: dict[str, Any], total: int) -> None:
        """Count a new pass (the second pass of a run with a whole-run cut) from zero."""
        progress.update(finished=0, total=total)
        self.total, self.t0 = total, time.monotonic()
        if self.bar is not None:
            self.bar.reset(total=total)

    def update(self, progress: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(progress_text(progress), refresh=False)

    async def tick_every(self, progress: dict[str, Any]) -> None:
        """Print :func:`status_line` every ``every`` seconds until cancelled (no terminal only)."""
        if self.every <= 0:
            return
        while True:
            await asyncio.sleep(self.every)
            print(status_line(progress, time.monotonic() - self.t0), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def status_line(progress: dict[str, Any], elapsed: float) -> str:
    """``progress: 12/40 units (30%), 0.52 units/s, ETA 54s, kept=... dropped=... tokens=...``"""
    done, total = progress["finished"], progress["total"]
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total >= done else ""
    return f"progress: {done}/{total} units{pct}, {rate:.2f} units/s{eta}, {progress_text(progress)}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _input_state(path: Path) -> tuple[int, int] | None:
    """What tells an input file changed while it was read: its size and modification time (None: missing)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None  # reading it names the problem
    return st.st_size, st.st_mtime_ns


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"warning: {self.format(record)}", file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never break a run)
            self.handleError(record)


def log_warnings_to_stderr() -> None:
    """btkit's warnings (a retried request, say) reach a user who has no logging set up, TTY or not."""
    logger = logging.getLogger("btkit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        logger.addHandler(handler)


def run_pipeline(config: RunConfig, registry: Registry) -> dict[str, Any]:
    """Run synchronously (the CLI's entry point into the async engine).

    Ctrl-C and filesystem faults (disk full, a read-only or vanished directory) become one line:
    whatever they interrupted, finished units are in the journal and the same command resumes.
    """
    log_warnings_to_stderr()
    try:
        return asyncio.run(Run(config, registry).execute())
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; finished units are kept in {config.out_dir}: re-run the same command to resume") from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise BtkitError(f"{where}{e.strerror or e}; finished units are kept in {config.out_dir}: "
                         f"fix that, then re-run the same command to resume") from None
