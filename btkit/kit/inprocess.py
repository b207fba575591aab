"""What in-process backends share (``llamacpp:``, ``transformers:``): the thread count, the answer
types that carry the prompt tokens a likelihood call read, and how candidate tokens are found after an
assistant prefix whose trailing space the tokenizer merges into them.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import BackendError

__all__ = ["CandidateLogprobs", "ContinuationLogprobs", "candidate_tokens", "default_threads", "merged_candidate_ids"]


def default_threads() -> int:
    """llama.cpp's threads unless ``-B n_threads`` says: half the CPUs this process may use, at least 1.

    llama.cpp's threads wait for each other by spinning, so one that loses its core to anything
    else (btkit's own loop, the user's other work) stalls the rest. On a 2-core machine shared with
    other work (2026-12-02, 12 documents of examples/corpus.jsonl, humpback, --no-cache, four runs
    each, interleaved): 1 thread took 56-57 s wall and CPU every time; 2 threads took 34-43 s
    (65-70 s CPU) while the other core was free, and 205 s (195 s CPU) while it was not. Reading a
    138-token prompt took 0.95 s with 1 thread, 0.48 s or 8 s with 2. ``n_threads_batch`` (prompts,
    scoring) follows ``n_threads``: llama-cpp-python would otherwise use every CPU for it whatever
    ``n_threads`` says. Half the logical CPUs is one thread per physical core where cores run two
    hardware threads.
    """
    try:
        cpus = len(os.sched_getaffinity(0))  # what this process may use (taskset, containers)
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


class CandidateLogprobs(dict):
    """``next_token_logprobs``' answer (candidate -> logprob) and ``prompt_tokens``, the tokens the
    forward pass read, so the run's stats count them as a chat call's prompt is counted."""

    def __init__(self, logprobs: dict[str, float], prompt_tokens: int):
        super().__init__(logprobs)
        self.prompt_tokens = prompt_tokens


class ContinuationLogprobs(list):
    """``score_continuation``'s answer (one logprob per continuation token) and ``prompt_tokens``,
    the tokens scored: chat frame, instruction and continuation, as a remote echo call bills them."""

    def __init__(self, logprobs: list[float], prompt_tokens: int):
        super().__init__(logprobs)
        self.prompt_tokens = prompt_tokens


def merged_candidate_ids(assistant_prefix: str, candidates: list[str], base: list[int], fulls: list[list[int]],
                          tok: Any) -> tuple[int, list[int]]:
    """(prefix tokens to strip, candidate ids) when the tokenizer merges the prefix's trailing
    whitespace into the candidates (``'Score:'`` + ``' 5'``); BackendError when it does not cleanly.

    ``base``: tokens of ``assistant_prefix``; ``fulls``: tokens of ``assistant_prefix + c`` per candidate.
    """
    def unusable(why: str) -> BackendError:
        return BackendError(f"cannot read candidates {candidates!r} as one token each after {assistant_prefix!r}: {why}")

    trimmed = assistant_prefix.rstrip()
    if trimmed == assistant_prefix:
        odd = [c for c, f in zip(candidates, fulls) if not (f[: len(base)] == base and len(f) == len(base) + 1)]
        raise unusable(f"{odd!r} are not single tokens after it")
    tbase = tok(trimmed)
    strip = len(base) - len(tbase)
    if strip <= 0 or base[: len(tbase)] != tbase:
        raise unusable(f"the tokens of {trimmed!r} ({tbase}) are not a prefix of those of {assistant_prefix!r} ({base})")
    ids = []
    for c, f in zip(candidates, fulls):
        if f[: len(tbase)] != tbase or len(f) != len(tbase) + 1:
            raise unusable(f"{c!r} tokenizes as {f[len(tbase):] if f[: len(tbase)] == tbase else f} after {trimmed!r}, "
                           f"not as one token (the candidates must all merge the whitespace or none)")
        ids.append(f[len(tbase)])
    return strip, ids


def candidate_tokens(prefix_tokens: list[int], assistant_prefix: str, candidates: list[str],
                     tok: Callable[[str], list[int]], cache: dict[Any, Any]) -> tuple[list[int], list[int]]:
    """(prompt tokens to evaluate, one token id per candidate) for reading candidates as the next token.

    Either every candidate is its own token after the prefix's tokens (SmolLM2: ``'Score: '`` then
    ``'5'``), or the tokenizer merges the prefix's trailing whitespace into the candidate (``' 5'``
    as one token): then the whitespace's tokens are cut off the prompt, which must end with the
    prefix's tokens, and each candidate must be exactly one token after the trimmed prefix. Anything
    else raises :class:`BackendError`. ``tok`` tokenizes text without special tokens; ``cache`` (a
    dict the backend keeps) remembers the answer per prefix and candidates.
    """
    key = (assistant_prefix, tuple(candidates))
    if key not in cache:
        base = tok(assistant_prefix)
        fulls = [tok(assistant_prefix + c) for c in candidates]
        if all(f[: len(base)] == base and len(f) == len(base) + 1 for f in fulls):
            cache[key] = (0, [f[-1] for f in fulls], base)
        else:
            cache[key] = (*merged_candidate_ids(assistant_prefix, candidates, base, fulls, tok), base)
    strip, ids, base = cache[key]
    if not strip:
        return prefix_tokens, ids
    if list(prefix_tokens[len(prefix_tokens) - len(base):]) != base:
        raise BackendError(f"the prompt does not end with the tokens of the assistant prefix {assistant_prefix!r}, "
                           f"so its trailing whitespace cannot be moved onto the candidates")
    return prefix_tokens[: len(prefix_tokens) - strip], ids
