"""Speculative decoding with a draft model against plain decoding with the default model: the
same tokens, logprobs, ranks and alternatives whatever the draft model proposes; drafts
accepted as often as the draft agrees with the target; its per-request state freed when a
request finishes, is aborted or preempted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from truffula.sampling.params import SamplingParams
from truffula.speculative.config import SpeculativeConfig
from truffula.speculative.drafter import Drafter

SHALLOW_LAYERS = 20
"""Layers of the default model kept by the disagreeing draft (the target has 30)."""


def shallow_copy(model_dir: Path, out: Path, layers: int) -> Path:
    """The default model cut to its first ``layers`` layers (same embeddings, final norm and
    tokenizer): a smaller model that agrees with the target on many tokens but not all."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(model_dir / "model.safetensors")
    kept = {
        k: v
        for k, v in weights.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    save_file(kept, out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


def random_llama(model_dir: Path, out: Path, vocab_size: int) -> Path:
    """A two-layer llama with random weights and ``vocab_size`` tokens (safetensors), with the
    default model's tokenizer files beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


def spec_config(model: str, k: int) -> str:
    return json.dumps({"method": "draft_model", "model": model, "num_speculative_tokens": k})


@pytest.fixture(scope="module")
def self_draft(model_dir):  # type: ignore[no-untyped-def]
    """The default model drafting for itself ("default": the alias resolves to the same
    folder)."""
    from truffula.engine.llm import LLM

    return LLM(str(model_dir), progress=False, speculative=spec_config("default", 4))


@pytest.fixture(scope="module")
def shallow(model_dir, peft_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A 20-layer cut of the default model (a third of its argmaxes agree) drafting 3 tokens, with adapters, and a KV cache of
    12 blocks (192 tokens): a few requests at once preempt each other."""
    from truffula.engine.llm import LLM

    draft = shallow_copy(model_dir, tmp_path_factory.mktemp("shallow"), SHALLOW_LAYERS)
    return LLM(
        str(model_dir),
        progress=False,
        speculative=spec_config(str(draft), 3),
        adapter_root=str(peft_model.root),
        max_lora_rank=8,
        num_blocks=12,
        max_model_len=192,
    )


def chat(tok, asks: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True
        )
        for a in asks
    ]


ASKS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List five fruits and their colors.",
]


def assert_same(plain, spec) -> None:  # type: ignore[no-untyped-def]
    """Token for token, with logprobs, ranks and alternatives within fp32 tolerance."""
    for a, b in zip(plain, spec, strict=True):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.text == a.text
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4 and x.rank == y.rank
            assert (x.alternatives is None) == (y.alternatives is None)
            for s, t in zip(x.alternatives or [], y.alternatives or [], strict=True):
                assert s.id == t.id and abs(s.logprob - t.logprob) < 1e-4


def test_the_default_model_drafting_for_itself(llm, self_draft, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Identical outputs, and nearly every draft accepted: the draft model sees exactly the
    target's tokens (a cache that missed the token after the accepted drafts, or kept a
    rejected one, would propose from the wrong history and be rejected)."""
    p = SamplingParams(max_new_tokens=40, temperature=0, return_k_alternatives=5, details=True)
    prompts = chat(hf_tokenizer, ASKS)
    plain, spec = llm.generate(prompts, p), self_draft.generate(prompts, p)
    assert_same(plain, spec)
    drafter = self_draft.engine.drafter
    emitted = sum(len(o.token_ids) for o in spec)
    assert drafter.drafted >= emitted // 2, (drafter.drafted, emitted)
    assert drafter.accepted >= 0.9 * drafter.drafted, (drafter.drafted, drafter.accepted)
    assert drafter.num_states == 0  # every request finished: nothing kept


def test_prompts_caught_up_over_several_forwards(
    llm, self_draft, hf_tokenizer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Prompts longer than a catch-up forward's budget: each request's first draft comes from
    the forward that fed its last prompt token, which differs between requests of different
    lengths; the drafts stay the target's own (nearly all accepted, outputs unchanged)."""
    from truffula.speculative import draft_model

    monkeypatch.setattr(draft_model, "CATCH_UP_TOKENS", 24)
    p = SamplingParams(max_new_tokens=12, temperature=0, return_k_alternatives=2, details=True)
    prompts = chat(hf_tokenizer, ASKS)
    drafter = self_draft.engine.drafter
    d0, a0 = drafter.drafted, drafter.accepted
    spec = self_draft.generate(prompts, p)
    assert_same(llm.generate(prompts, p), spec)
    drafted, kept = drafter.drafted - d0, drafter.accepted - a0
    assert drafted > 0 and kept >= 0.9 * drafted, (drafted, kept)


