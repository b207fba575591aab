"""``btkit export-gguf``: a finetuned Hugging Face model folder back to a GGUF file ``llamacpp:`` loads.

llama.cpp's own converter (``convert_hf_to_gguf.py``) is in no installed wheel, so this writes the
file with the ``gguf`` package, for the case btkit makes: a finetune of the same architecture and
tokenizer as a source GGUF (``--like``, the embedded SmolLM2-135M by default). Everything that is
not a trained weight comes from that source: its metadata and tokenizer (vocabulary, merges, special
tokens) are copied key by key (the chat template too, unless the folder has its own: that one is
what ``transformers:`` formats with, so it wins), and its tensor list says which tensors to write, in
which order and shape. The weights come from the folder's safetensors, renamed with gguf's
tensor-name map (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``), with
llama.cpp's rotary permutation of the Q and K projections re-applied (transformers undid it when
it read the GGUF: ``LlamaModel.permute`` in llama.cpp's converter), 1-D tensors (norms) in F32 as
llama.cpp's converter writes them, matrices in F16 or, with ``--type q8_0``, quantized by gguf's
numpy Q8_0 quantizer (a matrix whose rows do not split into 32-value blocks stays F16). The smaller
types (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k_m``, ``q5_k_m``, ``q6_k``) go through llama.cpp's
own quantizer (``llama_model_quantize`` in llama-cpp-python) from the F16 file, which picks the
per-tensor types as llama-quantize does (e.g. a k-quant falls back where rows are not a multiple
of 256, as SmolLM2's 576-wide ones are).

Refused, in one line, before anything is written: an architecture other than llama's (another
architecture needs its own tensor fix-ups, e.g. Gemma's norm offset, which this does not know), a
folder whose architecture or sizes differ from ``--like``'s (layers, widths, heads), a vocabulary
that differs (size or any token), a trained output head where the source has tied embeddings.
The file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from btkit.errors import BtkitError

#: Types written here with the gguf package.
GGUF_TYPES = ("f16", "q8_0")
#: Types llama.cpp's quantizer makes from the F16 file (llama_cpp.LLAMA_FTYPE_MOSTLY_<NAME>).
LLAMA_QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
OUT_TYPES = GGUF_TYPES + LLAMA_QUANT_TYPES
#: HF ``model_type`` values whose weights llama.cpp's ``llama`` architecture runs (its converter's LlamaModel).
LLAMA_MODEL_TYPES = ("llama", "mistral")


def resolve_like(like: str | Path | None) -> Path:
    """The source GGUF ``--like`` names: a path, ``llamacpp:PATH``, or None/``default`` for the embedded model."""
    text = "" if like is None else str(like)
    if text.startswith("llamacpp:"):
        text = text.split(":", 1)[1]
    if text in ("", "default"):
        from btkit.kit.models import embedded_model_path

        return embedded_model_path()
    path = Path(text).expanduser()
    if not path.is_file():
        raise BtkitError(f"--like {like}: no such GGUF file")
    return path


def permute(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's Q/K row order (``LlamaModel.permute`` in convert_hf_to_gguf.py): per head, the
    two rotary halves interleaved; transformers reverses this when it reads a llama GGUF."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


_READERS: dict[tuple[str, int, int], Any] = {}


def read_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, kept for the process (opening one parses every metadata
    array element by element: 3-8 s for SmolLM2's 49152 tokens and 48900 merges here)."""
    import gguf

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READERS:
        if len(_READERS) >= 4:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = gguf.GGUFReader(str(path), "r")
    return _READERS[key]


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def _hf_tensors(model_dir: Path) -> dict[str, Any]:
    """Every tensor of the folder's safetensors as float32 numpy arrays (bf16/f16 widened)."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BtkitError(f"{model_dir}: no *.safetensors weights (save the model with save_pretrained(safe_serialization=True))")
    out: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = st.get_tensor(name).to(torch.float32).numpy()
    return out


def _hf_vocab(model_dir: Path) -> list[str] | None:
    """Tokens by id from tokenizer.json (model vocabulary and added tokens), None without that file."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    by_id: dict[int, str] = {}
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        by_id.update({int(i): t for t, i in vocab.items()})
    elif isinstance(vocab, list):  # unigram: [[token, score], ...]
        by_id.update({i: t[0] for i, t in enumerate(vocab)})
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
    if not by_id:
        return None
    return [by_id.get(i, "") for i in range(max(by_id) + 1)]


