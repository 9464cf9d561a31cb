"""``POST /score`` and OpenAI ``echo`` + ``max_tokens: 0`` against HF teacher-forced logprobs."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from helpers import hf_logsoftmax, randomize_lora

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CONTINUATIONS = [" Paris", " London, obviously.", "\n\nIt is a city of 2 million people."]
TOL = 1e-4


def post(server, path: str, body: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(server.url + path, json=body, timeout=120)


def hf_rank(row: torch.Tensor, token: int) -> tuple[int, float]:
    """1 + the number of tokens strictly more likely, and the gap to the nearest rival (for ties)."""
    chosen = row[token]
    rank = 1 + int((row > chosen).sum())
    others = torch.cat([row[:token], row[token + 1 :]])
    return rank, float((others - chosen).abs().min())


def test_score_matches_hf_teacher_forcing(server, hf_model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = post(server, "/score", {"prompt": PROMPT, "continuations": CONTINUATIONS, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = hf_tokenizer(PROMPT)["input_ids"]
    assert body["prompt_tokens"] == len(prompt_ids)
    assert [res["continuation"] for res in body["results"]] == CONTINUATIONS
    for text, res in zip(CONTINUATIONS, body["results"], strict=True):
        cont = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + cont
        ref = hf_logsoftmax(hf_model, ids)
        n = len(prompt_ids)
        assert [t["id"] for t in res["tokens"]] == cont
        assert "".join(t["text"] for t in res["tokens"]) == text
        assert res["num_tokens"] == len(cont)
        greedy = True
        for j, tok in enumerate(res["tokens"]):
            row = ref[n + j - 1]
            assert abs(tok["logprob"] - float(row[cont[j]])) < TOL, (text, j)
            rank, gap = hf_rank(row, cont[j])
            if gap > TOL:
                assert tok["rank"] == rank, (text, j)
            greedy = greedy and rank == 1
            top = torch.topk(row, 5)
            alts = tok["alternative_tokens"]
            assert len(alts) == 5
            for alt, value in zip(alts, top.values.tolist(), strict=True):
                assert abs(alt["logprob"] - value) < TOL
            assert [a["logprob"] for a in alts] == sorted(
                (a["logprob"] for a in alts), reverse=True
            )
        total = float(sum(ref[n + j - 1, t] for j, t in enumerate(cont)))
        assert abs(res["total_logprob"] - total) < TOL * len(cont)
        assert abs(res["mean_logprob"] - total / len(cont)) < TOL
        assert res["is_greedy"] is greedy
    paris, london = body["results"][0], body["results"][1]
    assert paris["is_greedy"] and not london["is_greedy"]
    assert paris["total_logprob"] > london["total_logprob"]


def test_score_without_k_has_no_alternatives_and_matches_one_by_one(server) -> None:  # type: ignore[no-untyped-def]
    both = post(server, "/score", {"prompt": PROMPT, "continuations": CONTINUATIONS[:2]}).json()
    for i, text in enumerate(CONTINUATIONS[:2]):
        alone = post(server, "/score", {"prompt": PROMPT, "continuations": [text]}).json()
        (res,) = alone["results"]
        assert all("alternative_tokens" not in t for t in res["tokens"])
        assert [t["id"] for t in res["tokens"]] == [t["id"] for t in both["results"][i]["tokens"]]
        assert abs(res["total_logprob"] - both["results"][i]["total_logprob"]) < TOL


def test_score_base_model_id_is_the_base(server) -> None:  # type: ignore[no-untyped-def]
    model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    base = post(server, "/score", {"prompt": PROMPT, "continuations": [" Paris"]}).json()
    named = post(
        server, "/score", {"prompt": PROMPT, "continuations": [" Paris"], "adapter_id": model}
    ).json()
    assert named["results"] == base["results"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "", "continuations": [" x"]}, "prompt"),
        ({"prompt": PROMPT, "continuations": []}, "continuations"),
        ({"prompt": PROMPT, "continuations": [" x", ""]}, "continuations[1]"),
        ({"prompt": PROMPT}, "continuations"),
        ({"prompt": PROMPT, "continuations": [" x"], "k": 21}, "k"),
        ({"prompt": PROMPT, "continuations": [" x"], "k": 0}, "k"),
        ({"prompt": PROMPT, "continuations": " x"}, "continuations"),
    ],
)
def test_score_validation_errors(server, body: dict[str, Any], field: str) -> None:  # type: ignore[no-untyped-def]
    r = post(server, "/score", body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error_type"] == "validation" and f"`{field}" in err["error"]


def test_score_unknown_adapter_is_404(server) -> None:  # type: ignore[no-untyped-def]
    r = post(server, "/score", {"prompt": PROMPT, "continuations": [" x"], "adapter_id": "nope"})
    assert r.status_code == 404 and r.json()["error_type"] == "adapter"


def test_completions_echo_max_tokens_0_matches_hf(server, hf_model, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = PROMPT + CONTINUATIONS[1]
    r = post(
        server,
        "/v1/completions",
        {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    (choice,) = body["choices"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    ids = hf_tokenizer(text)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(ids)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
    assert "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = hf_logsoftmax(hf_model, ids)
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - float(ref[i - 1, ids[i]])) < TOL, i
        top = lp["top_logprobs"][i]
        assert 1 <= len(top) <= 3
        assert abs(max(top.values()) - float(ref[i - 1].max())) < TOL
    # the same numbers as /score, which scores the continuation after the prompt
    scored = post(server, "/score", {"prompt": PROMPT, "continuations": [CONTINUATIONS[1]]})
    n = scored.json()["prompt_tokens"]
    for j, tok in enumerate(scored.json()["results"][0]["tokens"]):
        assert abs(tok["logprob"] - lp["token_logprobs"][n + j]) < TOL


@pytest.fixture(scope="module")
def lora_server(model_dir, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A random PEFT LoRA adapter ``rand`` (peft model as the reference) and a server serving it."""
    peft = pytest.importorskip("peft")
    from serverproc import ServerProcess
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("score-adapters")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(base, cfg)
    randomize_lora(model, 7, 0.05)
    model.save_pretrained(root / "rand")
    proc = ServerProcess("--adapter-root", str(root), "--max-k-alternatives", "20")
    yield proc, model.eval()
    proc.stop()


def test_score_under_an_adapter_matches_peft(lora_server, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    proc, peft_model = lora_server
    body = {"prompt": PROMPT, "continuations": CONTINUATIONS, "adapter_id": "rand", "k": 3}
    r = post(proc, "/score", body)
    assert r.status_code == 200, r.text
    assert r.headers.get("x-adapter-id")
    base = post(proc, "/score", {**body, "adapter_id": None}).json()
    prompt_ids = hf_tokenizer(PROMPT)["input_ids"]
    n = len(prompt_ids)
    for text, res, res_base in zip(
        CONTINUATIONS, r.json()["results"], base["results"], strict=True
    ):
        cont = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        ref = hf_logsoftmax(peft_model, prompt_ids + cont)
        for j, tok in enumerate(res["tokens"]):
            assert abs(tok["logprob"] - float(ref[n + j - 1, cont[j]])) < TOL, (text, j)
            top = torch.topk(ref[n + j - 1], 3).values.tolist()
            for alt, value in zip(tok["alternative_tokens"], top, strict=True):
                assert abs(alt["logprob"] - value) < TOL
        assert abs(res["total_logprob"] - res_base["total_logprob"]) > 1e-3  # the adapter matters
