"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
    """The sampling flags are checked before the model loads."""
    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "generate", "hi", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr


def test_flags_left_out_are_the_config_defaults() -> None:
    """Every default of the command line is a config dataclass's default, read from there."""
    from dataclasses import FrozenInstanceError, replace

    from truffula.cli import build_parser, engine_config
    from truffula.cli.serve import server_settings
    from truffula.config import EngineConfig
    from truffula.server.settings import ServerSettings

    parser = build_parser()
    for command in (["generate"], ["serve"], ["inspect", "hi"]):
        assert engine_config(parser.parse_args(command)) == EngineConfig(), command
    settings = server_settings(parser.parse_args(["serve"]))
    assert settings.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert replace(settings, started=0) == ServerSettings(settings.model_id, started=0)
    with pytest.raises(FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    flags = ["serve", "--port", "9", "--preload-adapter", "a", "--preload-adapter", "b"]
    given = server_settings(parser.parse_args([*flags, "--max-request-bytes", "1KiB"]))
    assert (given.port, given.preload_adapters, given.max_request_bytes) == (9, ("a", "b"), 1024)


def test_serve_help_quotes_the_config_defaults() -> None:
    from truffula.config import DEVICE_DEFAULTS

    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    gpu, cpu = DEVICE_DEFAULTS["cuda"], DEVICE_DEFAULTS["cpu"]
    assert (
        f"token budget of one step (default: {gpu.max_num_batched_tokens} on CUDA, "
        f"{cpu.max_num_batched_tokens} on CPU)" in text
    )
    assert f"(default: {gpu.max_num_seqs} on CUDA, {cpu.max_num_seqs} on CPU)" in text
    assert "what is left (default 0.90)" in text and "(default 4 MiB)" in text


def test_a_bad_server_setting_is_a_clear_error_before_the_model_loads() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "serve", "--api-server-count", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "api_server_count must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr
