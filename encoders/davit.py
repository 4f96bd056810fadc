"""The image tower: DaViT (Dual Attention Vision Transformer), as MedImageInsight trained it.

Read top to bottom: the building blocks first, the tower last. Module names mirror the
checkpoint's keys under `image_encoder.` (see docs/MODEL.md), so loading is a strict 1:1 copy.

Tokens travel as (B, H, W, C), contiguous: the same memory as the reference's
(B, H*W, C) plus its spatial size, so LayerNorm and Linear act on the last axis as
there, while the depthwise convolutions see a channels-last (B, C, H, W) view for free.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ImageTowerConfig
from .layers import LayerNormFP32, linear, cpu_fp32_inference


class DepthWiseConv(nn.Module):
    """`conv1` / `conv2`: x + dw(x), a 3x3 depthwise convolution as a position encoding."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # (B, H, W, C) -> channels-last view (B, C, H, W) -> back, no copies
        xc, dw = x.permute(0, 3, 1, 2), self.dw
        if cpu_fp32_inference(x, dw.weight):  # residual + dw(x) as one oneDNN call: one fresh tensor, not two
            return torch.ops.mkldnn._convolution_pointwise.binary(
                xc, residual.permute(0, 3, 1, 2), dw.weight, dw.bias, dw.padding, dw.stride, dw.dilation, dw.groups,
                "add", None, None, [], None).permute(0, 2, 3, 1)
        return residual + dw(xc).permute(0, 2, 3, 1)


class Residual(nn.Module):
    """x + fn(norm(x)); `norm` is None for the depthwise convolutions (key `convN.fn.dw`).
    `fn` adds x itself, within its last kernel (see `layers.linear`): on the CPU that saves a
    pass over memory and a fresh tensor per residual."""

    def __init__(self, fn: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x) if self.norm is not None else x, residual=x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = linear(x, self.net.fc1, gelu=True)  # exact (erf) GELU
        return linear(x, self.net.fc2, residual=residual)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows.

    Zero padding on the right and bottom up to a multiple of the window size; the padded
    tokens are NOT masked (their q, k, v join the softmax), as in training.
    """

    def __init__(self, dim: int, heads: int, window_size: int):
        super().__init__()
        self.heads = heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, h = self.window_size, self.heads
        Hp, Wp = H + (-H) % ws, W + (-W) % ws
        if (Hp, Wp) == (H, W):
            qkv = self.qkv(windows(x, ws))  # (B_, ws*ws, 3C); partitioned before qkv: C wide, not 3C
        else:
            # padding follows the norm, so a padded token is zeros and its q, k, v are the bias:
            # filled in, not computed (30x30 tokens pad to 36x36 in stage 2, 15x15 to 24x24 in stage 3)
            real = self.qkv(x)
            qkv = self.qkv.bias.to(real.dtype).expand(B, Hp, Wp, 3 * C).contiguous()
            qkv[:, :H, :W] = real
            qkv = windows(qkv, ws)
        q, k, v = qkv.view(qkv.shape[0], ws * ws, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=(C // h) ** -0.5)
        # the windows back in place, heads joined; the padding is cropped before proj, which acts per token
        x = rearrange(x, "(b nh nw) heads (wh ww) c -> b (nh wh) (nw ww) (heads c)", b=B, nh=Hp // ws, wh=ws, ww=ws)
        x = x[:, :H, :W].contiguous()
        return linear(x, self.proj, residual=residual)


def windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, Hp, Wp, D) -> (B * nWindows, ws*ws, D), windows in row-major order."""
    return rearrange(x, "b (nh wh) (nw ww) d -> (b nh nw) (wh ww) d", wh=ws, ww=ws)


