"""What tools built around vLLM and TGI expect, over real servers: vLLM's tokenizer routes
(and lm-evaluation-harness's remote tokenizer through them), vLLM names on the LoRAX routes,
``--strict-params``, traces (OTLP, ``traceparent``), JSON logs with request ids."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"


def post(url: str, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120, **kw)


def test_vllm_tokenize_detokenize_and_tokenizer_info(server, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = hf_tokenizer.encode(PROMPT)
    out = post(server.url, "/tokenize", {"prompt": PROMPT}).json()
    info = httpx.get(server.url + "/info").json()
    assert out == {
        "count": len(ids),
        "max_model_len": info["max_total_tokens"],
        "tokens": ids,
        "token_strs": None,
    }
    strs = post(server.url, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert strs["token_strs"] == hf_tokenizer.convert_ids_to_tokens(ids)
    messages = [{"role": "user", "content": "Hi there"}]
    chat = post(server.url, "/tokenize", {"model": "x", "messages": messages}).json()
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    assert post(server.url, "/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}
    # TGI's shape is still TGI's answer
    tgi = post(server.url, "/tokenize", {"inputs": PROMPT}).json()
    assert [t["id"] for t in tgi] == ids and {"start", "stop", "text"} <= set(tgi[0])
    tok = httpx.get(server.url + "/tokenizer_info").json()
    assert tok["eos_token"] == hf_tokenizer.eos_token
    assert tok["eos_token_id"] == hf_tokenizer.eos_token_id
    assert tok["chat_template"] == hf_tokenizer.chat_template
    assert tok["model_max_length"] == info["max_total_tokens"]
    assert {"bos_token", "bos_token_id", "pad_token", "pad_token_id"} <= set(tok)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("/tokenize", {"inputs": ""}, "inputs"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
    ],
)
def test_tokenizer_routes_name_the_bad_field(server, path, body, field) -> None:  # type: ignore[no-untyped-def]
    r = post(server.url, path, body)
    assert r.status_code == 422, r.text
    assert f"`{field}" in r.json()["error"], r.text


def test_lm_eval_remote_tokenizer_local_completions(server, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """lm-evaluation-harness's ``local-completions`` with ``tokenizer_backend=remote``:
    loglikelihood and greedy generation, tokenized by the server."""
    pytest.importorskip("lm_eval", reason="pip install lm-eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model_id = httpx.get(server.url + "/info").json()["model_id"]
    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions",
        model=model_id,
        tokenizer_backend="remote",
        tokenized_requests=True,
        max_retries=1,
    )
    assert lm.tokenizer.encode(" red") == hf_tokenizer.encode(" red", add_special_tokens=False)
    assert lm.eot_token_id == hf_tokenizer.eos_token_id
    reqs = [
        Instance("loglikelihood", {}, (PROMPT, " red, blue and yellow"), 0),
        Instance("loglikelihood", {}, (PROMPT, " purple, pink and gold"), 1),
    ]
    scores = lm.loglikelihood(reqs, disable_tqdm=True)
    assert len(scores) == 2 and all(s[0] < 0 for s in scores)
    assert scores[0][0] > scores[1][0]
    gen = lm.generate_until(
        [Instance("generate_until", {}, (PROMPT, {"until": ["."], "max_gen_toks": 8}), 0)],
        disable_tqdm=True,
    )
    assert isinstance(gen[0], str) and gen[0]


def test_vllm_names_on_lorax_routes(server) -> None:  # type: ignore[no-untyped-def]
    def gen(**params: Any) -> dict[str, Any]:
        body = {"inputs": PROMPT, "parameters": {"details": True, **params}}
        r = post(server.url, "/generate", body)
        assert r.status_code == 200, r.text
        return r.json()["details"]

    assert gen(max_tokens=3)["generated_tokens"] == 3
    # the model stops early on this prompt unless told to ignore EOS
    free = gen(max_new_tokens=40)
    forced = gen(max_new_tokens=40, ignore_eos=True)
    assert forced == gen(max_new_tokens=40, ignore_eos_token=True)
    assert forced["generated_tokens"] == 40 and forced["finish_reason"] == "length"
    assert free["generated_tokens"] <= 40
    text = post(server.url, "/generate", {"inputs": PROMPT, "parameters": {"max_tokens": 20}})
    stop = text.json()["generated_text"].split()[1]
    stopped = gen(max_tokens=20, stop=stop)
    assert stopped["finish_reason"] == "stop_sequence", stopped
    r = post(server.url, "/generate", {"inputs": PROMPT, "parameters": {"max_tokens": 0}})
    assert r.status_code == 422 and "`max_tokens`" in r.json()["error"]
    both = {"max_tokens": 3, "max_new_tokens": 4}
    r = post(server.url, "/generate", {"inputs": PROMPT, "parameters": both})
    assert r.status_code == 422 and "`max_tokens`" in r.json()["error"]
    # unknown fields are ignored by default, as LoRAX does
    r = post(server.url, "/generate", {"inputs": PROMPT, "parameters": {"max_tokens": 1, "x": 1}})
    assert r.status_code == 200


def auth(proc: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {proc.key}"}


def test_strict_params_name_unknown_fields(extras_server) -> None:  # type: ignore[no-untyped-def]
    url, headers = extras_server.url, auth(extras_server)
    body = {"inputs": PROMPT, "parameters": {"max_tokens": 2, "ignore_eos": True, "bogus": 1}}
    r = post(url, "/generate", body, headers=headers)
    assert r.status_code == 422 and "`bogus`" in r.json()["error"], r.text
    r = post(url, "/generate", {"inputs": PROMPT, "extra_top": 1}, headers=headers)
    assert r.status_code == 422 and "`extra_top`" in r.json()["error"]
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "zz": 0}, headers=headers)
    assert r.status_code == 422 and "`zz`" in r.json()["error"]["message"]
    r = post(url, "/tokenize", {"prompt": "x", "zz": 0}, headers=headers)
    assert r.status_code == 422 and "`zz`" in r.json()["error"]
    del body["parameters"]["bogus"]
    assert post(url, "/generate", body, headers=headers).status_code == 200


def wait_for_spans(collector: Any, trace_id: str, names: set[str]) -> list[Any]:
    deadline = time.time() + 60
    while time.time() < deadline:
        spans = collector.of_trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"spans of {trace_id}: {[s.name for s in collector.of_trace(trace_id)]}")


def test_traces_follow_traceparent_over_otlp(extras_server) -> None:  # type: ignore[no-untyped-def]
    url, collector = extras_server.url, extras_server.collector
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {**auth(extras_server), "traceparent": f"00-{trace_id}-{parent}-01"}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    r = post(url, "/generate", body, headers=headers)
    assert r.status_code == 200
    spans = wait_for_spans(collector, trace_id, {"POST /generate", "queue", "prefill", "decode"})
    by = {s.name: s for s in spans}
    root = by["POST /generate"]
    assert root.parent_span_id.hex() == parent
    for name in ("queue", "prefill", "decode"):
        assert by[name].parent_span_id == root.span_id
        assert root.start_time_unix_nano <= by[name].start_time_unix_nano
        assert by[name].start_time_unix_nano <= by[name].end_time_unix_nano
    assert by["queue"].end_time_unix_nano <= by["prefill"].start_time_unix_nano + 1000
    assert by["prefill"].end_time_unix_nano <= by["decode"].start_time_unix_nano + 1000

    stream_trace = "0af7651916cd43dd8448eb211c80319c"
    headers["traceparent"] = f"00-{stream_trace}-b7ad6b7169203331-01"
    with httpx.stream(
        "POST", url + "/generate_stream", json=body, headers=headers, timeout=120
    ) as resp:
        assert resp.status_code == 200 and resp.headers["x-request-id"]
        assert sum(1 for line in resp.iter_lines() if line.startswith("data:")) == 5
    names = {"POST /generate_stream", "stream", "queue", "prefill", "decode"}
    assert names <= {s.name for s in wait_for_spans(collector, stream_trace, names)}


def test_json_logs_carry_request_ids(extras_server) -> None:  # type: ignore[no-untyped-def]
    url = extras_server.url
    r = post(url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 401 and r.headers["x-request-id"]
    headers = {**auth(extras_server), "x-request-id": "my-request-17"}
    r = post(
        url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, headers=headers
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-request-17"
    deadline = time.time() + 30
    records: list[dict[str, Any]] = []
    while time.time() < deadline:
        lines = extras_server.log.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        if any(rec.get("request_id") == "my-request-17" for rec in records):
            break
        time.sleep(0.1)
    mine = [rec for rec in records if rec.get("request_id") == "my-request-17"]
    assert mine, records[-5:]
    line = mine[-1]
    assert line["logger"] == "truffula.access" and line["status"] == 200
    assert line["path"] == "/generate" and len(line["engine_request_ids"]) == 1
    assert {"time", "level", "message", "duration_ms"} <= set(line)
    assert any(rec["status"] == 401 for rec in records if rec.get("logger") == "truffula.access")
    # the engine process logs in the same format (its start-up lines among them)
    assert any(rec["logger"].startswith("truffula.engine") for rec in records)
    text = [x for x in extras_server.log.read_text().splitlines() if "truffula.engine" in x]
    assert text and all(x.startswith("{") for x in text), text[:3]


def test_engine_spans_in_memory(llm) -> None:  # type: ignore[no-untyped-def]
    """The spans of one request, from the engine's own timings, with the SDK's in-memory
    exporter: children of the server span, which continues the caller's trace."""
    pytest.importorskip("opentelemetry.sdk", reason="pip install 'truffula[tracing]'")
    from types import SimpleNamespace

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from truffula.engine.messages import EngineRequest
    from truffula.sampling.params import SamplingParams
    from truffula.server import tracing

    exporter = InMemorySpanExporter()
    tracing.setup(None, "test", exporter=exporter)
    try:
        engine = llm.engine
        rid = engine.add_request(PROMPT, SamplingParams(max_new_tokens=4, ignore_eos=True))
        request: EngineRequest = engine.requests[rid].spec
        prompt_ids = request.prompt_ids
        final = None
        while final is None:
            final = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
        assert final.timings is not None and len(final.timings) == 3
        stream = SimpleNamespace(
            request=request, request_id=rid, timings=final.timings, ended_at=None
        )
        tid, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        scope = {
            "method": "POST",
            "path": "/generate",
            "headers": [(b"traceparent", f"00-{tid}-{parent}-01".encode())],
        }
        trace = tracing.RequestTrace(scope, "req-1")
        trace.response_started(200, [(b"content-type", b"text/event-stream")])
        trace.end([stream])
    finally:
        tracing.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /generate", "stream", "queue", "prefill", "decode"}
    root = spans["POST /generate"]
    assert f"{root.context.trace_id:032x}" == tid and f"{root.parent.span_id:016x}" == parent
    assert root.attributes["truffula.request_id"] == "req-1"
    for name in ("stream", "queue", "prefill", "decode"):
        assert spans[name].parent.span_id == root.context.span_id
    q, p, d = spans["queue"], spans["prefill"], spans["decode"]
    assert q.start_time <= q.end_time <= p.end_time <= d.end_time
    assert d.attributes["truffula.prompt_tokens"] == len(prompt_ids)


def test_grafana_dashboard_queries_only_served_metrics(server) -> None:  # type: ignore[no-untyped-def]
    """Every metric deploy/grafana-dashboard.json queries is one /metrics serves."""
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).parents[2] / "deploy/grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    post(server.url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}})
    text = httpx.get(server.url + "/metrics").text
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    queried = {m for e in exprs for m in re.findall(r"\btruffula_[a-z_]+", e)}
    assert queried and queried <= served, queried - served
