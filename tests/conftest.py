"""Shared fixtures: the default model is fetched/converted once and loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
