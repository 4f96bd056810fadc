"""Finding the model folder (local, or downloaded from Hugging Face) and reading its
safetensors checkpoint: only the tensors asked for, never through pickle.

The published folder (`lion-ai/MedImageInsights`, `2024.09.27/`):
    config.yaml
    vision_model/medimageinsigt-v1.0.0.pt         safetensors despite the name
    language_model/clip_tokenizer_4.16.2/          CLIP tokenizer files
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import DEFAULT_MODEL, MODEL_ENV, named_model

if TYPE_CHECKING:
    import torch

CHECKPOINT_NAMES = ("medimageinsigt-v1.0.0.pt", "medimageinsight-v1.0.0.pt")
TOKENIZER_DIR = "clip_tokenizer_4.16.2"
HUB_PREFIX = "hf-hub:"
_HOW_TO_FIX = (
    f"Download the weights (2.46 GB) where the internet is reachable with `hf download {DEFAULT_MODEL} "
    f"--local-dir MedImageInsights` (huggingface_hub's command line), then point --model or the "
    f"{MODEL_ENV} environment variable at that folder (or at the 2024.09.27/ folder inside it)."
)

_OFFLINE_EXAMPLE = (f"No weights at all? examples/search_cli.sh runs every step offline with the tiny test model "
                    f"(it sets {MODEL_ENV} to tests/fixtures/medimageinsight-tiny).")


class ModelError(Exception):
    """Base class: the model cannot be used. The message says how to fix it."""


class ModelNotFoundError(ModelError):
    """No model folder at the given place, and it could not be downloaded."""


class CheckpointError(ModelError):
    """The checkpoint is not safetensors, or lacks tensors, or has wrong shapes."""


def is_model_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "vision_model").is_dir()


def find_model_folder(path: Path) -> Path:
    """`path` itself, or the published `2024.09.27/` (or another model folder) inside it."""
    if is_model_folder(path):
        return path
    if path.is_dir():
        inside = sorted(p for p in path.iterdir() if p.is_dir() and is_model_folder(p))
        if inside:
            return inside[-1]  # dated folder names: the newest
    raise ModelNotFoundError(
        f"{path} is not a MedImageInsight model folder (expected config.yaml and vision_model/ in it, "
        f"or a 2024.09.27/ folder holding them). {_HOW_TO_FIX}"
    )


def resolve_model_source(source: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """A local folder, or a Hugging Face repo id (downloaded once, then cached) -> the model folder.

    Default: the MI_MODEL environment variable, else lion-ai/MedImageInsights. `hf-hub:OWNER/NAME`
    always means the hub; a plain `OWNER/NAME` is a local folder when one exists there, else the
    hub (and a failure says that both were tried). `download=False`: the local cache only."""
    named = named_model(source)
    source = named or DEFAULT_MODEL
    if source.startswith(HUB_PREFIX):
        return find_model_folder(_download(source[len(HUB_PREFIX):], tried_folder=None, download=download))
    path = Path(source).expanduser()
    if path.exists():
        return find_model_folder(path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.startswith("."):
        raise ModelNotFoundError(f"no model folder at {path}. {_HOW_TO_FIX}")
    return find_model_folder(_download(source, tried_folder=path if named else None, download=download))


def _download(repo_id: str, tried_folder: Path | None, download: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(f"cannot download {repo_id}: huggingface_hub is not installed. {_HOW_TO_FIX}")
    patterns = ["*config.yaml", "*vision_model/*", "*language_model/*"]
    try:
        # shows progress bars
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id!r} on Hugging Face{_and_no_folder(tried_folder)}. "
                                 f"{_HOW_TO_FIX}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "it is not in the local cache (and downloading was not asked for)" if not download else \
            f"the hub could not be reached or the download failed ({type(e).__name__})"
        raise ModelNotFoundError(f"cannot get model {repo_id!r} from Hugging Face: {why}"
                                 f"{_and_no_folder(tried_folder)}. {_HOW_TO_FIX} {_OFFLINE_EXAMPLE}") from None


def _and_no_folder(folder: Path | None) -> str:
    return "" if folder is None else f" (and there is no local folder {folder.resolve()}; write " \
                                     f"./{folder} for a folder, {HUB_PREFIX}{folder} for the hub)"


def checkpoint_path(folder: Path) -> Path:
    for name in CHECKPOINT_NAMES:
        if (folder / "vision_model" / name).is_file():
            return folder / "vision_model" / name
    found = sorted((folder / "vision_model").glob("*.safetensors"))
    if found:
        return found[0]
    raise ModelNotFoundError(f"{folder}/vision_model/ holds no checkpoint ({CHECKPOINT_NAMES[0]}). {_HOW_TO_FIX}")


def tokenizer_folder(folder: Path) -> Path:
    path = folder / "language_model" / TOKENIZER_DIR
    if not (path / "vocab.json").is_file():
        raise ModelNotFoundError(f"{path} is missing (tokenizer vocab.json, merges.txt). {_HOW_TO_FIX}")
    return path


class CheckpointHeader:
    """A safetensors file's header (refusing anything else) and its identity, read without PyTorch: all that
    checking an index's model needs (`encoders.identity`), so an unchanged run never imports it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header_bytes = _read_header(self.path)
        header = json.loads(self.header_bytes)
        header.pop("__metadata__", None)
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}

    def fingerprint(self) -> str:
        """Identity of the checkpoint without reading 2.5 GB: its header (names, shapes,
        dtypes, offsets), its size and 16 blocks of 64 KiB spread over the data."""
        digest = hashlib.sha256(self.header_bytes)
        size = self.path.stat().st_size
        digest.update(str(size).encode())
        with open(self.path, "rb") as f:
            for i in range(16):
                f.seek(size * i // 16)
                digest.update(f.read(65536))
        return digest.hexdigest()[:32]


class SafetensorsFile(CheckpointHeader):
    """Reads single tensors from a safetensors file by memory map; refuses anything else."""

    def __init__(self, path: Path):
        super().__init__(path)
        from safetensors import safe_open  # framework="pt" imports PyTorch
        self._file = safe_open(str(self.path), framework="pt", device="cpu")

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def _read_header(path: Path) -> bytes:
    not_safetensors = CheckpointError(
        f"{path} is not a safetensors file (a pickled PyTorch checkpoint?). Only safetensors weights are "
        f"loaded, never pickle, since unpickling can run arbitrary code. {_HOW_TO_FIX}"
    )
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise not_safetensors
            (length,) = struct.unpack("<Q", prefix)
            if length > min(path.stat().st_size - 8, 100 << 20):
                raise not_safetensors
            header = f.read(length)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not header.lstrip().startswith(b"{"):
        raise not_safetensors
    try:
        json.loads(header)
    except ValueError:
        raise not_safetensors from None
    return header
