"""Likelihood scoring: the PMI/IFD arithmetic, and ``score_continuation`` on the embedded model.

The model tests compare the batch-API implementation (logits only at the continuation's
positions, KV cache reused across calls) with llama-cpp-python's plain ``logits_all=True`` way on
the same weights (``score_weights=same``), and the default 16-bit scoring copy with the original.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from btkit.kit.judges import likelihood_parts, top_percent_cutoff


# -- arithmetic -----------------------------------------------------------------------------------
def test_pmi_is_the_difference_of_mean_logprobs():
    score, parts = likelihood_parts("pmi", [-1.0, -2.0, -3.0], [-2.0, -3.0, -4.0, -5.0])
    assert score == pytest.approx(-2.0 - -3.5)
    assert parts["cond_logprob"] == -2.0 and parts["uncond_logprob"] == -3.5
    assert parts["cond_tokens"] == 3 and parts["uncond_tokens"] == 4
    assert parts["ifd"] == pytest.approx(2.0 / 3.5)


def test_ifd_score_is_one_minus_the_loss_ratio():
    # L(r|i) = 1.0, L(r) = 4.0: the instruction removes 75% of the loss; IFD = 0.25
    score, parts = likelihood_parts("ifd", [-1.0, -1.0], [-4.0, -4.0])
    assert parts["ifd"] == pytest.approx(0.25) and score == pytest.approx(0.75)
    # an instruction that makes the response less likely: IFD > 1, score < 0
    score, parts = likelihood_parts("ifd", [-3.0], [-2.0])
    assert parts["ifd"] == pytest.approx(1.5) and score == pytest.approx(-0.5)


def test_likelihood_scores_that_cannot_be_computed_say_why():
    assert likelihood_parts("pmi", [], [-1.0]) == (None, {"score_error": "empty_response"})
    score, parts = likelihood_parts("ifd", [-1.0], [0.0, 0.0])  # the response is certain without the instruction
    assert score is None and parts["score_error"] == "zero_unconditional_loss"
    assert likelihood_parts("pmi", [-1.0], [0.0])[0] == pytest.approx(-1.0)  # PMI is still defined
    with pytest.raises(ValueError):
        likelihood_parts("rubric", [-1.0], [-1.0])


@pytest.mark.parametrize("scores,percent,cutoff", [
    ([1, 5, 3, 2, 4], 40, 4),  # ceil(5 * 0.4) = 2 best
    ([1, 5, 3, 2, 4], 100, 1),
    ([1, 5, 3, 2, 4], 1, 5),  # at least one
    ([0.1, 0.2, 0.3], 50, 0.2),  # ceil(1.5) = 2
    ([], 10, None),
])
def test_top_percent_cutoff(scores, percent, cutoff):
    assert top_percent_cutoff(scores, percent) == cutoff


# -- the embedded model ---------------------------------------------------------------------------
QUESTION = [{"role": "user", "content": "How do I install a package on Debian?"}]
ANSWER = ("Use apt: run `sudo apt install PACKAGE`. apt downloads the package and everything it depends on "
          "from the mirrors in sources.list, checks the signatures and installs them with dpkg.")


@pytest.fixture(scope="module")
def backend(embedded_scorer):
    return embedded_scorer


@pytest.fixture(scope="module")
def naive(backend):
    """The reference: llama-cpp-python's high-level way, logits at every position (logits_all=True)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(backend.path), n_ctx=256, n_threads=backend.n_threads, logits_all=True, verbose=False)

    def logprobs(prompt_tokens, text):
        target = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.reset()
        llm.eval(prompt_tokens + target)
        out = []
        for j, tok in enumerate(target):
            row = llm.scores[len(prompt_tokens) - 1 + j].astype(np.float64)
            top = row.max()
            out.append(float(row[tok] - top - math.log(np.exp(row - top).sum())))
        return out

    yield logprobs
    llm.close()


@pytest.mark.model
def test_score_continuation_matches_the_logits_all_reference(backend, naive):
    fast = asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    slow = naive(backend.prompt_tokens(QUESTION), ANSWER)
    assert len(fast) == len(slow) > 20
    assert max(abs(a - b) for a, b in zip(fast, slow)) < 1e-3
    assert all(v <= 0 for v in fast)


@pytest.mark.model
def test_unconditional_is_the_same_chat_frame_with_an_empty_user_turn(backend, naive):
    from btkit_plugins.backends.llamacpp import UNCONDITIONAL_MESSAGES

    uncond = asyncio.run(backend.score_continuation(None, ANSWER))
    framed = naive(backend.prompt_tokens(UNCONDITIONAL_MESSAGES), ANSWER)
    assert max(abs(a - b) for a, b in zip(uncond, framed)) < 1e-3
    cond = asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    assert sum(cond) / len(cond) > sum(uncond) / len(uncond)  # the right question makes the answer more likely


@pytest.mark.model
def test_kv_reuse_across_calls_and_chat_in_between_changes_nothing(backend):
    other = [{"role": "user", "content": "What is a Debian mirror?"}]

    async def sequence():
        a = await backend.score_continuation(QUESTION, ANSWER)
        b = await backend.score_continuation(other, ANSWER)  # shares the chat frame prefix
        chat1 = await backend.chat(QUESTION, {"temperature": 0.0, "max_tokens": 16})
        a2 = await backend.score_continuation(QUESTION, ANSWER)
        short = await backend.score_continuation(QUESTION, ANSWER[:30])  # a prefix of what was just scored
        chat2 = await backend.chat(QUESTION, {"temperature": 0.0, "max_tokens": 16})
        return a, b, a2, short, chat1, chat2

    a, b, a2, short, chat1, chat2 = asyncio.run(sequence())
    assert a == pytest.approx(a2, abs=1e-4) and a != b
    assert short == pytest.approx(a[: len(short)], abs=1e-4)
    assert chat1.text == chat2.text


@pytest.mark.model
def test_default_scoring_copy_gives_the_same_scores_faster_to_batch(backend, isolated_cache):
    """A Q4_1 model is scored with a 16-bit copy of its weights: same PMI up to compute noise."""
    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    auto = LlamaCppBackend("default", {})
    try:
        async def pmi(b):
            cond = await b.score_continuation(QUESTION, ANSWER)
            uncond = await b.score_continuation(None, ANSWER)
            return sum(cond) / len(cond), sum(uncond) / len(uncond)

        fast, same = asyncio.run(pmi(auto)), asyncio.run(pmi(backend))
        copies = list((isolated_cache.parent / "models").glob("*.gguf"))
        assert len(copies) == 1 and copies[0].name.endswith((".bf16.gguf", ".f16.gguf"))
        assert auto.scoring_llm() is not auto.llm()
        assert fast[0] == pytest.approx(same[0], abs=0.03) and fast[1] == pytest.approx(same[1], abs=0.03)
        assert fast[0] - fast[1] == pytest.approx(same[0] - same[1], abs=0.02)
        assert "score_weights" not in auto.identity() and backend.identity()["score_weights"] == "same"
    finally:
        asyncio.run(auto.aclose())


@pytest.mark.model
def test_score_after_score_colon_is_a_single_digit_token_for_smollm2(backend):
    """SmolLM2 writes ' 5' as a space token then the digit: after 'Score: ' the digit is one token."""
    llm = backend.llm()
    prompt = backend.prompt_tokens(QUESTION, "Score: ")
    tokens, ids = backend.candidate_tokens(prompt, "Score: ", list("12345"))
    assert tokens == prompt  # nothing had to be moved off the prefix
    assert [llm.detokenize([i]).decode() for i in ids] == list("12345")
    lp = asyncio.run(backend.next_token_logprobs(QUESTION, "Score: ", list("12345")))
    assert set(lp) == set("12345") and all(math.isfinite(v) and v < 0 for v in lp.values())
    assert sum(math.exp(v) for v in lp.values()) > 0.1  # the digits get real probability mass


@pytest.mark.model
def test_empty_and_too_long_continuations(backend):
    from btkit.errors import BackendError

    assert asyncio.run(backend.score_continuation(QUESTION, "")) == []
    with pytest.raises(BackendError, match="exceeds the context"):
        asyncio.run(backend.score_continuation(QUESTION, "word " * (backend.n_ctx + 10)))
