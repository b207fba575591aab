"""Prompt templates: golden renders of Humpback's stages, overrides, listing, and early failures."""

from __future__ import annotations


import pytest

from btkit.prompts import PromptLibrary

from conftest import write_jsonl

SEED = [
    {"instruction": "How do I list hidden files?", "response": "Use ls -a: the -a flag includes entries whose names start with a dot."},
    {"instruction": "What is a symlink?", "response": "A symbolic link is a file that points to another path."},
]
DOC = "The dpkg tool installs a single .deb file.\n\nThe apt tool resolves dependencies."


def library(registry, overrides=()):
    return PromptLibrary(registry.prompt_roots(), overrides)


CASES = {
    "augment": ("humpback/augment", {"text": DOC, "examples": SEED}),
    "augment_zero_shot": ("humpback/augment", {"text": DOC, "examples": []}),
    "curate_rubric": ("humpback/curate", {"instruction": "How do I install a .deb file?", "response": DOC, "mode": "rubric"}),
    "curate_logprob": ("humpback/curate", {"instruction": "How do I install a .deb file?", "response": DOC, "mode": "logprob"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_humpback_prompts(registry, golden, case):
    name, variables = CASES[case]
    golden(f"humpback/{case}.txt", library(registry).render(name, variables))


def test_augment_uses_seed_pairs_reversed_as_chat_turns(registry):
    p = library(registry).render("humpback/augment", {"text": DOC, "examples": SEED})
    roles = [m["role"] for m in p.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    # reversed: the seed response is what the model sees, the seed instruction is what it answers
    assert SEED[0]["response"] in p.messages[1]["content"]
    assert p.messages[2]["content"] == SEED[0]["instruction"]
    assert DOC in p.messages[-1]["content"]


def test_logprob_mode_prefills_score(registry):
    p = library(registry).render("humpback/curate", CASES["curate_logprob"][1])
    assert p.assistant_prefix == "Score: "
    assert library(registry).render("humpback/curate", CASES["curate_rubric"][1]).assistant_prefix == ""


def test_corpus_text_is_never_template_source(registry):
    evil = "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}"
    p = library(registry).render("humpback/augment", {"text": evil, "examples": []})
    assert evil in p.messages[-1]["content"]
    assert "49" not in p.messages[-1]["content"]


def test_override_by_name(registry, tmp_path):
    (tmp_path / "humpback").mkdir()
    (tmp_path / "humpback" / "curate.j2").write_text("Rate: {{ instruction }} / {{ response }} ({{ mode }})")
    lib = library(registry, [tmp_path])
    p = lib.render("humpback/curate", {"instruction": "Q", "response": "A", "mode": "rubric"})
    assert p.messages == [{"role": "user", "content": "Rate: Q / A (rubric)"}]
    assert lib.path("humpback/augment").parent.parent != tmp_path  # others still built-in


def test_template_hash_changes_with_source(registry, tmp_path):
    base = library(registry).template_hash("humpback/curate")
    (tmp_path / "humpback").mkdir()
    (tmp_path / "humpback" / "curate.j2").write_text("{{ instruction }}{{ response }}{{ mode }}")
    assert library(registry, [tmp_path]).template_hash("humpback/curate") != base


def test_prompts_cli_lists_and_shows(cli):
    r = cli("prompts")
    assert r.exit_code == 0
    assert "humpback/augment" in r.output and "humpback/curate" in r.output
    r = cli("prompts", "show", "humpback/curate")
    assert r.exit_code == 0
    assert "Score: <rating>" in r.output
    r = cli("prompts", "show", "humpback/nope")
    assert r.exit_code == 2 and "no template named 'humpback/nope'" in r.output


def test_undefined_variable_fails_before_any_model_call(cli, scripted, tmp_path):
    backend, spec = scripted(default="What is dpkg?")
    (tmp_path / "p" / "humpback").mkdir(parents=True)
    (tmp_path / "p" / "humpback" / "curate.j2").write_text("{{ instruction }} {{ response }} {{ colour }}")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": " ".join(["word"] * 50)}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--prompts", tmp_path / "p", "-q")
    assert r.exit_code == 2
    assert "colour" in r.output and "curate.j2" in r.output
    assert backend.history == []
