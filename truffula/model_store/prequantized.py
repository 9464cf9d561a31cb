"""Pre-quantized checkpoints read as full-precision ones: each quantized linear's tensors are
turned back into its dense ``.weight`` as the loader reads it, so every architecture and device
loads them with the one weight loader (``truffula/models/loader.py``).

The formats, by the ``quantization_config`` of the model's ``config.json``:

- ``gptq`` (AutoGPTQ / GPTQModel, ``checkpoint_format`` ``gptq``; 2, 4 or 8 bits): ``qweight``
  int32 ``[in * bits / 32, out]``, the values of consecutive input rows packed from the low bits
  up; ``qzeros`` int32 ``[groups, out * bits / 32]`` packed the same way along the output
  columns, each stored as zero - 1; ``scales`` ``[groups, out]``; ``g_idx`` (the group of each
  input row; ``desc_act`` checkpoints permute it). ``W[o, i] = (q - (z + 1)) * s`` by group.
  ``gptq_v2`` stores the zeros as they are.
- ``awq`` (AutoAWQ, ``version`` ``gemm``; 4 bits): ``qweight`` int32 ``[in, out / 8]`` and
  ``qzeros`` int32 ``[groups, out / 8]``, eight output columns a word in the order
  0, 2, 4, 6, 1, 3, 5, 7; ``scales`` ``[groups, out]``; ``W = (q - z) * s``.
- ``compressed-tensors`` with ``format`` ``float-quantized`` (llm-compressor FP8): ``weight``
  float8_e4m3fn with ``weight_scale`` per tensor or per output channel; ``W = q * s``.
  ``input_scale`` (static activation scales) is not used: activations stay unquantized.
- ``fp8`` (transformers' fine-grained FP8, DeepSeek-V3 style): ``weight`` float8_e4m3fn with
  ``weight_scale_inv`` per ``weight_block_size`` block; ``W = q * s`` by block.

The weights are served dequantized (in the model's dtype): the model is the quantized one, at
full-precision cost; ``--quantization int8`` can quantize it again. A 4-bit GPTQ (without
``desc_act``'s permutation) or AWQ linear also leaves its grid (``Int4Grid``: each group's scale
and zero), so that ``--quantization int4`` keeps the checkpoint's own integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from truffula.errors import ModelLoadError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's column order inside a packed word: nibble i holds column AWQ_ORDER[i]."""

FORMATS = ("gptq", "awq", "compressed-tensors (float-quantized)", "fp8")

Int4Grid = tuple[torch.Tensor, torch.Tensor, int]
"""A 4-bit linear's float32 scales and zeros [out, groups] and its group size:
``W = (q - zero) * scale`` by group of input columns."""


