"""The model-call cache: keyed by content only, raw replies stored apart from parsing, failures never
stored as successes, one file safe for concurrent writers, and the ``btkit cache`` commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from btkit.backends import Completion
from btkit.cache import Cache, cache_key
from btkit.errors import BackendError

from conftest import read_jsonl, write_jsonl, words

MESSAGES = [{"role": "user", "content": "Rate this."}]


def key(backend=None, messages=MESSAGES, prefix="", **params):
    backend = backend or {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:8000/v1"}
    return cache_key("chat", backend, {"messages": messages, "assistant_prefix": prefix, "params": params})


def test_key_holds_what_changes_the_output():
    base = key(temperature=0.0)
    assert key({"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9999/v1"}, temperature=0.0) != base
    assert key({"backend": "openai", "model": "other", "base_url": "http://127.0.0.1:8000/v1"}, temperature=0.0) != base
    assert key(temperature=0.7) != base
    assert key(temperature=0.0, seed=1) != base
    assert key(temperature=0.0, max_tokens=10) != base
    assert key(temperature=0.0, json_schema={"type": "object"}) != base
    assert key(temperature=0.0, grammar="root ::= [1-5]") != base
    assert key(messages=[{"role": "user", "content": "Rate this!"}], temperature=0.0) != base
    assert key(prefix="Score: ", temperature=0.0) != base
    assert cache_key("next_token_logprobs", {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:8000/v1"},
                     {"messages": MESSAGES, "assistant_prefix": "", "params": {"temperature": 0.0}}) != base


def test_key_leaves_out_secrets_and_transport_settings():
    ident = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:8000/v1"}
    base = key(ident, temperature=0.0)
    noisy = {**ident, "api_key": "sk-secret", "timeout": 30, "max_retries": 9, "concurrency": 64, "Authorization": "Bearer x",
             "request_timeout": 5, "retry_backoff": 2.0}
    assert key(noisy, temperature=0.0) == base
    assert key(ident, temperature=0.0, timeout=10, max_retries=3) == base


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(40, start=i * 50)} for i in range(4)])


def run(cli, corpus, out, spec, *extra):
    r = cli("run", "humpback", corpus, "-o", out, "--model", spec, "-q", "--judge-mode", "logprob", *extra)
    assert r.exit_code == 0, r.output
    return r


def augment_reply(messages, params):
    """A reply that depends on the prompt and the sampling, like a model's."""
    doc = messages[-1]["content"].rsplit("\n", 1)[0].split()[-1]  # the quoted document's last word
    return f"Explain what {doc} means at temperature {params.get('temperature')}?"


def calls(backend, kind=None):
    return [h for h in backend.history if kind is None or h["kind"] == kind]


def test_changing_threshold_or_parser_reruns_with_zero_model_calls(cli, scripted, corpus, tmp_path, monkeypatch):
    backend, spec = scripted(default=augment_reply, logprobs={"4": -0.2, "5": -1.0, "1": -4.0})
    run(cli, corpus, tmp_path / "a", spec, "--threshold", "5")
    first = len(backend.history)
    assert first == 8  # 4 augment + 4 curate
    assert read_jsonl(tmp_path / "a" / "data.jsonl") == []  # all scored 4 < 5

    # A new threshold changes the run's settings, so it needs --overwrite (or a new -o): no new call.
    run(cli, corpus, tmp_path / "a", spec, "--threshold", "4", "--overwrite")
    assert len(backend.history) == first
    assert len(read_jsonl(tmp_path / "a" / "data.jsonl")) == 4
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["model_calls_this_invocation"] == 0 and stats["cache_hits_this_invocation"] == 8

    # A stricter instruction parser re-parses the cached raw replies: nothing is asked again.
    from btkit.methods import ParseError
    from btkit_plugins.methods import humpback

    original = humpback.parse_instruction

    def stricter(text, doc, **kw):
        if "kappa" in text:
            raise ParseError("banned_word", "kappa")
        return original(text, doc, **kw)

    monkeypatch.setattr(humpback, "parse_instruction", stricter)
    run(cli, corpus, tmp_path / "b", spec, "--threshold", "4")
    assert len(backend.history) == first
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.augment:instruction_banned_word": 2} and stats["kept"] == 2


