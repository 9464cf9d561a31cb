"""``--load-format dummy``: a model of a folder's shape with random weights and no weights file
read (for measuring speed and memory); the default format still insists on the weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from distributed.tiny import make_model


@pytest.fixture(scope="module")
def shape_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model(tmp_path_factory.mktemp("dummy"))
    for f in folder.glob("*.safetensors"):
        f.unlink()
    return folder


def test_dummy_weights_fill_every_parameter(shape_only: Path) -> None:
    from truffula.models.registry import load_model

    loaded = load_model(shape_only, torch.float32, torch.device("cpu"), 64, random_weights=True)
    params = dict(loaded.model.named_parameters())
    assert params["model.norm.weight"].eq(1).all()
    assert params["model.layers.0.self_attn.o_proj.bias"].eq(0).all()
    w = params["model.layers.1.mlp.down_proj.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    # every parameter drawn or set: no uninitialised memory survives
    assert all(torch.isfinite(p).all() for p in params.values())
    a, b = (params[f"model.layers.{i}.self_attn.qkv_proj.weight"] for i in (0, 1))
    assert not torch.equal(a, b)


def test_engine_serves_a_shape_without_weights(shape_only: Path) -> None:
    from truffula.engine.llm import LLM
    from truffula.errors import ModelLoadError
    from truffula.sampling.params import SamplingParams

    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        LLM(str(shape_only), progress=False, device="cpu", num_blocks=16)
    llm = LLM(str(shape_only), progress=False, device="cpu", num_blocks=16, load_format="dummy")
    params = SamplingParams(
        max_new_tokens=4, temperature=0, ignore_eos=True, return_k_alternatives=2
    )
    out = llm.generate(["the quick brown"], params)[0]
    assert len(out.token_ids) == 4
    assert all(t.logprob is not None and math.isfinite(t.logprob) for t in out.tokens)


def test_bad_load_format_names_the_field() -> None:
    from truffula.config import EngineConfig

    with pytest.raises(ValueError, match="load_format must be auto or dummy"):
        EngineConfig.from_kwargs(load_format="npz")


@pytest.mark.slow  # spawns a tensor-parallel rank
def test_dummy_weights_under_tensor_parallelism(shape_only: Path) -> None:
    """Each rank fills its own shard: a 2-rank engine serves the shape with no weights file,
    its logprobs and prompt logprobs finite."""
    from distributed.tiny import engine

    from truffula.sampling.params import SamplingParams

    llm = engine(shape_only, 2, load_format="dummy")
    try:
        params = SamplingParams(
            max_new_tokens=3,
            temperature=0,
            ignore_eos=True,
            return_k_alternatives=2,
            prompt_k_alternatives=2,
        )
        out = llm.generate(["the quick brown"], params)[0]
    finally:
        llm.close()
    assert len(out.token_ids) == 3
    assert all(t.logprob is not None and math.isfinite(t.logprob) for t in out.tokens)
    assert out.prompt_tokens and all(
        p.logprob is None or math.isfinite(p.logprob) for p in out.prompt_tokens
    )
