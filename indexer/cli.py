"""`mi-index`: index folders of X-rays and DICOM files, incrementally and crash-safely."""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import shortened
from .options import COMPILE_CHOICES, FRAMES_CHOICES, IndexOptions
from .terminal import (ProgressBar, collected, console_script, device_option, index_option, json_option,
                       model_option, one_line_errors, visible)

EPILOG = """\b
Examples:
  mi-index --sample                  a dozen real DICOM test images
  mi-index ./xrays                   index a folder (again: only what changed)
  mi-index --update                  update every folder the index holds
  mi-index --status                  what the index holds
  mi-index --remove ./xrays/old      take a folder out of the index
  mi-index ./xrays ./more/case1.dcm  several folders and files, one index
  mi-index ./xrays --json            the summary as one JSON object
  mi-index ./incoming --watch        keep indexing what arrives, until Ctrl-C
  mi-index --viewer-url 'http://ohif/viewer?StudyInstanceUIDs={study}'
                                     PACS hits link to a viewer
  mi-index /archive --index /data/idx --device cuda --batch-size 128
  mi-index --folders-of OLD --index NEW --model SRC
                                     rebuild OLD's folders with another model
  mi-index /shared/archive --ray     decode and encode on a Ray cluster
  mi-index dicomweb+https://pacs/dicom-web --modality CR,DX
                                     from a PACS over DICOMweb (login:
                                     MI_DICOMWEB_USER/_PASSWORD or _TOKEN)
  mi-index dimse://PACS_AET@pacs:104 --calling-aet MI-INDEX
                                     from an older PACS over DIMSE

\b
Files: PNG, JPEG, TIFF, BMP (8/16-bit grey, RGB) and DICOM (by extension or
its DICM preamble; uncompressed, JPEG baseline/lossless, JPEG-LS, JPEG 2000,
RLE). Hidden files and folders are left out. A file that cannot be read is
skipped with its reason and retried once it changes. Unchanged files (same
size and mtime) are not opened again; renamed or copied files reuse their
stored vectors. Killing mi-index loses at most the batch in flight.
"""


STATUS_REASON_CHARS = 64  # a skip reason in the --status table: its row stays within 80 columns
SKIPPED_SHOWN = 5  # paths listed in the human summary; the counts by reason cover the rest


def _user_index_dir() -> str:
    import platformdirs
    return str(Path(platformdirs.user_data_dir("medimageinsight-search")) / "index")


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PacsOptions:
    """How to read a PACS source (a dicomweb+http(s):// or dimse:// URL): what to index of it, and how to log in."""

    modality: str | None = None
    study_date: str | None = None
    body_part: str | None = None
    user: str | None = None
    password: str | None = None
    connections: int = 4
    max_listed: int | None = None
    allow_empty_listing: bool = False
    calling_aet: str | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.modality or self.study_date or self.body_part)

    def keywords(self) -> dict:
        """index_dicomweb's and index_dimse's keywords these options give."""
        modalities = tuple(m.strip() for m in (self.modality or "").split(",") if m.strip())
        return dict(modalities=modalities, study_date=self.study_date, body_part=self.body_part,
                    connections=self.connections, max_listed=self.max_listed,
                    allow_empty_listing=self.allow_empty_listing)


def _index_options(use_ray: bool, ray_address: str | None, compile_choice: str, **values) -> IndexOptions:
    return IndexOptions(ray=(ray_address or "local") if use_ray or ray_address else None, compile=compile_choice,
                        **values)


