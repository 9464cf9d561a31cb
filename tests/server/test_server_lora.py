"""Adapters over HTTP: LoRAX and OpenAI routes, load/unload, errors, metrics, JIT loading."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from serverproc import ServerProcess

from truffula.sampling.params import SamplingParams

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def lora_server(peft_model):  # type: ignore[no-untyped-def]
    proc = ServerProcess(
        "--adapter-root",
        str(peft_model.root),
        "--preload-adapter",
        "qv4",
        "--max-active-adapters",
        "2",
        "--max-lora-rank",
        "8",
    )
    yield proc
    proc.stop()


def gen(server, params: dict, inputs: str = PROMPT) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        server.url + "/generate", json={"inputs": inputs, "parameters": params}, timeout=120
    )


def metric(server, name: str) -> float:  # type: ignore[no-untyped-def]
    return httpx.get(server.url + "/metrics", headers={"accept": "application/json"}).json()[name]


def test_preloaded_adapter_is_listed(lora_server) -> None:  # type: ignore[no-untyped-def]
    models = httpx.get(lora_server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models][1:] == ["qv4"] and models[1]["parent"] == models[0]["id"]
    info = httpx.get(lora_server.url + "/info").json()
    assert (
        info["max_active_adapters"] == 2
        and info["max_lora_rank"] == 8
        and info["loaded_adapters"] == 1
    )


def test_adapter_requests_follow_peft(lora_server, peft_model) -> None:  # type: ignore[no-untyped-def]
    from adapters.test_lora import peft_logsoftmax

    for adapter in ("qv4", "all8", "mlp6rs"):
        r = gen(
            lora_server,
            {
                "max_new_tokens": 6,
                "adapter_id": adapter,
                "adapter_source": "local",
                "details": True,
            },
        )
        assert r.status_code == 200 and r.headers["x-adapter-id"] == adapter
        d = r.json()["details"]
        ids = [p for p in httpx.post(lora_server.url + "/tokenize", json={"inputs": PROMPT}).json()]
        prompt_ids = [t["id"] for t in ids]
        ref = peft_logsoftmax(peft_model, adapter, prompt_ids + [t["id"] for t in d["tokens"]])
        n = len(prompt_ids)
        assert [t["id"] for t in d["tokens"]] == ref[n - 1 : -1].argmax(-1).tolist()
        for i, t in enumerate(d["tokens"]):
            assert abs(t["logprob"] - ref[n - 1 + i, t["id"]].item()) < 1e-4
    base = gen(lora_server, {"max_new_tokens": 6, "adapter_id": ""}).json()["generated_text"]
    assert (
        base
        != gen(lora_server, {"max_new_tokens": 6, "adapter_id": "all8"}).json()["generated_text"]
    )
    assert metric(lora_server, "truffula_adapter_evictions_total") >= 1  # three adapters, two slots
    assert metric(lora_server, "truffula_adapter_loads_total") >= 3
    assert metric(lora_server, "truffula_active_adapters") == 2


def test_openai_model_selects_the_adapter(lora_server) -> None:  # type: ignore[no-untyped-def]
    import openai

    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key="unused")
    r = client.completions.create(model="all8", prompt=PROMPT, max_tokens=6, temperature=0)
    assert (
        r.choices[0].text
        == gen(lora_server, {"max_new_tokens": 6, "adapter_id": "all8"}).json()["generated_text"]
    )
    chat = client.chat.completions.create(
        model="mlp6rs", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content is not None


def test_merged_adapters_route(lora_server) -> None:  # type: ignore[no-untyped-def]
    one = gen(lora_server, {"max_new_tokens": 5, "adapter_id": "all8"}).json()["generated_text"]
    merged = {"ids": ["all8"], "weights": [1.0], "merge_strategy": "linear"}
    assert (
        gen(lora_server, {"max_new_tokens": 5, "merged_adapters": merged}).json()["generated_text"]
        == one
    )
    ties = {
        "ids": ["all8", "all8"],
        "weights": [0.5, 0.5],
        "merge_strategy": "ties",
        "density": 0.5,
    }
    assert gen(lora_server, {"max_new_tokens": 5, "merged_adapters": ties}).status_code == 200
    for bad, needle in (
        ({"ids": [], "weights": []}, "at least one adapter ID"),
        ({"ids": ["all8", "qv4"], "weights": [1.0]}, "number of adapter IDs must match"),
        ({"ids": ["all8"], "merge_strategy": "median"}, "merge_strategy"),
        ({"ids": ["all8", "qv4"]}, "different ranks"),
    ):
        r = gen(lora_server, {"merged_adapters": bad})
        assert r.status_code == 422 and needle in r.json()["error"], r.text
    r = gen(lora_server, {"adapter_id": "all8", "merged_adapters": {"ids": ["all8"]}})
    assert r.status_code == 422 and "at most one" in r.json()["error"]


def test_bad_adapters_are_4xx_and_do_not_disturb_others(lora_server) -> None:  # type: ignore[no-untyped-def]
    good = {"max_new_tokens": 8, "adapter_id": "qv4", "return_k_alternatives": 2}
    expected = gen(lora_server, good).json()
    cases = [
        ("missing-adapter", None, 404, "missing-adapter"),
        ("../../etc", None, 403, "outside"),
        ("qv4", "s3", 422, "s3"),
        ("nobody/nothing", "hub", 404, "nobody/nothing"),
    ]
    seen: list[tuple[int, dict, int, str]] = []
    goods: list[dict] = []

    def flood() -> None:
        for _ in range(3):
            for adapter, source, status, needle in cases:
                r = gen(
                    lora_server,
                    {"max_new_tokens": 3, "adapter_id": adapter, "adapter_source": source},
                )
                seen.append((r.status_code, r.json(), status, needle))

    threads = [threading.Thread(target=flood) for _ in range(2)]
    threads += [
        threading.Thread(target=lambda: goods.append(gen(lora_server, good).json()))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 * 3 * len(cases)
    for got, body, status, needle in seen:
        assert got == status and body["error_type"] == "adapter" and needle in body["error"], body
    for g in goods:
        assert g["generated_text"] == expected["generated_text"]
        assert [t["id"] for t in g["details"]["tokens"]] == [
            t["id"] for t in expected["details"]["tokens"]
        ]


def test_load_and_unload_endpoints(lora_server) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(
        lora_server.url + "/adapters/load", json={"adapter_id": "mlp6rs", "adapter_source": "local"}
    )
    assert r.status_code == 200 and r.json() == {"loaded": "mlp6rs"}
    listing = httpx.get(lora_server.url + "/adapters").json()
    assert {a["id"] for a in listing["adapters"]} >= {"qv4", "mlp6rs"}
    r = httpx.post(lora_server.url + "/adapters/unload", json={"adapter_id": "mlp6rs"})
    assert r.status_code == 200
    assert "mlp6rs" not in [
        m["id"] for m in httpx.get(lora_server.url + "/v1/models").json()["data"]
    ]
    r = httpx.post(lora_server.url + "/adapters/unload", json={"adapter_id": "mlp6rs"})
    assert r.status_code == 404
    # unloading an adapter that a request is using is refused
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 300, "ignore_eos_token": True, "adapter_id": "qv4"},
    }
    with httpx.stream("POST", lora_server.url + "/generate_stream", json=body, timeout=120) as resp:
        lines = resp.iter_lines()  # kept referenced: dropping it would close the connection
        next(line for line in lines if line.startswith("data:"))
        r = httpx.post(lora_server.url + "/adapters/unload", json={"adapter_id": "qv4"})
        assert r.status_code == 409 and "qv4" in r.json()["error"]


def test_first_request_loads_off_the_step_loop(model_dir, peft_model) -> None:  # type: ignore[no-untyped-def]
    """While an adapter is being read from disk, a running request keeps generating."""
    from truffula.engine.async_engine import AsyncEngine
    from truffula.engine.llm import LLM
    from truffula.server.metrics import Metrics
    from truffula.server.protocol import GenerateParameters
    from truffula.server.state import AdapterRef, ServerSettings, ServerState

    llm = LLM(str(model_dir), progress=False, adapter_root=str(peft_model.root), max_lora_rank=8)
    store = llm.engine.adapters
    slow_load = store.load

    def slow(adapter_id: str, source: str | None = None) -> str:
        time.sleep(2.0)
        return slow_load(adapter_id, source)

    store.load = slow  # type: ignore[method-assign]

    async def run() -> tuple[int, int, list[int]]:
        engine = AsyncEngine(llm.engine)
        state = ServerState(engine, ServerSettings(model_id="base"), Metrics())
        base_tokens = 0

        async def base() -> None:
            nonlocal base_tokens
            p = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
            async for out in engine.generate("Count to a thousand:", p):
                base_tokens += len(out.tokens)

        task = asyncio.create_task(base())
        while base_tokens < 2:
            await asyncio.sleep(0.01)
        before = base_tokens
        params = await state.resolve_adapter(
            AdapterRef.of(GenerateParameters(adapter_id="all8")),
            SamplingParams(max_new_tokens=5, temperature=0),
        )
        during = base_tokens - before
        outs = [o async for o in engine.generate(PROMPT, params)]
        engine.abort(next(iter(engine._streams), ""))
        task.cancel()
        await engine.shutdown()
        return before, during, [t.id for o in outs for t in o.tokens]

    _before, during, adapter_ids = asyncio.run(run())
    assert during >= 5, f"the base request produced {during} tokens during a 2 s adapter load"
    (ref,) = llm.generate(
        [PROMPT], SamplingParams(max_new_tokens=5, temperature=0, adapter_id="all8")
    )
    assert adapter_ids == ref.token_ids
