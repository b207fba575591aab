"""Judge scores shared by any method's curate stage.

- ``parse_score``: a strict parser for rubric replies ("... Score: 4"). It never guesses: a reply
  with no score, two different score lines, a range ("3-4"), a score out of 1..N or not a whole
  number is a :class:`ParseError` with a reason, counted and recorded with the raw reply.
- ``rubric_score``: generate, then parse, through ``ctx.complete(parse=...)`` so ``--parse-retries``
  re-samples an unparseable reply.
- ``logprob_score``: prefill ``Score: `` and read the next-token distribution over the digits,
  one forward pass and no parsing; the score is the most likely digit, and the distribution and
  its expectation are kept. Values that are not log-probabilities (NaN, > 0) are refused
  (:func:`invalid_logprobs`), here and in every judge that reads label probabilities.
- ``likelihood_score``: no judging prompt at all. The model scores the response twice, as the
  reply to the instruction and as a reply to an empty request; how much the instruction makes the
  response more likely says whether the pair fits. Small models whose rubric scores are noise
  (SmolLM2-135M) still rank pairs well this way. Two modes:

  * ``pmi``: mean log P(response | instruction) - mean log P(response), in nats per token
    (pointwise mutual information of the pair, length-normalised). > 0: the instruction helps.
  * ``ifd``: Instruction-Following Difficulty (Li et al. 2023, arXiv 2308.12032; Superfiltering,
    arXiv 2402.00530): IFD = L(response | instruction) / L(response), L the mean negative
    log-likelihood per token. Low IFD: the instruction makes the response much easier to predict;
    IFD >= 1: the instruction does not help (Superfiltering drops those as misaligned). The
    papers then *prefer high IFD below 1* to find difficult training examples; here the question
    is whether the instruction fits the response, so lower IFD is better and the stage's score is
    ``1 - IFD`` (the share of the response's loss the instruction removes), so that in every
    mode a higher score means a better pair and ``score >= 0`` is exactly "IFD <= 1".

  * ``complete``: pmi plus a completeness term read from the conditional pass, one token longer:
    ``end_cond`` = log P(the chat template's end-of-turn token | instruction, response), and
    ``score = pmi + COMPLETE_WEIGHT * min(0, end_cond - END_FLOOR)`` (:func:`complete_term`). pmi
    and ifd rank an answer cut to its opening above the whole one (the opening is the part most
    tied to the question); the model's own sense of whether the reply is over tells the cut one
    apart, and the min(0, ...) only ever takes away, so a whole answer's score is its pmi.
    Needs a backend that can return the end-of-turn logprob (:data:`END_OF_TURN`: ``llamacpp:``);
    a remote text frame (``openai:``, ``vllm:``) has no chat end token to read.

  The unconditional term comes from a separate ``ctx.score_continuation(None, {}, response)``
  call, so the engine's content-addressed cache computes it once per response however many
  instructions are scored against it.
- ``top_percent_cutoff``: the score a record needs to be in the top P% of a run's scores.
- :class:`Curator`: a curate stage's settings and decisions (mode, absolute threshold, keep the
  top P%), so every method's curate stage scores and keeps pairs the same way.
- :class:`PairCurateStage`: the generic curate stage (score an (instruction, response) pair with a
  :class:`Curator`, keep it above the threshold or in the top P%), for any method to configure with
  its own templates; :func:`pair_curate_options` are its command-line options.

One judging vocabulary (:data:`JUDGE_MODES`) names how every judging stage of every method reads
its judge, set with ``--judge-mode``:

- ``rubric``: the model replies and the reply is parsed (a score, or a yes/no label);
- ``logprob``: the answer prefix is prefilled and the next-token distribution over the labels or
  digits is read, one forward pass, nothing to parse;
- ``pmi``, ``ifd``, ``complete``: no judging prompt, the pair is scored by likelihood (pair judges only);
- ``auto``: decided by :func:`resolve_judge_mode`, the one place that chooses.

Each judging stage derives from :class:`JudgingStage` and declares the modes it supports
(``judge_modes``); an unsupported mode is refused when the stage is built, before any model call.
The former names (``--curate-mode``, ``--verify-mode``, ``--score-mode``, eval-judge's ``--mode``
and the value ``generate``) are read for one release with a deprecation warning
(:func:`deprecated_alias`, :class:`JudgeModeType`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator

import click

from btkit.backends import END_OF_TURN, NEXT_TOKEN_LOGPROBS, SCORE_CONTINUATION
from btkit.errors import BtkitError
from btkit.methods import ParseError, Stage
from btkit.options import PERCENT, SCORE
from btkit.records import Record, journal_key

__all__ = [
    "JUDGE_MODES", "LABEL_JUDGE_MODES", "LIKELIHOOD_MODES",
    "resolve_judge_mode", "check_judge_mode", "normalize_judge_mode", "require_judge_mode",
    "judge_mode_option", "deprecated_alias", "JudgeModeType",
    "JudgingStage", "PairCurateStage", "pair_curate_options", "Curator", "rank_value", "top_percent_cutoff",
    "parse_score", "parse_error_details", "rubric_score", "logprob_score", "likelihood_score", "likelihood_parts",
    "invalid_logprobs", "LOGPROB_SLACK", "auto_choice_line", "can_score_complete", "COMPLETE_WEIGHT", "END_FLOOR", "complete_term",
]

_NUM = r"(\d+(?:[.,]\d+)?)(?!\w|[.,]\d)"  # "1e1", "4x", "12abc" are not scores
# "Score: 4", "**Score:** 4", "score = 4", "Score - 4/5", "Rating: 4 out of 5", "Score: [4]"
_SCORE_RE = re.compile(
    r"(?:score|rating)\s*(?:\*\*|__)?\s*(?:[:=\-–]|is|of)\s*(?:\*\*|__)?\s*[\[\(\"'“]?\s*" + _NUM + r"\s*[\]\)\"'”]?\s*(?:(?:/|out\s+of)\s*(\d+))?",
    re.IGNORECASE,
)
_BARE_RE = re.compile(r"^\s*(?:\*\*)?\s*" + _NUM + r"\s*(?:(?:/|out\s+of)\s*(\d+))?\s*(?:\*\*)?\s*\.?\s*$", re.IGNORECASE)
#: A second number right after a score, on the same line ("Score: 3-4", "3 to 4", "3 or 4", "[3–4]"):
#: the judge did not decide.
_RANGE_TAIL = re.compile(r"[ \t]*[\]\)]?[ \t]*(?:-|–|—|~|\bto\b|\bor\b)[ \t]*[\[\(]?[ \t]*\d", re.IGNORECASE)
_BARE_RANGE = re.compile(r"^\s*(?:\*\*)?\s*\d+" + _RANGE_TAIL.pattern + r"+\s*(?:(?:/|out\s+of)\s*\d+)?\s*(?:\*\*)?\s*\.?\s*$", re.IGNORECASE)
#: A line that states a score, as the rubric asks ("Score: 4", "**Final score:** 5", "- Rating = 3"),
#: as opposed to prose that mentions one ("a score of 5 needs an expert voice").
_SCORE_LINE = re.compile(r"^[\s#>*_\-]*(?:(?:final|overall|total)\s+)?(?:score|rating)\s*(?:\*\*|__)?\s*[:=\-–]", re.IGNORECASE)


def _value(num: str, denom: str | None, top: int, bottom: int = 1) -> int:
    if denom is not None and int(denom) != top:
        raise ParseError("out_of_range", f"score {num}/{denom} is not on the {bottom}..{top} scale")
    try:
        v = float(num.replace(",", "."))
    except ValueError:
        raise ParseError("not_a_number", num) from None
    if v != int(v):
        raise ParseError("not_integer", num)
    if not bottom <= v <= top:
        raise ParseError("out_of_range", f"score {num} outside {bottom}..{top}")
    return int(v)


def _match_value(m: re.Match, text: str, top: int, bottom: int) -> int:
    """The score of one match, refusing a range ("3-4") rather than reading its first number."""
    tail = _RANGE_TAIL.match(text, m.end(2) if m.group(2) else m.end(1))
    if tail:
        raise ParseError("range", f"'{text[m.start():tail.end()].strip()}' is a range, not a score")
    return _value(m.group(1), m.group(2), top, bottom)


def _line_values(line: str, top: int, bottom: int) -> set[int]:
    """Scores stated on one line; ParseError when one is invalid or two differ."""
    vals = {_match_value(x, line, top, bottom) for x in _SCORE_RE.finditer(line)}
    if len(vals) > 1:
        raise ParseError("ambiguous_score", f"line has scores {sorted(vals)}")
    return vals


def parse_score(text: str | None, top: int = 5, bottom: int = 1) -> int:
    """The score on a ``bottom``..``top`` scale from a judge's reply, or ParseError. Never guesses.

    The rubric asks for reasoning, then ``Score: N`` on the last line, so a score on the last line
    wins over scores mentioned in the reasoning ("a score of 5 needs ..."), but not over another
    *score line* (a line that starts with ``Score:``): two score lines with different values are
    ``ambiguous_score``. Without a score on the last line, every score in the reply must agree.
    Ranges ("Score: 3-4", "3 to 4") are ``range``; nothing is rounded, clipped or picked.
    """
    if text is None or not text.strip():
        raise ParseError("empty_reply")
    lines = [l for l in text.strip().splitlines() if l.strip()]
    last = lines[-1]
    final = _line_values(last, top, bottom)
    if not final:
        b = _BARE_RE.match(last)
        if b:
            final = {_value(b.group(1), b.group(2), top, bottom)}
        elif _BARE_RANGE.match(last):
            raise ParseError("range", f"'{last.strip()}' is a range, not a score")
    if final:
        score = final.pop()
        for line in lines[:-1]:  # an earlier score line must say the same
            if not _SCORE_LINE.match(line):
                continue
            try:
                earlier = _line_values(line, top, bottom)
            except ParseError as e:
                raise ParseError("ambiguous_score", f"last line says {score}, an earlier score line is invalid ({e})") from None
            if earlier and earlier != {score}:
                raise ParseError("ambiguous_score", f"score lines say {sorted(earlier | {score})}")
        return score
    matches = list(_SCORE_RE.finditer(text))
    if not matches:
        raise ParseError("no_score", "no 'Score: N' in the reply")
    vals = set()
    errors = []
    for x in matches:
        try:
            vals.add(_match_value(x, text, top, bottom))
        except ParseError as e:
            errors.append(e)
    if len(vals) == 1 and not errors:
        return vals.pop()
    if not vals and errors:
        raise errors[-1]
    raise ParseError("ambiguous_score", f"scores {sorted(vals)} in the reply")


def parse_error_details(e: ParseError, prefix: str = "score") -> dict[str, Any]:
    """A parse failure as record meta: ``{prefix}_error`` (counted reason) and its detail if any."""
    out: dict[str, Any] = {f"{prefix}_error": e.reason}
    if e.detail:
        out[f"{prefix}_error_detail"] = e.detail[:500]
    return out


async def rubric_score(ctx: Any, template: str, variables: dict[str, Any], params: dict[str, Any], top: int = 5,
                       bottom: int = 1) -> tuple[int | None, dict[str, Any]]:
    """Generate a rubric reply and parse it. Returns (score or None, details for meta).

    Parsing goes through ``ctx.complete(parse=...)``, so a reply that does not parse (or was cut
    at max tokens, or filtered) is re-sampled under ``--parse-retries`` and every attempt is in
    the lineage; the reason kept is the last attempt's.
    """
    comp = await ctx.complete(template, {**variables, "mode": "rubric"}, parse=lambda t: {"score": parse_score(t, top, bottom)}, **params)
    if comp.parse_error is not None:
        return None, parse_error_details(comp.parse_error)
    score = comp.parsed["score"]
    return score, {"score": score}


#: Tolerance for a log-probability above 0 (float rounding in a backend's log-softmax).
LOGPROB_SLACK = 1e-4


def invalid_logprobs(values: Iterable[float]) -> bool:
    """True when any value cannot be a log-probability: NaN, or above 0 (+inf included).

    -inf is valid (a candidate the backend gives no mass). Such values would otherwise turn into
    a bogus distribution, a NaN score, or an OverflowError in ``exp``.
    """
    return any(math.isnan(v) or v > LOGPROB_SLACK for v in values)


async def logprob_score(ctx: Any, template: str, variables: dict[str, Any], top: int = 5,
                        bottom: int = 1) -> tuple[int | None, dict[str, Any]]:
    """Read the distribution over bottom..top after the template's ``Score: `` prefix."""
    digits = [str(i) for i in range(bottom, top + 1)]
    lp = await ctx.next_token_logprobs(template, {**variables, "mode": "logprob"}, digits)
    lp = {d: float(lp.get(d, -math.inf)) for d in digits}  # a backend may omit unlikely digits
    if invalid_logprobs(lp.values()):
        return None, {"score_error": "invalid_logprobs"}
    mass = sum(math.exp(v) for v in lp.values())
    if mass <= 0:
        return None, {"score_error": "no_digit_mass"}
    dist = {d: math.exp(lp[d]) / mass for d in digits}
    score = int(max(digits, key=lambda d: dist[d]))
    expected = sum(int(d) * p for d, p in dist.items())
    return score, {"score": score, "score_dist": {d: round(p, 4) for d, p in dist.items()},
                   "score_expected": round(expected, 4), "digit_mass": round(mass, 4)}