index_options = collected(
    "options", _index_options,
    click.option("--batch-size", type=click.IntRange(min=1),
                 help="Images per model call, at most 256. [default: 64 on CUDA, 2 on CPU]"),
    click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (0: in this process). "
                                                               "[default: cores - 1, at most 8]"),
    device_option,
    click.option("--dtype", type=click.Choice(DTYPE_CHOICES),
                 help="[default: float32 on CPU (exact), bfloat16 on CUDA; bfloat16 is 2.5x faster on CPUs with AMX]"),
    click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
                 help="Skip larger images (decompression bombs)."),
    click.option("--frames", type=click.Choice(FRAMES_CHOICES), default="middle", show_default=True,
                 help="Multi-frame files: the middle frame, or every frame."),
    click.option("--ray", "use_ray", is_flag=True,
                 help="Decode and encode on a Ray cluster (pip install '.[ray]'): the one at RAY_ADDRESS, else a "
                      "new one on this machine. The index stays here."),
    click.option("--ray-address", metavar="ADDRESS", help="With --ray: the cluster, e.g. ray://head:10001."),
    click.option("--ray-actors", type=click.IntRange(min=1), metavar="N",
                 help="With --ray: encoding actors. [default: one per GPU, else 1]"),
    click.option("--compile", "compile_choice", type=click.Choice(COMPILE_CHOICES), default="auto",
                 show_default=True,
                 help="Encode through torch.compile; auto: on CUDA for runs of 50,000 images or more."),
    click.option("--fast-j2k", is_flag=True,
                 help="Decode JPEG 2000 DICOM images of at least twice the model's input at a reduced resolution "
                      "level: 2-4x faster decoding, embeddings not bit-exact (see README)."),
    click.option("--faiss-memory", type=click.FloatRange(min=0), metavar="GB",
                 help="Keep the search index within GB of memory (the first of flat, IVF fp16, IVF-PQ that "
                      "fits); kept in the index; 0 goes back to the default. [default: 4]"),
)
pacs_options = collected(
    "pacs", PacsOptions,
    click.option("--modality", metavar="LIST", help="PACS: the modalities to index, e.g. CR,DX (a QIDO-RS filter, "
                                                    "applied by the server)."),
    click.option("--study-date", metavar="RANGE",
                 help="PACS: study dates, e.g. 20200101-20201231, 20200101- or 20200101."),
    click.option("--body-part", metavar="PART", help="PACS: the BodyPartExamined of the series, e.g. CHEST."),
    click.option("--user", metavar="NAME", envvar="MI_DICOMWEB_USER", help="PACS: HTTP basic user. [default: "
                 "MI_DICOMWEB_USER; a bearer token: MI_DICOMWEB_TOKEN]"),
    click.option("--password", metavar="SECRET", envvar="MI_DICOMWEB_PASSWORD",
                 help="PACS: HTTP basic password (never stored). [default: MI_DICOMWEB_PASSWORD]"),
    click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True,
                 help="PACS: concurrent retrievals at most."),
    click.option("--max-listed", type=click.IntRange(min=1), metavar="N",
                 help="PACS: records (studies, series, instances) a listing may hold before the run stops: a "
                      "server that ignores paging lists forever. [default: 1,000,000]"),
    click.option("--allow-empty-listing", is_flag=True,
                 help="PACS: an empty listing means the archive is empty: remove what the index holds of it "
                      "(refused otherwise, as a failed listing looks the same)."),
    click.option("--calling-aet", metavar="AET", envvar="MI_DIMSE_AET",
                 help="DIMSE: this side's AE title, which the archive must allow C-FIND and C-GET from. "
                      "[default: MI_DIMSE_AET, else MI-INDEX]"),
)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1)  # str: a dicomweb+http:// URL must not go through Path (it folds the '//')
@click.option("--sample", is_flag=True, help="Index a dozen real DICOM test images (CR chest, CT, MR, US) to try "
                                             "mi-search on.")
@click.option("--update", is_flag=True, help="Update every folder the index already holds.")
@click.option("--folders-of", "folders_of", metavar="INDEX", type=click.Path(file_okay=False, path_type=Path),
              help="Index the folders another index holds (e.g. to rebuild it with another --model).")
@click.option("--remove", "remove", metavar="PATH", multiple=True,  # str: a PACS URL must keep its '//'
              help="Take a folder (or file, or a PACS URL) out of the index; the files stay where they are.")
@click.option("--status", is_flag=True, help="Show what the index holds and exit.")
@click.option("--watch", is_flag=True, help="After indexing, keep watching the folders: new, changed, moved and "
                                            "deleted files are indexed as they appear (pip install '.[watch]').")
