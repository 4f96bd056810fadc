"""Export a selection of images (search hits, a duplicate cluster, a leakage or outlier report,
a list of ids) as CSV / JSON rows, as WADO-RS URLs, or as a DICOM JSON manifest in the form
OHIF's `dicomjson` data source reads: {"studies": [{StudyInstanceUID, ..., "series": [{
SeriesInstanceUID, Modality, "instances": [{"metadata": {...}, "url": "dicomweb:<URL>"}]}]}]}.

Patient fields in a manifest are the index's pseudonym (PatientID) and nothing else; the
per-instance metadata read from a local file's header is a fixed list of image attributes."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from indexer.errors import MIError
from indexer.pacs_keys import instance_uids, is_pacs_url, wado_url


class ExportError(MIError, ValueError):
    """A selection or format that cannot be exported (an unknown report, no URL for a file)."""


ROW_FIELDS = ("id", "path", "frame", "score", "group", "sop_instance_uid", "study_instance_uid",
              "series_instance_uid", "modality", "body_part", "view_position", "study_date", "patient_hash",
              "wado_rs_url")
# Header attributes copied into a manifest's instance metadata: what a viewer needs to draw a
# frame, never a patient or operator field.
IMAGE_ATTRIBUTES = ("Columns", "Rows", "InstanceNumber", "SOPClassUID", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PixelSpacing",
                    "ImageOrientationPatient", "ImagePositionPatient", "FrameOfReferenceUID", "ImageType",
                    "Modality", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope",
                    "NumberOfFrames", "SliceThickness", "SeriesNumber", "PlanarConfiguration")


def selection_from_report(report: dict[str, Any], cluster: int | None = None) -> list[tuple[int, float | None, str]]:
    """(id, score, group) of the images a report names: a duplicate report's clusters (or one
    of them), a leakage report's offending images, an outlier report's images."""
    if "clusters" in report:
        clusters = report["clusters"]
        if cluster is not None:
            clusters = [c for c in clusters if c.get("cluster") == cluster]
            if not clusters:
                raise ExportError(f"the report has no cluster {cluster} (it has {len(report['clusters'])})")
        return [(m["id"], m.get("similarity"), f"cluster {c['cluster']}") for c in clusters for m in c["members"]]
    if cluster is not None:
        raise ExportError("--cluster takes a duplicate report (mi duplicates --json)")
    if "pairs" in report:
        found: dict[int, tuple[int, float | None, str]] = {}
        for pair in report["pairs"]:
            where = "/".join(pair["splits"])
            for item in pair["same_images"]["items"]:
                found.setdefault(item["id"], (item["id"], None, f"{where} same image"))
            for check in ("patients", "studies"):
                for item in pair[check]["items"]:
                    for ids in item["images"].values():
                        for i in ids:
                            found.setdefault(i, (i, None, f"{where} {check}"))
            for check in ("exact_duplicates", "near_duplicates"):
                for item in pair.get(check, {"items": []})["items"]:
                    for i in item["ids"]:
                        found.setdefault(i, (i, item.get("similarity"), f"{where} {check.replace('_', ' ')}"))
        return list(found.values())
    if "outliers" in report:
        return [(o["id"], o.get("score"), o.get("reason")) for o in report["outliers"]]
    raise ExportError("not a report of mi duplicates, mi leakage or mi outliers (--json)")


def rows_of(reader, selection: list[tuple[int, float | None, str | None]]) -> list[dict[str, Any]]:
    """Export rows (ROW_FIELDS) of the selected images, in order; ids not in the index are an error."""
    stored = reader.rows([i for i, _, _ in selection])
    missing = [i for i, _, _ in selection if i not in stored]
    if missing:
        raise ExportError(f"no images with ids {missing[:5]} in the index (it changed since the report?)")
    out = []
    for row_id, score, group in selection:
        row = stored[row_id]
        out.append({"id": row_id, **{k: row.get(k) for k in ROW_FIELDS[1:] if k in row},
                    "score": None if score is None else round(float(score), 6), "group": group,
                    "wado_rs_url": wado_url(row["path"])})
    return [{k: r.get(k) for k in ROW_FIELDS} for r in out]


def wado_urls(rows: list[dict[str, Any]]) -> list[str]:
    """The WADO-RS URLs of the rows indexed from a DICOMweb PACS; an error names the others."""
    local = [r["path"] for r in rows if not r["wado_rs_url"]]
    if local:
        raise ExportError(f"{len(local)} of the images are not from a DICOMweb PACS (e.g. {local[0]}): "
                          f"WADO-RS URLs exist only for those; export them as csv, json or ohif")
    return list(dict.fromkeys(r["wado_rs_url"] for r in rows))


def ohif_manifest(rows: list[dict[str, Any]], url_prefix: str | None = None, root: str | None = None
                  ) -> dict[str, Any]:
    """The DICOM JSON manifest of the rows (one instance per file, frames folded). PACS instances
    point at their WADO-RS URL; local files at `url_prefix` + their path relative to `root`
    (a web server must serve them: OHIF fetches over HTTP)."""
    studies: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    local = [r["path"] for r in rows if not is_pacs_url(r["path"])]
    if local and not url_prefix:
        raise ExportError("local files need --url-prefix (the web address that serves --root, e.g. "
                          "http://localhost:8000/): OHIF reads instances over HTTP")
    if local:
        root = os.path.realpath(root) if root else os.path.commonpath([os.path.dirname(p) for p in local])
    for row in rows:
        if row["path"] in seen:
            continue
        seen.add(row["path"])
        uids = instance_uids(row["path"]) or (row["study_instance_uid"], row["series_instance_uid"],
                                             row["sop_instance_uid"])
        study_uid, series_uid, sop_uid = (u or f"unknown-{row['id']}" for u in uids)
        if is_pacs_url(row["path"]):
            if not row["wado_rs_url"]:
                raise ExportError(f"{row['path']} is a DIMSE archive's instance: no URL a viewer can fetch")
            url, metadata = row["wado_rs_url"], {}
        else:
            relative = os.path.relpath(row["path"], root)
            if relative.startswith(".."):
                raise ExportError(f"{row['path']} is not under --root {root}")
            url = url_prefix.rstrip("/") + "/" + "/".join(Path(relative).parts)
            metadata = _header_attributes(row["path"])
        metadata.update({"SOPInstanceUID": sop_uid, "SeriesInstanceUID": series_uid, "StudyInstanceUID": study_uid})
        if row.get("modality"):
            metadata.setdefault("Modality", row["modality"])
        study = studies.setdefault(study_uid, {
            "StudyInstanceUID": study_uid, "StudyDate": (row.get("study_date") or "").replace("-", ""),
            "StudyTime": "", "PatientName": "", "PatientID": row.get("patient_hash") or "", "AccessionNumber": "",
            "PatientAge": "", "PatientSex": "", "series": {}})
        series = study["series"].setdefault(series_uid, {"SeriesInstanceUID": series_uid,
                                                        "Modality": row.get("modality") or "", "instances": []})
        if metadata.get("SeriesNumber") is not None:
            series.setdefault("SeriesNumber", metadata["SeriesNumber"])
        series["instances"].append({"metadata": metadata, "url": "dicomweb:" + url})
    out = []
    for study in studies.values():
        series_list = list(study.pop("series").values())
        modalities = sorted({s["Modality"] for s in series_list if s["Modality"]})
        out.append({**study, "series": series_list, "NumInstances": sum(len(s["instances"]) for s in series_list),
                    "Modalities": "\\".join(modalities)})
    return {"studies": out}


def _header_attributes(path: str) -> dict[str, Any]:
    """IMAGE_ATTRIBUTES of a local DICOM file as JSON values (read without pixels); {} otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IMAGE_ATTRIBUTES))
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError):
        return {}
    found = {}
    for name in IMAGE_ATTRIBUTES:
        value = ds.get(name)
        if value is None or value == "":
            continue
        found[name] = _jsonable(value)
    return found


def _jsonable(value: Any) -> Any:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat, IS

    if isinstance(value, (list, tuple, MultiValue)):
        return [_jsonable(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    return str(value)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV, a header of ROW_FIELDS first (None: an empty cell)."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerows([list(ROW_FIELDS)] + [["" if r[f] is None else r[f] for f in ROW_FIELDS]
                                                       for r in rows])
    return buffer.getvalue()


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)