#: Curate modes that score by likelihood (need a backend with ``score_continuation``; ``complete``
#: also :data:`END_OF_TURN`).
LIKELIHOOD_MODES = ("pmi", "ifd", "complete")


#: ``complete``'s completeness term: log P(end of turn | instruction, response) below this floor (nats;
#: e^-12 = 6e-6) costs :data:`COMPLETE_WEIGHT` per nat. Chosen on the shipped gold set, where whole
#: answers end with median logprob -2.8 and answers cut to their first 30 % with -22.4 (see the
#: README's "Curation on a small model" for the alternatives' numbers).
END_FLOOR = -12.0
#: Score (nats per token of pmi) taken away per nat the end-of-turn logprob falls below :data:`END_FLOOR`.
COMPLETE_WEIGHT = 0.5


def complete_term(end_cond: float) -> float:
    """The completeness term of ``complete``: ``min(0, end_cond - END_FLOOR)``, in nats (<= 0).

    ``end_cond``: log P(the chat template's end-of-turn token) right after the response, given
    the instruction. A reply the model finds plausibly over at that point costs nothing, so the
    score stays pmi (and ``score >= 0`` still means "the instruction helps"); one the model
    expects to go on (cut off mid-sentence or mid-list) is pushed down in proportion."""
    return min(0.0, end_cond - END_FLOOR)