@click.option("--viewer-url", "viewer_url", metavar="TEMPLATE",
              help="Open PACS hits in a viewer: a URL with {study}, {series}, {instance} or {wado}, kept in the "
                   "index (alone or with a run; '' removes it). See README, Opening hits in a viewer.")
@index_option(f"Index folder. [default: MI_INDEX, else {_user_index_dir()}]")
@model_option("Model folder or Hugging Face id. [default: MI_MODEL, else the index's model, "
              "else lion-ai/MedImageInsights]")
@index_options
@pacs_options
@json_option("Print the summary as one JSON object.")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-index")
def main(paths: tuple[str, ...], sample: bool, update: bool, folders_of: Path | None, remove: tuple[str, ...],
         status: bool, watch: bool, viewer_url: str | None, index_dir: Path | None, model: str | None,
         options: IndexOptions, pacs: PacsOptions, as_json: bool) -> None:
    """Index PATHS (folders, walked recursively, or files; or a PACS: dicomweb+http(s)://HOST/PREFIX)
    for mi-search."""
    from . import index_dicomweb, index_dimse, index_paths
    from .location import default_index_dir
    from .pacs_keys import is_dicomweb_url

    index_dir = index_dir or default_index_dir()
    with ExitStack() as undone_on_failure:  # a failed --sample run leaves no copy of the sample behind
        with one_line_errors():
            if viewer_url is not None:
                from .viewer_links import checked_template
                viewer_url = checked_template(viewer_url)  # a mistyped template stops before any run
            if status or remove:
                return _manage(index_dir, status, remove, as_json)
            sample_dir = None
            if sample:
                from .sample import sample_copy
                sample_dir = undone_on_failure.enter_context(sample_copy())
            files, urls = _sources(paths, index_dir, sample_dir, update, folders_of)
        if not files and not urls:
            if viewer_url is not None:
                return _set_viewer_url(index_dir, viewer_url, as_json)
            raise click.UsageError("give PATHS to index (or --sample, --update, --status; see --help)")
        if watch:
            if urls:
                raise click.UsageError("--watch watches folders, not a PACS: index the PACS with mi-index URL")
            if viewer_url is not None:
                _set_viewer_url(index_dir, viewer_url, as_json)
            from .watch_cli import watch as watch_folders
            with one_line_errors():
                return watch_folders(files, index_dir, model, options, as_json)
        if pacs.filtered and not urls:
            raise click.UsageError("--modality, --study-date and --body-part filter a PACS: give its "
                                   "dicomweb+http(s):// or dimse:// URL")
        runs = ([lambda bar: index_paths(files, index_dir, model=model, options=options, progress=bar)]
                if files else [])
        common = dict(model=model, options=options, **pacs.keywords())
        runs += [lambda bar, url=url: index_dicomweb(url, index_dir, user=pacs.user, password=pacs.password,
                                                     progress=bar, **common)
                 if is_dicomweb_url(url) else
                 index_dimse(url, index_dir, calling_aet=pacs.calling_aet, progress=bar, **common)
                 for url in urls]
        for run in runs:  # folders, then each PACS: one summary each
            _run_and_report(run, as_json)
    if viewer_url is not None:
        _set_viewer_url(index_dir, viewer_url, as_json)


def _set_viewer_url(index_dir: Path, template: str, as_json: bool) -> None:
    from .store import IndexStore

    with one_line_errors(), IndexStore.open(index_dir) as store:
        store.lock()
        store.set_viewer_template(template)
    click.echo(f"viewer links: {visible(template, markup=False)}" if template else "viewer links removed", err=as_json)


def _sources(paths: tuple[str, ...], index_dir: Path, sample_dir: Path | None, update: bool,
             folders_of: Path | None) -> tuple[tuple[Path, ...], list[str]]:
    """The files and folders, and the PACS URLs, to index: those named, and those --sample (copied into
    `sample_dir`), --update and --folders-of add."""
    from .pacs_keys import is_pacs_url

    for path in paths:
        if path.startswith(("http://", "https://")):
            raise click.UsageError(f"to index a PACS over DICOMweb, write dicomweb+{path}")
    urls = [path for path in paths if is_pacs_url(path)]
    files = tuple(Path(path) for path in paths if not is_pacs_url(path))
    more_files, more_urls = _more_paths(index_dir, sample_dir, update, folders_of)
    return files + more_files, urls + [url for url in more_urls if url not in urls]


