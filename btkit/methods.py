"""The method interface: a method is data (stages, templates, options) plus plain functions.

A method plugin registers a :class:`Method`. Each of its stages is a :class:`Stage` whose
``process(record, ctx)`` turns one record into zero or more records, calling models only through
``ctx`` (which renders templates, caches, counts tokens and records lineage). Most LLM stages are
"render a template, call the model, parse the reply, filter": :meth:`StageContext.complete` and a
parse function returning fields or raising :class:`ParseError` keep those parts testable without a
model (golden prompt tests, parser tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import click

from .backends import SAMPLING_KEYS
from .errors import BtkitError
from .records import Record

#: What a stage does (``StageInfo.kind``, ``Stage.kind``): ``btkit methods`` shows it, eval-judge takes
#: ``curate`` stages; checked when a method registers.
STAGE_KINDS = ("prepare", "augment", "curate", "rewrite", "constrain")


class ParseError(ValueError):
    """A completion that could not be parsed. Recorded with the raw text and counted; never guessed."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StageContext(Protocol):
    """What a stage may use while processing a record (implemented by the engine's ``StageCtx``).

    Every model call goes through here: it is rendered from a template, cached by content, shared
    with an identical call in flight, and recorded as a lineage step on ``record``.
    """

    run: Any
    stage: "Stage"
    record: Record

    async def complete(self, template: str, variables: dict[str, Any], *, parse: Callable[[str | None], Any] | None = None,
                       retries: int | None = None, accept_truncated: bool = False, **params: Any) -> Any:
        """A chat completion (:class:`btkit.backends.Completion`). With ``parse`` (text -> value, raising
        :class:`ParseError`), the completion carries ``parsed`` or ``parse_error``; a failed parse is
        re-sampled up to ``retries`` times (default: the stage's ``parse_retries``); a reply cut at
        max tokens is a ``truncated`` failure unless ``accept_truncated``. A failed call raises
        :class:`btkit.errors.BackendError`."""
        ...

    async def complete_choices(self, template: str, variables: dict[str, Any], records: list[Record], *,
                               parse: Callable[[str | None], Any], retries: int | None = None, **params: Any) -> list[Any]:
        """``len(records)`` sampled completions of one prompt, choice i's lineage on ``records[i]``: one
        request with ``n`` where the backend samples several, else one request per record (seeds
        ``seed + i``). A failed call comes back as its exception, so one failure never takes its siblings."""
        ...

    async def next_token_logprobs(self, template: str, variables: dict[str, Any], candidates: list[str]) -> dict[str, float]:
        """Log-probabilities of ``candidates`` as the next token after the template's assistant prefix."""
        ...

    async def score_continuation(self, template: str | None, variables: dict[str, Any], continuation: str, *,
                                 end_of_turn: bool = False) -> list[float]:
        """Per-token logprobs of ``continuation`` after the rendered template (None: unconditional);
        ``end_of_turn=True`` appends log P(end-of-turn token) (backends with ``END_OF_TURN``)."""
        ...

    def for_record(self, record: Record) -> "StageContext":
        """The same stage's context for another record (e.g. one of several candidates)."""
        ...

    def backend(self) -> Any: ...

    def count(self, key: str, n: int = 1) -> None: ...


