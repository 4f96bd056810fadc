"""mi outliers: an image of group A that looks like group B is unlike its group; a vector far
from everything is unlike anything; both ranked first with their reasons."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from curate_synthetic import unit, write_index
from retrieval.commands import mi


def test_planted_outliers_rank_first_with_their_reasons(tmp_path):
    rng = np.random.default_rng(11)
    a, b = unit(rng.standard_normal((2, 32)))
    images = [{"path": f"/ct/{i}.dcm", "modality": "CT", "embedding": unit(a + 0.3 * unit(rng.standard_normal(32)))}
              for i in range(100)]
    images += [{"path": f"/mr/{i}.dcm", "modality": "MR", "embedding": unit(b + 0.3 * unit(rng.standard_normal(32)))}
               for i in range(100)]
    images.append({"path": "/ct/looks_like_mr.dcm", "modality": "CT", "embedding": unit(b + 0.3 * unit(rng.standard_normal(32)))})
    lonely = unit(rng.standard_normal(32))
    lonely = unit(lonely - (lonely @ a) * a - (lonely @ b) * b)   # orthogonal to both groups
    images.append({"path": "/mr/lonely.dcm", "modality": "MR", "embedding": lonely})
    write_index(tmp_path / "index", images, 32)
    result = CliRunner().invoke(mi, ["outliers", "--index", str(tmp_path / "index"), "--by", "modality", "-n", "5",
                                     "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    first_two = {o["path"]: o for o in report["outliers"][:2]}
    assert set(first_two) == {"/ct/looks_like_mr.dcm", "/mr/lonely.dcm"}
    assert first_two["/ct/looks_like_mr.dcm"]["reason"].startswith("unlike its modality CT")
    assert all(n["path"].startswith("/mr/") for n in first_two["/ct/looks_like_mr.dcm"]["neighbours"])
    assert report["outliers"][2]["score"] < min(o["score"] for o in first_two.values())
    plain = CliRunner().invoke(mi, ["outliers", "--index", str(tmp_path / "index"), "-n", "1", "--json"])
    (top,) = json.loads(plain.output)["outliers"]
    assert top["path"] == "/mr/lonely.dcm" and top["reason"].startswith("unlike anything in the index")
