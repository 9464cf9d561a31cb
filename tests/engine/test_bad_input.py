"""Every bad input gets a typed error naming the field; other requests are untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from truffula.errors import ModelLoadError, RequestValidationError
from truffula.sampling.params import SamplingParams

BAD_PARAMS = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"typical_p": 0.0}, "typical_p"),
    ({"typical_p": 1.01}, "typical_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
    ({"return_k_alternatives": -1}, "return_k_alternatives"),
    ({"return_k_alternatives": 51}, "return_k_alternatives"),
    ({"prompt_k_alternatives": 1000}, "prompt_k_alternatives"),
    ({"logprobs_mode": "weird"}, "logprobs_mode"),
    ({"truncate": 0}, "truncate"),
    ({"seed": -5}, "seed"),
]


@pytest.mark.parametrize(("change", "field"), BAD_PARAMS)
def test_bad_parameter_names_its_field(llm, change, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestValidationError) as err:
        llm.engine.add_request("hello", SamplingParams(**change))
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


def test_prompt_too_long_errors_or_truncates(llm) -> None:  # type: ignore[no-untyped-def]
    n = llm.engine.max_len
    ids = [504] * (n + 5)
    with pytest.raises(RequestValidationError) as err:
        llm.engine.add_request(ids, SamplingParams(max_new_tokens=2))
    assert err.value.field == "inputs" and str(n) in str(err.value)
    (out,) = llm.generate([ids], SamplingParams(max_new_tokens=2, temperature=0, truncate=20))
    assert len(out.prompt_token_ids) == 20 and len(out.token_ids) == 2
    with pytest.raises(RequestValidationError) as err:
        llm.engine.add_request("hi", SamplingParams(max_new_tokens=n))
    assert err.value.field == "max_new_tokens"


def test_empty_and_out_of_vocab_inputs(llm) -> None:  # type: ignore[no-untyped-def]
    for prompt in ("", []):
        with pytest.raises(RequestValidationError) as err:
            llm.engine.add_request(prompt, SamplingParams())
        assert err.value.field == "inputs"
    with pytest.raises(RequestValidationError):
        llm.engine.add_request([1, 10**9], SamplingParams())


def test_bad_requests_leave_running_requests_untouched(llm) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    (ref,) = llm.generate(["The sun rises in the"], params)
    core = llm.engine
    rid = core.add_request("The sun rises in the", params)
    tokens: list[int] = []
    done = False
    while not done:
        for change, _ in BAD_PARAMS:
            with pytest.raises(RequestValidationError):
                core.add_request("bad", SamplingParams(**change))
        for out in core.step():
            assert out.request_id == rid
            tokens += [t.id for t in out.tokens]
            done = out.finished
    assert tokens == ref.token_ids
    assert not core.requests and core.pool.num_used == 0


def test_abort_frees_everything(llm) -> None:  # type: ignore[no-untyped-def]
    core = llm.engine
    params = SamplingParams(max_new_tokens=50, ignore_eos=True)  # sampled: EOS must not end it
    rid = core.add_request("Tell me a long story about dragons.", params)
    core.step()
    core.step()
    assert core.pool.num_used > 0
    out = core.abort(rid)
    assert out is not None and out.finish_reason == "abort"
    assert core.pool.num_used == 0 and not core.has_work()
    assert core.abort(rid) is None
    core.step()
    assert rid not in core.requests and core.scheduler.get(rid) is None


def test_missing_model_and_unknown_architecture(tmp_path: Path, model_dir: Path) -> None:
    from truffula.model_store.resolve import resolve_model
    from truffula.models.registry import load_model

    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_model("nobody/no-such-model-xyz")
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["TotallyNewForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    import torch

    with pytest.raises(ModelLoadError, match="TotallyNewForCausalLM"):
        load_model(odd, torch.float32, torch.device("cpu"), None)


def test_corrupt_safetensors(tmp_path: Path, model_dir: Path) -> None:
    import torch

    from truffula.models.registry import load_model

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, broken / f.name)
    data = (model_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(broken, torch.float32, torch.device("cpu"), None)
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(broken, torch.float32, torch.device("cpu"), None)


@pytest.mark.parametrize("model", ["/no/such/folder", "__corrupt__"])
def test_cli_reports_one_clear_error_without_traceback(
    tmp_path: Path, model_dir: Path, model: str
) -> None:
    if model == "__corrupt__":
        shutil.copytree(
            model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("model.safetensors")
        )
        (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
        model = str(tmp_path / "m")
    proc = subprocess.run(
        [sys.executable, "-m", "truffula.cli", "generate", "hi", "--model", model],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("truffula: error:") and model.split("/")[-1] in proc.stderr
