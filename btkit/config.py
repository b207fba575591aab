"""What a run is: :class:`RunConfig` and its :class:`StageSpec` list, and the one checker of option values.

Both ways to start a run build their configuration here: ``btkit run METHOD`` (the method's default
stages, ``-S STAGE.KEY=VALUE`` per stage) and ``btkit run PIPELINE.yaml`` (the file's stages, see
:mod:`btkit.pipeline`), as does ``btkit eval-judge``. :func:`run_config` is the only place a
:class:`RunConfig` is made, so the run-wide settings mean the same and default the same everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from . import DEFAULT_MODEL
from .errors import BtkitError
from .options import DEFAULT_CONCURRENCY, GENERAL_OPTIONS


class ConfigError(BtkitError):
    """A bad option value: one line naming the file (or ``--stage-option``) and the key."""

    def __init__(self, path: Path, where: str, message: str):
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


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
    """Everything a :class:`btkit.engine.Run` needs; made by :func:`run_config`."""

    input: Path
    out_dir: Path
    stages: list[StageSpec]
    model: str = DEFAULT_MODEL
    options: dict[str, Any] = field(default_factory=dict)  # run-wide options every stage sees
    backend_options: dict[str, Any] = field(default_factory=dict)
    prompt_overrides: list[Path] = field(default_factory=list)
    concurrency: int = DEFAULT_CONCURRENCY
    limit: int | None = None
    quiet: bool = False
    cache_path: Path | None = None
    use_cache: bool = True
    overwrite: bool = False
    #: ``(K, N)``: this run is shard K of N (``--shards N --shard K``, see :mod:`btkit.shards`); None: the whole input.
    shard: tuple[int, int] | None = None
    #: The command line run.json records (credentials masked); None: this process's own. A shard run
    #: started by an executor records the driver's command, and a merge the shards' command.
    command: list[str] | None = None
    #: Seconds between one-line status reports when stderr is not a terminal (0: none); $BTKIT_STATUS_EVERY.
    status_every: float = field(default_factory=lambda: float(os.environ.get("BTKIT_STATUS_EVERY") or 30))
    #: Stop the run when this many calls to one backend fail in a row ...
    max_failures_in_a_row: int = 10
    #: ... or when, after this many calls, more than this share of all calls failed.
    min_calls_for_share: int = 50
    max_failure_share: float = 0.5


def run_config(stages: list[StageSpec], *, input: Path, out_dir: Path, model: str | None = None,
               every_stage: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
               backend_options: dict[str, Any] | None = None, base_url: str | None = None,
               prompt_overrides: list[Path] | tuple[Path, ...] = (), concurrency: int | None = None,
               limit: int | None = None, quiet: bool = False, cache_path: Path | None = None,
               use_cache: bool = True, overwrite: bool = False) -> RunConfig:
    """The one way to make a :class:`RunConfig`.

    ``model`` is the default of stages that name none; ``every_stage`` sets keys on every stage,
    over what a stage names itself (the command line's ``--model`` for a pipeline file, say);
    ``base_url`` goes to every backend (and to every stage that names no other); ``None`` means
    the default for every setting.
    """
    backend_options = dict(backend_options or {})
    if base_url:
        backend_options["base_url"] = base_url
    for spec in stages:
        spec.options.update({k: v for k, v in (every_stage or {}).items() if v is not None})
    return RunConfig(input=Path(input), out_dir=Path(out_dir), stages=stages, model=model or DEFAULT_MODEL,
                     options={k: v for k, v in (options or {}).items() if v is not None},
                     backend_options=backend_options, prompt_overrides=[Path(p) for p in prompt_overrides],
                     concurrency=DEFAULT_CONCURRENCY if concurrency is None else concurrency, limit=limit,
                     quiet=bool(quiet), cache_path=Path(cache_path) if cache_path else None, use_cache=use_cache,
                     overwrite=bool(overwrite))


def method_stage_specs(registry: Any, method: Any, items: tuple[str, ...] | list[str]) -> list[StageSpec]:
    """The stages ``btkit run METHOD`` runs, with ``-S STAGE.KEY=VALUE`` options checked as a pipeline
    file's stage keys are (sampling, parse retries, the method's own options, ``model``, ``base_url``, ``prompts``)."""
    names = list(method.default_stages)
    raw: dict[str, dict[str, Any]] = {name: {"use": f"{method.name}.{name}"} for name in names}
    for item in items:
        dotted, value = parse_key_value(item, "--stage-option")
        stage, sep, key = dotted.partition(".")
        if not sep or not key or key == "use":
            raise BtkitError(f"--stage-option expects STAGE.KEY=VALUE (e.g. curate.temperature=0), got '{item}'")
        if stage not in raw:
            raise BtkitError(f"--stage-option {item}: method '{method.name}' runs no stage '{stage}'; its stages: {', '.join(names)}")
        raw[stage][key] = value
    check = OptionChecker(Path("--stage-option"), registry)  # relative paths resolve against the working directory
    return [check.stage(raw[name], i, where=name) for i, name in enumerate(names)]


def parse_key_value(item: str, option: str) -> tuple[str, Any]:
    """``KEY=VALUE``; a value that parses as JSON (number, true, list) is converted."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BtkitError(f"{option} expects KEY=VALUE, got '{item}'")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_key_values(items: tuple[str, ...] | list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict (see :func:`parse_key_value`)."""
    return dict(parse_key_value(item, option) for item in items)