def likelihood_parts(mode: str, cond: list[float], uncond: list[float],
                     end_cond: float | None = None) -> tuple[float | None, dict[str, Any]]:
    """The pair's score in ``mode`` ('pmi', 'ifd' or 'complete') from per-token logprobs, with its parts for meta.

    ``cond``: logprobs of the response's tokens after the instruction; ``uncond``: the same
    response with no instruction; ``end_cond`` (``complete`` only): the logprob of the end-of-turn
    token right after the response, given the instruction. Higher
    score = better pair in every mode (see module docstring).
    """
    if mode not in LIKELIHOOD_MODES:
        raise ValueError(f"unknown likelihood mode {mode!r}")
    if not cond or not uncond:
        return None, {"score_error": "empty_response"}
    ends = (end_cond,) if mode == "complete" else ()
    if mode == "complete" and end_cond is None:
        return None, {"score_error": "no_end_of_turn_logprob"}
    if not all(math.isfinite(v) for v in (*cond, *uncond, *ends)) or invalid_logprobs(ends):
        return None, {"score_error": "invalid_logprobs"}
    cond_mean = math.fsum(cond) / len(cond)
    uncond_mean = math.fsum(uncond) / len(uncond)
    details: dict[str, Any] = {
        "cond_logprob": round(cond_mean, 6),
        "uncond_logprob": round(uncond_mean, 6),
        "cond_tokens": len(cond),
        "uncond_tokens": len(uncond),
        "pmi": round(cond_mean - uncond_mean, 6),
    }
    uncond_loss = -uncond_mean
    if uncond_loss > 0:
        details["ifd"] = round(-cond_mean / uncond_loss, 6)
    if mode == "pmi":
        score = cond_mean - uncond_mean
    elif mode == "complete":
        term = complete_term(end_cond)
        details.update(end_cond_logprob=round(end_cond, 6), complete_term=round(term, 6), complete_weight=COMPLETE_WEIGHT,
                       end_floor=END_FLOOR)
        score = cond_mean - uncond_mean + COMPLETE_WEIGHT * term
    elif uncond_loss > 0:
        score = 1.0 - (-cond_mean / uncond_loss)
    else:  # the response is certain without the instruction: IFD is undefined
        return None, {**details, "score_error": "zero_unconditional_loss"}
    details["score"] = round(score, 6)
    return details["score"], details