def _run_and_report(run, as_json: bool) -> None:
    from rich.console import Console

    err = Console(stderr=True)
    try:
        with one_line_errors(), ProgressBar(err, enabled=err.is_terminal and not as_json) as update:
            summary = run(update)
    except KeyboardInterrupt:
        err.print("interrupted: what was committed stays; run mi-index again to finish")
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_summary(Console(), summary)


def _more_paths(index_dir: Path, sample_dir: Path | None, update: bool, folders_of: Path | None
                ) -> tuple[tuple[Path, ...], list[str]]:
    """The folders and PACS URLs that --sample, --update and --folders-of add."""
    from .pacs_keys import is_pacs_url
    from .store import IndexStore, StoreError

    more: list[Path] = [sample_dir] if sample_dir else []
    urls: list[str] = []
    for source, asked in ((index_dir, update), (folders_of, folders_of is not None)):
        if not asked:
            continue
        # the index --update writes is opened for writing: an index of an older schema is upgraded, not refused
        with IndexStore.open(source, readonly=source != index_dir) as store:
            roots = store.roots()
        urls += [root for root in roots if is_pacs_url(root)]
        roots = [root for root in roots if not is_pacs_url(root)]
        if not roots and not urls:
            raise StoreError(f"the index at {source} records no folders (made before mi-index recorded them): "
                             f"name them once, e.g. `mi-index FOLDER --index {source}`")
        gone = [root for root in roots if not Path(root).exists()]
        if gone:  # the others are updated: one folder unplugged must not hold up the rest
            _say_gone(gone, source, everything=len(gone) == len(roots) and not urls)
        more += [Path(root) for root in roots if root not in gone]
    return tuple(more), urls


def _check_held(store, paths: tuple[str, ...]) -> None:
    """--remove PATH of something the index never held is a typo: an error naming what it holds, before
    anything is removed."""
    import os

    from .pacs_keys import is_pacs_url
    from .store import StoreError

    roots = store.roots()
    for path in paths:
        where = path.rstrip("/") if is_pacs_url(path) else os.path.realpath(path)  # as remove_root reads it
        if where not in roots and not store.files_under([where]):
            held = ", ".join(visible(root, markup=False) for root in roots[:3]) + (", ..." if len(roots) > 3 else "")
            raise StoreError(f"{path} is not in the index at {store.folder}"
                             + (f", which holds {held}" if roots else "")
                             + " (see `mi-index --status`)")


def _say_gone(gone: list[str], index_dir: Path, everything: bool) -> None:
    """One line naming the recorded folders that are gone, and how to take them out of the index; an error
    when no folder is left to update."""
    from .store import StoreError

    named = ", ".join(visible(root, markup=False) for root in gone)
    what = named if len(gone) == 1 else "PATH"
    how = f"take {'it' if len(gone) == 1 else 'each'} out with `mi-index --remove {what} --index {index_dir}`"
    if everything:
        raise StoreError(f"nothing to update: every folder the index records is gone ({named}); {how}")
    click.echo(f"not updated, gone: {named} ({'its' if len(gone) == 1 else 'their'} images stay in the index; "
               f"{how})", err=True)


