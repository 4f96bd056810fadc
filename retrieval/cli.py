"""`mi-search`: search an index built by mi-index, by text, by example image, or both."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from indexer.errors import one_line
from indexer.terminal import DEVICE_OPTION_HELP, check_device

EPILOG = """\b
Queries:
  mi-search "pleural effusion"                  text
  mi-search ./case12.dcm                        image (an existing file)
  mi-search "pleural effusion" + ./case12.dcm   both: embeddings added
  mi-search ./case12.dcm - "pacemaker"          like case 12, not pacemakers
  mi-search "2:pleural effusion" + "cardiomegaly"
                                                WEIGHT:QUERY weighs a term
  mi-search pleural effusion                    unquoted words are one text
Each term's embedding is normalised, weighted (+ or -, times WEIGHT), summed
and normalised again. --text or --image reads every term as a text or as an
image file.

\b
Filters apply before the top-k cut: -k 10 --modality CR gives 10 CR images
when 10 exist:
  mi-search "lumbar spine fracture" -k 20 --modality CR --since 2020-01-01

\b
Output: a table on a terminal; tab-separated lines under a header row (rank,
score, path, modality, body part, view, study date, labels if asked) when
piped; --paths for paths only, byte for byte (--paths | xargs open; --print0
| xargs -0 for any file name); --json for a list of objects (rank, score, id,
path and the stored metadata). --labels "normal,pneumothorax" adds zero-shot
probabilities for each hit. A running mi-serve of the index answers (warm);
--no-server searches here.
"""

COLUMNS = [("modality", "modality"), ("body part", "body_part"), ("view", "view_position"),
           ("date", "study_date")]


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("query", nargs=-1, required=True)
@click.option("--index", "index_dir", envvar="MI_INDEX", type=click.Path(file_okay=False, path_type=Path),
              help="Index folder. [default: MI_INDEX, else the per-user folder mi-index uses]")
@click.option("--model", envvar="MI_MODEL", metavar="SRC",
              help="Model folder or Hugging Face id. [default: MI_MODEL, else the index's model]")
@click.option("--device", metavar="DEVICE", callback=check_device, help=DEVICE_OPTION_HELP)
@click.option("-k", "--top", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of hits.")
@click.option("--modality", help="Only this DICOM Modality (CR, DX, CT, ...).")
@click.option("--body-part", help="Only this BodyPartExamined (CHEST, ...).")
@click.option("--view", help="Only this ViewPosition (PA, AP, LL, ...).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="Only studies on or after this date.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="Only studies on or before this date.")
@click.option("--under", type=click.Path(path_type=Path), help="Only files under this folder.")
@click.option("--min-score", type=float, help="Drop hits below this cosine similarity.")
@click.option("--labels", help='Comma-separated labels for zero-shot probabilities, e.g. "normal,pneumonia".')
@click.option("--multilabel", is_flag=True, help="Score --labels independently (sigmoid), not as a softmax.")
@click.option("--group", type=click.Choice(["study", "patient"]),
              help="One hit per study or patient (its best image, with the number of matches).")
@click.option("--show-duplicates", is_flag=True,
              help="Show exact duplicates (same SOP Instance UID or same content) as separate hits.")
@click.option("--exclude-same-study", "exclude_same", flag_value="study",
              help="Image queries: leave out the query's own study.")
@click.option("--exclude-same-patient", "exclude_same", flag_value="patient",
              help="Image queries: leave out the query's own patient (needs the index's patient key).")
@click.option("--text", "force", flag_value="text", help="Read every QUERY as text.")
@click.option("--image", "force", flag_value="image", help="Read every QUERY as an image file.")
@click.option("--json", "as_json", is_flag=True, help="Print the hits as a JSON list.")
@click.option("--paths", "paths_only", is_flag=True, help="Print only the paths, one per line, byte for byte.")
@click.option("--print0", is_flag=True, help="With --paths: end each path with a NUL (for xargs -0).")
@click.option("--no-server", is_flag=True, help="Search in this process even when a mi-serve serves the index.")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-search")
def main(query: tuple[str, ...], index_dir: Path | None, model: str | None, device: str | None, k: int,
         modality: str | None, body_part: str | None, view: str | None, since: Any, until: Any,
         under: Path | None, min_score: float | None, labels: str | None, multilabel: bool,
         group: str | None, show_duplicates: bool, exclude_same: str | None,
         force: str | None, as_json: bool, paths_only: bool, print0: bool, no_server: bool) -> None:
    """Search an index of X-rays and DICOM files by text, by example image, or both.

    QUERY is a text or an image file (PNG, JPEG, TIFF, BMP, DICOM); several are combined
    with + and - (see below). Build the index first with mi-index. When mi-serve serves the
    index (or MI_SERVER names a server), it answers: warm, without loading the model here.
    """
    from indexer.filters import SearchFilters

    try:
        filters = SearchFilters.make(modality=modality, body_part=body_part, view=view, since=since, until=until,
                                     under=under)
        options = dict(k=k, min_score=min_score, labels=labels, multilabel=multilabel, group=group,
                       duplicates=show_duplicates, exclude_same=exclude_same)
        hits = None
        if not (no_server or _given(("model", "device"))):  # a model or device asked for: search here
            hits = _through_server(index_dir, list(query), force, filters, options)
        if hits is None:
            from .search import Searcher

            with Searcher(index=index_dir, model=model, device=device) as searcher:
                hits = searcher.search(list(query), force=force, filters=filters, **options)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:  # only the expected, typed errors become one line
        if not _is_user_error(error):
            raise
        from indexer.terminal import visible
        raise click.ClickException(visible(_message(error, index_dir), markup=False)) from None

    from indexer.terminal import write_lines

    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], indent=2, default=str))
    elif paths_only or print0:
        write_lines([hit.path for hit in hits], b"\0" if print0 else b"\n")
    elif not hits:
        click.echo("No hits: nothing in the index matches the filters or --min-score.", err=True)
    elif sys.stdout.isatty():
        _print_table(hits)
    else:  # tab-separated, a header first; file names byte for byte
        with_labels = any(hit.labels for hit in hits)
        header = (["rank", "score", "path"] + [key for _, key in COLUMNS] + list(TSV_EXTRA) + ["copies", "missing"]
                  + (["labels"] if with_labels else []))
        write_lines(["\t".join(header)] + ["\t".join(_cells(hit, score_format="{:.4f}")) for hit in hits])


def _given(names: tuple[str, ...]) -> bool:
    """Whether any of these options was given on the command line (not by the environment)."""
    context = click.get_current_context()
    return any(context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE for name in names)


def _through_server(index_dir: Path | None, query: list[str], force: str | None, filters: Any,
                    options: dict[str, Any]) -> list | None:
    """The hits of a running mi-serve of this index (or of MI_SERVER), else None: search here.
    Imports neither PyTorch nor FAISS; image files are read here and sent."""
    from indexer.location import default_index_dir

    from .client import Client, ServerUnavailable
    from .discovery import find_server
    from .query import parse_query

    folder = Path(index_dir or default_index_dir()).expanduser()
    server = find_server(folder)
    if server is None:
        return None
    terms = parse_query(query, force=force)  # the terms are this machine's files and texts
    # Name the index unless MI_SERVER was chosen for whatever index it serves.
    meant = str(folder.resolve()) if server.index or index_dir else None
    try:
        return Client(server, index=meant).search(terms, filters, **options)
    except ServerUnavailable:
        return None


def _is_user_error(error: Exception) -> bool:
    """Typed errors of our libraries, and the OS saying a file cannot be read or written."""
    from indexer.terminal import is_user_error

    from .errors import SearchError
    return is_user_error(error, SearchError, OSError)


def _message(error: Exception, index_dir: Path | None) -> str:
    message = one_line(error)
    from indexer.errors import IndexNotFoundError

    if isinstance(error, IndexNotFoundError) and "mi-index" not in message:
        where = f" --index {index_dir}" if index_dir else ""
        message += f"; build it first with `mi-index PATH{where}`"
    return message


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _print_table(hits: list, console: Any = None) -> None:
    """Hits for a terminal of 80 columns or more: one line of fields per hit (rank, score,
    DICOM fields, study, labels), its file on the line below, so that nothing is dropped or
    cut; long labels and paths wrap. Paths are relative to the current folder when under it."""
    from rich.console import Console
    from rich.text import Text

    from indexer.terminal import visible

    console = console or Console()
    width = max(console.width, 40)
    columns = [("#", lambda h: str(h.rank), 3, True), ("score", lambda h: f"{h.score:.3f}", 5, True)]
    columns += [(title, (lambda h, key=key: visible(h.metadata.get(key) or "", markup=False)), cap, False)
                for title, key, cap in (("modality", "modality", 8), ("part", "body_part", 10),
                                        ("view", "view_position", 6), ("date", "study_date", 10))
                if any(hit.metadata.get(key) for hit in hits)]
    if any(hit.metadata.get("study_instance_uid") for hit in hits):
        columns.append(("study", lambda h: _short_uid(h.metadata.get("study_instance_uid")), 12, False))
    rows = [[cell(hit)[:cap] for _, cell, cap, _ in columns] for hit in hits]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, *_rest) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if columns[i][3] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    with_labels = any(hit.labels for hit in hits)
    header = line([title for title, *_ in columns]) + ("  labels" if with_labels else "")
    console.print(Text(header.rstrip(), style="bold"), overflow="fold")
    indent = " " * (widths[0] + 2)
    for hit, row in zip(hits, rows):
        first = line(row)
        if with_labels:
            best = sorted((hit.labels or {}).items(), key=lambda item: -item[1])
            labels = ", ".join(f"{visible(label, markup=False)} {p:.2f}" for label, p in best)
            room = width - len(first) - 2
            first += "  " + (labels if room >= min(len(labels), 20) else "")
            if room < min(len(labels), 20):
                first += "\n" + indent + labels
        console.print(Text(first.rstrip()), overflow="fold")
        where = Text(indent + visible(_shown_path(hit.path), markup=False), style="dim")
        notes = _notes(hit)
        if notes:
            where.append(" (" + ", ".join(text for text, _ in notes) + ")")
            if any(alarm for _, alarm in notes):
                where.stylize("bold red", len(where) - len(notes[-1][0]) - 1, len(where) - 1)
        console.print(where, overflow="fold")


def _short_uid(uid: str | None) -> str:
    return "" if not uid else ("…" + uid[-11:] if len(uid) > 12 else uid)


def _shown_path(path: str) -> str:
    import os

    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return relative if not relative.startswith("..") else path


def _notes(hit: Any) -> list[tuple[str, bool]]:
    """What a path alone does not say, each with whether it is an alarm: the frame, copies
    folded in, the group, a missing file (always last)."""
    notes = []
    if hit.metadata.get("frame"):
        notes.append((f"frame {hit.metadata['frame']}", False))
    if hit.copies > 1:
        notes.append((f"{hit.copies} copies", False))
    if hit.in_group > 1:
        notes.append((f"{hit.in_group} in group", False))
    if hit.missing:
        notes.append(("file missing", True))
    return notes


TSV_EXTRA = ("frame", "study_instance_uid", "series_instance_uid")


def _cells(hit: Any, score_format: str) -> list[str]:
    """rank, score, path, the COLUMNS, frame, study and series UIDs, copies, missing, and the
    labels (best first) when there are any: one tab-separated row."""
    cells = [str(hit.rank), score_format.format(hit.score), hit.path]
    cells += [_text(hit.metadata.get(key)) for _, key in COLUMNS]
    cells += [_text(hit.metadata.get(key)) for key in TSV_EXTRA]
    cells += [str(hit.copies), "missing" if hit.missing else ""]
    if hit.labels:
        best = sorted(hit.labels.items(), key=lambda item: -item[1])
        cells.append(", ".join(f"{label} {p:.2f}" for label, p in best))
    return cells


def entry() -> None:
    """The `mi-search` console script."""
    from indexer.terminal import console_script
    console_script(main)


if __name__ == "__main__":
    main()
