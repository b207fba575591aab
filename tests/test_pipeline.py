"""Pipeline files: the examples load, YAML and TOML agree, paths resolve against the file's folder,
each stage may use its own model, CLI flags override the file, bad files get one line naming file and
key, records flow across methods (humpback -> backforth rewrite -> crab), and the chain runs on the
embedded model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from btkit.pipeline import PipelineError, load_pipeline
from btkit_plugins.methods.crab import rules

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

PIPELINES = EXAMPLES / "pipelines"


def error_line(result) -> str:
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# -- the example files --------------------------------------------------------------------------
EXPECTED = {
    "humpback.yaml": ["humpback.augment", "humpback.curate"],
    "backforth.yaml": ["backforth.augment", "backforth.curate", "backforth.rewrite"],
    "kun.yaml": ["kun.perplexity", "kun.augment", "kun.filter", "kun.judge", "kun.polish", "kun.postfilter"],
    "crab.yaml": ["crab.constrain", "crab.verify", "crab.compose"],
    "air.yaml": ["air.augment", "air.score", "air.refine"],
    "linguist.yaml": ["linguist.generate"],
    "tegit.yaml": ["tegit.augment", "tegit.curate"],
    "self_lengthen.yaml": ["self_lengthen.self_instruct", "self_lengthen.generate", "self_lengthen.extend"],
    "cycle_instruct.yaml": ["cycle_instruct.question", "cycle_instruct.answer", "cycle_instruct.score"],
    "chain.yaml": ["humpback.augment", "humpback.curate", "backforth.rewrite", "crab.constrain", "crab.verify", "crab.compose"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_pipelines_load_and_resolve_paths(registry, name):
    config = load_pipeline(PIPELINES / name, registry)
    assert [f"{s.method}.{s.stage}" for s in config.stages] == EXPECTED[name]
    assert config.input.is_file() and EXAMPLES in config.input.parents
    assert config.out_dir.parent == EXAMPLES.parent / "runs"
    assert config.model == "llamacpp:default"
    text = (PIPELINES / name).read_text()
    assert "# " in text and ("openai:" in text or "vllm:" in text)  # shows the remote variant of the model lines


def first_party_methods(registry) -> set[str]:
    """Names of the methods registered by plugins that the btkit distribution itself ships (a third-party
    plugin installed alongside, such as the example plugin's ``quiz``, does not count)."""
    names: set[str] = set()
    registry.methods()  # loads the method plugins
    for impl in registry.pm.hook.btkit_register_methods.get_hookimpls():
        plugin = registry.pm.get_name(impl.plugin)
        if registry.dists.get(plugin, ("?", ""))[0] == "btkit":
            impl.function(register=lambda method: names.add(method.name))
    return names


def test_every_method_has_an_example(registry):
    own = first_party_methods(registry)
    assert own and own <= set(registry.methods())
    assert {"humpback", "backforth", "kun", "crab", "air"} <= own
    for name in sorted(own):
        path = PIPELINES / f"{name}.yaml"
        assert path.is_file(), f"method '{name}' has no example pipeline {path}"
        config = load_pipeline(path, registry)
        # the example runs every stage of its method, in the method's order
        assert [(s.method, s.stage) for s in config.stages] == [(name, st.name) for st in registry.method(name).stages]
        assert f"{name}.yaml" in EXPECTED  # and is covered by test_example_pipelines_load_and_resolve_paths


def test_options_are_converted_with_the_method_types(registry):
    config = load_pipeline(PIPELINES / "crab.yaml", registry)
    compose = config.stages[2].options
    assert compose["forward_constraints"] == (6, 8) and compose["reverse"] is True
    aug = load_pipeline(PIPELINES / "humpback.yaml", registry).stages[0].options
    assert aug["seed_file"] == str(EXAMPLES / "seed.jsonl")  # the --seed flag's option, path resolved
    assert "seed" not in aug  # never confused with the sampling seed


def test_lists_and_sampling_seed(registry, tmp_path):
    (tmp_path / "p.yaml").write_text("input: c.jsonl\noutput: out\nstages:\n  - kun.augment\n  - use: kun.filter\n    reference_words: [the text, 根据]\n"
                                     "  - use: kun.polish\n    sample_seed: 7\n    stop: END\n")
    _, filt, polish = load_pipeline(tmp_path / "p.yaml", registry).stages
    assert filt.options == {"reference_words": ("the text", "根据")}
    assert polish.options == {"seed": 7, "stop": ["END"]}


def _sampling(history, kind="chat"):
    return [{k: h["params"].get(k) for k in ("temperature", "top_p", "max_tokens", "stop", "seed")} for h in history if h["kind"] == kind]


def test_per_stage_sampling_from_the_command_line_reaches_the_requests(cli, scripted, tmp_path):
    backend, spec = scripted(default=lambda m, p: "What do the listed words mean?" if len(m) > 1 else "Brief reasoning.\nScore: 5")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "o", "--model", spec, "--judge-mode", "rubric", "-q",
            "--stop", "END", "--top-p", "0.5", "-S", "augment.temperature=0.1", "-S", "curate.max_tokens=33", "-S", "curate.sample_seed=9")
    assert r.exit_code == 0, r.output
    augment, curate = _sampling(backend.history)
    assert augment["temperature"] == 0.1 and augment["stop"] == ["END"] and augment["top_p"] == 0.5 and augment["max_tokens"] != 33
    assert curate["max_tokens"] == 33 and curate["seed"] == 9 and curate["stop"] == ["END"] and curate["temperature"] != 0.1


