"""Structured output on the default model: outputs parse and validate, probabilities under the
constraint match references computed here (HF transformers in fp32, the mask read from
llguidance directly), free requests in a mixed batch are untouched, and bad input is a 422
naming its field."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import torch
from helpers import hf_logsoftmax

from truffula.engine.llm import LLM, Completion
from truffula.sampling.params import SamplingParams
from truffula.structured.compiler import grammar_text
from truffula.structured.spec import StructuredOutput

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-4

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 10},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["color", "tags"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -10, "maximum": 10},
                    "y": {"type": "integer", "minimum": -10, "maximum": 10},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
]
REGEXES = [r"\d{3}-\d{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}"]


@pytest.fixture(scope="module")
def sllm(model_dir):  # type: ignore[no-untyped-def]
    """Asynchronous scheduling (a constrained step waits for its previous token) and the example
    adapters."""
    return LLM(
        str(model_dir),
        progress=False,
        max_k_alternatives=20,
        async_scheduling="on",
        adapter_root=str(ROOT / "examples" / "adapters"),
    )


def chat(llm: LLM, question: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def json_spec(schema: dict[str, Any]) -> StructuredOutput:
    return StructuredOutput("json", json.dumps(schema))


def check_valid(out: Completion, spec: StructuredOutput, schema: Any = None) -> None:
    assert out.finish_reason == "eos_token", (out.text, out.finish_reason)
    if spec.kind == "json":
        jsonschema.validate(json.loads(out.text), schema)
    elif spec.kind == "regex":
        assert re.fullmatch(spec.value, out.text), out.text
    else:
        assert out.text in json.loads(spec.value)


@pytest.mark.parametrize("adapter", [None, "pirate"])
def test_outputs_validate_greedy_and_sampled(sllm, adapter) -> None:  # type: ignore[no-untyped-def]
    cases = [(json_spec(s), s) for s in SCHEMAS] + [
        (StructuredOutput("regex", r), None) for r in REGEXES
    ]
    cases.append((StructuredOutput("choice", '["alpha", "beta", "gamma"]'), None))
    prompts, params = [], []
    for spec, _ in cases:
        what = "a JSON object" if spec.kind == "json" else "a short answer"
        for temp in (0.0, 0.8):
            prompts.append(chat(sllm, f"Reply with {what} about a traveller."))
            params.append(
                SamplingParams(
                    max_new_tokens=120,
                    temperature=temp,
                    seed=7,
                    structured=spec,
                    adapter_id=adapter,
                )
            )
    outs = sllm.generate(prompts, params)
    for i, out in enumerate(outs):
        spec, schema = cases[i // 2]
        check_valid(out, spec, schema)


def allowed_masks(spec: StructuredOutput, llm: LLM, tokens: list[int]) -> list[np.ndarray]:
    """The allowed tokens before each of ``tokens``, straight from an llguidance matcher."""
    import llguidance
    import llguidance.hf
    import llguidance.torch

    vocab = llm.engine.vocab_size
    tok = llguidance.hf.from_tokenizer(llm.tokenizer.hf, n_vocab=vocab)
    m = llguidance.LLMatcher(tok, grammar_text(spec))
    masks = []
    for t in tokens:
        bm = llguidance.torch.allocate_token_bitmask(1, vocab)
        llguidance.torch.fill_next_token_bitmask(m, bm, 0)
        bits = np.unpackbits(bm.numpy().view(np.uint8), bitorder="little")[:vocab]
        masks.append(bits.astype(bool))
        assert m.consume_token(t)
    return masks


def test_processed_logprobs_are_renormalised_over_the_allowed_tokens(llm, hf_model) -> None:  # type: ignore[no-untyped-def]
    spec = json_spec(PERSON)
    p = SamplingParams(
        max_new_tokens=60, temperature=0, structured=spec, details=True, return_k_alternatives=5
    )
    (out,) = llm.generate([chat(llm, "Describe a person.")], p)
    ids = out.prompt_token_ids + out.token_ids
    raw = hf_logsoftmax(hf_model, ids)[len(out.prompt_token_ids) - 1 : -1]
    masks = allowed_masks(spec, llm, out.token_ids)
    forced = 0
    for i, t in enumerate(out.tokens):
        allowed = torch.from_numpy(masks[i])
        row = raw[i].masked_fill(~allowed, float("-inf"))
        row = row - torch.logsumexp(row, 0)
        assert abs(t.logprob - row[t.id].item()) <= TOL
        assert t.rank == 1  # greedy over the allowed tokens
        n_allowed = int(allowed.sum())
        assert len(t.alternatives) == min(5, n_allowed)
        assert all(masks[i][a.id] for a in t.alternatives)
        ref_vals = row.topk(len(t.alternatives)).values.tolist()
        assert [a.logprob for a in t.alternatives] == pytest.approx(ref_vals, abs=TOL)
        forced += n_allowed == 1
        if n_allowed == 1:
            assert t.logprob == 0.0
    assert forced > 0  # the schema forces some tokens (keys, punctuation)
    jsonschema.validate(json.loads(out.text), PERSON)


def test_raw_logprobs_are_the_unconstrained_models(llm) -> None:  # type: ignore[no-untyped-def]
    """Raw numbers of a constrained run equal the unconstrained engine's (its prompt logprobs
    over the same tokens) at every position, rank included: the constraint is visible as ranks
    above 1."""
    spec = StructuredOutput("regex", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}")
    p = SamplingParams(
        max_new_tokens=20,
        temperature=0,
        structured=spec,
        details=True,
        return_k_alternatives=3,
        logprobs_mode="raw",
    )
    (out,) = llm.generate([chat(llm, "Name a city.")], p)
    assert re.fullmatch(spec.value, out.text)
    ids = out.prompt_token_ids + out.token_ids
    (ref,) = llm.generate(
        [ids],
        SamplingParams(
            max_new_tokens=1, temperature=0, decoder_input_details=True, prompt_k_alternatives=3
        ),
    )
    start = len(out.prompt_token_ids)
    assert any(t.rank > 1 for t in out.tokens)  # the constraint overrode the model somewhere
    for i, t in enumerate(out.tokens):
        r = ref.prompt_tokens[start + i]
        assert r.id == t.id
        assert abs(t.logprob - r.logprob) <= TOL and t.rank == r.rank
        assert [a.id for a in t.alternatives] == [a.id for a in r.alternatives]


def test_free_requests_in_a_mixed_batch_are_untouched(sllm) -> None:  # type: ignore[no-untyped-def]
    free = [
        SamplingParams(max_new_tokens=16, temperature=0, return_k_alternatives=3),
        SamplingParams(max_new_tokens=16, temperature=0.9, seed=5, details=True),
        SamplingParams(max_new_tokens=16, temperature=0, adapter_id="caps", details=True),
    ]
    prompts = [chat(sllm, q) for q in ("Say hello.", "Name a fruit.", "Where do fish live?")]
    alone = sllm.generate(prompts, free)
    constrained = SamplingParams(
        max_new_tokens=40, temperature=0, structured=json_spec(SCHEMAS[1]), details=True
    )
    mixed = sllm.generate(
        [*prompts, chat(sllm, "Pick a color."), chat(sllm, "A point.")],
        [*free, constrained, constrained.with_updates(adapter_id="french", temperature=0.7)],
    )
    for a, b in zip(alone, mixed[:3], strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        for x, y in zip(a.tokens, b.tokens, strict=True):
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert abs(x.logprob - y.logprob) <= TOL and x.rank == y.rank
    jsonschema.validate(json.loads(mixed[3].text), SCHEMAS[1])


def test_length_cut_and_stop_sequences(llm) -> None:  # type: ignore[no-untyped-def]
    spec = json_spec(PERSON)
    (cut,) = llm.generate(
        [chat(llm, "A person.")], SamplingParams(max_new_tokens=4, temperature=0, structured=spec)
    )
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4
    assert cut.text.startswith('{"')
    (stopped,) = llm.generate(
        [chat(llm, "A person.")],
        SamplingParams(max_new_tokens=60, temperature=0, structured=spec, stop=('"age"',)),
    )
    assert stopped.finish_reason == "stop_sequence" and '"age"' not in stopped.text


def test_engine_rejects_a_bad_constraint(llm) -> None:  # type: ignore[no-untyped-def]
    from truffula.errors import RequestValidationError

    with pytest.raises(RequestValidationError) as err:
        llm.generate(["x"], SamplingParams(structured=StructuredOutput("regex", "a(b")))
    assert err.value.field == "structured_outputs"


# ---------------------------------------------------------------------------------- HTTP
def post(server, path: str, body: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, json=body, timeout=120)


def test_routes(server) -> None:  # type: ignore[no-untyped-def]
    schema = SCHEMAS[2]
    q = "Give two points as JSON."
    r = post(
        server,
        "/generate",
        {
            "inputs": q,
            "parameters": {
                "max_new_tokens": 80,
                "response_format": {"type": "json_object", "schema": schema},
                "details": True,
                "return_k_alternatives": 2,
            },
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(json.loads(body["generated_text"]), schema)
    assert body["details"]["finish_reason"] == "eos_token"
    for tok in body["details"]["tokens"]:
        assert math.isfinite(tok["logprob"]) and tok["logprob"] <= 0
    r = post(
        server,
        "/generate",
        {"inputs": q, "parameters": {"grammar": {"type": "regex", "value": r"\d{2}-\d{2}"}}},
    )
    assert r.status_code == 200 and re.fullmatch(r"\d{2}-\d{2}", r.json()["generated_text"])
    with httpx.stream(
        "POST",
        server.url + "/generate_stream",
        json={
            "inputs": q,
            "parameters": {"max_new_tokens": 80, "grammar": {"type": "json", "value": schema}},
        },
        timeout=120,
    ) as resp:
        events = [json.loads(x[5:]) for x in resp.iter_lines() if x.startswith("data:")]
    jsonschema.validate(json.loads(events[-1]["generated_text"]), schema)
    msgs = [{"role": "user", "content": "Describe a person."}]
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": msgs,
            "max_tokens": 80,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert choice["finish_reason"] == "stop"
    r = post(
        server,
        "/v1/completions",
        {
            "prompt": "Is the sky blue?",
            "max_tokens": 5,
            "temperature": 0,
            "structured_outputs": {"choice": ["yes", "no"]},
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": msgs,
            "max_tokens": 20,
            "structured_outputs": {"grammar": 'start: "A" | "B" "C"'},
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("A", "BC")


BAD = [
    (
        "/generate",
        {"response_format": {"type": "json_schema", "schema": {"type": "nope"}}},
        "response_format",
    ),
    ("/generate", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/generate", {"grammar": {"type": "regex", "value": "a(b"}}, "grammar"),
    ("/generate", {"grammar": {"type": "json", "value": "{not json"}}, "grammar"),
    (
        "/generate",
        {"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}},
        "grammar",
    ),
    (
        "/v1/completions",
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        "structured_outputs",
    ),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    (
        "/v1/completions",
        {"structured_outputs": {"grammar": "start: foo"}},
        "structured_outputs.grammar",
    ),
    (
        "/v1/completions",
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        "structured_outputs",
    ),
    (
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}}},
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"strict": "yes"}}},
        "response_format.json_schema.strict",
    ),
]


@pytest.mark.parametrize(("path", "extra", "field"), BAD)
def test_bad_constraint_is_422_naming_the_field(server, path, extra, field) -> None:  # type: ignore[no-untyped-def]
    if path == "/generate":
        body: dict[str, Any] = {"inputs": "x", "parameters": extra}
    elif path == "/v1/completions":
        body = {"prompt": "x", **extra}
    else:
        body = {"messages": [{"role": "user", "content": "x"}], **extra}
    r = post(server, path, body)
    assert r.status_code == 422, r.text
    text = r.text
    assert f"`{field}`" in text or f'"param":"{field}"' in text.replace(" ", ""), text
