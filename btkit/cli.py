"""The ``btkit`` command line. Kept import-light: nothing heavy loads for ``--help``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from . import DEFAULT_MODEL, __version__
from .errors import BtkitError
from .options import CONCURRENCY, DEFAULT_CONCURRENCY, GENERAL_OPTIONS, INPUT_DEFAULTS, LIMIT, MAX_TOKENS

#: ``--dry-run`` and ``--max-cost``, on ``btkit run METHOD`` and ``btkit run PIPELINE``. Neither is a setting
#: of the run (run.json): a dry run writes nothing, and a higher ``--max-cost`` continues a stopped run.
BUDGET_OPTIONS = [
    click.Option(["--dry-run"], is_flag=True, help="Print per stage the calls the run would make, and an estimate of tokens and cost "
                 "(litellm's price table; 'no price' for local models); no model is called, nothing is written."),
    click.Option(["--max-cost"], type=click.FloatRange(0, min_open=True), default=None, metavar="USD",
                 help="Stop cleanly (resumable) once the run's calls cost this many dollars; re-run with a higher limit to continue."),
]

#: Sharding (:mod:`btkit.shards`, :mod:`btkit.executors`), on ``btkit run METHOD`` and ``btkit run PIPELINE``.
SHARD_OPTIONS = [
    click.Option(["--shards"], type=click.IntRange(1), default=None, metavar="N",
                 help="Split the run into N shards by a hash of each unit's text (OUT/shards/K-of-N/). With --shard K: run that "
                      "shard only (any job launcher); without: the executor runs all N, then merges them into OUT."),
    click.Option(["--shard"], type=click.IntRange(0), default=None, metavar="K", help="Run shard K (0..N-1) of --shards N only; `btkit merge OUT` when all are done."),
    click.Option(["--executor"], default="local", show_default=True, help="What runs the shards of --shards N: local (a process per shard) or ray (a Ray task per shard)."),
    click.Option(["-E", "--executor-option", "executor_option"], multiple=True, metavar="KEY=VALUE",
                 help="Executor option, e.g. -E address=auto -E retries=3 (ray), -E parallel=2 (local)."),
]

COMMON_RUN_OPTIONS = [
    click.Option(["-o", "--out", "out_dir"], required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory (created; re-running the same command resumes it)."),
    click.Option(["--model", "model"], default=None, help=f"Model spec, e.g. llamacpp:PATH.gguf, openai:NAME, vllm:NAME. Default: the embedded SmolLM2-135M ({DEFAULT_MODEL})."),
    click.Option(["--base-url"], default=None, help="Endpoint for remote backends (default for openai:/vllm: OPENAI_BASE_URL)."),
    click.Option(["--limit"], type=LIMIT, default=None, help="Read at most N input records."),
    click.Option(["--text-field"], default=INPUT_DEFAULTS["text_field"], show_default=True, help="Input field holding the document text."),
    click.Option(["--id-field"], default=INPUT_DEFAULTS["id_field"], show_default=True, help="Input field holding a stable document id (line number if absent)."),
    click.Option(["--encoding-errors"], type=GENERAL_OPTIONS["encoding_errors"], default=INPUT_DEFAULTS["encoding_errors"], show_default=True, help="Input bytes that are not UTF-8: stop with the line number, or replace them with U+FFFD (counted in stats.json)."),
    click.Option(["--prompts", "prompts_dir"], multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of <method>/<stage>.j2 templates overriding the built-in ones."),
    click.Option(["--concurrency"], type=CONCURRENCY, default=DEFAULT_CONCURRENCY, show_default=True, help="Model calls in flight (local llama.cpp runs one at a time)."),
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
    *BUDGET_OPTIONS,
    *SHARD_OPTIONS,
]


def _registry() -> Any:
    from .plugins import get_registry

    return get_registry()


def run_method(method_name: str, input_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Build a one-method run from ``btkit run METHOD`` parameters and run it."""
    from .config import method_stage_specs, parse_key_values, run_config

    registry = _registry()
    dry_run, max_cost = params.pop("dry_run", False), params.pop("max_cost", None)
    sharding = {k: params.pop(k) for k in ("shards", "shard", "executor", "executor_option")}
    method = registry.method(method_name)
    sampling = {"temperature": params.pop("temperature"), "top_p": params.pop("top_p"),
                "max_tokens": params.pop("max_tokens"), "seed": params.pop("sample_seed"),
                "stop": list(params.pop("stop")) or None}
    config = run_config(
        method_stage_specs(registry, method, params.pop("stage_option")),
        input=input_path,
        out_dir=params.pop("out_dir"),
        model=params.pop("model"),
        # OPENAI_BASE_URL is read by the backends that speak to such an endpoint, not here
        base_url=params.pop("base_url"),
        backend_options=parse_key_values(params.pop("backend_option"), "--backend-option"),
        prompt_overrides=params.pop("prompts_dir"),
        concurrency=params.pop("concurrency"),
        limit=params.pop("limit"),
        quiet=params.pop("quiet"),
        cache_path=params.pop("cache_path"),
        use_cache=not params.pop("no_cache"),
        overwrite=params.pop("overwrite"),
        options={**params, **sampling},  # what is left: the method's own options and the input fields
    )
    return dispatch(config, registry, sharding, dry_run=dry_run, max_cost=max_cost)


