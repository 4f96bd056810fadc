"""`mi doctor`: the install's self-check, run as the real command (a subprocess) against the tiny
model and a real index, and its reference comparison exercised with the tiny model's own outputs."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import indexer
from indexer.store.schema import SCHEMA_VERSION
from retrieval import doctor
from retrieval.doctor import MEDIMAGEINSIGHT_TEXT, Reference, check_reference, reference_differences

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"
DECODED_SYNTAXES = ("JPEG 2000", "JPEG baseline", "JPEG extended", "JPEG lossless", "JPEG-LS", "RLE", "deflate")


def mi_doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                   **(env or {})}
    for name in ("MI_MODEL", "MI_INDEX"):
        if name not in (env or {}):
            environment.pop(name, None)
    return subprocess.run([sys.executable, "-c", "from retrieval.commands import entry; entry()", "doctor", *args],
                          env=environment, capture_output=True, text=True, timeout=300)


def lines(result: subprocess.CompletedProcess) -> dict[str, tuple[str, str]]:
    """{check: (status, detail)} from the command's lines: `status  check  detail`."""
    parsed = {}
    for line in result.stdout.splitlines():
        status, check, detail = re.split(r" {2,}", line, maxsplit=2)
        assert status in ("ok", "warn", "fail") and check not in parsed, line
        parsed[check] = (status, detail)
    return parsed


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    data = root / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((24, 24), 40 + 60 * i, np.uint8)).save(data / f"{i}.png")
    indexer.index_paths([data], root / "index", model=str(FIXTURE), workers=0)
    return root / "index"


@pytest.fixture(scope="module")
def model():
    from encoders import load_model
    return load_model(FIXTURE, device="cpu", dtype="float32", towers=("text",))


def test_a_working_install_is_all_ok(index):
    result = mi_doctor("--index", str(index))  # no --model: the index's model, as mi-search
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert all(status == "ok" for status, _ in found.values()), result.stdout
    assert found["index"][1].startswith(f"{index}: schema version {SCHEMA_VERSION} ")
    assert "3 images from 3 files" in found["index"][1]
    assert str(FIXTURE) in found["index model"][1] and "48-d" in found["index model"][1]
    assert found["model vs index"][1] == "the model matches the one the index was built with"
    assert "GiB free" in found["disk"][1]
    assert found["reference"][1].startswith("does not apply") and "48-d" in found["reference"][1]
    assert found["torch"][1].startswith("PyTorch ") and "threads" in found
    assert found["faiss"][1].startswith("FAISS ")
    for plugin in ("pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle"):
        assert plugin in found
    for syntax in DECODED_SYNTAXES:  # each sample really decoded through mi-index's decoder
        assert " decoded (" in found[f"decode {syntax}"][1], found[f"decode {syntax}"]


def test_missing_index_fails_when_named_and_warns_at_the_default_place(tmp_path):
    named = mi_doctor("--index", str(tmp_path / "nowhere"), "--model", str(FIXTURE))
    assert named.returncode == 1
    status, detail = lines(named)["index"]
    assert status == "fail" and detail.startswith(f"no index at {tmp_path / 'nowhere'}") and "mi-index" in detail
    assert lines(named)["model"][0] == "ok" and "model vs index" not in lines(named)

    default = mi_doctor("--model", str(FIXTURE), env={"XDG_DATA_HOME": str(tmp_path / "data-home")})
    assert default.returncode == 0, default.stdout
    status, detail = lines(default)["index"]
    assert status == "warn" and "no index yet at the default location" in detail and str(tmp_path) in detail


def test_a_model_other_than_the_index_s_fails(index, tmp_path):
    other = shutil.copytree(FIXTURE, tmp_path / "other-model", ignore=shutil.ignore_patterns("expected"))
    from safetensors.torch import load_file, save_file
    weights = load_file(other / "vision_model" / "medimageinsigt-v1.0.0.pt")
    save_file({name: tensor * 1.5 for name, tensor in weights.items()},
              other / "vision_model" / "medimageinsigt-v1.0.0.pt")

    result = mi_doctor("--index", str(index), "--model", str(other))
    assert result.returncode == 1
    status, detail = lines(result)["model vs index"]
    assert status == "fail" and "built with another model" in detail and str(other) in detail
    assert lines(result)["model"][0] == "ok" and "Traceback" not in result.stderr