class OptionChecker:
    """Checks and converts option values against what each method accepts; paths resolve against ``path``'s folder.

    One checker for pipeline files and ``-S STAGE.KEY=VALUE``, so a value is checked the same way
    wherever it is given (with the types of :mod:`btkit.options` and of the method's click options)."""

    def __init__(self, path: Path, registry: Any):
        self.path = path
        self.base = path.resolve().parent
        self.registry = registry

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(self.path, where, message)

    def resolve(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a path, got {value!r}")
        p = Path(value).expanduser()
        return os.path.normpath(p if p.is_absolute() else self.base / p)

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def paths(self, value: Any, where: str) -> list[Path]:
        items = value if isinstance(value, list) else [value]
        return [Path(self.resolve(v, f"{where}[{i}]" if isinstance(value, list) else where)) for i, v in enumerate(items)]

    def method_options(self, method: Any) -> dict[str, click.Option]:
        """A method's options by the name of their long flag (``--seed`` -> ``seed``) and by their own name."""
        found: dict[str, click.Option] = {}
        for opt in method.cli_options:
            if isinstance(opt, click.Option) and opt.name:
                for flag in opt.opts:
                    if flag.startswith("--"):
                        found.setdefault(flag[2:].replace("-", "_"), opt)
                found.setdefault(opt.name, opt)
        return found

    def convert(self, key: str, value: Any, where: str, option: click.Option | None, ptype: click.ParamType | None = None) -> Any:
        """Check one option value with its CLI option's type (paths resolved first)."""
        if value is None:
            return None
        ptype = ptype or (option.type if option is not None else click.STRING)
        try:
            if option is not None and option.is_flag:
                if not isinstance(value, bool):
                    raise self.fail(where, f"expected true or false, got {value!r}")
                return value
            if option is not None and option.multiple:
                items = value if isinstance(value, list) else [value]
                return [self.convert(key, v, f"{where}[{i}]", None, ptype) for i, v in enumerate(items)]
            if isinstance(ptype, click.Path):
                value = self.resolve(value, where)
            if isinstance(ptype, (click.types.IntParamType, click.types.FloatParamType)) and isinstance(value, (bool, str)):
                raise self.fail(where, f"expected a number, got {value!r}")
            if isinstance(ptype, click.types.IntParamType) and isinstance(value, float) and not value.is_integer():
                raise self.fail(where, f"expected a whole number, got {value!r}")  # click would truncate 2.5 to 2
            if isinstance(ptype, (click.types.StringParamType, click.Choice, click.Path)) and isinstance(value, (list, dict)):
                raise self.fail(where, f"expected a single value, got {type(value).__name__}")
            converted = ptype.convert(value, option, None)
            return str(converted) if isinstance(converted, Path) else converted
        except click.BadParameter as e:
            raise self.fail(where, e.message) from None

    def stage_option(self, key: str, value: Any, where: str, methods: list[Any]) -> tuple[str, Any]:
        """Convert ``key`` for the first of ``methods`` that accepts it; fail naming what is known."""
        name = key.replace("-", "_")
        if name == "sample_seed":  # the sampling seed (CLI --sample-seed); a method's "seed" is its own option
            return "seed", self.convert(name, value, where, None, click.INT)
        if name in GENERAL_OPTIONS:
            return name, self.convert(name, value, where, None, GENERAL_OPTIONS[name])
        if name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(where, "expected a string or a list of strings")
            return name, value
        for method in methods:
            opt = self.method_options(method).get(name)
            if opt is not None:
                return opt.name, self.convert(name, value, where, opt)
        known = sorted(set(GENERAL_OPTIONS) | {"stop", "sample_seed"} | {n for m in methods for n, o in self.method_options(m).items() if _flag_name(n, o)})
        raise self.fail(where, f"unknown key '{key}'; known: {', '.join(known)}")

    def stage(self, raw: Any, i: int, where: str | None = None) -> Any:
        """One stage mapping (``use: METHOD.STAGE`` and its keys) -> StageSpec; ``where`` names it in errors."""
        where = where or f"stages[{i}]"
        if isinstance(raw, str):
            raw = {"use": raw}
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected a mapping with 'use: METHOD.STAGE', got {type(raw).__name__}")
        use = raw.get("use")
        if not isinstance(use, str) or "." not in use:
            raise self.fail(f"{where}.use", f"expected METHOD.STAGE (e.g. humpback.augment), got {use!r}")
        method_name, _, stage_name = use.partition(".")
        try:
            method = self.registry.method(method_name)
        except BtkitError as e:
            raise self.fail(f"{where}.use", str(e)) from None
        stages = [s.name for s in method.stages]
        if stage_name not in stages:
            raise self.fail(f"{where}.use", f"method '{method_name}' has no stage '{stage_name}'; its stages: {', '.join(stages)}")
        options: dict[str, Any] = {}
        stage_prompts: list[Path] = []
        for key, value in raw.items():
            at = f"{where}.{key}"
            if key == "use":
                continue
            if key in ("model", "base_url"):
                options[key] = self.string(value, at)
            elif key == "prompts":
                stage_prompts.extend(self.paths(value, at))
            else:
                name, converted = self.stage_option(str(key), value, f"{where}.{key} ({use})", [method])
                options[name] = converted
        return StageSpec(method_name, stage_name, options, prompt_overrides=stage_prompts)


def _flag_name(name: str, opt: click.Option) -> bool:
    """Whether ``name`` is how a pipeline file should write ``opt``: its long flag, else its own name."""
    flags = [f[2:].replace("-", "_") for f in opt.opts if f.startswith("--")]
    return name in flags if flags else name == opt.name


__all__ = ["ConfigError", "OptionChecker", "RunConfig", "StageSpec", "method_stage_specs", "parse_key_value", "parse_key_values", "run_config"]
