"""Files in, index out: `mi-index` and its Python API.

    import indexer
    summary = indexer.index_paths(["./xrays"], "./my-index", model="/data/MedImageInsights")
    summary["new"], summary["skipped_files"]
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NoImagesError, PathNotFoundError, SourceError, StoreError  # noqa: F401
from .location import default_index_dir
from .options import IndexOptions

if TYPE_CHECKING:
    from .run.pipeline import Progress


def index_paths(paths: Sequence[str | os.PathLike], index_dir: str | os.PathLike | None = None, *,
                model: Any = None, options: IndexOptions | None = None,
                progress: Progress | None = None, **option_values: Any) -> dict[str, Any]:
    """Index (or update) `paths` into the index at `index_dir` (default: MI_INDEX, else the
    per-user folder). `model`: a loaded encoder, a model folder or Hugging Face id, or None
    (MI_MODEL, else the index's model, else the default). `options`: an IndexOptions, or its
    fields as keywords (batch_size, workers, device, dtype, max_megapixels, frames). Returns
    the run's summary: integer counts new / updated / unchanged / removed / skipped / encoded /
    reused / images, the skipped files with their reasons, and timings. `progress`: any callable,
    called as progress(items done, items to do, images encoded) while the run goes on."""
    from .sources import FolderSource

    options = options or IndexOptions(**option_values)
    roots = [Path(p).expanduser() for p in paths]
    folder = Path(index_dir or default_index_dir()).expanduser()
    # Made before the index folder is: a mistyped path must leave nothing behind.
    source = FolderSource(roots, skip=folder.resolve())
    return index_source(source, folder, roots=[os.path.realpath(root) for root in roots], model=model,
                        options=options, progress=progress)


def index_dicomweb(url: str, index_dir: str | os.PathLike | None = None, *, modalities: Sequence[str] = (),
                   study_date: str | None = None, body_part: str | None = None, user: str | None = None,
                   password: str | None = None, token: str | None = None, connections: int = 4,
                   max_listed: int | None = None, allow_empty_listing: bool = False, model: Any = None,
                   options: IndexOptions | None = None,
                   progress: Progress | None = None, **option_values: Any) -> dict[str, Any]:
    """Index (or update) the instances a DICOMweb server lists, e.g.
    `index_dicomweb("dicomweb+https://pacs/dicom-web", "./idx", modalities=["CR", "DX"])`.
    Credentials: the arguments, else MI_DICOMWEB_USER / MI_DICOMWEB_PASSWORD / MI_DICOMWEB_TOKEN;
    never stored. `max_listed`: records a listing may hold (default `indexer.sources.guards.MAX_LISTED`);
    `allow_empty_listing`: an empty listing removes what the index holds of this query (refused
    otherwise). Returns the summary, as `index_paths` does."""
    from .sources.dicomweb import Credentials, DicomwebSource
    from .sources.guards import MAX_LISTED
    from .sources.pacs import QueryFilters

    source = DicomwebSource(url, QueryFilters(tuple(m.upper() for m in modalities), study_date, body_part),
                            Credentials.resolve(user, password, token), connections=connections,
                            max_listed=max_listed or MAX_LISTED, allow_empty_listing=allow_empty_listing)
    return index_source(source, index_dir, roots=[source.url], model=model,
                        options=options or IndexOptions(**option_values), progress=progress)


def index_dimse(url: str, index_dir: str | os.PathLike | None = None, *, modalities: Sequence[str] = (),
                study_date: str | None = None, body_part: str | None = None, calling_aet: str | None = None,
                connections: int = 4, max_listed: int | None = None, allow_empty_listing: bool = False,
                model: Any = None, options: IndexOptions | None = None,
                progress: Progress | None = None, **option_values: Any) -> dict[str, Any]:
    """Index (or update) the instances a DIMSE archive lists (C-FIND) and sends (C-GET), e.g.
    `index_dimse("dimse://ORTHANC@pacs:4242", "./idx", calling_aet="MI-INDEX")`. The archive
    must allow C-FIND and C-GET from `calling_aet`. `max_listed`, `allow_empty_listing`: as for
    `index_dicomweb`. Returns the summary, as `index_paths` does."""
    from .sources.dimse import DEFAULT_CALLING_AET, DimseSource
    from .sources.guards import MAX_LISTED
    from .sources.pacs import QueryFilters

    source = DimseSource(url, QueryFilters(tuple(m.upper() for m in modalities), study_date, body_part),
                         calling_aet=calling_aet or DEFAULT_CALLING_AET, connections=connections,
                         max_listed=max_listed or MAX_LISTED, allow_empty_listing=allow_empty_listing)
    return index_source(source, index_dir, roots=[source.url], model=model,
                        options=options or IndexOptions(**option_values), progress=progress)


def index_source(source: Any, index_dir: str | os.PathLike | None = None, *, roots: Sequence[str] = (),
                 model: Any = None, options: IndexOptions | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Index (or update) what `source` (an `indexer.sources.Source`) lists; `roots` are
    recorded for `mi-index --update`. A failed first run leaves no index behind."""
    from .run import Indexer
    from .store import DB_NAME, IndexStore

    options = options or IndexOptions()
    folder = Path(index_dir or default_index_dir()).expanduser()
    new_index = not (folder / DB_NAME).exists()
    made_folders = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        with IndexStore.open(folder, create=True) as store:
            store.lock()
            run = Indexer(store, model=model, options=options, progress=progress or None)
            summary = run.run(source)
            if summary.images == 0 and not summary.skipped_files and summary.unchanged == summary.removed == 0:
                what = (": mi-index reads PNG, JPEG, TIFF, BMP and DICOM files (.dcm, or any name with a DICOM "
                        "preamble)") if hasattr(source, "roots") else " (none listed, or none matching the filters)"
                raise NoImagesError(f"no images found in {source.name}{what}")
            store.record_run(roots, summary.seconds.get("total", 0.0))
            return summary.as_dict()
    except BaseException:
        if new_index:
            _remove_empty_index(folder, made_folders)
        raise


def _remove_empty_index(folder: Path, made_folders: list[Path]) -> None:
    """Undo what a failed first run made: its index (when it holds no image) and the folders
    it created for it. Never touches anything else."""
    from .store import IndexStore

    try:
        with IndexStore.open(folder, readonly=True) as store:
            if store.count():
                return  # committed work stays: the next run completes it
    except Exception:
        pass
    from .store.vector_file import FILE_NAME as VECTOR_FILE

    ours = ("index.sqlite", "index.lock", "vectors.", VECTOR_FILE)
    if folder.is_dir() and all(p.name.startswith(ours) for p in folder.iterdir()):
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        for made in made_folders:  # innermost first
            try:
                made.rmdir()
            except OSError:
                break


__all__ = ["index_paths", "index_dicomweb", "index_dimse", "index_source", "default_index_dir", "IndexOptions"]
