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
