"""``export_gguf`` / ``btkit export-gguf``: an HF model folder back to a GGUF that ``llamacpp:`` loads.

Without a model: the Q/K permutation is the inverse of the one transformers undoes when it reads a
GGUF, and every mismatch with ``--like`` is refused in one line before anything is written. With the
real model (the embedded SmolLM2-135M dequantized into an HF folder): the F16 file has the source's
metadata and tensors (each equal to the source's dequantized weights), and **the parity test**: the
same model in ``transformers:`` and in ``llamacpp:`` after export gives the same prompt tokens, the
same next-token argmax, next-token logprobs within 0.05 nats, the same continuation scores and the
same greedy reply. Q8_0 is checked against its own quantization error.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from btkit.errors import BtkitError

#: Prompts of the parity test (messages, assistant prefix).
PROMPTS = [
    ([{"role": "user", "content": "What is the capital of France?"}], ""),
    ([{"role": "user", "content": "Write a haiku about the sea."}], ""),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primes."}], "Sure: "),
    ([{"role": "user", "content": "Rate this answer from 1 to 5. Q: 2+2? A: 4."}], "Score: "),
    ([{"role": "user", "content": "Translate 'good morning' to German."}], ""),
]
#: Largest |logprob difference| allowed between transformers (F32) and llama.cpp (F16 export) over
#: each prompt's 10 likeliest next tokens. Measured 2026-12-02 on this machine: 0.0171 nats at most
#: (0.005-0.017 per prompt); continuation scores differed by at most 0.0104 per token.
F16_TOLERANCE = 0.05
#: The same for the Q8_0 export. llama.cpp also rounds activations to 8 bits in its Q8_0 and Q4_1
#: kernels: measured at most 0.98 nats for this export, 0.75 for llama.cpp's own Q8_0 of the F16
#: file and 0.40 for the shipped Q4_1 file itself (whose weights the HF folder holds exactly).
Q8_TOLERANCE = 1.5

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
          "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
          "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def hf_dir(hf_base: Path) -> Path:
    """The embedded GGUF dequantized into an HF folder once per session (conftest's ``hf_base``)."""
    pytest.importorskip("gguf")
    return hf_base


@pytest.fixture(scope="module")
def f16_file(hf_dir, tmp_path_factory) -> Path:
    from btkit_plugins.train.gguf_export import export_gguf

    return export_gguf(hf_dir, None, tmp_path_factory.mktemp("gguf") / "smol.f16.gguf", "f16")


def fake_folder(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**CONFIG, **config}))
    return path


# -- without a model ------------------------------------------------------------------------
@pytest.mark.slow  # importing transformers: 3-9 s here
def test_permute_undoes_what_transformers_undid():
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from btkit_plugins.train.gguf_export import permute

    reverse = LlamaTensorProcessor(config={})._reverse_permute_weights
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(576, 576)), rng.normal(size=(192, 576))
    assert np.array_equal(permute(reverse(q, 9, 9), 9, 9), q)
    assert np.array_equal(permute(reverse(k, 9, 3), 9, 3), k)
    assert not np.array_equal(permute(q, 9, 9), q)


