"""Where the first-party templates (the repo's ``prompts/`` folder) live once installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _find() -> Path:
    spec = importlib.util.find_spec("btkit_prompts")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "prompts"


PROMPTS = _find()