async def likelihood_score(ctx: Any, mode: str, template: str, variables: dict[str, Any], response: str) -> tuple[float | None, dict[str, Any]]:
    """Score a pair by likelihood: the response after the rendered ``template`` vs after nothing.

    The conditional call renders ``template`` (the instruction as the user message); the
    unconditional one is ``score_continuation(None, ...)``, a separate cached call per response.
    ``complete`` asks the conditional call for the end-of-turn logprob too (``end_of_turn=True``:
    the same pass with one more token, a cache entry of its own); the unconditional call is pmi's
    own, shared with pmi and ifd in the cache.
    """
    if mode != "complete":
        cond = await ctx.score_continuation(template, variables, response)
        uncond = await ctx.score_continuation(None, {}, response)
        return likelihood_parts(mode, cond, uncond)
    cond = list(await ctx.score_continuation(template, variables, response, end_of_turn=True))
    uncond = await ctx.score_continuation(None, {}, response)
    if not cond:
        return None, {"score_error": "empty_response"}
    return likelihood_parts(mode, cond[:-1], uncond, cond[-1])


def top_percent_cutoff(scores: Iterable[float], percent: float) -> float | None:
    """The lowest score inside the top ``percent`` % (at least one record when any scored).

    Records scoring >= the cutoff are kept, so ties at the boundary are all kept: equal scores
    never get different decisions. None when there are no scores.
    """
    ranked = sorted(scores, reverse=True)
    if not ranked:
        return None
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    k = max(1, math.ceil(len(ranked) * percent / 100 - 1e-9))
    return ranked[k - 1]


