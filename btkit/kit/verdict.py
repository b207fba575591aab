"""Binary judgments (yes/no, good/bad) shared by CRAB's constraint check and Kun's instruction judge.

Two ways to get a verdict, the judge modes of :mod:`btkit.kit.judges` that a label judge supports
(:data:`~btkit.kit.judges.LABEL_JUDGE_MODES`): ``logprob`` prefills the template's answer
prefix and compares the next-token probabilities of the two labels (one forward pass, nothing to
parse; small local models rarely format a reply well), ``rubric`` lets the model reply and parses
the label strictly: a reply naming neither label, or both without a clear final answer, is a
:class:`ParseError`, counted and recorded with the raw text, never guessed. The label comes
first, so a reply cut at ``max_tokens`` after it still carries the verdict: it is parsed
(``accept_truncated``; the lineage step keeps ``finish_reason: length`` and says so), while a cut
reply that names no clear label fails like any other.
"""

from __future__ import annotations

import math
import re
from typing import Any

from btkit.methods import ParseError

from . import judges
from .judges import LABEL_JUDGE_MODES, invalid_logprobs, normalize_judge_mode, parse_error_details

__all__ = ["binary_verdict", "parse_binary"]


def parse_binary(text: str | None, positive: str, negative: str) -> bool:
    """True for ``positive``, False for ``negative``; ParseError when absent or ambiguous."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    pattern = re.compile(r"\b(" + re.escape(positive) + "|" + re.escape(negative) + r")\b", re.IGNORECASE)
    found = [m.group(1).lower() for m in pattern.finditer(text)]
    if not found:
        raise ParseError("no_verdict", f"neither '{positive}' nor '{negative}' in the reply")
    if len(set(found)) == 1:
        return found[0] == positive.lower()
    # Both labels appear: accept only a labelled final answer ("Answer: yes", "Verdict: bad").
    labelled = re.findall(r"(?:answer|verdict|judg(?:e)?ment|decision)\s*\**\s*[:=]\s*\**\s*(" + re.escape(positive) + "|" + re.escape(negative) + r")\b",
                          text, re.IGNORECASE)
    if len({x.lower() for x in labelled}) == 1:
        return labelled[0].lower() == positive.lower()
    raise ParseError("ambiguous_verdict", f"both '{positive}' and '{negative}' in the reply")


async def binary_verdict(ctx: Any, template: str, variables: dict[str, Any], positive: str, negative: str,
                         mode: str = "auto", params: dict[str, Any] | None = None) -> tuple[bool | None, dict[str, Any]]:
    """Ask ``template`` for a two-label verdict. Returns (verdict or None when unparseable, details).

    ``mode`` is a judge mode (``auto`` decided by :func:`~btkit.kit.judges.resolve_judge_mode`).
    ``rubric`` parses through ``ctx.complete(parse=...)``, so ``--parse-retries`` re-samples an
    unparseable reply and the reason is the engine's when the reply was cut or filtered
    ('truncated', 'content_filter'). ``logprob`` refuses values that are not log-probabilities
    (NaN, > 0: ``invalid_logprobs``) instead of turning them into a silent "no".
    """
    mode = judges.resolve_judge_mode(normalize_judge_mode(mode), ctx.backend(), LABEL_JUDGE_MODES)[0]
    if mode == "logprob":
        lp = await ctx.next_token_logprobs(template, {**variables, "mode": "logprob"}, [positive, negative])
        lp_pos, lp_neg = float(lp.get(positive, -math.inf)), float(lp.get(negative, -math.inf))
        if invalid_logprobs((lp_pos, lp_neg)):
            return None, {"verdict_mode": mode, "verdict_error": "invalid_logprobs"}
        pos, neg = math.exp(lp_pos), math.exp(lp_neg)
        if pos + neg <= 0:
            return None, {"verdict_mode": mode, "verdict_error": "no_label_mass"}
        p = pos / (pos + neg)
        return p >= 0.5, {"verdict_mode": mode, f"p_{positive.lower()}": round(p, 4), "label_mass": round(pos + neg, 4)}

    def parse(text: str | None) -> dict[str, str]:
        return {"verdict": positive if parse_binary(text, positive, negative) else negative}

    comp = await ctx.complete(template, {**variables, "mode": mode}, parse=parse, accept_truncated=True, **(params or {}))
    if comp.parse_error is not None:
        return None, {"verdict_mode": mode, **parse_error_details(comp.parse_error, "verdict")}
    return comp.parsed["verdict"] == positive, {"verdict_mode": mode}
