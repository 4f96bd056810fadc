"""`mi mcp`: one index served to agents over the Model Context Protocol (stdio), with the SDK's
`MCPServer`: search by text, by an image's bytes or by an indexed image, an image's stored
fields and thumbnail, zero-shot labels, and the index's summary.

Nothing outside the index can be read: no tool takes a file path (texts are only ever texts, an
image query travels as its bytes and is decoded from them with the indexer's guards, indexed
images are named by their id). Every input is bounded (k, the size of an image, the number and
length of labels, of texts), and a mistake comes back as a one-line tool error, never a traceback.
"""
from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import ToolAnnotations
from pydantic import Field, ValidationError

MAX_K = 100                        # hits per call: an agent's context is the limit, not the index
MAX_IMAGE_BYTES = 16 << 20         # a query image, decoded
MAX_BASE64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4 + 64  # ... as base64, with room for a data: prefix
MAX_TEXT_CHARS = 2000              # a text query (the tokenizer keeps far less)
MAX_LABELS = 32
MAX_LABEL_CHARS = 200
MAX_FILTER_CHARS = 64
MAX_ID = 2**63 - 1                 # SQLite's largest integer

ImageId = Annotated[int, Field(ge=0, le=MAX_ID, description="an image's id in the index (from a hit's `id`)")]
TopK = Annotated[int, Field(ge=1, le=MAX_K, description=f"number of hits, 1 to {MAX_K}")]
Filter = Annotated[str | None, Field(max_length=MAX_FILTER_CHARS)]
Day = Annotated[str | None, Field(max_length=10, description="a date, YYYY-MM-DD")]
Group = Annotated[Literal["study", "patient"] | None,
                  Field(description="one hit per study or per (pseudonymous) patient: its best image")]
MinScore = Annotated[float | None, Field(ge=-1.0, le=1.0, description="drop hits below this cosine similarity")]

_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                             open_world_hint=False)
_Result = TypeVar("_Result")


def create_server(index_dir: str | Path | None = None, *, model: Any = None, device: str | None = None) -> Any:
    """The `MCPServer` of one index. `index_dir`: the index folder (default: MI_INDEX, else the
    per-user folder mi-index uses); `model`, `device`: as `Searcher`'s. The index is opened on the
    first call that needs it (and again after a failure), so a missing or empty index is reported
    by the tools rather than by a server that exits."""
    from indexer.location import default_index_dir

    index_dir = Path(index_dir or default_index_dir()).expanduser().resolve()
    opened: dict[str, Any] = {"searcher": None}
    lock = threading.Lock()
    server = _OneLineErrors(
        "medimageinsight-search",
        version=_version(),
        log_level="WARNING",  # stderr is the client's log: no line per call (a refused call is answered already)
        instructions=f"Search the medical images (X-rays, DICOM) of the index {index_dir} by text, by an image, "
                     "or by an indexed image's id; read an image's stored fields, thumbnail and zero-shot labels. "
                     "Patients appear only as pseudonyms. Scores are cosine similarities; filters apply before "
                     "the top-k cut.")

    def searcher() -> Any:
        from .search import Searcher

        with lock:
            if opened["searcher"] is None:
                opened["searcher"] = Searcher(index_dir, model=model, device=device)
            return opened["searcher"]

    @server.tool(annotations=_READ_ONLY)
    def search_text(query: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, description=(
                        'a text, or texts combined as in mi-search: "pleural effusion - pacemaker", '
                        '"2:pleural effusion + cardiomegaly" (standalone + and - combine, WEIGHT:TEXT weighs)'))],
                    k: TopK = 10, modality: Filter = None, body_part: Filter = None, view: Filter = None,
                    since: Day = None, until: Day = None, min_score: MinScore = None,
                    group: Group = None) -> dict[str, Any]:
        """Search the index by a text (a finding, an anatomy, a device...). Returns the best hits,
        best first: rank, score (cosine similarity), id, path and the stored DICOM fields."""
        def run() -> dict[str, Any]:
            from .query import typed_tokens

            current = searcher()
            # Every term is a text: a term that names a file must never be read as an image.
            terms = typed_tokens(query)
            return _hits(current.search(terms, force="text", k=k, min_score=min_score, group=group,
                                        filters=_filters(modality, body_part, view, since, until)))
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def search_image(image_base64: Annotated[str, Field(min_length=1, max_length=MAX_BASE64_CHARS, description=(
                         f"a PNG, JPEG, TIFF, BMP or DICOM file's bytes, base64 (at most {MAX_IMAGE_BYTES >> 20} MB "
                         "decoded; a data: URL prefix is allowed)"))],
                     k: TopK = 10, modality: Filter = None, body_part: Filter = None, view: Filter = None,
                     since: Day = None, until: Day = None, min_score: MinScore = None,
                     group: Group = None) -> dict[str, Any]:
        """Search the index by an image the caller holds (its file's bytes): the indexed images
        that look most like it, best first."""
        def run() -> dict[str, Any]:
            from .query import combine

            picture = decode_query_image(_base64_bytes(image_base64))  # before loading a model
            current = searcher()
            vector = combine(current.encoder("image").encode_images([picture]), [1.0])
            return _hits(current.search(vector=vector, k=k, min_score=min_score, group=group,
                                        filters=_filters(modality, body_part, view, since, until)))
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def search_like(image_id: ImageId, k: TopK = 10, modality: Filter = None, body_part: Filter = None,
                    view: Filter = None, since: Day = None, until: Day = None, min_score: MinScore = None,
                    group: Group = None) -> dict[str, Any]:
        """More like this: the indexed images most like the indexed image `image_id`, best first,
        the image itself left out (its exact copies too, and with `group` its study or patient)."""
        def run() -> dict[str, Any]:
            current = searcher()
            hits = current.search(vector=current.vector_of(image_id), k=k + 1, min_score=min_score, group=group,
                                  filters=_filters(modality, body_part, view, since, until))
            others = [hit for hit in hits if hit.id != image_id][:k]
            for rank, hit in enumerate(others, start=1):
                hit.rank = rank
            return _hits(others)
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def image_info(image_id: ImageId) -> dict[str, Any]:
        """The stored fields of one indexed image: path, frame, size, modality, body part, view,
        study date, series description, DICOM UIDs, patient sex and age, the patient's pseudonym.
        No patient name, birth date or ID: the index holds none."""
        def run() -> dict[str, Any]:
            from .hits import _jsonable

            return {key: _jsonable(value) for key, value in searcher().image(image_id).items()}
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def image_thumbnail(image_id: ImageId) -> Image:
        """A PNG of one indexed image (DICOM rendered with the indexing windowing), at most 256
        pixels a side."""
        def run() -> Image:
            return Image(data=_thumbnail(searcher(), index_dir, image_id), format="png")
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def classify(image_id: ImageId,
                 labels: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]],
                                   Field(min_length=1, max_length=MAX_LABELS, description=(
                                       'candidate labels, e.g. ["normal", "pneumothorax"]'))],
                 multilabel: Annotated[bool, Field(description=(
                     "score each label on its own (against 'no LABEL') instead of a softmax over them"))] = False
                 ) -> dict[str, Any]:
        """Zero-shot label probabilities for one indexed image: a softmax over the labels (at
        least two), or with `multilabel` one independent probability per label."""
        def run() -> dict[str, Any]:
            probabilities = searcher().classify(image_id, labels, multilabel=multilabel)
            return {"image_id": image_id, "multilabel": multilabel,
                    "labels": {label: round(p, 6) for label, p in probabilities.items()}}
        return _answer(run)

    @server.tool(annotations=_READ_ONLY)
    def index_status() -> dict[str, Any]:
        """What the index holds: whether it can be searched, images and files counted, images per
        modality, files skipped, its model, when it was last indexed."""
        from indexer.errors import MIError, one_line

        try:
            current = searcher()
        except MIError as error:
            return {"ready": False, "index": str(index_dir), "reason": one_line(error)}
        stats = current.stats()
        return {"ready": True, "index": str(index_dir), "images": stats["images"], "files": stats["files"],
                "modalities": stats["modalities"], "skipped_files": sum(stats["skipped"].values()),
                "skipped_by_reason": stats["skipped"], "folders": stats["folders"], "model": current.model_info,
                "generation": stats["generation"], "last_indexed": stats["last_run_at"]}

    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medimageinsight-search")
    except PackageNotFoundError:  # a checkout that is not installed
        return ""


