"""Query images sent to the server: size-limited, written into a private temporary folder under names of our
own (never a path from a request), and read back by the decoder as query terms; and the errors about them
said in the client's words (its file's name, its filter value), never naming a path of the server's."""
from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request, UploadFile

from indexer.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES

from ..query import QueryTerm

MAX_UPLOAD_BYTES = 64 << 20  # one upload, or all the image terms of one query together


def sent_names(request: Request) -> dict[str, str]:
    """{server's text: the client's}, for `as_sent` to say this request's errors in the client's words."""
    if not hasattr(request.state, "sent_names"):
        request.state.sent_names = {}
    return request.state.sent_names


def as_sent(request: Request, message: str) -> str:
    """An error message for the client: the upload paths in it replaced by the uploads' names, a folder filter
    (`under`, resolved and ~-expanded on the server) by the value the client gave."""
    names = dict(getattr(request.state, "sent_names", {}))
    given = request.query_params.get("under") or getattr(request.state, "under_given", None)
    if given and "\x00" not in given:
        names.setdefault(os.path.realpath(Path(given).expanduser()), given)
    for server_text in sorted(names, key=len, reverse=True):  # a folder after the files in it
        message = message.replace(server_text, names[server_text])
    return message


async def save_upload(image: UploadFile, folder: Path, names: dict[str, str] | None = None) -> Path:
    """An uploaded image file written into `folder` (its path -> its name in `names`); 413 when it is over
    MAX_UPLOAD_BYTES."""
    data = await image.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"the upload is over {MAX_UPLOAD_BYTES >> 20} MB")
    path = folder / f"query{_suffix(image.filename)}"
    path.write_bytes(data)
    if names is not None:
        names[str(path)] = repr(image.filename or "the upload")
        names[str(folder)] = "the upload's folder"
    return path


def query_terms(terms: Sequence[Any], folder: Path, names: dict[str, str] | None = None) -> list[QueryTerm]:
    """The API's terms (models.TermIn) -> query terms, each image's bytes written into `folder` (its path -> its
    name in `names`); 413 when the images together are over MAX_UPLOAD_BYTES, 422 for a term without its text
    or data."""
    out, room = [], MAX_UPLOAD_BYTES
    for number, term in enumerate(terms):
        if term.kind == "text":
            if not (term.text or "").strip():
                raise HTTPException(422, f"term {number + 1}: a text term needs its text")
            out.append(QueryTerm("text", term.text, term.weight))
            continue
        data = _base64(term.data, number)
        room -= len(data)
        if room < 0:
            raise HTTPException(413, f"the query images are over {MAX_UPLOAD_BYTES >> 20} MB")
        path = folder / f"term{number}{_suffix(term.name)}"
        path.write_bytes(data)
        if names is not None:
            names[str(path)] = repr(term.name or f"image term {number + 1}")
            names[str(folder)] = "the upload's folder"
        out.append(QueryTerm("image", str(path), term.weight))
    return out


def _suffix(name: str | None) -> str:
    """The suffix of an uploaded file's name when it is one the decoder knows, else none (sniffed)."""
    suffix = Path(name or "").suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES | DICOM_SUFFIXES else ""


def _base64(data: str | None, number: int) -> bytes:
    if not data:
        raise HTTPException(422, f"term {number + 1}: an image term needs its data")
    if len(data) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise HTTPException(413, f"the query images are over {MAX_UPLOAD_BYTES >> 20} MB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"term {number + 1}: the image data is not base64") from None
