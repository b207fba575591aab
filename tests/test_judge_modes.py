"""One judge-mode vocabulary for every method, and stage declarations that match what stages do.

Every first-party method runs here on one scripted backend that answers each method's prompts by
their shape, so the same runs check the judging stages (``--judge-mode``, the former option names,
``auto`` decided in one place) and the ``StageInfo`` declarations ``btkit run PIPELINE --check``
relies on (each stage's inputs are there when it runs, its outputs after it).
"""

from __future__ import annotations

import json
from typing import Any

import click
import pytest

from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.kit import judges
from btkit.kit.judges import JUDGE_MODES, JudgingStage, resolve_judge_mode
from conftest import read_jsonl, write_jsonl
from test_pipeline import first_party_methods

DOC = ("Files whose names begin with a dot are hidden on Linux. The ls command leaves them out unless you pass the "
       "-a flag, and file managers usually hide them too until you press Ctrl+H. Configuration files such as .bashrc "
       "and .gitconfig are kept this way so that a home directory listing stays short and readable for its owner.")
INSTRUCTION = "How do I list the hidden files in a Linux directory?"
ANSWER = ("To list hidden files, run ls -a in the directory. Names that start with a dot are hidden, "
          "and ls -la also shows their sizes and permissions.")
CONSTRAINT = "Present the procedure as short numbered steps a beginner can follow."
#: What each method's units look like, by field name (a method's ``unit_fields`` pick from these).
UNIT_ROWS = {"text": DOC, "instruction": INSTRUCTION, "response": ANSWER}
#: The judging stages this repository ships; the registry must find at least these.
KNOWN_JUDGES = {"humpback.curate", "backforth.curate", "kun.judge", "crab.verify", "air.score"}
#: The former option names, each with a method whose judge it names.
FORMER_FLAGS = [("humpback", "--curate-mode"), ("backforth", "--curate-mode"), ("crab", "--verify-mode"), ("air", "--score-mode")]


def reply(messages: list[dict[str, str]], params: dict[str, Any]) -> str:
    """A good answer to every first-party prompt, recognised by its wording."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    content = messages[-1]["content"]
    if "Reply with one JSON object" in content:  # crab.constrain
        return json.dumps({"writing_style": "Write in a plain and practical tone for Linux beginners.", "multilingual": None})
    if "Reply with one word: Yes or No" in content:  # crab.verify, rubric
        return "Yes"
    if "Reply with one word: good or bad" in content:  # kun.judge, rubric
        return "good"
    if '"Score: <' in content:  # humpback.curate and air.score, rubric
        return "It meets every criterion.\nScore: 5"
    if "single most important requirement" in content:  # air.refine's judge: one constraint, then none
        return "Analysis: complete.\nConstraint: None" if CONSTRAINT in content else f"Analysis: no steps.\nConstraint: {CONSTRAINT}"
    if "Merge the constraint into the instruction" in content:
        return f"{INSTRUCTION} {CONSTRAINT}"
    if "Rewrite the document into the answer" in content or content.startswith("Given:") or system == "You are a helpful assistant.":
        return ANSWER  # backforth.rewrite, kun.polish, air's answer
    return INSTRUCTION  # the augment stages


def logprobs(messages: list[dict[str, str]], prefix: str, candidates: list[str]) -> dict[str, float]:
    """The best label of every judge is the likely next token."""
    return {c: -0.05 if c in ("5", "good", "Yes") else -4.0 for c in candidates}


class FieldSpy:
    """Records each record's fields before and after every stage (through the public hooks)."""

    def __init__(self) -> None:
        self.before: dict[str, list[set[str]]] = {}
        self.after: dict[str, list[set[str]]] = {}

    @hookimpl
    def btkit_before_stage(self, record, stage, run):
        self.before.setdefault(stage.label, []).append(set(record.fields))

    @hookimpl
    def btkit_after_stage(self, record, stage, run):
        self.after.setdefault(stage.label, []).append(set(record.fields))


def run_method(cli, scripted, registry, tmp_path, name: str, *extra: str):
    """``btkit run NAME`` over one unit shaped by the method's ``unit_fields``; (backend, result, out)."""
    method = registry.method(name)
    backend, spec = scripted(default=reply, logprobs=logprobs)
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"id": "u0", **{f: UNIT_ROWS[f] for f in method.unit_fields}}])
    out = tmp_path / "out"
    return backend, cli("run", name, corpus, "-o", out, "--model", spec, "-q", *extra), out


def judging_stages(registry) -> dict[str, JudgingStage]:
    """Every judging stage of every registered method, by label, built with the method's defaults."""
    found = {}
    for method in registry.methods().values():
        for info in method.stages:
            stage = method.stage_with_defaults(info.name, {})
            if isinstance(stage, JudgingStage):
                found[stage.label] = stage
    return found


class Backend:
    """Just enough of a backend to ask what it can do."""

    def __init__(self, *capabilities: str):
        self.capabilities = set(capabilities)
        self.asked: list[str] = []

    def supports(self, capability: str) -> bool:
        self.asked.append(capability)
        return capability in self.capabilities

    def require(self, capability: str, why: str) -> None:
        if capability not in self.capabilities:
            raise BtkitError(f"cannot do '{capability}', needed for {why}")


