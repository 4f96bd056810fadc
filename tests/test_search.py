"""The retrieval API end to end: a small index built with the tiny fixture model, searched."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

import encoders
import indexer
from indexer.decode import decode_file
from retrieval import QueryError, Searcher
from retrieval.errors import EmptyIndexError, ModelMismatchError
from retrieval.query import combine

FIXTURE = Path(__file__).parent / "fixtures" / "medimageinsight-tiny"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # globbed: no downloads
DICOMS = {"CT_small.dcm": "CT", "MR_small.dcm": "MR", "MR_small_RLE.dcm": "MR",
          "MR_small_implicit.dcm": "MR", "examples_overlay.dcm": "MR"}


def patterns(size: int = 96) -> dict[str, np.ndarray]:
    """Eight distinct 8-bit grey images."""
    y, x = np.mgrid[0:size, 0:size]
    return {
        "gradient": (x * 255 // size),
        "vertical": (y * 255 // size),
        "checker": ((x // 12 + y // 12) % 2) * 255,
        "stripes": ((x // 6) % 2) * 255,
        "disc": ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2) * 255,
        "ring": np.abs(np.hypot(x - size / 2, y - size / 2) - size / 4) < 5,
        "noise": np.random.default_rng(0).integers(0, 256, (size, size)),
        "corner": ((x < size / 3) & (y < size / 3)) * 255,
    }


@pytest.fixture(scope="module")
def model():
    return encoders.load_model(FIXTURE)


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model) -> dict[str, Path]:
    """Index a folder of 8 PNGs (4 under a/, 4 under b/) and 5 real DICOM files (1 CT, 4 MR)."""
    root = tmp_path_factory.mktemp("collection")
    data = root / "data"
    files = {}
    for i, (name, pixels) in enumerate(patterns().items()):
        path = data / ("a" if i < 4 else "b") / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8) * (255 if pixels.dtype == bool else 1)).save(path)
        files[name] = path
    (data / "dicom").mkdir()
    for name in DICOMS:
        shutil.copy(PYDICOM_FILES / name, data / "dicom" / name)
        files[name] = data / "dicom" / name
    index_dir = root / "index"
    summary = indexer.index_paths([data], index_dir, model=model)
    assert summary["new"] == len(files), summary
    return {"index": index_dir, "data": data, **files}


@pytest.fixture(scope="module")
def searcher(collection):
    with Searcher(index=collection["index"], model=str(FIXTURE)) as s:
        yield s


def test_image_query_ranks_the_identical_image_first(searcher, collection, tmp_path):
    for name in ["checker", "disc", "CT_small.dcm", "examples_overlay.dcm"]:
        hits = searcher.search(image=collection[name], k=3)
        assert Path(hits[0].path) == collection[name].resolve()
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].rank == 1 and hits[0].score >= hits[1].score >= hits[2].score
    # a copy outside the index decodes the same way as the indexed file
    copy = tmp_path / "query.dcm"
    shutil.copy(collection["CT_small.dcm"], copy)
    hit = searcher.search(str(copy), k=1)[0]
    assert Path(hit.path) == collection["CT_small.dcm"].resolve()
    assert hit.score == pytest.approx(1.0, abs=1e-4)


def test_hit_carries_the_stored_metadata(searcher, collection):
    hit = searcher.search(image=collection["CT_small.dcm"], k=1)[0]
    assert hit.metadata["modality"] == "CT"
    assert hit.metadata["path"] == hit.path
    row = hit.to_dict()
    assert {"rank", "score", "id", "path", "modality", "study_date"} <= row.keys()


def test_filters_apply_before_the_top_k_cut(searcher, collection):
    query = collection["checker"]  # a PNG: unfiltered, PNGs rank first
    unfiltered = searcher.search(image=query, k=4)
    assert not any(h.metadata.get("modality") == "MR" for h in unfiltered)
    hits = searcher.search(image=query, k=3, modality="MR", duplicates=True)  # MR_small in 3 syntaxes: 3 rows
    assert len(hits) == 3 and all(h.metadata["modality"] == "MR" for h in hits)
    hits = searcher.search(image=query, k=10, modality="MR", duplicates=True)
    assert len(hits) == 4  # every MR, and nothing else
    distinct = searcher.search(image=query, k=10, modality="MR")  # MR_small's three encodings are one image
    assert len(distinct) == 2 and sorted(h.copies for h in distinct) == [1, 3]
    under = collection["data"] / "b"
    hits = searcher.search(image=query, k=4, under=under)
    assert len(hits) == 4 and all(Path(h.path).is_relative_to(under.resolve()) for h in hits)
    hits = searcher.search(image=query, k=10, body_part="ABDOMEN")
    assert [Path(h.path).name for h in hits] == ["examples_overlay.dcm"]


def test_date_filters(searcher, collection):
    query = collection["CT_small.dcm"]  # study date 2004-01-19; the MR files 2004-08-26, 2005-11-30
    since = searcher.search(image=query, k=10, since="2004-06-01", duplicates=True)
    assert len(since) == 4 and all(h.metadata["modality"] == "MR" for h in since)
    until = searcher.search(image=query, k=10, until="2004-12-31", duplicates=True)
    assert sorted(Path(h.path).name for h in until) == sorted(n for n in DICOMS if n != "examples_overlay.dcm")
    with pytest.raises(QueryError, match="YYYY-MM-DD"):
        searcher.search(image=query, since="last week")


def test_min_score_and_k(searcher, collection):
    hits = searcher.search(image=collection["disc"], k=13, duplicates=True)
    assert [h.rank for h in hits] == list(range(1, 14))
    cut = (hits[2].score + hits[3].score) / 2
    assert len(searcher.search(image=collection["disc"], k=13, min_score=cut, duplicates=True)) == 3
    with pytest.raises(QueryError):
        searcher.search(image=collection["disc"], k=0)


def test_weighted_combinations_change_the_ranking(searcher, collection, model):
    a, b = str(collection["gradient"]), str(collection["ring"])
    alone = [h.path for h in searcher.search(a, k=13)]
    assert Path(alone[0]) == collection["gradient"].resolve()
    towards_b = searcher.search([a, "+", "20:" + b], k=13)
    assert Path(towards_b[0].path) == collection["ring"].resolve()
    rank_b = alone.index(str(collection["ring"].resolve()))
    away = [h.path for h in searcher.search([a, "-", b], k=13)]
    assert away.index(str(collection["ring"].resolve())) > rank_b
    # the combined query is exactly the normalised weighted sum of the unit embeddings
    images = model.encode_images([Image.open(a), Image.open(b)])
    text = model.encode_texts(["chest x-ray"])[0]
    expected = combine(np.stack([images[0], images[1], text]), [2.0, -1.0, 0.5])
    got = searcher.embed(["2:" + a, "-", b, "+", "0.5:chest x-ray"])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_each_tower_is_loaded_once_and_only_when_needed(collection, monkeypatch):
    loads = []
    real = encoders.load_model

    def counting(source=None, **kwargs):
        loads.append(kwargs.get("towers"))
        return real(source, **kwargs)

    monkeypatch.setattr(encoders, "load_model", counting)
    with Searcher(index=collection["index"], model=str(FIXTURE)) as s:
        s.search("pleural effusion", k=2)
        s.search("pneumothorax", k=2)
        assert loads == [("text",)]
        s.search(image=collection["disc"], k=2)
        s.search(image=collection["ring"], k=2)
        assert loads == [("text",), ("image",)]


def test_model_defaults_to_the_one_recorded_in_the_index(collection, monkeypatch):
    monkeypatch.delenv("MI_MODEL", raising=False)
    with Searcher(index=collection["index"]) as s:  # no model given
        assert s.search(image=collection["disc"], k=1)[0].score == pytest.approx(1.0, abs=1e-4)
        assert Path(s.encoder("image").source) == FIXTURE.resolve()


def test_labels_are_a_softmax_with_the_logit_scale(searcher, collection, model):
    labels = ["normal", "pneumothorax", "pleural effusion"]
    hits = searcher.search(image=collection["stripes"], k=3, labels=",".join(labels))
    texts = model.encode_texts(labels)
    for hit in hits:
        p = np.array([hit.labels[label] for label in labels])
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        image = model.encode_images([decode_file(hit.path).frames[0][1]])[0]  # as the indexer did
        logits = model.logit_scale * texts @ image
        # the stored vector is float16: a cosine off by ~1e-5, times the logit scale (100)
        np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum(), atol=1e-3)
    direct = searcher.classify(collection["stripes"], labels)
    assert list(direct) == labels
    np.testing.assert_allclose(list(direct.values()), [hits[0].labels[label] for label in labels], atol=1e-3)
    multi = searcher.classify(collection["stripes"], labels, multilabel=True)
    assert all(0.0 < v < 1.0 for v in multi.values())



def test_api_errors(collection, tmp_path, model):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with Searcher(index=collection["index"], model=model) as s:
        with pytest.raises(QueryError, match="cannot read the query image"):
            s.search(image=bad)
        with pytest.raises(QueryError, match="not found"):
            s.search(image=tmp_path / "missing.png")
        with pytest.raises(QueryError, match="cancel"):
            s.search(["effusion", "-", "effusion"])


def test_empty_index(tmp_path, model):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a.png")
    indexer.index_paths([data], tmp_path / "index", model=model)
    (data / "a.png").unlink()
    indexer.index_paths([data], tmp_path / "index", model=model)  # an index whose only image is gone
    with pytest.raises(EmptyIndexError, match="mi-index"):
        Searcher(index=tmp_path / "index", model=model)


def test_another_model_is_refused(collection, other_model_folder):
    with Searcher(index=collection["index"], model=str(other_model_folder)) as s:
        with pytest.raises(ModelMismatchError, match="built with"):
            s.search("effusion")


@pytest.fixture(scope="module")
def other_model_folder(tmp_path_factory) -> Path:
    """The fixture model with some weights zeroed: same shapes, another fingerprint."""
    folder = tmp_path_factory.mktemp("other-model")
    shutil.copytree(FIXTURE, folder, dirs_exist_ok=True)
    weights = next((folder / "vision_model").glob("*.pt"))
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2 // 2 * 2)  # a sampled block, inside the tensor data
        f.write(bytes(256))
    return folder


# ---------------------------------------------------------------------------- mi-search

def run_cli(*args: str):
    from click.testing import CliRunner

    from retrieval.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], env={"MI_MODEL": None, "MI_INDEX": None})


def test_cli_json_output_parses(collection):
    import json

    result = run_cli(collection["checker"], "--index", collection["index"], "--model", FIXTURE, "--json", "-k", 5)
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert Path(hits[0]["path"]) == collection["checker"].resolve()
    assert {"score", "path", "modality", "body_part", "view_position", "study_date"} <= hits[0].keys()


def test_cli_text_query_with_filter_paths_and_piped_lines(collection):
    common = ["chest x-ray", "--index", collection["index"], "--model", FIXTURE, "-k", 2, "--modality", "MR"]
    paths = run_cli(*common, "--paths")
    assert paths.exit_code == 0, paths.output
    lines = paths.stdout.splitlines()
    assert len(lines) == 2 and all(Path(line).is_file() for line in lines)
    piped = run_cli(*common)  # not a terminal: a header, then tab-separated rank, score, path, modality, ...
    header, *rows = [line.split("\t") for line in piped.stdout.splitlines()]
    assert header[:4] == ["rank", "score", "path", "modality"]
    assert [row[2] for row in rows] == lines and all(row[3] == "MR" for row in rows)


def test_cli_labels(collection):
    import json

    result = run_cli(collection["disc"], "--index", collection["index"], "--model", FIXTURE, "--json", "-k", 2,
                     "--labels", "normal, pneumothorax")
    assert result.exit_code == 0, result.output
    for hit in json.loads(result.stdout):
        assert set(hit["labels"]) == {"normal", "pneumothorax"}
        assert sum(hit["labels"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("case, expected", [
    ("no index", "mi-index"),
    ("empty index", "empty"),
    ("other model", "built with"),
    ("unreadable image", "cannot read the query image"),
    ("no model", "model"),
    ("bad syntax", "syntax"),
])
def test_cli_errors_are_one_clean_line(case, expected, collection, other_model_folder, model, tmp_path):
    index, query = collection["index"], ["effusion"]
    model_args = ["--model", FIXTURE]
    if case == "no index":
        index = tmp_path / "no-index-here"
    elif case == "empty index":
        from indexer.store import IndexStore
        IndexStore.open(tmp_path / "index", create=True).close()
        index = tmp_path / "index"
    elif case == "other model":
        model_args = ["--model", other_model_folder]
    elif case == "unreadable image":
        query = [tmp_path / "bad.dcm"]
        query[0].write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    elif case == "no model":
        model_args = ["--model", tmp_path / "no-model-here"]
    elif case == "bad syntax":
        query = ["effusion", "+"]
    result = run_cli(*query, "--index", index, *model_args)
    assert result.exit_code == 1
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("Error: ") and "\n" not in message and "Traceback" not in message
    assert expected in message


def test_cli_in_a_fresh_process(tmp_path):
    """The real entry point: no traceback, exit status 1, the message on stderr."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retrieval.cli", "effusion", "--index", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                          env={"PATH": "", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "mi-index" in done.stderr and "Traceback" not in done.stderr


def test_a_repeated_text_is_encoded_once_and_gives_the_same_hits(searcher, monkeypatch):
    from retrieval import search as search_module

    first = searcher.search("pleural effusion", k=3)
    calls = []
    tower = searcher.encoder("text")
    original = tower.encode_texts
    monkeypatch.setattr(tower, "encode_texts", lambda texts: calls.append(list(texts)) or original(texts))
    searcher.search("pleural effusion", k=3, min_score=-1.0)   # another option, the same text
    searcher.search(["pleural effusion", "+", "cardiomegaly"], k=3)
    assert calls == [["cardiomegaly"]]  # only the new text went through the tower
    assert [h.id for h in searcher.search("pleural effusion", k=3)] == [h.id for h in first]
    monkeypatch.setattr(search_module, "TEXT_CACHE_SIZE", 1)
    searcher.search("a new text", k=1)
    assert list(searcher._text_cache) == ["a new text"]
