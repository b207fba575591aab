"""``btkit train``: rows from runs, settings, and a real (tiny) finetune of the embedded model that
survives a kill -9 and resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btkit.errors import BtkitError
from btkit_plugins.train.data import chat_row, read_rows, rows_digest
from btkit_plugins.train.sft import TrainSettings

from conftest import EXAMPLES, write_jsonl

TINY = ["--max-steps", "2", "--batch-size", "1", "--max-length", "256", "--lora-r", "8", "--lr", "1e-3", "-q"]


def test_rows_keep_system_prompt_and_input(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [
        {"instruction": "Summarise this.", "input": "A long text.", "response": "Short.", "system": "Answer with knowledge from web search."},
        {"instruction": "What is a tarball?", "response": "An archive made by tar."},
    ])
    rows = read_rows(data)
    assert rows[0]["prompt"] == [{"role": "system", "content": "Answer with knowledge from web search."},
                                 {"role": "user", "content": "Summarise this.\n\nA long text."}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Short."}]
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is a tarball?"}]


def test_run_directory_means_its_data(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(BtkitError, match="without data.jsonl"):
        read_rows(run)
    write_jsonl(run / "data.jsonl", [{"instruction": "Q?", "response": "A.", "meta": {"score": 5}}])
    assert read_rows(run) == [chat_row("Q?", "A.")]


def test_bad_rows_name_file_line_and_field(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"instruction": "Q?", "response": "A."}\n{"instruction": "Q2?", "response": ""}\n')
    with pytest.raises(BtkitError, match=r"pairs.jsonl:2: field 'response' must be a non-empty string"):
        read_rows(data)
    data.write_text('{"instruction": "Q?", "response": "A."}\n{oops\n')
    with pytest.raises(BtkitError, match=r"pairs.jsonl:2: not JSON"):
        read_rows(data)


def test_digest_follows_content_and_order() -> None:
    a, b = chat_row("Q1", "A1"), chat_row("Q2", "A2")
    assert rows_digest([a, b]) != rows_digest([b, a])
    assert rows_digest([a, b]) == rows_digest([chat_row("Q1", "A1"), chat_row("Q2", "A2")])


def test_runtime_settings_do_not_change_what_a_folder_is_for() -> None:
    """Device, checkpointing and checkpoint spacing change speed, not the weights: a folder trained with
    other values (or before such a setting existed) is reused, not refused."""
    a = TrainSettings(max_steps=3)
    assert a.identity() == TrainSettings(max_steps=3, device="cpu", gradient_checkpointing=True, save_steps=1).identity()
    assert a.identity() != TrainSettings(max_steps=4).identity()
    assert "device" not in a.identity() and "learning_rate" in a.identity()


def test_settings_are_checked() -> None:
    assert TrainSettings.from_mapping({"max-steps": "3", "lora_r": 8}).max_steps == 3
    with pytest.raises(BtkitError, match="unknown training setting 'max_step'"):
        TrainSettings.from_mapping({"max_step": 3}, "t.yaml")
    with pytest.raises(BtkitError, match="learning_rate must be > 0"):
        TrainSettings.from_mapping({"learning_rate": 0})
    with pytest.raises(BtkitError, match="'batch_size' must be int"):
        TrainSettings.from_mapping({"batch_size": "four"})


def test_settings_file_errors(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    result = cli("train", EXAMPLES / "seed.jsonl", "-o", tmp_path / "m", "--train-config", cfg)
    assert result.exit_code == 2
    assert "train.yaml: unknown training setting 'max_stepz'" in result.output


def _btkit(*args: object, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "btkit.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


@pytest.mark.model
@pytest.mark.slow
def test_train_reuses_refuses_and_is_a_backend(cli, tmp_path: Path, hf_base: Path) -> None:
    """A tiny LoRA finetune writes a plain HF model; the same command reuses it; other settings are refused."""
    out = tmp_path / "m"
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, [json.loads(line) for line in (EXAMPLES / "seed.jsonl").read_text().splitlines()[:4]])
    result = cli("train", data, "-o", out, "--base", hf_base, *TINY)
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 2 and training["rows"] == 4 and len(training["losses"]) == 2
    assert training["base_sha256"] != training["model_sha256"]
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # LoRA merged: a plain model
    before = (out / "training.json").stat().st_mtime_ns
    assert cli("train", data, "-o", out, "--base", hf_base, *TINY).exit_code == 0
    assert (out / "training.json").stat().st_mtime_ns == before  # complete: not trained again
    result = cli("train", data, "-o", out, "--base", hf_base, *TINY[:-1], "--train-seed", "7", "-q")
    assert result.exit_code == 2 and "holds a training with other settings" in result.output


@pytest.mark.model
@pytest.mark.slow
def test_kill_during_training_resumes_from_checkpoint(tmp_path: Path, hf_base: Path) -> None:
    """kill -9 after the first checkpoint; the same command resumes there instead of starting over."""
    out = tmp_path / "m"
    args = ["train", EXAMPLES / "seed.jsonl", "-o", out, "--base", hf_base, "--max-steps", "3", "--save-steps", "1",
            "--batch-size", "1", "--max-length", "192", "--lora-r", "8", "--lr", "1e-3"]
    proc = _btkit(*args)
    deadline = time.monotonic() + 600
    try:
        while not (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "training.json").exists()
    proc = _btkit(*args)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    assert "resuming training from" in output
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 3
    assert training["resumed_from"] and Path(training["resumed_from"]).name.startswith("checkpoint-")
    resumed_at = int(Path(training["resumed_from"]).name.split("-")[1])
    assert resumed_at >= 1
    assert [e["step"] for e in training["losses"]] == list(range(resumed_at + 1, 4))  # the steps done before the kill are not redone