# -- the judging vocabulary -------------------------------------------------------------------
#: How a judging stage reads its judge (``--judge-mode``), one vocabulary for every method.
JUDGE_MODES = ("auto", "rubric", "logprob") + LIKELIHOOD_MODES
#: What a judge that reads a label or a score from the model supports (yes/no verdicts, scores of an
#: instruction alone): the likelihood modes need a response whose likelihood the instruction changes.
LABEL_JUDGE_MODES = ("auto", "rubric", "logprob")
#: Former values, read for one release with a warning.
_DEPRECATED_MODE_VALUES = {"generate": "rubric"}


def _warn_deprecated(message: str) -> None:
    """``warning: MESSAGE`` on stderr, once per command invocation (every time outside one)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        seen = ctx.meta.setdefault("btkit.deprecation_warnings", set())
        if message in seen:
            return
        seen.add(message)
    click.echo(f"warning: {message}", err=True)


def normalize_judge_mode(mode: str | None) -> str:
    """``mode`` in the current vocabulary: None is ``auto``, a former value is its new name (with a warning)."""
    mode = mode or "auto"
    if mode in _DEPRECATED_MODE_VALUES:
        _warn_deprecated(f"judge mode '{mode}' is deprecated; use '{_DEPRECATED_MODE_VALUES[mode]}'")
        mode = _DEPRECATED_MODE_VALUES[mode]
    return mode


def check_judge_mode(mode: str | None, stage: str, supported: Iterable[str]) -> str:
    """The mode a stage was asked for, refused in one line naming the stage when it cannot judge that way."""
    mode = normalize_judge_mode(mode)
    supported = tuple(supported)
    if mode not in JUDGE_MODES:
        raise BtkitError(f"--judge-mode '{mode}' unknown; choose one of {', '.join(JUDGE_MODES)}")
    if mode not in supported:
        raise BtkitError(f"stage {stage} cannot judge with --judge-mode {mode}; it supports {', '.join(supported)}")
    return mode


def can_score_complete(backend: Any) -> bool:
    """Whether ``complete`` can run on ``backend``: continuation scores with the end-of-turn logprob.

    The end of the turn is asked first: a backend without it (``openai:``) is never made to probe
    its server for continuation scores it would not use."""
    return backend.supports(END_OF_TURN) and backend.supports(SCORE_CONTINUATION)


def resolve_judge_mode(requested: str, backend: Any, supported: Iterable[str] = JUDGE_MODES) -> tuple[str, str]:
    """(mode, why) a stage judges with on ``backend``: an explicit mode as asked; ``auto`` decided here.

    The one place ``auto`` is decided, by what was measured on the shipped gold set (the README's
    "Curation on a small model"): ``complete`` where the stage judges pairs by likelihood and the
    backend scores continuations with the end-of-turn logprob (``llamacpp:``, the embedded model
    included: AUC 0.9 where ``logprob`` is chance); else ``logprob`` where the backend reads
    next-token logprobs (one forward pass, nothing to parse); else ``rubric``. Stages that judge a
    label or an instruction alone (kun.judge, crab.verify, air.score) never get a likelihood mode.
    Asking the backend may make a backend ask its server once (``vllm:``), so stages call this from
    ``check_backend``, before the first call.
    """
    if requested != "auto":
        return requested, f"--judge-mode {requested}"
    supported = tuple(supported)
    if "complete" in supported and can_score_complete(backend):
        return "complete", "auto: the backend scores continuations and the end of the turn, so pmi plus completeness"
    if "logprob" in supported and backend.supports(NEXT_TOKEN_LOGPROBS):
        why = "the backend reads next-token logprobs"
        if "complete" in supported:
            why += ", not the end-of-turn logprob after a continuation"
        return "logprob", f"auto: {why}"
    return "rubric", "auto: the backend reads no next-token logprobs"


def require_judge_mode(mode: str, backend: Any, stage: str, supported: Iterable[str] = JUDGE_MODES,
                       former_flag: str | None = None) -> None:
    """Stop before the first call when ``backend`` cannot judge in ``mode`` (``auto`` is resolved now).

    ``former_flag`` (e.g. ``--curate-mode``) is named next to ``--judge-mode`` for users of the
    former name, for the deprecation release."""
    needs = {"logprob": (NEXT_TOKEN_LOGPROBS,), "pmi": (SCORE_CONTINUATION,), "ifd": (SCORE_CONTINUATION,),
             "complete": (SCORE_CONTINUATION, END_OF_TURN)}.get(mode)
    if needs is None:
        resolve_judge_mode(mode, backend, supported)
        return
    formerly = f" (formerly {former_flag} {mode})" if former_flag else ""
    for capability in needs:
        backend.require(capability, f"--judge-mode {mode}{formerly} in stage {stage} (or use --judge-mode pmi or rubric)"
                        if capability == END_OF_TURN else f"--judge-mode {mode}{formerly} in stage {stage} (or use --judge-mode rubric)")


def auto_choice_line(stage: Any, backend: Any) -> str | None:
    """What ``auto`` chose for a judging stage and why, as one line for the run's output (None when the
    stage's mode is not ``auto``, or it is no judging stage): ``humpback.curate: --judge-mode auto ->
    complete (...)``. Each record's meta says it too (``curate_mode``, ``judge_mode_auto``)."""
    requested = getattr(stage, "judge_mode", None)
    if requested != "auto":
        return None
    mode, why = resolve_judge_mode(requested, backend, getattr(stage, "judge_modes", JUDGE_MODES))
    return f"{stage.label}: --judge-mode auto -> {mode} ({why.removeprefix('auto: ')})"


