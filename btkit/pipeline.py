"""Pipeline files: ``btkit run PIPELINE.yaml`` (or ``.toml``) composes stages of any methods.

A pipeline file names the input, the stages in order and the output::

    input: ../corpus.jsonl            # relative paths resolve against this file's folder
    output: ../../runs/chain
    model: llamacpp:default           # default model of every stage
    options: {min_words: 30}          # run-wide options every stage sees
    stages:
      - use: humpback.augment         # METHOD.STAGE, as `btkit methods` lists them
        temperature: 0.7              # sampling: temperature, top_p, max_tokens, repetition_penalty, stop, sample_seed
      - use: humpback.curate
        threshold: 4                  # the method's own options, named as its CLI options
      - use: backforth.rewrite
        model: openai:gpt-4o-mini     # a stage may use another model (and base_url)
        base_url: https://api.openai.com/v1

Other top-level keys: ``base_url``, ``backend_options`` (a mapping, like ``-B``), ``prompts``
(folders of ``<method>/<stage>.j2`` templates overriding the built-in ones by name; a stage may
name folders of its own, which serve that stage only and come before the run's),
``concurrency``, ``limit``, ``cache`` (a file, or ``false`` for none), ``name`` and
``description``. Every key is checked
against what the named method accepts and converted with the same types as its CLI options, so a
typo or a bad value stops the run with one line naming the file and the key, before any model call.

The stages of a unit run in order and records flow with their fields (``text``, ``instruction``,
``response``...), so a later stage sees what an earlier one wrote; the first stage's method reads
the input (``prepare``) and the last stage's method shapes each ``data.jsonl`` line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from . import DEFAULT_MODEL
from .errors import BtkitError
from .options import CONCURRENCY, GENERAL_OPTIONS, LIMIT, MAX_TOKENS

TOP_KEYS = ("name", "description", "input", "output", "model", "base_url", "backend_options", "options", "prompts",
            "concurrency", "limit", "cache", "stages")


class PipelineError(BtkitError):
    """A bad pipeline file: one line naming the file and the key."""

    def __init__(self, path: Path, where: str, message: str):
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


# -- reading ---------------------------------------------------------------------------------
def read_pipeline_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping (YAML via pyyaml, TOML via tomllib); errors name the line."""
    if not path.exists():
        raise PipelineError(path, "", "file not found")
    if path.is_dir():
        raise PipelineError(path, "", "is a directory, expected a .yaml or .toml pipeline file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        data = _read_toml(path, text)
    else:
        data = _read_yaml(path, text)
    if data is None:
        raise PipelineError(path, "", "the file is empty; a pipeline needs at least 'input' and 'stages'")
    if not isinstance(data, dict):
        raise PipelineError(path, "", f"expected a mapping of keys (input, stages, ...), got {type(data).__name__}")
    return data


def _read_toml(path: Path, text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise PipelineError(path, "", "TOML pipeline files need Python 3.11+ (or: pip install tomli); YAML works everywhere") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PipelineError(path, "", f"not valid TOML ({e})") from None


def _read_yaml(path: Path, text: str) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """A safe loader that refuses a key given twice (YAML would silently keep the last)."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise PipelineError(path, f"line {key_node.start_mark.line + 1}", f"key '{key}' is given twice")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        if "mapping values are not allowed" in problem:
            problem += '; quote a value that holds ": " or ends with ":", e.g. model: "vllm:"'
        raise PipelineError(path, where, f"not valid YAML ({problem})") from None


# -- checking --------------------------------------------------------------------------------
class _Checker:
    """Validates and converts keys against what each method accepts; paths resolve against ``base``."""

    def __init__(self, path: Path, registry: Any):
        self.path = path
        self.base = path.resolve().parent
        self.registry = registry

    def fail(self, where: str, message: str) -> PipelineError:
        return PipelineError(self.path, where, message)

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
        from .engine import StageSpec

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


def load_pipeline(path: str | Path, registry: Any, overrides: dict[str, Any] | None = None) -> Any:
    """Read, check and turn a pipeline file into a :class:`btkit.engine.RunConfig`.

    ``overrides`` (from the command line) may set ``out_dir``, ``input``, ``model`` (every stage's),
    ``base_url`` (every stage's), ``limit``, ``quiet``, ``overwrite``, ``concurrency``, ``max_tokens``
    (every stage's), ``cache_path``, ``no_cache``, ``backend_options`` and ``prompts`` (folders that
    come before the file's).
    """
    from .engine import RunConfig

    path = Path(path)
    o = {k: v for k, v in (overrides or {}).items() if not (v is None or v is False or (isinstance(v, (tuple, list)) and not v))}
    data = read_pipeline_file(path)
    check = _Checker(path, registry)
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise check.fail(str(unknown[0]), f"unknown key; known keys: {', '.join(TOP_KEYS)}")

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise check.fail("stages", "expected a non-empty list of stages (- use: METHOD.STAGE)")
    prompt_dirs: list[Path] = [Path(p) for p in o.get("prompts", ())]
    if data.get("prompts") is not None:
        prompt_dirs.extend(check.paths(data["prompts"], "prompts"))
    specs = [check.stage(raw, i) for i, raw in enumerate(raw_stages)]
    methods = [registry.method(s.method) for s in specs]

    run_options: dict[str, Any] = {}
    if data.get("options") is not None:
        if not isinstance(data["options"], dict):
            raise check.fail("options", "expected a mapping of run-wide options")
        for key, value in data["options"].items():
            name, converted = check.stage_option(str(key), value, f"options.{key}", methods)
            run_options[name] = converted

    backend_options: dict[str, Any] = {}
    if data.get("backend_options") is not None:
        if not isinstance(data["backend_options"], dict):
            raise check.fail("backend_options", "expected a mapping (e.g. {timeout: 60, n_ctx: 8192})")
        backend_options.update(data["backend_options"])
    backend_options.update(o.get("backend_options", {}))
    base_url = o.get("base_url") or (check.string(data["base_url"], "base_url") if data.get("base_url") is not None else None)
    if base_url:
        backend_options["base_url"] = base_url

    if "input" in o:
        input_path = Path(o["input"])
    elif data.get("input") is not None:
        input_path = Path(check.resolve(data["input"], "input"))
    else:
        raise check.fail("input", "missing: name the input JSONL file (or pass --input)")
    if "out_dir" in o:
        out_dir = Path(o["out_dir"])
    elif data.get("output") is not None:
        out_dir = Path(check.resolve(data["output"], "output"))
    else:
        raise check.fail("output", "missing: name the run directory (or pass -o/--out)")

    model = o.get("model") or (check.string(data["model"], "model") if data.get("model") is not None else DEFAULT_MODEL)
    for spec in specs:
        if o.get("model"):
            spec.options["model"] = o["model"]
        if o.get("base_url"):
            spec.options["base_url"] = o["base_url"]
        if "max_tokens" in o:
            spec.options["max_tokens"] = o["max_tokens"]

    cache_path, use_cache = None, not o.get("no_cache")
    cache = data.get("cache")
    if cache is False:
        use_cache = False
    elif cache is not None and cache is not True:
        cache_path = Path(check.resolve(cache, "cache"))
    if o.get("cache_path"):
        cache_path = Path(o["cache_path"])

    return RunConfig(
        input=input_path,
        out_dir=out_dir,
        stages=specs,
        model=model,
        options=run_options,
        backend_options=backend_options,
        prompt_overrides=prompt_dirs,
        concurrency=o["concurrency"] if "concurrency" in o else (check.convert("concurrency", data["concurrency"], "concurrency", None, CONCURRENCY) if data.get("concurrency") is not None else 8),
        limit=o["limit"] if "limit" in o else (check.convert("limit", data["limit"], "limit", None, LIMIT) if data.get("limit") is not None else None),
        quiet=bool(o.get("quiet")),
        cache_path=cache_path,
        use_cache=use_cache,
        overwrite=bool(o.get("overwrite")),
    )


def describe(config: Any) -> str:
    """What a pipeline will run, one stage per line (``--check``)."""
    from .backends import public_url

    lines = [f"input:  {config.input}", f"output: {config.out_dir}", f"model:  {config.model}"]
    for i, s in enumerate(config.stages):
        opts = {k: v for k, v in s.options.items() if k not in ("model", "base_url")}
        model = s.options.get("model") or config.model
        extra = f" @ {public_url(str(s.options['base_url']))}" if s.options.get("base_url") else ""
        lines.append(f"  {i + 1}. {s.method}.{s.stage}  [{model}{extra}]  {opts if opts else ''}".rstrip())
    return "\n".join(lines)


# -- command ---------------------------------------------------------------------------------
PIPELINE_OPTIONS = [
    click.Option(["-o", "--out", "out_dir"], type=click.Path(file_okay=False, path_type=Path), default=None, help="Run directory (overrides the file's 'output')."),
    click.Option(["--input"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Input JSONL (overrides the file's 'input')."),
    click.Option(["--model"], default=None, help="Model spec for every stage (overrides the file's model lines)."),
    click.Option(["--base-url"], default=None, help="Endpoint for remote backends, for every stage (default for openai:/vllm: OPENAI_BASE_URL)."),
    click.Option(["--limit"], type=LIMIT, default=None, help="Read at most N input records."),
    click.Option(["--max-tokens"], type=MAX_TOKENS, default=None, help="Completion length cap for every stage."),
    click.Option(["--concurrency"], type=CONCURRENCY, default=None, help="Model calls in flight."),
    click.Option(["--prompts", "prompts"], multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of <method>/<stage>.j2 overrides (before the file's)."),
    click.Option(["-B", "--backend-option", "backend_option"], multiple=True, metavar="KEY=VALUE", help="Backend option for every backend."),
    click.Option(["--no-cache"], is_flag=True, help="Do not read or write the model-call cache."),
    click.Option(["--cache", "cache_path"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file."),
    click.Option(["--overwrite"], is_flag=True, help="Start over in a run directory that holds a run with other settings."),
    click.Option(["-q", "--quiet"], is_flag=True, help="No progress bar."),
    click.Option(["--check"], is_flag=True, help="Check the file and print the stages it would run; no model calls."),
]


def pipeline_command(name: str) -> click.Command:
    """The click command behind ``btkit run NAME.yaml|.yml|.toml``."""

    def callback(**params: Any) -> None:
        from .cli import _fail, _registry, parse_key_values, summarize
        from .engine import run_pipeline

        try:
            registry = _registry()
            overrides = dict(params)
            overrides["backend_options"] = parse_key_values(overrides.pop("backend_option"), "--backend-option")
            overrides["base_url"] = overrides.get("base_url") or None
            config = load_pipeline(name, registry, overrides)
            if params["check"]:
                click.echo(describe(config))
                return
            stats = run_pipeline(config, registry)
        except BtkitError as e:
            _fail(e)
        click.echo(summarize(stats, config.out_dir), err=True)

    return click.Command(name, params=list(PIPELINE_OPTIONS), callback=callback,
                         help=f"Run the pipeline file {name} (stages, models and options as the file names them).")


__all__ = ["load_pipeline", "pipeline_command", "read_pipeline_file", "PipelineError", "describe"]
