"""Query syntax, embedding combination and zero-shot label math (no model, no index)."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import QueryError
from retrieval.labels import contrast_probabilities, parse_labels, softmax_probabilities
from retrieval.query import QueryTerm, combine, parse_query


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "case12.dcm"
    path.write_bytes(b"not decoded by the parser")
    return str(path)


def test_rclip_style_combination(image_file):
    terms = parse_query(["2:pleural effusion", "+", image_file, "-", "pacemaker"])
    assert terms == [QueryTerm("text", "pleural effusion", 2.0), QueryTerm("image", image_file, 1.0),
                     QueryTerm("text", "pacemaker", -1.0)]


def test_single_string_text_or_image(image_file):
    assert parse_query("lumbar spine fracture") == [QueryTerm("text", "lumbar spine fracture")]
    assert parse_query(image_file) == [QueryTerm("image", image_file)]
    assert parse_query(["0.5:" + image_file]) == [QueryTerm("image", image_file, 0.5)]


def test_force_text_or_image(image_file):
    assert parse_query([image_file], force="text") == [QueryTerm("text", image_file)]
    assert parse_query(["missing.png"], force="image") == [QueryTerm("image", "missing.png")]


def test_unquoted_words_are_one_text(image_file):
    assert parse_query(["pleural", "effusion"]) == [QueryTerm("text", "pleural effusion")]
    # an image next to a text without an operator is added, not joined
    assert parse_query(["effusion", image_file]) == [QueryTerm("text", "effusion"), QueryTerm("image", image_file)]


def test_a_file_whose_name_looks_weighted_is_an_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "2:weird.png").write_bytes(b"x")
    assert parse_query(["2:weird.png"]) == [QueryTerm("image", "2:weird.png")]


@pytest.mark.parametrize("tokens", [[], ["a", "+"], ["a", "+", "-", "b"], ["2:"], ["+"]])
def test_bad_syntax_is_a_query_error(tokens):
    with pytest.raises(QueryError, match="syntax|empty"):
        parse_query(tokens)


def test_combine_weights_and_normalises():
    a, b = np.eye(3, dtype=np.float32)[:2]
    out = combine(np.stack([a, 2 * b]), [2.0, -1.0])  # rows are normalised before weighting
    np.testing.assert_allclose(out, np.array([2, -1, 0]) / np.sqrt(5), atol=1e-6)
    assert combine(np.stack([a]), [1.0]) == pytest.approx(a)
    with pytest.raises(QueryError, match="cancel"):
        combine(np.stack([a, a]), [1.0, -1.0])


def test_softmax_uses_the_logit_scale_and_sums_to_one():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 16))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    labels = rng.standard_normal((3, 16))
    labels /= np.linalg.norm(labels, axis=1, keepdims=True)
    p = softmax_probabilities(images, labels, logit_scale=50.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    logits = 50.0 * images @ labels.T
    np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), atol=1e-9)
    sharper = softmax_probabilities(images, labels, logit_scale=500.0)
    assert (sharper.max(axis=1) > p.max(axis=1)).all()
    assert (sharper.argmax(axis=1) == p.argmax(axis=1)).all()


def test_contrast_probabilities_are_independent_sigmoids():
    image = np.array([[1.0, 0.0]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0]])
    negations = np.array([[0.0, 1.0], [1.0, 0.0]])
    p = contrast_probabilities(image, labels, negations, logit_scale=10.0)
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-10)), 1 / (1 + np.exp(10))]])


def test_parse_labels():
    assert parse_labels(" normal, pneumothorax ,") == ["normal", "pneumothorax"]
    with pytest.raises(QueryError):
        parse_labels("a,a")
    with pytest.raises(QueryError):
        parse_labels(" , ")