def judge_mode_option(supported: Iterable[str], help: str) -> click.Option:
    """The ``--judge-mode`` option of a method whose judging stage supports ``supported``.

    Every method takes the whole vocabulary, so a mode its judge cannot use is refused by the
    stage in one line that names the stage and what it supports."""
    supported = tuple(supported)
    return click.Option(["--judge-mode", "judge_mode"], type=JudgeModeType(), default="auto", show_default=True,
                        help=f"{help} Supported here: {', '.join(supported)}.")


class JudgeModeType(click.Choice):
    """:data:`JUDGE_MODES` as a click type; the former value ``generate`` is read as ``rubric`` with a warning.

    With ``former_flag``, the type of a deprecated alias (:func:`deprecated_alias`): a value given
    under that name, on the command line, in a pipeline file or with ``-S``, warns once."""

    def __init__(self, former_flag: str | None = None, new_flag: str = "--judge-mode"):
        super().__init__(JUDGE_MODES)
        self.former_flag = former_flag
        self.new_flag = new_flag

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if self.former_flag and _given(param, ctx):
            _warn_deprecated(f"{self.former_flag} is deprecated; use {self.new_flag}")
        if isinstance(value, str) and value.lower() in _DEPRECATED_MODE_VALUES:
            value = normalize_judge_mode(value.lower())
        return super().convert(value, param, ctx)


