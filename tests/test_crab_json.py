"""CRAB reads its constraints object with btkit.parsing: prose with braces, two objects, fences."""

from __future__ import annotations

import json

import pytest

from btkit.methods import ParseError
from btkit_plugins.methods.crab import parse_llm_constraints

STYLE = "Write in a concise, practical tone suitable for Linux beginners."
FOCUS = "Focus on listing hidden files and explain why their names start with a dot."
ANSWER = json.dumps({"writing_style": STYLE, "semantic_elements": FOCUS, "multilingual": None})


def kinds(reply: str) -> list[str]:
    found, _ = parse_llm_constraints(reply)
    return [c["type"] for c in found]


@pytest.mark.parametrize("reply", [
    # prose with braces after the object: find("{")/rfind("}") spanned both and refused the reply
    f"Here you go:\n{ANSWER}\nI left {{placeholders}} like {{name}} out.",
    # braces before it, e.g. the model quoting a format string
    f"Constraints for the template {{user}} {{prompt}}:\n```json\n{ANSWER}\n```",
    # an echoed example object first, then the answer
    f'The format is {{"example_key": "example value"}}. My answer:\n{ANSWER}',
    # an empty object and the answer
    f"{{}}\n{ANSWER}",
    # the same object twice (fenced and repeated): one answer
    f"```json\n{ANSWER}\n```\nTo repeat: {ANSWER}",
])
def test_the_constraints_object_is_found_among_other_braces(reply):
    assert kinds(reply) == ["writing_style", "semantic_elements"]


def test_two_different_constraint_objects_are_refused_not_guessed():
    other = json.dumps({"writing_style": "Answer in a formal register with no contractions at all."})
    with pytest.raises(ParseError) as e:
        parse_llm_constraints(f"First try: {ANSWER}\nBetter: {other}")
    assert e.value.reason == "ambiguous_json"


@pytest.mark.parametrize("reply,reason", [
    ("No constraints apply {sorry}.", "invalid_json"),
    ("} backwards {", "no_json"),
    ('{"writing_style": "Write formally", "semantic_elements": {"nested": ', "no_json"),
    ('{"writing_style": "Write formally",} and {"also": broken}', "invalid_json"),
])
def test_replies_without_an_object_keep_crab_reasons(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_llm_constraints(reply)
    assert e.value.reason == reason