def test_a_stage_model_from_the_command_line(cli, scripted, tmp_path):
    aug, aug_spec = scripted(default="What do the listed words mean?")
    judge, judge_spec = scripted(logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "o", "--model", aug_spec, "-S", f"curate.model={judge_spec}", "-q")
    assert r.exit_code == 0, r.output
    assert [h["kind"] for h in aug.history] == ["chat"] and [h["kind"] for h in judge.history] == ["next_token_logprobs"]


def test_per_stage_sampling_from_a_pipeline_file_reaches_the_requests(cli, scripted, tmp_path):
    backend, spec = scripted(default=lambda m, p: "What do the listed words mean?" if len(m) > 1 else "Brief reasoning.\nScore: 5")
    write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    (tmp_path / "p.yaml").write_text(f"""input: c.jsonl
output: out
model: {spec}
stages:
  - use: humpback.augment
    temperature: 0.3
    top_p: 0.8
    stop: [END, STOP]
  - use: humpback.curate
    judge_mode: rubric
    max_tokens: 40
    sample_seed: 5
""")
    r = cli("run", tmp_path / "p.yaml", "-q")
    assert r.exit_code == 0, r.output
    augment, curate = _sampling(backend.history)
    assert (augment["temperature"], augment["top_p"], augment["stop"]) == (0.3, 0.8, ["END", "STOP"])
    assert (curate["max_tokens"], curate["seed"]) == (40, 5) and curate["stop"] != ["END", "STOP"]


@pytest.mark.parametrize("option, message", [
    ("nostage.temperature=1", "method 'humpback' runs no stage 'nostage'; its stages: augment, curate"),
    ("curate.treshold=4", "--stage-option: curate.treshold (humpback.curate): unknown key 'treshold'"),
    ("curate.threshold=9", "--stage-option: curate.threshold (humpback.curate): 9 is not in the range"),
    ("augment.prompts=no/such/dir", "no/such/dir: --prompts must be a directory"),
    ("temperature=1", "--stage-option expects STAGE.KEY=VALUE"),
])
def test_bad_stage_options_get_one_line(cli, scripted, tmp_path, option, message):
    backend, spec = scripted(default="x")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "o", "--model", spec, "-q", "-S", option)
    assert r.exit_code == 2 and message in error_line(r), r.output
    assert backend.history == []