def dispatch(config: Any, registry: Any, sharding: dict[str, Any], dry_run: bool, max_cost: float | None) -> dict[str, Any] | None:
    """Run ``config`` as asked: whole, one shard of it (``--shard K``), or every shard through an
    executor and then merged (``--shards N``); a dry run only prints the estimate (of the shard, with ``--shard``)."""
    from .config import parse_key_values
    from .engine import estimate_run, format_estimate, run_pipeline
    from .shards import check_layout, check_shard_args, shard_dir

    shards, shard = sharding.get("shards"), sharding.get("shard")
    executor, executor_options = sharding.get("executor") or "local", parse_key_values(sharding.get("executor_option") or (), "--executor-option")
    check_shard_args(shards, shard)
    if shards is None and (executor != "local" or executor_options):
        raise BtkitError(f"--executor {executor}: needs --shards N (the executor runs the shards of a sharded run)")
    if shard is not None:
        check_layout(config.out_dir, shards)
        config.out_dir, config.shard = shard_dir(config.out_dir, shard, shards), (shard, shards)
    if dry_run:
        click.echo(format_estimate(estimate_run(config, registry)))
        return None
    if shards is not None and shard is None:
        if max_cost is not None:
            raise BtkitError("--max-cost counts one run directory's calls: with --shards, give it to each --shard K run")
        from .executors import run_sharded

        return run_sharded(config, registry, shards, executor, executor_options)
    return run_pipeline(config, registry, max_cost=max_cost)


def summarize(stats: dict[str, Any], out_dir: Path) -> str:
    if stats.get("status") == "shard_complete":
        return (f"shard done: {stats['kept']} records alive, {stats['dropped']} dropped from {stats['units']} units "
                f"({stats['calls']} calls) in {stats['this_invocation_s']:.1f}s -> {out_dir}; when every shard is done: "
                f"btkit merge {Path(out_dir).parent.parent}")
    if stats.get("already_merged"):
        return f"already merged: {stats.get('kept')} kept from {stats.get('units')} units (no shard changed since) -> {out_dir}/data.jsonl"
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

            return pipeline_command(name)
        method = _registry().method(name)

        def callback(corpus: Path, **params: Any) -> None:
            out_dir, sharding = params["out_dir"], dict(params)
            stats = run_method(name, corpus, params)
            if stats is not None:  # None: a dry run, which printed its estimate
                click.echo(summarize(stats, _shown_dir(out_dir, sharding, stats)), err=True)

        params = [click.Argument(["corpus"], type=click.Path(path_type=Path))] + list(COMMON_RUN_OPTIONS) + list(method.cli_options)
        return click.Command(name, params=params, callback=callback, help=f"{method.description} {method.paper}".strip())