def test_json_lists_check_status_detail_records(index):
    result = mi_doctor("--index", str(index), "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert isinstance(records, list) and len(records) >= 15
    assert all(set(record) == {"check", "status", "detail"} for record in records)
    assert all(record["status"] in ("ok", "warn", "fail") and record["detail"] for record in records)
    names = [record["check"] for record in records]
    assert names.index("faiss") < names.index("index") < names.index("model") < names.index("reference")


def test_offline_without_weights_is_one_line_naming_the_offline_example(tmp_path):
    result = mi_doctor(env={"HF_HOME": str(tmp_path / "hf"), "XDG_DATA_HOME": str(tmp_path / "data-home")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    status, detail = lines(result)["model"]
    assert status == "fail" and "cannot get model 'lion-ai/MedImageInsights'" in detail
    assert "HF_HUB_OFFLINE is set" in detail
    assert "examples/search_cli.sh" in detail and "MI_MODEL" in detail
    assert "reference" not in lines(result)


def test_the_hub_is_never_asked_for_a_model_doctor_checks(tmp_path, monkeypatch):
    """Online (no HF_HUB_OFFLINE) a repo id not in the cache is reported, not downloaded."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    checks = doctor.model_checks("someone/not-cached", None, tmp_path)
    assert calls == [True]
    assert checks[0].status == "fail" and "not in the local cache" in checks[0].detail


# ---------------------------------------------------------------- the reference comparison

def fixture_reference(model) -> Reference:
    texts = ("lumbar spine", "chest", "desktop")
    vectors = model.encode_texts(list(texts))
    return Reference(name="the tiny model's outputs", dim=model.dim, texts=texts,
                     heads=tuple(tuple(float(x) for x in v[:3]) for v in vectors),
                     tails=tuple(tuple(float(x) for x in v[-3:]) for v in vectors),
                     cosines=tuple((i, j, float(vectors[i] @ vectors[j])) for i, j in ((0, 1), (0, 2), (1, 2))),
                     names=("medimageinsight-tiny",))


def test_reference_match_and_a_2e_4_difference(model):
    reference = fixture_reference(model)
    check = check_reference(model, (reference,))
    assert check.status == "ok" and check.detail.startswith("the weights match the published outputs")

    heads = [list(h) for h in reference.heads]
    heads[1][2] += 2e-4
    moved = dataclasses.replace(reference, heads=tuple(tuple(h) for h in heads))
    check = check_reference(model, (moved,))
    assert check.status == "fail" and "the weights do NOT match the published outputs" in check.detail
    assert "'chest''s first 3 elements" in check.detail

    tails = [list(t) for t in reference.tails]
    tails[2][0] -= 2e-4
    check = check_reference(model, (dataclasses.replace(reference, tails=tuple(tuple(t) for t in tails)),))
    assert check.status == "fail" and "'desktop''s last 3 elements" in check.detail

    cosines = list(reference.cosines)
    cosines[2] = (1, 2, cosines[2][2] + 2e-4)
    check = check_reference(model, (dataclasses.replace(reference, cosines=tuple(cosines)),))
    assert check.status == "fail" and "cosine('chest', 'desktop')" in check.detail

    # A source that does not name the published model: a checkpoint trained from it, only a warning.
    check = check_reference(model, (dataclasses.replace(moved, names=("someone-else",)),))
    assert check.status == "warn" and "do NOT match" in check.detail


def test_model_checks_compare_the_loaded_model_with_the_reference_of_its_dim(model, tmp_path):
    reference = fixture_reference(model)
    checks = {c.check: c for c in doctor.model_checks(str(FIXTURE), None, tmp_path, references=(reference,))}
    assert checks["reference"].detail.startswith("the weights match the published outputs")
    heads = ((reference.heads[0][0] + 2e-4, *reference.heads[0][1:]), *reference.heads[1:])
    moved = dataclasses.replace(reference, heads=heads)
    checks = {c.check: c for c in doctor.model_checks(str(FIXTURE), None, tmp_path, references=(moved,))}
    assert checks["reference"].status == "fail" and "do NOT match" in checks["reference"].detail


class PublishedStandIn:
    """A 1024-d 'model' whose three embeddings have exactly the published first and last
    elements and cosines (the middle elements solved for), so the real constants can be checked."""

    dim = 1024
    source = "/models/MedImageInsights/2024.09.27"

    def __init__(self, reference: Reference, offset: float = 0.0):
        ends = np.array([[*h, *t] for h, t in zip(reference.heads, reference.tails)])
        gram = np.eye(3)
        for i, j, cosine in reference.cosines:
            gram[i, j] = gram[j, i] = cosine + offset
        middle = np.linalg.cholesky(gram - ends @ ends.T)  # rows: the middle parts, of the wanted dot products
        self.vectors = np.zeros((3, 1024))
        self.vectors[:, :3], self.vectors[:, -3:] = ends[:, :3], ends[:, 3:]
        self.vectors[:, 3:6] = middle
        self.texts = reference.texts

    def encode_texts(self, texts):
        assert tuple(texts) == self.texts
        return self.vectors.astype(np.float32)


def test_the_published_reference_is_wired_for_the_real_model():
    real = MEDIMAGEINSIGHT_TEXT
    assert doctor.reference_for(PublishedStandIn(real)) is real and doctor.REFERENCES == (real,)
    assert real.dim == 1024 and real.tolerance == 1e-4 and real.texts == ("lumbar spine", "chest", "desktop")
    assert real.heads == ((-0.03271601, 0.02388754, 0.02584449), (-0.03645158, -0.00188246, 0.00022278),
                          (-0.0056968, 0.06878266, 0.0043339))
    assert real.tails == ((0.00670768, 0.00604417, -0.01052989), (-0.02536389, -0.02322166, 0.02286733),
                          (-0.02845573, 0.01347476, -0.04035829))
    assert real.cosines == ((0, 1, 0.728603), (0, 2, 0.33807534), (1, 2, 0.38285893))

    matching = PublishedStandIn(real)
    assert reference_differences(matching.encode_texts(real.texts), real) == []
    assert check_reference(matching).detail.startswith("the weights match the published outputs")
    off = check_reference(PublishedStandIn(real, offset=3e-4))  # every cosine 3e-4 away
    assert off.status == "fail" and off.detail.count("cosine(") == 3 and "do NOT match" in off.detail


# ---------------------------------------------------------------- the decoders

def test_a_sample_that_does_not_decode_fails_its_syntax(tmp_path):
    import pydicom
    samples = Path(pydicom.__file__).parent / "data" / "test_files"
    good = (samples / "MR_small_RLE.dcm").read_bytes()
    (tmp_path / "MR_small_RLE.dcm").write_bytes(good[: len(good) - 3000])  # pixel data cut short
    checks = {c.check: c for c in doctor.decoder_checks(tmp_path)}
    assert checks["decode RLE"].status == "fail" and "does not decode" in checks["decode RLE"].detail
    assert checks["decode JPEG 2000"].status == "ok" and "no sample" in checks["decode JPEG 2000"].detail


# ---------------------------------------------------------------- the device (no GPU here: PyTorch's answers stubbed)

@pytest.mark.parametrize("capability, status", [((9, 0), "ok"), ((7, 5), "warn")])
def test_a_gpu_is_named_with_its_capability_and_bf16(monkeypatch, capability, status):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    device = {c.check: c for c in doctor.torch_checks()}["device"]
    assert device.status == status and f"cuda:0 NVIDIA H200 (capability {capability[0]}.{capability[1]}; 2 GPUs)" \
        in device.detail
    assert ("native bf16" in device.detail) if status == "ok" else ("--dtype float16" in device.detail)


def test_a_cuda_build_that_sees_no_gpu_warns(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    device = {c.check: c for c in doctor.torch_checks()}["device"]
    assert device.status == "warn" and "built for CUDA 12.4" in device.detail and "nvidia-smi" in device.detail
