"""``btkit export``: every format read back with the loader its users use, fields and counts checked
against ``data.jsonl``; system tags kept; TeGit's input in Alpaca's ``input``; preference pairs;
a seeded split; formats as plugins; one clear line for a bad run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from btkit.hookspecs import hookimpl

from conftest import read_jsonl, words, write_jsonl

RULES = [
    {"contains": "5-point scale", "reply": "The pair is fine.\nScore: 5"},
    {"contains": "Design a task based on the given text", "reply": "#instruction#: Summarise the passage {hash}.\n"
                                                                  "#input#: The passage about item {hash}.\n"
                                                                  "#output#: The passage says item {hash} matters to everyone who reads it."},
    {"contains": "Rewrite the document into the answer", "reply": "Here is a clear answer about note {hash}: the document explains it in detail."},
]
SYSTEM = "Answer with knowledge from web search."


def make_run(cli, tmp_path: Path, method: str, *extra: str, docs: int = 6, name: str | None = None) -> Path:
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"rules": RULES, "default": "What does note {hash} explain?"}))
    corpus = write_jsonl(tmp_path / f"{method}.jsonl", [{"id": f"d{i}", "text": words(60, start=i * 60)} for i in range(docs)])
    out = tmp_path / (name or f"run-{method}")
    r = cli("run", method, corpus, "-o", out, "--model", f"det:{det}", "--concurrency", "1", "-q", *extra)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def humpback_run(cli, tmp_path):
    return make_run(cli, tmp_path, "humpback", "--judge-mode", "rubric")


def export(cli, run: Path, fmt: str, out: Path, *extra: str):
    r = cli("export", run, "--format", fmt, "-o", out, *extra)
    assert r.exit_code == 0, r.output
    return r


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_formats_hold_every_pair_with_its_system_tag(cli, humpback_run, tmp_path):
    data = read_jsonl(humpback_run / "data.jsonl")
    assert len(data) == 6 and all(d["system"] == SYSTEM for d in data)
    pairs = [(d["instruction"], d["response"]) for d in data]

    r = export(cli, humpback_run, "alpaca", tmp_path / "a.jsonl")
    assert r.output.count("has no place for field meta") == 1  # said once, not once per row
    alpaca = jsonl(tmp_path / "a.jsonl")
    assert [(a["instruction"], a["output"]) for a in alpaca] == pairs
    assert all(a["input"] == "" and a["system"] == SYSTEM for a in alpaca)

    export(cli, humpback_run, "sharegpt", tmp_path / "s.jsonl")
    share = jsonl(tmp_path / "s.jsonl")
    assert [(s["conversations"][0]["value"], s["conversations"][1]["value"]) for s in share] == pairs
    assert all([t["from"] for t in s["conversations"]] == ["human", "gpt"] and s["system"] == SYSTEM for s in share)

    for fmt in ("openai", "messages"):
        export(cli, humpback_run, fmt, tmp_path / f"{fmt}.jsonl")
        rows = jsonl(tmp_path / f"{fmt}.jsonl")
        assert all(set(r) == {"messages"} for r in rows)  # OpenAI's validator wants nothing else
        assert [[m["role"] for m in r["messages"]] for r in rows] == [["system", "user", "assistant"]] * 6
        assert [(r["messages"][1]["content"], r["messages"][2]["content"]) for r in rows] == pairs
        assert all(r["messages"][0]["content"] == SYSTEM for r in rows)


def test_trl_prompt_completion_is_conversational(cli, humpback_run, tmp_path):
    data = read_jsonl(humpback_run / "data.jsonl")
    export(cli, humpback_run, "trl", tmp_path / "t.jsonl")
    rows = jsonl(tmp_path / "t.jsonl")
    assert len(rows) == len(data)
    for row, d in zip(rows, data):
        assert set(row) == {"prompt", "completion"}  # SFTTrainer's prompt-completion columns
        assert row["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": d["instruction"]}]
        assert row["completion"] == [{"role": "assistant", "content": d["response"]}]
    try:
        from trl.data_utils import is_conversational
    except ImportError:
        return  # the shape is checked above; with TRL installed, TRL itself agrees
    assert all(is_conversational(r) for r in rows)


def test_hf_dataset_loads_from_disk_with_a_seeded_split(cli, humpback_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = read_jsonl(humpback_run / "data.jsonl")
    export(cli, humpback_run, "hf", tmp_path / "hf", "--split", "0.34", "--split-seed", "3")
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(dd) == {"train", "validation"}
    assert (len(dd["train"]), len(dd["validation"])) == (4, 2)
    rows = list(dd["train"]) + list(dd["validation"])
    assert sorted(r["instruction"] for r in rows) == sorted(d["instruction"] for d in data)
    by_id = {d["meta"]["id"]: d for d in data}
    for r in rows:
        d = by_id[r["id"]]
        assert r["response"] == d["response"] and r["system"] == SYSTEM
        assert json.loads(r["meta"]) == d["meta"]  # nothing lost: meta as a JSON string
        assert r["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": d["instruction"]},
                                 {"role": "assistant", "content": d["response"]}]
    # the same seed splits the same way; another seed another way
    export(cli, humpback_run, "hf", tmp_path / "hf2", "--split", "0.34", "--split-seed", "3")
    assert list(datasets.load_from_disk(str(tmp_path / "hf2"))["validation"]["id"]) == list(dd["validation"]["id"])
    splits = set()
    for seed in range(6):
        export(cli, humpback_run, "hf", tmp_path / f"hf-s{seed}", "--split", "0.34", "--split-seed", str(seed))
        splits.add(tuple(datasets.load_from_disk(str(tmp_path / f"hf-s{seed}"))["validation"]["id"]))
    assert len(splits) > 1


def test_parquet_loads_with_load_dataset(cli, humpback_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = read_jsonl(humpback_run / "data.jsonl")
    export(cli, humpback_run, "parquet", tmp_path / "pq")  # 10% validation by default: 1 of 6
    files = {"train": str(tmp_path / "pq" / "train.parquet"), "validation": str(tmp_path / "pq" / "validation.parquet")}
    dd = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf-cache"))
    assert (len(dd["train"]), len(dd["validation"])) == (5, 1)
    rows = list(dd["train"]) + list(dd["validation"])
    assert sorted((r["instruction"], r["response"]) for r in rows) == sorted((d["instruction"], d["response"]) for d in data)
    assert all(r["system"] == SYSTEM and r["messages"][0] == {"role": "system", "content": SYSTEM} for r in rows)
    # --split 0: one file, and no stale validation file from the export before
    export(cli, humpback_run, "parquet", tmp_path / "pq", "--split", "0")
    assert not (tmp_path / "pq" / "validation.parquet").exists()
    one = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "train.parquet"), cache_dir=str(tmp_path / "hf-cache2"))
    assert len(one["train"]) == 6


def test_tegit_input_lands_in_alpaca_input(cli, tmp_path):
    run = make_run(cli, tmp_path, "tegit", "--grounding", "off", "--judge-mode", "rubric")
    data = read_jsonl(run / "data.jsonl")
    assert data and all(d["alpaca"]["input"] for d in data)
    export(cli, run, "alpaca", tmp_path / "a.jsonl")
    alpaca = jsonl(tmp_path / "a.jsonl")
    assert [(a["instruction"], a["input"], a["output"]) for a in alpaca] == \
        [(d["alpaca"]["instruction"], d["alpaca"]["input"], d["response"]) for d in data]
    assert all(a["input"].startswith("The passage about item") for a in alpaca)
    # the chat formats carry the whole user turn (instruction + input)
    r = export(cli, run, "openai", tmp_path / "o.jsonl")
    assert "field alpaca" not in r.output
    assert [o["messages"][-2]["content"] for o in jsonl(tmp_path / "o.jsonl")] == [d["instruction"] for d in data]


def test_backforth_preference_pairs_in_every_format(cli, tmp_path):
    datasets = pytest.importorskip("datasets")
    run = make_run(cli, tmp_path, "backforth", "--judge-mode", "rubric")
    data = read_jsonl(run / "data.jsonl")
    assert data and all(d["meta"]["original_response"] != d["response"] for d in data)
    chosen = [d["response"] for d in data]
    rejected = [d["meta"]["original_response"] for d in data]

    export(cli, run, "trl", tmp_path / "t.jsonl", "--preference")
    t = jsonl(tmp_path / "t.jsonl")
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in t)  # DPOTrainer's columns
    assert [r["chosen"][0]["content"] for r in t] == chosen and [r["rejected"][0]["content"] for r in t] == rejected
    assert t[0]["prompt"][0] == {"role": "system", "content": SYSTEM}

    export(cli, run, "alpaca", tmp_path / "a.jsonl", "--preference")
    a = jsonl(tmp_path / "a.jsonl")
    assert [(x["chosen"], x["rejected"]) for x in a] == list(zip(chosen, rejected)) and a[0]["system"] == SYSTEM

    export(cli, run, "sharegpt", tmp_path / "s.jsonl", "--preference")
    s = jsonl(tmp_path / "s.jsonl")
    assert [(x["chosen"]["value"], x["rejected"]["value"]) for x in s] == list(zip(chosen, rejected))

    export(cli, run, "openai", tmp_path / "o.jsonl", "--preference")
    o = jsonl(tmp_path / "o.jsonl")
    assert [x["preferred_output"][0]["content"] for x in o] == chosen
    assert [x["non_preferred_output"][0]["content"] for x in o] == rejected

    export(cli, run, "messages", tmp_path / "m.jsonl", "--preference")
    m = jsonl(tmp_path / "m.jsonl")
    assert [x["chosen"][-1]["content"] for x in m] == chosen and [x["rejected"][-1]["content"] for x in m] == rejected

    export(cli, run, "hf", tmp_path / "hf", "--preference", "--split", "0")
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert [r["chosen"][0]["content"] for r in dd["train"]] == chosen
    assert [r["rejected"][0]["content"] for r in dd["train"]] == rejected


def test_preference_without_a_worse_variant_is_one_error(cli, humpback_run, tmp_path):
    r = cli("export", humpback_run, "--format", "trl", "-o", tmp_path / "t.jsonl", "--preference")
    assert r.exit_code == 2 and "error:" in r.output and "worse variant" in r.output


def test_split_of_a_jsonl_format_writes_train_and_validation_files(cli, humpback_run, tmp_path):
    export(cli, humpback_run, "openai", tmp_path / "ft.jsonl", "--split", "0.5", "--split-seed", "1")
    train, val = jsonl(tmp_path / "ft.train.jsonl"), jsonl(tmp_path / "ft.validation.jsonl")
    assert (len(train), len(val)) == (3, 3)
    both = sorted(r["messages"][1]["content"] for r in train + val)
    assert both == sorted(d["instruction"] for d in read_jsonl(humpback_run / "data.jsonl"))


@pytest.mark.parametrize("setup, expected", [
    (lambda p: None, "no such run directory"),
    (lambda p: p.mkdir(), "not a btkit run directory"),
    (lambda p: (p.mkdir(), (p / "candidates.jsonl").write_text("")), "not finished"),
    (lambda p: (p.mkdir(), (p / "data.jsonl").write_text("{oops\n")), "line 1 is not JSON"),
    (lambda p: p.write_text("x"), "not a run directory"),
])
def test_a_bad_run_directory_is_one_error_line(cli, tmp_path, setup, expected):
    run = tmp_path / "run"
    setup(run)
    r = cli("export", run, "--format", "alpaca", "-o", tmp_path / "x.jsonl")
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.output


def test_unknown_format_names_the_known_ones(cli, humpback_run, tmp_path):
    r = cli("export", humpback_run, "--format", "nope", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "unknown export format 'nope'" in r.output and "sharegpt" in r.output


class _CsvFormat:
    """A third-party format, registered through the hook exactly as a plugin would."""

    @hookimpl
    def btkit_register_export_formats(self, register):
        register("pairs-csv", self.write, description="instruction,response CSV", suffix=".csv")

    @staticmethod
    def write(rows, out, options):
        import csv

        with open(out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["instruction", "response"])
            for r in rows:
                w.writerow([r["instruction"], r["response"]])
        return {"rows": len(rows), "warnings": ["format pairs-csv has no place for field system"]}


def test_a_plugin_adds_a_format_and_clashes_are_refused(registry, cli, humpback_run, tmp_path):
    import csv

    registry.register(_CsvFormat(), name="csv-plugin")
    assert "pairs-csv" in registry.export_formats() and "alpaca" in registry.export_formats()
    r = export(cli, humpback_run, "pairs-csv", tmp_path / "p.csv")
    assert r.output.count("has no place for field system") == 1
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == len(read_jsonl(humpback_run / "data.jsonl"))

    class Clash:
        @hookimpl
        def btkit_register_export_formats(self, register):
            register("alpaca", lambda rows, out, options: {})

    registry.register(Clash(), name="clash")
    from btkit.errors import BtkitError

    with pytest.raises(BtkitError, match="export format 'alpaca' registered twice"):
        registry.export_formats()
    registry.unregister("clash")


def test_report_sections_are_sorted_by_order(registry):
    class Sections:
        @hookimpl
        def btkit_register_report_sections(self, register):
            register("zz-late", lambda run_dir, context: None, order=900)
            register("aa-early", lambda run_dir, context: "<p>hi</p>", order=-5)

    registry.register(Sections(), name="sections")
    names = [s.name for s in registry.report_sections()]
    assert names.index("aa-early") < names.index("zz-late")
    assert names[0] == "aa-early" and names[-1] == "zz-late"


def test_a_run_that_kept_nothing_is_one_error_line(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.jsonl").write_text("")
    for fmt in ("hf", "alpaca"):
        r = cli("export", run, "--format", fmt, "-o", tmp_path / fmt)
        assert r.exit_code == 2 and r.output.startswith("error:") and "holds no records" in r.output


def test_a_method_without_pairs_is_refused_by_chat_formats_and_kept_by_hf(cli, tmp_path):
    datasets = pytest.importorskip("datasets")
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "data.jsonl", [{"text": "book a table", "intent": "book", "tags": ["O", "O", "O"], "meta": {"id": "u1", "method": "linguist"}}])
    r = cli("export", run, "--format", "alpaca", "-o", tmp_path / "a.jsonl")
    assert r.exit_code == 2 and "needs instruction/response pairs" in r.output and "method linguist" in r.output
    export(cli, run, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))["train"]
    assert ds[0]["intent"] == "book" and json.loads(ds[0]["tags"]) == ["O", "O", "O"]


@pytest.mark.model
def test_export_of_a_run_with_the_embedded_model(cli, tmp_path):
    datasets = pytest.importorskip("datasets")
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "bees", "text": "Honey bees tell their sisters where flowers are with a waggle dance. The angle of the dance "
                               "shows the direction to the food and its length shows how far away the flowers are. "
                               "Scouts repeat the dance many times so that other foragers can learn the way."},
        {"id": "tea", "text": "To brew green tea, heat the water to about eighty degrees rather than boiling it, because "
                              "boiling water makes the leaves bitter. Steep the leaves for two or three minutes and then "
                              "pour the tea so that it does not keep steeping in the pot."},
    ])
    out = tmp_path / "run"
    r = cli("run", "humpback", corpus, "-o", out, "--judge-mode", "logprob", "--threshold", "1", "-S", "augment.max_tokens=64", "-q")
    assert r.exit_code == 0, r.output
    data = read_jsonl(out / "data.jsonl")
    assert data, (out / "stats.json").read_text()
    export(cli, out, "hf", tmp_path / "hf", "--split", "0")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))["train"]
    assert len(ds) == len(data)
    assert [row["instruction"] for row in ds] == [d["instruction"] for d in data]
    assert all(row["system"] == SYSTEM for row in ds)
    export(cli, out, "sharegpt", tmp_path / "s.jsonl")
    share = jsonl(tmp_path / "s.jsonl")
    assert [s["conversations"][1]["value"] for s in share] == [d["response"] for d in data]


def test_air_preference_rejects_the_last_answer_that_missed_a_constraint():
    from btkit_plugins.results.export import preference_pairs

    rounds = [{"round": 1, "instruction": "Explain tea.", "answer": "Tea is a drink.", "status": "added", "constraint": "name the temperature"},
              {"round": 2, "instruction": "Explain tea at 80 C.", "answer": "Brew it at 80 C.", "status": "added", "constraint": "say how long"},
              {"round": 3, "instruction": "Explain tea at 80 C for 3 min.", "answer": "Brew at 80 C for 3 min.", "status": "none"}]
    air = {"instruction": "Explain tea at 80 C for 3 min.", "response": "The document.", "system": "",
           "meta": {"id": "a", "initial_instruction": "Explain tea.", "rounds": rounds}}
    plain = {"instruction": "x", "response": "y", "system": "", "meta": {"id": "b"}}
    pairs, skipped = preference_pairs([air, plain])
    assert skipped == 1 and len(pairs) == 1
    assert pairs[0]["chosen"] == "The document." and pairs[0]["rejected"] == "Brew it at 80 C."


def test_btkit_help_imports_no_datasets():
    import subprocess
    import sys

    code = ("import sys\nfrom btkit.cli import cli\n"
            "try:\n    cli(['export', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('datasets', 'pyarrow', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "alpaca" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr
