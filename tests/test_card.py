"""The dataset card: every finished run directory has a README.md that parses as YAML front matter
plus markdown, whose counts match stats.json, and which a resumed run rewrites byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from btkit.backends import Completion

from conftest import read_jsonl, words, write_jsonl

RULES = [{"contains": "5-point scale", "reply": "Fine.\nScore: {digit}"}]


def split_card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.DOTALL)
    assert m, text[:200]
    front = yaml.safe_load(m.group(1))
    assert isinstance(front, dict)
    return front, m.group(2)


def section(body: str, title: str) -> str:
    part = body.split(f"## {title}\n", 1)[1]
    return part.split("\n## ", 1)[0]


def table(text: str) -> list[list[str]]:
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return rows[2:]  # without the header and the ---


def det_run(cli, tmp_path: Path, rows: list[dict], *extra: str, out: str = "out"):
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"rules": RULES, "default": "What does note {hash} explain?"}))
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    args = ("run", "humpback", corpus, "-o", tmp_path / out, "--model", f"det:{det}", "--judge-mode", "rubric",
            "--threshold", "3", "--concurrency", "1", "-q", *extra)
    return args, cli(*args)


def docs(n: int, **fields) -> list[dict]:
    rows = [{"id": f"d{i}", "text": words(60, start=i * 60), **fields} for i in range(n)]
    rows.append({"id": "short", "text": "too short to use", **fields})  # dropped while preparing
    return rows


def test_card_front_matter_and_counts_match_stats(cli, tmp_path, monkeypatch):
    import sys

    # run.json records the process's command line: make this in-process run's read as a user's would
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/btkit", "run", "humpback", "c.jsonl", "-o", "out", "--model", "det:det.json",
                                      "--judge-mode", "rubric", "--threshold", "3"])
    args, r = det_run(cli, tmp_path, docs(8, license="CC-BY-SA-4.0", language="en"))
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    front, body = split_card(out / "README.md")
    assert front["license"] == "cc-by-sa-4.0"
    assert front["task_categories"] == ["text-generation"]
    assert front["size_categories"] == ["n<1K"]
    assert front["language"] == ["en"]
    assert "humpback" in front["tags"]

    assert "Li et al. 2023, Self-Alignment with Instruction Backtranslation" in section(body, "Method")
    models = table(section(body, "Models"))
    assert [m[0] for m in models] == ["humpback.augment", "humpback.curate"] and all(m[1].startswith("det:") for m in models)
    prompts = dict(table(section(body, "Prompts")))
    run_json = json.loads((out / "run.json").read_text())
    assert prompts == run_json["fingerprint"]["templates"]

    counts = {row[0]: [int(x) for x in row[1:]] for row in table(section(body, "Counts through each stage"))}
    assert set(counts) == set(stats["stages"])
    for label, st in stats["stages"].items():
        assert counts[label] == [st["in"], st["out"], sum(st["dropped"].values()), sum(st["dropped_at_end"].values())]
    assert f"kept: {stats['kept']};" in body and f"dropped: {stats['dropped']} " in body
    assert f"**{stats['kept']} records kept** of {stats['records']}" in body
    assert stats["kept"] == len(read_jsonl(out / "data.jsonl"))

    reasons = {(w, r): int(n) for w, r, n in table(section(body, "Filters and drop reasons"))}
    assert reasons[("preparing", "too_short")] == stats["dropped_while_preparing"]["too_short"]
    for label, st in stats["stages"].items():
        for reason, n in st["dropped"].items():
            assert reasons[(label, reason)] == n
    assert sum(reasons.values()) == stats["dropped"]
    assert '"threshold": 3' in section(body, "Filters and drop reasons")

    calls = {row[0]: row[1:] for row in table(section(body, "Calls, tokens and cost"))}
    for label, st in stats["stages"].items():
        assert int(calls[label][0]) == st["calls"] and int(calls[label][3]) == st["tokens_in"]

    assert "`cc-by-sa-4.0`: 9 records" in section(body, "Source corpus and licence")
    reproduce = section(body, "How to reproduce")
    assert "```bash\nbtkit run humpback c.jsonl -o out --model det:det.json --judge-mode rubric --threshold 3\n```" in reproduce


def test_resume_rewrites_the_same_card(cli, scripted, tmp_path):
    """Stopped by --max-cost, resumed, then run again with nothing left: the card is rewritten at each
    finish, identical, and its counts are the whole run's."""
    def priced(messages, params):
        text = "\n".join(m["content"] for m in messages)
        reply = "Fine.\nScore: 5" if "5-point scale" in text else "What does this note explain in detail?"
        return Completion(text=reply, finish_reason="stop", prompt_tokens=50, completion_tokens=5, extra={"cost": 0.01})

    backend, spec = scripted(default=priced)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(6))
    out = tmp_path / "out"
    args = ("run", "humpback", corpus, "-o", out, "--model", spec, "--judge-mode", "rubric", "--concurrency", "1", "-q")
    r = cli(*args, "--max-cost", "0.03")
    assert r.exit_code == 2 and not (out / "README.md").exists()
    r = cli(*args, "--max-cost", "5")
    assert r.exit_code == 0, r.output
    first = (out / "README.md").read_bytes()
    stats = json.loads((out / "stats.json").read_text())
    front, body = split_card(out / "README.md")
    counts = {row[0]: [int(x) for x in row[1:3]] for row in table(section(body, "Counts through each stage"))}
    assert counts == {label: [st["in"], st["out"]] for label, st in stats["stages"].items()}
    assert counts["humpback.augment"] == [6, 6] and stats["kept"] == 6
    assert front["license"] == "unknown" and "Licence: **unknown**" in body

    r = cli(*args, "--max-cost", "5")  # nothing left to do: published again, card rewritten
    assert r.exit_code == 0, r.output
    assert (out / "README.md").read_bytes() == first


def test_mixed_licences_are_other_and_listed(cli, tmp_path):
    rows = docs(3, license="MIT") + [{"id": "x", "text": words(60, start=900), "license": "Apache 2.0"}]
    _, r = det_run(cli, tmp_path, rows)
    assert r.exit_code == 0, r.output
    front, body = split_card(tmp_path / "out" / "README.md")
    assert front["license"] == "other"
    src = section(body, "Source corpus and licence")
    assert "`mit`: 4 records" in src and "`apache-2.0`: 1 records" in src


def test_two_identical_runs_write_the_same_card(cli, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d in (a, b):  # the same relative paths, so the command and the spec read the same
        det = d / "det.json"
        det.write_text(json.dumps({"rules": RULES, "default": "What does note {hash} explain?"}))
        write_jsonl(d / "c.jsonl", docs(4))
    import os

    cwd = os.getcwd()
    cards = []
    try:
        for d in (a, b):
            os.chdir(d)
            r = cli("run", "humpback", "c.jsonl", "-o", "out", "--model", "det:det.json", "--judge-mode", "rubric", "-q")
            assert r.exit_code == 0, r.output
            cards.append((d / "out" / "README.md").read_text())
    finally:
        os.chdir(cwd)
    assert cards[0] == cards[1]


def test_a_readme_of_the_users_is_never_overwritten(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    _, r = det_run(cli, tmp_path, docs(3))
    assert r.exit_code == 0, r.output
    assert (out / "README.md").read_text() == "# my notes\n"
    front, _ = split_card(out / "dataset-card.md")
    assert front["license"] == "unknown"
