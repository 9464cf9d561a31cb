"""Write a HF model as a GGUF file the way llama.cpp's ``convert_hf_to_gguf.py`` does (test side).

Conventions applied (all from llama.cpp's ``convert_hf_to_gguf.py`` and gguf-py):
- tensor names: gguf-py ``tensor_mapping.py`` (``blk.{i}.attn_q``, ``ffn_up``, ...; Phi-3's fused
  ``qkv_proj`` -> ``attn_qkv`` and ``gate_up_proj`` -> ``ffn_up``; Gemma 2's four norms
  ``attn_norm``, ``post_attention_norm``, ``ffn_norm``, ``post_ffw_norm``);
- ``LlamaModel.permute``: q and k rows of llama-architecture models (Llama, and Mistral, which
  llama.cpp registers under ``LlamaModel``) interleaved for llama.cpp's normal rope;
- ``Gemma2Model.modify_tensors``: ``*norm.weight`` stored as ``w + 1``, no ``lm_head``;
- hyperparameters: ``{arch}.embedding_length``, ``attention.head_count[_kv]``,
  ``rope.dimension_count``, ``attention.key_length`` (Qwen3, Gemma 2), Gemma 2's softcaps and
  ``attention.sliding_window``;
- tokenizers: ``gpt2`` (byte-level BPE: tokens, token types, merges) or ``llama``
  (SentencePiece: tokens, scores, types; byte tokens ``<0xXX>`` of type 6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA2 = {
    **LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute`` (n_head already the kv head count for k)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str, arch: str) -> str:
    glob = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in glob:
        return glob[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{(GEMMA2 if arch == 'gemma2' else LAYER)[module]}.{kind}"


def gpt2_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    letters = "etaoinshrdlu"
    pairs = [a + b for a in letters for b in letters][: size - len(chars) - 1]
    tokens = chars + pairs + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, types, [f"{p[0]} {p[1]}" for p in pairs]


def spm_vocab(size: int) -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    tokens += pieces[: size - len(tokens)]
    types += [1] * (len(tokens) - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, types, scores


def write_gguf(
    model: Any, arch: str, path: Path, tokenizer: str = "gpt2", qtype: str = "F32"
) -> None:
    import gguf

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-" + arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    rot = int(head_dim * (cfg.rope_parameters.get("partial_rotary_factor") or 1.0))
    w.add_rope_dimension_count(rot)
    if arch in ("qwen3", "gemma2"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
    if tokenizer == "gpt2":
        tokens, types, merges = gpt2_vocab(cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 1)
        w.add_eos_token_id(len(tokens) - 1)
    else:
        tokens, types, scores = spm_vocab(cfg.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False) or arch == "gemma2":
        state.pop("lm_head.weight", None)
    for name, arr in state.items():
        if "rotary_emb" in name:
            continue
        if arch == "llama" and ".q_proj.weight" in name:
            arr = llama_permute(arr, heads)
        elif arch == "llama" and ".k_proj.weight" in name:
            arr = llama_permute(arr, kv)
        if arch == "gemma2" and name.endswith("norm.weight"):
            arr = arr + 1
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name, arch), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
