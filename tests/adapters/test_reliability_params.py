"""Reliability of the parameter and adapter layers: every malformed number, merge or adapter is a
typed error naming what is wrong before anything reaches the engine's tensors; one adapter
reached through many spellings is stored once; host copies are bounded."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from truffula.adapters.merge import MergeSpec
from truffula.adapters.store import AdapterStore
from truffula.config import LimitsConfig, LoRAConfig
from truffula.errors import AdapterError, RequestValidationError
from truffula.sampling.params import MIN_TEMPERATURE, SamplingParams

# ---------------------------------------------------------------------- sampling parameters

BAD_PARAMS = [
    # integers: range, int64 overflow, booleans and floats are not integers
    ({"top_k": 2**63}, "top_k"),  # 9223372036854775808: overflowed int64 inside the step
    ({"top_k": 2**64 + 5}, "top_k"),
    ({"top_k": LimitsConfig().max_top_k + 1}, "top_k"),
    ({"top_k": 10**5000}, "top_k"),  # too long for str(): the message must still be built
    ({"top_k": True}, "top_k"),
    ({"top_k": 5.0}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 2**31}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"truncate": 2**31}, "truncate"),
    ({"truncate": "5"}, "truncate"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"return_k_alternatives": True}, "return_k_alternatives"),
    ({"return_k_alternatives": 21}, "return_k_alternatives"),
    ({"prompt_k_alternatives": 2**63}, "prompt_k_alternatives"),
    # reals: NaN / inf anywhere, ranges that make logits inf or NaN
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1e300}, "temperature"),
    ({"temperature": 10**400}, "temperature"),  # an int too large for a float
    ({"temperature": -1e-300}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"repetition_penalty": 1e-45}, "repetition_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": -1e300}, "frequency_penalty"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"typical_p": 1.0000001}, "typical_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"min_p": -1e-9}, "min_p"),
    # stop sequences: count, length, type, valid text
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
    ({"stop": ("x" * 1001,)}, "stop"),
    ({"stop": ("",)}, "stop"),
    ({"stop": (5,)}, "stop"),
    ({"stop": "abc"}, "stop"),  # a string is not a list of strings
    ({"stop": ("\ud800",)}, "stop"),
    # booleans are booleans
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"details": "yes"}, "details"),
    ({"skip_special_tokens": None}, "skip_special_tokens"),
    ({"decoder_input_details": 0}, "decoder_input_details"),
    # the rest
    ({"logprobs_mode": ["raw"]}, "logprobs_mode"),
    ({"adapter_id": 5}, "adapter_id"),
    ({"extra_stop_token_ids": (-1,)}, "extra_stop_token_ids"),
    ({"extra_stop_token_ids": (True,)}, "extra_stop_token_ids"),
]


def case_id(value: object) -> str:
    try:
        return str(value)[:40]
    except ValueError:  # an int of more than 4300 digits
        return "huge"


@pytest.mark.parametrize(("change", "field"), BAD_PARAMS, ids=case_id)
def test_bad_parameter_is_a_validation_error_naming_its_field(change, field) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(**change)
    with pytest.raises(RequestValidationError) as err:
        params.validate(LimitsConfig())
    assert err.value.field == field
    assert f"`{field}`" in str(err.value)
    assert len(str(err.value)) < 300  # never the whole value echoed back


@pytest.mark.parametrize(
    "change",
    [
        {"top_k": LimitsConfig().max_top_k},  # beyond the vocabulary: keeps every token
        {"seed": 2**64 - 1},
        {"temperature": 100.0},
        {"temperature": 0},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 100},
        {"frequency_penalty": -2, "presence_penalty": 2},
        {"stop": ("x" * 1000, "y", "z", "w")},
        {"max_new_tokens": 2**31 - 1, "truncate": 2**31 - 1},
        {"min_p": 1.0, "top_p": 1e-300, "typical_p": 1e-300},
    ],
    ids=str,
)
def test_values_at_the_bounds_are_accepted(change) -> None:  # type: ignore[no-untyped-def]
    SamplingParams(**change).validate(LimitsConfig())


def test_limits_config_bounds_stop_length_and_top_k() -> None:
    limits = LimitsConfig(max_stop_length=3, max_top_k=100)
    SamplingParams(stop=("abc",), top_k=100).validate(limits)
    for change, field in (({"stop": ("abcd",)}, "stop"), ({"top_k": 101}, "top_k")):
        with pytest.raises(RequestValidationError) as err:
            SamplingParams(**change).validate(limits)
        assert err.value.field == field
    with pytest.raises(ValueError, match="max_top_k"):
        LimitsConfig(max_top_k=2**63)


@pytest.mark.parametrize("tiny", [1e-300, 5e-324, 1e-45, 0.009999])
def test_tiny_temperatures_are_raised_to_the_minimum(tiny: float) -> None:
    p = SamplingParams(temperature=tiny)
    assert p.temperature == MIN_TEMPERATURE and not p.greedy
    p.validate(LimitsConfig())
    assert p.with_updates(top_k=3).temperature == MIN_TEMPERATURE
    assert SamplingParams(temperature=0.0).greedy  # 0 stays greedy


def test_tiny_temperature_serves_finite_probabilities(llm) -> None:  # type: ignore[no-untyped-def]
    """Temperature 1e-300 once returned every logprob as -inf/NaN (-9999.0 on the wire)."""
    base = SamplingParams(max_new_tokens=4, details=True, return_k_alternatives=3, seed=7)
    (greedy,) = llm.generate(["The capital of France is"], base.with_updates(temperature=0))
    (tiny,) = llm.generate(["The capital of France is"], base.with_updates(temperature=1e-300))
    assert tiny.token_ids == greedy.token_ids  # T = 0.01 still picks the argmax here
    for tok in tiny.tokens:
        assert tok.logprob is not None and math.isfinite(tok.logprob) and tok.logprob > -1e-3
        assert tok.rank == 1 and tok.entropy is not None and math.isfinite(tok.entropy)
        assert tok.alternatives is not None and len(tok.alternatives) == 3
        assert all(not math.isnan(a.logprob) for a in tok.alternatives)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"top_k": 2**63}, "top_k"), ({"repetition_penalty": 1e-45}, "repetition_penalty")],
)
def test_engine_refuses_before_the_step(llm, change, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestValidationError) as err:
        llm.generate(["Hello"], SamplingParams(max_new_tokens=2, **change))
    assert err.value.field == field
    (out,) = llm.generate(["Hello"], SamplingParams(max_new_tokens=2, temperature=0))
    assert len(out.token_ids) == 2


# ---------------------------------------------------------------------- merges

IDS = ["a", "b"]
BAD_MERGES = [
    ({"ids": [f"a{i}" for i in range(17)]}, "merged_adapters", "at most 16"),
    ({"ids": "ab"}, "merged_adapters", "list"),
    ({"ids": [5]}, "merged_adapters", "non-empty string"),
    ({"ids": ["x" * 257]}, "merged_adapters", "at most 256"),
    ({"ids": ["a\x00"]}, "merged_adapters", "control"),
    ({"ids": ['merge:[["a"], [1.0], "linear", 0.0, "total"]']}, "merged_adapters", "merged"),
    ({"weights": [float("nan"), 1.0]}, "merged_adapters", "finite"),
    ({"weights": [1e300, 1.0]}, "merged_adapters", "must be in"),
    ({"weights": [float("inf"), 1.0]}, "merged_adapters", "finite"),
    ({"weights": [10**400, 1.0]}, "merged_adapters", "finite"),
    ({"weights": [-101, 1.0]}, "merged_adapters", "must be in"),
    ({"weights": [True, 1.0]}, "merged_adapters", "number"),
    ({"weights": ["1", 1.0]}, "merged_adapters", "number"),
    ({"weights": 1.0}, "merged_adapters", "list"),
    ({"strategy": "ties", "density": float("nan")}, "density", "finite"),
    ({"strategy": "ties", "density": 1.5}, "density", "<= 1.0"),
    ({"strategy": "ties", "density": -0.1}, "density", ">= 0.0"),
    ({"strategy": "dare_linear", "density": 1e-300}, "density", "> 0"),
    ({"strategy": "ties", "density": True}, "density", "number"),
    ({"strategy": 5}, "merge_strategy", "merge_strategy"),
    ({"sign": ["total"]}, "majority_sign_method", "majority_sign_method"),
]


@pytest.mark.parametrize(("change", "field", "needle"), BAD_MERGES, ids=case_id)
def test_bad_merge_is_a_validation_error(change, field, needle) -> None:  # type: ignore[no-untyped-def]
    kw = {"ids": IDS, "weights": None, "strategy": None, "density": None, "sign": None, **change}
    with pytest.raises(RequestValidationError) as err:
        MergeSpec.parse(**kw)
    assert err.value.field == field and needle in str(err.value), str(err.value)


def test_merge_bounds_accept_the_limits() -> None:
    spec = MergeSpec.parse([f"a{i}" for i in range(16)], [-100.0] + [100] * 15, None, None, None)
    assert len(spec.ids) == 16 and spec.weights[1] == 100.0
    # linear ignores density: one key (one host copy) whatever density says
    one = MergeSpec.parse(IDS, [0.5, 0.5], "linear", 0.3, None)
    assert one.key == MergeSpec.parse(IDS, [0.5, 0.5], None, None, None).key
    assert MergeSpec.from_key(one.key) == one
    with pytest.raises(RequestValidationError, match="at most 2"):
        MergeSpec.parse(["a", "b", "c"], None, None, None, None, max_ids=2)


# ---------------------------------------------------------------------- adapters on disk

TARGET = "model.layers.0.self_attn.o_proj"
PREFIX = f"base_model.model.{TARGET}"


@pytest.fixture(scope="module")
def lora_layers(llm):  # type: ignore[no-untyped-def]
    """The LoRA-wrapped layers of the session's model (host-side tests only: no slot is used)."""
    store = llm.engine.adapters
    return store.layers, store.packed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    r.mkdir()
    return r


