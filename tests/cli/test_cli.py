"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def test_generate_streams_a_greedy_chat_completion(llm) -> None:  # type: ignore[no-untyped-def]
    from truffula.sampling.params import SamplingParams

    question = "What is the capital of France?"
    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "generate", question, "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    (ref,) = llm.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0))
    assert proc.stdout == ref.text + "\n"
    assert "Paris" in proc.stdout


def test_generate_bad_parameter_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "generate", "hi", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr
