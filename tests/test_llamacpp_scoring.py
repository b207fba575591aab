"""``score_continuation``'s log-softmax is done per decoded chunk: the same numbers as computing it
over the whole continuation at once (the earlier implementation, copied here as the reference), with
memory bounded by ``n_batch`` vocabulary rows instead of one row per continuation token."""

from __future__ import annotations

import asyncio
import math
import tracemalloc

import pytest

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "How do I install a package on Debian?"}]
ANSWER = ("Use apt: run `sudo apt install PACKAGE`. apt downloads the package and everything it depends on "
          "from the mirrors in sources.list, checks the signatures and installs them with dpkg.")
LONG_ANSWER = " ".join([ANSWER] * 5)  # ~200 tokens
N_BATCH = 64


def whole_matrix_logprobs(llm, batch, prompt: list[int], target: list[int]) -> list[float]:
    """The earlier implementation: every scored position's logits in one len(target) x n_vocab array."""
    import llama_cpp
    import numpy as np

    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    sequence = prompt + target[:-1]
    first_scored = len(prompt) - 1
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    llm.n_tokens = 0
    logits = np.empty((len(target), n_vocab), dtype=np.float32)
    row = 0
    for start in range(0, len(sequence), llm.n_batch):
        chunk = sequence[start : start + llm.n_batch]
        batch.n_tokens = len(chunk)
        flagged = []
        for i, tok in enumerate(chunk):
            pos = start + i
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = pos >= first_scored
            if pos >= first_scored:
                flagged.append(i)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        for i in flagged:
            logits[row] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
            row += 1
    llm.n_tokens = 0  # the KV cache is this function's now: the backend must not reuse it
    top = logits.max(axis=1, keepdims=True)
    picked = logits[np.arange(len(target)), target] - top[:, 0]
    np.subtract(logits, top, out=logits)
    np.exp(logits, out=logits)
    log_z = np.log(logits.sum(axis=1, dtype=np.float64))
    return [float(v) for v in picked - log_z]


@pytest.fixture(scope="module")
def backend(embedded_scorer):
    return embedded_scorer


