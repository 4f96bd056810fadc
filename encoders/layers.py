"""Layers both towers share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32, cast back to the input's dtype: under bfloat16 autocast on
    the CPU, PyTorch runs LayerNorm in bfloat16 (on CUDA in float32), which cost the image tower
    its cosine to float32 (0.995 on full-size weights). In float32 it changes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def cpu_fp32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused CPU kernels below can run (oneDNN's are those torch.compile emits on the
    CPU): float32 input and weight, outside autocast and autograd (they have no backward), and
    not under torch.compile, which fuses by itself and cannot trace them all."""
    return (_FUSED_OPS and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


# The oneDNN ops are PyTorch's private ones (torch.compile's CPU lowering calls them): where a
# build lacks them, the plain path runs, with the same results.
_FUSED_OPS = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, name) for name in ("_convolution_pointwise", "_reorder_convolution_weight"))


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), then exact GELU or `residual +`. On the CPU in float32, with fewer passes over
    memory: the residual plus the bias is the matrix MKL's GEMM accumulates into (beta = 1),
    and GELU runs in place, instead of each writing one more fresh (tokens x width) tensor."""
    if cpu_fp32_inference(x, layer.weight):
        if residual is not None:
            out = residual + layer.bias
            out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), layer.weight.t())
            return out
        if gelu:
            return torch.ops.aten.gelu_(layer(x))
    y = layer(x)
    if gelu:
        y = F.gelu(y)
    return y if residual is None else residual + y
