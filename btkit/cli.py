"""The ``btkit`` command line. Kept import-light: nothing heavy loads for ``--help``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import DEFAULT_MODEL, __version__
from .errors import BtkitError
from .options import CONCURRENCY, GENERAL_OPTIONS, LIMIT

COMMON_RUN_OPTIONS = [
    click.Option(["-o", "--out", "out_dir"], required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory (created; re-running the same command resumes it)."),
    click.Option(["--model", "model"], default=None, help=f"Model spec, e.g. llamacpp:PATH.gguf, openai:NAME, vllm:NAME. Default: the embedded SmolLM2-135M ({DEFAULT_MODEL})."),
    click.Option(["--base-url"], default=None, help="Endpoint for remote backends (default for openai:/vllm: OPENAI_BASE_URL)."),
    click.Option(["--limit"], type=LIMIT, default=None, help="Read at most N input records."),
    click.Option(["--text-field"], default="text", show_default=True, help="Input field holding the document text."),
    click.Option(["--id-field"], default="id", show_default=True, help="Input field holding a stable document id (line number if absent)."),
    click.Option(["--encoding-errors"], type=click.Choice(["strict", "replace"]), default="strict", show_default=True, help="Input bytes that are not UTF-8: stop with the line number, or replace them with U+FFFD (counted in stats.json)."),
    click.Option(["--prompts", "prompts_dir"], multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of <method>/<stage>.j2 templates overriding the built-in ones."),
    click.Option(["--concurrency"], type=CONCURRENCY, default=8, show_default=True, help="Model calls in flight (local llama.cpp runs one at a time)."),
    click.Option(["--temperature"], type=GENERAL_OPTIONS["temperature"], default=None, help="Sampling temperature for every stage (default: each method's own)."),
    click.Option(["--top-p"], type=GENERAL_OPTIONS["top_p"], default=None, help="Nucleus sampling for every stage."),
    click.Option(["--max-tokens"], type=GENERAL_OPTIONS["max_tokens"], default=None, help="Completion length cap for every stage."),
    click.Option(["--sample-seed", "sample_seed"], type=int, default=None, help="Sampling seed (part of the cache key)."),
    click.Option(["--stop"], multiple=True, help="Stop string for every stage (repeat for several)."),
    click.Option(["-S", "--stage-option", "stage_option"], multiple=True, metavar="STAGE.KEY=VALUE", help="An option for one stage only, e.g. -S curate.temperature=0 -S augment.max_tokens=64 (sampling keys, parse_retries, or the method's own options)."),
    click.Option(["--parse-retries", "parse_retries"], type=GENERAL_OPTIONS["parse_retries"], default=None, help="Re-sample an unparseable reply with another seed up to N times (default 0: a failure is recorded, not retried)."),
    click.Option(["-B", "--backend-option", "backend_option"], multiple=True, metavar="KEY=VALUE", help="Backend option passed to every backend (e.g. -B timeout=60 -B max_retries=5 -B n_ctx=8192)."),
    click.Option(["--no-cache"], is_flag=True, help="Do not read or write the model-call cache."),
    click.Option(["--cache", "cache_path"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file (default ~/.cache/btkit/cache.sqlite or $BTKIT_CACHE_DIR)."),
    click.Option(["--overwrite"], is_flag=True, help="Start over in a run directory that holds a run with other settings (old files are moved aside, never deleted)."),
    click.Option(["-q", "--quiet"], is_flag=True, help="No progress bar."),
]


def _registry():
    from .plugins import get_registry

    return get_registry()


def _fail(e: BaseException) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(getattr(e, "exit_code", 2))


def run_method(method_name: str, input_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Build a one-method pipeline from CLI parameters and run it."""
    from .engine import RunConfig, run_pipeline

    registry = _registry()
    method = registry.method(method_name)
    sampling = {"temperature": params.pop("temperature"), "top_p": params.pop("top_p"),
                "max_tokens": params.pop("max_tokens"), "seed": params.pop("sample_seed"),
                "stop": list(params.pop("stop")) or None}
    stages = stage_specs(registry, method, params.pop("stage_option"))
    base_url = params.pop("base_url")  # OPENAI_BASE_URL is read by the backends that speak to such an endpoint, not here
    backend_options = parse_key_values(params.pop("backend_option"), "--backend-option")
    if base_url:
        backend_options["base_url"] = base_url
    config = RunConfig(
        input=input_path,
        out_dir=params.pop("out_dir"),
        stages=stages,
        model=params.pop("model") or DEFAULT_MODEL,
        options={**params, **{k: v for k, v in sampling.items() if v is not None}},
        backend_options=backend_options,
        prompt_overrides=list(params.pop("prompts_dir")),
        concurrency=params.pop("concurrency"),
        limit=params.pop("limit"),
        quiet=params.pop("quiet"),
        cache_path=params.pop("cache_path"),
        use_cache=not params.pop("no_cache"),
        overwrite=params.pop("overwrite"),
    )
    config.options = {k: v for k, v in config.options.items() if k not in ("prompts_dir", "concurrency", "limit", "quiet", "cache_path", "no_cache", "overwrite", "out_dir", "model", "base_url")}
    return run_pipeline(config, registry)


