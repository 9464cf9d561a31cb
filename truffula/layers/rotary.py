"""Rotary position embeddings (half-rotation layout, as in HF transformers).

Supports the ``rope_type`` values default, linear, llama3, yarn and longrope (short factors
within the original context, long factors beyond), and partial rotary dimensions (GPT-NeoX,
Phi). One module is shared by all layers of a model; it looks up cos/sin once per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from truffula.errors import ModelLoadError
from truffula.runner.context import get_forward_context


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
        return _longrope(base, rot_dim, params, config), 1.0  # factors chosen per position below
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
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(scale)


def _longrope(base: float, dim: int, p: dict[str, Any], config: Any) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = torch.tensor(p["short_factor"], dtype=torch.float32)
    return 1.0 / (short * base**exponent)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Any, head_dim: int, max_len: int) -> None:
        super().__init__()
        partial = float(getattr(config, "partial_rotary_factor", 1.0) or 1.0)
        self.rot_dim = int(head_dim * partial)
        self.params = rope_parameters(config)
        self.config = config
        self.max_len = max_len
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, device: torch.device) -> None:
        inv_freq, scale = inv_freq_and_scale(self.config, self.rot_dim, self.params)
        pos = torch.arange(self.max_len, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        if self.params["rope_type"] == "longrope":
            freqs, scale = self._longrope_freqs(pos, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = (emb.cos() * scale).to(device)
        self._sin = (emb.sin() * scale).to(device)

    def _longrope_freqs(self, pos: torch.Tensor, short: torch.Tensor) -> tuple[torch.Tensor, float]:
        p, cfg = self.params, self.config
        orig = int(
            p.get("original_max_position_embeddings") or cfg.original_max_position_embeddings
        )
        factor = cfg.max_position_embeddings / orig
        scale = p.get("attention_factor")
        if scale is None:
            scale = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        exponent = torch.arange(0, self.rot_dim, 2, dtype=torch.int64).float() / self.rot_dim
        long_inv = 1.0 / (
            torch.tensor(p["long_factor"]).float() * float(p["rope_theta"]) ** exponent
        )
        long = pos[:, None] * long_inv[None, :]
        return torch.where(pos[:, None] < orig, short, long), float(scale)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, rot_dim] for ``positions``, looked up once per step for all layers."""
        step_cache = get_forward_context().attn.cache
        key = ("rotary", id(self))
        if key not in step_cache:
            if self._cos is None or self._cos.device != positions.device:
                self._build(positions.device)
            assert self._cos is not None and self._sin is not None
            cos = self._cos.index_select(0, positions).unsqueeze(1)
            sin = self._sin.index_select(0, positions).unsqueeze(1)
            step_cache[key] = (cos, sin)
        return step_cache[key]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (first ``rot_dim`` dims) by ``positions`` [T]."""
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rd = self.rot_dim
        if rd == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., :rd], x[..., rd:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
