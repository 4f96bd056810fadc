"""`mi doctor`'s checks of an install as a whole (PyTorch and the device, the DICOM decoders,
FAISS, the index, the model and the published reference outputs), as typed records.

    from retrieval.doctor import run_checks
    for check in run_checks(index_dir="./idx"):
        print(check.status, check.check, check.detail)

Nothing here prints, and nothing is downloaded: a model named by a Hugging Face id is looked
up in the local cache only (`mi-index` downloads it on its first run)."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from indexer.errors import ModelMismatchError, one_line
from indexer.location import INDEX_ENV, default_index_dir
from indexer.model_choice import chosen_model_source

Status = Literal["ok", "warn", "fail"]
LOW_DISK_BYTES = 1 << 30  # below this much free space next to the index, a run may stop with "disk full"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, ok / warn / fail, and what was found (for a
    warn or a fail, how to fix it)."""

    check: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Reference:
    """Published outputs of a checkpoint's text tower: for each text the first and last
    elements of its unit embedding, and the cosines between pairs of texts.

    It applies to a loaded model of embedding dim `dim`. A model that differs from it fails when
    its source names one of `names` (the published model itself, badly downloaded) and only
    warns otherwise (a checkpoint trained from it is expected to differ)."""

    name: str
    dim: int
    texts: tuple[str, ...]
    heads: tuple[tuple[float, ...], ...]            # per text: its embedding's first elements
    tails: tuple[tuple[float, ...], ...]            # per text: its embedding's last elements
    cosines: tuple[tuple[int, int, float], ...]     # (i, j, cosine of texts i and j)
    names: tuple[str, ...]
    tolerance: float = 1e-4


# Published by a third party for lion-ai/MedImageInsights' text tower (float32).
MEDIMAGEINSIGHT_TEXT = Reference(
    name="lion-ai/MedImageInsights' published text embeddings",
    dim=1024,
    texts=("lumbar spine", "chest", "desktop"),
    heads=((-0.03271601, 0.02388754, 0.02584449),
           (-0.03645158, -0.00188246, 0.00022278),
           (-0.0056968, 0.06878266, 0.0043339)),
    tails=((0.00670768, 0.00604417, -0.01052989),
           (-0.02536389, -0.02322166, 0.02286733),
           (-0.02845573, 0.01347476, -0.04035829)),
    cosines=((0, 1, 0.728603), (0, 2, 0.33807534), (1, 2, 0.38285893)),
    names=("medimageinsight", "2024.09.27"),
)
REFERENCES = (MEDIMAGEINSIGHT_TEXT,)


