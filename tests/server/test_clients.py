"""The clients users already have, unmodified, against a real server: lorax-client and
text-generation from their own virtualenv (they pin huggingface-hub<1.0), openai from this one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_VENV = ROOT / ".venvs" / "clients"
CLIENT_PINS = ["lorax-client==0.6.3", "text-generation==0.7.0"]
PROMPT = "The capital of France is"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def client_python() -> Path:
    """The clients' own virtualenv, as on a user's separate client machine (made if missing)."""
    py = CLIENT_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CLIENT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *CLIENT_PINS], check=True)
    return py


def run_client(py: Path, script: str, url: str) -> dict:
    proc = subprocess.run(
        [str(py), str(ROOT / "tests" / "clients" / script), url, PROMPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def raw(server, params: dict) -> dict:  # type: ignore[no-untyped-def]
    return httpx.post(
        server.url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=120
    ).json()


def test_lorax_client(server, client_python) -> None:  # type: ignore[no-untyped-def]
    got = run_client(client_python, "lorax_check.py", server.url)
    ref = raw(
        server,
        {
            "max_new_tokens": 6,
            "return_k_alternatives": 3,
            "decoder_input_details": True,
            "details": True,
        },
    )
    gen = got["generate"]
    assert gen["generated_text"] == ref["generated_text"]
    d = gen["details"]
    assert [t["id"] for t in d["tokens"]] == [t["id"] for t in ref["details"]["tokens"]]
    assert all(len(t["alternative_tokens"]) == 3 for t in d["tokens"])
    assert d["prefill"][0]["logprob"] is None and all(
        math.isfinite(p["logprob"]) for p in d["prefill"][1:]
    )
    assert "".join(e["token"]["text"] for e in got["stream"]) == ref["generated_text"]
    assert got["stream"][-1]["generated_text"] == ref["generated_text"]
    assert got["stream"][-1]["details"]["finish_reason"] == "length"
    astream = got["async_stream"]
    assert [e["token"]["id"] for e in astream] == [t["id"] for t in d["tokens"]]
    assert all(len(e["token"]["alternative_tokens"]) == 2 for e in astream)
    for name in ("zero_tokens", "k_too_big", "long"):
        kind, message = got["errors"][name]
        assert kind == "ValidationError", (name, kind, message)
    assert "max_new_tokens" in got["errors"]["zero_tokens"][1]
    assert "20" in got["errors"]["k_too_big"][1]


def test_text_generation_client(server, client_python) -> None:  # type: ignore[no-untyped-def]
    got = run_client(client_python, "tgi_check.py", server.url)
    ref = raw(server, {"max_new_tokens": 5, "top_n_tokens": 3, "details": True})
    gen = got["generate"]
    assert gen["generated_text"] == ref["generated_text"]
    assert gen["details"]["top_tokens"] is not None and len(gen["details"]["top_tokens"]) == 5
    assert [[t["id"] for t in pos] for pos in gen["details"]["top_tokens"]] == [
        [t["id"] for t in pos] for pos in ref["details"]["top_tokens"]
    ]
    assert gen["details"]["prefill"][0]["logprob"] is None
    assert [len(e["top_tokens"]) for e in got["stream"]] == [2] * 5
    assert got["stream"][-1]["generated_text"] == ref["generated_text"]
    assert got["error"][0] == "ValidationError" and "top_n_tokens" in got["error"][1]


def test_openai_completions(server, llm) -> None:  # type: ignore[no-untyped-def]
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.completions.create(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=3,
    )
    ref = raw(server, {"max_new_tokens": 6, "return_k_alternatives": 3})
    choice = r.choices[0]
    assert choice.text == ref["generated_text"] and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == 6 and all(len(t) <= 3 for t in lp.top_logprobs)
    for x, t in zip(lp.token_logprobs, ref["details"]["tokens"], strict=True):
        assert abs(x - t["logprob"]) < 1e-4
    assert lp.text_offset[0] == 0 and r.usage.completion_tokens == 6 and r.usage.prompt_tokens == 5
    # echo + max_tokens 0: prompt logprobs only (lm-eval loglikelihood)
    e = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    c = e.choices[0]
    assert c.text == PROMPT and c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == 5
    prefill = raw(server, {"max_new_tokens": 1, "decoder_input_details": True})["details"][
        "prefill"
    ]
    for x, p in zip(c.logprobs.token_logprobs[1:], prefill[1:], strict=True):
        assert abs(x - p["logprob"]) < 1e-4
    many = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=3, n=2, temperature=0.8, seed=1
    )
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2, 3]
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, stream=True
        )
    )
    assert (
        "".join(ch.choices[0].text for ch in chunks if ch.choices)
        == ref["generated_text"][: len("".join(ch.choices[0].text for ch in chunks if ch.choices))]
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat(server, llm) -> None:  # type: ignore[no-untyped-def]
    import openai

    from truffula.sampling.params import SamplingParams

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    prompt = llm.tokenizer.apply_chat_template(msgs)
    (ref,) = llm.generate(
        [prompt], SamplingParams(max_new_tokens=12, temperature=0, return_k_alternatives=3)
    )
    choice = r.choices[0]
    assert choice.message.content == ref.text and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if ref.finish_reason == "eos_token" else "length")
    content = choice.logprobs.content
    assert [c.token for c in content] == [t.text for t in ref.tokens if not t.special]
    for c, t in zip(content, [t for t in ref.tokens if not t.special], strict=False):
        assert (
            abs(c.logprob - t.logprob) < 1e-4
            and bytes(c.bytes) == t.bytes
            and len(c.top_logprobs) == 3
        )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [c.token for c in content]
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)
    stop = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, stop=["Paris"]
    )
    assert (
        stop.choices[0].finish_reason == "stop" and "Paris" not in stop.choices[0].message.content
    )
    models = client.models.list()
    assert next(m.id for m in models.data) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=50)
    assert "top_logprobs" in str(err.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=msgs, top_logprobs=2)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-adapter", messages=msgs)
    assert "no-such-adapter" in str(missing.value)