def test_changing_the_score_parser_reruns_with_zero_model_calls(cli, scripted, corpus, tmp_path, monkeypatch):
    judge = "The answer is complete.\nScore: 4"
    backend, spec = scripted(default=lambda m, p: judge if "Score:" in m[-1]["content"] else augment_reply(m, p))
    r = cli("run", "humpback", corpus, "-o", tmp_path / "a", "--model", spec, "-q", "--judge-mode", "rubric", "--threshold", "5")
    assert r.exit_code == 0, r.output
    first = len(backend.history)
    assert first == 8 and read_jsonl(tmp_path / "a" / "data.jsonl") == []

    from btkit.kit import judges as curation

    monkeypatch.setattr(curation, "parse_score", lambda text, *scale: 5)  # a (very) lenient new parser
    r = cli("run", "humpback", corpus, "-o", tmp_path / "b", "--model", spec, "-q", "--judge-mode", "rubric", "--threshold", "5")
    assert r.exit_code == 0, r.output
    assert len(backend.history) == first
    assert len(read_jsonl(tmp_path / "b" / "data.jsonl")) == 4


def test_changed_template_or_sampling_recalls_exactly_the_affected_requests(cli, scripted, corpus, tmp_path, registry):
    backend, spec = scripted(default=augment_reply, logprobs={"5": -0.1, "1": -4.0})
    run(cli, corpus, tmp_path / "a", spec)
    assert len(calls(backend, "chat")) == 4 and len(calls(backend, "next_token_logprobs")) == 4

    # Another curate template: the 4 curate requests again, no augment request.
    prompts = tmp_path / "prompts" / "humpback"
    prompts.mkdir(parents=True)
    builtin = Path(registry.method("humpback").prompts_dir) / "humpback" / "curate.j2"
    (prompts / "curate.j2").write_text(builtin.read_text().replace("Please first provide", "Be strict. Please first provide"))
    n_chat, n_lp = len(calls(backend, "chat")), len(calls(backend, "next_token_logprobs"))
    run(cli, corpus, tmp_path / "b", spec, "--prompts", tmp_path / "prompts")
    assert len(calls(backend, "chat")) == n_chat
    assert len(calls(backend, "next_token_logprobs")) == n_lp + 4

    # Another temperature: every augment request again (it samples); the logprob judge has no
    # sampling parameters and sees other instructions, so it is asked again too...
    n_chat, n_lp = len(calls(backend, "chat")), len(calls(backend, "next_token_logprobs"))
    run(cli, corpus, tmp_path / "c", spec, "--temperature", "0.3")
    assert len(calls(backend, "chat")) == n_chat + 4
    assert len(calls(backend, "next_token_logprobs")) == n_lp + 4
    # ...but a sampling change that leaves the instructions as they were costs only the augment calls.
    backend.default = lambda m, p: augment_reply(m, {})
    run(cli, corpus, tmp_path / "d", spec, "--temperature", "0.5")
    n_chat, n_lp = len(calls(backend, "chat")), len(calls(backend, "next_token_logprobs"))
    run(cli, corpus, tmp_path / "e", spec, "--temperature", "0.6")
    assert len(calls(backend, "chat")) == n_chat + 4
    assert len(calls(backend, "next_token_logprobs")) == n_lp


def test_concurrency_and_transport_options_are_not_in_the_key(cli, scripted, corpus, tmp_path):
    backend, spec = scripted(default=augment_reply, logprobs={"5": -0.1})
    run(cli, corpus, tmp_path / "a", spec)
    n = len(backend.history)
    run(cli, corpus, tmp_path / "b", spec, "--concurrency", "1", "-B", "timeout=5", "-B", "max_retries=9", "-B", "api_key=sk-test")
    assert len(backend.history) == n