def _given(param: Any, ctx: Any) -> bool:
    """Whether a value was written by the user (not an option's default): pipeline files and ``-S``
    convert without a click context."""
    if ctx is None or param is None or param.name is None:
        return True
    source = ctx.get_parameter_source(param.name)
    return source not in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def deprecated_alias(option: click.Option, former_flag: str) -> click.Option:
    """A hidden option ``former_flag`` that sets ``option``'s value, warning once that it is deprecated.

    On the command line its value goes to ``option``'s name, so the stage sees one option. A
    pipeline file's key (``curate_mode:``) or ``-S`` finds this option by its flag and gives the
    stage its own name, which the stage reads through :func:`_judge_mode_from`; both warn the same
    way, once per invocation."""
    new_flag = next(f for f in option.opts if f.startswith("--"))
    target = option.name

    def move_value(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None and value != ():
            ctx.params[target] = (tuple(ctx.params.get(target) or ()) + tuple(value)) if option.multiple else value
        return value

    return click.Option([former_flag], type=JudgeModeType(former_flag, new_flag), default=None, multiple=option.multiple,
                        hidden=True, expose_value=False, callback=move_value, help=f"Deprecated: use {new_flag}.")


def _judge_mode_from(options: dict[str, Any], *former_keys: str) -> str | None:
    """``judge_mode`` from a stage's options; a former key (``curate_mode``, from a pipeline file,
    ``-S`` or a caller that builds stages itself) wins when given, with a deprecation warning."""
    for key in former_keys:
        if options.get(key) is not None:
            _warn_deprecated(f"--{key.replace('_', '-')} is deprecated; use --judge-mode")
            return options[key]
    return options.get("judge_mode")


class JudgingStage(Stage):
    """A stage that asks a judge: declares the modes it supports and checks its backend before any call.

    Subclasses set ``judge_modes`` (a subset of :data:`JUDGE_MODES`, ``auto`` included) and, for
    the deprecation release, ``former_flag``/``former_key`` (the stage's former option name)."""

    kind = "curate"
    judge_modes: tuple[str, ...] = LABEL_JUDGE_MODES
    former_flag: str | None = None
    former_key: str | None = None

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        former = (self.former_key,) if self.former_key else ()
        self.judge_mode = check_judge_mode(_judge_mode_from(options, *former), self.label, self.judge_modes)

    def check_backend(self, backend: Any) -> None:
        require_judge_mode(self.judge_mode, backend, self.label, self.judge_modes, self.former_flag)

    def resolve_mode(self, backend: Any) -> str:
        """The mode this stage judges with on ``backend`` (``auto`` decided by :func:`resolve_judge_mode`)."""
        return resolve_judge_mode(self.judge_mode, backend, self.judge_modes)[0]

    def announce(self, backend: Any) -> str | None:
        """What ``auto`` chose on ``backend`` and why (:func:`auto_choice_line`), for the run's output."""
        return auto_choice_line(self, backend)


def rank_value(meta: dict[str, Any]) -> float | None:
    """The number pairs are ranked by: the score, or for ``logprob`` its expectation (finer than the argmax digit)."""
    if meta.get("score") is None:
        return None
    if meta.get("curate_mode") == "logprob" and meta.get("score_expected") is not None:
        return float(meta["score_expected"])
    return float(meta["score"])


class Curator:
    """How a curate stage scores a pair and decides to keep it, from the stage's options.

    Options (declared once, with their defaults, by :func:`pair_curate_options`): ``judge_mode``
    (see :data:`JUDGE_MODES`); ``threshold`` (1..5, rubric and logprob modes); ``score_threshold``
    (keep score >= X, any mode; pmi and ifd default to 0, "the instruction helps"); ``keep_top``
    (keep the top P% of the run's scored pairs, decided at the end of the run over all of them; ties
    at the cutoff are kept). With ``keep_top`` only an explicit ``score_threshold`` also applies.
    The score and its parts go to the record's meta (``curate_mode``: the mode that scored it).
    """

    def __init__(self, label: str, options: dict[str, Any], mode: str | None = None):
        self.label = label
        self.mode = mode if mode is not None else check_judge_mode(_judge_mode_from(options, "curate_mode"), label, JUDGE_MODES)
        self.threshold = int(options["threshold"])
        self.score_threshold = float(options["score_threshold"]) if options.get("score_threshold") is not None else None
        self.keep_top = float(options["keep_top"]) if options.get("keep_top") is not None else None
        if self.keep_top is not None and not 0 < self.keep_top <= 100:
            raise BtkitError(f"keep_top must be a percentage in (0, 100], got {self.keep_top:g}")

    @property
    def likelihood(self) -> bool:
        return self.mode in LIKELIHOOD_MODES

    def cutoff(self, mode: str | None = None) -> float | None:
        """The absolute threshold applied as each pair is scored (None: none, keep_top decides).

        ``mode``: the mode the pair was scored in (what ``auto`` resolved to); default the stage's."""
        if self.score_threshold is not None:
            return self.score_threshold
        if self.keep_top is not None:
            return None
        return 0.0 if (mode or self.mode) in LIKELIHOOD_MODES else self.threshold

    def check_backend(self, backend: Any) -> None:
        """Fail before the first call when the backend cannot score this way."""
        require_judge_mode(self.mode, backend, self.label, JUDGE_MODES, former_flag="--curate-mode")

    def resolve_mode(self, backend: Any) -> str:
        return resolve_judge_mode(self.mode, backend, JUDGE_MODES)[0]

    async def score(self, ctx: Any, instruction: str, response: str, *, judge_template: str, likelihood_template: str,
                    params: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
        """Score one pair; returns (score or None, meta to record). Higher is better in every mode."""
        mode = self.resolve_mode(ctx.backend())
        if mode in LIKELIHOOD_MODES:
            score, details = await likelihood_score(ctx, mode, likelihood_template, {"instruction": instruction}, response)
        elif mode == "logprob":
            score, details = await logprob_score(ctx, judge_template, {"instruction": instruction, "response": response})
        else:
            score, details = await rubric_score(ctx, judge_template, {"instruction": instruction, "response": response}, params)
        details.update(curate_mode=mode, scored_by=self.label, threshold=self.cutoff(mode))
        if self.mode == "auto":
            details["judge_mode_auto"] = resolve_judge_mode("auto", ctx.backend(), JUDGE_MODES)[1]
        if self.keep_top is not None:
            details["keep_top"] = self.keep_top
        return score, details

    def verdict(self, score: float | None, details: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """(drop reason, details) for a pair scored as it streams by, or None to keep it (for now)."""
        if score is None:
            reason = "no_score" if details.get("curate_mode") in LIKELIHOOD_MODES else "unparseable_score"
            return reason, {"error": details.get("score_error")}
        cut = self.cutoff(details.get("curate_mode"))
        if cut is not None and score < cut:
            return "below_threshold", {"score": score}
        return None

    def end_of_run(self, journal: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, dict[str, Any]]]:
        """With ``keep_top``: drop kept pairs below the top-P% cutoff over every pair this stage scored.

        The population is every record this stage scored, whatever happened to it later, so the
        decision is the same when a resumed run makes it again.
        """
        if self.keep_top is None:
            return {}
        values = []
        for line in journal():
            meta = line.get("meta") or {}
            if meta.get("scored_by") == self.label and (v := rank_value(meta)) is not None:
                values.append(v)
        cut = top_percent_cutoff(values, self.keep_top)
        if cut is None:
            return {}
        drops = {}
        for line in journal():
            meta = line.get("meta") or {}
            if line["status"] == "kept" and meta.get("scored_by") == self.label:
                v = rank_value(meta)
                if v is not None and v < cut:
                    drops[journal_key(line)] = ("below_keep_top", {"score": v, "keep_top": self.keep_top, "cutoff": cut})
        return drops


class PairCurateStage(JudgingStage):
    """Score an (instruction, response) pair with a :class:`Curator` and keep it if it scores well enough.

    The generic curate stage of backtranslation methods (Humpback, Back-and-Forth, ...): a method
    configures it with its templates, ``judge_template`` (the rubric; rendered with ``mode`` so
    ``logprob`` prefills ``Score: ``) and ``likelihood_template`` (the instruction alone as the user
    message, for pmi and ifd), and optionally ``system``, the system prompt a kept pair carries.
    Thresholds and keep-top-P% are the Curator's; its options are :func:`pair_curate_options`.
    """

    kind = "curate"
    judge_modes = JUDGE_MODES
    former_flag = "--curate-mode"
    former_key = "curate_mode"
    judge_template: str = ""
    likelihood_template: str = ""
    system: str | None = None
    #: Sampling for the rubric reply (the stage's options override it).
    sampling_defaults: dict[str, Any] = {"temperature": 0.0, "max_tokens": 256}

    def __init__(self, method: str, name: str, options: dict[str, Any]):
        super().__init__(method, name, options)
        self.curator = Curator(self.label, options, mode=self.judge_mode)
        self.mode = self.curator.mode
        self.threshold = self.curator.threshold
        if self.curator.likelihood:  # the instruction alone as the user message; the response is scored after it
            self.templates = (self.likelihood_template,)
            self.variables = ("instruction",)
        elif self.mode == "auto":  # decided by the backend: either template may be rendered
            self.templates = (self.judge_template, self.likelihood_template)
            self.variables = ("instruction", "response", "mode")
        else:
            self.templates = (self.judge_template,)
            self.variables = ("instruction", "response", "mode")

    def check_backend(self, backend: Any) -> None:
        self.curator.check_backend(backend)

    @property
    def cuts_at_end(self) -> bool:  # keep-top is decided over the whole run
        return self.curator.keep_top is not None

    def end_of_run(self, journal: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, dict[str, Any]]]:
        return self.curator.end_of_run(journal)

    async def process(self, record: Record, ctx: Any) -> list[Record]:
        score, details = await self.curator.score(
            ctx, record.fields["instruction"], record.fields["response"],
            judge_template=self.judge_template, likelihood_template=self.likelihood_template,
            params=self.sampling(**self.sampling_defaults),
        )
        record.meta.update(details)
        verdict = self.curator.verdict(score, details)
        if verdict is not None:
            reason, why = verdict
            return [record.drop(self.label, reason, **why)]
        if self.system is not None:
            record.fields["system"] = self.system
        return [record]


_PAIR_JUDGE_MODE_HELP = ("rubric: generate reasoning + 'Score: N' and parse; logprob: read P(1..5) after 'Score: ' in one forward pass; "
                   "auto: complete where the backend can (llamacpp:), else logprob where it can, else rubric; "
                   "pmi: mean log P(response|instruction) - mean log P(response); "
                   "ifd: score = 1 - IFD, IFD = loss(response|instruction) / loss(response) (Li et al. 2023); "
                   "complete: pmi minus 0.5 per nat that log P(end of turn | instruction, response) falls below -12 (sees cut-off answers). "
                   "pmi, ifd and complete need no judging prompt and work on small models.")


def pair_curate_options(default_threshold: int = 5) -> list[click.Option]:
    """The command-line options of a :class:`PairCurateStage`, each default declared here once.

    ``--threshold`` (the rubric score to keep, ``default_threshold`` by default), ``--judge-mode``
    (and its deprecated alias ``--curate-mode``), ``--score-threshold`` and ``--keep-top``."""
    judge_mode = judge_mode_option(JUDGE_MODES, _PAIR_JUDGE_MODE_HELP)
    return [
        click.Option(["--threshold"], type=click.IntRange(1, 5), default=default_threshold, show_default=True,
                     help="Keep pairs scoring at least K (5 = the paper's A5, 4 = A4)."),
        judge_mode,
        deprecated_alias(judge_mode, "--curate-mode"),
        click.Option(["--score-threshold"], type=SCORE, default=None,
                     help="Keep pairs with score >= X, any mode (pmi/ifd default 0: the instruction makes the response more likely; overrides --threshold)."),
        click.Option(["--keep-top"], type=PERCENT, default=None,
                     help="Keep the top P percent of scored pairs (decided when the run ends, over all of them; ties at the cutoff kept). Replaces --threshold."),
    ]