def folder_chat_template(model_dir: Path) -> str | None:
    """The chat template the folder's tokenizer uses (``chat_template.jinja``, else a string in
    ``tokenizer_config.json``): what ``transformers:`` formats with, so the GGUF gets it too."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def check_compatible(config: dict[str, Any], reader: Any, model_dir: Path, like: Path) -> str:
    """The source's architecture name when the folder can be written in its shape; else BtkitError (one line)."""
    arch = _field(reader, "general.architecture")
    model_type = config.get("model_type")
    if arch != "llama":
        raise BtkitError(f"export-gguf writes llama-architecture models only; {like.name} is '{arch}'")
    if model_type not in LLAMA_MODEL_TYPES:
        raise BtkitError(f"{model_dir} is a '{model_type}' model, {like.name} a '{arch}' one: export with --like a GGUF of the model it was trained from")
    sizes = {
        "num_hidden_layers": f"{arch}.block_count", "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length", "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
    }
    for hf_key, gguf_key in sizes.items():
        want = _field(reader, gguf_key)
        got = config.get(hf_key, config.get("num_attention_heads") if hf_key == "num_key_value_heads" else None)
        if want is not None and got != want:
            raise BtkitError(f"{model_dir} does not match {like.name}: {hf_key}={got} there, {gguf_key}={want} here; "
                             f"export with --like a GGUF of the model it was trained from")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if config.get("vocab_size") is not None and config["vocab_size"] != len(tokens):
        raise BtkitError(f"{model_dir} has a vocabulary of {config['vocab_size']} tokens, {like.name} of {len(tokens)}: "
                         f"the tokenizer is copied from --like, so they must be the same")
    hf_tokens = _hf_vocab(model_dir)
    if hf_tokens is not None:
        if len(hf_tokens) > len(tokens):
            raise BtkitError(f"{model_dir}'s tokenizer has {len(hf_tokens)} tokens, {like.name} {len(tokens)}: the tokenizer is copied from --like, so they must be the same")
        differ = [i for i, t in enumerate(hf_tokens) if t != tokens[i]]
        if differ:
            i = differ[0]
            raise BtkitError(f"{model_dir}'s tokenizer differs from {like.name}'s in {len(differ)} tokens "
                             f"(first: id {i} is {hf_tokens[i]!r} there, {tokens[i]!r} here); the tokenizer is copied from --like")
    return arch


