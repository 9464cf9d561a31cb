"""Shared pieces of the CPU benchmarks: the default model, HF transformers as the peer, timing."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(repeats)]
    return statistics.median(values), values


def greedy(new: int, k: int = 0) -> Any:
    """``SamplingParams`` of a timed run: greedy, exactly ``new`` tokens (ignore_eos), with ``k``
    alternatives a token (and ``details``) when ``k`` > 0."""
    from truffula.sampling.params import SamplingParams

    return SamplingParams(
        max_new_tokens=new,
        temperature=0,
        ignore_eos=True,
        details=k > 0,
        return_k_alternatives=k,
    )


def random_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (length,), generator=gen).tolist() for _ in range(n)]


def hf_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_tok_s(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """HF ``generate`` on one batch of equal-length prompts (no padding), greedy, fixed length."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def write_result(name: str, result: dict[str, Any]) -> None:
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **result}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote benchmarks/results/{name}.json")


def random_adapters(
    store: Any,
    count: int,
    rank: int,
    scale: float,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """``count`` random rank-``rank`` adapters on every projection, straight into the store's
    host memory (no files); returns their ids."""
    from truffula.adapters.peft import LoRAWeights

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale

    keys = []
    for i in range(count):
        w = LoRAWeights(f"random-{i}", rank)
        for name, layer in store.layers.items():
            base = layer.base
            shards = getattr(base, "shard_offsets", None) or {None: (0, base.out_features)}
            # a tensor-parallel layer holds a slice: adapters have the whole layer's shape
            logical = getattr(base, "logical_shape", None)
            shapes = {
                s: logical(s) if logical else (size, base.in_features)
                for s, (_, size) in shards.items()
            }
            w.modules[name] = {s: (rand(rank, i), rand(o, rank)) for s, (o, i) in shapes.items()}
        store.host[w.adapter_id] = w
        keys.append(w.adapter_id)
    return keys


def without_out(argv: list[str]) -> list[str]:
    """The arguments but ``--out DIR`` (where this run wrote is no part of what it measured)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        skip = a == "--out"
        if not skip:
            out.append(a)
    return out
