"""GET /api/facets with the search's filters: each facet counted under the OTHER filters (FiftyOne's sidebar),
checked against counts made here from the planted images; the modality facet still lists every modality under
the rest, the years ignore since/until and the folders ignore under; bad values get one line; answers are
cached per index generation and filters, within a bound, and a new generation is counted afresh."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
from fastapi.testclient import TestClient

from curate_synthetic import unit, write_index
from raw_sqlite import fetch_rows

MODALITIES = ("CT", "CR", "MR")
BODY_PARTS = ("CHEST", "HEAD", "ABDOMEN", None)
VIEWS = ("PA", "AP", None)
ODD_NAME = os.fsdecode(b"/archive/xr/caf\xe9")  # a folder whose name is not UTF-8: its paths are stored as BLOBs


def planted(count: int = 120, start: int = 0) -> list[dict]:
    rng = np.random.default_rng(start)
    images = []
    for i in range(start, start + count):
        folder = ODD_NAME if i % 17 == 0 else f"/archive/{'ct' if i % 3 == 0 else 'xr'}/batch{i % 4}"
        images.append({"path": f"{folder}/img{i:04d}.dcm", "content_hash": f"h{i}",
                       "embedding": unit(rng.standard_normal(8)),
                       "modality": MODALITIES[i % 3].lower() if i % 10 == 0 else MODALITIES[i % 3],  # any case
                       "body_part": BODY_PARTS[i % 4], "view_position": VIEWS[i % 3],
                       "study_date": None if i % 11 == 0 else f"{2015 + i % 6}-{1 + i % 12:02d}-{1 + i % 28:02d}"})
    return images


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from retrieval.server import create_app

    index = write_index(tmp_path_factory.mktemp("facets") / "index", planted(), 8)
    app = create_app(index)
    return {"client": TestClient(app), "app": app, "index": index, "images": planted()}


def passes(image: dict, filters: dict, leave_out: tuple[str, ...] = ()) -> bool:
    """Whether an image passes the filters (less `leave_out`), as the search reads them."""
    for name, value in filters.items():
        if name in leave_out:
            continue
        if name in ("modality", "body_part", "view"):
            stored = image["view_position" if name == "view" else name]
            if stored is None or stored.upper() != value.upper():
                return False
        elif name in ("since", "until"):
            date = image["study_date"]
            if date is None or (date < value if name == "since" else date > value):
                return False
        elif name == "under" and not image["path"].startswith(value.rstrip("/") + "/"):
            return False
    return True


def expected_values(images: list[dict], filters: dict, name: str) -> tuple[dict[str, int], int]:
    column = "view_position" if name == "view" else name
    counted = Counter(image[column].upper() if image[column] else None
                      for image in images if passes(image, filters, (name,)))
    none = counted.pop(None, 0)
    return dict(counted), none


def values_of(answer: dict, name: str) -> tuple[dict[str, int], int]:
    facet = answer["filters"][name]
    return {value["value"]: value["count"] for value in facet["values"]}, facet["none"]


@pytest.mark.parametrize("filters", [
    {},
    {"modality": "CT"},
    {"modality": "ct", "body_part": "chest"},                  # compared case-insensitively, as the search does
    {"view": "PA", "since": "2017-01-01", "until": "2019-06-30"},
    {"under": "/archive/xr", "modality": "MR"},
])
def test_each_facet_is_counted_under_the_other_filters(served, filters):
    answer = served["client"].get("/api/facets", params=filters).json()
    images = served["images"]
    for name in ("modality", "body_part", "view"):
        assert values_of(answer, name) == expected_values(images, filters, name), name
    assert answer["matching"] == sum(passes(image, filters) for image in images)
    assert answer["images"] == len(images)
    dated = [image["study_date"] for image in images if passes(image, filters, ("since", "until"))
             and image["study_date"]]
    assert {y["year"]: y["count"] for y in answer["years"]} == Counter(date[:4] for date in dated)
    assert answer["dates"] == {"first": min(dated), "last": max(dated)}
    folders = {folder["path"]: folder["count"] for folder in answer["folders"]}
    under_others = [image for image in images if passes(image, filters, ("under",))]
    for folder in ("/archive/xr", "/archive/ct/batch0", ODD_NAME):
        expected = sum(image["path"].startswith(folder + "/") for image in under_others)
        assert folders.get(folder, 0) == expected, folder


def test_choosing_a_modality_narrows_the_body_parts_but_not_the_modalities(served):
    client = served["client"]
    everything = client.get("/api/facets").json()
    ct = client.get("/api/facets", params={"modality": "CT"}).json()
    assert values_of(ct, "modality") == values_of(everything, "modality")  # every modality, to switch to
    assert sum(values_of(ct, "body_part")[0].values()) < sum(values_of(everything, "body_part")[0].values())
    assert ct["matching"] == values_of(everything, "modality")[0]["CT"]
    dated = client.get("/api/facets", params={"since": "2018", "until": "2018"}).json()
    assert dated["years"] == everything["years"]  # the date facet ignores its own bounds
    assert dated["matching"] == {y["year"]: y["count"] for y in everything["years"]}["2018"]


def test_a_bad_filter_gets_one_line(served):
    response = served["client"].get("/api/facets", params={"since": "last tuesday"})
    assert response.status_code == 400
    assert "since" in response.json()["error"] and "\n" not in response.json()["error"]


def test_answers_are_cached_per_generation_and_filters_within_a_bound(tmp_path):
    from retrieval.server import create_app
    from retrieval.server.aggregates import FACETS_CACHED

    index = write_index(tmp_path / "index", planted(), 8)
    app = create_app(index)
    client = TestClient(app)
    for day in range(FACETS_CACHED + 5):
        client.get("/api/facets", params={"until": f"2019-{1 + day // 28:02d}-{1 + day % 28:02d}"})
    assert len(app.state.facets_cache) == FACETS_CACHED
    before = client.get("/api/facets", params={"modality": "MR"}).json()
    added = planted(7, start=1000)
    write_index(index, added, 8)  # a new generation: seven more images
    after = client.get("/api/facets", params={"modality": "MR"}).json()
    assert after["generation"] != before["generation"]
    assert after["images"] == before["images"] + 7
    assert after["matching"] == before["matching"] + sum(image["modality"].upper() == "MR" for image in added)


@pytest.mark.parametrize("column", ["modality", "body_part", "view_position"])
def test_an_unfiltered_facet_walks_an_index_not_the_rows(served, column):
    # each row carries its vector: a facet that scans the table reads the whole file (seconds at 1M)
    plan = " ".join(str(row[-1]) for row in fetch_rows(
        served["index"], f"EXPLAIN QUERY PLAN SELECT upper({column}), count(*) FROM images GROUP BY {column} COLLATE NOCASE"))
    assert "COVERING INDEX" in plan, plan
