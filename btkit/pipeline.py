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

from pathlib import Path
from typing import Any

from .config import ConfigError, OptionChecker, RunConfig, run_config
from .options import CONCURRENCY, LIMIT

TOP_KEYS = ("name", "description", "input", "output", "model", "base_url", "backend_options", "options", "prompts",
            "concurrency", "limit", "cache", "stages")


#: A bad pipeline file: one line naming the file and the key (the checker's error, as for ``-S``).
PipelineError = ConfigError


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


def load_pipeline(path: str | Path, registry: Any, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, check and turn a pipeline file into a :class:`btkit.config.RunConfig`.

    ``overrides`` (from the command line) may set ``out_dir``, ``input``, ``model`` (every stage's),
    ``base_url`` (every stage's), ``limit``, ``quiet``, ``overwrite``, ``concurrency``, ``max_tokens``
    (every stage's), ``cache_path``, ``no_cache``, ``backend_options`` and ``prompts`` (folders that
    come before the file's).
    """
    path = Path(path)
    o = {k: v for k, v in (overrides or {}).items() if not (v is None or v is False or (isinstance(v, (tuple, list)) and not v))}
    data = read_pipeline_file(path)
    check = OptionChecker(path, registry)
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

    model = o.get("model") or (check.string(data["model"], "model") if data.get("model") is not None else None)
    cache_path, use_cache = None, not o.get("no_cache")
    cache = data.get("cache")
    if cache is False:
        use_cache = False
    elif cache is not None and cache is not True:
        cache_path = Path(check.resolve(cache, "cache"))
    if o.get("cache_path"):
        cache_path = Path(o["cache_path"])

    check_fields(path, specs, registry)
    return run_config(
        specs,
        input=input_path,
        out_dir=out_dir,
        model=model,
        # the command line's settings win over what a stage names itself
        every_stage={"model": o.get("model"), "base_url": o.get("base_url"), "max_tokens": o.get("max_tokens")},
        options=run_options,
        backend_options=backend_options,
        base_url=base_url,
        prompt_overrides=prompt_dirs,
        concurrency=o["concurrency"] if "concurrency" in o else (check.convert("concurrency", data["concurrency"], "concurrency", None, CONCURRENCY) if data.get("concurrency") is not None else None),
        limit=o["limit"] if "limit" in o else (check.convert("limit", data["limit"], "limit", None, LIMIT) if data.get("limit") is not None else None),
        quiet=bool(o.get("quiet")),
        cache_path=cache_path,
        use_cache=use_cache,
        overwrite=bool(o.get("overwrite")),
    )


def check_fields(path: Path, specs: list[Any], registry: Any) -> None:
    """Every stage's inputs exist before it runs: the first method's units carry ``Method.unit_fields``,
    each stage adds its declared outputs (``StageInfo``). A chain that feeds a stage nothing it can use
    (``kun.postfilter`` without a stage that writes a response) stops here, naming the stage and the
    field, instead of failing once per record at run time."""
    first = registry.method(specs[0].method)
    have = {f: f"the units of {first.name} (its input)" for f in first.unit_fields}
    for i, spec in enumerate(specs):
        info = next(s for s in registry.method(spec.method).stages if s.name == spec.stage)
        missing = [f for f in info.inputs if f not in have]
        if missing:
            known = ", ".join(f"{f} (from {src})" for f, src in have.items())
            raise PipelineError(path, f"stages[{i}] ({spec.method}.{spec.stage})",
                                f"needs field{'s' if len(missing) > 1 else ''} {', '.join(missing)} that no earlier stage produces; "
                                f"available here: {known}")
        for f in info.outputs:
            have.setdefault(f, f"{spec.method}.{spec.stage}")


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


__all__ = ["load_pipeline", "read_pipeline_file", "PipelineError", "describe", "check_fields"]
