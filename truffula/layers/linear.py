"""Linear layers with per-shard weight loaders and an optional pre-packed CPU path.

``MergedLinear`` holds several checkpoint projections in one matrix (q/k/v, gate/up) so that a
step runs one matmul instead of three; its ``weight_loader`` copies each checkpoint tensor into
its row range. The kernel is bound at start-up: ``F.linear``, the Triton one-row kernel for 16-bit
weights on CUDA, or, after ``pack_for_cpu()``, oneDNN's over a packed copy of the weight (see
``truffula.kernels.linear_cpu``); the module keeps its shape attributes either way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from truffula.envs import cache_dir
from truffula.kernels import decode_cpu, linear_cpu, quant_fp8, quant_int4, quant_int8
from truffula.kernels.select import GatedRowFn, Kernels, LinearFn
from truffula.model_store.prequantized import Int4Grid

log = logging.getLogger("truffula.layers")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(out_features), requires_grad=False
            )
        else:
            self.bias = None
        self.packed: torch.Tensor | None = None
        self.qweight: torch.Tensor | None = None
        """int8 or fp8 [out, in] after ``quantize`` (with float32 ``qscale`` [out]), or int4's
        packed bytes [out, in / 2] (the whole weight in ``int4``); the dense weight is freed."""
        self.qscale: torch.Tensor | None = None
        self.int4: quant_int4.Int4Weight | None = None
        self.int4_grids: dict[str | None, Int4Grid] = {}
        """A 4-bit checkpoint's grids of the projections this layer holds, by shard (None: the
        whole layer): ``quantize("int4")`` then keeps the checkpoint's integers."""
        self.linear: LinearFn = F.linear
        """The kernel applied to the dense weight (``_dense``)."""
        self.kernel: Callable[[torch.Tensor], torch.Tensor] = self._dense
        """x -> y: ``_dense``, or oneDNN's linear over the packed weight."""

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        if loaded.shape != param.shape:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded)

    def use_kernels(self, kernels: Kernels) -> None:
        if self.packed is None and self.qweight is None:
            self.linear = kernels.linear(self.weight)

    def quantize(self, method: str, kernels: Kernels) -> None:
        """Keep the weight quantized (frees the dense one): ``int8`` with per-output-channel
        scales (``_weight_int8pack_mm`` on CPU where it works, else dequantize-then-matmul);
        ``fp8`` (e4m3) with per-output-channel scales (``kernels.fp8_linear``); ``int4`` in
        groups of input columns (``kernels.int4_linear``; ``qweight`` is then the packed
        bytes, ``int4`` the whole ``Int4Weight``)."""
        dtype, device = self.weight.dtype, self.weight.device
        if method == "int4":
            w4 = self._checkpoint_int4() or quant_int4.quantize_best(self.weight.data)
            assert w4 is not None  # quantize_linears skips the others
            self.kernel = kernels.int4_linear(w4, self.bias)
            self.int4 = w4
            q, scale = w4.packed, w4.scale
        elif method == "fp8":
            q, scale = quant_fp8.quantize(self.weight.data)
            self.kernel = kernels.fp8_linear(q, scale, self.bias)
        else:
            q, scale = quant_int8.quantize(self.weight.data)
            if device.type == "cpu" and quant_int8.cpu_int8pack_available():
                self.kernel = functools.partial(
                    quant_int8.linear_cpu, q=q, scale_bf16=scale.to(torch.bfloat16), bias=self.bias
                )
            else:
                self.kernel = functools.partial(
                    quant_int8.linear_dequant, q=q, scale=scale.to(dtype), bias=self.bias
                )
        self.qweight, self.qscale = q, scale
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    def pack_for_cpu(self) -> None:
        """Replace the dense weight by a oneDNN-packed copy (frees the dense one); a quantized
        weight stays as it is."""
        if self.qweight is not None:
            return
        self.packed = linear_cpu.pack(self.weight.data)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)
        self.kernel = functools.partial(linear_cpu.linear, packed=self.packed, bias=self.bias)

    def _checkpoint_int4(self) -> quant_int4.Int4Weight | None:
        """The weight on its checkpoint's 4-bit grid (exact: the dense weight was made from
        it), when the grids cover every row in one group size of ``quant_int4.GROUPS``; else
        None (``quantize_best`` then rounds it anew)."""
        offsets = getattr(self, "shard_offsets", None) or {None: (0, self.out_features)}
        if set(self.int4_grids) != set(offsets):
            return None
        order = sorted(offsets, key=lambda s: offsets[s][0])
        scale = torch.cat([self.int4_grids[s][0] for s in order])
        zero = torch.cat([self.int4_grids[s][1] for s in order])
        groups = {self.int4_grids[s][2] for s in order}
        if len(groups) != 1 or scale.shape[0] != self.out_features:
            return None
        if groups & set(quant_int4.GROUPS) != groups:  # the sizes the int4 kernels take
            return None
        group = groups.pop()
        s = scale.to(self.weight.device).repeat_interleave(group, dim=1)
        z = zero.to(self.weight.device).repeat_interleave(group, dim=1)
        q = torch.round(self.weight.data.float() / s.clamp(min=1e-30) + z).clamp(0, 15)
        return quant_int4.from_integers(q, scale.to(s.device), zero.to(s.device), group)

    def gated_row(self, x: torch.Tensor, fn: GatedRowFn) -> torch.Tensor | None:
        """act(gate) * up of this [gate | up] layer for one row ``x`` through ``fn`` (the
        kernels' ``gated_row``), or None where ``fn`` does not read this layer's weight (int4,
        int8, oneDNN-packed)."""
        if self.int4 is not None or self.packed is not None:
            return None
        if self.qweight is None:
            return fn(x, self.weight, self.bias, None)
        return fn(x, self.qweight, self.bias, self.qscale)

    def cpu_parts(self) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """This layer as ``kernels.decode_cpu`` takes it: (kind, weight, its second tensor,
        bias (empty: none), int4 group); None for a kernel it does not run (fp8, int4 or int8
        dequantized per call)."""
        none = torch.empty(0)
        bias = self.bias.data if self.bias is not None else none
        kernel = self.kernel
        if isinstance(kernel, functools.partial) and kernel.func is quant_int4.linear_cpu:
            w: quant_int4.CpuInt4 = kernel.keywords["w"]
            return decode_cpu.INT4, w.packed, w.scale_and_zero, bias, w.group
        if isinstance(kernel, functools.partial) and kernel.func is quant_int8.linear_cpu:
            return decode_cpu.INT8, kernel.keywords["q"], kernel.keywords["scale_bf16"], bias, 0
        if self.packed is not None:
            return decode_cpu.PACKED, self.packed, none, bias, 0
        if self.qweight is None and kernel == self._dense and self.linear is F.linear:
            return decode_cpu.DENSE, self.weight.data, none, bias, 0
        return None

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