@pytest.fixture
def store(lora_layers, root: Path) -> AdapterStore:  # type: ignore[no-untyped-def]
    layers, packed = lora_layers
    return AdapterStore(layers, packed, 2, 8, str(root))


def dims(store: AdapterStore) -> tuple[int, int]:
    lin = store.targets[TARGET]
    return lin.in_features, lin.out_features


def make_adapter(
    store: AdapterStore,
    folder: Path,
    config: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    r: int = 2,
    value: float = 0.01,
) -> Path:
    """A tiny PEFT adapter (LoRA of rank ``r`` on layer 0's o_proj)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["o_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    n_in, n_out = dims(store)
    if tensors is None:
        gen = torch.Generator().manual_seed(len(folder.name))
        tensors = {
            f"{PREFIX}.lora_A.weight": torch.randn(r, n_in, generator=gen) * value,
            f"{PREFIX}.lora_B.weight": torch.randn(n_out, r, generator=gen) * value,
        }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def expect(store: AdapterStore, adapter_id: str, status: int, needle: str) -> None:
    with pytest.raises(AdapterError) as err:
        store.load(adapter_id)
    assert err.value.status == status and needle in str(err.value), str(err.value)


def test_a_good_tiny_adapter_loads(store, root) -> None:  # type: ignore[no-untyped-def]
    make_adapter(store, root / "good")
    assert store.load("good") == "good"
    a, b = store.host["good"].modules[TARGET][None]
    n_in, n_out = dims(store)
    assert a.shape == (2, n_in) and b.shape == (n_out, 2)


BAD_CONFIGS = [
    ({"r": None}, "`r`"),
    ({"r": [8]}, "`r`"),
    ({"r": 0}, "`r`"),
    ({"r": True}, "`r`"),
    ({"r": "2"}, "`r`"),
    ({"lora_alpha": float("nan")}, "`lora_alpha`"),
    ({"lora_alpha": float("inf")}, "`lora_alpha`"),
    ({"lora_alpha": -4}, "`lora_alpha`"),
    ({"lora_alpha": 0}, "`lora_alpha`"),
    ({"lora_alpha": None}, "`lora_alpha`"),
    ({"rank_pattern": {"o_proj": None}}, "`rank_pattern.o_proj`"),
    ({"rank_pattern": [2]}, "`rank_pattern`"),
    ({"alpha_pattern": {"o_proj": float("nan")}}, "`alpha_pattern.o_proj`"),
    ({"use_rslora": "yes"}, "`use_rslora`"),
]


@pytest.mark.parametrize(("config", "needle"), BAD_CONFIGS, ids=case_id)
def test_bad_adapter_config_is_a_422(store, root, config, needle) -> None:  # type: ignore[no-untyped-def]
    make_adapter(store, root / "bad", config)
    expect(store, "bad", 422, needle)
    assert not store.host


def test_huge_config_value_and_file(store, root) -> None:  # type: ignore[no-untyped-def]
    folder = make_adapter(store, root / "inf")
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 1e400}'
    )
    expect(store, "inf", 422, "`lora_alpha`")
    (folder / "adapter_config.json").write_text('{"r": 2, "pad": "' + "x" * (1 << 20) + '"}')
    expect(store, "inf", 422, "larger than")


def bad_tensors(store: AdapterStore) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    n_in, n_out = dims(store)
    a, b = torch.full((2, n_in), 0.01), torch.full((n_out, 2), 0.01)
    nan_a, inf_b = a.clone(), b.clone()
    nan_a[1, 7] = float("nan")
    inf_b[3, 0] = float("inf")
    A, B = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"
    return [
        ("nan", {A: nan_a, B: b}, "NaN or infinite"),
        ("inf", {A: a, B: inf_b}, "NaN or infinite"),
        ("rank0", {A: torch.zeros(0, n_in), B: torch.zeros(n_out, 0)}, "rank 0"),
        ("scalar", {A: torch.tensor(1.0), B: torch.tensor(1.0)}, "2-D"),
        ("vector", {A: torch.ones(n_in), B: b}, "2-D"),
        ("ints", {A: torch.ones(2, n_in, dtype=torch.int32), B: b}, "floating-point"),
        ("rank_mismatch", {A: a, B: torch.zeros(n_out, 3)}, "rank"),
        ("config_rank", {A: torch.zeros(4, n_in), B: torch.zeros(n_out, 4)}, "config says 2"),
        ("in_features", {A: torch.zeros(2, n_in + 1), B: b}, "does not fit the base model"),
        ("out_features", {A: a, B: torch.zeros(n_out - 1, 2)}, "does not fit the base model"),
        ("lonely", {A: a}, "lacks lora_B"),
        ("stranger", {A: a, B: b, "model.norm.weight": torch.ones(n_in)}, "unexpected tensor"),
    ]


def test_bad_adapter_tensors_are_422_naming_the_problem(store, root) -> None:  # type: ignore[no-untyped-def]
    for name, tensors, needle in bad_tensors(store):
        make_adapter(store, root / name, tensors=tensors)
        expect(store, name, 422, needle)
    n_in, _ = dims(store)
    nan = torch.full((2, n_in), float("nan"))
    make_adapter(store, root / "nan_named", tensors={f"{PREFIX}.lora_A.weight": nan})
    with pytest.raises(AdapterError) as err:
        store.load("nan_named")
    assert "adapter_model.safetensors" in str(err.value) and "lora_A" in str(err.value)
    # finite factors whose scale lora_alpha / r overflows float32
    make_adapter(store, root / "overflow", {"r": 1, "lora_alpha": 3e38}, r=1, value=10.0)
    expect(store, "overflow", 422, "lora_alpha")
    assert not store.host


def test_bin_that_is_not_a_state_dict(store, root) -> None:  # type: ignore[no-untyped-def]
    folder = root / "pickle"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    torch.save({"x": [1, 2, 3]}, str(folder / "adapter_model.bin"))
    expect(store, "pickle", 422, "state dict")


@pytest.mark.parametrize(
    ("adapter_id", "needle"),
    [
        ("x" * 300, "at most 256"),  # once ENAMETOOLONG and a 500
        ("é" * 200, "not a usable path"),  # 200 characters, 400 bytes: a name too long
        ("a\nb", "control characters"),
        ("a\x00", "control characters"),
        ("\ud800", "lone surrogates"),
        ("", "non-empty"),
    ],
    ids=["long", "long-bytes", "newline", "nul", "surrogate", "empty"],
)
def test_bad_adapter_ids_are_422(store, adapter_id, needle) -> None:  # type: ignore[no-untyped-def]
    expect(store, adapter_id, 422, needle)
    with pytest.raises(AdapterError) as err:
        store.unload(adapter_id)
    assert err.value.status == 404


def test_symlinked_files_must_stay_inside_the_root(store, root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = make_adapter(store, tmp_path / "elsewhere" / "src")
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    good = make_adapter(store, root / "good")

    cfg_out = root / "cfg_out"
    cfg_out.mkdir()
    os.symlink(secret, cfg_out / "adapter_config.json")
    os.symlink(good / "adapter_model.safetensors", cfg_out / "adapter_model.safetensors")
    expect(store, "cfg_out", 403, "outside the adapter root")

    st_out = root / "st_out"
    st_out.mkdir()
    (st_out / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", st_out / "adapter_model.safetensors")
    expect(store, "st_out", 403, "outside the adapter root")

    bin_out = root / "bin_out"
    bin_out.mkdir()
    (bin_out / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", bin_out / "adapter_model.bin")
    expect(store, "bin_out", 403, "outside the adapter root")

    loop = root / "loop"
    loop.mkdir()
    os.symlink(loop / "adapter_config.json", loop / "adapter_config.json")
    expect(store, "loop", 422, "adapter_config.json")

    not_file = root / "not_file"
    not_file.mkdir()
    os.symlink(good, not_file / "adapter_config.json")  # a folder inside the root
    expect(store, "not_file", 422, "not a regular file")

    # symlinks that stay inside the root are fine
    shared = root / "shared"
    shared.mkdir()
    os.symlink(good / "adapter_config.json", shared / "adapter_config.json")
    os.symlink(good / "adapter_model.safetensors", shared / "adapter_model.safetensors")
    assert store.load("shared") == "shared"
    assert set(store.host) == {"shared"}


# ---------------------------------------------------------------------- canonical keys, LRU


def test_one_adapter_under_many_spellings_is_stored_once(store, root) -> None:  # type: ignore[no-untyped-def]
    make_adapter(store, root / "french")
    (root / "sub").mkdir()
    os.symlink(root / "french", root / "fr")  # a symlink inside the root: the same adapter
    spellings = ["french", "french/.", "french/./.", "./french", "sub/../french", "fr", "fr/"]
    assert {store.key_of(s) for s in spellings} == {"french"}
    assert not store.host  # key_of reads nothing
    assert {store.load(s) for s in spellings} == {"french"}
    assert list(store.host) == ["french"] and store.loaded_ids() == ["french"]
    w = store.host["french"]
    assert w.adapter_id == "french"
    # merges are keyed by their adapters' keys
    k1 = store.load_merged(MergeSpec.parse(["./french", "fr"], [0.5, 0.5], None, None, None))
    k2 = store.load_merged(MergeSpec.parse(["french/.", "french"], [0.5, 0.5], None, None, None))
    assert k1 == k2 and json.loads(k1.removeprefix("merge:"))[0] == ["french", "french"]
    assert len(store.host) == 2 and store.loaded_ids() == ["french"]
    assert store.host["french"] is w  # the merge read nothing again
    # a merge key is itself loadable (the engine may be handed one after a drop)
    store.unload(k1)
    assert store.load(k1) == k1
    # any spelling unloads it
    store.unload("./french")
    assert "french" not in store.host
    with pytest.raises(AdapterError) as err:
        store.unload("french")
    assert err.value.status == 404


def test_host_copies_are_bounded_lru_sparing_those_in_use(lora_layers, root) -> None:  # type: ignore[no-untyped-def]
    layers, packed = lora_layers
    store = AdapterStore(layers, packed, 2, 8, str(root), max_cpu_adapters=2)
    store.HOST_GRACE_S = 0.0
    for name in "abcde":
        make_adapter(store, root / name)
    store.load("a")
    store.load("b")
    store.load("c")
    assert list(store.host) == ["b", "c"]  # a, least recently used, dropped
    store.load("b")  # b becomes the most recent
    store.load("d")
    assert list(store.host) == ["b", "d"]
    store.add_user("b")  # a request holds b: never dropped
    store.load("e")
    store.load("a")
    assert "b" in store.host and len(store.host) == 2 and list(store.host)[-1] == "a"
    with pytest.raises(AdapterError) as err:
        store.unload("b")
    assert err.value.status == 409
    store.remove_user("b")
    # an adapter dropped between its load and its request's arrival is read again
    assert "d" not in store.host
    store.add_user("d")
    assert "d" in store.host and store.users["d"] == 1
    store.remove_user("d")
    assert not store.users and store.host_evictions >= 4
    # merges count against the same bound
    store.load_merged(MergeSpec.parse(["a", "d"], None, None, None, None))
    assert len(store.host) == 2


def test_recently_used_copies_are_spared_up_to_twice_the_bound(lora_layers, root) -> None:  # type: ignore[no-untyped-def]
    layers, packed = lora_layers
    store = AdapterStore(layers, packed, 2, 8, str(root), max_cpu_adapters=2)
    assert store.HOST_GRACE_S >= 1
    for name in "abcdef":
        make_adapter(store, root / name)
        store.load(name)
    assert list(store.host) == ["c", "d", "e", "f"]  # 2 x the bound, the newest kept
    assert LoRAConfig().max_cpu_adapters == 64 and LoRAConfig().max_merged_adapters == 16
    with pytest.raises(ValueError, match="max_cpu_adapters"):
        LoRAConfig(max_cpu_adapters=0)


def test_merge_bounds_in_the_store(lora_layers, root) -> None:  # type: ignore[no-untyped-def]
    layers, packed = lora_layers
    store = AdapterStore(layers, packed, 2, 8, str(root), max_merged_adapters=2)
    make_adapter(store, root / "big", {"r": 2, "lora_alpha": 2}, value=1.0)
    # factors near float32's largest: a merge with weights 100 overflows and is refused
    n_in, n_out = dims(store)
    huge = {
        f"{PREFIX}.lora_A.weight": torch.full((2, n_in), 3e36),
        f"{PREFIX}.lora_B.weight": torch.full((n_out, 2), 1.0),
    }
    make_adapter(store, root / "huge", {"r": 2, "lora_alpha": 2}, tensors=huge)
    store.load("huge")  # finite on its own
    with pytest.raises(RequestValidationError, match="non-finite") as err:
        store.load_merged(MergeSpec.parse(["huge", "huge"], [100, 100], None, None, None))
    assert err.value.field == "merged_adapters"
    with pytest.raises(RequestValidationError, match="at most 2"):
        store.load_merged(MergeSpec.parse(["big", "big", "big"], None, None, None, None))
    key = store.load_merged(MergeSpec.parse(["big", "big"], [0.5, -0.25], None, None, None))
    a, b = store.host[key].modules[TARGET][None]
    a0, b0 = store.host["big"].modules[TARGET][None]
    assert torch.allclose(a, 0.25 * a0) and torch.allclose(b, 0.25 * b0)
