"""``openai:`` continuation scores through ``/completions`` echo, against the fault-injecting server.

What a user relies on: ``--judge-mode pmi`` works where the endpoint echoes prompt logprobs; where it
does not (no logprobs, echo refused, logprobs read one token late) the run stops with one line that
names backends that can, before any augment call is paid for.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conftest import read_jsonl, words, write_jsonl


@pytest.fixture
def srv(server, monkeypatch):
    server.reset()
    server.owner = "fake"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-scoring")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return server


def corpus(path: Path, n: int) -> Path:
    return write_jsonl(path, [{"id": f"d{i}", "text": words(40, start=50 * i)} for i in range(n)])


def echo_reply(tokens: list[str], values: list[float | None], generated: str = " x") -> dict:
    """An OpenAI completions reply echoing ``tokens`` (then one generated token) with these logprobs."""
    toks = tokens + [generated]
    offsets, pos = [], 0
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {"choices": [{"text": "".join(toks), "logprobs": {"tokens": toks, "text_offset": offsets,
                                                             "token_logprobs": values + [-9.0], "top_logprobs": None}}]}


def test_text_frame_is_documented_plain_text_and_none_is_an_empty_user_turn():
    from btkit_plugins.backends.openai_compat import text_frame

    assert text_frame([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]) == \
        "System: Be brief.\n\nUser: Why?\n\nAssistant:\n"
    assert text_frame(None) == text_frame([{"role": "user", "content": ""}]) == "User: \n\nAssistant:\n"


def test_echo_span_picks_the_continuation_tokens_by_text_offset():
    from btkit_plugins.backends.openai_compat import NoEchoLogprobs, echo_logprobs

    frame = "User: hi\n\nAssistant:\n"
    # clean boundary: 'Hello' starts exactly at the frame's end; the generated ' x' is left out
    reply = echo_reply(["User", ":", " hi", "\n\n", "Assistant", ":\n", "Hello", " there"], [None, -1, -2, -3, -4, -5, -0.5, -0.25])
    assert echo_logprobs(reply, len(frame), len(frame + "Hello there")) == [-0.5, -0.25]
    # a token straddling the boundary (':\nHe') spells the continuation's first letters: it counts, once
    reply = echo_reply(["User", ":", " hi", "\n\n", "Assistant", ":\nHe", "llo", " there"], [None, -1, -2, -3, -4, -0.7, -0.5, -0.25])
    assert echo_logprobs(reply, len(frame), len(frame + "Hello there")) == [-0.7, -0.5, -0.25]
    # a zero-width token at the boundary (a multi-byte character split over two tokens) counts too
    reply = echo_reply(["User", ":", " hi", "\n\n", "Assistant", ":\n", "", "é"], [None, -1, -2, -3, -4, -5, -0.1, -0.2])
    assert echo_logprobs(reply, len(frame), len(frame + "é")) == [-0.1, -0.2]
    for bad, why in [({"choices": [{"text": "x", "logprobs": None}]}, "without logprobs"),
                     ({"choices": [{"text": "x", "logprobs": {"tokens": [" x"], "text_offset": [len(frame) + 5], "token_logprobs": [-1]}}]},
                      "did not echo"),
                     (echo_reply(["User: hi\n\nAssistant:\n", "Hi"], [None, None]), "no logprob")]:
        with pytest.raises(NoEchoLogprobs, match=why):
            echo_logprobs(bad, len(frame), len(frame + "Hi"))


def test_openai_pmi_run_scores_through_completions_echo(cli, srv, tmp_path):
    from btkit_plugins.backends.openai_compat import text_frame

    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", 2), "-o", out, "--model", "openai:fake-model", "--base-url", srv.base_url,
            "--judge-mode", "pmi", "--keep-top", "100", "--shots", "1", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(out / "data.jsonl")
    assert len(data) == 2
    scoring = [s for s in srv.requests if s.path == "/v1/completions"]
    probe, calls = scoring[0], scoring[1:]
    assert "Count from 1 to 12" in probe.body["prompt"] and probe.t < min(s.t for s in srv.requests if s.path != "/v1/completions")
    assert len(calls) == 4  # a conditional and an unconditional call per pair
    for rec in data:
        meta = rec["meta"]
        assert meta["curate_mode"] == "pmi" and meta["cond_tokens"] == meta["uncond_tokens"] == 40
        # the fake server's logprob is -(characters)/10 per whitespace-led word; the first word's token
        # straddles the frame's last newline ('\\nalpha0'), so it carries one more character
        response_words = rec["response"].split()
        want = -(sum(len(w) + 1 for w in response_words)) / 10 / len(response_words)
        assert meta["cond_logprob"] == pytest.approx(want) and meta["uncond_logprob"] == pytest.approx(want)
        assert meta["pmi"] == pytest.approx(0.0) and meta["score"] == pytest.approx(0.0)
        prompts = {s.body["prompt"] for s in calls}
        assert text_frame(None) + rec["response"] in prompts
        assert any(p.endswith("\n\nAssistant:\n" + rec["response"]) and rec["instruction"] in p and p.startswith("User: ") for p in prompts)
    for s in scoring:
        assert (s.body["echo"], s.body["logprobs"], s.body["max_tokens"], s.body["model"]) == (True, 1, 1, "fake-model")


@pytest.mark.parametrize("mode, why", [
    ("nologprobs", "answered without logprobs"),
    ("reject", "HTTP 400 (echo is not supported with logprobs"),
    ("logits", "HTTP 500 (logprobs is not supported for models created with logits_all=False)"),
    ("shifted", "one token late"),
])
def test_openai_endpoint_that_cannot_score_stops_the_run_before_any_chat_call(cli, srv, tmp_path, mode, why):
    srv.completions_mode = mode
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", 2), "-o", out, "--model", "openai:fake-model", "--base-url", srv.base_url,
            "--judge-mode", "pmi", "--shots", "1", "-q")
    assert r.exit_code == 2
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: backend 'openai:fake-model' cannot do 'score_continuation'"), lines
    assert why in lines[0] and "this endpoint cannot score continuations" in lines[0]
    assert "llamacpp:PATH.gguf" in lines[0] and "vllm:" in lines[0] and "--judge-mode pmi" in lines[0]
    assert [s.path for s in srv.requests] == ["/v1/completions"]  # the probe, once (a 500 naming logprobs is not retried)
    assert not (out / "candidates.jsonl").exists()


def test_openai_reply_without_logprobs_after_a_good_probe_is_a_capability_error(srv):
    """An endpoint that stops echoing logprobs mid-run fails every pair the same way: one clear stop."""
    from btkit.errors import CapabilityError
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    b = OpenAICompatBackend("fake-model", {"base_url": srv.base_url})
    assert b.supports("score_continuation")

    async def go():
        first = await b.score_continuation([{"role": "user", "content": "q"}], "one two")
        srv.completions_mode = "nologprobs"
        try:
            await b.score_continuation(None, "one two")
        finally:
            await b.aclose()
        return first

    with pytest.raises(CapabilityError, match=r"answered without logprobs.*llamacpp:PATH\.gguf.*vllm:"):
        asyncio.run(go())
    assert len([s for s in srv.requests if s.path == "/v1/completions"]) == 3  # probe, a good call, the bad one


def test_openai_auto_mode_never_probes_completions(cli, srv, tmp_path):
    """The default mode needs no continuation scores: no probe, the rubric, chat calls only."""
    out = tmp_path / "out"
    r = cli("run", "humpback", corpus(tmp_path / "c.jsonl", 1), "-o", out, "--model", "openai:fake-model", "--base-url", srv.base_url,
            "--shots", "1", "-q")
    assert r.exit_code == 0, r.output
    assert {s.path for s in srv.requests} == {"/v1/chat/completions"}
    assert {c["meta"]["curate_mode"] for c in read_jsonl(out / "candidates.jsonl")} == {"rubric"}
    assert json.loads((out / "stats.json").read_text())["backend_failures"] == 0


def test_probe_of_an_unreachable_endpoint_stops_with_a_clear_message():
    """Unknown is not "no": an endpoint that cannot be reached is a setup error, not a missing ability."""
    import socket

    from btkit.errors import BtkitError, CapabilityError
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAICompatBackend("m", {"base_url": f"http://127.0.0.1:{port}/v1", "backoff_base": 0.01})
    with pytest.raises(BtkitError, match="could not check whether this endpoint can score continuations.*cannot reach") as err:
        b.supports("score_continuation")
    assert not isinstance(err.value, CapabilityError)
