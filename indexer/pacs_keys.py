"""The key of an instance indexed from a PACS, and what it tells: its WADO-RS URL and its UIDs.
Imports nothing, so that every front end (a thin mi-search client too) can read a hit's key.

Over DICOMweb a key is the instance's WADO-RS URL behind a `dicomweb+` scheme, never with
credentials: `dicomweb+https://host/dicom-web/studies/S/series/SE/instances/I`. Over DIMSE it
names the archive by its AE title and address the same way:
`dimse://ARCHIVE_AET@host:104/studies/S/series/SE/instances/I`.
"""
from __future__ import annotations

DICOMWEB_SCHEME = "dicomweb+"
DIMSE_SCHEME = "dimse://"


def is_dicomweb_url(text: str) -> bool:
    return text.startswith((DICOMWEB_SCHEME + "http://", DICOMWEB_SCHEME + "https://"))


def is_dimse_url(text: str) -> bool:
    return text.startswith(DIMSE_SCHEME)


def is_pacs_url(text: str) -> bool:
    """A PACS service or instance (DICOMweb or DIMSE), not a path."""
    return is_dicomweb_url(text) or is_dimse_url(text)


def instance_key(service: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """The key of an instance of `service` (dicomweb+http(s)://host/prefix, dimse://AET@host:port)."""
    return f"{service}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def service_url(key: str) -> str:
    """The service an instance key names (its part before `/studies/`); a service's own URL as it is."""
    return key[:key.index("/studies/")] if "/studies/" in key else key


def wado_url(key: str) -> str | None:
    """The WADO-RS URL of an indexed PACS instance (None for a file)."""
    return key[len(DICOMWEB_SCHEME):] if is_dicomweb_url(key) else None


def instance_uids(key: str) -> tuple[str, str, str] | None:
    """(study, series, SOP instance) UIDs named by a PACS key, None for a file."""
    if not is_pacs_url(key):
        return None
    parts = key.rstrip("/").split("/")
    if len(parts) < 6 or (parts[-6], parts[-4], parts[-2]) != ("studies", "series", "instances"):
        return None
    return parts[-5], parts[-3], parts[-1]
