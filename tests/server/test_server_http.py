"""The HTTP server over real HTTP with raw httpx: routes, schemas, SSE, errors, metrics."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import httpx
import pytest

from truffula.sampling.params import SamplingParams

PROMPT = "The capital of France is"


def post(server, path: str, body: Any, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def sse(resp: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def all_logprobs(obj: Any) -> list[float]:
    found: list[float] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("logprob",) and value is not None:
                found.append(value)
            else:
                found += all_logprobs(value)
    elif isinstance(obj, list):
        for item in obj:
            found += all_logprobs(item)
    return found


def test_generate_matches_the_engine(server, llm) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}},
    )
    assert r.status_code == 200 and r.headers["x-model-id"]
    body = r.json()
    (ref,) = llm.generate([PROMPT], SamplingParams(max_new_tokens=8, temperature=0, details=True))
    assert body["generated_text"] == ref.text
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 8 and d["prompt_tokens"] == 5
    assert d["seed"] is None and d["prefill"] == [] and d["skipped_tokens"] == 0
    assert [t["id"] for t in d["tokens"]] == ref.token_ids
    for t, e in zip(d["tokens"], ref.tokens, strict=True):
        assert (
            abs(t["logprob"] - e.logprob) < 1e-4
            and t["rank"] == e.rank
            and "alternative_tokens" not in t
        )


def test_alternatives_come_back_even_without_details(server) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 4, "details": False, "return_k_alternatives": 3},
        },
    )
    toks = r.json()["details"]["tokens"]
    assert len(toks) == 4
    for t in toks:
        alts = t["alternative_tokens"]
        assert len(alts) == 3 and alts[0]["id"] == t["id"]
        assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        assert t["rank"] == 1 and t["entropy"] > 0


def test_prefill_and_prompt_alternatives(server) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": 1,
                "decoder_input_details": True,
                "prompt_k_alternatives": 2,
            },
        },
    )
    prefill = r.json()["details"]["prefill"]
    assert len(prefill) == 5 and prefill[0]["logprob"] is None
    assert "".join(p["text"] for p in prefill) == PROMPT
    for p in prefill[1:]:
        assert math.isfinite(p["logprob"]) and len(p["alternative_tokens"]) == 2 and p["rank"] >= 1


def test_explicit_nulls_and_unknown_fields_are_accepted(server) -> None:  # type: ignore[no-untyped-def]
    params = {
        name: None
        for name in (
            "adapter_id",
            "adapter_source",
            "merged_adapters",
            "api_token",
            "best_of",
            "temperature",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "top_k",
            "top_p",
            "typical_p",
            "do_sample",
            "max_new_tokens",
            "ignore_eos_token",
            "return_full_text",
            "stop",
            "truncate",
            "watermark",
            "details",
            "decoder_input_details",
            "return_k_alternatives",
            "seed",
            "response_format",
            "top_n_tokens",
            "logprobs_mode",
            "prompt_k_alternatives",
        )
    }
    params["something_new"] = {"x": 1}
    r = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {**params, "max_new_tokens": 3}, "extra": True},
    )
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"]


def test_sampling_reports_a_replayable_seed(server) -> None:  # type: ignore[no-untyped-def]
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 6, "do_sample": True, "details": True},
    }
    first = post(server, "/generate", body).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = post(
        server, "/generate", {"inputs": PROMPT, "parameters": {**body["parameters"], "seed": seed}}
    ).json()
    assert again["generated_text"] == first["generated_text"]


def test_return_full_text_and_raw_mode(server) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "return_full_text": True}},
    ).json()
    assert r["generated_text"].startswith(PROMPT) and "details" not in r
    raw = post(
        server,
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": 3,
                "temperature": 1.5,
                "top_k": 3,
                "seed": 1,
                "return_k_alternatives": 5,
                "logprobs_mode": "raw",
            },
        },
    ).json()
    for t in raw["details"]["tokens"]:
        assert len(t["alternative_tokens"]) == 5  # raw mode is not cut to top_k
    proc = post(
        server,
        "/generate",
        {
            "inputs": PROMPT,
            "parameters": {
                "max_new_tokens": 3,
                "temperature": 1.5,
                "top_k": 3,
                "seed": 1,
                "return_k_alternatives": 5,
            },
        },
    ).json()
    for t in proc["details"]["tokens"]:
        assert len(t["alternative_tokens"]) == 3  # filtered tokens are never listed


def test_compat_route_returns_a_list_and_streams(server) -> None:  # type: ignore[no-untyped-def]
    r = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": False})
    assert isinstance(r.json(), list) and len(r.json()) == 1
    with httpx.stream(
        "POST",
        server.url + "/",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse(resp)
    assert len(events) == 3 and events[-1]["generated_text"] == r.json()[0]["generated_text"]


def test_generate_stream_events(server) -> None:  # type: ignore[no-untyped-def]
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 5, "details": True, "return_k_alternatives": 2},
    }
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["x-accel-buffering"] == "no"
        events = sse(resp)
    ref = post(server, "/generate", body).json()
    assert [e["token"]["id"] for e in events] == [t["id"] for t in ref["details"]["tokens"]]
    for e in events:
        assert len(e["token"]["alternative_tokens"]) == 2 and math.isfinite(e["token"]["logprob"])
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == ref["generated_text"]
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "prompt_tokens": 5,
        "generated_tokens": 5,
        "seed": None,
    }


def test_tgi_top_n_tokens(server) -> None:  # type: ignore[no-untyped-def]
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 4, "details": True, "top_n_tokens": 3},
    }
    d = post(server, "/generate", body).json()["details"]
    assert len(d["top_tokens"]) == 4 and all(len(x) == 3 for x in d["top_tokens"])
    assert all({"id", "text", "logprob", "special"} <= set(x[0]) for x in d["top_tokens"])
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as resp:
        events = sse(resp)
    assert [e["top_tokens"] for e in events] == d["top_tokens"]


def test_every_logprob_is_finite_under_filters(server) -> None:  # type: ignore[no-untyped-def]
    body = {
        "inputs": PROMPT,
        "parameters": {
            "max_new_tokens": 6,
            "top_k": 2,
            "top_p": 0.5,
            "seed": 3,
            "return_k_alternatives": 20,
            "decoder_input_details": True,
            "prompt_k_alternatives": 20,
        },
    }
    r = post(server, "/generate", body)
    values = all_logprobs(r.json())
    assert values and all(math.isfinite(v) for v in values)
    assert "Infinity" not in r.text and "NaN" not in r.text


BAD = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": "many"}, "max_new_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"temperature": -1}, "temperature"),
    ({"typical_p": 0}, "typical_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"return_k_alternatives": 21}, "return_k_alternatives"),
    ({"return_k_alternatives": 0}, "return_k_alternatives"),
    ({"top_n_tokens": 99}, "top_n_tokens"),
    ({"prompt_k_alternatives": -2}, "prompt_k_alternatives"),
    ({"logprobs_mode": "cooked"}, "logprobs_mode"),
    ({"best_of": 2, "seed": 1, "do_sample": True}, "seed"),
    ({"best_of": 9, "do_sample": True}, "best_of"),
    ({"truncate": 0}, "truncate"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"details": "yes please"}, "details"),
]


@pytest.mark.parametrize(("params", "field"), BAD)
def test_bad_parameter_is_422_naming_the_field(server, params, field) -> None:  # type: ignore[no-untyped-def]
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": params})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_type"] == "validation" and field in body["error"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"inputs": "x", "parameters": {', "malformed JSON"),
        (b"[1, 2", "malformed JSON"),
        (b'{"parameters": {}}', "inputs"),
        (b'{"inputs": 5}', "inputs"),
        (b'{"inputs": ""}', "inputs"),
    ],
)
def test_malformed_bodies_are_422_with_an_error_body(server, raw, needle) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        server.url + "/generate",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert (
        r.status_code == 422
        and r.json()["error_type"] == "validation"
        and needle in r.json()["error"]
    )


def test_prompt_too_long_names_the_limit(server) -> None:  # type: ignore[no-untyped-def]
    info = httpx.get(server.url + "/info").json()
    long_prompt = "hello " * (info["max_total_tokens"] + 10)
    r = post(server, "/generate", {"inputs": long_prompt, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and str(info["max_total_tokens"]) in r.json()["error"]
    ok = post(
        server,
        "/generate",
        {"inputs": long_prompt, "parameters": {"max_new_tokens": 2, "truncate": 50}},
    )
    assert ok.status_code == 200 and ok.json()["generated_text"]


def test_stream_validation_errors_answer_before_the_stream(server) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate_stream",
        {"inputs": PROMPT, "parameters": {"decoder_input_details": True}},
    )
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"]
    r = post(
        server,
        "/",
        {"inputs": PROMPT, "parameters": {"best_of": 2, "do_sample": True}, "stream": True},
    )
    assert r.status_code == 422 and "best_of" in r.json()["error"]


def test_best_of_returns_the_other_sequences(server) -> None:  # type: ignore[no-untyped-def]
    r = post(
        server,
        "/generate",
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "best_of": 2, "do_sample": True}},
    )
    d = r.json()["details"]
    assert len(d["best_of_sequences"]) == 1
    best = sum(t["logprob"] for t in d["tokens"])
    other = sum(t["logprob"] for t in d["best_of_sequences"][0]["tokens"])
    assert best >= other


def test_queue_full_is_429(server) -> None:  # type: ignore[no-untyped-def]
    results: list[int] = []

    def one() -> None:
        r = post(
            server,
            "/generate",
            {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}},
        )
        results.append(r.status_code)
        if r.status_code == 429:
            assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}

    threads = [threading.Thread(target=one) for _ in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) >= 4 and results.count(429) >= 1 and set(results) <= {200, 429}


def test_bad_flood_leaves_good_requests_correct(server, llm) -> None:  # type: ignore[no-untyped-def]
    good = {
        "inputs": "Count: one, two,",
        "parameters": {"max_new_tokens": 10, "return_k_alternatives": 2},
    }
    expected = post(server, "/generate", good).json()
    goods: list[dict[str, Any]] = []
    statuses: list[int] = []

    def good_one() -> None:
        goods.append(post(server, "/generate", good).json())

    def flood() -> None:
        for params, _ in BAD * 3:
            statuses.append(
                post(server, "/generate", {"inputs": "bad", "parameters": params}).status_code
            )
        for raw in (b"{", b"[]", b'{"inputs": null}'):
            statuses.append(
                httpx.post(
                    server.url + "/generate",
                    content=raw,
                    headers={"content-type": "application/json"},
                ).status_code
            )

    threads = [threading.Thread(target=good_one) for _ in range(3)] + [
        threading.Thread(target=flood) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) == {422}
    assert len(goods) == 3
    for got in goods:
        assert_same_response(got, expected)


def assert_same_response(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> None:
    """Same text, tokens and alternative ids; logprobs equal up to fp32 reduction order."""
    assert a["generated_text"] == b["generated_text"]
    ta, tb = a["details"]["tokens"], b["details"]["tokens"]
    assert [t["id"] for t in ta] == [t["id"] for t in tb]
    for x, y in zip(ta, tb, strict=True):
        assert abs(x["logprob"] - y["logprob"]) <= tol and x["rank"] == y["rank"]
        assert [q["id"] for q in x["alternative_tokens"]] == [
            q["id"] for q in y["alternative_tokens"]
        ]


def wait_for_idle(server, timeout: float = 30) -> float:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = httpx.get(server.url + "/metrics", headers={"accept": "application/json"}).json()
        if m["truffula_kv_blocks_used"] == 0 and m["truffula_running_batch_size"] == 0:
            return m["truffula_kv_blocks_used"]
        time.sleep(0.1)
    return m["truffula_kv_blocks_used"]


def test_client_disconnect_aborts_and_frees_blocks(server) -> None:  # type: ignore[no-untyped-def]
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2000, "ignore_eos_token": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as resp:
        lines = resp.iter_lines()  # kept referenced: dropping it would close the connection
        first = next(line for line in lines if line.startswith("data:"))
        assert "token" in json.loads(first[5:])
        metrics = httpx.get(server.url + "/metrics", headers={"accept": "application/json"}).json()
        assert metrics["truffula_kv_blocks_used"] > 0, (first, metrics)
    assert wait_for_idle(server) == 0
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=1.0)
    assert wait_for_idle(server) == 0


def test_metrics_info_tokenize_openapi(server) -> None:  # type: ignore[no-untyped-def]
    post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    bad = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"top_k": -3}})
    assert bad.status_code == 422  # counted by status below
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'truffula_requests_total{route="/generate",status="200"}',
        "truffula_queue_depth",
        "truffula_running_batch_size",
        "truffula_prompt_tokens_total",
        "truffula_generated_tokens_total",
        "truffula_time_to_first_token_seconds_bucket",
        "truffula_time_per_output_token_seconds_bucket",
        "truffula_request_latency_seconds_bucket",
        "truffula_kv_blocks_used",
        "truffula_kv_blocks_total",
    ):
        assert name in text, name
    assert 'status="422"' in text
    info = httpx.get(server.url + "/info").json()
    assert info["model_device_type"] == "cpu" and info["model_dtype"] == "float32"
    assert (
        info["max_k_alternatives"] == 20
        and info["version"]
        and info["max_concurrent_requests"] == 4
    )
    toks = post(server, "/tokenize", {"inputs": "Hello world"}).json()
    assert [t["id"] for t in toks] == [19556, 905] and toks[1] == {
        "id": 905,
        "text": "Ġworld",
        "start": 5,
        "stop": 11,
    }
    schema = httpx.get(server.url + "/openapi.json").json()
    for path in (
        "/generate",
        "/generate_stream",
        "/",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/info",
        "/metrics",
        "/tokenize",
    ):
        assert path in schema["paths"], path
    # "/" documents every method it answers (schemathesis checks `Allow` against the schema)
    assert set(schema["paths"]["/"]) == {"get", "post"}
    assert "text/html" in schema["paths"]["/"]["get"]["responses"]["200"]["content"]
    assert not [p for p in schema["paths"] if p.startswith("/ui/")]
    props = schema["components"]["schemas"]["GenerateParameters"]["properties"]
    assert "description" in props["return_k_alternatives"]
    assert httpx.get(server.url + "/api-doc/openapi.json").status_code == 200


def test_unknown_route_and_method(server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = httpx.get(server.url + "/generate")
    assert r.status_code == 405


def test_apply_chat_template_formats_inputs(server, llm) -> None:  # type: ignore[no-untyped-def]
    question = "What is the capital of France?"
    body = {"inputs": question, "parameters": {"max_new_tokens": 8, "apply_chat_template": True}}
    r = post(server, "/generate", body).json()
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    (ref,) = llm.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))
    assert r["generated_text"] == ref.text and "Paris" in ref.text
    msgs = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": question},
    ]
    body = {
        "inputs": json.dumps(msgs),
        "parameters": {"max_new_tokens": 8, "apply_chat_template": True},
    }
    r2 = post(server, "/generate", body)
    assert r2.status_code == 200 and r2.json()["generated_text"]
