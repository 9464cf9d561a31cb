"""Tiny random-weight models for the CUDA engine tests, with a small byte-level BPE tokenizer
trained here (nothing to download), and transformers as their reference on the GPU."""

from __future__ import annotations

from pathlib import Path

import torch

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "one two three four five six seven eight nine ten",
] * 20


def make_model(folder: Path, kind: str) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=320, special_tokens=["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)
    vocab = len(tok)
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    config = (
        LlamaConfig(**common)
        if kind == "llama"
        else Qwen2Config(**common, tie_word_embeddings=True)
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)


def cuda_logsoftmax(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A transformers model's log-softmax over the vocabulary at every position, on the host."""
    return model(torch.tensor([ids], device="cuda")).logits[0].float().log_softmax(-1).cpu()


def assert_fp32_matches_hf(out, ref_model, k: int) -> None:  # type: ignore[no-untyped-def]
    """One fp32 output against the HF model on its own tokens: greedy tokens, generated and
    prompt logprobs within 1e-4, each generated token's ``k`` alternatives HF's top k."""
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        ref = cuda_logsoftmax(ref_model, ids)
    n = len(out.prompt_token_ids)
    assert out.token_ids == ref[n - 1 : -1].argmax(-1).tolist()
    for i, t in enumerate(out.tokens):
        assert abs(t.logprob - ref[n - 1 + i, t.id].item()) < 1e-4
        assert [a.id for a in t.alternatives] == ref[n - 1 + i].topk(k).indices.tolist()
    for pos in range(1, n):
        assert abs(out.prompt_tokens[pos].logprob - ref[pos - 1, ids[pos]].item()) < 1e-4


def hf(folder: Path, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()


PROMPTS = [
    "the quick brown",
    "hello world, this",
    "one two three four five",
    "lazy dog jumps over the quick brown fox",
]