class Stage:
    """One step of a method. ``options`` are this stage's settings (model, sampling, thresholds).

    ``templates`` lists the template names the stage renders and ``variables`` the names it passes
    to them, so undefined variables are caught before the first model call.
    """

    kind: str = "augment"
    templates: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    #: True when :meth:`end_of_run` may drop records that left this stage alive (e.g. keep the top
    #: P%): the engine then holds them before the next stage until the cut is known, so no later
    #: call is spent on a record the cut drops (see ``Run.hold_index``).
    cuts_at_end: bool = False

    def __init__(self, method: str, name: str, options: dict[str, Any] | None = None):
        self.method = method
        self.name = name
        self.options = dict(options or {})

    @property
    def label(self) -> str:
        return f"{self.method}.{self.name}"

    @property
    def model(self) -> str | None:
        """Model spec for this stage; None means the run's default model."""
        return self.options.get("model")

    def sampling(self, **defaults: Any) -> dict[str, Any]:
        """Sampling parameters: the method's defaults overridden by the stage's options."""
        params = dict(defaults)
        for key in SAMPLING_KEYS:
            if key != "n" and self.options.get(key) is not None:  # n is a call's shape (complete_choices), not a setting
                params[key] = self.options[key]
        return params

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "templates": list(self.templates)}

    def calls_per_record(self, options: dict[str, Any]) -> float:
        """How many model calls this stage makes per record it gets, on average: what ``--dry-run``
        multiplies the records reaching the stage by (``options`` are the stage's options). An
        estimate; the default, 1, is right for a stage that makes one call per record. Override it
        in a stage that makes several (candidates, rounds, one check per constraint)."""
        return 1.0

    async def process(self, record: Record, ctx: StageContext) -> list[Record]:
        raise NotImplementedError

    def announce(self, backend: Any) -> str | None:
        """A line for the run's output about a choice this stage made for ``backend`` (e.g. what
        ``--judge-mode auto`` picked and why), printed once when the run starts; None: nothing to say."""
        return None

    def check_backend(self, backend: Any) -> None:
        """Called once per run with this stage's backend, before any model call.

        Raise :class:`btkit.errors.CapabilityError` (``backend.require(...)``) when the stage
        cannot work with it, so a run stops before paying for earlier stages' calls.
        """

    def end_of_run(self, journal: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Decisions that need the whole run in view (e.g. keep the top P% by score).

        Called after every unit finished, before ``data.jsonl`` is published (again on a resumed
        run, so it must be deterministic given the journal). ``journal()`` iterates the
        ``candidates.jsonl`` lines. Returns ``{btkit.records.journal_key(line): (reason, details)}``
        for kept records to drop now; the engine marks them dropped at this stage in the journal, and stats and
        ``data.jsonl`` follow. Default: no decisions.
        """
        return {}


@dataclass
class StageInfo:
    """What ``btkit methods`` shows for a stage."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    description: str = ""


@dataclass
class Method:
    """A registered method. Subclass or instantiate with callables.

    - ``prepare(records, options)`` turns raw input rows into work units (segmentation, dedup);
      it runs sequentially and must be deterministic so a resumed run sees the same units.
    - ``build_stage(name, options)`` makes a :class:`Stage` (by default from ``stage_classes``).
    - ``to_output(record)`` shapes a kept record into a ``data.jsonl`` line.
    """

    name: str
    description: str
    paper: str = ""
    stages: list[StageInfo] = field(default_factory=list)
    default_stages: tuple[str, ...] = ()
    prompts_dir: Path | None = None
    cli_options: list[Any] = field(default_factory=list)
    version: str = ""
    #: Fields every unit has when it leaves :meth:`prepare` (``btkit run PIPELINE --check`` starts
    #: from these when this method's stage comes first).
    unit_fields: tuple[str, ...] = ("text",)
    #: The :class:`Stage` class of each stage name; the default :meth:`build_stage` makes them.
    stage_classes: dict[str, type[Stage]] = field(default_factory=dict)

    def option_defaults(self) -> dict[str, Any]:
        """Each of ``cli_options``' default by option name: the one place a method's defaults are declared.

        The engine lays these under a stage's options, so a stage built from a pipeline file (which
        names only what it changes) sees the same values as ``btkit run METHOD``."""
        ctx = click.Context(click.Command(self.name))
        unset = getattr(click.core, "UNSET", None)  # click 8.2+: "no default given" (truthy, never a value)
        out: dict[str, Any] = {}
        for opt in self.cli_options:
            name = getattr(opt, "name", None)
            if not name:
                continue
            default = opt.get_default(ctx, call=True) if isinstance(opt, click.Parameter) else getattr(opt, "default", None)
            if default is unset or default is None:
                default = [] if getattr(opt, "multiple", False) else None
            out[name] = list(default) if isinstance(default, tuple) else default
        return out

    def stage_with_defaults(self, name: str, options: dict[str, Any]) -> Stage:
        """:meth:`build_stage` with :meth:`option_defaults` under ``options`` (what the engine calls).

        An option given as None (``threshold: null`` in a pipeline file) keeps its default."""
        given = {k: v for k, v in options.items() if v is not None}
        return self.build_stage(name, {**self.option_defaults(), **given})

    def prepare(self, rows: Iterable[dict[str, Any]], options: dict[str, Any]) -> Iterator[Record]:
        raise NotImplementedError

    def build_stage(self, name: str, options: dict[str, Any]) -> Stage:
        """``stage_classes[name](method, name, options)``; override for a stage made another way."""
        cls = self.stage_classes.get(name)
        if cls is None:
            raise BtkitError(f"method '{self.name}' has no stage '{name}'; its stages: {', '.join(s.name for s in self.stages)}")
        return cls(self.name, name, options)

    def extra_records(self, options: dict[str, Any]) -> Iterator[Record]:
        """Records written to the output without passing through stages (e.g. seed pairs)."""
        return iter(())

    def to_output(self, record: Record) -> dict[str, Any]:
        f = record.fields
        return {
            "instruction": f.get("instruction", ""),
            "response": f.get("response", ""),
            "system": f.get("system", ""),
            "meta": {
                "id": record.id,
                "source_id": record.source_id,
                "method": self.name,
                **{k: v for k, v in record.meta.items() if k != "drop_details"},
                "lineage": record.lineage,
            },
        }


__all__ = ["STAGE_KINDS", "ParseError", "StageContext", "Stage", "StageInfo", "Method"]
