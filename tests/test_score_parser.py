"""The rubric score parser on real-world shaped judge replies: it parses or refuses, never guesses."""

import pytest

from btkit.methods import ParseError
from btkit.kit.judges import parse_score

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
    # the paper's shape: reasoning that mentions scores, then the score on the last line
    ("Reasoning: a score of 5 needs an expert voice, which this lacks.\nScore: 4", 4),
    ("A score of 3 would mean no assistant voice; a rating of 5 would need more depth.\n\nScore: 4/5", 4),
    ("**Score:** 4\nThe tone is right.\nScore: 4", 4),  # two score lines that agree
    ("Score: 4\n- 2 of the asks get a short answer", 4),  # a number after a line break is not a range
    ("Score: 4 or higher would be unfair.", 4),  # "or" + a word is not a range
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
    # ranges: the judge did not decide, and the first number is not its score
    ("Score: 3-4", "range"),
    ("Score: 3 to 4", "range"),
    ("Somewhere in between.\nScore: 3–4", "range"),
    ("Score: [3-4]", "range"),
    ("Score: 3 or 4", "range"),
    ("Score: 3/5 - 4/5", "range"),
    ("3-4", "range"),
    ("Score: 3-4\n\nIt is helpful but not in an assistant's voice.", "range"),  # not on the last line
    # two explicit score lines that disagree: no "last one wins"
    ("Score: 4\nScore: 5", "ambiguous_score"),
    ("**Score:** 4\nOn second thought the tone is perfect.\nScore: 5", "ambiguous_score"),
    ("Final score: 2\nScore: 5", "ambiguous_score"),
    ("Score: 91\nScore: 4", "ambiguous_score"),  # an invalid score line is still a second score line
]


@pytest.mark.parametrize("reply,expected", PARSED)
def test_parses_scores(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize("reply,reason", REFUSED)
def test_refuses_to_guess(reply, reason):
    with pytest.raises(ParseError) as e:
        parse_score(reply)
    assert e.value.reason == reason


def test_a_range_says_what_it_refused():
    with pytest.raises(ParseError) as e:
        parse_score("Between good and very good.\nScore: 3 to 4")
    assert e.value.reason == "range" and "3 to 4" in e.value.detail


def test_scale_bounds_apply_to_every_score_line():
    assert parse_score("Score: 0", top=5, bottom=0) == 0
    with pytest.raises(ParseError) as e:
        parse_score("Score: 4\nScore: 0", top=5, bottom=0)  # a 0 on the last line does not override a 4
    assert e.value.reason == "ambiguous_score"
