"""CRAB: rule constraints that really hold (property test), ROUGE-L dedup, the JSON parser, golden
prompts, forward/reverse examples on a scripted backend, any JSONL as input, and a real-model run."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btkit.methods import ParseError
from btkit.prompts import PromptLibrary
from btkit_plugins.methods.crab import LLM_TYPES, dedup_constraints, parse_llm_constraints
from btkit_plugins.methods.crab import rules
from btkit.kit.text import count_words, paragraphs, rouge_l, sentences
from btkit.kit.verdict import parse_binary

from conftest import EXAMPLES, read_jsonl, write_jsonl


RESPONSE = ("Use `ls -a` to list hidden files. The -a flag shows entries whose names start with a dot.\n\n"
            "To see them with details, combine it with -l. Hidden files are ordinary files.")


# -- golden prompts ---------------------------------------------------------------------------
TYPES = [{"name": k, "description": v} for k, v in LLM_TYPES.items()]
CASES = {
    "constrain": ("crab/constrain", {"instruction": "How do I list hidden files?", "response": RESPONSE, "types": TYPES}),
    "verify_rubric": ("crab/verify", {"instruction": "How do I list hidden files?", "response": RESPONSE,
                                      "constraint": "Explain the command in a friendly, practical tone for beginners.", "mode": "rubric"}),
    "verify_logprob": ("crab/verify", {"instruction": "How do I list hidden files?", "response": RESPONSE,
                                       "constraint": "Explain the command in a friendly, practical tone for beginners.", "mode": "logprob"}),
    "forward": ("crab/forward", {"instruction": "How do I list hidden files?", "response": RESPONSE,
                                 "constraints": ["Answer with at most 40 words.", "Include the keywords \"hidden\" and \"files\" in your response."]}),
    "reverse": ("crab/reverse", {"instruction": "How do I list hidden files?", "response": RESPONSE,
                                 "constraints": ["Answer with at most 40 words.", "Do not use any commas in your response.", "Keep every sentence to at most 15 words."]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_crab_prompts(registry, golden, case):
    name, variables = CASES[case]
    golden(f"crab/{case}.txt", PromptLibrary(registry.prompt_roots()).render(name, variables))


def test_constrain_prompt_names_all_ten_types(registry):
    text = PromptLibrary(registry.prompt_roots()).render(*CASES["constrain"]).messages[-1]["content"]
    for name in LLM_TYPES:
        assert f"- {name}:" in text
    assert len(LLM_TYPES) == 10


# -- text measures and ROUGE-L --------------------------------------------------------------------
def test_words_sentences_paragraphs():
    assert count_words("Don't stop -- x-ray, 42 times!") == 5  # don't, stop, x-ray, 42, times
    assert paragraphs("a\n\n  \n\nb\nc") == ["a", "b\nc"]
    assert sentences("One. Two!  Three? four\n- item five") == ["One.", "Two!", "Three?", "four", "- item five"]
    assert sentences("第一句。第二句！") == ["第一句。", "第二句！"]


def test_rouge_l_values():
    assert rouge_l("Answer with at most 40 words.", "answer with at most 40 words") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P = R = 3/4
    assert rouge_l("x", "") == 0.0
    assert rouge_l("a b c d e", "a c") == rouge_l("a c", "a b c d e")


def test_dedup_removes_near_duplicates_and_says_which():
    cs = [{"text": "Write in a formal and neutral tone for system administrators."},
          {"text": "Write in a formal, neutral tone for system administrators."},
          {"text": "Use a numbered list for the installation steps."}]
    kept, removed = dedup_constraints(cs, 0.6)
    assert [c["text"] for c in kept] == [cs[0]["text"], cs[2]["text"]]
    assert removed[0]["removed"] == "near_duplicate" and removed[0]["duplicate_of"] == cs[0]["text"] and removed[0]["rouge_l"] > 0.6


# -- rule constraints -------------------------------------------------------------------------------
def test_rule_constraints_of_a_known_text():
    found = {c["type"]: c for c in rules.rule_constraints(RESPONSE, random.Random(0))}
    assert {"forbidden_punctuation", "keywords", "max_sentences_per_paragraph", "max_words_per_sentence"} <= set(found)
    assert found["forbidden_punctuation"]["params"]["name"] != "commas"  # the text has a comma
    assert not any(ch in RESPONSE for ch in rules.PUNCTUATION[found["forbidden_punctuation"]["params"]["name"]])
    assert rules.punctuation_constraint("No commas at all here.", random.Random(0))["params"] == {"name": "commas"}
    assert found["max_sentences_per_paragraph"]["params"] == {"n": 2}
    assert found["max_words_per_sentence"]["params"] == {"n": 15}  # longest sentence 13 words, rounded up to 5
    assert "hidden" in found["keywords"]["params"]["keywords"] or "files" in found["keywords"]["params"]["keywords"]
    assert "min_chars_per_word" not in found  # "a" is one character
    assert all(c["source"] == "rule" and c["verified_by"] == "code" for c in found.values())


@pytest.mark.parametrize("constraint,good,bad", [
    ({"type": "word_count_min", "params": {"n": 3}}, "one two three", "one two"),
    ({"type": "word_count_max", "params": {"n": 3}}, "one two three", "one two three four"),
    ({"type": "word_count_around", "params": {"n": 50}}, " ".join(["w"] * 45), " ".join(["w"] * 44)),
    ({"type": "word_count_range", "params": {"lo": 2, "hi": 3}}, "one two", "one"),
    ({"type": "forbidden_punctuation", "params": {"name": "commas"}}, "no commas here.", "one, two"),
    ({"type": "forbidden_punctuation", "params": {"name": "commas"}}, "none", "中文，逗号"),
    ({"type": "keywords", "params": {"keywords": ["apt", "dpkg"]}}, "Apt calls DPKG.", "apt alone; dpkgs is another word"),
    ({"type": "max_sentences_per_paragraph", "params": {"n": 2}}, "One. Two.\n\nThree.", "One. Two. Three."),
    ({"type": "max_words_per_sentence", "params": {"n": 3}}, "One two three. Four.", "One two three four."),
    ({"type": "min_chars_per_word", "params": {"n": 3}}, "the cat sat", "the cat is"),
])
def test_rule_checks_accept_and_refuse(constraint, good, bad):
    assert rules.check(constraint, good)
    assert not rules.check(constraint, bad)


def test_length_constraints_all_hold_for_every_choice():
    for n in (1, 7, 19, 20, 25, 99, 123, 1000):
        text = " ".join(["word"] * n)
        for seed in range(12):
            c = rules.length_constraint(count_words(text), random.Random(seed))
            assert rules.check(c, text), (n, c)
            assert str(c["params"].get("n", c["params"].get("lo"))) in c["text"]


def test_no_constraints_from_an_empty_text():
    assert [c["type"] for c in rules.rule_constraints("", random.Random(0))] == ["forbidden_punctuation"]
    assert rules.rule_constraints("...!?,;:", random.Random(0)) == []


_WORDS = st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd")), min_size=1, max_size=12)
_SEPARATORS = st.sampled_from([" ", " ", " ", ", ", ". ", "! ", "? ", "; ", ": ", "\n", "\n\n", " - ", "'", "。", "，", "\t"])
_STRUCTURED = st.lists(st.tuples(_WORDS, _SEPARATORS), max_size=80).map(lambda parts: "".join(w + s for w, s in parts))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(_STRUCTURED, st.text(max_size=300)), seed=st.integers(0, 2**32 - 1))
def test_property_rule_constraints_hold_on_the_text_they_came_from(text, seed):
    for c in rules.rule_constraints(text, random.Random(seed)):
        assert rules.check(c, text), c
        assert c["text"].strip() and c["type"] in rules.RULE_TYPES


@settings(max_examples=100, deadline=None)
@given(text=_STRUCTURED, seed=st.integers(0, 1000))
def test_property_rule_constraints_are_deterministic_per_seed(text, seed):
    assert rules.rule_constraints(text, random.Random(seed)) == rules.rule_constraints(text, random.Random(seed))


# -- parsing the model's constraints --------------------------------------------------------------
def test_parser_reads_a_realistic_reply_with_prose_fence_and_nulls():
    reply = """Here are the constraints:
