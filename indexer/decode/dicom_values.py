"""The text of a DICOM element the index stores, or None when it does not fit its VR (PS3.5 6.2).

A malformed file can make an element's value run over the elements after it: a SeriesDescription
whose length says 218 instead of 6 reads the PatientName, PatientID and PatientBirthDate that
follow as its own value. Such a value is refused here, never stored: it is read as the VR the
standard dictionary gives its tag (not whatever VR the file claims), and kept only when it fits
that VR: its length limit, its character repertoire (no control characters, so no element
header of the elements it overran: a tag's group bytes hold a NUL), its format (CS, AS, DA, UI),
and one value (every field stored holds one).
"""
from __future__ import annotations

import re
from datetime import date

# Maximum length in characters (PS3.5 table 6.2-1) of the VRs whose values are stored.
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "PN": 64, "SH": 16,
              "TM": 14, "UI": 64, "DT": 26}
_FORMATS = {
    "CS": re.compile(r"[A-Z0-9 _]+"),
    "AS": re.compile(r"[0-9]{1,3}[DWMY]"),  # "nnnY"; "22Y", a common departure, says nothing else
    "DA": re.compile(r"[0-9]{8}"),
    "UI": re.compile(r"[0-9]+(\.[0-9]+)*"),
    "IS": re.compile(r"[+-]?[0-9]+"),
    "DS": re.compile(r"[0-9+\-.eE]+"),
    "TM": re.compile(r"[0-9]{2,6}(\.[0-9]{1,6})?"),
}
# VRs in the default repertoire only (PS3.5 6.1.2.3): never through the Specific Character Set.
_DEFAULT_REPERTOIRE = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Values an enumerated element may take (PS3.3 C.7.1.1: PatientSex).
ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"})}


def standard_vr(keyword: str) -> str | None:
    """The VR the standard dictionary gives a keyword (the first, where it names several)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return None


def valid_text(vr: str, text: str) -> str | None:
    """`text` without its padding when it fits `vr`, else None."""
    text = text.strip(" \x00")                                 # padding: a space, a NUL for UI
    if not text or _CONTROL.search(text) or "\\" in text:      # a backslash separates values: one is kept
        return None
    if len(text) > MAX_LENGTH.get(vr, 64):
        return None
    pattern = _FORMATS.get(vr)
    if pattern is not None and not pattern.fullmatch(text):
        return None
    if vr == "DA":
        try:
            date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        except ValueError:
            return None
    return text


def element_text(ds, keyword: str) -> str | None:
    """The stored text of `ds`'s element `keyword`, read as its standard VR, or None (absent,
    empty, or not fitting that VR)."""
    vr = standard_vr(keyword)
    if vr is None:
        return None
    try:
        element = ds.get_item(keyword)
    except Exception:                  # a malformed element must not cost the image
        return None
    if element is None:
        return None
    raw = element.value
    if isinstance(raw, (bytes, bytearray)):
        text = _decoded(ds, vr, bytes(raw))
    elif getattr(element, "VR", vr) == vr and isinstance(raw, str):
        text = raw                     # already read by pydicom, as the right VR
    elif getattr(element, "VR", vr) == vr and type(raw).__name__ in ("UID", "PersonName"):
        text = str(raw)
    else:
        return None                    # read as another VR (a number, a sequence), or several values
    if text is None:
        return None
    text = valid_text(vr, text)
    if text is not None and keyword in ENUMERATED and text not in ENUMERATED[keyword]:
        return None
    return text


def _decoded(ds, vr: str, raw: bytes) -> str | None:
    if vr in _DEFAULT_REPERTOIRE:
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    from pydicom.charset import decode_bytes

    try:
        encodings = ds._character_set
        if isinstance(encodings, str):
            encodings = [encodings]
        return decode_bytes(raw, list(encodings), set())
    except Exception:
        return None