QUANTIZATIONS = ("int8", "fp8", "int4")
"""What ``Linear.quantize`` keeps (``config.QUANTIZATIONS``, the flag's choices, names the same:
config imports nothing of the model's side)."""


def quantize_linears(
    model: nn.Module,
    method: str,
    kernels: Kernels,
    skip: tuple[str, ...] = ("lm_head", "embed_out"),
) -> int:
    """Quantize every dense ``Linear`` of ``model`` but those named in ``skip`` (the LM head:
    its logits feed the logprobs); returns how many. LoRA factors are not touched."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {method!r}")
    if method == "fp8":
        quant_fp8.check_device(kernels.device)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or name.rsplit(".", 1)[-1] in skip:
            continue
        if module.qweight is None and module.packed is None and module.weight.numel():
            if method == "int4" and quant_int4.group_for(module.in_features) is None:
                log.warning(
                    "--quantization int4: %s (%d inputs) stays dense", name, module.in_features
                )
                continue
            module.quantize(method, kernels)
            count += 1
    if count == 0:
        raise ValueError(
            f"--quantization {method}: the model has no native linear layers to quantize "
            "(models served through transformers are not quantized)"
        )
    groups = sorted({m.int4.group for m in model.modules() if isinstance(m, Linear) and m.int4})
    detail = f" in groups of {'/'.join(map(str, groups))} input columns" if groups else ""
    log.info("--quantization %s: %d linear layers quantized%s", method, count, detail)
    return count


def pack_cpu_linears(modules: list[Linear], kind: str, dtype: torch.dtype) -> int:
    """On CPU, give dense linears the oneDNN-packed weight: all of them (``packed``), none
    (``torch``), or those whose weight shape runs faster packed on this CPU (``auto``,
    ``linear_cpu.choose``, cached in truffula's cache folder); returns how many were packed."""
    if kind == "torch":
        return 0
    if not linear_cpu.available(dtype):
        if kind == "packed":
            log.warning("packed linears are not available here; using F.linear")
        return 0
    dense = [m for m in modules if m.qweight is None and m.packed is None and m.weight.numel()]
    shapes = [(m.weight.shape[0], m.weight.shape[1]) for m in dense]
    if kind == "auto":
        choice = linear_cpu.choose(shapes, dtype, cache_dir() / "cpu-linear.json")
        log.info(
            "CPU linears by measurement: %s",
            ", ".join(f"{o}x{i} {c}" for (o, i), c in sorted(choice.items())),
        )
    else:
        choice = dict.fromkeys(shapes, "packed")
    count = 0
    for m, shape in zip(dense, shapes, strict=True):
        if choice[shape] == "packed":
            m.pack_for_cpu()
            count += 1
    return count


class MergedLinear(Linear):
    """Several projections stacked along the output dimension, loaded shard by shard."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        if shard is None:  # a checkpoint that already stores the fused matrix (Phi-3)
            super().weight_loader(param, loaded, None)
            return
        start, size = self.shard_offsets[str(shard)]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard!r}: shape {tuple(loaded.shape)} does not fit rows {size} of "
                f"{tuple(param.shape)}"
            )
        param.data[start : start + size].copy_(loaded)


class Conv1DLinear(Linear):
    """A Linear whose checkpoint stores the weight as ``[in, out]`` (HF ``Conv1D``, GPT-2).

    The parameter is kept as ``[out, in]`` like every other Linear (so LoRA and the packed CPU
    path see the usual layout); the loader transposes the 2-D checkpoint tensor.
    """

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | int | None
    ) -> None:
        super().weight_loader(param, loaded.t() if loaded.dim() == 2 else loaded, shard)
