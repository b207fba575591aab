"""``btkit loop self_lengthen`` end to end on CPU with the embedded model and tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import EXAMPLES, read_jsonl, write_jsonl

STEPS = ["round1-run", "round1-generator", "round1-extender", "round2-run", "round2-generator", "round2-extender"]


@pytest.mark.model
@pytest.mark.slow
def test_round_two_runs_on_round_one_models_and_rerun_recomputes_nothing(cli, tmp_path: Path, hf_base: Path) -> None:
    """Round 2's generate and extend calls are made by the models round 1 trained (their paths in the lineage,
    their sha256 in the report equal to the folders' digests); the same command again recomputes nothing."""
    from btkit_plugins.train.base_model import model_digest

    # Two instructions whose one-line answers the base model extends (seeded, so the same every time).
    rows = {r["id"]: r for r in read_jsonl(EXAMPLES / "self_lengthen" / "instructions.jsonl")}
    instructions = write_jsonl(tmp_path / "instructions.jsonl", [rows["backup-plan"], rows["bisect-story"]])
    loop = tmp_path / "loop"
    args = ["loop", "self_lengthen", instructions, "-o", loop, "--base", hf_base,
            # round 1 on the GGUF the HF base was dequantized from (llama.cpp is the faster of the two on CPU)
            "--model", "llamacpp:default",
            # one-line replies keep every call short: stop at the first newline
            "--stop", "\n", "--max-tokens", "96", "--generate-retries", "1",
            "--extend-rounds", "1", "--extend-attempts", "1", "--extend-max-tokens", "128", "--min-growth", "1.0",
            "--max-steps", "1", "--batch-size", "1", "--max-length", "384", "--lora-r", "8", "--lr", "1e-3"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((loop / "report.json").read_text())
    first, second = report["rounds"]
    for r in report["rounds"]:
        print(f"round {r['round']}: initial {r['initial_words']} words (length score {r['initial_length_score']}), "
              f"extended {r['extended_words']} words (length score {r['extended_length_score']}), "
              f"accepted {r['accepted']}/{r['generated']}, loss G {r['generator']['train_loss']} E {r['extender']['train_loss']}")

    # round 1: the base model generated and extended; both models were trained on its accepted extensions
    assert first["generated_by"] == first["extended_by"] == "llamacpp:default"
    assert first["accepted"] >= 1
    gen_dir, ext_dir = loop / "round1-generator", loop / "round1-extender"
    for entry, folder in ((first["generator"], gen_dir), (first["extender"], ext_dir)):
        assert entry["trained"] and entry["model"] == f"transformers:{folder}" and entry["rows"] == first["accepted"]
        assert entry["model_sha256"] == model_digest(folder)
    assert first["generator"]["model_sha256"] != first["extender"]["model_sha256"]
    gen_rows = read_jsonl(gen_dir / "rows.jsonl")
    ext_rows = read_jsonl(ext_dir / "rows.jsonl")
    assert gen_rows[0]["prompt"][-1]["content"] in {rows["backup-plan"]["instruction"], rows["bisect-story"]["instruction"]}
    assert "draft" in ext_rows[0]["prompt"][-1]["content"] and gen_rows[0]["completion"] == ext_rows[0]["completion"]

    # round 2: checked in the lineage of its run, not assumed from the report
    assert second["generated_by"] == f"transformers:{gen_dir}" and second["extended_by"] == f"transformers:{ext_dir}"
    assert second["generated_by_sha256"] == model_digest(gen_dir) and second["extended_by_sha256"] == model_digest(ext_dir)
    models: dict[str, set[str]] = {}
    for line in read_jsonl(loop / "round2-run" / "candidates.jsonl"):
        for step in line.get("lineage") or []:
            models.setdefault(step["stage"], set()).add(step["model"])
    assert models["self_lengthen.generate"] == {f"transformers:{gen_dir}"}
    if second["generated"]:  # a unit the Generator answered went to the Extender
        assert models["self_lengthen.extend"] == {f"transformers:{ext_dir}"}

    # the same command again: every step complete, nothing rewritten
    step_files = {s: (loop / s / "step.json").read_bytes() for s in STEPS}
    mtimes = {s: (loop / s / "step.json").stat().st_mtime_ns for s in STEPS}
    again = cli(*args)
    assert again.exit_code == 0, again.output
    for s in STEPS:
        assert f"{s}: complete, skipped" in again.output
        assert (loop / s / "step.json").read_bytes() == step_files[s]
        assert (loop / s / "step.json").stat().st_mtime_ns == mtimes[s]
    assert "running" not in again.output
    assert json.loads((loop / "report.json").read_text()) == report
