"""The public surface: `load_model(...)` -> an encoder that turns images and texts into
L2-normalised numpy vectors in one joint space (inner product = cosine similarity)."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .checkpoint import ModelError, SafetensorsFile, checkpoint_path, resolve_model_source, tokenizer_folder
from .config import ConfigError, load_config
from .defaults import default_batch_size, device_name
from .identity import describe_model, model_fingerprint  # noqa: F401 (describe_model: the public name here too)
from .model import TOWERS, MedImageInsightNet, build_from_checkpoint, store_matmul_weights_in
from .preprocess import ImagePreprocessor
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Default: CUDA when available, else the CPU. A name must be one `defaults.device_name` accepts."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if isinstance(device, torch.device):
            device_name(device.type)  # cpu or cuda, with any index
        else:
            device = torch.device(device_name(str(device)))
    except ValueError as error:
        raise ModelError(str(error)) from None
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) >= torch.cuda.device_count():
        raise ModelError(f"device {device} was asked for, but there are {torch.cuda.device_count()} CUDA GPUs "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for, but PyTorch sees no CUDA GPU here (use --device cpu)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: float32 on CPU (exact), bfloat16 autocast on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16") from None


def cpu_lacks_native(dtype: torch.dtype, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU is known to lack native arithmetic for `dtype` (bf16: AMX or
    AVX-512 BF16; fp16: AVX-512 FP16 or AMX-FP16). False when it has it or cannot be told."""
    flags = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}.get(dtype)
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return False  # not Linux, or no /proc: do not guess
    present = set(text.split())
    return flags is not None and not any(flag in present for flag in flags)


class PendingEmbeddings:
    """A batch's embeddings, which the GPU may still be computing (`MedImageInsight.start_encoding`)."""

    def __init__(self, vectors: torch.Tensor, done: torch.cuda.Event | None):
        self._vectors, self._done = vectors, done

    def result(self) -> np.ndarray:
        """np.float32 (B, dim), once the device has finished them."""
        if self._done is not None:
            self._done.synchronize()
        return self._vectors.numpy()