# -- the vocabulary ----------------------------------------------------------------------------------
def test_auto_is_logprob_where_the_backend_reads_next_token_logprobs_else_rubric():
    assert resolve_judge_mode("auto", Backend("next_token_logprobs"))[0] == "logprob"
    assert resolve_judge_mode("auto", Backend("chat"))[0] == "rubric"
    mode, why = resolve_judge_mode("auto", Backend())
    assert mode == "rubric" and "auto" in why
    # a judge that cannot read logprobs gets the rubric whatever the backend; explicit modes stand
    assert resolve_judge_mode("auto", Backend("next_token_logprobs"), ("auto", "rubric"))[0] == "rubric"
    assert resolve_judge_mode("pmi", Backend())[0] == "pmi"


def test_registry_finds_every_judging_stage_and_each_declares_its_modes(registry):
    stages = judging_stages(registry)
    assert KNOWN_JUDGES <= set(stages)
    for label, stage in stages.items():
        assert "auto" in stage.judge_modes and set(stage.judge_modes) <= set(JUDGE_MODES), label
        assert {"rubric", "logprob"} <= set(stage.judge_modes), label  # every judge reads a reply or a distribution
    # a stage whose templates take the judge mode is a judging stage
    for method in registry.methods().values():
        for info in method.stages:
            stage = method.stage_with_defaults(info.name, {})
            assert "mode" not in stage.variables or isinstance(stage, JudgingStage), stage.label


def test_auto_is_decided_by_the_one_function_in_every_judging_stage(registry, monkeypatch):
    asked = []

    def decide(requested, backend, supported=JUDGE_MODES):
        asked.append((requested, tuple(supported)))
        return "rubric", "decided by the test"

    monkeypatch.setattr(judges, "resolve_judge_mode", decide)
    backend = Backend("next_token_logprobs", "score_continuation")
    for label, stage in judging_stages(registry).items():
        asked.clear()
        stage.check_backend(backend)  # before the first call: auto is decided there
        assert stage.resolve_mode(backend) == "rubric", label  # logprobs are there, the function said rubric
        assert asked and asked[0] == ("auto", tuple(stage.judge_modes)), label


@pytest.mark.parametrize("name", sorted({label.split(".")[0] for label in KNOWN_JUDGES}))
def test_a_run_judges_the_way_the_one_function_decides(cli, scripted, registry, tmp_path, monkeypatch, name):
    """Every judge's calls follow resolve_judge_mode: told rubric on a backend with logprobs, no logprob call is made."""
    monkeypatch.setattr(judges, "resolve_judge_mode", lambda requested, backend, supported=JUDGE_MODES: ("rubric", "test"))
    backend, r, out = run_method(cli, scripted, registry, tmp_path, name)
    assert r.exit_code == 0, r.output
    assert read_jsonl(out / "data.jsonl")
    assert {h["kind"] for h in backend.history} == {"chat"}


def test_every_judging_stage_accepts_judge_mode(registry, cli, scripted, tmp_path):
    """Iterates the registry: each method with a judging stage takes --judge-mode and its stage gets it."""
    stages = judging_stages(registry)
    for label, stage in stages.items():
        method = registry.method(stage.method)
        flags = {f for opt in method.cli_options if isinstance(opt, click.Option) for f in opt.opts}
        assert "--judge-mode" in flags, label
        for mode in stage.judge_modes:
            assert method.stage_with_defaults(stage.name, {"judge_mode": mode}).judge_mode == mode, (label, mode)


@pytest.mark.parametrize("name", sorted({label.split(".")[0] for label in KNOWN_JUDGES}))
@pytest.mark.parametrize("mode", ["rubric", "logprob"])
def test_every_method_runs_with_judge_mode(cli, scripted, registry, tmp_path, name, mode):
    backend, r, out = run_method(cli, scripted, registry, tmp_path, name, "--judge-mode", mode)
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    assert read_jsonl(out / "data.jsonl"), "the judge kept nothing"
    logprob_calls = [h for h in backend.history if h["kind"] == "next_token_logprobs"]
    assert bool(logprob_calls) == (mode == "logprob")


def test_an_unsupported_mode_is_refused_naming_the_stage_and_what_it_supports(registry):
    refused = 0
    for label, stage in judging_stages(registry).items():
        method = registry.method(stage.method)
        for mode in set(JUDGE_MODES) - set(stage.judge_modes):
            with pytest.raises(BtkitError) as e:
                method.stage_with_defaults(stage.name, {"judge_mode": mode})
            assert str(e.value) == f"stage {label} cannot judge with --judge-mode {mode}; it supports {', '.join(stage.judge_modes)}"
            refused += 1
    assert refused  # kun.judge, crab.verify and air.score judge no likelihoods