PIPELINE_OPTIONS = [
    click.Option(["-o", "--out", "out_dir"], type=click.Path(file_okay=False, path_type=Path), default=None, help="Run directory (overrides the file's 'output')."),
    click.Option(["--input"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Input JSONL (overrides the file's 'input')."),
    click.Option(["--model"], default=None, help="Model spec for every stage (overrides the file's model lines)."),
    click.Option(["--base-url"], default=None, help="Endpoint for remote backends, for every stage (default for openai:/vllm: OPENAI_BASE_URL)."),
    click.Option(["--limit"], type=LIMIT, default=None, help="Read at most N input records."),
    click.Option(["--max-tokens"], type=MAX_TOKENS, default=None, help="Completion length cap for every stage."),
    click.Option(["--concurrency"], type=CONCURRENCY, default=None, help=f"Model calls in flight (default: the file's, else {DEFAULT_CONCURRENCY})."),
    click.Option(["--prompts", "prompts"], multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of <method>/<stage>.j2 overrides (before the file's)."),
    click.Option(["-B", "--backend-option", "backend_option"], multiple=True, metavar="KEY=VALUE", help="Backend option for every backend."),
    click.Option(["--no-cache"], is_flag=True, help="Do not read or write the model-call cache."),
    click.Option(["--cache", "cache_path"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file."),
    click.Option(["--overwrite"], is_flag=True, help="Start over in a run directory that holds a run with other settings."),
    click.Option(["-q", "--quiet"], is_flag=True, help="No progress bar."),
    click.Option(["--check"], is_flag=True, help="Check the file (keys, values, and that each stage gets the fields it needs) and print the stages it would run; no model calls."),
    *BUDGET_OPTIONS,
    *SHARD_OPTIONS,
]


def _shown_dir(out_dir: Path, params: dict[str, Any], stats: dict[str, Any]) -> Path:
    """Where the summary line points: a shard's own directory for one shard, else OUT."""
    from .shards import shard_dir

    if stats.get("status") == "shard_complete" and params.get("shard") is not None:
        return shard_dir(out_dir, params["shard"], params["shards"])
    return out_dir


def pipeline_command(name: str) -> click.Command:
    """The command behind ``btkit run NAME.yaml|.yml|.toml`` (files: :mod:`btkit.pipeline`)."""

    def callback(**params: Any) -> None:
        from .config import parse_key_values
        from .pipeline import describe, load_pipeline

        registry = _registry()
        overrides = dict(params)
        dry_run, max_cost = overrides.pop("dry_run"), overrides.pop("max_cost")
        sharding = {k: overrides.pop(k) for k in ("shards", "shard", "executor", "executor_option")}
        overrides["backend_options"] = parse_key_values(overrides.pop("backend_option"), "--backend-option")
        overrides["base_url"] = overrides.get("base_url") or None
        config = load_pipeline(name, registry, overrides)
        if params["check"]:
            click.echo(describe(config))
            return
        out_dir = config.out_dir
        stats = dispatch(config, registry, sharding, dry_run=dry_run, max_cost=max_cost)
        if stats is not None:
            click.echo(summarize(stats, _shown_dir(out_dir, sharding, stats)), err=True)

    return click.Command(name, params=list(PIPELINE_OPTIONS), callback=callback,
                         help=f"Run the pipeline file {name} (stages, models and options as the file names them).")


class PluginGroup(click.Group):
    """The top-level group; plugins add commands through ``btkit_register_commands``."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            try:
                _registry().register_commands(self)
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
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an earlier merge made from other shards or settings (its files are moved aside).")
@click.option("--concurrency", type=CONCURRENCY, default=None, help="Model calls in flight for the stages after a whole-run cut (default: the shards').")
@click.option("-B", "--backend-option", "backend_option", multiple=True, metavar="KEY=VALUE",
              help="Backend option over the shards' (credentials are not recorded in the shards: give an -B api_key=... here if a stage after a whole-run cut needs one).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file (default: the shards' setting).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def merge(out_dir: Path, overwrite: bool, concurrency: int | None, backend_option: tuple[str, ...], cache_path: Path | None, quiet: bool) -> None:
    """Merge the shards of OUT_DIR (OUT_DIR/shards/K-of-N) into OUT_DIR: data.jsonl, stats.json, failures, card.

    Whole-run decisions (keep-top, de-duplication across units) are made here over every shard;
    a merge under another shard count or other settings is refused."""
    from .config import parse_key_values
    from .shards import merge as merge_shards

    stats = merge_shards(out_dir, _registry(), overwrite=overwrite, quiet=quiet, cache_path=cache_path, concurrency=concurrency,
                         backend_options=parse_key_values(backend_option, "--backend-option"))
    click.echo(summarize(stats, out_dir), err=True)


@cli.command()
def executors() -> None:
    """List shard executors usable with --executor."""
    for name, f in sorted(_registry().executors().items()):
        click.echo(f"{name:<12} {f.description}  (plugin {f.plugin})")


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

    ctx.obj = PromptLibrary(_registry().prompt_roots(), prompts_dir)
    if ctx.invoked_subcommand is None:
        for name in ctx.obj.names():
            click.echo(f"{name:<28} {ctx.obj.path(name)}")


@prompts.command("show")
@click.argument("name")
@click.pass_obj
def prompts_show(lib: Any, name: str) -> None:
    """Print one template's source."""
    click.echo(lib.source(name), nl=False)


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
    cli(standalone_mode=True)  # a BtkitError is a click exception: one ``error:`` line, exit 2


if __name__ == "__main__":
    main()
