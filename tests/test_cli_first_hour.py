"""What a new user still trips on in the first hour with mi-index and mi-search (hardening, item 5): a mistyped
query file, an unreadable --status, a summary hard to read, --update with a folder gone, --since 2020, a failed
--sample run, --remove of what was never indexed. Each command runs as a real process."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "medimageinsight-tiny"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
LONG_REASON_END = "or the transfer syntax may be incorrect"  # pydicom's reason for short pixel data, whole


def run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                   "COLUMNS": "80", **(env or {})}
    environment.pop("MI_MODEL", None)
    environment.pop("MI_INDEX", None)
    environment.pop("MI_SERVER", None)
    return subprocess.run([sys.executable, "-c", f"from {module} import entry; entry()", *args],
                          env=environment, capture_output=True, text=True, timeout=300)


def mi_index(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run("indexer.cli", *args, env=env)


def mi_search(*args: str) -> subprocess.CompletedProcess:
    return run("retrieval.cli", *args, "--no-server")


def pngs(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.fromarray(np.full((16, 16), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def short_pixel_data_dicom(path: Path) -> Path:
    """A real CT file whose pixel data is cut short: pydicom's reason for it is long (about 190 characters)."""
    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    dataset.PixelData = dataset.PixelData[:100]
    dataset.save_as(path)
    return path


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two folders indexed once: three PNGs, two DICOM studies of 2004, a file that is no image, and a DICOM
    with short pixel data; and one PNG in another folder. Returns (root, index, the first run)."""
    root = tmp_path_factory.mktemp("first-hour")
    first, second = pngs(root / "xrays", 3), pngs(root / "more", 1, start=5)
    (first / "notes.png").write_bytes(b"not a png at all")
    short_pixel_data_dicom(first / "short.dcm")
    for name in ("CT_small.dcm", "MR_small.dcm"):  # studies of 2004-01-19 and 2004-08-26
        shutil.copy(TEST_FILES / name, first / name)
    index = root / "index"
    result = mi_index(str(first), str(second), "--index", str(index), "--model", str(FIXTURE), "--workers", "0")
    assert result.returncode == 0, result.stderr
    return root, index, result


# ---------------------------------------------------------------- mi-search: a query file that is not there

@pytest.mark.parametrize("query", ["./nofile.png", "scans/case12", "case12.DCM"])
def test_a_query_that_looks_like_a_missing_file_is_an_error_not_a_text(indexed, query):
    _, index, _ = indexed
    line = one_error_line(mi_search(query, "--index", str(index)))
    assert f"no such file: {query}" in line and "--text" in line


def test_text_that_merely_contains_a_slash_and_forced_text_are_still_searched(indexed):
    _, index, _ = indexed
    assert mi_search("cardiomegaly and/or effusion", "--index", str(index)).returncode == 0
    forced = mi_search("./nofile.png", "--text", "--index", str(index), "--json")
    assert forced.returncode == 0, forced.stderr
    assert len(json.loads(forced.stdout)) > 0


# ---------------------------------------------------------------- mi-index --status

def test_status_lists_one_folder_a_line_and_shortens_reasons_at_a_word(indexed):
    root, index, _ = indexed
    status = mi_index("--status", "--index", str(index))
    assert status.returncode == 0, status.stderr
    assert "\\x0a" not in status.stdout
    lines = status.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), status.stdout
    for folder in (root / "xrays", root / "more"):
        assert sum(line.strip().endswith(str(folder)) for line in lines) == 1, status.stdout
    reason = next(line for line in lines if "pixel data" in line).strip()
    assert reason.endswith("...") and LONG_REASON_END not in reason
    shown = reason.removeprefix("skipped").strip().removeprefix("1 ").removesuffix("...").split()
    whole = ("truncated or corrupt DICOM: The number of bytes of pixel data is less than expected (100 vs 32768 "
             "bytes) - the dataset may be corrupted, have an invalid group 0028 element value, " + LONG_REASON_END)
    assert shown == whole.split()[:len(shown)], reason  # whole words only


def test_json_carries_the_whole_skip_reason(indexed):
    _, index, first_run = indexed
    # the human summary names it: its path folded across the table's lines when long, never cut
    first_column = "".join(line.split("│")[1].strip() for line in first_run.stdout.splitlines()
                           if line.startswith("│") and line.count("│") == 3)
    assert "/xrays/short.dcm" in first_column, first_run.stdout
    status = json.loads(mi_index("--status", "--json", "--index", str(index)).stdout)
    assert any(reason.endswith(LONG_REASON_END) for reason in status["skipped"]), status["skipped"]


def test_a_run_summary_in_json_carries_the_whole_reason(tmp_path):
    data = pngs(tmp_path / "data", 1)
    short_pixel_data_dicom(data / "short.dcm")
    result = mi_index(str(data), "--index", str(tmp_path / "index"), "--model", str(FIXTURE), "--workers", "0",
                      "--json")
    assert result.returncode == 0, result.stderr
    reasons = [row["reason"] for row in json.loads(result.stdout)["skipped_files"]]
    assert len(reasons) == 1 and reasons[0].endswith(LONG_REASON_END), reasons


# ---------------------------------------------------------------- mi-search's table (on a terminal)

def printed_table(hits: list, width: int = 80) -> list[str]:
    import io

    from rich.console import Console

    from retrieval.cli import _print_table

    out = io.StringIO()
    _print_table(hits, Console(file=out, width=width, color_system=None))
    return out.getvalue().splitlines()


LABELS = {f"finding number {i}": 1 / (i + 2) for i in range(12)}


def two_hits() -> list:
    from retrieval.hits import Hit

    studies = ("1.2.840.113619.2.55.3.2831164355.1", "1.2.840.999.2.55.3.2831164355.1")  # the same last 11
    return [Hit(1, 0.4123, 1, "/a/b.dcm", {"modality": "CR", "study_instance_uid": studies[0]}, LABELS),
            Hit(2, -0.0763, 2, "/a/c.dcm", {"modality": "CT", "study_instance_uid": studies[1]}, LABELS)]


def hit_lines(lines: list[str]) -> list[str]:
    found = [line for line in lines if line.lstrip().startswith(("1 ", "2 "))]
    assert len(found) == 2, lines
    return found


def test_the_table_tells_studies_apart():
    lines = printed_table(two_hits())
    start, end = lines[0].index("study"), lines[0].index("labels")
    studies = [line[start:end].strip() for line in hit_lines(lines)]
    assert studies[0] != studies[1] and all(len(study) <= 20 for study in studies), studies


def test_the_table_keeps_negative_scores_whole():
    first, second = hit_lines(printed_table(two_hits()))
    assert " 0.412 " in first and " -0.076 " in second


def test_the_table_keeps_labels_in_their_column_within_80_columns():
    lines = printed_table(two_hits())
    assert all(len(line) <= 80 for line in lines), lines
    column = lines[0].index("labels")
    shown = 0
    for line in lines:
        if "finding number" in line:
            assert line.index("finding number") >= column, line  # never wrapped into column 0
            assert line[:column].strip() == "" or line in hit_lines(lines), line
            shown += line.count("finding number")
    assert shown == 2 * len(LABELS)


# ---------------------------------------------------------------- the summary of a run

def no_wrong_plural(text: str) -> None:
    assert not re.search(r"(?<![\d.,])1 (files|images|PACS instances)\b", text), text


def test_the_summary_is_a_few_plain_sentences(indexed):
    root, index, first_run = indexed
    text = " ".join(first_run.stdout.split())
    assert "8 new files: 6 images indexed, 2 skipped (reasons below)." in text, first_run.stdout
    assert f"The index at {index} holds 6 images" in text
    no_wrong_plural(text)


def test_a_rerun_says_what_it_reused_and_left_alone_with_correct_plurals(tmp_path):
    data = pngs(tmp_path / "data", 2)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    index = str(tmp_path / "index")
    common = ("--index", index, "--model", str(FIXTURE), "--workers", "0")
    assert mi_index(str(data), *common).returncode == 0
    shutil.copy(data / "00.png", data / "copy.png")
    again = mi_index(str(data), *common)
    assert again.returncode == 0, again.stderr
    text = " ".join(again.stdout.split())
    assert "1 new file: 1 file reused its stored vectors." in text, again.stdout
    assert "3 files unchanged since the last run, not read again (1 of them could not be read" in text
    no_wrong_plural(text)
    assert json.loads(mi_index(str(data), *common, "--json").stdout).keys() >= {
        "new", "updated", "unchanged", "removed", "skipped", "still_skipped", "encoded", "reused", "images"}


# ---------------------------------------------------------------- --update with a folder gone

def test_update_updates_the_folders_that_exist_and_names_the_gone_one(tmp_path):
    kept, unplugged = pngs(tmp_path / "kept", 2), pngs(tmp_path / "usb", 1, start=4)
    index = str(tmp_path / "index")
    common = ("--index", index, "--model", str(FIXTURE), "--workers", "0")
    assert mi_index(str(kept), str(unplugged), *common).returncode == 0
    shutil.rmtree(unplugged)
    pngs(kept, 1, start=7)  # something to update
    updated = mi_index("--update", *common, "--json")
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["new"] == 1
    note = [line for line in updated.stderr.splitlines() if line.strip()]
    assert len(note) == 1 and str(unplugged) in note[0] and f"mi-index --remove {unplugged}" in note[0], note
    shutil.rmtree(kept)
    nothing = one_error_line(mi_index("--update", *common))
    assert str(kept) in nothing and str(unplugged) in nothing and "mi-index --remove" in nothing


# ---------------------------------------------------------------- --since 2020

@pytest.mark.parametrize("since, until, found", [
    ("2004", None, {"CT_small.dcm", "MR_small.dcm"}), ("2005", None, "since 2005-01-01"),
    (None, "2004-01", {"CT_small.dcm"}), ("2004-08", "2004", {"MR_small.dcm"}), (None, "2003", "until 2003-12-31")])
def test_dates_may_be_a_year_or_a_month(indexed, since, until, found):
    _, index, _ = indexed
    dates = [*(("--since", since) if since else ()), *(("--until", until) if until else ())]
    result = mi_search("scan", "--index", str(index), "-k", "20", "--json", *dates)
    if isinstance(found, str):  # nothing matches: the message says which day the year begins or ends on
        assert f"no image in the index matches {found}" in one_error_line(result)
        return
    assert result.returncode == 0, result.stderr
    assert {Path(hit["path"]).name for hit in json.loads(result.stdout)} == found


def test_a_month_that_does_not_exist_is_one_line():
    from indexer.filters import SearchFilters

    with pytest.raises(ValueError, match="YYYY-MM-DD, YYYY-MM or YYYY"):
        SearchFilters.make(until="2020-13")
    assert SearchFilters.make(since="2024-02", until="2024-02").until.isoformat() == "2024-02-29"


# ---------------------------------------------------------------- a failed --sample run

def test_a_failed_sample_run_leaves_no_copy_and_a_good_one_keeps_it(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data-home")}  # where the per-user data folder is (platformdirs)
    sample = tmp_path / "data-home" / "medimageinsight-search" / "sample"
    failed = mi_index("--sample", "--index", str(tmp_path / "index"), "--model", str(tmp_path / "no-model"),
                      "--workers", "0", env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert not sample.exists() and not (tmp_path / "data-home").exists()
    ok = mi_index("--sample", "--index", str(tmp_path / "index"), "--model", str(FIXTURE), "--workers", "0",
                  "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["images"] > 0 and len(list(sample.glob("*.dcm"))) >= 6


# ---------------------------------------------------------------- --remove of what was never indexed

def test_removing_what_was_never_indexed_is_one_line_and_removes_nothing(indexed):
    root, index, _ = indexed
    before = json.loads(mi_index("--status", "--json", "--index", str(index)).stdout)
    line = one_error_line(mi_index("--remove", str(root / "more"), "--remove", str(root / "xrays-typo"),
                                   "--index", str(index)))
    assert f"{root / 'xrays-typo'} is not in the index" in line and str(root / "xrays") in line
    assert "mi-index --status" in line
    after = json.loads(mi_index("--status", "--json", "--index", str(index)).stdout)
    assert after["images"] == before["images"] and after["folders"] == before["folders"]