def reference_differences(vectors: Any, reference: Reference) -> list[str]:
    """Where `vectors` (one unit embedding per reference text, in its order) differ from the
    reference by more than its tolerance; empty when they match."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape != (len(reference.texts), reference.dim):
        return [f"embeddings of shape {vectors.shape}, not {(len(reference.texts), reference.dim)}"]
    found = []
    for row, text in enumerate(reference.texts):
        head, tail = reference.heads[row], reference.tails[row]
        for where, expected, got in (("first", head, vectors[row, :len(head)]),
                                     ("last", tail, vectors[row, len(vectors[row]) - len(tail):])):
            worst = float(np.max(np.abs(np.asarray(expected) - got)))
            if worst > reference.tolerance:
                found.append(f"{text!r}'s {where} {len(expected)} elements are off by up to {worst:.2g}")
    for i, j, expected in reference.cosines:
        got = float(vectors[i] @ vectors[j])
        if abs(got - expected) > reference.tolerance:
            found.append(f"cosine({reference.texts[i]!r}, {reference.texts[j]!r}) is {got:.6f}, "
                         f"published {expected:.6f}")
    return found


def reference_for(model: Any, references: Sequence[Reference] = REFERENCES) -> Reference | None:
    """The reference that applies to a loaded model: the one of its embedding dim. This loader
    builds only MedImageInsight's architecture, so a 1024-d model is the published checkpoint
    or one trained from it; the tiny test model (48-d) has none."""
    return next((r for r in references if r.dim == model.dim), None)


def check_reference(model: Any, references: Sequence[Reference] = REFERENCES) -> Check:
    """Encode the reference texts with `model` (float32 for a fair comparison) and compare."""
    reference = reference_for(model, references)
    if reference is None:
        dims = ", ".join(f"{r.dim}-d" for r in references)
        return Check("reference", "ok", f"does not apply: the published outputs are for the real "
                                        f"MedImageInsight ({dims}); this model is {model.dim}-d")
    problems = reference_differences(model.encode_texts(list(reference.texts)), reference)
    if not problems:
        return Check("reference", "ok", f"the weights match the published outputs ({reference.name}, "
                                        f"{len(reference.texts)} texts, within {reference.tolerance:g})")
    published = any(name in str(model.source).lower() for name in reference.names)
    fix = ("download the weights again (`hf download lion-ai/MedImageInsights --local-dir MedImageInsights`): "
           "this copy is damaged or is another checkpoint" if published else
           "expected for a checkpoint trained from MedImageInsight; otherwise download the published weights again")
    return Check("reference", "fail" if published else "warn",
                 f"the weights do NOT match the published outputs ({reference.name}): {'; '.join(problems[:3])}"
                 f"{'; ...' if len(problems) > 3 else ''}. Fix: {fix}")


# ---------------------------------------------------------------- PyTorch and the device

def torch_checks() -> list[Check]:
    import torch

    from encoders.inference import cpu_lacks_native

    checks = [Check("torch", "ok", f"PyTorch {torch.__version__}"
                                   f" ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'} build)")]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        native = capability >= (8, 0)  # bf16 arithmetic from Ampere on
        where = f"cuda:0 {name} (capability {capability[0]}.{capability[1]}; {count} GPU{'s' * (count > 1)})"
        checks.append(Check("device", "ok" if native else "warn",
                            f"{where}, native bf16 (the GPU default)" if native else
                            f"{where} has no native bf16, the GPU default: use --dtype float16"))
    else:
        import torch.backends.cpu

        lacks = cpu_lacks_native(torch.bfloat16)
        isa = torch.backends.cpu.get_cpu_capability()
        base = "no CUDA GPU: the CPU is used"
        if torch.version.cuda:
            checks.append(Check("device", "warn", f"{base}, though this PyTorch is built for CUDA "
                                                  f"{torch.version.cuda}. Fix: check the driver (nvidia-smi) "
                                                  f"and CUDA_VISIBLE_DEVICES"))
        else:
            checks.append(Check("device", "ok", f"{base} ({isa})"))
        checks.append(Check("bf16", "ok", "no native bf16 on this CPU: keep float32, the CPU default" if lacks else
                                          "this CPU has native bf16 (--dtype bfloat16 may be faster)"))
    threads, cores = torch.get_num_threads(), _usable_cores()
    checks.append(Check("threads", "ok" if threads <= cores else "warn",
                        f"{threads} threads on {cores} usable cores" + (
                            "" if threads <= cores else f". Fix: set OMP_NUM_THREADS={cores}")))
    return checks


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- DICOM decoders

PLUGINS = (("pylibjpeg", "pylibjpeg"), ("pylibjpeg-openjpeg", "openjpeg"), ("pylibjpeg-libjpeg", "libjpeg"),
           ("pylibjpeg-rle", "rle"))
# (what, transfer syntax UIDs, a small sample among pydicom's own test files)
SYNTAXES = (
    ("JPEG 2000", ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"), "MR_small_jp2klossless.dcm"),
    ("JPEG baseline", ("1.2.840.10008.1.2.4.50",), "SC_rgb_jpeg_dcmtk.dcm"),
    ("JPEG extended", ("1.2.840.10008.1.2.4.51",), "JPGExtended.dcm"),
    ("JPEG lossless", ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"), "SC_rgb_jpeg_gdcm.dcm"),
    ("JPEG-LS", ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "MR_small_jpeg_ls_lossless.dcm"),
    ("RLE", ("1.2.840.10008.1.2.5",), "MR_small_RLE.dcm"),
    ("deflate", ("1.2.840.10008.1.2.1.99",), "image_dfl.dcm"),
)


def decoder_checks(samples: Path | None = None) -> list[Check]:
    """pydicom and each pylibjpeg plugin importable; for each compressed transfer syntax, the
    handlers pydicom reports available, and one sample decoded the way mi-index decodes."""
    try:
        import pydicom
        from pydicom.pixels import get_decoder
    except ImportError as e:
        return [Check("pydicom", "fail", f"cannot import pydicom ({one_line(e)}). Fix: pip install 'pydicom>=3'")]
    from indexer.decode import DecodeError, decode_file

    checks = [Check("pydicom", "ok", f"pydicom {pydicom.__version__}")]
    for distribution, module in PLUGINS:
        try:
            importlib.import_module(module)
            checks.append(Check(distribution, "ok", f"{distribution} {importlib.metadata.version(distribution)}"))
        except Exception as e:  # noqa: BLE001 - a broken binary wheel raises anything
            checks.append(Check(distribution, "fail", f"cannot import {module} ({one_line(e, 120)}). "
                                                      f"Fix: pip install {distribution}"))
    samples = samples or Path(pydicom.__file__).parent / "data" / "test_files"
    for what, uids, sample in SYNTAXES:
        try:
            decoder = get_decoder(uids[0])
            plugins = tuple(decoder.available_plugins)
        except NotImplementedError:
            plugins = ()
        if not plugins and uids[0] != "1.2.840.10008.1.2.1.99":  # deflate needs no plugin, only zlib
            checks.append(Check(f"decode {what}", "fail", f"no {what} decoder available to pydicom. Fix: pip "
                                                          f"install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"))
            continue
        through = f"through {', '.join(plugins)}" if plugins else "built in"
        path = samples / sample
        if not path.is_file():
            checks.append(Check(f"decode {what}", "ok", f"{through} (no sample {sample} here to decode)"))
            continue
        try:
            decoded = decode_file(path)
            image = decoded.frames[0][1]
            checks.append(Check(f"decode {what}", "ok", f"{through}: {sample} decoded ({image.width}x{image.height} "
                                                        f"{image.mode})"))
        except DecodeError as e:
            checks.append(Check(f"decode {what}", "fail", f"{through}, but {sample} does not decode: {e}. Fix: "
                                                          f"reinstall the plugins (pip install --force-reinstall "
                                                          f"pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                                                          f"pylibjpeg-rle)"))
    return checks


# ---------------------------------------------------------------- FAISS

def faiss_checks() -> list[Check]:
    try:
        import faiss
    except ImportError as e:
        return [Check("faiss", "fail", f"cannot import faiss ({one_line(e, 120)}). Fix: pip install faiss-cpu")]
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") and hasattr(faiss, "StandardGpuResources") else 0
    build = f"GPU build, {gpus} GPU{'s' * (gpus != 1)} visible" if hasattr(faiss, "StandardGpuResources") \
        else "CPU build"
    return [Check("faiss", "ok", f"FAISS {faiss.__version__} ({build})")]


# ---------------------------------------------------------------- the index and the model

def index_location(index_dir: str | os.PathLike | None) -> tuple[Path, bool]:
    """The index folder to check, and whether the user named it (--index or MI_INDEX)."""
    if index_dir not in (None, ""):
        return Path(index_dir).expanduser(), True
    return default_index_dir(), bool(os.environ.get(INDEX_ENV))


def index_checks(folder: Path, named: bool) -> tuple[list[Check], dict[str, Any] | None]:
    """The index's lines, and its recorded model ({fingerprint, dim, source}) when it has one."""
    from indexer.store.schema import SCHEMA_VERSION
    from indexer.store import DB_NAME, IndexStore

    if not (folder / DB_NAME).exists():
        return [Check("index", "fail" if named else "warn",
                      f"no index at {folder}. Fix: build one with `mi-index FOLDER --index {folder}`" if named else
                      f"no index yet at the default location {folder}. Fix: build one with `mi-index FOLDER`")], None
    try:
        with IndexStore.open(folder, readonly=True) as store:
            status = store.status()
    except Exception as e:  # noqa: BLE001 - a damaged database raises many types; all are this line
        return [Check("index", "fail", f"{folder} cannot be read: {one_line(e, 300)}")], None
    model = status["model"]
    checks = [Check("index", "ok", f"{folder}: schema version {status['schema_version']} (this program's "
                                   f"{SCHEMA_VERSION}), {status['images']} images from {status['files']} files")]
    if model is None:
        checks.append(Check("index model", "warn", "the index records no model yet (no image indexed)"))
    else:
        checks.append(Check("index model", "ok", f"built with {model['source']} ({model['dim']}-d, "
                                                 f"fingerprint {model['fingerprint'][:12]})"))
    free = shutil.disk_usage(folder).free
    checks.append(Check("disk", "ok" if free >= LOW_DISK_BYTES else "warn",
                        f"{free / (1 << 30):.1f} GiB free where the index lives" + (
                            "" if free >= LOW_DISK_BYTES else ". Fix: free some space before indexing more")))
    return checks, model


def model_checks(source: str | None, index_model: dict[str, Any] | None, index_folder: Path,
                 references: Sequence[Reference] = REFERENCES) -> list[Check]:
    """Resolve the model (never downloading), load its text tower on the CPU in float32, compare
    its identity with the index's and its outputs with the published reference."""
    from encoders import ModelError, load_model, resolve_model_source

    try:
        folder = resolve_model_source(source, download=False)
        model = load_model(folder, device="cpu", dtype="float32", towers=("text",))
    except ModelError as e:
        return [Check("model", "fail", one_line(e))]
    checks = [Check("model", "ok", f"{model.source}: text tower loaded ({model.dim}-d, fingerprint "
                                   f"{model.fingerprint[:12]})")]
    if index_model is not None:
        if index_model["fingerprint"] == model.fingerprint and index_model["dim"] == model.dim:
            checks.append(Check("model vs index", "ok", "the model matches the one the index was built with"))
        else:
            mismatch = ModelMismatchError.between(index_folder, index_model, model.source, model.fingerprint, model.dim)
            checks.append(Check("model vs index", "fail", one_line(mismatch)))
    checks.append(check_reference(model, references))
    return checks


def run_checks(index_dir: str | os.PathLike | None = None, model: str | os.PathLike | None = None, *,
               references: Sequence[Reference] = REFERENCES) -> list[Check]:
    """Every check, in order. `index_dir`: default MI_INDEX, else the per-user folder; `model`:
    default MI_MODEL, else the index's model, else lion-ai/MedImageInsights (as mi-search)."""
    folder, named = index_location(index_dir)
    index, index_model = index_checks(folder, named)
    source = chosen_model_source(model, index_model["source"] if index_model else None)
    return [*torch_checks(), *decoder_checks(), *faiss_checks(), *index,
            *model_checks(source, index_model, folder, references)]


def failed(checks: Sequence[Check]) -> bool:
    return any(check.status == "fail" for check in checks)
