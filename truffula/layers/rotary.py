"""Rotary position embeddings (half-rotation layout, as in HF transformers).

Supports the ``rope_type`` values default, linear, llama3, yarn and longrope, and partial rotary
dimensions (GPT-NeoX, Phi). One module is shared by all layers of a model; the runner looks up
its cos/sin once per step (``RotaryEmbedding.step_tables``).

LongRoPE follows transformers' rule (``dynamic_rope_update``): a forward call uses the long
factors for *all* its tokens when the sequence length so far (last position + 1) exceeds
``original_max_position_embeddings``, else the short factors; keys already in the cache keep the
rotation they were written with. Here the choice is made per sequence and step: the tokens of a
sequence in a step use the long factors when that sequence's length after the step exceeds the
original context. This equals HF ``generate`` (prefill, then one token per step); a prompt
prefilled in chunks switches at the first chunk that crosses the original context, exactly as
HF fed the same chunks with a cache would. Unlike HF's batched forward (which decides by the
longest sequence of the batch), a sequence's numbers do not depend on its batch neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from truffula.errors import ModelLoadError
from truffula.forward import AttentionMetadata, get_forward_context
from truffula.kernels.rotary_torch import apply_rotary
from truffula.kernels.select import Kernels, RotaryFn


def rope_parameters(config: Any) -> dict[str, Any]:
    """The rope dict of a HF config (transformers 5 ``rope_parameters`` or 4.x fields)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" not in params and "full_attention" in params:
        params = params["full_attention"]
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def partial_rotary_factor(config: Any, params: dict[str, Any]) -> float:
    """Fraction of head_dim that rotates: transformers 5 keeps it in the rope dict."""
    for value in (
        params.get("partial_rotary_factor"),
        getattr(config, "partial_rotary_factor", None),
        getattr(config, "rotary_pct", None),
    ):
        if value:
            return float(value)
    return 1.0


def inv_freq_and_scale(
    config: Any, rot_dim: int, params: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    exponent = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    inv_freq = 1.0 / (base**exponent)
    max_pos = int(getattr(config, "max_position_embeddings", 2048))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params, max_pos), 1.0
    if kind == "yarn":
        return _yarn(base, rot_dim, params, max_pos)
    if kind == "longrope":
        short, _, scale, _ = longrope(config, rot_dim, params)
        return short, scale  # the long factors are chosen per sequence and step, see module doc
    raise ModelLoadError(
        f"rope_type {kind!r} is not supported (default, linear, llama3, yarn, longrope)"
    )


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any], max_pos: int) -> torch.Tensor:
    factor, low, high = (
        float(p["factor"]),
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
    )
    old_len = float(p.get("original_max_position_embeddings", max_pos))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = float(p["factor"])
    orig = float(p.get("original_max_position_embeddings") or max_pos)
    scale = p.get("attention_factor")
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast, beta_slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(scale)


def longrope(
    config: Any, dim: int, p: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(short inv_freq, long inv_freq, attention factor, original context) as transformers
    computes them: the factor is ``rope_parameters["factor"]`` or max / original positions."""
    base = float(p["rope_theta"])
    orig = int(
        p.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )
    factor = p.get("factor") or config.max_position_embeddings / orig
    scale = p.get("attention_factor")
    if scale is None:
        scale = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(p["short_factor"], dtype=torch.float32) * base**exponent)
    long = 1.0 / (torch.tensor(p["long_factor"], dtype=torch.float32) * base**exponent)
    return short, long, float(scale), orig


class RotaryEmbedding(nn.Module):
    """The model's rotary embedding, shared by all its layers. The tables of cos/sin over every
    position are made once, on the model's device, when the kernels are bound. With the torch
    kernel the runner looks up the step's cos/sin once (``step_tables``) and layers read them
    from the forward context; a Triton kernel looks them up by position itself."""

    def __init__(self, config: Any, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.params = rope_parameters(config)
        self.rope_type: str = self.params["rope_type"]
        self.rot_dim = int(head_dim * partial_rotary_factor(config, self.params))
        self.config = config
        self.max_len = max_len
        self.cos_table = torch.empty(0)
        """[max_len, rot_dim] fp32 (attention scaling folded in); the short factors' for
        longrope."""
        self.sin_table = torch.empty(0)
        #: longrope only: cos/sin with the long factors, and the original context length
        self._long: tuple[torch.Tensor, torch.Tensor] | None = None
        self._orig = 0
        self.kernel: RotaryFn | None = None
        """The Triton kernel, or None: torch with the step's cos/sin."""
        self.rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._rotate_torch
        """(positions, x) -> rotated x, through ``kernel`` when there is one."""

    def use_kernels(self, kernels: Kernels) -> None:
        self._build(kernels.device)
        self.kernel = kernels.rotary(self.rope_type)
        self.rotate = self._rotate_torch if self.kernel is None else self._rotate_kernel

    @property
    def uses_step_tables(self) -> bool:
        """The forward context must carry the step's cos/sin (``step_tables``)."""
        return self.kernel is None

    def _table(
        self, inv_freq: torch.Tensor, scale: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_len, rot_dim] of positions 0..max_len-1."""
        pos = torch.arange(self.max_len, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(device), (emb.sin() * scale).to(device)

    def _build(self, device: torch.device) -> None:
        if self.rope_type == "longrope":
            short, long, scale, self._orig = longrope(self.config, self.rot_dim, self.params)
            self.cos_table, self.sin_table = self._table(short, scale, device)
            self._long = self._table(long, scale, device)
            return
        inv_freq, scale = inv_freq_and_scale(self.config, self.rot_dim, self.params)
        self.cos_table, self.sin_table = self._table(inv_freq, scale, device)

    def _long_rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | bool:
        """Which of the step's tokens take the long factors: [T, 1, 1] bool, or one bool for all."""
        flags = [n > self._orig for n in meta.seq_lens_cpu]
        if not any(flags):
            return False
        if all(flags):
            return True
        starts = meta.query_start_loc_cpu
        counts = torch.tensor([starts[i + 1] - starts[i] for i in range(len(flags))])
        rows = torch.tensor(flags).repeat_interleave(counts)
        return rows.to(positions.device)[:, None, None]

    def step_tables(
        self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rot_dim] in ``dtype`` for the step's ``positions`` [T] (built once per
        step by the runner, read by every layer)."""
        if self.cos_table.device != positions.device or not self.cos_table.numel():
            self._build(positions.device)  # a model whose kernels were never bound
        cos = self.cos_table.index_select(0, positions).unsqueeze(1)
        sin = self.sin_table.index_select(0, positions).unsqueeze(1)
        if self._long is not None:
            rows = self._long_rows(positions, meta)
            if rows is not False:
                long_cos = self._long[0].index_select(0, positions).unsqueeze(1)
                long_sin = self._long[1].index_select(0, positions).unsqueeze(1)
                if rows is True:
                    cos, sin = long_cos, long_sin
                else:
                    cos = torch.where(rows, long_cos, cos)
                    sin = torch.where(rows, long_sin, sin)
        return cos.to(dtype), sin.to(dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (first ``rot_dim`` dims) by ``positions`` [T]."""
        return self.rotate(positions, x)

    def _rotate_torch(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        assert ctx.cos is not None and ctx.sin is not None, "the step has no rotary tables"
        return apply_rotary(x, ctx.cos, ctx.sin, self.rot_dim)

    def _rotate_kernel(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None
        return self.kernel(x, positions, self.cos_table, self.sin_table, self.rot_dim)
