"""Shared fixtures: the default model is fetched/converted once and loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# No test reaches the real Hugging Face Hub (tests/model_store/test_hub_download.py serves its
# own on 127.0.0.1 and lifts this); a hub id missing from the cache is an immediate, offline error.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Every fixture that loads the default model or starts a server on it (``llm``, ``hf_model``,
# ``server``, ``peft_model``, the servers of the test files, …) asks for ``model_dir``.
SLOW_FIXTURES = {"model_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``slow`` on every test that loads the default model or starts a server: those that reach
    ``model_dir`` through their fixtures here; the others carry the mark in their files."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from truffula.model_store.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def llm(model_dir: Path):  # type: ignore[no-untyped-def]
    from truffula.engine.llm import LLM

    return LLM(str(model_dir), progress=False, max_k_alternatives=50)


@pytest.fixture(scope="session")
def hf_model(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def chat_prompts(hf_tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Give me three tips for learning Python.",
    ]
    return [
        hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "2 + 2 =",
    "The three primary colors are",
]


@pytest.fixture(scope="session")
def server(model_dir):  # type: ignore[no-untyped-def]
    """One real server for the HTTP tests (4 concurrent requests at most, k up to 20)."""
    from serverproc import ServerProcess

    proc = ServerProcess("--max-concurrent-requests", "4", "--max-k-alternatives", "20")
    yield proc
    proc.stop()


EXTRAS_KEY = "playground-key"


@pytest.fixture(scope="session")
def extras_server(model_dir):  # type: ignore[no-untyped-def]
    """A server with an API key, --strict-params, JSON logs and traces exported to an OTLP
    receiver of the test process (``extras_server.collector``)."""
    import os

    pytest.importorskip("opentelemetry.sdk", reason="pip install 'truffula[tracing]'")
    from otlpcollector import Collector
    from serverproc import ServerProcess

    collector = Collector()
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export spans soon after they end
    try:
        proc = ServerProcess(
            "--api-key",
            EXTRAS_KEY,
            "--strict-params",
            "--log-format",
            "json",
            "--otlp-endpoint",
            collector.url,
            "--max-k-alternatives",
            "20",
        )
    finally:
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
    proc.collector = collector
    proc.key = EXTRAS_KEY
    yield proc
    proc.stop()
    collector.close()


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_SPECS = {
    "qv4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all8": {"r": 8, "lora_alpha": 16, "target_modules": ALL_PROJ},
    "mlp6rs": {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["gate_proj", "down_proj", "o_proj"],
        "use_rslora": True,
    },
}


@pytest.fixture(scope="session")
def peft_model(model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One PeftModel holding three random adapters (saved as PEFT folders under ``root``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = None
    for i, (name, spec) in enumerate(LORA_SPECS.items()):
        cfg = LoraConfig(**spec, init_lora_weights=False, lora_dropout=0.0)
        model = get_peft_model(base, cfg, adapter_name=name) if model is None else model
        if i > 0:
            model.add_adapter(name, cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(root)  # the first adapter in root/, the others in root/<name>/
    (root / "qv4").mkdir(exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if (root / f).exists():
            (root / f).rename(root / "qv4" / f)
    model.eval()
    model.root = root
    return model
