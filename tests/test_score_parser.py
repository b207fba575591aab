"""The rubric score parser on real-world shaped judge replies: it parses or refuses, never guesses."""

import pytest

from btkit.methods import ParseError
from btkit_plugins.curation import parse_score

PARSED = [
    ("The answer is complete and written like an assistant.\nScore: 4", 4),
    ("Reasoning: covers every ask, expert tone.\n\nScore: 5", 5),
    ("Score: 4/5", 4),
    ("**Score:** 5", 5),
    ("**Score: 3**", 3),
    ("The response reads like a forum post.\nScore - 2", 2),
    ("score: 1", 1),
    ("Rating: 4 out of 5", 4),
    ("It is helpful but not in an assistant's voice.\nScore: [3]", 3),
    ("5", 5),
    ("Brief reasoning: good.\nScore: 5.", 5),
    ("I would rate it as follows. The final score is 4", 4),
    ("Score: 4\n\nThis is because it is clear and complete.", 4),
    ("Score = 2", 2),
    ("Score: 4\n...\nScore: 4", 4),
    ("Score:\u00a05", 5),
]

REFUSED = [
    ("", "empty_reply"),
    (None, "empty_reply"),
    ("The answer is pretty good overall, I like it.", "no_score"),
    ("Score: 91", "out_of_range"),
    ("Score: 1986", "out_of_range"),
    ("Score: 0", "out_of_range"),
    ("Score: 8/10", "out_of_range"),
    ("Score: 4.5", "not_integer"),
    ("Score: 3\nOn reflection, Score: 5 is fairer.\nThanks!", "ambiguous_score"),
    ("Score: 2 or Score: 4", "ambiguous_score"),
    ("I cannot evaluate this request.", "no_score"),
]


@pytest.mark.parametrize("reply,expected", PARSED)
def test_parses_scores(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply,reason", REFUSED)
def test_refuses_to_guess(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_score(reply)
    assert e.value.reason == reason
