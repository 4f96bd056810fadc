"""The encoder against outputs recorded from the original implementation (the tiny
fixture), and its loading and input rules."""
from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from encoders import CheckpointError, ModelNotFoundError, load_model
from encoders.checkpoint import CHECKPOINT_NAMES

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
EXPECTED = FIXTURE / "expected"
TOL = 1e-5


@pytest.fixture(scope="module")
def expected():
    meta = json.loads((EXPECTED / "expected.json").read_text())
    return {
        "meta": meta,
        "texts": meta["texts"],
        "images": [Image.open(EXPECTED / "images" / name) for name in meta["images"]],
        "input_ids": np.load(EXPECTED / "input_ids.npy"),
        "attention_mask": np.load(EXPECTED / "attention_mask.npy"),
        "pixels_0": np.load(EXPECTED / "pixels_0.npy"),
        "image_embeddings": np.load(EXPECTED / "image_embeddings.npy"),
        "text_embeddings": np.load(EXPECTED / "text_embeddings.npy"),
    }


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE, device="cpu")


def make_model_folder(tmp_path: Path, edit=None, dtype=None) -> Path:
    """A copy of the fixture's model folder whose checkpoint went through `edit(tensors)`."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("expected", "*.pt"))
    tensors = load_file(FIXTURE / "vision_model" / CHECKPOINT_NAMES[0])
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, folder / "vision_model" / CHECKPOINT_NAMES[0])
    return folder


# --- parity with the original implementation -------------------------------------------------

def test_tokenizer_ids_and_mask_are_exact(model, expected):
    tokens = model.tokenize(expected["texts"])
    np.testing.assert_array_equal(tokens["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(tokens["attention_mask"], expected["attention_mask"])
    assert tokens["input_ids"].dtype == np.int64 and tokens["input_ids"].shape == (7, 77)


def test_preprocessed_pixels_match(model, expected):
    pixels = model.preprocess(expected["images"][0])
    assert pixels.shape == (3, 480, 480) and pixels.dtype == torch.float32
    assert np.abs(pixels.numpy() - expected["pixels_0"]).max() <= TOL


def test_image_embeddings_match(model, expected):
    got = model.encode_images(expected["images"])
    assert got.dtype == np.float32 and got.shape == expected["image_embeddings"].shape
    assert np.abs(got - expected["image_embeddings"]).max() <= TOL


def test_text_embeddings_match(model, expected):
    got = model.encode_texts(expected["texts"])
    assert got.dtype == np.float32 and got.shape == expected["text_embeddings"].shape
    assert np.abs(got - expected["text_embeddings"]).max() <= TOL


def test_logit_scale_and_dim(model, expected):
    assert model.logit_scale == pytest.approx(expected["meta"]["logit_scale_exp"], rel=1e-6)
    assert model.dim == expected["meta"]["embedding_dim"] == 48


def test_float16_checkpoint_is_cast_to_float32_and_float32_checkpoint_agrees(model, expected, tmp_path):
    assert all(p.dtype == torch.float32 for p in model.net.parameters())  # the fixture is stored as float16
    folder = make_model_folder(tmp_path, dtype=torch.float32)
    model32 = load_model(folder, device="cpu")
    np.testing.assert_allclose(model32.encode_texts(expected["texts"]), expected["text_embeddings"], atol=TOL, rtol=0)
    assert model32.fingerprint != model.fingerprint  # another file, another identity


def test_single_tower_loading_gives_the_same_embeddings(model, expected):
    text_only = load_model(FIXTURE, device="cpu", towers=("text",))
    image_only = load_model(FIXTURE, device="cpu", towers=("image",))
    assert not hasattr(text_only.net, "image_encoder") and not hasattr(image_only.net, "lang_encoder")
    np.testing.assert_array_equal(text_only.encode_texts(expected["texts"]), model.encode_texts(expected["texts"]))
    np.testing.assert_array_equal(image_only.encode_images(expected["images"][:2]),
                                  model.encode_images(expected["images"][:2]))
    with pytest.raises(Exception, match="text tower was not loaded"):
        image_only.encode_texts(["chest"])


def test_text_only_loading_reads_only_text_tensors(tmp_path, expected):
    """A checkpoint without any image tensor still serves text queries."""
    def drop_image_tower(tensors):
        for key in [k for k in tensors if k.startswith("image_")]:
            del tensors[key]
    folder = make_model_folder(tmp_path, drop_image_tower)
    text_only = load_model(folder, device="cpu", towers=("text",))
    np.testing.assert_allclose(text_only.encode_texts(expected["texts"][:2]), expected["text_embeddings"][:2],
                               atol=TOL, rtol=0)
    with pytest.raises(CheckpointError, match="image_encoder"):
        load_model(folder, device="cpu")


def test_cpu_float32_kernels_equal_the_plain_path_also_after_the_weights_change(tmp_path):
    """Under inference the image tower runs fused CPU kernels and a convolution weight packed
    once (encoders/davit.py); with autograd on, plain PyTorch ops. The packed weight must
    follow an in-place change of the weight it was made from."""
    model = load_model(FIXTURE, device="cpu")
    pixels = torch.randn(2, 3, 480, 480, generator=torch.Generator().manual_seed(0))

    def both():
        fused = model.encode_pixels(pixels)
        with torch.enable_grad():
            plain = model.net.encode_image(pixels).detach().numpy()
        return fused, plain

    fused, plain = both()
    np.testing.assert_allclose(fused, plain, atol=1e-6, rtol=0)
    with torch.no_grad():
        for patch_embed in model.net.image_encoder.convs:
            patch_embed.proj.weight.mul_(1.5)
    changed, plain = both()
    np.testing.assert_allclose(changed, plain, atol=1e-6, rtol=0)
    assert np.abs(changed - fused).max() > 1e-3


def test_batches_equal_one_at_a_time(model, expected):
    batch_texts = model.encode_texts(expected["texts"])
    single_texts = np.concatenate([model.encode_texts([t]) for t in expected["texts"]])
    np.testing.assert_allclose(batch_texts, single_texts, atol=1e-6, rtol=0)
    batch_images = model.encode_images(expected["images"], batch_size=3)
    single_images = np.concatenate([model.encode_images([im]) for im in expected["images"]])
    np.testing.assert_allclose(batch_images, single_images, atol=1e-6, rtol=0)


def test_trailing_padding_is_trimmed_and_exact(model, expected, monkeypatch):
    lengths_seen = []
    forward = model.net.lang_encoder.forward

    def spy(input_ids, attention_mask):
        lengths_seen.append(input_ids.shape[1])
        return forward(input_ids, attention_mask)

    monkeypatch.setattr(model.net.lang_encoder, "forward", spy)
    texts = ["lumbar spine fracture", "chest"]
    trimmed = model.encode_texts(texts)
    assert lengths_seen == [6]  # BOS + 4 tokens + EOS, not 77
    tokens = model.tokenize(texts)
    with torch.inference_mode():
        full = model.net.encode_text(torch.from_numpy(tokens["input_ids"]),
                                     torch.from_numpy(tokens["attention_mask"])).numpy()
    assert lengths_seen[-1] == 77
    np.testing.assert_allclose(trimmed, full, atol=1e-6, rtol=0)
    np.testing.assert_allclose(trimmed, expected["text_embeddings"][[3, 1]], atol=TOL, rtol=0)


# --- the tokenizer against transformers' CLIPTokenizer ----------------------------------------

def test_tokenizer_matches_transformers_clip_tokenizer(model):
    transformers = pytest.importorskip("transformers")
    import ftfy
    reference = transformers.CLIPTokenizer.from_pretrained(str(FIXTURE / "language_model" / "clip_tokenizer_4.16.2"))
    texts = [
        "lumbar spine fracture", "  Left-sided   PNEUMOTHORAX\twith mediastinal shift;\nno rib fracture. ",
        "CT head w/o contrast: 3.5mm hyperdensity (R>L)", "don't", "it's the patient's 2nd X-ray!!",
        "Café naïve coöperation", "Ｆｕｌｌｗｉｄｔｈ ＣＴ", "胸部X線 正常", "emoji 🫁 lungs", "a&amp;b &lt;tag&gt;",
        "<|endoftext|> inside", "", " ", "ﬁbrosis", "T1-weighted MRI @ 1.5T, #42 ~ ok?",
        " ".join(["word"] * 100),
    ]
    ours = model.tokenize(texts)
    theirs = reference([ftfy.fix_text(t) for t in texts], padding="max_length", max_length=77, truncation=True,
                       return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


# --- bad input ------------------------------------------------------------------------------

def test_empty_lists_give_empty_arrays(model):
    assert model.encode_images([]).shape == (0, 48)
    assert model.encode_texts([]).shape == (0, 48)


@pytest.mark.parametrize("thing", ["not an image", 42, None, {"a": 1}, np.zeros((4, 4, 7)), np.zeros((0, 5))])
def test_non_images_raise_value_error_naming_them(model, thing):
    with pytest.raises(ValueError, match="expected"):
        model.encode_images([thing])


def test_text_input_must_be_strings(model):
    with pytest.raises(ValueError, match="strings"):
        model.encode_texts([b"bytes"])


def test_16_bit_and_float_images_are_scaled_to_8_bits(model):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, size=(64, 80), dtype=np.uint8)
    gray8[0, 0], gray8[0, 1] = 0, 255  # full range, so min-max scaling maps it back exactly
    reference = model.encode_images([gray8])
    as_16 = gray8.astype(np.uint16) * 257
    as_float = gray8.astype(np.float32) / 255.0
    pil_16 = Image.fromarray(as_16)  # mode I;16
    for variant in (as_16, as_float, pil_16, Image.fromarray(gray8), np.stack([gray8] * 3, axis=-1)):
        np.testing.assert_allclose(model.encode_images([variant]), reference, atol=1e-6, rtol=0)
    # a low-contrast 12-bit image is stretched to the full 8-bit range, not clipped to black
    twelve_bit = (gray8.astype(np.uint16) // 16 + 1000)
    assert np.abs(model.encode_images([twelve_bit]) - reference).max() < 0.05


def test_images_of_any_size_and_mode(model):
    images = [np.full((1, 1), 7, np.uint8), np.zeros((3000, 20), np.uint16), Image.new("RGBA", (33, 17)),
              Image.new("P", (10, 10)), Image.new("1", (5, 9)), np.ones((20, 30, 4), np.uint8)]
    out = model.encode_images(images)
    assert out.shape == (len(images), 48)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


# --- loading errors -------------------------------------------------------------------------

def test_missing_tensor_is_named(tmp_path):
    folder = make_model_folder(tmp_path, lambda t: t.pop("lang_encoder.ln_final.bias"))
    with pytest.raises(CheckpointError, match=r"lang_encoder\.ln_final\.bias"):
        load_model(folder, device="cpu")


def test_wrong_shape_is_named(tmp_path):
    def shrink(tensors):
        tensors["lang_projection"] = tensors["lang_projection"][:, :40].contiguous()
    folder = make_model_folder(tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"lang_projection is \[32, 40\], expected \[32, 48\]"):
        load_model(folder, device="cpu")


def test_extra_tensors_are_reported_not_fatal(tmp_path, caplog, expected):
    def add(tensors):
        tensors["image_encoder.head.weight"] = torch.zeros(3, 3)
        tensors["training_step"] = torch.zeros(())
    folder = make_model_folder(tmp_path, add)
    with caplog.at_level(logging.WARNING):
        both = load_model(folder, device="cpu")
    assert "image_encoder.head.weight" in caplog.text
    assert both.net.unexpected_keys == ["image_encoder.head.weight", "training_step"]
    text_only = load_model(folder, device="cpu", towers=("text",))
    assert text_only.net.unexpected_keys == ["training_step"]  # the image tower's extras are its own business
    np.testing.assert_allclose(text_only.encode_texts(["chest"]), expected["text_embeddings"][[1]], atol=TOL, rtol=0)


class _Boobytrap:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "UNPICKLED",))


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    folder = make_model_folder(tmp_path)
    marker = Path(__file__).parent / "UNPICKLED"
    checkpoint = folder / "vision_model" / CHECKPOINT_NAMES[0]
    torch.save({"weights": _Boobytrap()}, checkpoint)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder, device="cpu")
    checkpoint.write_bytes(pickle.dumps(_Boobytrap()))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def test_missing_folder_and_offline_repo_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no model folder at .*MI_MODEL"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="not a MedImageInsight model folder"):
        load_model(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="cannot get model 'someone/not-cached'.*--model"):
        load_model("someone/not-cached")
    monkeypatch.setenv("MI_MODEL", str(tmp_path / "from-env"))
    with pytest.raises(ModelNotFoundError, match="from-env"):
        load_model()


def test_folder_holding_the_dated_folder_is_accepted(tmp_path, model):
    parent = tmp_path / "MedImageInsights"
    shutil.copytree(FIXTURE, parent / "2024.09.27", ignore=shutil.ignore_patterns("expected"))
    loaded = load_model(parent, device="cpu", towers=("text",))
    assert loaded.source.endswith("2024.09.27")
    np.testing.assert_array_equal(loaded.encode_texts(["chest"]), model.encode_texts(["chest"]))


def test_bfloat16_mode_stays_close_to_float32(model, expected):
    """The opt-in fast mode (AMX on CPUs that have it, the default on CUDA)."""
    fast = load_model(FIXTURE, device="cpu", dtype="bfloat16")
    assert fast.net.lang_encoder.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert fast.net.lang_encoder.ln_final.weight.dtype == torch.float32
    images = fast.encode_images(expected["images"])
    texts = fast.encode_texts(expected["texts"])
    assert images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    assert (images * expected["image_embeddings"]).sum(axis=1).min() > 0.99
    assert (texts * expected["text_embeddings"]).sum(axis=1).min() > 0.999


@pytest.mark.parametrize("shape", [(600, 512), (1955, 1841), (33, 17), (480, 480)])
def test_grey_preprocessing_equals_the_published_order(model, shape):
    """We resize grey images before making them RGB (faster); the published transform converts
    first. The results must be identical, bit for bit."""
    grey = Image.fromarray(np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8), "L")
    rgb = np.asarray(grey.convert("RGB").resize((480, 480), Image.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    published = ((torch.from_numpy(rgb).permute(2, 0, 1) - torch.from_numpy(mean)[:, None, None])
                 / torch.from_numpy(std)[:, None, None])
    assert torch.equal(model.preprocess(grey), published)


def test_identity_covers_the_config_and_needs_no_weights(tmp_path, model):
    from encoders import describe_model
    assert describe_model(FIXTURE) == {"fingerprint": model.fingerprint, "dim": 48, "source": model.source}
    folder = make_model_folder(tmp_path)
    before = describe_model(folder)["fingerprint"]
    config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config.replace("WINDOW_SIZE: 12", "WINDOW_SIZE: 6"))
    assert describe_model(folder)["fingerprint"] != before  # same weights, another network