```json
{
  "writing_style": "Write in a concise, practical tone suitable for Linux beginners.",
  "semantic_elements": "Focus on listing hidden files and explain why their names start with a dot.",
  "Multilingual": "NULL",
  "special_output_format": null,
  "Key_Formatting_Constraints": "Format every command in inline code, such as `ls -a`.",
  "favourite_colour": "Mention the colour blue somewhere in the answer please.",
  "paragraphs": "Two."
}
```"""
    found, rejected = parse_llm_constraints(reply)
    assert [(c["type"], c["source"]) for c in found] == [("writing_style", "llm"), ("semantic_elements", "llm"), ("key_formatting", "llm")]
    assert {r["reason"] for r in rejected} == {"unknown_type", "too_short"}


@pytest.mark.parametrize("reply,reason", [
    ("", "empty_reply"), (None, "empty_reply"),
    ("I think the style is formal.", "no_json"),
    ('{"writing_style": "Write formally', "no_json"),
    ('{"writing_style": "Write formally",}', "invalid_json"),
])
def test_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_llm_constraints(reply)
    assert e.value.reason == reason


@pytest.mark.parametrize("reply,expected", [("Yes", True), ("no.", False), ("Answer: Yes, it does.", True),
                                            ("Yes or no? Answer: No", False), ("**No**, the response uses commas.", False)])
def test_binary_parser(reply, expected):
    assert parse_binary(reply, "Yes", "No") is expected


@pytest.mark.parametrize("reply,reason", [("", "empty_reply"), ("Maybe.", "no_verdict"), ("Yes and no.", "ambiguous_verdict")])
def test_binary_parser_refuses(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_binary(reply, "Yes", "No")
    assert e.value.reason == reason


# -- whole runs on a scripted backend ---------------------------------------------------------------
LLM_REPLY = json.dumps({
    "writing_style": "Write in a concise, practical tone suitable for Linux beginners.",
    "semantic_elements": "Explain both how to show hidden files and why their names begin with a dot.",
    "key_formatting": "Format every shell command as inline code, for example `ls -a`.",
    "morphological": "Write in a concise and practical tone suitable for Linux beginners.",  # near-duplicate of the first
    "multilingual": None,
})


def crab_reply(messages, params):
    content = messages[-1]["content"]
    if "Reply with one JSON object" in content:
        return LLM_REPLY
    if "Reply with one word: Yes or No" in content:
        return "No" if "inline code" in content else "Yes"  # the model rejects one constraint
    raise AssertionError("unexpected prompt")


def test_run_on_pairs_with_custom_fields_writes_forward_and_reverse(cli, scripted, tmp_path):
    backend, spec = scripted(default=crab_reply)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"qid": "q1", "q": "How do I list hidden files?", "a": RESPONSE},
                                                    {"qid": "q2", "q": "Empty one", "a": "   "}])
    out = tmp_path / "out"
    r = cli("run", "crab", pairs, "-o", out, "--model", spec, "--instruction-field", "q", "--response-field", "a",
            "--id-field", "qid", "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(out / "data.jsonl")
    assert [d["meta"]["crab_example"] for d in data] == ["forward", "reverse"]
    fwd, rev = data
    assert set(fwd) == {"instruction", "response", "system", "meta"}
    assert fwd["response"] == RESPONSE and fwd["instruction"].startswith("How do I list hidden files?\n\nYour answer must meet")
    used = [c["text"] for c in fwd["meta"]["constraints"]]
    # 5 rule + 2 verified LLM constraints: fewer than the paper's 8, so 6 or 7 of them
    assert 6 <= len(used) <= 7 and fwd["meta"]["n_constraints"] == len(used) and all(u in fwd["instruction"] for u in used)
    assert "Format every shell command as inline code, for example `ls -a`." not in used  # rejected by the model check
    for c in fwd["meta"]["constraints"]:
        if c["source"] == "rule":
            assert rules.check(c, RESPONSE)
        assert c["verified"] is True
    assert 3 <= rev["meta"]["n_constraints"] <= 6
    assert RESPONSE in rev["instruction"] and rev["response"].startswith("1. ")
    assert len(rev["response"].splitlines()) == rev["meta"]["n_constraints"]
    removed = {c["text"]: c["removed"] for c in fwd["meta"]["constraints_removed"]}
    assert removed["Write in a concise and practical tone suitable for Linux beginners."] == "near_duplicate"
    assert removed["Format every shell command as inline code, for example `ls -a`."] == "llm_rejected"
    cands = {c["id"]: c for c in read_jsonl(out / "candidates.jsonl")}
    assert cands["q2"]["reason"] == "empty_pair" and cands["q2"]["dropped_at"] == "crab.prepare"
    assert cands["q1~forward"]["lineage"][0]["template"] == "crab/constrain"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["stages"]["crab.constrain"]["calls"] == 1 and stats["kept"] == 2


def test_btkit_data_jsonl_is_valid_input_and_ids_come_from_meta(cli, scripted, tmp_path):
    backend, spec = scripted(default=crab_reply)
    rows = [{"instruction": "How do I list hidden files?", "response": RESPONSE, "system": "Answer with knowledge from web search.",
             "meta": {"id": "doc7#0", "source_id": "doc7", "method": "humpback"}}]
    out = tmp_path / "out"
    r = cli("run", "crab", write_jsonl(tmp_path / "data.jsonl", rows), "-o", out, "--model", spec,
            "--no-llm-constraints", "--no-reverse", "--forward-constraints", "2-2", "-q")
    assert r.exit_code == 0, r.output
    [row] = read_jsonl(out / "data.jsonl")
    assert row["meta"]["id"] == "doc7#0~forward" and row["meta"]["source_id"] == "doc7"
    assert row["system"] == "Answer with knowledge from web search."
    assert len(row["meta"]["constraints"]) == 2 and all(c["source"] == "rule" for c in row["meta"]["constraints"])
    assert backend.history == []  # rule constraints only: no model call


def test_missing_field_names_the_option(cli, scripted, tmp_path):
    _, spec = scripted(default=crab_reply)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"question": "x", "answer": "y"}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 2
    assert "field 'instruction'" in r.output and "--instruction-field" in r.output


def test_logprob_verification_reads_yes_no(cli, scripted, tmp_path):
    def lp(messages, prefix, candidates):
        assert prefix == "Answer: " and candidates == ["Yes", "No"]
        return {"Yes": -0.1, "No": -2.5} if "beginners" in messages[-1]["content"] else {"Yes": -3.0, "No": -0.05}

    backend, spec = scripted(default=crab_reply, logprobs=lp)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    fwd = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    llm = [c for c in fwd["meta"]["constraints"] if c["source"] == "llm"]
    assert [c["text"] for c in llm] == ["Write in a concise, practical tone suitable for Linux beginners."]
    assert llm[0]["verdict_mode"] == "logprob" and llm[0]["p_yes"] > 0.9


# -- the paper's counts: forward 6-8 constraints, reverse 3-6 ----------------------------------------
#: Ten distinct LLM constraints (one per type) that RESPONSE satisfies, none a near-duplicate of another
#: or of a rule constraint: with the 5 rule constraints RESPONSE yields, 15 are available.
TEN = {
    "writing_style": "Write in a concise, practical tone suitable for Linux beginners.",
    "semantic_elements": "Explain both how to show hidden files and why their names begin with a dot.",
    "morphological": "Avoid jargon such as inode or filesystem metadata anywhere in your explanation.",
    "multilingual": "Write the whole explanation in plain English without any words from other languages.",
    "hierarchical_instructions": "First give the basic command, then describe the extra option for detailed output.",
    "special_output_format": "Present the reply as plain prose rather than a table, JSON or HTML markup.",
    "paragraphs": "Split the explanation into exactly two paragraphs separated by one blank line.",
    "specific_sentence": "End your reply with a sentence stating that hidden files are ordinary files.",
    "key_formatting": "Wrap each shell command and flag in backticks so it reads as inline code.",
    "item_listing": "Do not use bullet points, numbered items or hyphenated lists anywhere.",
}


def ten_reply(messages, params):
    content = messages[-1]["content"]
    if "Reply with one JSON object" in content:
        return json.dumps(TEN)
    if "Reply with one word: Yes or No" in content:
        return "Yes"
    raise AssertionError("unexpected prompt")


def test_forward_and_reverse_use_the_papers_counts_when_enough_constraints_exist(cli, scripted, tmp_path):
    backend, spec = scripted(default=ten_reply)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "instruction": "How do I list hidden files?", "response": RESPONSE}
                                               for i in range(10)])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert not any(c["meta"].get("constraints_removed") for c in cands)  # all 15 survive dedup and verification
    forward = [d["meta"]["n_constraints"] for d in data if d["meta"]["crab_example"] == "forward"]
    reverse = [d["meta"]["n_constraints"] for d in data if d["meta"]["crab_example"] == "reverse"]
    assert len(forward) == len(reverse) == 10
    assert all(6 <= n <= 8 for n in forward), forward
    assert all(3 <= n <= 6 for n in reverse), reverse
    for d in data:  # what the meta says is what the example holds
        assert len(d["meta"]["constraints"]) == d["meta"]["n_constraints"]
        assert len({c["text"] for c in d["meta"]["constraints"]}) == d["meta"]["n_constraints"]


def test_with_fewer_constraints_than_the_minimum_every_one_is_used(cli, scripted, tmp_path):
    backend, spec = scripted(default=ten_reply)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "instruction": "How do I list hidden files?", "response": RESPONSE}
                                               for i in range(6)])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--no-llm-constraints", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(tmp_path / "out" / "data.jsonl")
    available = len(rules.rule_constraints(RESPONSE, random.Random(0)))
    assert available == 5  # fewer than the forward minimum of 6
    forward = [d for d in data if d["meta"]["crab_example"] == "forward"]
    reverse = [d for d in data if d["meta"]["crab_example"] == "reverse"]
    assert [d["meta"]["n_constraints"] for d in forward] == [available] * 6
    assert all(3 <= d["meta"]["n_constraints"] <= available for d in reverse)
    assert backend.history == []


# -- JSON-schema output where the backend can do it ---------------------------------------------------
def test_constrain_sends_a_json_schema_to_a_backend_that_supports_it(cli, scripted, tmp_path):
    from btkit.backends import JSON_SCHEMA
    from btkit_plugins.methods.crab import constraints_schema

    backend, spec = scripted(default=crab_reply)
    backend.capabilities = backend.capabilities | {JSON_SCHEMA}
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    constrain = [h for h in backend.history if "Reply with one JSON object" in h["messages"][-1]["content"]]
    verify = [h for h in backend.history if "Reply with one word: Yes or No" in h["messages"][-1]["content"]]
    assert len(constrain) == 1 and verify
    schema = constrain[0]["params"]["json_schema"]
    assert schema == constraints_schema() and constrain[0]["params"]["json_schema_name"] == "crab_constraints"
    assert set(schema["properties"]) == set(LLM_TYPES) and set(schema["required"]) == set(LLM_TYPES)
    assert schema["additionalProperties"] is False
    assert all(p == {"type": ["string", "null"], "description": LLM_TYPES[k]} for k, p in schema["properties"].items())
    assert not any("json_schema" in h["params"] for h in verify)  # a Yes/No check expects no JSON
    fwd = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    assert any(c["source"] == "llm" for c in fwd["meta"]["constraints"])  # the reply is still parsed as before


def test_constrain_sends_no_schema_to_a_backend_without_it(cli, scripted, tmp_path):
    backend, spec = scripted(default=crab_reply)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    assert backend.history and not any("json_schema" in h["params"] or "json_schema_name" in h["params"] for h in backend.history)


def test_schema_is_strict_mode_valid_and_matches_the_parser():
    from btkit_plugins.methods.crab import constraints_schema

    schema = constraints_schema()
    # an object the schema allows is one the parser reads: every key a known type, null skipped
    reply = json.dumps({k: (TEN[k] if i % 2 else None) for i, k in enumerate(schema["required"])})
    found, rejected = parse_llm_constraints(reply)
    assert [c["type"] for c in found] == [k for i, k in enumerate(schema["required"]) if i % 2] and rejected == []


# -- verification through the engine's parse policy --------------------------------------------------
def verify_reply(first_beginner_replies):
    """crab_reply, but the check of the 'beginners' constraint answers from a queue first."""
    queue = list(first_beginner_replies)

    def reply(messages, params):
        content = messages[-1]["content"]
        if "Reply with one word: Yes or No" in content and "Linux beginners" in content.split("<<<CONSTRAINT", 1)[1] and queue:
            return queue.pop(0)
        return crab_reply(messages, params)
    return reply


def test_unparseable_check_is_resampled_with_parse_retries(cli, scripted, tmp_path):
    backend, spec = scripted(default=verify_reply(["Hard to tell."]))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "--parse-retries", "1", "-q")
    assert r.exit_code == 0, r.output
    fwd = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    # only the near-duplicate and the model's "No" are removed: the retried check verified its constraint
    assert {c["removed"] for c in fwd["meta"]["constraints_removed"]} == {"near_duplicate", "llm_rejected"}
    retried = [s for s in fwd["meta"]["lineage"] if s["stage"] == "crab.verify" and s.get("attempt") == 1]
    assert len(retried) == 1 and retried[0]["parsed"] == {"verdict": "Yes"}
    first = next(s for s in fwd["meta"]["lineage"] if s["step"] == retried[0]["retry_of"])
    assert first["parse_error"] == "no_verdict" and first["raw"] == "Hard to tell."
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 1 and stats["stages"]["crab.verify"]["parse_retries_recovered"] == 1


def test_unparseable_check_without_retries_removes_the_constraint_with_its_reason(cli, scripted, tmp_path):
    backend, spec = scripted(default=verify_reply(["Hard to tell."]))
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "rubric", "-q")
    assert r.exit_code == 0, r.output
    fwd = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    removed = {c["text"]: c for c in fwd["meta"]["constraints_removed"]}
    c = removed["Write in a concise, practical tone suitable for Linux beginners."]
    assert c["removed"] == "unverifiable" and c["verdict_error"] == "no_verdict"
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["parse_retries"] == 0 and stats["stages"]["crab.verify"]["parse_failures"] == {"no_verdict": 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_yes_no_logprobs_are_unverifiable_not_rejected(cli, scripted, tmp_path, bad):
    def lp(messages, prefix, candidates):
        if "beginners" in messages[-1]["content"].split("<<<CONSTRAINT", 1)[1]:
            return {"Yes": bad, "No": -2.0}
        return {"Yes": -0.1, "No": -2.5}

    backend, spec = scripted(default=crab_reply, logprobs=lp)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "How do I list hidden files?", "response": RESPONSE}])
    r = cli("run", "crab", pairs, "-o", tmp_path / "out", "--model", spec, "--judge-mode", "logprob", "-q")
    assert r.exit_code == 0, r.output
    fwd = read_jsonl(tmp_path / "out" / "data.jsonl")[0]
    removed = {c["text"]: c for c in fwd["meta"]["constraints_removed"]}
    c = removed["Write in a concise, practical tone suitable for Linux beginners."]
    assert c["removed"] == "unverifiable" and c["verdict_error"] == "invalid_logprobs" and "p_yes" not in c
    assert {c["removed"] for c in fwd["meta"]["constraints_removed"]} == {"near_duplicate", "unverifiable"}  # the others still pass


@pytest.mark.model
def test_crab_on_seed_pairs_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "crab", str(EXAMPLES / "seed.jsonl"), "-o", str(out), "--limit", "2",
           "--max-tokens", "48", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands = read_jsonl(out / "candidates.jsonl")
    assert cands and all((c["status"] == "kept") == (c["reason"] is None) for c in cands)
    for c in cands:
        if c["status"] == "dropped":
            assert c["dropped_at"].startswith("crab.") and c["reason"]
    pairs = {json.loads(l)["instruction"]: json.loads(l)["response"] for l in (EXAMPLES / "seed.jsonl").read_text().splitlines()[:2]}
    for row in read_jsonl(out / "data.jsonl"):
        assert row["meta"]["crab_example"] in ("forward", "reverse")
        assert row["meta"]["constraints"]
        if row["meta"]["crab_example"] == "forward":  # the original response, constraints that hold on it
            base = next(i for i in pairs if row["instruction"].startswith(i))
            assert row["response"] == pairs[base]
            for c in row["meta"]["constraints"]:
                if c["source"] == "rule":
                    assert rules.check(c, row["response"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "complete" and stats["records"] == len(cands)
