"""Self-Lengthen: the response checks (end punctuation, repeated n-grams, meta talk), the Extender's
arithmetic (first half, two thirds kept, acceptance above 1.2x), the extender pair's dropped lines,
LonGen's length score, golden prompts, the three stages on a scripted backend (both roles written,
every failure a counted drop with its reason, growth per round in stats.json), and a real-model run."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btkit.methods import ParseError
from btkit.prompts import PromptLibrary
from btkit_plugins.methods.self_lengthen import (
    accepted, check_response, count_words, drop_lines, short_drops, ends_in_punctuation, first_half, keep_prefix, length_range,
    length_report, length_score, meta_commentary, ngram_units, parse_length_target, repeated_ngram,
)

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

# -- the response checks -----------------------------------------------------------------------------


def test_count_words_counts_as_the_paper_does():
    """Whitespace tokens, and each CJK character (CJK punctuation counts nothing): utils.count_words."""
    assert count_words("Run apt-get update, then reboot.") == 5
    assert count_words("") == 0 and count_words("-- ** ##") == 3
    assert count_words("使用 git rebase 命令。") == 2 + 2 + 2  # 使, 用, 命, 令, git, rebase


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab .,\n\t-使用。"), max_size=80))
def test_count_words_matches_the_papers_definition(text):
    cjk = re.findall(r"[\u4e00-\u9fff]", text)
    rest = re.sub(r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]", " ", text).split()
    assert count_words(text) == len(cjk) + len(rest)


def test_ngram_units_split_cjk_characters():
    assert ngram_units("git 变基 now") == ["git", "变", "基", "now"]


@pytest.mark.parametrize("text,ok", [
    ("It works.", True), ("Really?", True), ("Done!", True), ("He said \"yes.\"", True), ("(see above)", True),
    ("```\nls -a\n```", True), ("完成。", True), ("Wait…", True),
    ("and then", False), ("items:", False), ("a, b,", False), ("", False), ("   ", False),
])
def test_ends_in_punctuation(text, ok):
    assert ends_in_punctuation(text) is ok


def test_repeated_ngram_finds_the_first_repeat():
    text = "one two three four five six seven eight nine ten eleven one two three four five six seven eight nine ten twelve."
    assert repeated_ngram(text, 10) == tuple("one two three four five six seven eight nine ten".split())
    assert repeated_ngram(text, 11) is None  # "ten" vs "ten." differ: only 10 tokens repeat
    assert repeated_ngram(words(200), 10) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=60), st.integers(1, 12))
def test_repeated_ngram_agrees_with_counting_every_window(tokens, n):
    text = " ".join(f"w{t}" for t in tokens)
    grams = [tuple(text.split()[i:i + n]) for i in range(len(tokens) - n + 1)]
    found = repeated_ngram(text, n)
    assert (found is not None) == (len(set(grams)) < len(grams))
    if found is not None:
        assert grams.count(found) >= 2


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 150), st.integers(2, 15), st.integers(0, 150))
def test_a_copied_window_is_always_found(start, n, at):
    base = words(160).split()
    s = start % (160 - n)
    window = base[s:s + n]
    at = at % 160
    if s < at < s + n:  # inserting inside the original occurrence would break it apart
        at = s
    text = base[:at] + window + base[at:]
    assert repeated_ngram(" ".join(text), n) is not None


@pytest.mark.parametrize("text,reason", [
    ("", "empty_reply"),
    ("I'm sorry, I cannot write that.", "refusal"),
    ("The answer trails off and", "no_end_punctuation"),
    ("Here is the revised version of the guide.\n\nAPT reads preferences files.", "meta_commentary"),
    ("APT reads preferences files.\n\nI hope this response helps.", "meta_commentary"),
    (" ".join(["apt pins a package to a release so upgrades keep it there"] * 2) + ".", "repeated_ngram"),
])
def test_check_response_names_the_failed_check(text, reason):
    with pytest.raises(ParseError) as e:
        check_response(text)
    assert e.value.reason == reason


def test_check_response_keeps_good_text_and_can_skip_the_meta_check():
    good = "APT reads preferences files.\n\nA higher priority wins."
    assert check_response(f"  {good}\n") == good
    meta = "The revised plan keeps backups offsite.\n\nTest the restores."
    assert meta_commentary(meta) == "revised"
    assert check_response(meta, meta_check=False) == meta
    middle = "Start here.\n\nLine two.\n\nThe HTTP response code matters here.\n\nLine four.\n\nLine five.\n\nEnd."
    assert meta_commentary(middle) is None  # only the first 2 and last 3 lines are checked
    assert meta_commentary("Responsive design.") is None  # whole words only


# -- the Extender's arithmetic -------------------------------------------------------------------------
def test_first_half_by_paragraphs_then_lines_then_sentences():
    assert first_half("p1\n\np2\n\np3\n\np4\n\np5") == "p1\n\np2"  # five paragraphs: the first two
    assert first_half("p1\n\np2") == "p1"  # two paragraphs: split by lines (p1, '', p2) -> the first
    assert first_half("l1\nl2\nl3\nl4") == "l1\n\nl2"  # lines joined by a blank line, as the paper does
    assert first_half("One. Two. Three. Four.") == "One. Two."  # one line: by sentences


def test_keep_prefix_keeps_two_thirds_of_the_paragraphs_rounded_down():
    assert keep_prefix("a\n\nb\n\nc") == "a\n\nb"
    assert keep_prefix("a\n\nb\n\nc\n\nd\n\ne") == "a\n\nb\n\nc"
    assert keep_prefix("a\n\nb") == "a"
    assert keep_prefix("only one") == ""


@pytest.mark.parametrize("initial,final,ok", [(100, 121, True), (100, 120, False), (100, 99, False), (0, 1, True), (0, 0, False)])
def test_acceptance_needs_more_than_1_2x(initial, final, ok):
    assert accepted(initial, final) is ok


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 20_000), st.floats(1.0, 3.0))
def test_acceptance_is_strictly_more_than_the_growth_times_the_initial(initial, final, growth):
    assert accepted(initial, final, growth) == (final > growth * initial)
    if accepted(initial, final, growth):
        assert accepted(initial, final + 1, growth) and final > initial


def test_drop_lines_is_seeded_and_keeps_at_least_one_line():
    text = "\n".join(f"line {i}." for i in range(50))
    a, na = drop_lines(text, 0.2, random.Random("u1"))
    b, nb = drop_lines(text, 0.2, random.Random("u1"))
    assert (a, na) == (b, nb) and 0 < na < 25
    assert len(a.split("\n")) == 50 - na and all(line in text.split("\n") for line in a.split("\n"))
    assert drop_lines(text, 0.0, random.Random(1)) == (text, 0)
    kept, n = drop_lines(text, 1.0, random.Random(1))
    assert n == 49 and kept in text.split("\n")


def test_drop_lines_keeps_the_structure_of_what_stays():
    text = "Intro line.\n\nSecond paragraph.\n\n```\napt-get update\napt-get upgrade\n```\n\nLast words."
    rng = random.Random(0)
    for _ in range(30):
        shown, n = drop_lines(text, 0.3, rng)
        assert "\n\n\n" not in shown and not shown.startswith("\n") and not shown.endswith("\n")
        if "apt-get update\napt-get upgrade" not in shown:
            assert n >= 1
        left = [l for l in shown.split("\n") if l.strip()]
        remaining = iter(text.split("\n"))
        assert len(left) == 7 - n and all(l in remaining for l in left)  # a subsequence: in order, unchanged


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["", "a b.", "c d e.", "  ", "```", "x"]), max_size=30), st.floats(0, 1), st.integers(0, 9))
def test_drop_lines_counts_what_it_drops(lines, share, seed):
    text = "\n".join(lines)
    shown, n = drop_lines(text, share, random.Random(seed))
    content = [l for l in lines if l.strip()]
    assert len([l for l in shown.split("\n") if l.strip()]) == len(content) - n
    assert (n < len(content)) or not content


def test_short_drops_reproduce_and_always_take_the_shortest_fifth():
    lengths = [(f"u{i}", 100 + 7 * i) for i in range(200)]
    dropped = short_drops(lengths, "s")
    assert dropped == short_drops(list(reversed(lengths)), "s")  # order does not matter, the seed does
    assert {f"u{i}" for i in range(40)} <= dropped  # rank >= 0.8: 2 r^3 > 1
    assert 0.3 < len(dropped) / 200 < 0.5 and "u199" not in dropped
    assert short_drops([], "s") == set() and short_drops([("only", 5)], "s") == {"only"}  # one response is the shortest


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=60))
def test_short_drops_never_keep_a_length_whose_shorter_peers_all_go(ns):
    lengths = list(enumerate(ns))
    dropped = short_drops(lengths, "p")
    shortest = min(ns)
    assert {k for k, n in lengths if n == shortest} <= dropped  # rank 1 always goes
    assert dropped <= {k for k, _ in lengths}


# -- LonGen's length score ----------------------------------------------------------------------------
@pytest.mark.parametrize("target,kind,a,b", [
    ("about 300", "about", 240, 360), ("around 300 words", "about", 240, 360), ("300", "about", 240, 360),
    ("above 200", "above", 200, 300), ("more than 200 words", "above", 200, 300),
    ("below 400", "below", 200, 400), ("less than 400", "below", 200, 400),
    ("150-600", "range", 150, 600), ("between 150 and 600 words", "range", 150, 600),
])
def test_parse_length_target(target, kind, a, b):
    got = parse_length_target(target)
    assert (got["kind"], got["a"], got["b"]) == (kind, pytest.approx(a), pytest.approx(b))


@pytest.mark.parametrize("target", ["", "long", "600-150", "about 0", "about -3", "above"])
def test_parse_length_target_refuses(target):
    with pytest.raises(ValueError):
        parse_length_target(target)


def test_length_score_values():
    a, b = length_range("about", 300)
    assert length_score(300, a, b) == 1 and length_score(240, a, b) == 1 and length_score(360, a, b) == 1
    assert length_score(120, a, b) == 0 and length_score(180, a, b) == pytest.approx(0.5)
    assert length_score(540, a, b) == 0 and length_score(450, a, b) == pytest.approx(0.5)
    assert length_score(0, a, b) == 0


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["about", "above", "below", "range"]), st.integers(10, 5000), st.integers(0, 5000), st.integers(0, 20000))
def test_length_score_properties(kind, x, extra, n):
    a, b = length_range(kind, x, x + extra if kind == "range" else None)
    s = length_score(n, a, b)
    assert 0 <= s <= 1
    assert (s == 1) == (a <= n <= b)
    if n < a:  # rising towards the range, 0 at half the lower bound
        assert length_score(n + 1, a, b) >= s and (n > a / 2 or s == 0)
    if n > b:  # falling away from it, 0 at 1.5 times the upper bound
        assert length_score(n + 1, a, b) <= s and (n < 1.5 * b or s == 0)


# -- golden prompts -----------------------------------------------------------------------------------
INSTR = "Explain how APT pinning works on Debian and when mixing stable and testing is a bad idea."
DRAFT = "APT pinning sets priorities.\n\nA preferences file lists pins.\n\nMixing releases risks breakage."
CASES = {
    "self_instruct": ("self_lengthen/self_instruct", {"examples": [{"instruction": "Write a detailed tutorial on Samba."},
                                                                   {"instruction": "Compare git merge and git rebase in depth."}]}),
    "judge_rubric": ("self_lengthen/judge", {"instruction": INSTR, "mode": "rubric"}),
    "judge_logprob": ("self_lengthen/judge", {"instruction": INSTR, "mode": "logprob"}),
    "generate": ("self_lengthen/generate", {"instruction": INSTR}),
    "extend": ("self_lengthen/extend", {"instruction": INSTR, "response": "APT pinning sets priorities."}),
    "continue": ("self_lengthen/continue", {"instruction": INSTR, "response": DRAFT, "answer": "APT pinning sets priorities, from 0 to 1000.\n\n"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_self_lengthen_prompts(registry, golden, case):
    name, variables = CASES[case]
    golden(f"self_lengthen/{case}.txt", PromptLibrary(registry.prompt_roots()).render(name, variables))


def test_continue_prefills_the_kept_prefix_after_the_extend_prompt(registry):
    lib = PromptLibrary(registry.prompt_roots())
    ext = lib.render("self_lengthen/extend", {"instruction": INSTR, "response": DRAFT})
    cont = lib.render("self_lengthen/continue", {"instruction": INSTR, "response": DRAFT, "answer": "Kept start.\n\n"})
    assert cont.messages == ext.messages and cont.assistant_prefix == "Kept start.\n\n" and ext.assistant_prefix == ""


# -- the stages on a scripted backend -------------------------------------------------------------------
def paragraphs(n: int, start: int, per: int = 10) -> str:
    return "\n\n".join(words(per, start + i * per) + "." for i in range(n))


def quoted(content: str, label: str) -> str:
    return content.split(f"<<<{label} ")[1].split("\n", 1)[1].rsplit(f"\n{label} ", 1)[0]


class Script:
    """Answers each Self-Lengthen prompt by its shape; ``initial``/``continuation``/``new_instruction``/
    ``verdict`` may be replaced by a test. By default the continuation is as long as the whole draft,
    so every round grows the response."""

    def __init__(self):
        self.initial = lambda i, params: paragraphs(4, 10_000 * (1 + int(params.get("seed") or 0) % 7))
        self.expansion = lambda draft, params: paragraphs(3, 100_000 + 1000 * int(params["seed"]))
        self.continuation = lambda draft, prefix, params: "\n\n" + paragraphs(max(1, count_words(draft) // 10), 500_000 + 1000 * int(params["seed"]))
        self.new_instruction = lambda content, params: f"Write a long, detailed guide about {words(6, 1000 + 10 * params['seed'])} for administrators."
        self.verdict = lambda instruction: "yes"
        self.calls: dict[str, int] = {}

    def __call__(self, messages, params):
        content = messages[-1]["content"]
        if "Write Request" in content:
            kind, reply = "self_instruct", self.new_instruction(content, params)
        elif "suitable for guiding the writing of a long text" in content:
            kind, reply = "judge", self.verdict(quoted(content, "REQUEST"))
        elif "Rewrite the draft into a fuller answer" in content:
            draft = quoted(content, "DRAFT")
            if "assistant_prefix" in params or params.get("seed", 0) % 2:  # the continue call (seed + 1)
                kind, reply = "continue", self.continuation(draft, params.get("assistant_prefix", ""), params)
            else:
                kind, reply = "extend", self.expansion(draft, params)
        elif messages[0]["content"] == "You are a helpful assistant.":
            kind, reply = "generate", self.initial(content, params)
        else:
            raise AssertionError(f"unexpected prompt: {content[:200]}")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return reply


def run(cli, scripted, tmp_path, rows, *extra, script=None, logprobs=None):
    script = script or Script()
    backend, spec = scripted(default=script, logprobs=logprobs or {"yes": -0.05, "no": -4.0})
    tmp_path.mkdir(parents=True, exist_ok=True)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    r = cli("run", "self_lengthen", inp, "-o", out, "--model", spec, "-q", *extra)
    assert r.exit_code == 0, r.output
    return backend, script, out


def check_invariants(out):
    """What every Self-Lengthen run must hold, whatever the model wrote."""
    cands = read_jsonl(out / "candidates.jsonl")
    data = read_jsonl(out / "data.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == len(cands) == stats["kept"] + stats["dropped"] and len(data) == stats["kept"]
    for c in cands:
        assert (c["status"] == "kept") == (c["reason"] is None)
        if c["status"] == "dropped":
            assert c["reason"] and c["dropped_at"].startswith("self_lengthen.")
    for row in data:
        meta = row["meta"]
        assert meta["role"] in ("generator", "extender")
        assert count_words(row["response"]) > 1.2 * count_words(meta["initial_response"]) == 1.2 * meta["initial_words"]
        assert meta["extended_words"] == count_words(row["response"])
        assert check_response(row["response"]) == row["response"]
    by_unit = {}
    for row in data:
        by_unit.setdefault(row["meta"]["id"].rsplit("~", 1)[0], []).append(row["meta"]["role"])
    assert all(sorted(roles) == ["extender", "generator"] for roles in by_unit.values())  # a unit yields both records
    return cands, data, stats


def test_a_unit_yields_a_generator_pair_and_an_extender_pair(cli, scripted, tmp_path):
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}])
    cands, data, stats = check_invariants(out)
    gen, ext = sorted(data, key=lambda r: r["meta"]["role"], reverse=True)
    assert gen["meta"]["role"] == "generator" and gen["instruction"] == INSTR and gen["meta"]["id"] == "pin~gen"
    assert ext["meta"]["role"] == "extender" and ext["meta"]["id"] == "pin~ext"
    assert gen["response"] == ext["response"] and ext["meta"]["base_instruction"] == INSTR
    initial = gen["meta"]["initial_response"]
    assert initial == paragraphs(4, 10_000)  # seed 0
    # the extender's prompt is the extend template over the initial response, some lines dropped
    assert "Rewrite the draft into a fuller answer" in ext["instruction"] and f"Request: {INSTR}" in ext["instruction"]
    shown = quoted(ext["instruction"], "DRAFT").split("\n\n")
    assert set(shown) <= set(initial.split("\n\n")) and len(shown) == 4 - ext["meta"]["dropped_lines"]
    assert ext["system"].startswith("You are an expert editor")
    # three rounds, each extended: 40 -> 20 + 40 -> ... words
    rounds = gen["meta"]["rounds"]
    assert [r["status"] for r in rounds] == ["extended"] * 3
    assert [r["words_before"] for r in rounds] == [40, rounds[0]["words_after"], rounds[1]["words_after"]]
    assert rounds[0]["words_after"] == 20 + 40 and rounds[0]["prefix_words"] == 20
    assert gen["meta"]["extended_words"] == rounds[-1]["words_after"] and gen["meta"]["growth"] > 1.2
    assert script.calls == {"generate": 1, "extend": 3, "continue": 3}
    # the stats section: growth per round
    sl = stats["self_lengthen"]
    assert sl["extensions"] == sl["accepted"] == 1 and sl["records_by_role"] == {"generator": 1, "extender": 1}
    assert [sl["rounds"][k]["extended"] for k in ("1", "2", "3")] == [1, 1, 1]
    assert sl["rounds"]["1"]["mean_words_before"] == 40 and sl["rounds"]["1"]["mean_growth_extended"] == pytest.approx(1.5)
    assert sl["kept_mean_initial_words"] == 40 and sl["kept_mean_extended_words"] == gen["meta"]["extended_words"]
    assert sl["length_targets"] == {"150-600": 1} and sl["mean_length_score_initial"] == pytest.approx(0.0)


def test_extend_calls_show_the_first_half_then_the_whole_draft_with_the_prefix_prefilled(cli, scripted, tmp_path):
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--rounds", "1")
    chats = [h for h in backend.history if h["kind"] == "chat"]
    initial = paragraphs(4, 10_000)
    ext_call, cont_call = chats[1], chats[2]
    assert quoted(ext_call["messages"][-1]["content"], "DRAFT") == first_half(initial) == paragraphs(2, 10_000)
    assert "assistant_prefix" not in ext_call["params"]
    assert quoted(cont_call["messages"][-1]["content"], "DRAFT") == initial
    expansion = paragraphs(3, 100_000 + 1000 * ext_call["params"]["seed"])
    assert cont_call["params"]["assistant_prefix"] == keep_prefix(expansion)
    [gen] = [r for r in read_jsonl(out / "data.jsonl") if r["meta"]["role"] == "generator"]
    assert gen["response"].startswith(keep_prefix(expansion) + "\n\n")  # prefix + continuation


def test_generator_resamples_until_the_checks_pass(cli, scripted, tmp_path):
    script = Script()
    bad = iter(["An answer that stops mid", "Here is the revised version.\n\n" + paragraphs(3, 0)])
    script.initial = lambda i, params: next(bad, None) or paragraphs(4, 10_000)
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--rounds", "1", script=script)
    cands, data, stats = check_invariants(out)
    assert len(data) == 2
    gen_steps = [s for s in data[0]["meta"]["lineage"] if s["stage"] == "self_lengthen.generate"]
    assert [s.get("parse_error") for s in gen_steps] == ["no_end_punctuation", "meta_commentary", None]
    assert stats["stages"]["self_lengthen.generate"]["parse_failures"] == {"no_end_punctuation": 1, "meta_commentary": 1}
    assert len({s["params"]["seed"] for s in gen_steps}) == 3  # each attempt with another seed


def test_generator_gives_up_after_its_retries_with_the_reason(cli, scripted, tmp_path):
    script = Script()
    script.initial = lambda i, params: "pins pins pins pins pins pins pins pins pins pins pins pins."
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--generate-retries", "2", script=script)
    cands, data, stats = check_invariants(out)
    assert data == [] and script.calls == {"generate": 3}
    [c] = cands
    assert (c["dropped_at"], c["reason"]) == ("self_lengthen.generate", "repeated_ngram")
    assert c["meta"]["drop_details"]["attempts"] == 3
    assert stats["dropped_by_reason"] == {"self_lengthen.generate:repeated_ngram": 1}


def test_samples_give_separate_units_of_work(cli, scripted, tmp_path):
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--samples", "2", "--rounds", "1")
    cands, data, stats = check_invariants(out)
    assert sorted(r["meta"]["id"] for r in data) == ["pin~r1~ext", "pin~r1~gen", "pin~r2~ext", "pin~r2~gen"]
    inits = {r["meta"]["initial_response"] for r in data}
    assert len(inits) == 2  # two seeds, two initial responses


def test_a_failed_call_costs_one_sample_only(cli, scripted, tmp_path):
    from btkit.errors import BackendError
    script = Script()
    script.initial = lambda i, params: BackendError("server went away") if params["seed"] == 1 else paragraphs(4, 10_000)
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--samples", "2", "--rounds", "1", script=script)
    cands, data, stats = check_invariants(out)
    assert {r["meta"]["id"] for r in data} == {"pin~r1~gen", "pin~r1~ext"}
    [failed] = [c for c in cands if c["status"] == "dropped"]
    assert (failed["id"], failed["reason"], failed["dropped_at"]) == ("pin~r2", "backend_error", "self_lengthen.generate")
    assert "server went away" in failed["meta"]["drop_details"]["error"] and stats["backend_failures"] == 1


def test_rounds_that_fail_keep_the_best_and_a_short_extension_is_dropped(cli, scripted, tmp_path):
    script = Script()
    outcomes = iter([
        lambda draft: " and it trails off",  # round 1: no end punctuation
        lambda draft: "\n\nShort.",  # round 2: shorter than the draft
        lambda draft: "\n\n" + words(25, 900_000) + ".",  # round 3: longer (20 + 25 words), but 45 is not > 1.2 x 40
    ] * 2)
    script.continuation = lambda draft, prefix, params: next(outcomes)(draft)
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], script=script)
    cands, data, stats = check_invariants(out)
    assert data == []
    [c] = cands
    assert (c["dropped_at"], c["reason"]) == ("self_lengthen.extend", "not_extended")
    assert c["meta"]["drop_details"]["statuses"] == ["no_end_punctuation", "not_longer", "extended"] * 2  # two attempts
    assert [r["attempt"] for r in c["meta"]["rounds"]] == [1, 1, 1, 2, 2, 2]
    assert c["meta"]["initial_words"] == 40 and c["meta"]["extended_words"] == 45
    assert stats["stages"]["self_lengthen.extend"]["dropped"] == {"not_extended": 1}
    sl = stats["self_lengthen"]
    assert sl["not_accepted"] == 1 and sl["rounds"]["1"]["not_extended"] == {"no_end_punctuation": 2}
    assert sl["rounds"]["1"]["extended"] == 0 and sl["rounds"]["3"]["extended"] == 2 and sl["kept_mean_growth"] is None


def test_min_growth_decides_acceptance(cli, scripted, tmp_path):
    script = Script()
    script.continuation = lambda draft, prefix, params: "\n\n" + paragraphs(3, 700_000 + int(params["seed"]) * 100)  # 20 + 30 = 50 words
    backend, script, out = run(cli, scripted, tmp_path, [{"id": "pin", "instruction": INSTR}], "--rounds", "1", script=script)
    assert len(read_jsonl(out / "data.jsonl")) == 2  # 50 > 48
    backend, script, out2 = run(cli, scripted, tmp_path / "b", [{"id": "pin", "instruction": INSTR}], "--rounds", "1",
                                "--min-growth", "1.25", "--extend-attempts", "1", script=script)
    [c] = read_jsonl(out2 / "candidates.jsonl")
    assert c["reason"] == "not_extended" and c["meta"]["extended_words"] == 50  # 50 is not > 50


def test_drop_short_cuts_both_records_of_the_shortest_extensions_at_the_end(cli, scripted, tmp_path):
    script = Script()
    script.initial = lambda content, params: paragraphs(3 + int(re.search(r"topic (\d+)", content).group(1)), 10_000)
    rows = [{"id": f"u{i}", "instruction": f"Explain topic {i} of Debian administration in depth."} for i in range(1, 6)]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--rounds", "1", "--drop-short", script=script)
    cands, data, stats = check_invariants(out)
    cut = [c for c in cands if c["reason"] == "short_by_rank"]
    assert {c["id"] for c in cut} >= {"u1~gen", "u1~ext"}  # the shortest always goes, with both its records
    assert all(c["end_of_run"] and c["dropped_at"] == "self_lengthen.extend" for c in cut)
    assert len({c["id"].split("~")[0] for c in cut}) * 2 == len(cut)  # never one record of a pair
    assert "u5~gen" in {r["meta"]["id"] for r in data}  # the longest stays (rank 1/5: dropped when a draw <= 0.016)
    assert stats["stages"]["self_lengthen.extend"]["dropped_at_end"] == {"short_by_rank": len(cut)}
    sl = stats["self_lengthen"]
    assert sl["dropped_short"] == len(cut) // 2 and sl["accepted"] == 5 and sl["records_by_role"]["generator"] == 5 - len(cut) // 2


def test_length_score_uses_the_row_target(cli, scripted, tmp_path):
    rows = [{"id": "a", "instruction": INSTR, "length_target": "about 100"}, {"id": "b", "instruction": INSTR + " Include examples."}]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--rounds", "1", "--length-target", "above 50")
    cands, data, stats = check_invariants(out)
    by_id = {r["meta"]["id"]: r["meta"] for r in data}
    assert by_id["a~gen"]["length_target"] == "about 100" and by_id["b~gen"]["length_target"] == "above 50"
    a = parse_length_target("about 100")
    assert by_id["a~gen"]["length_score"] == pytest.approx(length_score(by_id["a~gen"]["extended_words"], a["a"], a["b"]), abs=1e-4)
    assert by_id["b~gen"]["length_score_initial"] == pytest.approx(length_score(40, 50, 75), abs=1e-4)
    assert stats["self_lengthen"]["length_targets"] == {"about 100": 1, "above 50": 1}


def test_empty_and_repeated_instructions_are_dropped_while_preparing(cli, scripted, tmp_path):
    rows = [{"id": "a", "instruction": INSTR}, {"id": "b", "instruction": "  "}, {"id": "c", "instruction": INSTR.upper()},
            {"id": "d", "instruction": "Write about cron.", "length_target": "very long"}]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--rounds", "1")
    cands, data, stats = check_invariants(out)
    assert stats["dropped_while_preparing"] == {"empty_instruction": 1, "duplicate": 1, "bad_length_target": 1}
    assert script.calls == {"generate": 1, "extend": 1, "continue": 1}  # no call for a unit dropped while preparing
    assert {r["meta"]["id"] for r in data} == {"a~gen", "a~ext"}


def test_the_stats_section_survives_a_resumed_run_and_stays_out_of_other_runs(cli, scripted, tmp_path):
    backend, spec = scripted(default=Script())
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "pin", "instruction": INSTR}])
    out = tmp_path / "out"
    for _ in range(2):  # the second run finds the journal complete and writes stats.json again
        r = cli("run", "self_lengthen", inp, "-o", out, "--model", spec, "-q", "--rounds", "1")
        assert r.exit_code == 0, r.output
        stats = json.loads((out / "stats.json").read_text())
        if _ == 0:
            first = stats["self_lengthen"]
    assert stats["self_lengthen"] == first and first["accepted"] == 1 and stats["units_resumed"] == 1
    # a pipeline without the extend stage gets no section (and the hook touches no other method's run)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"input: {tmp_path / 'in.jsonl'}\noutput: {tmp_path / 'gen_only'}\nstages:\n"
                        "  - use: self_lengthen.self_instruct\n  - use: self_lengthen.generate\n")
    backend, spec = scripted(default=Script())
    r = cli("run", pipeline, "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "gen_only" / "stats.json").read_text())
    assert "self_lengthen" not in stats and stats["kept"] == 1
    [row] = read_jsonl(tmp_path / "gen_only" / "data.jsonl")
    assert row["response"] == paragraphs(4, 10_000) and "role" not in row["meta"]


SEVEN = "Write a long, detailed guide to topic number seven for Debian administrators."
ESSAY = "Write an in-depth essay on the history of package management on Debian systems."
REPORT = "Write a report comparing the init systems Debian has shipped and why it moved to systemd."


def test_self_instruct_writes_judged_instructions_from_paired_seeds(cli, scripted, tmp_path):
    script = Script()
    s1_replies = iter(["Sure.", "Write a guide.", SEVEN, ESSAY, ESSAY.upper(), REPORT])
    default = script.new_instruction
    script.new_instruction = lambda content, params: (next(s1_replies, "Write a short note.") if content.count("Request 1: Write a detailed tutorial on Samba")
                                                      else default(content, params))
    judged: list[str] = []

    def verdict(instruction):
        judged.append(instruction)
        return "no" if instruction == SEVEN and judged.count(SEVEN) == 1 else "yes"
    script.verdict = verdict
    rows = [{"id": "s1", "instruction": "Write a detailed tutorial on Samba file sharing on Debian."},
            {"id": "s2", "instruction": "Compare git merge and git rebase in depth with examples."}]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--self-instruct", "2", "--judge-mode", "rubric", "--rounds", "1", script=script)
    cands, data, stats = check_invariants(out)
    first = [c for c in cands if c["id"].startswith("s1~i1~")]
    # s1's first instruction: "Sure." and "Write a guide." too short, SEVEN judged no, ESSAY judged yes;
    # its second: ESSAY again (a duplicate, any case), then REPORT
    assert first and all(c["meta"]["self_instruct"]["attempts"] == 4 for c in first)
    second = [c for c in cands if c["id"].startswith("s1~i2~")]
    assert second and all(c["meta"]["self_instruct"]["attempts"] == 2 for c in second)
    assert judged.count(SEVEN) == 1 and judged.count(ESSAY) == 1  # a duplicate is never judged
    assert first[0]["meta"]["self_instruct"]["attempts"] == 4 and second[0]["meta"]["self_instruct"]["attempts"] == 2
    assert first[0]["meta"]["self_instruct"]["seeds"] == [rows[0]["instruction"], rows[1]["instruction"]]  # paired with the other seed
    assert first[0]["fields"]["seed_instruction"] == rows[0]["instruction"]
    gens = {r["meta"]["id"]: r["instruction"] for r in data if r["meta"]["role"] == "generator"}
    assert gens["s1~i1~gen"] == ESSAY and gens["s1~i2~gen"] == REPORT
    assert {"s2~i1~gen", "s2~i2~gen"} <= set(gens) and len(set(gens.values())) == 4
    steps = [s for s in first[0]["lineage"] if s["stage"] == "self_lengthen.self_instruct"]
    assert [s.get("parse_error") for s in steps][:2] == ["too_short", "too_short"]
    prompts = [h["messages"][-1]["content"] for h in backend.history if "Write Request" in h["messages"][-1]["content"]]
    s1_prompt = next(p for p in prompts if "Request 1: Write a detailed tutorial on Samba" in p)
    assert "Request 2: Compare git merge" in s1_prompt and "Write Request 3" in s1_prompt
    asks = [h["params"] for h in backend.history if "Write Request" in h["messages"][-1]["content"]]
    assert all(p["assistant_prefix"] == "Request 3:" and "\nRequest " in p["stop"] for p in asks)  # one request, prefilled
    assert stats["stages"]["self_lengthen.self_instruct"]["parse_failures"] == {"too_short": 2}


def test_self_instruct_drops_an_instruction_that_never_passes(cli, scripted, tmp_path):
    rows = [{"id": "s1", "instruction": "Write a detailed tutorial on Samba file sharing on Debian."}]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--self-instruct", "1", "--instruct-attempts", "3", "--judge-mode", "logprob",
                               logprobs={"yes": -3.0, "no": -0.1})
    [c] = read_jsonl(out / "candidates.jsonl")
    assert (c["dropped_at"], c["reason"]) == ("self_lengthen.self_instruct", "no_instruction")
    assert c["meta"]["drop_details"]["attempts"] == ["unsuitable"] * 3
    assert [h["kind"] for h in backend.history].count("next_token_logprobs") == 3 and "judge" not in script.calls
    assert read_jsonl(out / "data.jsonl") == []


def test_length_report_counts_one_extension_per_unit():
    lines = [
        {"status": "kept", "meta": {"role": "generator", "rounds": [{"round": 1, "status": "extended", "words_before": 100, "words_after": 150}],
                                    "initial_words": 100, "extended_words": 150, "growth": 1.5, "length_score": 1.0,
                                    "length_score_initial": 0.5, "length_target": "150-600"}},
        {"status": "kept", "meta": {"role": "extender", "rounds": [{"round": 1, "status": "extended", "words_before": 100, "words_after": 150}],
                                    "initial_words": 100, "extended_words": 150, "growth": 1.5, "length_score": 1.0,
                                    "length_score_initial": 0.5, "length_target": "150-600"}},
        {"status": "dropped", "dropped_at": "self_lengthen.extend", "meta": {"rounds": [{"round": 1, "status": "not_longer", "words_before": 80}],
                                                                              "length_score": 0.0, "length_score_initial": 0.0, "length_target": "150-600"}},
        {"status": "dropped", "dropped_at": "self_lengthen.generate", "meta": {}},
    ]
    rep = length_report(lines)
    assert rep["extensions"] == 2 and rep["accepted"] == 1 and rep["not_accepted"] == 1
    assert rep["rounds"]["1"] == {"runs": 2, "extended": 1, "not_extended": {"not_longer": 1}, "mean_words_before": 90,
                                  "mean_words_after_extended": 150, "mean_growth_extended": 1.5}
    assert rep["inside_target_extended"] == 1 and rep["mean_length_score_extended"] == 1.0 and rep["mean_length_score_initial"] == 0.5
    assert rep["length_targets"] == {"150-600": 1}  # kept extensions only


# -- the example and a real model -------------------------------------------------------------------------
def test_example_inputs_are_valid():
    rows = read_jsonl(EXAMPLES / "self_lengthen" / "instructions.jsonl")
    assert len(rows) >= 5 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert 4 <= count_words(r["instruction"]) < 500
        if "length_target" in r:
            parse_length_target(r["length_target"])
    assert len(read_jsonl(EXAMPLES / "self_lengthen" / "seeds.jsonl")) >= 2


@pytest.mark.model
def test_self_lengthen_with_embedded_model(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "btkit.cli", "run", "self_lengthen", str(EXAMPLES / "self_lengthen" / "instructions.jsonl"), "-o", str(out),
           "--limit", "2", "--rounds", "1", "--extend-attempts", "1", "--generate-retries", "2", "-S", "generate.max_tokens=256",
           "-S", "extend.max_tokens=384", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    for name in ("data.jsonl", "candidates.jsonl", "stats.json"):
        assert (out / name).is_file()
    cands, data, stats = check_invariants(out)
    assert len({c["source_id"] for c in cands}) == 2
    assert list(stats["stages"]) == ["self_lengthen.self_instruct", "self_lengthen.generate", "self_lengthen.extend"]
    sl = stats["self_lengthen"]
    assert sl["extensions"] == sl["accepted"] + sl["not_accepted"] == sum(1 for c in cands if c["dropped_at"] in (None, "self_lengthen.extend")
                                                                          and c["meta"].get("role") != "extender")
    for c in cands:
        if c["dropped_at"] == "self_lengthen.extend" or c["status"] == "kept":
            assert c["meta"]["rounds"] and all(r["status"] for r in c["meta"]["rounds"])


@pytest.mark.parametrize("flag,value", [("--length-target", "very long"), ("--min-growth", "nan"), ("--min-growth", "0.9"),
                                        ("--drop-lines", "1.5"), ("--rounds", "0"), ("--ngram", "1")])
def test_bad_options_stop_before_any_call(cli, scripted, tmp_path, flag, value):
    backend, spec = scripted(default=Script())
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "pin", "instruction": INSTR}])
    r = cli("run", "self_lengthen", inp, "-o", tmp_path / "out", "--model", spec, "-q", flag, value)
    assert r.exit_code == 2 and flag in r.output and backend.history == []


def test_benchmark_runs_and_reports_cpu_outside_model_calls():
    """benchmarks/bench_self_lengthen.py (issue 13's < 1 ms per record) on a few hundred units, so it cannot rot."""
    bench = EXAMPLES.parent / "benchmarks" / "bench_self_lengthen.py"
    proc = subprocess.run([sys.executable, str(bench), "--records", "200"], capture_output=True, text=True, timeout=300)
    assert "CPU outside model calls" in proc.stdout, proc.stdout + proc.stderr
    figures = proc.stdout.splitlines()[-1]
    per_unit, per_record = (float(x) for x in re.findall(r"([\d.]+) ms per (?:unit|record)", figures))
    assert 0 < per_record < per_unit and proc.returncode == (0 if per_record < 1 else 1)
    assert re.search(r"accepted \d+ / 200 extensions", proc.stdout)


def test_self_instruct_writes_again_a_near_copy_of_a_seed(cli, scripted, tmp_path):
    script = Script()
    script.new_instruction = lambda content, params: "Write a detailed tutorial on Samba file sharing on Debian 12."
    rows = [{"id": "s1", "instruction": "Write a detailed tutorial on Samba file sharing on Debian."}]
    backend, script, out = run(cli, scripted, tmp_path, rows, "--self-instruct", "1", "--instruct-attempts", "2", script=script)
    [c] = read_jsonl(out / "candidates.jsonl")
    assert c["reason"] == "no_instruction" and c["meta"]["drop_details"]["attempts"] == ["near_duplicate"] * 2
    assert "judge" not in script.calls and not [h for h in backend.history if h["kind"] == "next_token_logprobs"]
