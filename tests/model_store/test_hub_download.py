"""``--model org/name[@rev]`` and hub adapters download through huggingface_hub when the cache
lacks them; a local HTTP server (tests/hubserver.py) plays the Hub through ``HF_ENDPOINT``.
No real network: HF_HOME is a temporary folder and the endpoint is 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hubserver import FakeHub
from safetensors.torch import load_file

from truffula.errors import ModelLoadError
from truffula.model_store.resolve import resolve_model

REPO = "tiny-org/tiny-llama"


def _tiny_model(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=300,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    (folder / "README.md").write_text("not needed\n")
    (folder / "pytorch_model.bin").write_bytes(b"not needed either")


def _tiny_adapter(model_dir: Path, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft.save_pretrained(folder)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    server = FakeHub()
    model = tmp_path / "upload"
    _tiny_model(model)
    server.add_folder(REPO, model)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    server.model_dir = model  # type: ignore[attr-defined]
    yield server
    server.close()


def _downloaded(hub: FakeHub) -> set[str]:
    return {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/api/" not in p}


def test_download_then_cache_then_offline(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = resolve_model(REPO, progress=False)
    assert folder.is_relative_to(os.environ["HF_HOME"])
    got, want = (
        load_file(folder / "model.safetensors"),
        load_file(
            hub.model_dir / "model.safetensors"  # type: ignore[attr-defined]
        ),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fetched = _downloaded(hub)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert not fetched & {"README.md", "pytorch_model.bin"}  # only the files truffula reads
    assert hub.auth == {"Bearer hf_test_token"}  # HF_TOKEN, read when the download starts
    # the second resolution is served by the cache, without a request
    hub.requests.clear()
    assert resolve_model(REPO, progress=False) == folder
    assert hub.requests == []
    # offline with the cache complete works; an uncached repo names the reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model(f"{REPO}@main", progress=False) == folder
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        resolve_model("tiny-org/other", progress=False)
    assert hub.requests == []


def test_model_loads_and_generates_from_hub(hub: FakeHub) -> None:
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(REPO, progress=False, max_k_alternatives=5)
    out = llm.generate(["abc"], SamplingParams(max_new_tokens=3, temperature=0))
    assert len(out[0].token_ids) == 3


def test_failed_download_leaves_nothing_trusted(hub: FakeHub, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    hub.truncate.add("model.safetensors")
    with pytest.raises(ModelLoadError, match="could not download model"):
        resolve_model(REPO, progress=False)
    cache = Path(os.environ["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama"
    assert not list((cache / "snapshots").glob("*/model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model(REPO, progress=False)
    # back online, the next run completes the download
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.truncate.clear()
    folder = resolve_model(REPO, progress=False)
    assert (folder / "model.safetensors").is_file()


def test_unknown_repo_is_one_clear_error(hub: FakeHub) -> None:
    with pytest.raises(ModelLoadError, match="could not download model 'nobody/nothing'"):
        resolve_model("nobody/nothing", progress=False)


def test_hub_adapter_downloads(hub: FakeHub, tmp_path: Path) -> None:
    from truffula.engine.llm import LLM

    adapter = tmp_path / "adapter"
    _tiny_adapter(hub.model_dir, adapter)  # type: ignore[attr-defined]
    hub.add_folder("tiny-org/tiny-lora", adapter)
    llm = LLM(REPO, progress=False, max_k_alternatives=5, adapter_root=str(tmp_path / "root"))
    key = llm.engine.adapters.load("tiny-org/tiny-lora", "hub")
    assert key == "tiny-org/tiny-lora"
    assert "adapter_model.safetensors" in _downloaded(hub)