def _manage(index_dir: Path, status: bool, remove: tuple[str, ...], as_json: bool) -> None:
    from rich.console import Console

    from .store import IndexStore

    with IndexStore.open(index_dir, readonly=not remove) as store:
        if remove:
            store.lock()
            _check_held(store, remove)
            removed = store.remove_roots(remove)
            store.write_faiss()
            click.echo(f"removed {removed} files from {index_dir}; {store.count()} images left", err=as_json)
        info = store.status()
    if not status:
        return
    if as_json:
        click.echo(json.dumps(info))
        return
    from rich.table import Table

    table = Table(title=f"index {visible(info['index'])}", show_header=False, box=None)
    table.add_row("images", f"{info['images']} from {info['files']} files")
    table.add_row("modalities", visible(", ".join(f"{m or 'none'} {n}" for m, n in info["modalities"].items())))
    # One line per reason and per folder (visible() would show a joining newline as \x0a); a long reason
    # shortened at a word boundary (--json has it whole).
    table.add_row("skipped", "\n".join(visible(f"{n} {shortened(why, STATUS_REASON_CHARS)}")
                                       for why, n in info["skipped"].items()) or "none")
    table.add_row("folders", "\n".join(visible(folder) for folder in info["folders"]) or "(not recorded)")
    model = info["model"] or {}
    table.add_row("model", visible(f"{model.get('source')} ({str(model.get('fingerprint'))[:12]}, "
                                   f"{model.get('dim')}-d)" if model else "none yet"))
    table.add_row("on disk", f"{info['size_bytes'] / 1e6:.1f} MB")
    table.add_row("last run", visible(f"{info['last_run_at']} ({info['last_run_seconds']} s)"
                                      if info["last_run_at"] else "never"))
    Console().print(table)


def entry() -> None:
    """The `mi-index` console script."""
    console_script(main)


def _count(n: int, word: str) -> str:
    """`1 file`, `247 files`."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def summary_sentences(summary: dict) -> list[str]:
    """A run's summary (the --json keys) as a few plain sentences."""
    said = []
    read = [_count(summary["new"], "new file")] if summary["new"] else []
    read += [_count(summary["updated"], "changed file")] if summary["updated"] else []
    outcome = [f"{_count(summary['encoded'], 'image')} indexed"] if summary["encoded"] else []
    if summary["reused"]:
        outcome.append(f"{_count(summary['reused'], 'file')} reused {'its' if summary['reused'] == 1 else 'their'} "
                       f"stored vectors")
    if summary["skipped"]:
        outcome.append(f"{_count(summary['skipped'], 'file') if not read else summary['skipped']} skipped "
                       f"(reasons below)")
    if read:
        said.append(f"{' and '.join(read)}: {', '.join(outcome) or 'nothing indexed'}.")
    elif outcome:
        said.append(", ".join(outcome).capitalize() + ".")
    if summary["unchanged"]:
        before = summary["still_skipped"]
        said.append(f"{_count(summary['unchanged'], 'file')} unchanged since the last run, not read again"
                    + (f" ({before} of them could not be read: tried again once they change)." if before else "."))
    if summary["removed"]:
        where = "its folder" if summary["removed"] == 1 else "their folders"
        said.append(f"{_count(summary['removed'], 'file')} gone from {where}: taken out of the index.")
    if summary.get("not_retrieved"):
        said.append(f"{_count(summary['not_retrieved'], 'PACS instance')} not received whole: retrieved again "
                    f"next run.")
    if not (read or summary["skipped"] or summary["removed"] or summary.get("not_retrieved")):
        said.insert(0, "Nothing new or changed.")
    seconds = summary["seconds"].get("total", 0)
    rate = f" ({summary['encoded'] / seconds:.1f} images/s)" if summary["encoded"] and seconds else ""
    said.append(f"The index at {summary['index']} holds {_count(summary['images'], 'image')}; this run took "
                f"{seconds:.1f} s{rate}.")
    return said


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    for sentence in summary_sentences(summary):
        console.print(visible(sentence))
    if summary["skipped_files"]:
        from collections import Counter
        reasons = Table("skipped", "reason", title="skipped files (retried when they change)")
        for reason, count in Counter(row["reason"] for row in summary["skipped_files"]).most_common():
            reasons.add_row(str(count), visible(reason))
        console.print(reasons)
        skipped = Table("file", "reason")
        skipped.columns[0].overflow = "fold"  # paths are what the user acts on: wrapped, never cut
        for row in summary["skipped_files"][:SKIPPED_SHOWN]:
            skipped.add_row(visible(row["path"]), visible(row["reason"]))
        console.print(skipped)
        if len(summary["skipped_files"]) > SKIPPED_SHOWN:
            console.print(f"... and {len(summary['skipped_files']) - SKIPPED_SHOWN} more (mi-index --json lists "
                          f"them all)")