def export_gguf(model_dir: Path, like: Path | str | None = None, out: Path | None = None, out_type: str = "f16") -> Path:
    """Write the HF model folder ``model_dir`` as a GGUF shaped like ``like`` (weights in ``out_type``).

    ``like``: the GGUF the model was trained from (its metadata and tokenizer are copied), the
    embedded model when None. ``out``: the file to write, ``<model_dir>.<out_type>.gguf`` beside the
    folder when None. ``out_type``: one of :data:`OUT_TYPES`. Returns the path written.
    """
    model_dir = Path(model_dir)
    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise BtkitError(f"--type {out_type}: choose one of {', '.join(OUT_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise BtkitError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    like = resolve_like(like)
    out = Path(out) if out is not None else model_dir.parent / f"{model_dir.name}.{out_type}.gguf"
    if out_type in GGUF_TYPES:
        return _write(model_dir, like, out, out_type)
    f16 = out.with_name(f".{out.name}.{os.getpid()}.f16.tmp")
    try:
        _write(model_dir, like, f16, "f16")
        return _llama_quantize(f16, out, out_type)
    finally:
        f16.unlink(missing_ok=True)


def _llama_quantize(source: Path, out: Path, out_type: str) -> Path:
    """``source`` (a GGUF) quantized to ``out_type`` by llama.cpp, written to ``out`` through a temporary file."""
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    from btkit_plugins.backends.llamacpp import default_threads

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.nthread = default_threads()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with suppress_stdout_stderr(disable=False):
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise BtkitError(f"llama.cpp could not quantize {source.name} to {out_type} (llama_model_quantize returned {rc})")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write(model_dir: Path, like: Path, out: Path, out_type: str) -> Path:
    """The gguf-package writer behind :func:`export_gguf` (``out_type`` f16 or q8_0)."""
    try:
        import gguf
        import numpy as np
    except ImportError as e:
        raise BtkitError(f"export-gguf needs the train extra: pip install 'btkit[train]' ({e})") from None
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    reader = read_gguf(like)
    arch = check_compatible(config, reader, model_dir, like)

    tensors = _hf_tensors(model_dir)
    n_blocks = int(_field(reader, f"{arch}.block_count"))
    arch_enum = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    mapped: dict[str, Any] = {}
    for hf_name, data in tensors.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise BtkitError(f"{model_dir}: tensor {hf_name} has no GGUF name for the '{arch}' architecture")
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_head_kv)
        mapped[gguf_name] = data
    wanted = {t.name: t for t in reader.tensors}
    if "output.weight" in mapped and "output.weight" not in wanted:
        embed = mapped.get("token_embd.weight")
        if embed is None or not np.array_equal(mapped["output.weight"], embed):
            raise BtkitError(f"{model_dir} has its own output head (lm_head) but {like.name} ties it to the embeddings: "
                             f"train with tied embeddings, or export with --like a GGUF that has output.weight")
        del mapped["output.weight"]
    if "output.weight" in wanted and "output.weight" not in mapped and config.get("tie_word_embeddings") and "token_embd.weight" in mapped:
        mapped["output.weight"] = mapped["token_embd.weight"]
    missing = [n for n in wanted if n not in mapped and not n.startswith("rope_freqs")]
    extra = [n for n in mapped if n not in wanted]
    if missing or extra:
        raise BtkitError(f"{model_dir} does not have {like.name}'s tensors (missing {missing[:3]}, extra {extra[:3]})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    alignment = _field(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = alignment
    file_type = gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    template = folder_chat_template(model_dir)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if field.name == "general.file_type" else field.contents()
        if field.name == "tokenizer.chat_template" and template is not None:
            value, template = template, None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    if template is not None:
        writer.add_chat_template(template)
    if _field(reader, "general.file_type") is None:
        writer.add_file_type(int(file_type))
    q8 = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[q8][0]
    for t in reader.tensors:
        if t.name not in mapped:  # rope_freqs and such: computed from the config, not trained
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            continue
        data = np.ascontiguousarray(mapped[t.name], dtype=np.float32)
        expected = tuple(int(d) for d in reversed(t.shape))
        if data.shape != expected:
            raise BtkitError(f"{model_dir}: {t.name} has shape {data.shape}, {like.name} {expected}")
        if data.ndim <= 1:
            writer.add_tensor(t.name, data)
        elif out_type == "q8_0" and data.shape[-1] % block == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(t.name, data.astype(np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@click.command("export-gguf")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--like", default=None, metavar="SOURCE.gguf",
              help="The GGUF the model was trained from: its metadata and tokenizer are copied (the folder's own chat template wins). Default: the embedded SmolLM2-135M.")
@click.option("--type", "out_type", type=click.Choice(OUT_TYPES, case_sensitive=False), default="f16", show_default=True,
              help="Weight type of the matrices (norms stay F32): f16 and q8_0 written here, the others by llama.cpp's quantizer from the F16 file.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The GGUF file to write. Default: MODEL_DIR.TYPE.gguf beside the folder.")
def export_gguf_command(model_dir: Path, like: str | None, out_type: str, out: Path | None) -> None:
    """Write a finetuned model folder (btkit train's output) as a GGUF file that llamacpp: loads."""
    path = export_gguf(model_dir, like, out, out_type)
    size = path.stat().st_size / 2**20
    click.echo(f"wrote {path} ({out_type.lower()}, {size:.0f} MiB); use it with --model llamacpp:{path}")
