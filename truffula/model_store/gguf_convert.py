"""GGUF files -> HF-style safetensors folders (dequantized to fp32), cached by file identity.

Supported ``general.architecture`` values: llama (also what llama.cpp writes for Mistral),
qwen2, qwen3, gemma2, phi3. The conventions of llama.cpp's ``convert_hf_to_gguf.py`` undone here:

- ``LlamaModel.permute``: q/k rows of llama-architecture files are interleaved for llama.cpp's
  "normal" rope; qwen2/qwen3/gemma2/phi3 use NeoX rope and are stored as in HF.
- ``Gemma2Model.modify_tensors``: every ``*norm.weight`` is stored as ``w + 1``.
- ``Phi3MiniModel``: the fused ``qkv_proj`` is ``attn_qkv``, the fused ``gate_up_proj`` is
  ``ffn_up``; LongRoPE factors are the tensors ``rope_factors_{long,short}.weight``.
- Gemma 2's attention scale is not stored: llama.cpp uses ``1/sqrt(head_dim)``, but
  ``1/sqrt(hidden/heads)`` for the 46-layer (27B) model; ``query_pre_attn_scalar`` follows it.

The tokenizer comes from the file's metadata through transformers' GGUF tokenizer builders
(byte-level BPE ``gpt2`` and SentencePiece ``llama`` vocabularies); the default model keeps its own
writer (``default_model``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from truffula import envs
from truffula.errors import ModelLoadError

_DONE_MARKER = ".truffula-complete"
HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
LAYER_NAMES: dict[str, dict[str, str]] = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "qwen3": _COMMON,
    "phi3": {**_COMMON, "ffn_up": "mlp.gate_up_proj"},
    "gemma2": {
        **_COMMON,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_cache_dir(path: Path) -> Path:
    """The converted folder of ``path``: keyed by its name, size and modification time."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return envs.models_dir() / "gguf" / f"{path.stem}-{key[:16]}"


def find_gguf(path: Path) -> Path | None:
    """``path`` if it is a .gguf file; the one .gguf in a folder without config.json."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            names = ", ".join(f.name for f in files[:5])
            raise ModelLoadError(f"{path} holds several GGUF files ({names}); pass one of them")
        return files[0] if files else None
    return None


def ensure_gguf_model(path: Path, progress: bool = True) -> Path:
    """The cached HF folder of GGUF file ``path``, converting it on first use."""
    target = gguf_cache_dir(path)
    if (target / _DONE_MARKER).exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_gguf(path, staging, progress=progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / _DONE_MARKER).write_text(str(path.resolve()) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def read_gguf(path: Path) -> tuple[Any, dict[str, Any]]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct errors, ...
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field type gguf cannot render; none that we read
            continue
    return reader, meta


def convert_gguf(
    path: Path,
    out_dir: Path,
    progress: bool = True,
    write_tokenizer: Callable[[dict[str, Any], Path], None] | None = None,
    name_or_path: str | None = None,
) -> dict[str, Any]:
    """Write config.json, generation_config.json, tokenizer files and model.safetensors."""
    from safetensors.numpy import save_file

    reader, meta = read_gguf(path)
    arch = str(meta.get("general.architecture"))
    if arch not in HF_ARCH:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(HF_ARCH))})"
        )
    config = hf_config(meta, arch, name_or_path or str(meta.get("general.name") or path.stem))
    tensors = gguf_tensors(reader, meta, arch, config, path, progress)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None:  # the vocabulary list may be shorter than the embedding
        config["vocab_size"] = int(embed.shape[0])
    if arch == "phi3":
        _phi3_rope_factors(tensors, meta, config)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    if write_tokenizer is not None:
        write_tokenizer(meta, out_dir)
    else:
        _tokenizer_from_transformers(path, out_dir)
    return config


def gguf_tensors(
    reader: Any,
    meta: dict[str, Any],
    arch: str,
    config: dict[str, Any],
    path: Path,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """HF name -> fp32 array for every tensor of the file, llama.cpp's conventions undone."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    names = LAYER_NAMES[arch]
    out: dict[str, np.ndarray] = {}
    for t in tqdm(
        reader.tensors, desc=f"Converting {path.name}", unit="tensor", disable=not progress
    ):
        if t.name.startswith("rope_factors_"):
            out[t.name] = np.asarray(t.data, dtype=np.float32).reshape(-1)
            continue
        name = _hf_name(t.name, names, path)
        try:
            weight = dequantize(t.data, t.tensor_type).astype(np.float32)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has quantization type {t.tensor_type.name}, which "
                f"cannot be dequantized here ({exc})"
            ) from exc
        if weight.ndim == 2:
            weight = weight.reshape(int(t.shape[1]), int(t.shape[0]))
        if arch == "llama" and ".attn_q." in t.name:
            weight = unpermute(weight, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in t.name:
            weight = unpermute(weight, config["num_key_value_heads"])
        if arch == "gemma2" and t.name.endswith("norm.weight"):
            weight = weight - np.float32(1.0)
        out[name] = np.ascontiguousarray(weight)
    return out


def _hf_name(gguf_name: str, names: dict[str, str], path: Path) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in names:
        raise ModelLoadError(f"{path}: unexpected tensor {gguf_name!r} in the GGUF file")
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of q/k rows (rotary halves interleaved)."""
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def hf_config(meta: dict[str, Any], arch: str, name_or_path: str) -> dict[str, Any]:
    """config.json from the GGUF's hyperparameters (``{arch}.*`` keys)."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata has no {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    rot_dim = int(get("rope.dimension_count", head_dim))
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 0))
    hf_arch, model_type = HF_ARCH[arch]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim if arch != "llama" else rot_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
        "_name_or_path": name_or_path,
    }
    if arch in ("qwen2", "qwen3", "gemma2", "phi3"):
        del config["mlp_bias"]
    if arch == "gemma2":
        layers = config["num_hidden_layers"]
        config["hidden_act"] = config["hidden_activation"] = "gelu_pytorch_tanh"
        config["query_pre_attn_scalar"] = hidden // heads if layers == 46 else head_dim
        config["attn_logit_softcapping"] = meta.get("gemma2.attn_logit_softcapping")
        config["final_logit_softcapping"] = meta.get("gemma2.final_logit_softcapping")
        config["sliding_window"] = meta.get("gemma2.attention.sliding_window")
    if arch == "phi3":
        config["partial_rotary_factor"] = rot_dim / head_dim
        window = meta.get("phi3.attention.sliding_window")
        config["sliding_window"] = int(window) if window else None
        orig = meta.get("phi3.rope.scaling.original_context_length")
        if orig:
            config["original_max_position_embeddings"] = int(orig)
    return config


def _phi3_rope_factors(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], config: dict[str, Any]
) -> None:
    long, short = (
        tensors.pop("rope_factors_long.weight", None),
        tensors.pop("rope_factors_short.weight", None),
    )
    if long is None or short is None:
        return
    config["rope_scaling"] = {
        "type": "longrope",
        "long_factor": [float(x) for x in long],
        "short_factor": [float(x) for x in short],
    }


def _tokenizer_from_transformers(path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers raises several types for unknown tokenizers
        raise ModelLoadError(f"{path}: the GGUF tokenizer cannot be converted: {exc}") from exc
    tok.save_pretrained(str(out_dir))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
