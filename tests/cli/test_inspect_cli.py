"""``truffula inspect`` run as a user runs it: in-process on the default model, and against a
stand-in server for ``--url``. Each in-process run loads the model (~5 s), so they are few."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

QUESTION = "What is the capital of France?"


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "truffula.cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_json_matches_the_engine_and_html_is_self_contained(llm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from truffula.sampling.params import SamplingParams

    report_path = tmp_path / "report.html"
    proc = inspect(
        QUESTION, "-k", "3", "--max-new-tokens", "8", "--json", "--html", str(report_path)
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    params = SamplingParams(max_new_tokens=8, temperature=0, details=True, return_k_alternatives=3)
    (ref,) = llm.generate([prompt], params)

    assert report["inputs"] == prompt and report["k"] == 3 and report["comparison"] is None
    (run,) = report["runs"]
    assert run["adapter"] is None and run["response"]["generated_text"] == ref.text
    an = run["analysis"]
    assert an["text"] == ref.text and an["finish_reason"] == ref.finish_reason
    assert an["generated_tokens"] == len(ref.tokens) == len(an["tokens"])
    for got, want in zip(an["tokens"], ref.tokens, strict=True):
        assert (got["id"], got["text"], got["rank"]) == (want.id, want.text, want.rank)
        assert got["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        assert got["prob"] == pytest.approx(math.exp(want.logprob), abs=1e-5)
        assert got["entropy"]["source"] == "server"
        assert got["entropy"]["value"] == pytest.approx(want.entropy, abs=1e-5)
        assert [a["id"] for a in got["alternatives"]] == [a.id for a in want.alternatives]
        rival = max(a.logprob for a in want.alternatives if a.id != want.id)
        assert got["margin"] == pytest.approx(want.logprob - rival, abs=1e-5)
    mean = sum(t.logprob for t in ref.tokens) / len(ref.tokens)
    assert an["mean_logprob"] == pytest.approx(mean, abs=1e-5)
    assert an["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-5)

    page = report_path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and " src=" not in page
    assert page.count('tabindex="0"') == len(ref.tokens)
    for t in ref.tokens:
        if t.text.strip():
            assert t.text.strip() in page


@pytest.mark.slow
def test_terminal_output_shows_the_text_table_and_comparison(llm) -> None:  # type: ignore[no-untyped-def]
    from truffula.sampling.params import SamplingParams

    proc = inspect(QUESTION, "-k", "3", "--max-new-tokens", "8", "--compare", "base")
    assert proc.returncode == 0, proc.stderr
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    (ref,) = llm.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))
    assert ref.text in proc.stdout
    assert "Most ambiguous positions" in proc.stdout and "perplexity" in proc.stdout
    assert "identical token sequences" in proc.stdout  # base model against itself


# ---------------------------------------------------------------------- --url, stand-in server
CANNED = {
    "generated_text": "Hi there",
    "details": {
        "finish_reason": "length",
        "prompt_tokens": 4,
        "generated_tokens": 2,
        "skipped_tokens": 0,
        "seed": None,
        "prefill": [],
        "tokens": [
            {"id": 5, "text": "Hi", "logprob": math.log(0.5), "special": False, "skipped": False,
             "rank": 1, "entropy": 1.2,
             "alternative_tokens": [{"id": 5, "text": "Hi", "logprob": math.log(0.5)},
                                    {"id": 6, "text": "Hello", "logprob": math.log(0.4)}]},
            {"id": 7, "text": " there", "logprob": math.log(0.25), "special": False,
             "skipped": False, "rank": 2, "entropy": 1.5,
             "alternative_tokens": [{"id": 8, "text": "!", "logprob": math.log(0.5)},
                                    {"id": 7, "text": " there", "logprob": math.log(0.25)}]},
        ],
    },
}  # fmt: skip


@pytest.fixture()
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body})
            payload = json.dumps(CANNED).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_url_mode_posts_generate_requests_and_analyzes_the_reply(fake_server) -> None:  # type: ignore[no-untyped-def]
    url, seen = fake_server
    proc = inspect("Say hi", "--url", url, "-k", "2", "--adapter", "me/lora", "--compare", "base",
                   "--max-new-tokens", "2", "--json", "--raw")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [s["path"] for s in seen] == ["/generate", "/generate"]
    first, second = (s["body"] for s in seen)
    assert first["inputs"] == "Say hi"
    assert first["parameters"] == {
        "max_new_tokens": 2,
        "details": True,
        "do_sample": False,
        "return_k_alternatives": 2,
        "adapter_id": "me/lora",
    }
    assert "adapter_id" not in second["parameters"]  # 'base' = the base model
    report = json.loads(proc.stdout)
    assert [r["label"] for r in report["runs"]] == ["me/lora", "base model"]
    an = report["runs"][0]["analysis"]
    # margins: ln(.5/.4) and ln(.25/.5) = -ln 2; perplexity = exp(-(ln .5 + ln .25) / 2) = sqrt(8)
    assert an["tokens"][0]["margin"] == pytest.approx(math.log(1.25))
    assert an["tokens"][1]["margin"] == pytest.approx(-math.log(2))
    assert an["perplexity"] == pytest.approx(math.sqrt(8))
    assert report["comparison"]["first_divergence"] is None
    assert report["comparison"]["mean_tv"] == 0


def test_url_mode_reports_server_errors_cleanly() -> None:
    proc = inspect("hi", "--url", "http://127.0.0.1:9", "--json")
    assert proc.returncode == 2 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bad_parameter_is_a_clear_error_before_the_model_loads() -> None:
    proc = inspect("hi", "-k", "50", "--json")
    assert proc.returncode == 2 and "return_k_alternatives" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
