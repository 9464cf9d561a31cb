"""Native architectures against HF transformers on the same random weights (fp32).

For each tiny config: logits parity (log-softmax within 1e-4) with sequences run in uneven
chunks through the paged cache beside another sequence; alternatives parity (top-5 ids and
logprobs at every position); greedy parity with HF ``generate`` (do_sample=False). Windows are
smaller than the sequences; the Phi-3 config crosses its LongRoPE switch.

The reference is HF's teacher-forced forward over the whole sequence, except for LongRoPE: HF
picks short or long factors by the length of the sequence at each forward call, so there the
reference is HF fed the same chunks with a cache (see ``truffula.layers.rotary``).
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_same_greedy, hf_logsoftmax
from modelharness import Harness
from safetensors.torch import load_file, save_file

TOL = 1e-4
VOCAB = 300
SMALL = dict(hidden_size=64, num_attention_heads=4, vocab_size=VOCAB)
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _cfg(cls_name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls_name)(**{**SMALL, **NO_SPECIAL, **kw})

    return make


LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.3, 1.9, 2.6],
    "long_factor": [1.5, 3.0, 7.0, 11.0],
    "original_max_position_embeddings": 16,
}

CONFIGS: dict[str, Callable[[], Any]] = {
    "mistral-window": _cfg(
        "MistralConfig",
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        sliding_window=5,
    ),
    "qwen3": _cfg(
        "Qwen3Config",
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "qwen3-window-layers": _cfg(  # layer 0 full, layer 1 sliding (max_window_layers)
        "Qwen3Config",
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    "phi3-longrope": _cfg(
        "Phi3Config",
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters=dict(LONGROPE),
    ),
    "phi3-window": _cfg(  # Phi-3-mini-4k has sliding_window = 2047 on every layer
        "Phi3Config",
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=4,
        max_position_embeddings=256,
        sliding_window=5,
    ),
    "gemma2": _cfg(
        "Gemma2Config",
        intermediate_size=96,
        num_hidden_layers=3,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        max_position_embeddings=256,
        sliding_window=6,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gpt2": _cfg("GPT2Config", n_layer=2, n_positions=64),
    "gpt2-inverse-layer-scale": _cfg(
        "GPT2Config", n_layer=2, n_positions=64, n_inner=96, scale_attn_by_inverse_layer_idx=True
    ),
    "gpt-neox": _cfg(
        "GPTNeoXConfig",
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rotary_pct=0.5,
    ),
    "gpt-neox-sequential-tied": _cfg(
        "GPTNeoXConfig",
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rotary_pct=0.25,
        use_parallel_residual=False,
        tie_word_embeddings=True,
    ),
    "mixtral": _cfg(
        "MixtralConfig",
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}
#: configs whose HF reference must be fed in the same chunks (LongRoPE)
CHUNKED_REFERENCE = {"phi3-longrope"}


def save_random(config: Any, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init; norms and biases not trivial
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


_BUILT: dict[str, tuple[Any, Path]] = {}


def built(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The HF model of config ``name`` and the folder it was saved to (built once per session)."""
    if name not in _BUILT:
        folder = tmp_path_factory.mktemp(name)
        _BUILT[name] = (save_random(CONFIGS[name](), folder), folder)
    return _BUILT[name]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


A, B = _ids(23, 1), _ids(14, 2)
#: chunk sizes per step: a prefill chunk, a second chunk of a beside b's whole prompt, decodes
#: of both, decodes of a alone, a last decode of b
SCHEDULE: list[dict[str, int]] = [
    {"a": 13},
    {"a": 3, "b": 9},
    *[{"a": 1, "b": 1}] * 4,
    *[{"a": 1}] * 3,
    {"b": 1},
]