def test_yaml_and_toml_agree(registry, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": words(40)}])
    (tmp_path / "p.yaml").write_text("input: c.jsonl\noutput: out\nmodel: 'echo:'\noptions: {min_words: 10}\n"
                                     "stages:\n  - use: humpback.augment\n    temperature: 0.2\n  - use: humpback.curate\n    threshold: 3\n")
    (tmp_path / "p.toml").write_text('input = "c.jsonl"\noutput = "out"\nmodel = "echo:"\n[options]\nmin_words = 10\n'
                                     '[[stages]]\nuse = "humpback.augment"\ntemperature = 0.2\n[[stages]]\nuse = "humpback.curate"\nthreshold = 3\n')
    a, b = load_pipeline(tmp_path / "p.yaml", registry), load_pipeline(tmp_path / "p.toml", registry)
    assert a == b
    assert a.options == {"min_words": 10} and a.stages[1].options == {"threshold": 3}


def test_relative_paths_resolve_against_the_files_folder(cli, scripted, tmp_path, monkeypatch):
    backend, spec = scripted(default="What are the listed words about?", logprobs={"5": -0.01})
    folder = tmp_path / "project" / "pipes"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "c.jsonl", [{"id": "d", "text": words(60)}])
    (folder / "p.yaml").write_text(f"input: data/c.jsonl\noutput: ../runs/r1\nmodel: {spec}\nstages: [humpback.augment, humpback.curate]\n")
    monkeypatch.chdir(tmp_path)
    r = cli("run", "project/pipes/p.yaml", "-q")
    assert r.exit_code == 0, r.output
    assert len(read_jsonl(tmp_path / "project" / "runs" / "r1" / "data.jsonl")) == 1


# -- models per stage and CLI overrides -----------------------------------------------------------
def two_model_pipeline(tmp_path, augmenter, judge):
    write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(3)])
    path = tmp_path / "p.yaml"
    path.write_text(f"""input: c.jsonl
output: out
model: {augmenter}
stages:
  - use: humpback.augment
  - use: humpback.curate
    model: {judge}
    base_url: http://127.0.0.1:9/v1
    threshold: 4
""")
    return path


def test_each_stage_uses_its_own_model(cli, scripted, tmp_path):
    aug, aug_spec = scripted(default="What do the listed words mean?")
    judge, judge_spec = scripted(logprobs={"4": math.log(0.9), "2": math.log(0.1)})
    r = cli("run", two_model_pipeline(tmp_path, aug_spec, judge_spec), "-q")
    assert r.exit_code == 0, r.output
    assert {h["kind"] for h in aug.history} == {"chat"} and len(aug.history) == 3
    assert {h["kind"] for h in judge.history} == {"next_token_logprobs"} and len(judge.history) == 3
    row = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    assert [(s["stage"], s["model"]) for s in row["meta"]["lineage"]] == [("humpback.augment", aug_spec), ("humpback.curate", judge_spec)]


def test_cli_flags_override_the_file(cli, scripted, tmp_path):
    one, spec = scripted(default="What do the listed words mean?", logprobs={"5": -0.01})
    r = cli("run", two_model_pipeline(tmp_path, "llamacpp:/nonexistent.gguf", "llamacpp:/nonexistent.gguf"),
            "--model", spec, "-o", tmp_path / "elsewhere", "--limit", "2", "--max-tokens", "17", "-q")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "out").exists()
    assert len(read_jsonl(tmp_path / "elsewhere" / "data.jsonl")) == 2
    assert all(h["params"]["max_tokens"] == 17 for h in one.history if h["kind"] == "chat")
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x", "text": words(60, 900)}])
    r = cli("run", two_model_pipeline(tmp_path, spec, spec), "--input", other, "-o", tmp_path / "third", "-q")
    assert r.exit_code == 0, r.output
    assert [c["source_id"] for c in read_jsonl(tmp_path / "third" / "candidates.jsonl")] == ["x"]


