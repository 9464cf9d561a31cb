"""Reference computations with HF transformers, written independently of truffula's code."""

from __future__ import annotations

import torch


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    """HF greedy continuation and, per step, the margin between its top-2 logits."""
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=hf_model.config.eos_token_id,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    margins = []
    for s in out.scores:
        top2 = torch.topk(s[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


def assert_same_greedy(
    ours: list[int], ref: list[int], margins: list[float], tie: float = 1e-4
) -> None:
    """Equal token for token, except that generation may part at a genuine tie (top-2 margin
    under ``tie``), where either choice is a correct greedy pick."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            assert margins[i] < tie, f"diverged at {i}: {a} vs {b} (margin {margins[i]:.2e})"
            return
    assert len(ours) == len(ref), (ours, ref)


@torch.no_grad()
def hf_logsoftmax(hf_model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Teacher-forced log-softmax [len(ids), vocab] in fp32."""
    return hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@torch.no_grad()
def randomize_lora(peft_model, seed: int, scale: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    """Give every LoRA factor of a peft model random values (N(0, scale²), seeded): an adapter
    whose effect is large enough to see."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