def run_schedule(h: Harness, seqs: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Log-softmax rows of every token of ``seqs``, fed through the harness by ``SCHEDULE``."""
    pos = dict.fromkeys(seqs, 0)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in seqs}
    for step in SCHEDULE:
        chunk = {n: seqs[n][pos[n] : pos[n] + k] for n, k in step.items()}
        for n, out in h.step(chunk).items():
            rows[n].append(out)
        for n, k in step.items():
            pos[n] += k
    assert all(pos[n] == len(seqs[n]) for n in seqs)
    return {n: torch.cat(r) for n, r in rows.items()}


@torch.no_grad()
def hf_chunked_logsoftmax(hf: Any, ids: list[int], sizes: list[int]) -> torch.Tensor:
    """HF fed ``ids`` in chunks of ``sizes`` with a DynamicCache: [len(ids), vocab]."""
    from transformers import DynamicCache

    params = inspect.signature(hf.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    cache = DynamicCache(config=hf.config)
    out, pos = [], 0
    for n in sizes:
        x = torch.tensor([ids[pos : pos + n]])
        res = hf(input_ids=x, use_cache=True, **{key: cache})
        out.append(res.logits[0].float().log_softmax(-1))
        pos += n
    return torch.cat(out)


def reference(name: str, hf: Any, seq: str, ids: list[int]) -> torch.Tensor:
    if name in CHUNKED_REFERENCE:
        return hf_chunked_logsoftmax(hf, ids, [s[seq] for s in SCHEDULE if seq in s])
    return hf_logsoftmax(hf, ids)


_RUNS: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}


def ours_and_ref(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if name not in _RUNS:
        hf, folder = built(name, tmp_path_factory)
        got = run_schedule(Harness(folder, block_size=4), {"a": A, "b": B})
        ref = {"a": reference(name, hf, "a", A), "b": reference(name, hf, "b", B)}
        _RUNS[name] = (got, ref)
    return _RUNS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    got, ref = ours_and_ref(name, tmp_path_factory)
    for seq in ("a", "b"):
        diff = (got[seq] - ref[seq]).abs().max().item()
        assert diff <= TOL, (seq, diff)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_top5_alternatives_match_hf(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    got, ref = ours_and_ref(name, tmp_path_factory)
    for seq in ("a", "b"):
        ours, theirs = got[seq].topk(5, dim=-1), ref[seq].topk(5, dim=-1)
        assert (ours.values - theirs.values).abs().max().item() <= TOL
        differ = ours.indices != theirs.indices
        # equal ids up to exact ties: where an id differs, HF gives ours the same logprob
        tied = ref[seq].gather(1, ours.indices) - theirs.values
        assert tied[differ].abs().le(1e-6).all(), (seq, differ.nonzero().tolist())


@torch.no_grad()
def hf_greedy_ids(hf: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """HF ``generate`` greedy: n new tokens (no EOS in these configs) and top-2 margins."""
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    margins = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), margins


def our_greedy(folder: Path, prompt: list[int], n: int, split: int) -> list[int]:
    """Greedy through the harness: the prompt in two chunks (the second beside another prompt),
    then n decode steps, another sequence decoding beside it every other step."""
    h = Harness(folder, block_size=4)
    h.step({"p": prompt[:split]})
    last = h.step({"p": prompt[split:], "z": _ids(5, 4)})["p"][-1]
    ours: list[int] = []
    for i in range(n):
        ours.append(int(last.argmax()))
        chunk = {"p": [ours[-1]]} | ({"z": [ours[-1]]} if i % 2 == 0 else {})
        last = h.step(chunk)["p"][-1]
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf_generate(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """20 prompt tokens (past every window; past Phi-3's original context already in the first
    chunk of 17) and 8 greedy steps."""
    hf, folder = built(name, tmp_path_factory)
    prompt = _ids(20, 3)
    ref, margins = hf_greedy_ids(hf, prompt, 8)
    assert_same_greedy(our_greedy(folder, prompt, 8, split=17), ref, margins)


@torch.no_grad()
def hf_greedy_cached(hf: Any, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy with HF's forward and a cache kept across the steps (no ``generate``)."""
    from transformers import DynamicCache

    params = inspect.signature(hf.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    cache = DynamicCache(config=hf.config)
    x, toks, margins = prompt, [], []
    for _ in range(n):
        logits = hf(input_ids=torch.tensor([x]), use_cache=True, **{key: cache}).logits[0, -1]
        top2 = logits.float().topk(2).values
        toks.append(int(logits.argmax()))
        margins.append(float(top2[0] - top2[1]))
        x = [toks[-1]]
    return toks, margins


def test_longrope_greedy_within_original_context(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    hf, folder = built("phi3-longrope", tmp_path_factory)
    prompt = _ids(6, 6)  # 6 + 8 <= 16: short factors throughout
    ref, margins = hf_greedy_ids(hf, prompt, 8)
    assert_same_greedy(our_greedy(folder, prompt, 8, split=4), ref, margins)


def test_longrope_greedy_crossing_the_switch_matches_hf_forward_with_cache(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Decoding across the switch: short-rotated keys stay in the cache, new tokens take the
    long factors, as HF's forward does when it is fed the same steps with a cache."""
    hf, folder = built("phi3-longrope", tmp_path_factory)
    prompt = _ids(12, 7)
    ref, margins = hf_greedy_cached(hf, prompt, 10)
    assert_same_greedy(our_greedy(folder, prompt, 10, split=5), ref, margins)


@pytest.mark.xfail(
    strict=True,
    reason="HF Phi-3 generate drops its cache and recomputes the whole sequence with the long "
    "factors when it crosses original_max_position_embeddings; truffula keeps the cache",
)
def test_longrope_greedy_crossing_the_switch_matches_hf_generate(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    hf, folder = built("phi3-longrope", tmp_path_factory)
    prompt = _ids(12, 7)
    ref, margins = hf_greedy_ids(hf, prompt, 10)
    assert_same_greedy(our_greedy(folder, prompt, 10, split=5), ref, margins)


def test_longrope_factor_set_follows_sequence_length(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A whole prompt longer than the original context takes the long factors at every position
    (HF's teacher-forced forward); one within it takes the short ones."""
    hf, folder = built("phi3-longrope", tmp_path_factory)
    long_out = Harness(folder, block_size=4).step({"a": A})["a"]
    assert (long_out - hf_logsoftmax(hf, A)).abs().max().item() <= TOL
    short_out = Harness(folder, block_size=4).step({"a": A[:16]})["a"]
    assert (short_out - hf_logsoftmax(hf, A[:16])).abs().max().item() <= TOL
    # the switch matters: the first 16 rows differ between the two factor sets
    assert (long_out[:16] - short_out).abs().max().item() > 1e-2


def _rewrite_checkpoint(src: Path, dst: Path, convert: Callable[[dict], dict]) -> None:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    save_file(convert(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})


def _same_logits(a: Path, b: Path) -> None:
    ha, hb = Harness(a), Harness(b)
    ids = _ids(9, 5)
    assert torch.equal(ha.step({"x": ids})["x"], hb.step({"x": ids})["x"])


def test_mixtral_loads_stacked_experts(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """transformers 5's in-memory layout (``mlp.gate``, ``mlp.experts.gate_up_proj``
    [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) loads as the classic w1/w2/w3 names."""
    _, folder = built("mixtral", tmp_path_factory)
    experts = json.loads((folder / "config.json").read_text())["num_local_experts"]

    def stack(t: dict) -> dict:
        out = {k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in t.items()}
        for layer in {k.split(".block_sparse_moe.")[0] for k in t if "block_sparse_moe" in k}:
            e = [f"{layer}.block_sparse_moe.experts.{i}" for i in range(experts)]
            gate_up = [torch.cat([t[f"{p}.w1.weight"], t[f"{p}.w3.weight"]]) for p in e]
            out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
            out[f"{layer}.mlp.experts.down_proj"] = torch.stack([t[f"{p}.w2.weight"] for p in e])
        return {k: v for k, v in out.items() if ".experts." not in k or "mlp.experts" in k}

    _rewrite_checkpoint(folder, tmp_path / "stacked", stack)
    _same_logits(folder, tmp_path / "stacked")


def test_gpt2_loads_bare_gpt2model_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The original hub files: no ``transformer.`` prefix, old ``attn.bias`` mask buffers."""
    _, folder = built("gpt2", tmp_path_factory)

    def bare(t: dict) -> dict:
        out = {k.removeprefix("transformer."): v for k, v in t.items()}
        out["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        return out

    _rewrite_checkpoint(folder, tmp_path / "bare", bare)
    _same_logits(folder, tmp_path / "bare")


def test_every_architecture_is_registered() -> None:
    from truffula.models.registry import native_architectures

    want = {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "GPT2LMHeadModel",
        "GPTNeoXForCausalLM",
        "MixtralForCausalLM",
    }
    assert want <= set(native_architectures())
