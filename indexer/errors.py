"""The typed errors of the index, in a module that imports nothing: `mi-search` and the
retrieval API catch them without loading SQLAlchemy. Each message says how to fix the problem;
the command lines print it as one line."""
from __future__ import annotations


class MIError(Exception):
    """Base of every error this product raises on purpose (the indexer's, the retrieval API's):
    its message says what went wrong and how to fix it, and the command lines print it as one
    line (`one_line`)."""


REASON_LIMIT = 1000  # characters of a skip reason kept: every real one whole, a hostile one bounded


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An error as one line of text (whitespace folded), its type's name where it says nothing;
    where `limit` is given and exceeded, cut at a word boundary within it, with "..."."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None else shortened(text, limit)


def shortened(text: str, limit: int) -> str:
    """`text` within `limit` characters: whole when it fits, else cut after its last whole word
    that fits (mid-word only for a word longer than half the room), with "..."."""
    if len(text) <= limit:
        return text
    room = max(limit - 3, 0)
    cut = text[:room]
    space = cut.rfind(" ", 0, room + 1) if text[room:room + 1] != " " else room
    return (cut[:space] if space >= room // 2 else cut).rstrip(" ,;:-") + "..."


class StoreError(MIError):
    """The index cannot be used as asked. The message says how to fix it."""


class IndexNotFoundError(StoreError):
    pass


class IndexFormatError(StoreError):
    pass


class ModelMismatchError(StoreError):
    """A model other than the one the index was built with (indexing or searching)."""

    @classmethod
    def between(cls, folder: object, index_model: dict, source: object, fingerprint: str, dim: int
                ) -> ModelMismatchError:
        return cls(f"the index at {folder} was built with another model ({index_model.get('source')}, "
                   f"fingerprint {str(index_model.get('fingerprint'))[:12]}, {index_model.get('dim')}-d), not "
                   f"{source} (fingerprint {str(fingerprint)[:12]}, {dim}-d): use --model "
                   f"{index_model.get('source')}, or build a new index of the same folders with this model: "
                   f"`mi-index --folders-of {folder} --index NEW_INDEX --model {source}`")


class IndexBusyError(StoreError):
    pass


class IndexReadOnlyError(StoreError):
    """Writing was refused: a read-only folder, file system or database file."""


class StorageFullError(StoreError):
    """The disk (or quota) holding the index is full."""


class IndexDamagedError(IndexFormatError):
    """The database file itself is damaged (a corrupt page, not a database at all)."""


class PathNotFoundError(MIError):
    """A path given to index does not exist."""


class NoImagesError(MIError):
    """Nothing under the given paths is an image or DICOM file."""


class ClusterError(MIError):
    """The cluster named by --ray cannot be reached or used (Ray missing, a failed run)."""


class FilterError(MIError, ValueError):
    """A search filter that cannot be applied (a malformed date)."""


class SourceError(MIError):
    """The source itself failed, not one item (a PACS that stopped answering or refused the
    credentials): the run stops; what was committed stays and the next run resumes."""
