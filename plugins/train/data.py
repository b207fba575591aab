"""Training rows: btkit pairs turned into the conversational prompt/completion rows TRL trains on.

A row keeps the record's system prompt (Humpback's tags, "Answer with knowledge from web search." and
"Answer in the style of an AI Assistant.", are what tells M1 the two sources apart), puts TeGit's
``input`` under the instruction, and trains on the completion only (SFTTrainer's completion-only loss
on prompt/completion rows; the end-of-turn token is part of the completion, so the model learns to
stop).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from btkit.errors import BtkitError


def chat_row(instruction: str, response: str, system: str | None = None, input_text: str | None = None) -> dict[str, Any]:
    """One SFT row: ``prompt`` (system + user messages) and ``completion`` (the assistant message)."""
    user = instruction if not input_text else f"{instruction}\n\n{input_text}"
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": response}]}


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BtkitError(f"{where}: field '{field}' must be a non-empty string")
    return value


def row_from_record(obj: Any, where: str, instruction_field: str = "instruction", response_field: str = "response") -> dict[str, Any]:
    """A training row from one JSON object: btkit's pairs, or ready ``messages`` / ``prompt``+``completion``."""
    if not isinstance(obj, dict):
        raise BtkitError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj and "completion" in obj and isinstance(obj["prompt"], list):
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise BtkitError(f"{where}: field 'messages' must be a list ending with an assistant message")
        return {"prompt": msgs[:-1], "completion": [msgs[-1]]}
    instruction = _text(obj.get(instruction_field), where, instruction_field)
    response = _text(obj.get(response_field), where, response_field)
    system = obj.get("system") if isinstance(obj.get("system"), str) and obj.get("system") else None
    input_text = obj.get("input") if isinstance(obj.get("input"), str) and obj.get("input").strip() else None
    return chat_row(instruction, response, system, input_text)


def data_file(path: Path) -> Path:
    """The JSONL a path names: a run directory means its ``data.jsonl`` (a finished run)."""
    path = Path(path)
    if path.is_dir():
        data = path / "data.jsonl"
        if not data.is_file():
            raise BtkitError(f"{path}: a run directory without data.jsonl (is the run finished? re-run its command to complete it)")
        return data
    if not path.is_file():
        raise BtkitError(f"{path}: no such file or run directory")
    return path


def read_rows(path: Path, instruction_field: str = "instruction", response_field: str = "response") -> list[dict[str, Any]]:
    """Every pair of a run directory or JSONL file as a training row; bad lines stop with file:line:field."""
    src = data_file(path)
    rows = []
    with open(src, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BtkitError(f"{src}:{n}: not JSON ({e.msg})") from None
            rows.append(row_from_record(obj, f"{src}:{n}", instruction_field, response_field))
    if not rows:
        raise BtkitError(f"{src}: no pairs to train on")
    return rows


def rows_digest(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 of the rows in order: a resumed training must see exactly the data it started with."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
