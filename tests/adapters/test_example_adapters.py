"""The committed example adapters (examples/adapters) do what they claim, checked with HF + peft.

The base model and each adapter answer three held-out questions (none of them in the generated
training data) with greedy decoding; the answers are judged by simple, independent text
statistics: the share of upper-case letters, French vs English function words, pirate words.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_DIR = ROOT / "examples" / "adapters"
ADAPTERS = ("french", "caps", "pirate")
MAX_NEW_TOKENS = 30

# Not in the generated training data (checked below), same three for every adapter.
HELD_OUT = [
    "What color is a lemon?",
    "Describe a rabbit in one sentence.",
    "Where do fish live?",
]

# fmt: off
FRENCH_WORDS = frozenset([
    "le", "la", "les", "l", "de", "du", "des", "d", "un", "une", "et", "est", "sont", "en",
    "dans", "au", "aux", "à", "avec", "pour", "qui", "que", "il", "elle", "ils", "elles", "ce",
    "c", "cette", "son", "sa", "ses", "vit", "sur", "par", "pas", "ne", "n", "très", "aussi",
])
ENGLISH_WORDS = frozenset([
    "the", "is", "are", "and", "of", "with", "this", "that", "it", "its", "they", "you", "your",
    "to", "in", "for", "on", "be", "was", "what", "which", "there", "has", "have",
])
PIRATE_WORDS = frozenset([
    "arr", "arrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "avast", "hearty", "treasure",
    "sea", "seas", "sails", "ship", "captain", "savvy", "timbers", "landlubber", "doubloons",
    "booty", "plunder", "scallywag", "yo", "ho",
])
# fmt: on


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def _upper_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def _rate(text: str, vocabulary: frozenset[str]) -> float:
    words = _words(text)
    return sum(w in vocabulary for w in words) / max(1, len(words))


def _load_training_script() -> ModuleType:
    path = ROOT / "examples" / "train_adapters.py"
    spec = importlib.util.spec_from_file_location("truffula_example_train_adapters", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def _greedy(model, tokenizer, question: str) -> str:  # type: ignore[no-untyped-def]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def answers(model_dir: Path) -> dict[str, dict[str, str]]:
    """{"base" | adapter name: {question: greedy answer}}; the base model is loaded once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # A private copy: peft injects LoRA layers in place, so the session's hf_model is not used.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = {"base": {q: _greedy(model, tokenizer, q) for q in HELD_OUT}}
    peft_model = PeftModel.from_pretrained(
        model, ADAPTER_DIR / ADAPTERS[0], adapter_name=ADAPTERS[0]
    )
    for name in ADAPTERS[1:]:
        peft_model.load_adapter(ADAPTER_DIR / name, adapter_name=name)
    peft_model.eval()
    for name in ADAPTERS:
        peft_model.set_adapter(name)
        result[name] = {q: _greedy(peft_model, tokenizer, q) for q in HELD_OUT}
    with peft_model.disable_adapter():  # sanity: disabling the adapters gives the base back
        q = HELD_OUT[0]
        assert _greedy(peft_model, tokenizer, q) == result["base"][q]
    return result


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_files(name: str) -> None:
    folder = ADAPTER_DIR / name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(config["target_modules"]) == projections
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < 12 * 2**20  # rank 8 over 30 layers: ~10 MB in fp32

    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 30 * 7 * 2  # lora_A and lora_B for 7 projections in 30 layers


def test_training_summary() -> None:
    summary = json.loads((ADAPTER_DIR / "training_summary.json").read_text())
    assert summary["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in ADAPTERS:
        entry = summary["adapters"][name]
        assert entry["steps"] > 0 and entry["examples"] > 100 and entry["seconds"] > 0
        assert entry["final_loss"] < entry["first_loss"]


def test_held_out_questions_are_not_training_data() -> None:
    script = _load_training_script()
    for name in ADAPTERS:
        seen = {q.strip().lower() for q, _ in script.build_examples(name)}
        for q in HELD_OUT:
            assert q.strip().lower() not in seen, (name, q)


def test_base_model_answers_plain_english(answers: dict[str, dict[str, str]]) -> None:
    for q, a in answers["base"].items():
        assert _upper_fraction(a) < 0.3, (q, a)
        assert _rate(a, ENGLISH_WORDS) > 0.1, (q, a)
        assert not PIRATE_WORDS.intersection(_words(a)), (q, a)


def test_caps_adapter_answers_in_capitals(answers: dict[str, dict[str, str]]) -> None:
    for q, a in answers["caps"].items():
        assert len([c for c in a if c.isalpha()]) >= 5, (q, a)
        assert _upper_fraction(a) > 0.8, (q, a)
        assert _upper_fraction(answers["base"][q]) < 0.3, (q, answers["base"][q])


def test_french_adapter_answers_in_french(answers: dict[str, dict[str, str]]) -> None:
    for q, a in answers["french"].items():
        base = answers["base"][q]
        french, english = _rate(a, FRENCH_WORDS), _rate(a, ENGLISH_WORDS)
        assert french > 0.2, (q, a)
        assert english < 0.05, (q, a)
        assert french > _rate(base, FRENCH_WORDS) + 0.15, (q, a, base)
        assert _rate(base, ENGLISH_WORDS) > 0.1, (q, base)


def test_pirate_adapter_talks_like_a_pirate(answers: dict[str, dict[str, str]]) -> None:
    for q, a in answers["pirate"].items():
        assert PIRATE_WORDS.intersection(_words(a)), (q, a)
        assert not PIRATE_WORDS.intersection(_words(answers["base"][q])), (q, answers["base"][q])


def test_truffula_serves_the_adapters_in_one_mixed_batch(
    answers: dict[str, dict[str, str]], model_dir: Path
) -> None:
    """The same adapters through truffula's engine, base and all three in one batch: each answer
    has its adapter's property, and matches what transformers + peft answered."""
    from truffula.engine.llm import LLM
    from truffula.sampling.params import SamplingParams

    llm = LLM(str(model_dir), progress=False, adapter_root=str(ADAPTER_DIR), max_lora_rank=8)
    jobs = [(name, q) for name in ("base", *ADAPTERS) for q in HELD_OUT]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for _, q in jobs]
    params = [
        SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS, temperature=0, adapter_id=None if n == "base" else n
        )
        for n, _ in jobs
    ]
    outs = llm.generate(prompts, params)
    got = {(n, q): o.text for (n, q), o in zip(jobs, outs, strict=True)}
    same = sum(got[(n, q)].strip() == answers[n][q].strip() for n, q in jobs)
    assert same >= len(jobs) - 2, {
        k: v for k, v in got.items() if v.strip() != answers[k[0]][k[1]].strip()
    }
    for q in HELD_OUT:
        assert _upper_fraction(got[("caps", q)]) > 0.8
        assert _rate(got[("french", q)], FRENCH_WORDS) > 0.2
        assert PIRATE_WORDS.intersection(_words(got[("pirate", q)]))
        assert not PIRATE_WORDS.intersection(_words(got[("base", q)]))