def decode_query_image(data: bytes) -> Any:
    """A query image from its file's bytes, decoded as the indexer decodes files (its size and
    bomb guards, DICOM windowing, a multi-frame file's middle frame); never from a path."""
    from indexer.decode import DecodeError, decode_bytes

    from .errors import QueryError

    try:  # a name without a suffix: the kind is sniffed from the bytes, no file is opened
        decoded = decode_bytes(data, Path("query"), frames="middle")
    except DecodeError as error:
        raise QueryError(f"cannot read the query image: {error}") from None
    if not decoded.frames:
        raise QueryError("cannot read the query image: no image in it")
    return decoded.frames[0][1]


def _base64_bytes(text: str) -> bytes:
    from .errors import QueryError

    text = text.strip()
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("image_base64 is not base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise QueryError(f"the image is over {MAX_IMAGE_BYTES >> 20} MB")
    return data


def _filters(modality: str | None, body_part: str | None, view: str | None, since: str | None,
             until: str | None) -> Any:
    from indexer.filters import SearchFilters

    return SearchFilters.make(modality=modality, body_part=body_part, view=view, since=since, until=until)


def _hits(hits: list) -> dict[str, Any]:
    return {"count": len(hits), "hits": [hit.to_dict() for hit in hits]}


def _thumbnail(searcher: Any, index_dir: Path, image_id: int) -> bytes:
    from .server import thumbnail_png  # imported here: the server module may become a package

    return thumbnail_png(searcher, index_dir, image_id)


def _answer(run: Callable[[], _Result]) -> _Result:
    """`run()`, its deliberate errors (the product's, an undecodable image) as one-line tool
    errors; anything else is a crash the SDK reports without its text."""
    from indexer.decode import DecodeError
    from indexer.errors import MIError, one_line

    try:
        return run()
    except (MIError, DecodeError) as error:
        raise ToolError(one_line(error, limit=1000)) from None


def _validation_line(error: ValidationError) -> str:
    """The first of pydantic's complaints on one line, without the value given (it may be a
    16 MB image, or anything else the caller sent)."""
    first = error.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}" if where else f"{first.get('msg', 'invalid')}{more}"


class _OneLineErrors(MCPServer):
    """`MCPServer` whose argument errors are one line: pydantic's own message spans lines and
    quotes the rejected input."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as error:
            if isinstance(error.__cause__, ValidationError):
                raise ToolError(f"Error executing tool {name}: {_validation_line(error.__cause__)}") from None
            raise