def stage_specs(registry: Any, method: Any, items: tuple[str, ...]) -> list[Any]:
    """The method's stages with ``-S STAGE.KEY=VALUE`` options, checked as a pipeline file's stage keys are
    (sampling, parse retries, the method's own options, ``model``, ``base_url``, ``prompts``)."""
    from .pipeline import _Checker

    names = list(method.default_stages)  # the stages `btkit run METHOD` runs
    raw: dict[str, dict[str, Any]] = {name: {"use": f"{method.name}.{name}"} for name in names}
    for item in items:
        dotted, value = parse_key_value(item, "--stage-option")
        stage, sep, key = dotted.partition(".")
        if not sep or not key or key == "use":
            raise BtkitError(f"--stage-option expects STAGE.KEY=VALUE (e.g. curate.temperature=0), got '{item}'")
        if stage not in raw:
            raise BtkitError(f"--stage-option {item}: method '{method.name}' runs no stage '{stage}'; its stages: {', '.join(names)}")
        raw[stage][key] = value
    check = _Checker(Path("--stage-option"), registry)  # relative paths resolve against the working directory
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


def parse_key_values(items: tuple[str, ...], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a dict (see :func:`parse_key_value`)."""
    return dict(parse_key_value(item, option) for item in items)


def summarize(stats: dict[str, Any], out_dir: Path) -> str:
    return (
        f"done: {stats['kept']} kept, {stats['dropped']} dropped from {stats['units']} units "
        f"({stats['parse_failures']} parse failures, {stats['backend_failures']} backend failures, "
        f"{stats['calls']} calls, {stats['tokens_in']}+{stats['tokens_out']} tokens) in {stats['this_invocation_s']:.1f}s -> {out_dir}/data.jsonl"
    )


class RunGroup(click.Group):
    """``btkit run METHOD ...``: one subcommand per registered method, built on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:
            return sorted(_registry().methods())
        except BtkitError:
            return []

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name.endswith((".yaml", ".yml", ".toml")):
            from .pipeline import pipeline_command  # noqa: F401  (pipeline files, see btkit/pipeline.py)

            return pipeline_command(name)
        try:
            method = _registry().method(name)
        except BtkitError as e:
            _fail(e)

        def callback(corpus: Path, **params: Any) -> None:
            out_dir = params["out_dir"]
            try:
                stats = run_method(name, corpus, params)
            except BtkitError as e:
                _fail(e)
            click.echo(summarize(stats, out_dir), err=True)

        params = [click.Argument(["corpus"], type=click.Path(path_type=Path))] + list(COMMON_RUN_OPTIONS) + list(method.cli_options)
        return click.Command(name, params=params, callback=callback, help=f"{method.description} {method.paper}".strip())


class PluginGroup(click.Group):
    """The top-level group; plugins add commands through ``btkit_register_commands``."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            try:
                _registry().hook.btkit_register_commands(cli=self)
            except BtkitError as e:
                click.echo(f"warning: {e}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, name)


@click.group(cls=PluginGroup)
@click.version_option(__version__, prog_name="btkit")
def cli() -> None:
    """btkit: turn unlabelled human-written text into instruction-tuning data (instruction backtranslation)."""


@cli.group(cls=RunGroup, name="run")
def run_cmd() -> None:
    """Run a method (btkit run humpback CORPUS.jsonl -o OUT) or a pipeline file."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins with their versions and hooks, and any that failed to load."""
    rows = _registry().plugin_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']:<16} {r['distribution']} {r['version']}  " + (f"FAILED: {r['error']}" if r["status"] == "failed" else f"[{r['hooks']}]"))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def methods(as_json: bool) -> None:
    """List methods: stages with their inputs and outputs, and the paper."""
    rows = []
    for m in sorted(_registry().methods().values(), key=lambda m: m.name):
        rows.append({"name": m.name, "description": m.description, "paper": m.paper, "version": m.version,
                     "default_stages": list(m.default_stages),
                     "stages": [{"name": s.name, "kind": s.kind, "inputs": list(s.inputs), "outputs": list(s.outputs), "description": s.description} for s in m.stages]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}  {r['description']}")
        if r["paper"]:
            click.echo(f"  paper: {r['paper']}")
        for s in r["stages"]:
            click.echo(f"  - {s['name']} ({s['kind']}): {', '.join(s['inputs'])} -> {', '.join(s['outputs'])}  {s['description']}")


@cli.command()
def backends() -> None:
    """List backend prefixes usable in --model."""
    for prefix, f in sorted(_registry().backends().items()):
        click.echo(f"{prefix + ':':<12} {f.description}  (plugin {f.plugin})")


@cli.group(invoke_without_command=True)
@click.option("--prompts", "prompts_dir", multiple=True, type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def prompts(ctx: click.Context, prompts_dir: tuple[Path, ...]) -> None:
    """List prompt templates (method/stage); `btkit prompts show NAME` prints one."""
    from .prompts import PromptLibrary

    try:
        ctx.obj = PromptLibrary(_registry().prompt_roots(), prompts_dir)
    except BtkitError as e:
        _fail(e)
    if ctx.invoked_subcommand is None:
        for name in ctx.obj.names():
            click.echo(f"{name:<28} {ctx.obj.path(name)}")


@prompts.command("show")
@click.argument("name")
@click.pass_obj
def prompts_show(lib: Any, name: str) -> None:
    """Print one template's source."""
    try:
        click.echo(lib.source(name), nl=False)
    except BtkitError as e:
        _fail(e)


@cli.group()
def cache() -> None:
    """Inspect or clear the model-call cache."""


@cache.command("stats")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def cache_stats(cache_path: Path | None) -> None:
    from .cache import Cache

    click.echo(json.dumps(Cache(cache_path).stats(), indent=2))


@cache.command("clear")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--yes", is_flag=True, help="Do not ask.")
def cache_clear(cache_path: Path | None, yes: bool) -> None:
    from .cache import Cache

    c = Cache(cache_path)
    if not yes:
        click.confirm(f"Delete all entries in {c.path}?", abort=True)
    click.echo(f"removed {c.clear()} entries from {c.path}")


def main() -> None:
    try:
        cli(standalone_mode=True)
    except BtkitError as e:
        _fail(e)


if __name__ == "__main__":
    main()
