"""Where training starts: a Hugging Face model folder, made once from a GGUF file when needed.

transformers reads a GGUF with ``gguf_file=``, but with default settings it keeps a GGUF quantizer
attached: Trainer then refuses to train ("purely quantized models") and ``save_pretrained`` fails.
Loaded with ``GgufConfig(dequantize=True)`` the model is a plain torch model that trains, saves and
generates. So a GGUF base is dequantized once into an HF folder keyed by the GGUF's content hash
(``$BTKIT_CACHE_DIR/hf-models/<hash>/``) and every training starts from that copy. The folder is
written under a temporary name and renamed into place, so a kill leaves no half-written copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from btkit.errors import BtkitError
from btkit.kit.models import embedded_model_path, file_digest, model_digest

__all__ = ["cache_root", "hf_model_dir", "model_digest", "resolve_gguf"]

def cache_root() -> Path:
    """Where converted models live: next to btkit's call cache."""
    base = os.environ.get("BTKIT_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "btkit")
    return Path(base) / "hf-models"


def resolve_gguf(base: str | Path | None) -> Path | None:
    """The GGUF file ``base`` names (None, ``default`` or ``llamacpp:...`` too), or None for an HF folder."""
    if base is None or str(base) in ("default", "llamacpp:default", ""):
        return embedded_model_path()
    text = str(base)
    if text.startswith("llamacpp:"):
        return Path(text.split(":", 1)[1]).expanduser()
    if text.startswith("transformers:"):
        return None
    if text.endswith(".gguf"):
        return Path(text).expanduser()
    return None


def hf_model_dir(base: str | Path | None = None, cache_dir: Path | None = None) -> Path:
    """An HF model folder to train from or to load: ``base`` itself, or the dequantized copy of a GGUF.

    ``base``: None (the embedded SmolLM2-135M GGUF), a ``.gguf`` path, ``llamacpp:PATH``,
    ``transformers:DIR`` or an HF model folder.
    """
    gguf = resolve_gguf(base)
    if gguf is None:
        folder = Path(str(base).split(":", 1)[1] if str(base).startswith("transformers:") else str(base)).expanduser()
        if not (folder / "config.json").is_file():
            raise BtkitError(f"{folder}: not a Hugging Face model folder (no config.json) and not a .gguf file")
        return folder
    if not gguf.is_file():
        raise BtkitError(f"{gguf}: no such GGUF file")
    digest = file_digest(gguf)
    target = (cache_dir or cache_root()) / digest[:16]
    if (target / "source.json").is_file():
        return target
    return _convert(gguf, digest, target)


def _convert(gguf: Path, digest: str, target: Path) -> Path:
    """Dequantize ``gguf`` into ``target`` (model in F32 and tokenizer), atomically."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:  # the extra is not installed
        raise BtkitError(f"finetuning needs the train extra: pip install 'btkit[train]' ({e})") from None
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": digest}, indent=2) + "\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "source.json").is_file():
            raise
    return target