@pytest.fixture(scope="module")
def small_batch(backend):
    """The same weights with n_batch=64, so one continuation spans several decode chunks (one thread:
    small batches on two busy cores are slow with more)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(backend.path), n_ctx=1024, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=1,
                          logits_all=False, verbose=False)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    yield llm, batch
    llama_cpp.llama_batch_free(batch)
    llm.close()


def fresh(llm, backend, prompt, target):
    llm.n_tokens = 0  # no KV reuse: both ways decode the same batches from position 0
    return backend._continuation_logprobs(llm, prompt, target)


def test_per_chunk_log_softmax_equals_the_whole_matrix_one_batch(backend, small_batch):
    _, batch = small_batch
    llm = backend.scoring_llm()
    prompt = backend.prompt_tokens(QUESTION)
    target = llm.tokenize(ANSWER.encode(), add_bos=False, special=False)
    new = fresh(llm, backend, prompt, target)
    old = whole_matrix_logprobs(llm, batch, prompt, target)
    assert len(new) == len(old) == len(target) > 20
    assert max(abs(a - b) for a, b in zip(new, old)) < 1e-5
    assert all(v <= 0 and math.isfinite(v) for v in new)
    # and through the public call (KV cache reuse included), as the likelihood tests check it
    via_api = asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    assert max(abs(a - b) for a, b in zip(via_api, old)) < 1e-3


def test_per_chunk_log_softmax_equals_the_whole_matrix_across_chunks(backend, small_batch):
    llm, batch = small_batch
    prompt = backend.prompt_tokens(QUESTION)
    target = llm.tokenize(LONG_ANSWER.encode(), add_bos=False, special=False)
    assert len(prompt) % N_BATCH and len(prompt) + len(target) > 3 * N_BATCH  # scoring starts mid-chunk, then more chunks
    new = fresh(llm, backend, prompt, target)
    old = whole_matrix_logprobs(llm, batch, prompt, target)
    assert len(new) == len(old) == len(target)
    assert max(abs(a - b) for a, b in zip(new, old)) < 1e-5
    # the backend's batch grew back for the default model (n_batch 512) after serving a smaller one
    scorer = backend.scoring_llm()
    asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    assert backend._batch_size >= scorer.n_batch == 512


def test_memory_holds_n_batch_rows_not_one_row_per_token(backend, small_batch):
    llm, batch = small_batch
    prompt = backend.prompt_tokens(QUESTION)
    target = llm.tokenize(LONG_ANSWER.encode(), add_bos=False, special=False)
    row_bytes = llm.n_vocab() * 4

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    old_peak = peak(lambda: whole_matrix_logprobs(llm, batch, prompt, target))
    new_peak = peak(lambda: fresh(llm, backend, prompt, target))
    assert old_peak > len(target) * row_bytes  # the measure sees numpy's arrays
    assert len(target) > 3 * N_BATCH and new_peak < (N_BATCH + 2) * row_bytes, (new_peak / row_bytes, len(target))


# -- tokens the scoring calls read, for stats (they were counted as 0) -------------------------------
def test_next_token_logprobs_report_the_prompt_tokens_they_read(backend):
    lp = asyncio.run(backend.next_token_logprobs(QUESTION, "Score: ", list("12345")))
    prompt = backend.prompt_tokens(QUESTION, "Score: ")
    evaluated, _ = backend.candidate_tokens(prompt, "Score: ", list("12345"))
    assert lp.prompt_tokens == len(evaluated) > 10
    assert set(lp) == set("12345")  # still the plain mapping every caller reads


def test_continuation_scores_report_prompt_and_continuation_tokens(backend):
    target = backend.llm().tokenize(ANSWER.encode("utf-8"), add_bos=False, special=False)
    cond = asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    assert len(cond) == len(target)
    assert cond.prompt_tokens == len(backend.prompt_tokens(QUESTION)) + len(target)
    first = asyncio.run(backend.score_continuation(None, ANSWER))
    again = asyncio.run(backend.score_continuation(None, ANSWER))  # from the in-memory unconditional cache
    assert first.prompt_tokens == again.prompt_tokens == len(backend.prompt_tokens([{"role": "user", "content": ""}])) + len(target)
    assert list(first) == list(again)
    assert asyncio.run(backend.score_continuation(QUESTION, "")).prompt_tokens == 0


def test_end_of_turn_is_one_more_value_from_the_same_pass(backend):
    """``end_of_turn=True``: the continuation's logprobs unchanged, then log P(<|im_end|>) right after it;
    a whole answer ends far more surely than its first words (the signal of ``--judge-mode complete``)."""
    llm = backend.llm()
    assert llm.detokenize([backend.end_of_turn_token()], special=True) == b"<|im_end|>"  # read from the chat template
    plain = asyncio.run(backend.score_continuation(QUESTION, ANSWER))
    ended = asyncio.run(backend.score_continuation(QUESTION, ANSWER, end_of_turn=True))
    assert len(ended) == len(plain) + 1 and ended.prompt_tokens == plain.prompt_tokens + 1
    assert ended[:-1] == pytest.approx(list(plain), abs=1e-4)
    cut = " ".join(ANSWER.split()[:6])  # "Use apt: run `sudo apt install"
    cut_end = asyncio.run(backend.score_continuation(QUESTION, cut, end_of_turn=True))[-1]
    assert -12.0 < ended[-1] <= 0.0 and cut_end < ended[-1] - 5
    # the unconditional cache keeps the two kinds apart
    u_plain = asyncio.run(backend.score_continuation(None, ANSWER))
    u_ended = asyncio.run(backend.score_continuation(None, ANSWER, end_of_turn=True))
    assert len(u_ended) == len(u_plain) + 1 and list(asyncio.run(backend.score_continuation(None, ANSWER))) == list(u_plain)
