"""``LlamaCppBackend.candidate_tokens`` on a scripted tokenizer: both ways a tokenizer can split
``'Score: 5'`` (the digit its own token, or the prefix's space merged into it), and every case where
the digits cannot be read as one token each, which must fail clearly instead of reading the wrong
token's probability. SmolLM2 only exercises the first way (see test_likelihood.py)."""

from __future__ import annotations

import pytest

from btkit.errors import BackendError

DIGITS = list("12345")


class FakeLlm:
    """Only what ``candidate_tokens`` uses: ``tokenize`` from a table of exact strings."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table
        self.calls: list[str] = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        assert add_bos is False and special is False  # candidates and prefix are plain text
        s = text.decode("utf-8")
        self.calls.append(s)
        if s not in self.table:
            raise AssertionError(f"unexpected tokenize({s!r})")
        return list(self.table[s])


def backend_with(table: dict[str, list[int]]):
    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend("default", {})  # no model is loaded: llm() returns the injected one
    b._llm = FakeLlm(table)
    return b


SCORE, COLON, SPACE = 101, 102, 220
PROMPT = [1, 7, 8, 9]  # chat frame tokens before the assistant prefix


def separate_digits() -> dict[str, list[int]]:
    """SmolLM2's way: 'Score: 5' = 'Score' ':' ' ' '5'."""
    t = {"Score: ": [SCORE, COLON, SPACE]}
    t.update({f"Score: {d}": [SCORE, COLON, SPACE, 10 + int(d)] for d in DIGITS})
    return t


def merged_digits() -> dict[str, list[int]]:
    """The Llama-3 / GPT-2 way: 'Score: 5' = 'Score' ':' ' 5'."""
    t = {"Score: ": [SCORE, COLON, SPACE], "Score:": [SCORE, COLON]}
    t.update({f"Score: {d}": [SCORE, COLON, 20 + int(d)] for d in DIGITS})
    return t


def test_digit_as_its_own_token_keeps_the_prompt():
    b = backend_with(separate_digits())
    prompt = PROMPT + [SCORE, COLON, SPACE]
    tokens, ids = b.candidate_tokens(prompt, "Score: ", DIGITS)
    assert tokens == prompt and ids == [11, 12, 13, 14, 15]


def test_merged_space_is_moved_off_the_prompt_onto_the_digit():
    b = backend_with(merged_digits())
    prompt = PROMPT + [SCORE, COLON, SPACE]
    tokens, ids = b.candidate_tokens(prompt, "Score: ", DIGITS)
    assert tokens == PROMPT + [SCORE, COLON]  # the lone space token is gone: the model predicts ' 5' next
    assert ids == [21, 22, 23, 24, 25]


def test_the_tokenization_is_worked_out_once_per_prefix_and_candidates():
    b = backend_with(merged_digits())
    prompt = PROMPT + [SCORE, COLON, SPACE]
    first = b.candidate_tokens(prompt, "Score: ", DIGITS)
    n = len(b._llm.calls)
    assert b.candidate_tokens(prompt, "Score: ", DIGITS) == first and len(b._llm.calls) == n
    with pytest.raises(BackendError, match="does not end with the tokens of the assistant prefix"):
        b.candidate_tokens(PROMPT + [SCORE, COLON, 999], "Score: ", DIGITS)  # cached, and still checked


def test_merged_branch_refuses_a_trimmed_prefix_that_tokenizes_differently():
    t = merged_digits()
    t["Score:"] = [555]  # 'Score:' is one token alone but 'Score' ':' before a space
    b = backend_with(t)
    with pytest.raises(BackendError, match=r"the tokens of 'Score:' \(\[555\]\) are not a prefix of those of 'Score: '"):
        b.candidate_tokens(PROMPT + [SCORE, COLON, SPACE], "Score: ", DIGITS)


def test_merged_branch_refuses_a_trimmed_prefix_that_is_not_shorter():
    t = merged_digits()
    t["Score:"] = [SCORE, COLON, SPACE]
    with pytest.raises(BackendError, match="not a prefix"):
        backend_with(t).candidate_tokens(PROMPT + [SCORE, COLON, SPACE], "Score: ", DIGITS)


def test_merged_branch_refuses_a_candidate_of_two_tokens():
    t = merged_digits()
    t["Score: 10"] = [SCORE, COLON, 21, 10]  # ' 1' '0'
    with pytest.raises(BackendError, match=r"'10' tokenizes as \[21, 10\] after 'Score:', not as one token"):
        backend_with(t).candidate_tokens(PROMPT + [SCORE, COLON, SPACE], "Score: ", DIGITS + ["10"])


def test_candidates_that_disagree_on_the_space_are_refused():
    t = merged_digits()
    t["Score: 5"] = [SCORE, COLON, SPACE, 15]  # '5' alone, while '1'..'4' merge the space
    with pytest.raises(BackendError, match=r"'5' tokenizes as \[220, 15\].*must all merge the whitespace or none"):
        backend_with(t).candidate_tokens(PROMPT + [SCORE, COLON, SPACE], "Score: ", DIGITS)


def test_merged_branch_checks_the_prompt_ends_with_the_prefix():
    b = backend_with(merged_digits())
    with pytest.raises(BackendError, match="does not end with the tokens of the assistant prefix 'Score: '"):
        b.candidate_tokens(PROMPT + [SCORE, SPACE], "Score: ", DIGITS)


def test_no_trailing_space_and_a_multi_token_candidate_is_refused():
    t = {"Score:": [SCORE, COLON], "Score:5": [SCORE, COLON, 15], "Score:42": [SCORE, COLON, 14, 12]}
    b = backend_with(t)
    assert b.candidate_tokens(PROMPT + [SCORE, COLON], "Score:", ["5"]) == (PROMPT + [SCORE, COLON], [15])
    with pytest.raises(BackendError, match=r"\['42'\] are not single tokens after it"):
        b.candidate_tokens(PROMPT + [SCORE, COLON], "Score:", ["5", "42"])
