"""``cloze:``, a backend: a rule that writes fill-in-the-blank questions, standing in for a model.

It needs no model and no server, so ``btkit run quiz CORPUS --model cloze:`` shows the quiz method
end to end in a second. It is small, but it keeps the whole backend contract:

- the factory, ``ClozeBackend(rest, options)``, is called with the spec after ``cloze:`` (here the
  shortest word length to blank: ``cloze:`` means 6, ``cloze:8``) and the run's ``-B`` options
  (every backend gets all of them: take yours, ignore the rest). It checks them and raises
  :class:`btkit.errors.BtkitError`, which stops the run with one line before any model call;
- ``capabilities`` says what it can do: chat only. A stage that needs logprobs (``--curate-mode
  logprob`` of another method) is refused before the first call, naming this backend;
- ``chat`` is async and returns a :class:`btkit.backends.Completion`. A reply longer than
  ``max_tokens`` is cut and says ``finish_reason="length"``, which btkit counts as ``truncated``
  and never takes as good output;
- ``identity`` is what btkit keys its cache on, besides the request: it names the rule's version,
  so changing the rule (and its ``RULE``) never serves a question the old rule wrote.
"""

from __future__ import annotations

import re
from typing import Any

from btkit.backends import CHAT, Backend, Completion
from btkit.errors import BtkitError

#: Bump when the rule changes: it is part of every cache key of this backend's replies.
RULE = "cloze-1"
DEFAULT_MIN_LENGTH = 6

#: A passage quoted by the ``delimit`` template filter: ``<<<LABEL hash`` ... ``LABEL hash>>>``.
_QUOTED = re.compile(r"<<<(?P<tag>[A-Z_]+ [0-9a-f]+)\n(?P<text>.*?)\n(?P=tag)>>>", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[^\W\d_]+")


def cloze_question(passage: str, min_length: int = DEFAULT_MIN_LENGTH) -> str | None:
    """A question that blanks the longest word (at least ``min_length`` letters) of the passage's first
    sentence that has one, e.g. ``Which word fills the blank: "Cats ____ most of the day"?``; None if
    no sentence has such a word."""
    for sentence in _SENTENCE_END.split(" ".join(passage.split())):
        words = [m for m in _WORD.finditer(sentence) if len(m.group()) >= min_length]
        if words:
            longest = max(words, key=lambda m: len(m.group()))  # the first of the longest
            blanked = sentence[:longest.start()] + "____" + sentence[longest.end():]
            return f'Which word fills the blank: "{blanked.rstrip(".!?")}"?'
    return None


class ClozeBackend(Backend):
    """Answers a quiz prompt with a cloze question about the passage it quotes."""

    capabilities = frozenset({CHAT})

    def __init__(self, rest: str, options: dict[str, Any]):
        rest = rest.strip()
        if rest and not (rest.isdigit() and int(rest) >= 1):
            raise BtkitError(f"cloze: takes the shortest word length to blank, a whole number >= 1 (cloze:6); got 'cloze:{rest}'")
        self.min_length = int(rest) if rest else DEFAULT_MIN_LENGTH
        self.spec = f"cloze:{rest}"

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec, "rule": RULE, "min_length": self.min_length}

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        prompt = messages[-1]["content"]
        quoted = _QUOTED.search(prompt)
        question = cloze_question(quoted.group("text") if quoted else prompt, self.min_length)
        words = (question or "I found no word to blank.").split()
        limit = params.get("max_tokens")
        cut = limit is not None and len(words) > int(limit)
        if cut:
            words = words[:int(limit)]
        return Completion(text=" ".join(words), finish_reason="length" if cut else "stop",
                          prompt_tokens=sum(len(m["content"].split()) for m in messages), completion_tokens=len(words))