def test_a_disagreeing_draft_in_a_mixed_batch_changes_nothing(shallow, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Drafted and plain requests, adapter requests (drafted from the base), a stop sequence
    and preemption (5 requests of ~100 tokens over a 192-token cache) in one batch: the same
    outputs as the same engine without speculation, and drafts both kept and rejected."""
    prompts = chat(hf_tokenizer, ASKS) + chat(hf_tokenizer, ASKS[:2])
    base = SamplingParams(
        max_new_tokens=48, temperature=0, ignore_eos=True, return_k_alternatives=3, details=True
    )
    params = [
        base,
        base.with_updates(adapter_id="all8"),
        base.with_updates(speculative=False),
        base.with_updates(adapter_id="qv4", stop=(" and",)),
        base.with_updates(stop=("bicycle",)),
    ]
    engine = shallow.engine
    preemptions = {"n": 0}
    original = engine.scheduler._preempt

    def counting(seq):  # type: ignore[no-untyped-def]
        preemptions["n"] += 1
        original(seq)

    drafter = engine.drafter
    d0, a0 = drafter.drafted, drafter.accepted
    engine.scheduler._preempt = counting
    try:
        spec = shallow.generate(prompts, params)
    finally:
        engine.scheduler._preempt = original
    drafted, kept = drafter.drafted - d0, drafter.accepted - a0
    plain = shallow.generate(prompts, [p.with_updates(speculative=False) for p in params])
    assert drafter.drafted - d0 == drafted  # the second run drafted nothing
    assert_same(plain, spec)
    assert preemptions["n"] > 0, "the cache was meant to force preemption"
    assert 0 < kept < drafted, (drafted, kept)
    assert "stop_sequence" in {spec[3].finish_reason, spec[4].finish_reason}
    assert drafter.num_states == 0 and engine.pool.num_used == 0


def test_sampled_tokens_keep_their_positions_statistics(shallow, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Seeded sampling (temperature 1: processed = the model's distribution) with greedy drafts
    from the draft model: every emitted token's logprob and rank are what a plain prefill of
    the same text gives at its position."""
    prompt = chat(hf_tokenizer, ASKS[1:2])[0]
    drafter = shallow.engine.drafter
    d0 = drafter.drafted
    (out,) = shallow.generate([prompt], SamplingParams(max_new_tokens=24, seed=5, details=True))
    assert drafter.drafted > d0
    (ref,) = shallow.generate(
        [out.prompt_token_ids + out.token_ids],
        SamplingParams(max_new_tokens=1, decoder_input_details=True, temperature=0),
    )
    n = len(out.prompt_token_ids)
    for i, tok in enumerate(out.tokens):
        want = ref.prompt_tokens[n + i]
        assert want.id == tok.id and abs(want.logprob - tok.logprob) < 1e-4, i


def test_abort_and_preemption_free_the_draft_state(shallow, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Stepping the engine by hand: the draft model holds state only of requests that
    speculate and were running when the step drafted (a preempted one's goes by the next
    step); an aborted request's state goes at once."""
    engine = shallow.engine
    model = engine.drafter.model
    p = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
    ids = [engine.add_request(q, p) for q in chat(hf_tokenizer, ASKS)]
    off = engine.add_request(chat(hf_tokenizer, ASKS[:1])[0], p.with_updates(speculative=False))
    seen: set[str] = set()
    held: set[str] = set()
    preempted = False
    for _ in range(80):
        seqs = [s for s in map(engine.scheduler.get, ids) if s is not None]
        waiting = {s.request_id for s in seqs if s.status.value != "running"}
        engine.step()
        held = set(model.seqs)
        seen |= held
        assert off not in held and not held & waiting, (held, waiting)
        preempted |= any(s.num_preemptions for s in seqs)
        if preempted and held:
            break
    assert preempted and held and len(seen) >= 2, (preempted, seen)
    victim = next(iter(held))
    engine.abort(victim)
    assert victim not in model.seqs
    for rid in [*ids, off]:
        engine.abort(rid)
    assert engine.drafter.num_states == 0 and model.cache.used_blocks == 0
    assert not engine.has_work()


def test_metrics_label_the_draft_model_method(self_draft) -> None:  # type: ignore[no-untyped-def]
    from truffula.engine.stats import EngineMetrics

    core = self_draft.engine
    text = EngineMetrics(core).render()
    d = core.drafter
    assert d.drafted >= d.accepted > 0  # the greedy test above drafted
    name = "truffula_spec_decode_num_accepted_tokens_total"
    assert f'{name}{{method="draft_model"}} {float(d.accepted)}' in text
    assert 'truffula_spec_decode_acceptance_rate{method="draft_model"}' in text


def test_a_draft_model_with_another_vocabulary_is_refused(llm, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Named by the flag at start-up (the drafter is built beside the target's runner)."""
    other = random_llama(model_dir, tmp_path / "other", vocab_size=1000)
    cfg = SpeculativeConfig.parse(spec_config(str(other), 2))
    with pytest.raises(ValueError, match="--speculative-config") as err:
        Drafter(cfg, llm.engine.max_len, llm.engine.runner)
    assert "1000" in str(err.value) and "49152" in str(err.value)


def test_a_rolled_back_cache_drafts_as_a_fresh_one(shallow, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """After drafts the target rejected, the draft model proposes what a fresh cache of the
    same history proposes: the rejected drafts' keys and values are overwritten. A draft kept
    and the next rejected; the first rejected and the history grown by several tokens since
    (drafting paused); drafts from inside the prompt; each beside another request."""
    model = shallow.engine.drafter.model
    vocab = shallow.engine.vocab_size
    prompt = hf_tokenizer(chat(hf_tokenizer, ASKS[:1])[0])["input_ids"]
    for i, known in enumerate([len(prompt), len(prompt), len(prompt) - 12]):
        head, rid = prompt[:known], f"r{i}"
        d = model.propose([(rid, head, 3), (f"o{i}", prompt[: 10 + i], 2)])[rid]
        assert len(d) == 3
        history = [
            [*head, d[0], (d[1] + 1) % vocab],
            [*head, (d[0] + 1) % vocab, 13, 30],
            prompt,
        ][i]
        assert history[known] != d[0] or i == 0
        got = model.propose([(rid, history, 3)])[rid]
        assert got == model.propose([("fresh", history, 3)])["fresh"], i
        model.retain(set())  # this engine's draft cache holds 11 blocks of 16 tokens
        assert not model.seqs and model.cache.used_blocks == 0


def test_a_draft_cache_the_device_cannot_grow_stops_growing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Out of memory while the draft model's cache grows (the target's cache took the device's
    share): the cache stays as it was, grows no more, and what it has free still serves."""
    from truffula.layers.attention import Attention
    from truffula.speculative import draft_cache
    from truffula.speculative.draft_cache import DraftCache, DraftSeq

    monkeypatch.setattr(draft_cache, "FIRST_BLOCKS", 4)
    layers = [Attention(4, 2, 8, 8**-0.5) for _ in range(2)]
    cache = DraftCache(layers, 4, 64, torch.device("cpu"), torch.float32)
    first = DraftSeq()
    assert cache.reserve(first, 8)  # 2 of the 3 usable blocks
    kept = [layer.k_cache for layer in layers]

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(draft_cache.torch, "zeros", full)
    second = DraftSeq()
    assert not cache.reserve(second, 16)  # 4 blocks: the cache would have to grow
    assert cache.num_blocks == cache.max_blocks == 4 and second.blocks == []
    assert all(layer.k_cache is k for layer, k in zip(layers, kept, strict=True))
    assert cache.reserve(second, 4)  # the block left still serves
    assert not cache.reserve(DraftSeq(), 4)  # and nothing grows past it
