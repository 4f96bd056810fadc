"""The text tower: a CLIP-style transformer, NOT causal, as MedImageInsight trained it.

Module names mirror the checkpoint's keys under `lang_encoder.`. Differences from the
usual CLIP text tower, each one a wrong embedding if missed (see MODEL.md):
every token attends to every non-padding token (padding is masked as keys only);
LayerNorms run in float32 with eps 1e-12; the output is taken at the first EOS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextTowerConfig


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 with eps 1e-12, cast back to the input's dtype."""

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (packed q, k, v `in_proj`), computed with SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        # (B, L, 3C) -> 3 x (B, h, L, C/h)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # scale (C/h)^-0.5
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)
        self.ln_1 = LayerNormFP32(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, int(dim * mlp_ratio)))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(int(dim * mlp_ratio), dim))
        self.ln_2 = LayerNormFP32(dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids (B, L) and their attention mask -> text features (B, width).

    L may be shorter than the context length: padding is never attended to nor read,
    so a batch cut to its longest real length gives the same result, much faster.
    """

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        # _weight skips the random init: under the meta device, normal_ would import torch._dynamo (2 s).
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNormFP32(cfg.width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]  # (B, L, width)
        attend = attention_mask.bool()[:, None, None, :]                     # keys only: (B, 1, 1, L)
        for block in self.resblocks:
            x = block(x, attend)
        x = self.ln_final(x)
        eos = input_ids.argmax(dim=-1)  # the first <|endoftext|>, the largest id
        return x[torch.arange(B, device=x.device), eos]