def test_an_unsupported_mode_stops_the_run_before_any_call(cli, scripted, registry, tmp_path):
    backend, r, out = run_method(cli, scripted, registry, tmp_path, "kun", "--judge-mode", "pmi")
    assert r.exit_code == 2
    assert "stage kun.judge cannot judge with --judge-mode pmi; it supports auto, rubric, logprob" in r.output
    assert backend.history == []


# -- the former names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,flag", FORMER_FLAGS)
def test_former_flag_still_works_and_warns_once(cli, scripted, registry, tmp_path, name, flag):
    backend, r, out = run_method(cli, scripted, registry, tmp_path, name, flag, "rubric")
    assert r.exit_code == 0, r.output
    assert r.stderr.count(f"warning: {flag} is deprecated; use --judge-mode") == 1
    assert not any(h["kind"] == "next_token_logprobs" for h in backend.history)  # rubric, though the backend has logprobs


def test_value_generate_is_read_as_rubric_with_a_warning(cli, scripted, registry, tmp_path):
    backend, r, out = run_method(cli, scripted, registry, tmp_path, "kun", "--judge-mode", "generate")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: judge mode 'generate' is deprecated; use 'rubric'") == 1
    assert {h["kind"] for h in backend.history} == {"chat"}
    assert read_jsonl(out / "data.jsonl")[0]["meta"]["judge"]["verdict_mode"] == "rubric"


@pytest.mark.parametrize("stage,key", [("humpback.curate", "curate_mode"), ("crab.verify", "verify_mode"), ("air.score", "score_mode")])
def test_former_pipeline_keys_still_work_and_warn_once(cli, scripted, registry, tmp_path, stage, key):
    method = registry.method(stage.split(".")[0])
    backend, spec = scripted(default=reply, logprobs=logprobs)
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"id": "u0", **{f: UNIT_ROWS[f] for f in method.unit_fields}}])
    lines = [f"input: {corpus}", f"output: {tmp_path / 'out'}", f"model: {spec}", "stages:"]
    for info in method.stages:
        lines.append(f"  - use: {method.name}.{info.name}")
        if f"{method.name}.{info.name}" == stage:
            lines.append(f"    {key}: rubric")
    pipe = tmp_path / "p.yaml"
    pipe.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = cli("run", pipe, "-q")
    assert r.exit_code == 0, r.output
    assert r.stderr.count(f"warning: --{key.replace('_', '-')} is deprecated; use --judge-mode") == 1
    assert not any(h["kind"] == "next_token_logprobs" for h in backend.history)


def test_former_eval_judge_mode_flag_still_works_and_warns(cli, scripted, registry, tmp_path):
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": f"g{i}", "instruction": f"{INSTRUCTION} ({i})", "response": ANSWER} for i in range(3)])
    backend, spec = scripted(default=reply, logprobs=logprobs)
    r = cli("eval-judge", gold, "--mode", "rubric", "--mode", "logprob", "--model", spec, "--negatives", "swapped", "--json", "-")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: --mode is deprecated; use --judge-mode") == 1
    assert [m["mode"] for m in json.loads(r.stdout)["modes"]] == ["rubric", "logprob"]


def test_capability_error_names_the_new_flag_and_the_former_one(cli, scripted, registry, tmp_path):
    backend, spec = scripted(default=reply)
    backend.capabilities = frozenset({"chat"})
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"id": "u0", "text": DOC}])
    r = cli("run", "air", corpus, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "-q")
    assert r.exit_code == 2
    assert "--judge-mode logprob (formerly --score-mode logprob) in stage air.score (or use --judge-mode rubric)" in r.output
    assert backend.history == []


# -- stage declarations ------------------------------------------------------------------------------
def test_declared_inputs_chain_from_the_units_through_each_method(registry):
    """Run alone, each method's stages find their inputs in its units or an earlier stage's outputs
    (what ``btkit run PIPELINE --check`` checks for a chain)."""
    for name in first_party_methods(registry):
        method = registry.method(name)
        have = set(method.unit_fields)
        for info in method.stages:
            assert set(info.inputs) <= have, f"{name}.{info.name} needs {set(info.inputs) - have}"
            have |= set(info.outputs)


@pytest.mark.parametrize("name", sorted({label.split(".")[0] for label in KNOWN_JUDGES}))
def test_declared_fields_are_there_when_each_stage_runs(cli, scripted, registry, tmp_path, name):
    spy = FieldSpy()
    registry.register(spy, name="field-spy")
    method = registry.method(name)
    backend, r, out = run_method(cli, scripted, registry, tmp_path, name)
    assert r.exit_code == 0, r.output
    assert read_jsonl(out / "data.jsonl")
    for info in method.stages:
        label = f"{name}.{info.name}"
        if info.name not in method.default_stages:
            continue
        assert spy.before.get(label), f"{label} saw no record"
        assert spy.after.get(label), f"{label} kept no record"
        for fields in spy.before[label]:
            assert set(info.inputs) <= fields, f"{label} ran without {set(info.inputs) - fields}"
        for fields in spy.after[label]:
            assert set(info.outputs) <= fields, f"{label} declares {set(info.outputs) - fields} but did not set it"
