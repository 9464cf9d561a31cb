"""Multi-LoRA serving against peft's PeftModel on the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import LORA_SPECS as SPECS
from modelharness import Harness

from truffula.adapters.store import AdapterStore
from truffula.engine.llm import LLM
from truffula.errors import AdapterError
from truffula.forward import LoRABatch
from truffula.kernels.lora_torch import lora_apply, lora_reference
from truffula.layers.lora import apply_lora
from truffula.sampling.params import SamplingParams


@torch.no_grad()
def peft_logsoftmax(model, adapter: str | None, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = torch.tensor([ids])
    if adapter is None:
        with model.disable_adapter():
            return model(x).logits[0].float().log_softmax(-1)
    model.set_adapter(adapter)
    return model(x).logits[0].float().log_softmax(-1)


@pytest.fixture(scope="module")
def lora_llm(model_dir, peft_model):  # type: ignore[no-untyped-def]
    return LLM(
        str(model_dir),
        progress=False,
        adapter_root=str(peft_model.root),
        max_active_adapters=4,
        max_lora_rank=8,
    )


def test_kernel_strategies_match_the_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    slots, shards, rank, d_in, sizes = 5, 3, 4, 24, [16, 8, 8]
    a = torch.randn(slots, shards, rank, d_in, generator=gen)
    bts = [torch.randn(slots, rank, n, generator=gen) for n in sizes]
    offsets = [0, 16, 24]
    for t in (3, 50, 700):
        x = torch.randn(t, d_in, generator=gen)
        token_slots = torch.randint(-1, slots, (t,), generator=gen).tolist()
        batch = LoRABatch.build(token_slots, torch.device("cpu"))
        assert batch is not None
        y = torch.randn(t, 32, generator=gen)
        want = lora_reference(y, x, a, bts, offsets, torch.tensor(token_slots))
        for used in (tuple(batch.slots), tuple(s for s in batch.slots if s != 2)):
            got = lora_apply(y.clone(), x, a, bts, offsets, used, batch)
            if used == tuple(batch.slots):
                assert torch.allclose(got, want, atol=1e-4), t
    assert LoRABatch.build([-1, -1], torch.device("cpu")) is None


@pytest.mark.parametrize("adapter", list(SPECS))
def test_logits_match_peft(model_dir, peft_model, adapter: str) -> None:
    h = Harness(model_dir, block_size=16, num_blocks=32)
    layers = apply_lora(h.runner.model, 2, 8, torch.float32, torch.device("cpu"))
    store = AdapterStore(layers, h.runner.model.packed_modules, 2, 8, str(peft_model.root))
    slot = store.acquire(store.load(adapter))
    ids = [1, 4093, 198, 6004, 10, 2, 198, 1, 520, 9531, 198, 504, 3458, 282, 4649, 314, 1535, 30]
    ref = peft_logsoftmax(peft_model, adapter, ids)
    base_ref = peft_logsoftmax(peft_model, None, ids)
    got = [h.step({"x": ids[:11], "b": ids[:7]}, {"x": slot})["x"]]  # a base sequence beside it
    for t in ids[11:]:
        got.append(h.step({"x": [t]}, {"x": slot})["x"])
    got_t = torch.cat(got)
    assert (got_t - ref).abs().max().item() <= 1e-4
    assert (got_t - base_ref).abs().max().item() > 1e-2  # the adapter changes the distribution
    base = h.step({"b": ids[7:]})["b"]
    assert (base - base_ref[7:]).abs().max().item() <= 1e-4


def test_request_logprobs_match_peft(lora_llm, peft_model) -> None:  # type: ignore[no-untyped-def]
    prompt = "The weather today is"
    p = SamplingParams(
        max_new_tokens=8,
        temperature=0,
        return_k_alternatives=5,
        decoder_input_details=True,
        adapter_id="all8",
    )
    (out,) = lora_llm.generate([prompt], p)
    ids = out.prompt_token_ids + out.token_ids
    ref = peft_logsoftmax(peft_model, "all8", ids)
    n = len(out.prompt_token_ids)
    assert out.token_ids == ref[n - 1 : -1].argmax(-1).tolist()
    for i, t in enumerate(out.tokens):
        assert abs(t.logprob - ref[n - 1 + i, t.id].item()) <= 1e-4
        assert [a.id for a in t.alternatives] == ref[n - 1 + i].topk(5).indices.tolist()
    for pos in range(1, n):
        assert abs(out.prompt_tokens[pos].logprob - ref[pos - 1, ids[pos]].item()) <= 1e-4


def test_heterogeneous_batch_equals_each_alone(lora_llm) -> None:  # type: ignore[no-untyped-def]
    prompts = ["Tell me about the sea.", "def square(x):", "The best fruit is", "Once upon a time"]
    adapters = [None, "qv4", "all8", "mlp6rs"]
    params = [
        SamplingParams(max_new_tokens=10, temperature=0, return_k_alternatives=5, adapter_id=a)
        for a in adapters
    ]
    batch = lora_llm.generate(prompts * 2, params + params[::-1])
    alone = [
        lora_llm.generate([p], q)[0]
        for p, q in zip(prompts * 2, params + params[::-1], strict=True)
    ]
    for got, ref in zip(batch, alone, strict=True):
        assert got.token_ids == ref.token_ids
        for x, y in zip(got.tokens, ref.tokens, strict=True):
            assert abs(x.logprob - y.logprob) <= 1e-4
            assert [a.id for a in x.alternatives] == [a.id for a in y.alternatives]
    outs = {a: o.token_ids for a, o in zip(adapters, batch, strict=False)}
    assert len({tuple(v) for v in outs.values()}) > 1


def test_lru_eviction_and_pinning(model_dir, peft_model) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(
        str(model_dir),
        progress=False,
        adapter_root=str(peft_model.root),
        max_active_adapters=2,
        max_lora_rank=8,
    )
    store = llm.engine.adapters
    evictions = []
    store.on_evict = lambda: evictions.append(1)
    p = {a: SamplingParams(max_new_tokens=4, temperature=0, adapter_id=a) for a in SPECS}
    ref = {
        a: llm.generate(["Hi there"], p[a])[0].token_ids for a in SPECS
    }  # three adapters, two slots
    assert len(evictions) >= 1 and store.num_active == 2
    # three requests at once on two slots: the third waits for a slot, nothing is evicted while pinned
    outs = llm.generate(["Hi there"] * 3, [p[a] for a in SPECS])
    assert [o.token_ids for o in outs] == [ref[a] for a in SPECS]
    assert all(pins == 0 for pins in store.pins) and not store.users


def test_merged_adapters(lora_llm, peft_model) -> None:  # type: ignore[no-untyped-def]
    from truffula.adapters.merge import MergeSpec

    store = lora_llm.engine.adapters
    solo = MergeSpec.parse(["qv4"], [1.0], "linear", None, None)
    key = store.load_merged(solo, None)
    p = SamplingParams(max_new_tokens=8, temperature=0, details=True)
    (a,) = lora_llm.generate(["The sky is"], p.with_updates(adapter_id="qv4"))
    (b,) = lora_llm.generate(["The sky is"], p.with_updates(adapter_id=key))
    assert a.token_ids == b.token_ids and all(
        abs(x.logprob - y.logprob) < 1e-5 for x, y in zip(a.tokens, b.tokens, strict=True)
    )
    # linear merge of two same-rank adapters = peft adapter with the weighted sums of A and of B
    with pytest.raises(ValueError, match="different ranks"):
        store.load_merged(MergeSpec.parse(["qv4", "all8"], [0.5, 0.5], "linear", None, None), None)
    for strategy, density in (("ties", 0.5), ("dare_linear", 0.7), ("dare_ties", 0.7)):
        spec = MergeSpec.parse(["all8", "all8"], [0.6, 0.4], strategy, density, "frequency")
        k1 = store.load_merged(spec, None)
        assert store.load_merged(spec, None) == k1  # cached by its specification
        (o1,) = lora_llm.generate(["The sky is"], p.with_updates(adapter_id=k1))
        assert o1.token_ids


@pytest.mark.parametrize(
    ("ids", "strategy", "density", "sign", "needle"),
    [
        ([], None, None, None, "at least one adapter ID"),
        (["a", "b"], None, None, None, None),
        (["a"], "mean", None, None, "merge_strategy"),
        (["a"], "ties", 0.0, None, "density"),
        (["a"], "ties", 1.5, None, "density"),
        (["a"], "ties", 0.5, "max", "majority_sign_method"),
    ],
)
def test_merge_validation_messages(ids, strategy, density, sign, needle) -> None:  # type: ignore[no-untyped-def]
    from truffula.adapters.merge import MergeSpec
    from truffula.errors import RequestValidationError

    if needle is None:
        with pytest.raises(RequestValidationError, match="number of adapter IDs must match"):
            MergeSpec.parse(ids, [1.0], strategy, density, sign)
        return
    with pytest.raises(RequestValidationError, match=needle):
        MergeSpec.parse(ids, None, strategy, density, sign)


def test_bad_adapters_are_clear_errors(lora_llm, peft_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = lora_llm.engine.adapters
    root = Path(peft_model.root)

    def expect(adapter_id: str, status: int, needle: str, source: str | None = None) -> None:
        with pytest.raises(AdapterError) as err:
            store.load(adapter_id, source)
        assert err.value.status == status and needle in str(err.value), str(err.value)

    expect("nope", 404, "not found")
    expect("../outside", 403, "outside")
    expect("/etc", 403, "outside")
    os.symlink(tmp_path, root / "escape")
    expect("escape", 403, "outside")
    expect("nobody/missing-adapter", 404, "Hugging Face cache")
    expect("qv4", 422, "not supported", source="s3")
    bad = root / "badjson"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    expect("badjson", 422, "not valid JSON")
    for name, change, needle in (
        ("dora", {"use_dora": True}, "DoRA"),
        ("prefix", {"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING"),
    ):
        d = root / name
        d.mkdir()
        cfg = json.loads((root / "qv4" / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        expect(name, 422, needle)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((root / "qv4" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage")
    expect("corrupt", 422, "cannot be read")
    # a shape mismatch: an adapter for another base model (hidden size 64)
    from safetensors.torch import save_file

    wrong = root / "wrongbase"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((root / "qv4" / "adapter_config.json").read_text())
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        },
        str(wrong / "adapter_model.safetensors"),
    )
    expect("wrongbase", 422, "does not fit the base model")
    # none of this disturbed serving
    (out,) = lora_llm.generate(
        ["Hi"], SamplingParams(max_new_tokens=3, temperature=0, adapter_id="qv4")
    )
    assert len(out.token_ids) == 3


@pytest.mark.parametrize(
    "slots", [[0, 3, -1, 2, 2, 1, 3, -1, 0], [1, 1, 2, 3], [2] * 40 + [0] * 3], ids=str
)
def test_gathered_cpu_strategy_matches_the_loop(slots: list[int]) -> None:
    """The CPU path (embedding-bag gathers over the factor rows ``set_slot`` lays out): base
    tokens mixed in or not, one adapter or several, a slot holding an adapter of lower rank
    and another cleared after use."""
    from truffula.forward import AttentionMetadata, ForwardContext, forward_context
    from truffula.layers.linear import MergedLinear
    from truffula.layers.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    base = MergedLinear(48, {"q": 32, "k": 16, "v": 16})
    base.weight.data = torch.randn(64, 48, generator=g)
    lora = LoRALinear(base, 4, 8, torch.float32, torch.device("cpu"))
    for slot in range(4):
        rank = 8 if slot != 1 else 4
        lora.set_slot(
            slot,
            {
                s: (torch.randn(rank, 48, generator=g), torch.randn(n, rank, generator=g))
                for s, n in (("q", 32), ("k", 16), ("v", 16))
                if slot != 3 or s != "k"
            },
        )
    lora.set_slot(0, None)  # cleared: contributes nothing
    lora.set_slot(0, {"v": (torch.randn(8, 48, generator=g), torch.randn(16, 8, generator=g))})
    x = torch.randn(len(slots), 48, generator=g)
    batch = LoRABatch.build(slots, torch.device("cpu"))
    meta = AttentionMetadata(
        torch.zeros(1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(2), 0, 1, 1, 16
    )
    with forward_context(ForwardContext(meta, batch)):
        got = lora(x)
    assert lora.rows is not None  # the gathered strategy ran
    want = lora_reference(base(x), x, lora.a, lora.bts, lora.offsets, torch.tensor(slots))
    assert torch.allclose(got, want, atol=1e-4)
