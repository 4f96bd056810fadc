"""Tower sizes, read from the model folder's `config.yaml` (never hard-coded).

Only the keys that shape the network are read; the rest of the published config is
about training. Sizes that the config does not carry (MLP ratio, vocabulary size) are
fixed by the architecture or read from the checkpoint's tensor shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ImageTowerConfig:
    image_size: tuple[int, int]            # (H, W) the tower is fed
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dims: tuple[int, ...]                  # DIM_EMBED, one per stage
    heads: tuple[int, ...]                 # NUM_HEADS (window attention)
    groups: tuple[int, ...]                # NUM_GROUPS (channel attention)
    depths: tuple[int, ...]
    patch_size: tuple[int, ...]
    patch_stride: tuple[int, ...]
    patch_padding: tuple[int, ...]
    patch_prenorm: tuple[bool, ...]
    window_size: int
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TextTowerConfig:
    width: int
    heads: int
    layers: int
    context_length: int
    vocab_size: int = 49408
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    image: ImageTowerConfig
    text: TextTowerConfig
    embed_dim: int                         # UNICL_MODEL.DIM_PROJECTION, the joint space


class ConfigError(ValueError):
    """config.yaml is missing a key the network needs, or is not YAML."""


def load_config(path: Path) -> ModelConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
        img, spec, lang = raw["IMAGE_ENCODER"], raw["IMAGE_ENCODER"]["SPEC"], raw["LANG_ENCODER"]
        image = ImageTowerConfig(
            image_size=tuple(img["IMAGE_SIZE"]),
            mean=tuple(float(v) for v in img["IMAGE_MEAN"]),
            std=tuple(float(v) for v in img["IMAGE_STD"]),
            dims=tuple(spec["DIM_EMBED"]),
            heads=tuple(spec["NUM_HEADS"]),
            groups=tuple(spec["NUM_GROUPS"]),
            depths=tuple(spec["DEPTHS"]),
            patch_size=tuple(spec["PATCH_SIZE"]),
            patch_stride=tuple(spec["PATCH_STRIDE"]),
            patch_padding=tuple(spec["PATCH_PADDING"]),
            patch_prenorm=tuple(bool(v) for v in spec["PATCH_PRENORM"]),
            window_size=int(spec["WINDOW_SIZE"]),
        )
        if lang.get("AUTOGRESSIVE", False):
            raise ConfigError("LANG_ENCODER.AUTOGRESSIVE is true; MedImageInsight's text tower is not causal")
        text = TextTowerConfig(
            width=int(lang["WIDTH"]),
            heads=int(lang["HEADS"]),
            layers=int(lang["LAYERS"]),
            context_length=int(lang["CONTEXT_LENGTH"]),
        )
        embed_dim = int(raw["UNICL_MODEL"]["DIM_PROJECTION"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path}: missing or malformed key {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return ModelConfig(image=image, text=text, embed_dim=embed_dim)
