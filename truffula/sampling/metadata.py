"""Device tensors describing one step's sampling parameters, one row per sampled sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from truffula.device import host_tensor, to_device
from truffula.sampling.params import SamplingParams
from truffula.structured.compiler import Constraint
from truffula.structured.mask import fill_bitmask


@dataclass
class SamplingBatch:
    temperature: torch.Tensor | None
    """[B] float; 1.0 on greedy rows (their processed distribution is not temperature-scaled).
    None when every row is greedy (as is ``greedy``)."""
    greedy: torch.Tensor | None
    """[B] bool."""
    all_greedy: bool
    top_k: torch.Tensor | None
    """[B] long, 0 = off; None when no row filters by top-k."""
    top_k_max: int
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    typical_p: torch.Tensor | None
    penalty_rows: torch.Tensor | None
    """[P] long: rows with a repetition / frequency / presence penalty."""
    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    prompt_tokens: torch.Tensor | None
    """[P, Lp] long, padded with ``vocab_size`` (a column that is dropped)."""
    output_tokens: torch.Tensor | None
    """[P, Lo] long, padded with ``vocab_size``."""
    generators: dict[int, torch.Generator]
    """Row -> generator of a seeded request."""
    processed_rows: torch.Tensor | None
    """[R1] long: rows reporting logprobs of the processed distribution."""
    raw_rows: torch.Tensor | None
    """[R2] long: rows reporting logprobs of the raw distribution."""
    max_k: int
    """Largest number of alternatives asked in this step (0: chosen token only)."""
    grammar_rows: torch.Tensor | None = None
    """[G] long: rows with a structured-output constraint."""
    grammar_mask: torch.Tensor | None = None
    """[G, ceil(vocab / 32)] int32: their allowed tokens (``truffula.structured.mask``)."""


def build_sampling_batch(
    params: list[SamplingParams],
    prompts: list[list[int]],
    outputs: list[list[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
    constraints: list[Constraint | None] | None = None,
) -> SamplingBatch:
    """Gather per-request parameters into tensors; rows that need nothing cost nothing later.
    ``constraints``: each row's structured-output matcher (None: free), already advanced by
    every token the row sampled; their bitmask is filled here, on the host."""
    n = len(params)

    def col(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        return host_tensor(values, dtype, device)

    def rows(pred: list[bool]) -> torch.Tensor | None:
        idx = [i for i in range(n) if pred[i]]
        return col(idx, torch.long) if idx else None

    greedy = [p.greedy for p in params]
    temperature = [1.0 if p.greedy else p.temperature for p in params]
    pen = [i for i, p in enumerate(params) if p.needs_penalties]
    penalty_rows = repetition = frequency = presence = prompt_t = output_t = None
    if pen:
        penalty_rows = col(pen, torch.long)
        repetition = col([params[i].repetition_penalty for i in pen], torch.float32)
        frequency = col([params[i].frequency_penalty for i in pen], torch.float32)
        presence = col([params[i].presence_penalty for i in pen], torch.float32)
        prompt_t = _padded([prompts[i] for i in pen], vocab_size, device)
        output_t = _padded([outputs[i] for i in pen], vocab_size, device)
    all_greedy = all(greedy)
    grammar_rows = grammar_mask = None
    cons = [(i, c) for i, c in enumerate(constraints or ()) if c is not None]
    if cons:
        grammar_rows = col([i for i, _ in cons], torch.long)
        grammar_mask = to_device(fill_bitmask([c for _, c in cons], vocab_size), device)
    return SamplingBatch(  # all-greedy batches skip the tensors only sampling needs
        temperature=col(temperature, torch.float32) if not all_greedy else None,
        greedy=col(greedy, torch.bool) if not all_greedy else None,
        all_greedy=all_greedy,
        top_k=col([p.top_k for p in params], torch.long)
        if any(p.top_k > 0 for p in params)
        else None,
        top_k_max=max((p.top_k for p in params), default=0),
        top_p=col([p.top_p for p in params], torch.float32)
        if any(p.top_p < 1 for p in params)
        else None,
        min_p=col([p.min_p for p in params], torch.float32)
        if any(p.min_p > 0 for p in params)
        else None,
        typical_p=(
            col([p.typical_p for p in params], torch.float32)
            if any(p.typical_p < 1 for p in params)
            else None
        ),
        penalty_rows=penalty_rows,
        repetition=repetition,
        frequency=frequency,
        presence=presence,
        prompt_tokens=prompt_t,
        output_tokens=output_t,
        generators={i: g for i, g in enumerate(generators) if g is not None},
        processed_rows=rows([p.wants_logprobs and p.logprobs_mode == "processed" for p in params]),
        raw_rows=rows([p.wants_logprobs and p.logprobs_mode == "raw" for p in params]),
        max_k=max((p.return_k_alternatives for p in params), default=0),
        grammar_rows=grammar_rows,
        grammar_mask=grammar_mask,
    )


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return to_device(out, device)
