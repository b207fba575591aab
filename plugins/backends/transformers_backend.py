"""``transformers:`` backend: a Hugging Face model folder run in process by transformers and torch.

``transformers:DIR`` loads the folder ``save_pretrained`` wrote (``config.json``, safetensors, the
tokenizer files): a model ``btkit train`` made, or any causal LM with a chat template. This is how
a loop curates with the model it just trained. torch and transformers are imported on first use
only (``btkit --help`` imports neither); they come with ``pip install btkit[train]``.

Backend options (``-B KEY=VALUE``, shared with every backend of the run):

- ``device``: ``auto`` (default: ``cuda`` when torch sees a GPU, else ``cpu``), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
  ``auto`` means a loop's trained models generate on the GPU they were trained on with no option.
- ``dtype``: ``float32`` (default: what a trained CPU model is saved in), ``bfloat16``, ``float16``.
  Part of the cache key: another dtype gives (slightly) other replies. On this 2-core AVX2 machine
  (2026-12-02) ``float16`` generated 1.5x faster than ``float32`` (20 against 13.5 tokens/s, the
  same greedy text) but scored 3x slower (61 against 197 tokens/s), logprobs within 0.02 nats;
  ``bfloat16`` was no faster than ``float32``.
- ``n_threads``: torch's CPU threads during this backend's calls (set for each call, restored after);
  by default half the CPUs this process may use, as ``llamacpp:`` (its ``default_threads``): torch's
  OpenMP threads spin-wait like llama.cpp's, and on this 2-core machine shared with other work
  (2026-12-02) a 60-token forward pass of SmolLM2-135M took 0.5-0.6 s with 1 thread and 2.4-12 s
  with torch's default of 2.
- ``n_ctx``: the longest prompt + reply; the model's ``max_position_embeddings`` if unset.

As in ``llamacpp:``, prompts are formatted with the model's own chat template
(``tokenizer.apply_chat_template(..., add_generation_prompt=True)``) and message contents are
tokenized with special tokens split, so a document containing ``<|im_start|>`` cannot forge a turn;
calls run one at a time in a worker thread (``max_concurrency = 1``), so the asyncio loop stays free.

Generation is btkit's own loop over the model's forward pass (KV cache, logits of the last position
only): greedy at ``temperature`` 0, else temperature + nucleus (``top_p``) sampling from a
``torch.Generator`` seeded with ``seed``, so the same request with the same seed gives the same
text; ``stop`` strings cut the reply (``finish_reason`` ``"stop"``, as the end-of-turn and EOS
tokens do), ``max_tokens`` reached gives ``"length"``; ``repetition_penalty`` is the CTRL/HF one
over prompt and reply.

Likelihoods: ``next_token_logprobs`` (the candidates as single tokens after the assistant prefix,
with the same whitespace-merging rule as ``llamacpp:``), ``score_continuation`` in the same frames
(:data:`btkit.backends.UNCONDITIONAL_MESSAGES` for ``messages=None``) and with the same
end-of-turn value (:data:`btkit.backends.END_OF_TURN`: the token the chat template writes after an
assistant message), so ``--judge-mode logprob|pmi|ifd|complete`` work on a trained model.

``identity()`` (part of every cache key, and what a loop's lineage records) holds the folder's
resolved path and a sha256 of its content (weights, config, tokenizer and chat template files,
the digest ``btkit train`` records): a model retrained into the same folder gets other cache
entries. The hash is computed once per process per folder state (file names, sizes, modification
times); about a second for 0.5 GB.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from btkit.backends import CHAT, END_OF_TURN, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, UNCONDITIONAL_MESSAGES, Backend, Completion
from btkit.errors import BackendError, BtkitError
from btkit.hookspecs import hookimpl
from btkit.kit.inprocess import CandidateLogprobs, ContinuationLogprobs, candidate_tokens, default_threads

_SENTINEL = "\x00BTKIT_MSG_{}\x00"
DTYPES = ("float32", "bfloat16", "float16")

_HASHES: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_HASHES_LOCK = threading.Lock()


def content_hash(folder: Path) -> str:
    """sha256 of a model folder's weight, config and tokenizer files: the same digest ``btkit train``
    records (:func:`btkit.kit.models.model_digest`), so a loop can compare the two.

    Computed once per process for a folder in a given state (file names, sizes, modification
    times): a folder rewritten by a later training step is hashed again, an unchanged one is not.
    """
    from btkit.kit.models import model_digest

    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not any(p.name.endswith((".safetensors", ".bin")) for p in files):
        raise BtkitError(f"{folder}: no weight files (*.safetensors or *.bin) in this model folder")
    state = tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    key = (str(folder), state)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = model_digest(folder)
    with _HASHES_LOCK:
        _HASHES[key] = digest
    return digest


class TransformersBackend(Backend):
    """One Hugging Face model in process; calls run one at a time in a worker thread."""

    capabilities = frozenset({CHAT, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION, END_OF_TURN})
    max_concurrency = 1
    unconditional_cache_size = 256

    def __init__(self, rest: str, options: dict[str, Any]):
        if not rest:
            raise BtkitError("transformers: needs a model folder: transformers:DIR (a folder save_pretrained wrote)")
        self.path = Path(rest).expanduser()
        self.spec = f"transformers:{rest}"
        if not self.path.is_dir():
            raise BtkitError(f"model folder not found: {self.path} (from model spec 'transformers:{rest}')")
        if not (self.path / "config.json").is_file():
            raise BtkitError(f"{self.path}: not a Hugging Face model folder (no config.json), from model spec 'transformers:{rest}'")
        for name in ("n_ctx", "n_threads"):
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BtkitError(f"backend option {name}={value!r} must be a whole number >= 1")
        self.device = str(options.get("device") or "auto")
        self.dtype = str(options.get("dtype") or "float32").lower()
        if self.dtype not in DTYPES:
            raise BtkitError(f"-B dtype={self.dtype}: choose one of {', '.join(DTYPES)}")
        self.n_threads = int(options.get("n_threads") or default_threads())
        self._n_ctx = options.get("n_ctx")
        self._model = None
        self._tok = None
        self._hash: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._candidate_cache: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._unconditional: collections.OrderedDict[tuple[str, bool], ContinuationLogprobs] = collections.OrderedDict()
        self._eot: int | None = None
        self._stop_ids: set[int] | None = None

    # -- identity ----------------------------------------------------------------------------
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = content_hash(self.path)
        return self._hash

    def identity(self) -> dict[str, Any]:
        """Path and content hash of the folder (two models trained into one path never share cache
        entries), and the dtype the weights run in. Not the device: where it runs is not what it is."""
        return {"backend": "transformers", "path": str(self.path.resolve()), "sha256": self.content_hash(), "dtype": self.dtype}

    # -- model -------------------------------------------------------------------------------
    def load(self):
        """(model, tokenizer), loaded on first use."""
        if self._model is None:
            if self._closed:  # a call in flight when aclose came keeps its model; a later one gets none
                raise BackendError(f"{self.spec}: the backend was closed (the run is ending)")
            try:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError as e:
                raise BtkitError(f"{self.spec}: needs torch and transformers ({e}); pip install 'btkit[train]'") from None
            if self.device == "auto":
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError) as e:
                raise BtkitError(f"-B device={self.device}: {e}") from None
            self.content_hash()  # the hash names the weights loaded now
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would cut into btkit's progress line
            try:
                tok = AutoTokenizer.from_pretrained(str(self.path))
                model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=getattr(torch, self.dtype))
                model.to(device)
            except (OSError, ValueError, RuntimeError) as e:
                raise BtkitError(f"{self.spec}: cannot load the model: {type(e).__name__}: {str(e)[:300]}") from None
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            model.eval()
            if not getattr(tok, "chat_template", None):
                raise BtkitError(f"{self.path}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
            self._torch_device = device
            self._tok, self._model = tok, model
        return self._model, self._tok

    @contextlib.contextmanager
    def _threads(self):
        """torch's CPU threads set to ``n_threads`` for one call, then put back (the setting is process-wide)."""
        import torch

        before = torch.get_num_threads()
        if before != self.n_threads:
            torch.set_num_threads(self.n_threads)
        try:
            yield
        finally:
            if before != self.n_threads:
                torch.set_num_threads(before)

    @property
    def n_ctx(self) -> int:
        if self._n_ctx:
            return int(self._n_ctx)
        model, _ = self.load()
        return int(getattr(model.config, "max_position_embeddings", None) or 4096)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        _, tok = self.load()
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str, special: bool) -> list[int]:
        """Tokens of ``text``: with ``special`` the template's special tokens are read as such, without
        they are split into plain text (a document's ``<|im_start|>`` stays text)."""
        _, tok = self.load()
        if not text:
            return []
        return list(tok(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

    def prompt_tokens(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        """Tokens of the chat-formatted prompt: template text may hold special tokens, contents may not."""
        placeholders = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        rest = self._render(placeholders)
        tokens: list[int] = []
        for i, m in enumerate(messages):
            before, sep, rest = rest.partition(_SENTINEL.format(i))
            if not sep:
                raise BtkitError(f"{self.path}: chat template dropped message {i} ({m['role']})")
            tokens += self._ids(before, special=True)
            tokens += self._ids(m["content"], special=False)
        tokens += self._ids(rest, special=True)
        if assistant_prefix:
            tokens += self._ids(assistant_prefix, special=False)
        return tokens

    def end_of_turn_token(self) -> int:
        """The token the chat template writes right after an assistant message (``<|im_end|>``), read
        from the template; the model's EOS token where the template writes nothing special there."""
        if self._eot is None:
            _, tok = self.load()
            end = _SENTINEL.format(1)
            rendered = self._render([{"role": "user", "content": _SENTINEL.format(0)}, {"role": "assistant", "content": end}],
                                    generation_prompt=False)
            after = rendered.partition(end)[2]
            special = self._ids(after, special=True) if after.strip() else []
            plain = self._ids(after, special=False) if after.strip() else []
            if special and (not plain or special[0] != plain[0]):
                self._eot = special[0]
            elif tok.eos_token_id is not None:
                self._eot = int(tok.eos_token_id)
            else:
                raise BtkitError(f"{self.path}: cannot tell the end-of-turn token (no special token after an assistant turn, no EOS)")
        return self._eot

    def stop_ids(self) -> set[int]:
        """Tokens that end a reply: the end of turn, the tokenizer's EOS, the generation config's EOS."""
        if self._stop_ids is None:
            model, tok = self.load()
            ids = {self.end_of_turn_token()}
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            if isinstance(gen_eos, int):
                ids.add(gen_eos)
            elif isinstance(gen_eos, (list, tuple)):
                ids.update(int(i) for i in gen_eos)
            self._stop_ids = ids
        return self._stop_ids

    def _forward_logits(self, tokens: list[int], keep: int):
        """float32 logits of the last ``keep`` positions of one forward pass over ``tokens``: (keep, vocab)."""
        import torch

        model, _ = self.load()
        ids = torch.tensor([tokens], dtype=torch.long, device=self._torch_device)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
        return out.logits[0, -keep:].float()

    # -- calls -------------------------------------------------------------------------------
    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        return await asyncio.to_thread(self._chat_sync, messages, params)

    def _chat_sync(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        with self._lock:
            self.load()
            with self._threads():
                return self._chat_locked(messages, params)

    def _chat_locked(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        tokens = self.prompt_tokens(messages, params.get("assistant_prefix", ""))
        max_tokens = int(params.get("max_tokens") or 256)
        if len(tokens) + max_tokens > self.n_ctx:
            raise BackendError(f"prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the context of {self.n_ctx}")
        seed = params.get("seed")
        try:
            text, finish, n_out = self._generate(
                tokens, max_tokens=max_tokens, temperature=float(params.get("temperature", 0.7)),
                top_p=float(params.get("top_p", 0.9)), seed=None if seed is None else int(seed),
                stop=[s for s in (params.get("stop") or []) if s], repetition_penalty=float(params.get("repetition_penalty", 1.0)))
        except BackendError:
            raise
        except Exception as e:  # torch errors become recorded failures
            raise BackendError(f"transformers: {type(e).__name__}: {e}") from e
        return Completion(text=text, finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n_out)

    def _generate(self, tokens: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                  stop: list[str], repetition_penalty: float) -> tuple[str, str, int]:
        """(text, finish_reason, tokens generated): one token at a time over the KV cache."""
        import torch

        model, tok = self.load()
        device = self._torch_device
        stop_ids = self.stop_ids()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        seen = torch.tensor(tokens, dtype=torch.long, device=device)
        step_input = torch.tensor([tokens], dtype=torch.long, device=device)
        past = None
        out: list[int] = []
        finish = "length"
        text = ""
        with torch.inference_mode():
            for _ in range(max_tokens):
                result = model(input_ids=step_input, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = result.past_key_values
                logits = result.logits[0, -1].float()
                if repetition_penalty != 1.0:
                    picked = logits[seen]
                    logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
                if temperature <= 0:
                    nxt = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    if 0 < top_p < 1:
                        sorted_p, order = torch.sort(probs, descending=True)
                        # keep the smallest set whose mass reaches top_p (the first token always)
                        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
                        sorted_p[drop] = 0
                        nxt = int(order[torch.multinomial(sorted_p, 1, generator=generator)])
                    else:
                        nxt = int(torch.multinomial(probs, 1, generator=generator))
                if nxt in stop_ids:
                    finish = "stop"
                    break
                out.append(nxt)
                if repetition_penalty != 1.0:
                    seen = torch.cat([seen, torch.tensor([nxt], device=device)])
                if stop:
                    text = tok.decode(out, skip_special_tokens=True)
                    cuts = [text.find(s) for s in stop if s in text]
                    if cuts:
                        text = text[: min(cuts)]
                        finish = "stop"
                        return text, finish, len(out)
                step_input = torch.tensor([[nxt]], dtype=torch.long, device=device)
        return tok.decode(out, skip_special_tokens=True), finish, len(out)

    async def next_token_logprobs(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> CandidateLogprobs:
        return await asyncio.to_thread(self._next_token_sync, messages, assistant_prefix, candidates)

    def candidate_tokens(self, prefix_tokens: list[int], assistant_prefix: str, candidates: list[str]) -> tuple[list[int], list[int]]:
        """Which single token each candidate is after the prefix: the rule ``llamacpp:`` uses
        (:func:`btkit.kit.inprocess.candidate_tokens`), with this model's tokenizer."""
        return candidate_tokens(prefix_tokens, assistant_prefix, candidates, lambda text: self._ids(text, special=False),
                                self._candidate_cache)

    def _next_token_sync(self, messages: list[dict[str, str]], assistant_prefix: str, candidates: list[str]) -> CandidateLogprobs:
        with self._lock:
            prompt = self.prompt_tokens(messages, assistant_prefix)
            tokens, ids = self.candidate_tokens(prompt, assistant_prefix, candidates)
            if len(tokens) > self.n_ctx:
                raise BackendError(f"prompt of {len(tokens)} tokens exceeds the context of {self.n_ctx}")
            try:
                with self._threads():
                    logprobs = self._forward_logits(tokens, 1)[0].double().log_softmax(-1)
            except Exception as e:
                raise BackendError(f"transformers: {type(e).__name__}: {e}") from e
        return CandidateLogprobs({c: float(logprobs[i]) for c, i in zip(candidates, ids)}, prompt_tokens=len(tokens))

    def next_token_distribution(self, messages: list[dict[str, str]], assistant_prefix: str = ""):
        """(prompt tokens, log-probabilities over the whole vocabulary as a float64 tensor) of the
        assistant's next token: what the parity test compares with llama.cpp."""
        with self._lock:
            tokens = self.prompt_tokens(messages, assistant_prefix)
            with self._threads():
                return tokens, self._forward_logits(tokens, 1)[0].double().log_softmax(-1)

    async def score_continuation(self, messages: list[dict[str, str]] | None, continuation: str, *,
                                 end_of_turn: bool = False) -> ContinuationLogprobs:
        """Per-token logprobs of ``continuation`` as the assistant's reply to ``messages`` (``None``:
        to :data:`UNCONDITIONAL_MESSAGES`); with ``end_of_turn``, one more value: the logprob of the
        end-of-turn token right after it. One forward pass; logits kept for the scored positions only."""
        return await asyncio.to_thread(self._score_sync, messages, continuation, end_of_turn)

    def _score_sync(self, messages: list[dict[str, str]] | None, continuation: str, end_of_turn: bool = False) -> ContinuationLogprobs:
        import torch

        with self._lock:
            key = (continuation, bool(end_of_turn))
            if messages is None and key in self._unconditional:
                self._unconditional.move_to_end(key)
                kept = self._unconditional[key]
                return ContinuationLogprobs(kept, kept.prompt_tokens)
            prompt = self.prompt_tokens(messages if messages is not None else list(UNCONDITIONAL_MESSAGES))
            target = self._ids(continuation, special=False)
            if not target:
                return ContinuationLogprobs([], 0)
            if end_of_turn:
                target = [*target, self.end_of_turn_token()]
            if len(prompt) + len(target) > self.n_ctx:
                raise BackendError(f"prompt of {len(prompt)} tokens + continuation of {len(target)} exceeds the context of {self.n_ctx}")
            try:
                # positions len(prompt)-1 .. end predict the target tokens; the last target token predicts nothing needed
                with self._threads():
                    logits = self._forward_logits(prompt + target[:-1], len(target))
                picked = logits.gather(1, torch.tensor(target, device=logits.device)[:, None])[:, 0]
                values = (picked.double() - torch.logsumexp(logits.double(), dim=-1)).tolist()
            except Exception as e:
                raise BackendError(f"transformers: {type(e).__name__}: {e}") from e
            logprobs = ContinuationLogprobs([float(v) for v in values], len(prompt) + len(target))
            if messages is None:
                self._unconditional[key] = logprobs
                while len(self._unconditional) > self.unconditional_cache_size:
                    self._unconditional.popitem(last=False)
        return ContinuationLogprobs(logprobs, logprobs.prompt_tokens)

    async def aclose(self) -> None:
        """Drop the model once no worker thread is inside it (a cancelled call runs on in its thread)."""
        self._closed = True
        await asyncio.to_thread(self._lock.acquire)
        try:
            model, self._model, self._tok = self._model, None, None
            if model is not None:
                del model
                import gc

                gc.collect()
                if str(self.device).startswith("cuda"):
                    import torch

                    torch.cuda.empty_cache()
        finally:
            self._lock.release()


@hookimpl
def btkit_register_backends(register):
    register("transformers", TransformersBackend,
             description="Hugging Face model folder in process via transformers/torch (transformers:DIR, e.g. a btkit train output; -B device=cuda)")
