"""The text tower: a CLIP-style transformer, NOT causal, as MedImageInsight trained it.

Module names mirror the checkpoint's keys under `lang_encoder.`. Differences from the
usual CLIP text tower, each one a wrong embedding if missed (see docs/MODEL.md):
every token attends to every non-padding token (padding is masked as keys only);
LayerNorms run in float32 with eps 1e-12; the output is taken at the first EOS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextTowerConfig
from .layers import LayerNormFP32


LN_EPS = 1e-12  # as MedImageInsight trained the text tower (not the usual 1e-5)


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

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (T, C), the real tokens of B texts packed together; keep: (B, L) bool, where they sit."""
        (B, L), C = keep.shape, x.shape[-1]
        packed = F.linear(x, self.in_proj_weight, self.in_proj_bias)        # (T, 3C)
        qkv = packed.new_zeros(B, L, 3 * C)
        qkv[keep] = packed                                                  # (T, 3C) -> (B, L, 3C)
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, h, L, C/h)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C)[keep])      # (B, L, C) -> (T, C)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = MultiheadAttention(dim, heads)
        self.ln_1 = LayerNormFP32(dim, eps=LN_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, int(dim * mlp_ratio)))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(int(dim * mlp_ratio), dim))
        self.ln_2 = LayerNormFP32(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids (B, L) and their attention mask -> text features (B, width).

    Padding is never attended to nor read, so only the real tokens are computed: they are
    packed into one (T, width) matrix for every per-token layer (most of the work), and
    placed back at their positions only for attention. A batch of short queries costs
    what its tokens cost, not B x 77 positions. The first <|endoftext|> must be unmasked
    (the tokenizer's output always is).
    """

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        # _weight skips the random init: under the meta device, normal_ would import torch._dynamo (2 s).
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNormFP32(cfg.width, eps=LN_EPS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        keep = attention_mask.bool()                                         # (B, L)
        positions = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.token_embedding(input_ids[keep]) + self.positional_embedding[positions[keep]]  # (T, width)
        for block in self.resblocks:
            x = block(x, keep)
        x = self.ln_final(x)
        # where each text's first <|endoftext|> (its largest id) sits among the packed tokens
        packed_index = torch.full((B, L), -1, dtype=torch.long, device=x.device)
        packed_index[keep] = torch.arange(x.shape[0], device=x.device)
        eos = packed_index[torch.arange(B, device=x.device), input_ids.argmax(dim=-1)]
        if (eos < 0).any():
            raise ValueError("attention_mask hides a text's first <|endoftext|> token")
        return x[eos]