class ChannelAttention(nn.Module):
    """Attention across channels, in groups: a (C/g x C/g) attention matrix per group.

    The scale is N^-0.5 with N the number of tokens, not the channel width.
    """

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N, g = H * W, self.groups
        # (B, N, 3C) -> 3 x (B, g, N, C/g)
        q, k, v = self.qkv(x.view(B, N, C)).view(B, N, 3, g, C // g).permute(2, 0, 3, 1, 4).unbind(0)
        # softmax in float32 (CPU autocast would run it in bfloat16), back to v's dtype
        # the scale applied to the (C/g x C/g) scores rather than to q (N x C/g): one pass fewer
        attn = (q.transpose(-1, -2) @ k * N ** -0.5).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        x = (attn @ v.transpose(-1, -2)).transpose(-1, -2)             # (B, g, N, C/g)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return linear(x, self.proj, residual=residual)


class SpatialBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.conv1 = Residual(DepthWiseConv(dim))
        self.window_attn = Residual(WindowAttention(dim, heads, window_size), LayerNormFP32(dim))
        self.conv2 = Residual(DepthWiseConv(dim))
        self.ffn = Residual(Mlp(dim, int(dim * mlp_ratio)), LayerNormFP32(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.conv2(self.window_attn(self.conv1(x))))


class ChannelBlock(nn.Module):
    def __init__(self, dim: int, groups: int, mlp_ratio: float):
        super().__init__()
        self.conv1 = Residual(DepthWiseConv(dim))
        self.channel_attn = Residual(ChannelAttention(dim, groups), LayerNormFP32(dim))
        self.conv2 = Residual(DepthWiseConv(dim))
        self.ffn = Residual(Mlp(dim, int(dim * mlp_ratio)), LayerNormFP32(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.conv2(self.channel_attn(self.conv1(x))))


class DualBlock(nn.Module):
    """`blocks.i.j`: a spatial (window) block, then a channel block."""

    def __init__(self, dim: int, heads: int, groups: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.spatial_block = SpatialBlock(dim, heads, window_size, mlp_ratio)
        self.channel_block = ChannelBlock(dim, groups, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))


class PatchEmbed(nn.Module):
    """`convs.i`: a strided convolution between stages.

    With `prenorm` the LayerNorm (over C_in) runs on the incoming tokens before the
    convolution; otherwise (stage 0, fed pixels) over C_out after it.
    """

    def __init__(self, in_dim: int, dim: int, kernel: int, stride: int, padding: int, prenorm: bool):
        super().__init__()
        self.prenorm = prenorm
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = LayerNormFP32(in_dim if prenorm else dim)

    def forward(self, x: torch.Tensor, is_pixels: bool) -> torch.Tensor:
        if is_pixels:
            x = self.conv(x)                      # pixels (B, 3, H, W)
        else:
            if self.prenorm:
                x = self.norm(x)
            x = self.conv(x.permute(0, 3, 1, 2))  # (B, H, W, C_in) -> channels-last (B, C_in, H, W)
        x = x.permute(0, 2, 3, 1)                 # (B, C, H', W') -> (B, H', W', C)
        if not self.prenorm:
            x = self.norm(x)
        return x.contiguous()

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """self.proj(x). On the CPU in float32 with the weight reordered into oneDNN's blocked
        layout once, as torch.compile's freezing does, not on every call (75 MB in stage 3)."""
        p = self.proj
        if not cpu_fp32_inference(x, p.weight):
            return p(x)
        weight_now = (p.weight.data_ptr(), 0 if p.weight.is_inference() else p.weight._version)  # repacked if changed
        if getattr(self, "_packed_for", None) != weight_now:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(p.weight, p.padding, p.stride, p.dilation,
                                                                        p.groups, None)
            self._packed_for = weight_now
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed, p.bias, p.padding, p.stride, p.dilation,
                                                       p.groups, "none", [], "")


class DaViT(nn.Module):
    """Pixels (B, 3, H, W), normalised -> image features (B, dims[-1])."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        in_dims = (3,) + cfg.dims[:-1]
        self.convs = nn.ModuleList(
            PatchEmbed(in_dims[i], cfg.dims[i], cfg.patch_size[i], cfg.patch_stride[i],
                       cfg.patch_padding[i], cfg.patch_prenorm[i])
            for i in range(len(cfg.dims))
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(*[
                DualBlock(cfg.dims[i], cfg.heads[i], cfg.groups[i], cfg.window_size, cfg.mlp_ratio)
                for _ in range(cfg.depths[i])
            ])
            for i in range(len(cfg.dims))
        )
        self.norms = LayerNormFP32(cfg.dims[-1])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        for i, (conv, stage) in enumerate(zip(self.convs, self.blocks)):
            x = stage(conv(x, is_pixels=i == 0))   # (B, H_i, W_i, C_i)
        return self.norms(x.mean(dim=(1, 2)))      # mean over tokens -> (B, C_last)