def test_stage_prompt_overrides_relative_to_the_file(cli, scripted, tmp_path):
    backend, spec = scripted(default="What do the listed words mean?", logprobs={"5": -0.01})
    (tmp_path / "mine" / "humpback").mkdir(parents=True)
    (tmp_path / "mine" / "humpback" / "augment.j2").write_text("Ask about: {{ text }}")
    path = two_model_pipeline(tmp_path, spec, spec)
    path.write_text(path.read_text().replace("  - use: humpback.augment\n", "  - use: humpback.augment\n    prompts: mine\n"))
    r = cli("run", path, "-q")
    assert r.exit_code == 0, r.output
    chats = [h for h in backend.history if h["kind"] == "chat"]
    assert chats and all(h["messages"] == [{"role": "user", "content": h["messages"][0]["content"]}] for h in chats)
    assert all(h["messages"][0]["content"].startswith("Ask about: ") for h in chats)


def test_a_stage_prompt_override_serves_that_stage_only(cli, scripted, tmp_path):
    """humpback.augment and backforth.augment both render humpback/augment: an override on one leaves the other alone."""
    backend, spec = scripted(default="What do the listed words mean?", logprobs={"5": -0.01})
    (tmp_path / "mine" / "humpback").mkdir(parents=True)
    (tmp_path / "mine" / "humpback" / "augment.j2").write_text("Ask about: {{ text }}")
    write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(60, 100 * i)} for i in range(2)])
    path = tmp_path / "p.yaml"
    path.write_text(f"""input: c.jsonl
output: out
model: {spec}
stages:
  - use: humpback.augment
    prompts: mine
  - use: backforth.augment
  - use: humpback.curate
""")
    r = cli("run", path, "-q")
    assert r.exit_code == 0, r.output
    chats = [h["messages"] for h in backend.history if h["kind"] == "chat"]
    overridden = [m for m in chats if m[0]["content"].startswith("Ask about: ")]
    assert len(chats) == 4 and len(overridden) == 2
    assert all(len(m) > 1 for m in chats if m not in overridden)  # the built-in template: system prompt and few-shot turns
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert {"humpback.augment:humpback/augment", "humpback/augment"} <= set(run["fingerprint"]["templates"])


def test_check_prints_the_stages_without_calling_a_model(cli, scripted, tmp_path):
    backend, spec = scripted()
    r = cli("run", two_model_pipeline(tmp_path, spec, spec), "--check")
    assert r.exit_code == 0, r.output
    assert "1. humpback.augment" in r.output and "2. humpback.curate" in r.output and "@ http://127.0.0.1:9/v1" in r.output
    assert backend.history == [] and not (tmp_path / "out").exists()


