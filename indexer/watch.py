"""Folders kept indexed while files arrive, change, move and go (`mi-index DIR --watch`): after
the first pass, each burst of file-system events (watchfiles, Rust notify; debounced) waits for
the files it names to be written whole, then runs the normal incremental indexer over the
folders once more.

The pass after a burst is the same mark-and-sweep run as `mi-index DIR`: unchanged files are
only stat()ed, a renamed file reuses its stored vectors, a deleted one is removed, and a file
read half-written and skipped is retried once it changes. A file counts as written when its
size and mtime are the same in two polls in a row. Crash safety is the pipeline's: a kill
loses at most the batch in flight. `stop` (a threading.Event) ends the watch between batches.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MIError, NoImagesError

log = logging.getLogger(__name__)

DEBOUNCE_MS = 1000        # events are grouped for up to this long before a pass
STARTED_MS = 200          # the watcher's first (empty) answer comes this soon: then it runs
STEP_MS = 100             # a burst ends once this long passes without an event
SETTLE_POLL_SECONDS = 0.5  # between the two polls that show a file written whole
SETTLE_MAX_SECONDS = 300   # a file written for longer is indexed as it is (and again when it changes)


class WatchNotInstalledError(MIError):
    """--watch needs watchfiles, an optional dependency."""


@dataclass
class Pass:
    """One run over the watched folders: `summary` (the indexer's) or `error` (one line: the
    index busy, no images yet, a full disk); `changed`, the paths the events named (0 for the
    first pass)."""

    changed: int
    summary: dict[str, Any] | None = None
    error: str | None = None
    paths: list[str] = field(default_factory=list)


def written_whole(paths: Iterable[str], stop: threading.Event, poll: float = SETTLE_POLL_SECONDS,
                  max_wait: float = SETTLE_MAX_SECONDS) -> None:
    """Return once each of `paths` that exists has the same size and mtime in two polls in a row
    (a copy or download still in progress changes them), once `max_wait` seconds have passed, or
    once `stop` is set."""
    paths = list(paths)
    deadline = time.monotonic() + max_wait
    last = _stats(paths)
    while not stop.wait(poll):
        now = _stats(paths)
        if now == last or time.monotonic() >= deadline:
            return
        last = now


def _stats(paths: Sequence[str]) -> dict[str, tuple[int, int] | None]:
    stats: dict[str, tuple[int, int] | None] = {}
    for path in paths:
        try:
            st = os.stat(path)
            stats[path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[path] = None  # gone (deleted, renamed away): nothing to wait for
    return stats


def watched_change(index_dir: Path) -> Callable[[Any, str], bool]:
    """watchfiles' filter: a change counts unless it is in the index's own folder (each pass writes
    there: watching it would never end) or in a hidden file or folder (left out of the index, and
    where copiers keep their half-written temporary files)."""
    index = str(index_dir.resolve()).rstrip(os.sep) + os.sep

    def counts(_change: Any, path: str) -> bool:
        real = os.path.realpath(path)
        return not (real + os.sep).startswith(index) and not Path(path).name.startswith(".")
    return counts


def watch_paths(paths: Sequence[str | os.PathLike], index_dir: str | os.PathLike, *, model: Any = None,
                options: Any = None, stop: threading.Event | None = None,
                on_pass: Callable[[Pass], None] = lambda done: None, debounce_ms: int = DEBOUNCE_MS,
                settle_poll: float = SETTLE_POLL_SECONDS) -> None:
    """Index `paths` into `index_dir` (as `indexer.index_paths`), then again after each burst of
    changes under them, until `stop` is set. `on_pass` is called after each pass (the first
    included) with its `Pass`. The model is loaded once (for the first pass that encodes), not
    per pass. Typed errors of one pass (another mi-index holds the index, a full disk, a folder
    with no images yet) are reported in its Pass and the watch goes on."""
    try:
        import watchfiles
    except ImportError:
        raise WatchNotInstalledError("--watch needs watchfiles: pip install 'medimageinsight-search[watch]'") from None
    from . import index_paths
    from .options import IndexOptions
    from .sources import FolderSource

    stop = stop or threading.Event()
    options = options or IndexOptions()
    folder = Path(index_dir).expanduser()
    roots = [Path(p).expanduser() for p in paths]
    FolderSource(roots)  # a mistyped folder: PathNotFoundError now, before anything is watched
    encoder = _Encoder(model, folder, options)

    def one_pass(changed: list[str]) -> None:
        done = Pass(len(changed), paths=changed)
        try:
            done.summary = index_paths(roots, folder, model=encoder.get(), options=options)
        except NoImagesError as error:
            done.error = str(error)
        except MIError as error:
            from .errors import one_line
            done.error = one_line(error)
        on_pass(done)

    # The watcher starts before the first pass (its first answer, a timeout, says it runs): a file
    # that arrives while the first pass walks is then seen by one of them, never by neither.
    bursts = watchfiles.watch(*roots, watch_filter=watched_change(folder), debounce=debounce_ms, step=STEP_MS,
                              stop_event=stop, raise_interrupt=False, yield_on_timeout=True, rust_timeout=STARTED_MS)
    early = next(bursts, set())
    one_pass([])
    for changes in itertools.chain([early], bursts):
        if stop.is_set():
            break
        if not changes:
            continue  # a timeout: nothing happened
        changed = sorted({path for _, path in changes})
        log.debug("changes: %s", changed)
        written_whole(changed, stop, poll=settle_poll)
        if stop.is_set():
            break  # the next run (or watch) indexes what this burst brought
        one_pass(changed)


class _Encoder:
    """The image tower, loaded once: the given encoder, or (on a run encoding here) the one the
    index names, loaded when the index has a model; None means each pass loads it as it would."""

    def __init__(self, model: Any, folder: Path, options: Any):
        self.model, self.folder, self.options = model, folder, options

    def get(self) -> Any:
        from .run.encode import is_loaded
        if is_loaded(self.model) or self.options.ray:
            return self.model
        from .store import DB_NAME, IndexStore
        if not (self.folder / DB_NAME).exists():
            return self.model
        from .run.encode import load_image_tower
        with IndexStore.open(self.folder, readonly=True) as store:
            if store.model_info is None:
                return self.model
            self.model = load_image_tower(self.model, store, self.options)
        return self.model