class DequantizingSource:
    """Tensors of one or more safetensors files (``sources``), with each quantized linear's
    tensors replaced by its dense ``<module>.weight``."""

    def __init__(self, sources: list[Any], qconfig: Mapping[str, Any], where: str) -> None:
        self.where = where
        self.owner: dict[str, Any] = {n: f for f in sources for n in f.keys()}  # noqa: SIM118
        self.rule = _rule(qconfig, where)
        names = set(self.owner)
        self.quantized = {
            n.removesuffix(self.rule.marker) for n in names if n.endswith(self.rule.marker)
        }
        hidden = {m + s for m in self.quantized for s in self.rule.parts}
        self.names = [n for n in self.owner if n not in hidden]
        """What the loader reads: the checkpoint's names, a dense ``.weight`` for each
        quantized linear in place of its parts."""
        self.names += [m + ".weight" for m in sorted(self.quantized)]
        self.grids: dict[str, Int4Grid] = {}
        """Module name -> its 4-bit grid, for the 4-bit linears read so far."""

    def get_tensor(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in self.quantized:
            parts = {}
            for suffix in self.rule.needs:
                if module + suffix not in self.owner:
                    raise ModelLoadError(f"{self.where}: {module + suffix} is missing")
                parts[suffix] = self.owner[module + suffix].get_tensor(module + suffix)
            try:
                dense = self.rule.dequantize(parts).float()
                grid = self.rule.grid(parts) if self.rule.grid is not None else None
                if grid is not None:
                    self.grids[module] = grid
                return dense
            except (RuntimeError, ValueError) as exc:
                raise ModelLoadError(f"{self.where}: cannot dequantize {module}: {exc}") from exc
        return self.owner[name].get_tensor(name)


class _Rule:
    def __init__(
        self,
        marker: str,
        needs: tuple[str, ...],
        parts: tuple[str, ...],
        dequantize: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        grid: Callable[[dict[str, torch.Tensor]], Int4Grid | None] | None = None,
    ) -> None:
        self.marker = marker
        """The suffix that marks a quantized linear (``.qweight``, ``.weight_scale``)."""
        self.needs = needs
        self.parts = parts
        """Every suffix of a quantized linear's tensors, hidden from the loader."""
        self.dequantize = dequantize
        self.grid = grid
        """A 4-bit linear's grid (None: the format or this linear has none)."""


def _rule(q: Mapping[str, Any], where: str) -> _Rule:
    method = q.get("quant_method")
    if method == "gptq":
        bits = _bits(q, (2, 4, 8), where)
        v2 = q.get("checkpoint_format", "gptq") == "gptq_v2"
        needs: tuple[str, ...] = (".qweight", ".qzeros", ".scales", ".g_idx")
        grid = (lambda t: gptq_grid(t, v2)) if bits == 4 else None
        return _Rule(".qweight", needs, needs, lambda t: gptq_dequantize(t, bits, v2), grid)
    if method == "awq":
        bits = _bits(q, (4,), where)
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise ModelLoadError(f"{where}: AWQ version {q.get('version')!r} is not read (gemm is)")
        needs = (".qweight", ".qzeros", ".scales")
        group = int(q["group_size"])
        return _Rule(
            ".qweight",
            needs,
            needs,
            lambda t: awq_dequantize(t, group),
            lambda t: awq_grid(t, group),
        )
    if method == "compressed-tensors":
        if q.get("format") != "float-quantized":
            raise ModelLoadError(
                f"{where}: compressed-tensors format {q.get('format')!r} is not read "
                "(float-quantized, FP8, is)"
            )
        needs = (".weight", ".weight_scale")
        parts = (*needs, ".input_scale")
        return _Rule(".weight_scale", needs, parts, lambda t: fp8_dequantize(t, ".weight_scale"))
    if method == "fp8":
        needs = (".weight", ".weight_scale_inv")
        block = q.get("weight_block_size")
        if block is not None and not (
            isinstance(block, list | tuple) and len(block) == 2 and all(int(b) > 0 for b in block)
        ):
            raise ModelLoadError(f"{where}: weight_block_size {block!r} is not two sizes")
        size = (int(block[0]), int(block[1])) if block else None
        return _Rule(
            ".weight_scale_inv", needs, (*needs, ".input_scale"), lambda t: fp8_blocks(t, size)
        )
    raise ModelLoadError(
        f"{where}: quantization {method!r} is not read; truffula reads {', '.join(FORMATS)}"
    )


def _bits(q: Mapping[str, Any], allowed: tuple[int, ...], where: str) -> int:
    bits = q.get("bits")
    if bits not in allowed:
        raise ModelLoadError(f"{where}: {q.get('quant_method')} with {bits} bits is not read")
    return int(bits)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n * bits / 32, m]`` -> ``[n, m]``: each word holds ``32 / bits`` consecutive rows,
    the first in the lowest bits."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n, m * bits / 32]`` -> ``[n, m]``: each word holds ``32 / bits`` consecutive
    columns, the first in the lowest bits."""
    return unpack_rows(packed.t().contiguous(), bits).t()


def gptq_dequantize(t: Mapping[str, torch.Tensor], bits: int, v2: bool = False) -> torch.Tensor:
    q = unpack_rows(t[".qweight"], bits)  # [in, out]
    z = unpack_columns(t[".qzeros"], bits) + (0 if v2 else 1)  # [groups, out]
    g = t[".g_idx"].long()
    scales = t[".scales"].float()
    if q.shape[0] != g.shape[0] or z.shape != scales.shape or q.shape[1] != scales.shape[1]:
        raise ValueError(
            f"qweight {tuple(q.shape)}, g_idx {tuple(g.shape)}, zeros {tuple(z.shape)} and "
            f"scales {tuple(scales.shape)} do not fit together"
        )
    return ((q - z[g]).float() * scales[g]).t().contiguous()


def gptq_grid(t: Mapping[str, torch.Tensor], v2: bool) -> Int4Grid | None:
    """A 4-bit GPTQ linear's grid; None when ``g_idx`` is not consecutive groups of one size
    (``desc_act``), which the int4 layout cannot hold."""
    z = unpack_columns(t[".qzeros"], 4) + (0 if v2 else 1)  # [groups, out]
    g = t[".g_idx"].long()
    groups = z.shape[0]
    if g.numel() % groups or not torch.equal(g, torch.arange(g.numel()) // (g.numel() // groups)):
        return None
    return t[".scales"].float().t().contiguous(), z.float().t().contiguous(), g.numel() // groups


def _awq_columns(packed: torch.Tensor) -> torch.Tensor:
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    v = unpack_columns(packed, 4).reshape(packed.shape[0], -1, 8)
    return v[:, :, inverse].reshape(packed.shape[0], -1)


def awq_grid(t: Mapping[str, torch.Tensor], group_size: int) -> Int4Grid:
    z = _awq_columns(t[".qzeros"]).float()
    return t[".scales"].float().t().contiguous(), z.t().contiguous(), group_size


def awq_dequantize(t: Mapping[str, torch.Tensor], group_size: int) -> torch.Tensor:
    q, z = _awq_columns(t[".qweight"]), _awq_columns(t[".qzeros"])
    scales = t[".scales"].float()
    g = torch.arange(q.shape[0]) // group_size
    if z.shape != scales.shape or q.shape[1] != scales.shape[1] or g[-1] >= z.shape[0]:
        raise ValueError(
            f"qweight {tuple(q.shape)}, zeros {tuple(z.shape)} and scales "
            f"{tuple(scales.shape)} do not fit together with group size {group_size}"
        )
    return ((q - z[g]).float() * scales[g]).t().contiguous()


def fp8_dequantize(t: Mapping[str, torch.Tensor], scale_name: str) -> torch.Tensor:
    """Per-tensor (``[]`` or ``[1]``) or per-output-channel (``[out]``, ``[out, 1]``) scales."""
    w, s = t[".weight"].float(), t[scale_name].float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == w.shape[0]:
        return w * s.reshape(-1, 1)
    raise ValueError(f"scale {tuple(s.shape)} fits neither the tensor nor its rows {w.shape[0]}")


def fp8_blocks(t: Mapping[str, torch.Tensor], block: tuple[int, int] | None) -> torch.Tensor:
    """A scale per ``block`` (rows, columns) of the weight; without blocks, as ``fp8_dequantize``."""
    w, s = t[".weight"].float(), t[".weight_scale_inv"].float()
    if block is None or s.dim() < 2:
        return fp8_dequantize({".weight": w, ".s": s}, ".s")
    want = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    if tuple(s.shape) != want:
        raise ValueError(f"scale {tuple(s.shape)} is not one per {block} block ({want})")
    full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return w * full[: w.shape[0], : w.shape[1]]