# -- bad files ----------------------------------------------------------------------------------------
BAD = [
    ("input: c.jsonl\noutput: o\nstages:\n  - use: humpback.curate\n    treshold: 4\n", "stages[0].treshold (humpback.curate): unknown key 'treshold'"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: humpback.curate\n    threshold: 9\n", "stages[0].threshold (humpback.curate): 9 is not in the range"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: humpback.curate\n    threshold: four\n", "stages[0].threshold (humpback.curate): expected a number"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: crab.compose\n    reverse: maybe\n", "stages[0].reverse (crab.compose): expected true or false"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: nomethod.x\n", "stages[0].use: unknown method 'nomethod'"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: kun.rewrite\n", "stages[0].use: method 'kun' has no stage 'rewrite'; its stages: perplexity, augment, filter"),
    ("input: c.jsonl\noutput: o\nstages:\n  - humpback\n", "stages[0].use: expected METHOD.STAGE"),
    ("input: c.jsonl\noutput: o\nstages: []\n", "stages: expected a non-empty list"),
    ("output: o\nstages: [humpback.augment]\n", "input: missing"),
    ("input: c.jsonl\nstages: [humpback.augment]\n", "output: missing"),
    ("input: c.jsonl\noutput: o\nmodle: x\nstages: [humpback.augment]\n", "modle: unknown key"),
    ("input: c.jsonl\noutput: o\noptions: {min_wrds: 3}\nstages: [humpback.augment]\n", "options.min_wrds: unknown key 'min_wrds'"),
    ("input: c.jsonl\ninput: d.jsonl\noutput: o\nstages: [humpback.augment]\n", "line 2: key 'input' is given twice"),
    ("input: c.jsonl\noutput: o\nstages:\n  - use: humpback.augment\n   temperature: 0.3\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "the file is empty"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_pipeline_gets_one_line_naming_file_and_key(cli, scripted, tmp_path, text, message):
    backend, spec = scripted()
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    write_jsonl(tmp_path / "c.jsonl", [{"text": words(40)}])
    r = cli("run", path, "-q")
    assert r.exit_code == 2
    line = error_line(r)
    assert line.startswith(f"error: {path}: ") and message in line, line
    assert backend.history == []


def test_bad_toml_and_missing_file(cli, registry, tmp_path):
    (tmp_path / "bad.toml").write_text('input = "c.jsonl"\nstages = [\n')
    r = cli("run", tmp_path / "bad.toml", "-q")
    assert r.exit_code == 2 and "not valid TOML" in error_line(r)
    r = cli("run", tmp_path / "missing.yml", "-q")
    assert r.exit_code == 2 and error_line(r) == f"error: {tmp_path / 'missing.yml'}: file not found"
    with pytest.raises(PipelineError):
        load_pipeline(tmp_path / "missing.yml", registry)


# -- a chain across methods ---------------------------------------------------------------------------
REWRITTEN = ("Hidden files are files whose names begin with a dot. Run ls -a to list them.\n\n"
             "Add -l for details. They are ordinary files that are only hidden from the default listing.")


def chain_reply(messages, params):
    content = messages[-1]["content"]
    if "Rewrite the document into the answer" in content:
        return REWRITTEN
    if "Reply with one JSON object" in content:
        assert REWRITTEN in content  # crab sees the rewritten response, not the web text
        return json.dumps({"writing_style": "Write in a plain, practical tone for Linux beginners.", "multilingual": None})
    if "Reply with one word: Yes or No" in content:
        return "Yes"
    return "How do I list hidden files on Linux?"


def test_chain_example_flows_records_through_three_methods(cli, scripted, tmp_path):
    backend, spec = scripted(default=chain_reply, logprobs=lambda m, p, c: {"Yes": -0.05, "No": -3.0} if "Yes" in c else {"5": -0.05, "1": -3.0})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": "Posted by admin.\n\n" + words(60)}])
    r = cli("run", PIPELINES / "chain.yaml", "--model", spec, "--input", corpus, "-o", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert [d["meta"]["crab_example"] for d in data] == ["forward", "reverse"]  # crab, the last stage, shapes data.jsonl
    fwd = data[0]
    assert fwd["response"] == REWRITTEN and fwd["instruction"].startswith("How do I list hidden files on Linux?\n\n")
    assert fwd["meta"]["original_response"].startswith("Posted by admin.")  # from backforth.rewrite
    assert fwd["system"] == "Answer with knowledge from web search."  # from humpback.curate
    assert fwd["meta"]["method"] == "crab"
    for c in fwd["meta"]["constraints"]:
        if c["source"] == "rule":
            assert rules.check(c, REWRITTEN)
    stages = [s["stage"] for s in fwd["meta"]["lineage"]]
    assert stages[:3] == ["humpback.augment", "humpback.curate", "backforth.rewrite"] and stages[3] == "crab.constrain"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert list(stats["stages"]) == EXPECTED["chain.yaml"]


@pytest.mark.model
def test_chain_example_with_embedded_model(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [json.loads(l) for l in (EXAMPLES / "corpus.jsonl").read_text().splitlines()[:2]])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", str(PIPELINES / "chain.yaml"), "--input", str(corpus), "-o", str(out),
           "--max-tokens", "48", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert len({c["source_id"] for c in cands}) == 2
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["dropped_at"] in EXPECTED["chain.yaml"] and c["reason"]
        assert all(s["model"] == "llamacpp:default" for s in c["lineage"])
    for row in read_jsonl(out / "data.jsonl"):
        assert row["meta"]["crab_example"] in ("forward", "reverse") and row["meta"]["original_response"]
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["stages"]) == EXPECTED["chain.yaml"] and stats["records"] == len(cands)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def openai_server(tmp_path):
    """llama-cpp-python's OpenAI-compatible server with the embedded model on 127.0.0.1; stopped by PID."""
    pytest.importorskip("llama_cpp.server")
    from btkit.kit.models import embedded_model_path

    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()), "--host", "127.0.0.1",
                                 "--port", str(port), "--n_ctx", "4096", "--logits_all", "False"], stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):  # up to 60 s on a busy machine
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=1) as r:
                    yield {"base_url": base, "model_id": json.load(r)["data"][0]["id"]}
                    break
            except OSError:
                time.sleep(0.25)
        else:
            pytest.fail(f"llama_cpp.server did not answer: {log.read_text()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.model
@pytest.mark.slow
def test_same_yaml_runs_against_a_remote_endpoint_by_changing_only_model_lines(openai_server, tmp_path):
    """examples/pipelines/humpback.yaml with only its model line changed, against a real OpenAI-compatible server."""
    root = tmp_path / "copy"  # same layout as examples/, so the file's relative paths still hold
    (root / "pipelines").mkdir(parents=True)
    write_jsonl(root / "corpus.jsonl", [json.loads((EXAMPLES / "corpus.jsonl").read_text().splitlines()[0])])
    shutil.copy(EXAMPLES / "seed.jsonl", root / "seed.jsonl")
    original = (PIPELINES / "humpback.yaml").read_text()
    remote = f"openai:{openai_server['model_id']}"
    changed = original.replace("\nmodel: llamacpp:default\n", f"\nmodel: {remote}\nbase_url: {openai_server['base_url']}\n")
    assert changed != original
    (root / "pipelines" / "humpback.yaml").write_text(changed)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", str(root / "pipelines" / "humpback.yaml"), "-o", str(out), "--max-tokens", "32", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OPENAI_API_KEY": "sk-local-test"})
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert cands and all(s["model"] == remote for c in cands for s in c["lineage"])
    assert json.loads((out / "stats.json").read_text())["calls"] >= 1


def test_a_stage_fed_no_field_it_needs_is_refused_before_any_call(cli, registry, tmp_path):
    """kun.postfilter reads a response; without kun.polish before it, --check (and a run) stop with one
    line naming the stage, the field and what is available, instead of failing once per record."""
    write_jsonl(tmp_path / "c.jsonl", [{"id": "d", "text": words(60)}])
    (tmp_path / "p.yaml").write_text("input: c.jsonl\noutput: out\nstages:\n  - kun.augment\n  - kun.postfilter\n")
    r = cli("run", tmp_path / "p.yaml", "--check")
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "p.yaml: stages[1] (kun.postfilter)" in line
    assert "needs field response" in line and "instruction (from kun.augment)" in line and "text (from the units of kun" in line
    assert not (tmp_path / "out").exists()
    # with the stage that writes the response in between, the same file checks out
    (tmp_path / "p.yaml").write_text("input: c.jsonl\noutput: out\nstages:\n  - kun.augment\n  - kun.polish\n  - kun.postfilter\n")
    r = cli("run", tmp_path / "p.yaml", "--check")
    assert r.exit_code == 0, r.output
    assert "kun.postfilter" in r.output

