"""Judge scores shared by any method's curate stage.

- ``parse_score``: a strict parser for rubric replies ("... Score: 4"). It never guesses: a reply
  with no score, two different scores, a score out of 1..N or not a whole number is a
  :class:`ParseError` with a reason, counted and recorded with the raw reply.
- ``rubric_score``: generate, then parse.
- ``logprob_score``: prefill ``Score: `` and read the next-token distribution over the digits,
  one forward pass and no parsing; the score is the most likely digit, and the distribution and
  its expectation are kept.
"""

from __future__ import annotations

import math
import re
from typing import Any

from btkit.methods import ParseError

_NUM = r"(\d+(?:[.,]\d+)?)"
# "Score: 4", "**Score:** 4", "score = 4", "Score - 4/5", "Rating: 4 out of 5", "Score: [4]"
_SCORE_RE = re.compile(
    r"(?:score|rating)\s*(?:\*\*|__)?\s*(?:[:=\-–]|is|of)\s*(?:\*\*|__)?\s*[\[\(\"'“]?\s*" + _NUM + r"\s*[\]\)\"'”]?\s*(?:(?:/|out\s+of)\s*(\d+))?",
    re.IGNORECASE,
)
_BARE_RE = re.compile(r"^\s*(?:\*\*)?\s*" + _NUM + r"\s*(?:(?:/|out\s+of)\s*(\d+))?\s*(?:\*\*)?\s*\.?\s*$", re.IGNORECASE)


def _value(num: str, denom: str | None, top: int) -> int:
    if denom is not None and int(denom) != top:
        raise ParseError("out_of_range", f"score {num}/{denom} is not on the 1..{top} scale")
    try:
        v = float(num.replace(",", "."))
    except ValueError:
        raise ParseError("not_a_number", num) from None
    if v != int(v):
        raise ParseError("not_integer", num)
    if not 1 <= v <= top:
        raise ParseError("out_of_range", f"score {num} outside 1..{top}")
    return int(v)


def parse_score(text: str | None, top: int = 5) -> int:
    """The score on a 1..``top`` scale from a judge's reply, or ParseError. Never guesses."""
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    lines = [l for l in text.strip().splitlines() if l.strip()]
    last = lines[-1]
    m = list(_SCORE_RE.finditer(last))
    if m:
        vals = {_value(x.group(1), x.group(2), top) for x in m}
        if len(vals) == 1:
            return vals.pop()
        raise ParseError("ambiguous_score", f"last line has scores {sorted(vals)}")
    b = _BARE_RE.match(last)
    if b:
        return _value(b.group(1), b.group(2), top)
    matches = list(_SCORE_RE.finditer(text))
    if not matches:
        raise ParseError("no_score", "no 'Score: N' in the reply")
    vals = set()
    errors = []
    for x in matches:
        try:
            vals.add(_value(x.group(1), x.group(2), top))
        except ParseError as e:
            errors.append(e)
    if len(vals) == 1 and not errors:
        return vals.pop()
    if not vals and errors:
        raise errors[-1]
    raise ParseError("ambiguous_score", f"scores {sorted(vals)} in the reply")


async def rubric_score(ctx: Any, template: str, variables: dict[str, Any], params: dict[str, Any], top: int = 5) -> tuple[int | None, dict[str, Any]]:
    """Generate a rubric reply and parse it. Returns (score or None, details for meta)."""
    comp = await ctx.complete(template, {**variables, "mode": "rubric"}, **params)
    if not comp.ok:
        reason = "truncated" if comp.finish_reason == "length" else "empty_reply"
        comp.step["parse_error"] = reason
        return None, {"score_error": reason}
    try:
        score = parse_score(comp.text, top)
    except ParseError as e:
        comp.step["parse_error"] = e.reason
        return None, {"score_error": e.reason, "score_error_detail": e.detail}
    comp.step["parsed"] = {"score": score}
    return score, {"score": score}


async def logprob_score(ctx: Any, template: str, variables: dict[str, Any], top: int = 5) -> tuple[int | None, dict[str, Any]]:
    """Read the distribution over 1..top after the template's ``Score: `` prefix."""
    digits = [str(i) for i in range(1, top + 1)]
    lp = await ctx.next_token_logprobs(template, {**variables, "mode": "logprob"}, digits)
    lp = {d: float(lp.get(d, -math.inf)) for d in digits}  # a backend may omit unlikely digits
    mass = sum(math.exp(v) for v in lp.values())
    if mass <= 0:
        return None, {"score_error": "no_digit_mass"}
    dist = {d: math.exp(lp[d]) / mass for d in digits}
    score = int(max(digits, key=lambda d: dist[d]))
    expected = sum(int(d) * p for d, p in dist.items())
    return score, {"score": score, "score_dist": {d: round(p, 4) for d, p in dist.items()},
                   "score_expected": round(expected, 4), "digit_mass": round(mass, 4)}
