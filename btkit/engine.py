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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .backends import MULTI_SAMPLE, Backend, Completion
from .cache import Cache, NullCache, cache_key
from .errors import BackendError, BtkitError
from .io import AppendFile, atomic_write_json, iter_jsonl, read_journal, scrub_text, validate_jsonl
from .methods import Method, ParseError, Stage
from .plugins import Registry
from .prompts import PromptLibrary
from .records import Record, failed_record
from .scheduling import PrefixGroupedLimiter

RUN_FILES = ("candidates.jsonl", "data.jsonl", "data.jsonl.partial", "stats.json", "failures.jsonl", "run.json")


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
            return hit, True
        pending = self.run._pending.get(key)
        if pending is not None:  # the same request is already in flight: share its answer, pay once
            value = await asyncio.shield(pending)
            return json.loads(json.dumps(value)), True  # a copy, as a cache hit would be

        async def call_and_store():
            # Calls of one kind and template share their prompt prefix: the limiter sends them back to back.
            async with self.run.limiter_for(backend).slot(group or kind):
                value = await call()
            if valid(value):
                self.run.cache.put(key, kind, backend.spec, value)
            return value

        task = asyncio.ensure_future(call_and_store())
        self.run._pending[key] = task
        try:
            return await task, False
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
        while comp.parse_error is not None and attempt < retries:  # type: ignore[attr-defined]
            attempt += 1
            retry_params = {k: v for k, v in params.items() if v is not None}
            retry_params["seed"] = retry_seed(retry_params.get("seed"), attempt)
            if retry_params.get("temperature") == 0:
                retry_params["temperature"] = float(self.stage.options.get("parse_retry_temperature") or 0.7)
            previous = comp.step["step"]  # type: ignore[attr-defined]
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
        choices = comp.extra.get("choices")
        if not isinstance(choices, list) or not choices:  # the backend answered with one completion
            choices = [{"text": comp.text, "finish_reason": comp.finish_reason}]
        base = comp.step  # type: ignore[attr-defined]

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
            choice.cached, choice.step = comp.cached, step  # type: ignore[attr-defined]
            self._parse_into(choice, parse)
            retry_params = {**params, "seed": int(params["seed"]) + i}
            return await self.for_record(record)._retry_parse(choice, template, variables, retry_params, parse, retries, False)

        return list(await asyncio.gather(*(finish(i, r) for i, r in enumerate(records))))

    @staticmethod
    def _parse_into(comp: Completion, parse: Callable[[str | None], Any], accept_truncated: bool = False) -> None:
        comp.parsed, comp.parse_error = None, None  # type: ignore[attr-defined]
        try:
            if comp.finish_reason == "length" and not accept_truncated:
                raise ParseError("truncated", "the reply hit max_tokens")
            if comp.finish_reason == "content_filter":
                raise ParseError("content_filter", "the provider filtered the reply")
            try:
                comp.parsed = parse(comp.text)  # type: ignore[attr-defined]
            except ParseError as e:
                if comp.finish_reason == "length":  # cut short and not readable: the cut is why
                    raise ParseError("truncated", f"the reply hit max_tokens ({e.reason})") from None
                raise
            if comp.finish_reason == "length":
                comp.step["accepted_truncated"] = True  # type: ignore[attr-defined]
        except ParseError as e:
            comp.parse_error = e  # type: ignore[attr-defined]
            comp.step["parse_error"] = e.reason  # type: ignore[attr-defined]
            if e.detail:
                comp.step["parse_error_detail"] = e.detail[:500]  # type: ignore[attr-defined]
            return
        comp.step["parsed"] = _jsonable_value(comp.parsed)  # type: ignore[attr-defined]

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
        value, cached = await self._cached_call("chat", backend, payload, call, valid=_has_text, group=f"chat:{template}")
        comp = Completion.from_json(value)
        comp.cached = cached
        comp.step = self._step(  # type: ignore[attr-defined]
            "chat", backend, template, prompt.template_hash,
            params=_recorded_params(params), raw=comp.text, finish_reason=comp.finish_reason,
            tokens=[comp.prompt_tokens, comp.completion_tokens], cached=cached,
            **({"cost": comp.extra["cost"]} if comp.extra.get("cost") and not cached else {}),
            **step_extra,
        )
        return comp

    async def next_token_logprobs(self, template: str, variables: dict[str, Any], candidates: list[str]) -> dict[str, float]:
        """Log-probabilities of ``candidates`` as the next token after the template's assistant prefix."""
        prompt = self.prompts.render(template, variables)
        backend = self.backend()
        backend.require("next_token_logprobs", f"stage {self.stage.label}")
        payload = {"messages": prompt.messages, "assistant_prefix": prompt.assistant_prefix, "candidates": candidates}

        async def call():
            return await backend.next_token_logprobs(prompt.messages, prompt.assistant_prefix, candidates)

        value, cached = await self._cached_call("next_token_logprobs", backend, payload, call, group=f"next_token_logprobs:{template}")
        self._step("next_token_logprobs", backend, template, prompt.template_hash, logprobs=value, cached=cached)
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
            return await backend.score_continuation(messages, continuation)

        value, cached = await self._cached_call("score_continuation", backend, payload, call, group=f"score_continuation:{template}")
        self._step("score_continuation", backend, template, template_hash, n_tokens=len(value), cached=cached)
        return value


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
            self.stages.append(method.build_stage(spec.stage, {**config.options, **spec.options}))
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
        self.progress: dict[str, Any] = {"units": 0, "kept": 0, "dropped": 0, "skipped": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        self.input_counts: dict[str, int] = {}
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
            "backend_options": {k: v for k, v in self.config.backend_options.items() if "key" not in k.lower()},
            "stages": [{"method": s.method, "stage": s.stage, "options": _jsonable({**self.config.options, **s.options})} for s in self.config.stages],
            "templates": templates,
        }

    # -- resume ----------------------------------------------------------------------------
    def _prepare_out_dir(self) -> tuple[int, str]:
        """Create or resume the run directory; return how many units are finished and a digest of their ids.

        The journal holds finished units in input order, so they are always the first N units of
        the (deterministic) unit stream: resuming skips N units, in constant memory, and checks
        that the skipped units' ids and contents hash to the same digest (an input edited in place is caught).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        run_json = self.out / "run.json"
        fp = self.fingerprint()
        if run_json.exists():
            old = json.loads(run_json.read_text(encoding="utf-8")).get("fingerprint")
            if old != fp:
                if not self.config.overwrite:
                    changed = sorted(k for k in set(fp) | set(old or {}) if (old or {}).get(k) != fp.get(k))
                    raise BtkitError(
                        f"{self.out} holds a run with different settings (changed: {', '.join(changed)}); "
                        f"pass --overwrite to start over (old files move to {self.out}/previous-<time>/) or use another -o"
                    )
                backup = self.out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
                backup.mkdir()
                for name in RUN_FILES:
                    if (self.out / name).exists():
                        shutil.move(str(self.out / name), str(backup / name))
        elif any((self.out / n).exists() for n in RUN_FILES):
            raise BtkitError(f"{self.out} holds run files but no run.json; use another -o")
        # run.json first: a kill from here on leaves a directory that resumes.
        atomic_write_json(run_json, {"fingerprint": fp, "command": redact_argv(sys.argv), "started": time.time()})
        n_done, ids, current = 0, hashlib.blake2b(digest_size=16), None
        partial = self.out / "data.jsonl.partial"
        tmp = self.out / ".data.rebuild"
        tmp.unlink(missing_ok=True)
        with _Closing(AppendFile(tmp)) as data:
            for line in read_journal(self.out / "candidates.jsonl", "unit_seq", "unit_records"):
                seq = line.get("unit_seq", line["unit"])
                if seq != current:
                    current, n_done = seq, n_done + 1
                    ids.update(line.get("unit_hash", "").encode() + b"\n")
                if line["status"] == "kept":
                    data.write_lines([self._output_line(Record.from_candidate(line), line["method"])])
        os.replace(tmp, partial)
        if (self.out / "data.jsonl").exists() and n_done:
            os.unlink(self.out / "data.jsonl")  # will be re-published when the run completes
        return n_done, ids.hexdigest()

    def _output_line(self, record: Record, method_name: str) -> dict[str, Any]:
        return self.registry.method(method_name).to_output(record)

    # -- execution -------------------------------------------------------------------------
    def units(self) -> Iterator[Record]:
        method = self.first_method
        opts = {**self.config.options, **self.config.stages[0].options}
        required = method_required_fields(method, opts)
        rows = (row for _, row in iter_jsonl(self.config.input, required, required, self.encoding_errors))
        if self.config.limit is not None:
            rows = _take(rows, self.config.limit)
        extra = list(method.extra_records(opts))
        if extra:
            holder = Record(id="extra", source_id="extra", fields={})
            holder.meta["extra"] = extra
            yield holder
        yield from method.prepare(rows, opts)

    async def process_unit(self, unit: Record) -> list[Record]:
        if unit.id == "extra":
            return list(unit.meta["extra"])
        if not unit.alive:  # dropped while preparing (too short, duplicate...)
            return [unit]
        alive, terminal = [unit], []
        for stage in self.stages:
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

    async def execute(self) -> dict[str, Any]:
        cfg = self.config
        required = method_required_fields(self.first_method, {**cfg.options, **cfg.stages[0].options})
        validate_jsonl(cfg.input, required, required, self.encoding_errors, self.input_counts)
        self.check_templates()
        for stage in self.stages:  # resolve every model spec now: a typo or a missing capability fails before any work
            stage.check_backend(self.backend_for(stage))
        n_done, done_digest = self._prepare_out_dir()
        skipped_ids = hashlib.blake2b(digest_size=16)
        self.registry.hook.btkit_run_start(run=self)
        t0 = time.monotonic()
        journal = AppendFile(self.out / "candidates.jsonl")
        data = AppendFile(self.out / "data.jsonl.partial")
        window = max(4, 2 * cfg.concurrency)
        bar = _progress(cfg.quiet)
        in_flight: collections.deque = collections.deque()
        loop = asyncio.get_running_loop()

        def flush_ready() -> None:
            """Journal every finished unit at the head of the window, in input order, in one write."""
            journal_lines, data_lines = [], []
            while in_flight and in_flight[0][2].done():
                seq, unit, task, digest = in_flight.popleft()
                records = task.result()
                method_names = [self._method_of(r) for r in records]
                journal_lines += [{**r.to_candidate(), "unit": unit.id, "unit_seq": seq, "unit_records": len(records),
                                   "unit_hash": digest, "method": m}
                                  for r, m in zip(records, method_names)]
                kept = [self._output_line(r, m) for r, m in zip(records, method_names) if r.alive]
                data_lines += kept
                self.progress["units"] += 1
                self.progress["kept"] += len(kept)
                self.progress["dropped"] += len(records) - len(kept)
                bar.update(self.progress)
            if journal_lines:  # journal first: data.jsonl.partial is rebuilt from it on resume
                journal.write_lines(journal_lines)
            if data_lines:
                data.write_lines(data_lines)

        try:
            for seq, unit in enumerate(self.units()):
                digest = unit_digest(unit)  # before any stage touches the unit's fields
                if seq < n_done:
                    skipped_ids.update(digest.encode() + b"\n")
                    if seq == n_done - 1 and skipped_ids.hexdigest() != done_digest:
                        raise BtkitError(
                            f"{cfg.input} changed since {self.out} was started: its first {n_done} units are not the ones "
                            f"in the journal; pass --overwrite to start over or use another -o"
                        )
                    self.progress["skipped"] += 1
                    continue
                if unit.id != "extra" and not unit.alive:  # dropped while preparing: no task needed
                    done_unit = loop.create_future()
                    done_unit.set_result([unit])
                    in_flight.append((seq, unit, done_unit, digest))
                else:
                    in_flight.append((seq, unit, asyncio.ensure_future(self.process_unit(unit)), digest))
                if len(in_flight) >= window:
                    flush_ready()
                while len(in_flight) >= window:
                    await asyncio.wait([t for _, _, t, _ in in_flight], return_when=asyncio.FIRST_COMPLETED)
                    flush_ready()
            while in_flight:
                flush_ready()
                if in_flight:
                    await asyncio.wait([t for _, _, t, _ in in_flight], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for _, _, task, _ in in_flight:
                task.cancel()
            bar.close()
            journal.close()
            data.close()
            for backend in self._backends.values():
                await backend.aclose()
        self._apply_end_of_run()
        os.replace(self.out / "data.jsonl.partial", self.out / "data.jsonl")
        stats = self._write_failures(time.monotonic() - t0)
        atomic_write_json(self.out / "stats.json", stats)
        self.registry.hook.btkit_run_end(run=self, stats=stats)
        self.cache.close()
        return stats

    def _apply_end_of_run(self) -> None:
        """Let stages re-decide kept records with the whole run in view (``Stage.end_of_run``).

        Drops are written into the journal (rewritten to a temporary file, then renamed) and
        ``data.jsonl.partial`` is rebuilt from it, so stats, failures and a resumed run agree.
        """
        path = self.out / "candidates.jsonl"
        drops: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for stage in self.stages:
            decided = stage.end_of_run(lambda: read_journal(path, "unit_seq", "unit_records"))
            for rid, (reason, details) in (decided or {}).items():
                drops.setdefault(rid, (stage.label, reason, details))
        if not drops:
            return
        journal_tmp, data_tmp = self.out / ".candidates.rewrite", self.out / ".data.rebuild"
        journal_tmp.unlink(missing_ok=True)
        data_tmp.unlink(missing_ok=True)
        with _Closing(AppendFile(journal_tmp)) as journal, _Closing(AppendFile(data_tmp)) as data:
            lines, kept = [], []
            for line in read_journal(path, "unit_seq", "unit_records"):
                if line["status"] == "kept" and line["id"] in drops:
                    label, reason, details = drops[line["id"]]
                    line.update(status="dropped", dropped_at=label, reason=reason)
                    if details:
                        line.setdefault("meta", {}).setdefault("drop_details", {}).update(details)
                lines.append(line)
                if line["status"] == "kept":
                    kept.append(self._output_line(Record.from_candidate(line), line["method"]))
                if len(lines) >= 512:
                    journal.write_lines(lines)
                    data.write_lines(kept)
                    lines, kept = [], []
            journal.write_lines(lines)
            data.write_lines(kept)
        os.replace(journal_tmp, path)
        os.replace(data_tmp, self.out / "data.jsonl.partial")

    def _method_of(self, record: Record) -> str:
        """The method that shapes a kept record's data.jsonl line: the last stage's, unless set."""
        return record.meta.get("output_method") or self.config.stages[-1].method

    # -- stats -----------------------------------------------------------------------------
    def compute_stats(self, elapsed: float, failures: AppendFile | None = None) -> dict[str, Any]:
        """Stats are derived from the journal alone, so a resumed run reports the whole run.

        With ``failures``, the failed records' lines are written there in the same pass.
        """
        labels = [s.label for s in self.stages]
        per_stage = {l: {"in": 0, "out": 0, "dropped": collections.Counter(), "calls": 0, "cache_hits": 0,
                         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "parse_failures": collections.Counter(),
                         "parse_retries": 0, "parse_retries_recovered": 0} for l in labels}
        totals = collections.Counter()
        dropped_by_reason: collections.Counter = collections.Counter()
        current_unit, seen_steps = None, set()
        for line in read_journal(self.out / "candidates.jsonl", "unit_seq", "unit_records"):
            totals["records"] += 1
            totals[line["status"]] += 1
            unit_key = line.get("unit_seq", line["unit"])
            if unit_key != current_unit:
                current_unit, seen_steps = unit_key, set()
                totals["units"] += 1
            if line["status"] == "dropped":
                dropped_by_reason[f"{line['dropped_at']}:{line['reason']}"] += 1
                if failures is not None and line["reason"] in ("backend_error", "stage_error"):
                    details = line.get("meta", {}).get("drop_details", {})
                    failures.write_lines([{"id": line["id"], "stage": line["dropped_at"], "reason": line["reason"], **details}])
            for label in labels:
                if line.get("meta", {}).get("source") == "seed":
                    break
                st = per_stage[label]
                st["in"] += 1
                if line["dropped_at"] == label:
                    st["dropped"][line["reason"]] += 1
                    break
                st["out"] += 1
            for step in line.get("lineage", []):
                if step.get("step") in seen_steps or step.get("stage") not in per_stage:
                    continue
                seen_steps.add(step.get("step"))
                st = per_stage[step["stage"]]
                if step.get("request", step.get("step")) == step.get("step"):  # one choice of an n>1 request counts no call
                    st["calls"] += 1
                    st["cache_hits"] += bool(step.get("cached"))
                toks = step.get("tokens") or [0, 0]
                st["tokens_in"] += toks[0]
                st["tokens_out"] += toks[1]
                st["cost_usd"] += float(step.get("cost") or 0.0)
                if step.get("parse_error"):
                    st["parse_failures"][step["parse_error"]] += 1
                if step.get("attempt"):
                    st["parse_retries"] += 1
                    st["parse_retries_recovered"] += "parsed" in step
        previous = {}
        try:
            previous = json.loads((self.out / "stats.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        for st in per_stage.values():
            st["dropped"] = dict(st["dropped"])
            st["parse_failures_total"] = sum(st["parse_failures"].values())
            st["parse_failures"] = dict(st["parse_failures"])
        return {
            "status": "complete",
            "btkit": __version__,
            "input": str(self.config.input),
            "model": self.config.model,
            "stages": per_stage,
            "units": totals["units"],
            "records": totals["records"],
            "kept": totals["kept"],
            "dropped": totals["dropped"],
            "dropped_by_reason": dict(dropped_by_reason),
            "parse_failures": sum(s["parse_failures_total"] for s in per_stage.values()),
            "parse_failures_by_reason": dict(sum((collections.Counter(s["parse_failures"]) for s in per_stage.values()), collections.Counter())),
            "parse_retries": sum(s["parse_retries"] for s in per_stage.values()),
            "input_lines_with_replaced_text": self.input_counts.get("replaced_lines", 0),
            "backend_failures": sum(v for k, v in dropped_by_reason.items() if k.endswith(":backend_error")),
            "tokens_in": sum(s["tokens_in"] for s in per_stage.values()),
            "tokens_out": sum(s["tokens_out"] for s in per_stage.values()),
            "calls": sum(s["calls"] for s in per_stage.values()),
            "cost_usd": round(sum(s["cost_usd"] for s in per_stage.values()), 6),
            "cache_hits_this_invocation": self.cache.hits,
            "model_calls_this_invocation": self.cache.misses,
            "units_resumed": self.progress["skipped"],
            "wall_time_s": round(elapsed + float(previous.get("wall_time_s", 0) if previous.get("status") != "complete" else 0), 3),
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
    """The command line for run.json with credential-like values masked (``-B api_key=sk-...``)."""
    import re

    return [re.sub(r"(?i)((?:key|token|secret|password)[\w-]*=).*", r"\1***", a) for a in argv]


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


def _take(it, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


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
    choices = (value.get("extra") or {}).get("choices")
    texts = [c.get("text") for c in choices if isinstance(c, dict)] if isinstance(choices, list) else [value.get("text")]
    return any(t and t.strip() for t in texts)


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


class _progress:
    """A tqdm bar on a terminal; silent when quiet or when stderr is not a TTY."""

    def __init__(self, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc="units", unit="unit", dynamic_ncols=True, file=sys.stderr)

    def update(self, progress: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(progress_text(progress), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_pipeline(config: RunConfig, registry: Registry) -> dict[str, Any]:
    """Run synchronously (the CLI's entry point into the async engine)."""
    return asyncio.run(Run(config, registry).execute())