def test_mismatches_with_like_are_refused_in_one_line(tmp_path):
    pytest.importorskip("gguf")
    import gguf

    from btkit_plugins.train.gguf_export import export_gguf

    out = tmp_path / "out.gguf"
    cases = [
        (fake_folder(tmp_path / "layers", num_hidden_layers=12), "num_hidden_layers=12 there, llama.block_count=30"),
        (fake_folder(tmp_path / "kv", num_key_value_heads=9), "num_key_value_heads=9"),
        (fake_folder(tmp_path / "qwen", model_type="qwen2"), "'qwen2' model"),
        (fake_folder(tmp_path / "vocab", vocab_size=32000), "vocabulary of 32000 tokens"),
    ]
    tokens = fake_folder(tmp_path / "tokens")
    (tokens / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "hello": 2}}}))
    cases.append((tokens, "differs from SmolLM2-135M-Instruct.Q4_1.gguf's in 1 tokens (first: id 2 is 'hello'"))
    for folder, message in cases:
        with pytest.raises(BtkitError, match=None) as e:
            export_gguf(folder, None, out)
        assert message in str(e.value) and "\n" not in str(e.value), folder.name
    assert not out.exists()

    other = tmp_path / "gemma.gguf"  # a source of another architecture
    w = gguf.GGUFWriter(str(other), arch="gemma3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BtkitError, match="llama-architecture models only; gemma.gguf is 'gemma3'"):
        export_gguf(fake_folder(tmp_path / "x"), other, out)
    with pytest.raises(BtkitError, match="no such GGUF"):
        export_gguf(fake_folder(tmp_path / "x"), tmp_path / "missing.gguf", out)
    with pytest.raises(BtkitError, match="--type q4"):
        export_gguf(fake_folder(tmp_path / "x"), None, out, "q4")


def test_command_reports_errors_as_one_line(tmp_path):
    from btkit_plugins.train.gguf_export import export_gguf_command

    r = CliRunner().invoke(export_gguf_command, [str(tmp_path), "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code == 2 and "no config.json" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(export_gguf_command, ["--help"])
    assert r.exit_code == 0 and "--like" in r.output and "q8_0" in r.output


# -- with the real model ---------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.slow
def test_f16_file_is_the_source_with_the_folder_weights(f16_file):
    """Same metadata (but the file type), same tensors in the same order and shapes, and each weight
    equal to the source's dequantized one (the HF folder is the dequantized source): names mapped
    and Q/K permuted back as llama.cpp wants them."""
    import gguf

    from btkit.kit.models import embedded_model_path

    src, out = gguf.GGUFReader(str(embedded_model_path())), gguf.GGUFReader(str(f16_file))
    meta = lambda r: {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}  # noqa: E731
    a, b = meta(src), meta(out)
    assert b.pop("general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16) and a.pop("general.file_type") == 3
    assert a == b  # tokenizer, chat template, sizes: all copied
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    for s, o in zip(src.tensors, out.tensors):
        assert list(s.shape) == list(o.shape), s.name
        want = gguf.quants.dequantize(s.data, s.tensor_type).astype(np.float32)
        got = np.asarray(o.data, dtype=np.float32)
        assert o.tensor_type == (gguf.GGMLQuantizationType.F32 if len(s.shape) == 1 else gguf.GGMLQuantizationType.F16)
        assert np.allclose(got, want, rtol=1e-3, atol=1e-4), s.name


def _llama_logprobs(backend, messages, prefix):
    backend._eval_reusing_prefix(backend.prompt_tokens(messages, prefix), backend.llm())
    logits = backend.last_logits(backend.llm())
    top = logits.max()
    return logits - (top + np.log(np.exp(logits - top).sum()))


@pytest.mark.model
@pytest.mark.slow
def test_parity_transformers_and_llamacpp_after_f16_export(hf_dir, f16_file):
    from btkit_plugins.backends.llamacpp import LlamaCppBackend
    from btkit_plugins.backends.transformers_backend import TransformersBackend

    hf = TransformersBackend(str(hf_dir), {})
    ll = LlamaCppBackend(str(f16_file), {"score_weights": "same"})
    try:
        worst = 0.0
        for messages, prefix in PROMPTS:
            tokens, ours = hf.next_token_distribution(messages, prefix)
            assert tokens == ll.prompt_tokens(messages, prefix)
            ours = ours.numpy()
            theirs = _llama_logprobs(ll, messages, prefix)
            assert int(ours.argmax()) == int(theirs.argmax()), messages
            top = np.argsort(-ours)[:10]
            worst = max(worst, float(np.abs(ours[top] - theirs[top]).max()))
        assert worst < F16_TOLERANCE, worst

        async def calls():
            response = "Paris is the capital and largest city of France, on the Seine."
            for messages in (PROMPTS[0][0], None):
                a = await hf.score_continuation(messages, response, end_of_turn=True)
                b = await ll.score_continuation(messages, response, end_of_turn=True)
                assert len(a) == len(b) and a.prompt_tokens == b.prompt_tokens
                assert list(a) == pytest.approx(list(b), abs=F16_TOLERANCE)
            for messages, _ in PROMPTS[:2]:
                a = await hf.chat(messages, {"temperature": 0, "max_tokens": 40})
                b = await ll.chat(messages, {"temperature": 0, "max_tokens": 40})
                assert (a.text, a.finish_reason, a.completion_tokens) == (b.text, b.finish_reason, b.completion_tokens)

        asyncio.run(calls())
    finally:
        asyncio.run(hf.aclose())
        asyncio.run(ll.aclose())


@pytest.mark.model
@pytest.mark.slow
def test_q8_0_export_through_the_command(hf_dir, f16_file, tmp_path):
    """The command writes Q8_0 matrices (norms F32) that dequantize to the F16 file's weights within
    Q8_0's rounding, and llama.cpp reads it with logprobs within its 8-bit kernels' error. The
    folder's own chat template (here: edited) replaces the source's."""
    import gguf

    from btkit_plugins.backends.llamacpp import LlamaCppBackend
    from btkit_plugins.backends.transformers_backend import TransformersBackend
    from btkit_plugins.train.gguf_export import export_gguf_command

    folder = tmp_path / "model"  # the same weights, another template
    folder.mkdir()
    for f in hf_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").unlink()
    template = (hf_dir / "chat_template.jinja").read_text() + "{# trained with this one #}"
    (folder / "chat_template.jinja").write_text(template)
    out = tmp_path / "smol.q8_0.gguf"
    r = CliRunner().invoke(export_gguf_command, [str(folder), "--type", "q8_0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"llamacpp:{out}" in r.output
    q8, f16 = gguf.GGUFReader(str(out)), {t.name: t for t in gguf.GGUFReader(str(f16_file)).tensors}
    assert q8.get_field("tokenizer.chat_template").contents() == template
    assert gguf.GGUFReader(str(f16_file)).get_field("tokenizer.chat_template").contents() != template
    for t in q8.tensors:
        ref = np.asarray(f16[t.name].data, dtype=np.float32)
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        scale = np.abs(ref.reshape(-1, 32)).max(axis=1) / 127  # one scale per block of 32
        assert (np.abs(got - ref).reshape(-1, 32) <= scale[:, None] * 0.65 + 1e-6).all(), t.name

    hf = TransformersBackend(str(hf_dir), {})
    ll = LlamaCppBackend(str(out), {"score_weights": "same"})
    try:
        for messages, prefix in PROMPTS:
            _, ours = hf.next_token_distribution(messages, prefix)
            ours = ours.numpy()
            theirs = _llama_logprobs(ll, messages, prefix)
            top = np.argsort(-ours)[:10]
            assert int(theirs.argmax()) in top[:3]
            assert float(np.abs(ours[top] - theirs[top]).max()) < Q8_TOLERANCE
    finally:
        asyncio.run(hf.aclose())
        asyncio.run(ll.aclose())


@pytest.mark.model
@pytest.mark.slow
def test_smaller_types_go_through_llamacpp_quantizer(hf_dir, tmp_path):
    """q4_k_m: llama.cpp's quantizer from a temporary F16 file (removed after); llama.cpp loads the
    result. 4-bit weights move this 135M model's logprobs by up to ~1.1 nats (measured), so only
    that it loads and answers is checked here."""
    import gguf

    from btkit_plugins.backends.llamacpp import LlamaCppBackend
    from btkit_plugins.train.gguf_export import export_gguf

    out = export_gguf(hf_dir, None, tmp_path / "smol.q4_k_m.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol.q4_k_m.gguf"]
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert out.stat().st_size < 0.45 * (hf_dir / "model.safetensors").stat().st_size / 2  # well under the F16 size
    ll = LlamaCppBackend(str(out), {})
    try:
        reply = asyncio.run(ll.chat(PROMPTS[0][0], {"temperature": 0, "max_tokens": 24}))
        assert reply.text and reply.text.strip()  # (measured: French, not "Paris": 4 bits cost this model its answer)
    finally:
        asyncio.run(ll.aclose())