class MedImageInsight:
    """Images and texts -> np.float32 (N, dim) unit vectors. Load with `load_model`."""

    def __init__(self, net: MedImageInsightNet, *, preprocess: ImagePreprocessor, tokenizer: ClipTokenizer | None,
                 dim: int, device: torch.device, dtype: torch.dtype, fingerprint: str, source: str,
                 towers: tuple[str, ...]):
        self.net = net
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.source = source
        self.towers = towers
        self.logit_scale = float(net.logit_scale.float().exp())
        self._encode_image = net.encode_image  # replaced by a compiled version by `compile()`

    def compile(self, cache_dir: str | os.PathLike | None = None) -> None:
        """Encode images through `torch.compile` from now on (fused kernels; on an H100 490
        images/s against 290-325 eager, in bf16). The first batch pays the compilation; Inductor's
        cache (`cache_dir`, kept between runs) makes later ones cheaper. Shapes are static: every
        batch but the last has the same size, and the last compiles once more."""
        if cache_dir is not None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        compiled = torch.compile(self.net.encode_image, dynamic=False)

        def first_call(pixels: torch.Tensor) -> torch.Tensor:
            # Compiling happens here. It can fail where eager works (no C++ compiler for Inductor's
            # CPU kernels, no Triton for CUDA's): then say so in one line and stay eager.
            try:
                out = compiled(pixels)
            except Exception as e:  # noqa: BLE001 - any failure of the compiler stack
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("torch.compile failed, encoding without it: %s", reason[:200])
                self._encode_image = self.net.encode_image
                return self._encode_image(pixels)
            self._encode_image = compiled
            return out

        self._encode_image = first_call

    def __repr__(self) -> str:
        return (f"MedImageInsight(source={self.source!r}, towers={self.towers}, dim={self.dim}, "
                f"device={self.device}, dtype={self.dtype})")

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _need(self, tower: str) -> None:
        if tower not in self.towers:
            raise ModelError(f"the {tower} tower was not loaded; load_model(..., towers=({tower!r},)) loads it")

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> {"input_ids": int64 (N, 77), "attention_mask": int64 (N, 77)}."""
        self._need("text")
        return self._tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """list[str] -> np.float32 (N, dim). Each batch runs only up to its longest text
        (padding can be cut: docs/MODEL.md), and texts are batched by length."""
        self._need("text")
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise ValueError(f"encode_texts takes strings, got {bad[0]}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        tokens = self._tokenizer(texts)
        lengths = tokens["attention_mask"].sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                length = int(lengths[rows].max())
                ids = torch.from_numpy(tokens["input_ids"][rows, :length]).to(self.device)
                mask = torch.from_numpy(tokens["attention_mask"][rows, :length]).to(self.device)
                out[rows] = self.net.encode_text(ids, mask).float().cpu().numpy()
        return out

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) tensors from `preprocess` -> np.float32 (B, dim)."""
        self._need("image")
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._start(pixels).result()

    def encode_resized(self, resized: Sequence[np.ndarray]) -> np.ndarray:
        """8-bit images already at the model's size (`preprocess.resize`: uint8 (H, W) or
        (H, W, 3)) -> np.float32 (B, dim). They are collated as uint8 (pinned on CUDA), copied
        to the device without blocking, and normalised there: a quarter of the bytes of float
        pixels cross the bus, and the embeddings are those of `encode_pixels(preprocess(...))`."""
        return self.start_encoding(resized).result()

    def start_encoding(self, resized: Sequence[np.ndarray]) -> PendingEmbeddings:
        """`encode_resized` without waiting for the device: on CUDA the batch is queued on the GPU
        and this returns at once, so the caller can commit the previous batch and collate the next
        one while the GPU computes; `.result()` waits. On the CPU the work is done here."""
        self._need("image")
        if len(resized) == 0:
            return PendingEmbeddings(torch.zeros((0, self.dim)), None)
        batch = self.preprocess.collate(resized, pin=self.device.type == "cuda")
        with torch.inference_mode():
            pixels = self.preprocess.normalize(batch.to(self.device, non_blocking=True))
        return self._start(pixels)

    def _start(self, pixels: torch.Tensor) -> PendingEmbeddings:
        with torch.inference_mode(), self._autocast():
            vectors = self._encode_image(pixels.to(self.device, non_blocking=True)).float()
        if self.device.type != "cuda":
            return PendingEmbeddings(vectors, None)
        # Back into pinned memory without blocking; an event marks when the copy (and so the whole
        # batch before it on the stream) is done. Only `result()` waits for it.
        host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(vectors, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingEmbeddings(host, done)

    def encode_images(self, images: Sequence, batch_size: int | None = None) -> np.ndarray:
        """PIL images or HxW / HxWx3 arrays (any size, any bit depth; see `preprocess`)
        -> np.float32 (N, dim)."""
        self._need("image")
        images = list(images)
        batch_size = batch_size or default_batch_size(self.device.type)
        parts = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            parts.append(self.encode_resized([self.preprocess.resize(im) for im in images[start:start + batch_size]]))
        return np.concatenate(parts)


def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, towers: Sequence[str] = TOWERS) -> MedImageInsight:
    """Load MedImageInsight from a local folder or a Hugging Face repo id.

    source: the published `2024.09.27/` folder, a folder holding it, or a repo id;
        default the MI_MODEL environment variable, else lion-ai/MedImageInsights.
    device: default CUDA when available, else CPU.
    dtype: default float32 on CPU, bfloat16 autocast on CUDA.
    towers: ("image", "text"), or one of them: only that tower's tensors are read.
    """
    requested = (towers,) if isinstance(towers, str) else tuple(towers)
    if not requested or set(requested) - set(TOWERS):
        raise ValueError(f"towers must name 'image' and/or 'text', got {requested}")
    towers = tuple(t for t in TOWERS if t in requested)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if device.type == "cpu" and dtype != torch.float32 and cpu_lacks_native(dtype):
        log.warning("%s on this CPU (no %s instructions) is emulated and much slower than float32 "
                    "(10x measured without AVX-512): use --dtype float32", str(dtype).removeprefix("torch."),
                    "AMX/AVX-512 BF16" if dtype == torch.bfloat16 else "AVX-512 FP16/AMX-FP16")
    folder = resolve_model_source(source)
    try:
        cfg = load_config(folder / "config.yaml")
    except ConfigError as e:
        raise ModelError(str(e)) from None
    checkpoint = SafetensorsFile(checkpoint_path(folder))
    net = build_from_checkpoint(cfg, checkpoint, towers).to(device)
    if dtype != torch.float32:
        net = store_matmul_weights_in(net, dtype)
    tokenizer = ClipTokenizer(tokenizer_folder(folder), cfg.text.context_length) if "text" in towers else None
    preprocess = ImagePreprocessor(cfg.image.image_size, cfg.image.mean, cfg.image.std)
    return MedImageInsight(net, preprocess=preprocess, tokenizer=tokenizer, dim=cfg.embed_dim, device=device,
                           dtype=dtype, fingerprint=model_fingerprint(checkpoint, cfg),
                           source=str(Path(folder).resolve()), towers=towers)
