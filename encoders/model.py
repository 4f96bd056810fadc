"""MedImageInsight: the two towers and their projections into one joint space, and the
strict loader that fills them from the published safetensors checkpoint.

Parameter names are exactly the checkpoint's keys (no renaming table is needed):
`image_encoder.*`, `image_projection`, `lang_encoder.*`, `lang_projection`, `logit_scale`.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, SafetensorsFile
from .config import ModelConfig
from .davit import DaViT
from .text import TextTransformer

log = logging.getLogger(__name__)
TOWERS = ("image", "text")
TOWER_PREFIXES = {"image": ("image_encoder.", "image_projection"), "text": ("lang_encoder.", "lang_projection")}


def project(features: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Into the joint space, unit length; in float32 whatever the tower computed in."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.normalize(features.float() @ projection, dim=-1)


class MedImageInsightNet(nn.Module):
    """Either tower may be left out, so a text query never pays for the image tower."""

    def __init__(self, cfg: ModelConfig, towers: tuple[str, ...] = TOWERS):
        super().__init__()
        if "image" in towers:
            self.image_encoder = DaViT(cfg.image)
            self.image_projection = nn.Parameter(torch.empty(cfg.image.dims[-1], cfg.embed_dim))
        if "text" in towers:
            self.lang_encoder = TextTransformer(cfg.text)
            self.lang_projection = nn.Parameter(torch.empty(cfg.text.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim), unit rows."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return project(self.image_encoder(pixels), self.image_projection)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, embed_dim), unit rows."""
        return project(self.lang_encoder(input_ids, attention_mask), self.lang_projection)


def store_matmul_weights_in(net: MedImageInsightNet, dtype: torch.dtype) -> MedImageInsightNet:
    """Keep the weights of linear layers, convolutions, embeddings and projections in
    `dtype` (bf16/fp16 compute under autocast), so autocast does not cast 600 M
    parameters again on every call; LayerNorms and the projections keep float32."""
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.to(dtype)
    for block in net.modules():  # the text tower's packed attention weights
        if hasattr(block, "in_proj_weight"):
            block.in_proj_weight.data = block.in_proj_weight.data.to(dtype)
            block.in_proj_bias.data = block.in_proj_bias.data.to(dtype)
    return net


def build_from_checkpoint(cfg: ModelConfig, checkpoint: SafetensorsFile, towers: tuple[str, ...],
                          dtype: torch.dtype = torch.float32) -> MedImageInsightNet:
    """Build the towers asked for and read exactly their tensors from the checkpoint.

    Strict: a missing tensor or a wrong shape is an error that names it. Tensors that
    belong to no tower are reported (logged), not fatal."""
    vocab = checkpoint.shapes.get("lang_encoder.token_embedding.weight", (cfg.text.vocab_size,))[0]
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab))
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
        net = MedImageInsightNet(cfg, towers)
    wanted = net.state_dict()

    missing = [k for k in wanted if k not in checkpoint.shapes]
    if missing:
        raise CheckpointError(f"{checkpoint.path}: missing {len(missing)} tensor(s) the model needs: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    wrong = [f"{k} is {list(checkpoint.shapes[k])}, expected {list(v.shape)}"
             for k, v in wanted.items() if checkpoint.shapes[k] != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{checkpoint.path} does not match config.yaml: {'; '.join(wrong[:5])}")
    # Tensors of a tower not loaded are not ours to judge (they are when that tower is loaded).
    not_loaded = tuple(prefix for tower in TOWERS if tower not in towers for prefix in TOWER_PREFIXES[tower])
    unexpected = sorted(k for k in checkpoint.shapes if k not in wanted and not k.startswith(not_loaded))
    if unexpected:
        log.warning("%s: %d tensor(s) belong to no tower and are ignored: %s", checkpoint.path,
                    len(unexpected), ", ".join(unexpected[:5]))
    net.unexpected_keys = unexpected

    state = {k: checkpoint.get(k).to(dtype) for k in wanted}
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False)
