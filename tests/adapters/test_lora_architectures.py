"""LoRA on every native architecture: a random peft adapter (the module names peft targets for
that family) gives the same logits in truffula as in peft's PeftModel, within 1e-4 (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import randomize_lora
from modelharness import Harness
from models.test_architectures import SCHEDULE, A, built

from truffula.adapters.store import AdapterStore
from truffula.layers.lora import apply_lora

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {
    "mistral-window": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "phi3-window": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gemma2": LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt-neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "mixtral": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ],  # experts are 3-D tensors in transformers 5
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_peft_adapter_matches(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, folder = built(name, tmp_path_factory)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[name],
        init_lora_weights=False,
        fan_in_fan_out=name == "gpt2",
    )
    model = get_peft_model(hf, cfg).eval()
    randomize_lora(model, 3)
    model.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        ref = model(torch.tensor([A])).logits[0].float().log_softmax(-1)
        with model.disable_adapter():
            base = model(torch.tensor([A])).logits[0].float().log_softmax(-1)

    h = Harness(folder, block_size=4)
    layers = apply_lora(h.runner.model, 2, 8, torch.float32, torch.device("cpu"))
    store = AdapterStore(layers, h.runner.model.packed_modules, 2, 8, str(tmp_path))
    slot = store.acquire(store.load("ad"))
    rows, pos = [], 0
    for step in SCHEDULE:
        if "a" in step:
            rows.append(h.step({"a": A[pos : pos + step["a"]]}, {"a": slot})["a"])
            pos += step["a"]
    got = torch.cat(rows)
    assert (got - ref).abs().max().item() <= 1e-4
    assert (ref - base).abs().max().item() > 1e-2  # the adapter matters