def test_failures_are_never_cached_but_unparseable_replies_are_kept_raw(cli, scripted, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(40)}])
    backend, spec = scripted(replies=[BackendError("503 from upstream")], default="What does alpha0 mean?", logprobs={"5": -0.1})
    run(cli, corpus, tmp_path / "a", spec)
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["backend_failures"] == 1
    run(cli, corpus, tmp_path / "b", spec)  # the failed request is asked again, and now succeeds
    assert len(calls(backend, "chat")) == 2
    assert len(read_jsonl(tmp_path / "b" / "data.jsonl")) == 1

    # Empty replies: not stored, asked again on a re-run.
    for i, bad in enumerate((Completion(text="", finish_reason="stop"), Completion(text=None), Completion(text="  \n"))):
        corpus2 = write_jsonl(tmp_path / "c2.jsonl", [{"id": f"x{i}", "text": words(40, start=100 + i)}])
        backend.replies = [bad]
        n = len(calls(backend, "chat"))
        run(cli, corpus2, tmp_path / f"t{i}", spec)
        assert read_jsonl(tmp_path / f"t{i}" / "data.jsonl") == []
        run(cli, corpus2, tmp_path / f"u{i}", spec)
        assert len(calls(backend, "chat")) == n + 2, bad
        assert len(read_jsonl(tmp_path / f"u{i}" / "data.jsonl")) == 1

    # Truncated and filtered replies are stored raw, never as successes: a re-run asks nothing,
    # parses them again and drops them again with the same counted reason.
    for i, (bad, reason) in enumerate(((Completion(text="What does alpha0", finish_reason="length"), "truncated"),
                                       (Completion(text="What is", finish_reason="content_filter"), "content_filter"))):
        corpus2 = write_jsonl(tmp_path / "c2.jsonl", [{"id": f"y{i}", "text": words(40, start=200 + i)}])
        backend.replies = [bad]
        n = len(calls(backend, "chat"))
        run(cli, corpus2, tmp_path / f"v{i}", spec)
        assert len(calls(backend, "chat")) == n + 1
        run(cli, corpus2, tmp_path / f"w{i}", spec, "--threshold", "1")
        assert len(calls(backend, "chat")) == n + 1, bad
        assert read_jsonl(tmp_path / f"w{i}" / "data.jsonl") == []
        stats = json.loads((tmp_path / f"w{i}" / "stats.json").read_text())
        assert stats["parse_failures_by_reason"] == {reason: 1}, stats

    # A complete but unparseable reply (a refusal) is stored raw: re-running re-parses it, fails
    # again (counted), and asks nothing.
    corpus3 = write_jsonl(tmp_path / "c3.jsonl", [{"id": "r", "text": words(40, start=99)}])
    backend.replies = ["I'm sorry, but I cannot help with that request."]
    run(cli, corpus3, tmp_path / "r1", spec)
    n = len(backend.history)
    run(cli, corpus3, tmp_path / "r2", spec)
    assert len(backend.history) == n
    stats = json.loads((tmp_path / "r2" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.augment:instruction_refusal": 1}
    assert stats["parse_failures"] == 1 and stats["parse_failures_by_reason"] == {"refusal": 1}


def test_identical_requests_in_flight_are_sent_once(registry, scripted, tmp_path):
    from btkit.calls import StageCtx
    from btkit.config import RunConfig, StageSpec
    from btkit.engine import Run
    from btkit.records import Record

    backend, spec = scripted(default="What does it mean?", delay=0.05)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": words(40)}])
    r = Run(RunConfig(input=corpus, out_dir=tmp_path / "o", stages=[StageSpec("humpback", "augment")], model=spec,
                      cache_path=tmp_path / "cache.sqlite"), registry)
    stage = r.stages[0]

    async def go():
        recs = [Record(id=f"r{i}", source_id="s", fields={}) for i in range(5)]
        return await asyncio.gather(*(StageCtx(r, stage, rec).complete("humpback/augment", {"text": "same", "examples": []}, temperature=0.0) for rec in recs))

    comps = asyncio.run(go())
    assert len(backend.history) == 1
    assert [c.cached for c in comps].count(False) == 1
    assert {c.text for c in comps} == {"What does it mean?"}


def test_one_cache_file_takes_concurrent_writers(tmp_path):
    """Threads sharing one Cache, threads with their own Cache on the same file, asyncio tasks,
    and other processes, all writing at once: every entry lands and reads back intact."""
    path = tmp_path / "cache.sqlite"
    shared = Cache(path)

    def writer(cache: Cache, tag: str, n: int = 200) -> None:
        for i in range(n):
            cache.put(f"{tag}-{i}", "chat", "test", {"text": f"{tag} {i} " + "é" * (i % 50)})

    procs = [subprocess.Popen([sys.executable, "-c", f"from btkit.cache import Cache\nc = Cache({str(path)!r})\n"
                               f"[c.put('p{p}-%d' % i, 'chat', 'test', {{'text': 'p{p} %d' % i}}) for i in range(200)]"])
             for p in range(2)]
    threads = [threading.Thread(target=writer, args=(shared, f"shared{t}")) for t in range(4)]
    threads += [threading.Thread(target=writer, args=(Cache(path), f"own{t}")) for t in range(2)]

    async def tasks():
        async def one(t: int) -> None:
            for i in range(100):
                shared.put(f"task{t}-{i}", "chat", "test", {"text": str(i)})
                await asyncio.sleep(0)
        await asyncio.gather(*(one(t) for t in range(4)))

    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait(timeout=60) == 0
    fresh = Cache(path)
    assert fresh.stats()["entries"] == 4 * 200 + 2 * 200 + 4 * 100 + 2 * 200
    assert fresh.get("shared3-199") == {"text": "shared3 199 " + "é" * (199 % 50)}
    assert fresh.get("p1-5") == {"text": "p1 5"}
    # lone surrogates (from a misbehaving backend) are stored losslessly, never an error
    fresh.put("odd", "chat", "test", {"text": "bad \udcff byte"})
    assert fresh.get("odd") == {"text": "bad \udcff byte"}


def test_cache_stats_and_clear_commands(cli, scripted, corpus, tmp_path):
    backend, spec = scripted(default=augment_reply, logprobs={"5": -0.1})
    cache = tmp_path / "mycache.sqlite"
    run(cli, corpus, tmp_path / "a", spec, "--cache", cache)
    r = cli("cache", "stats", "--cache", cache)
    assert r.exit_code == 0
    stats = json.loads(r.output)
    assert stats["path"] == str(cache) and stats["entries"] == 8
    assert {(b["kind"], b["backend"], b["entries"]) for b in stats["by_backend"]} == {("chat", spec, 4), ("next_token_logprobs", spec, 4)}
    assert stats["bytes_on_disk"] > 0

    r = cli("cache", "clear", "--cache", cache, "--yes")
    assert r.exit_code == 0 and "removed 8 entries" in r.output
    assert json.loads(cli("cache", "stats", "--cache", cache).output)["entries"] == 0
    n = len(backend.history)
    run(cli, corpus, tmp_path / "b", spec, "--cache", cache)  # cleared: asked again
    assert len(backend.history) == n + 8

    # Without --cache the commands use the default location ($BTKIT_CACHE_DIR here).
    r = cli("cache", "stats")
    assert r.exit_code == 0 and json.loads(r.output)["path"].endswith("cache.sqlite")
    # clear asks first; "n" keeps everything
    from click.testing import CliRunner
    from btkit.cli import cli as btkit_cli

    r = CliRunner().invoke(btkit_cli, ["cache", "clear", "--cache", str(cache)], input="n\n")
    assert r.exit_code == 1 and json.loads(cli("cache", "stats", "--cache", cache).output)["entries"] == 8


def _open_cache_at_once(path, barrier, results):
    from btkit.cache import Cache

    barrier.wait()
    try:
        Cache(path).close()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 (reported to the test)
        results.put(str(e))


@pytest.mark.slow
def test_processes_opening_one_new_cache_at_once_all_get_it(tmp_path):
    """The shards of a run start together on one new cache file: every one opens it (switching a new
    file to WAL takes a lock SQLite does not wait for; without the retry about 1 open in 25 failed here)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    failures = []
    for trial in range(6):
        path = tmp_path / f"c{trial}.sqlite"
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_cache_at_once, args=(str(path), barrier, results)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failures += [r for r in (results.get(timeout=10) for _ in procs) if r != "ok"]
    assert failures == []
