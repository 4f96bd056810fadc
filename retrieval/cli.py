"""`mi-search`: search an index built by mi-index, by text, by example image, or both."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from indexer.errors import one_line
from indexer.filters import FILTER_FIELDS
from indexer.terminal import (console_script, device_option, index_option, json_option, model_option,
                              one_line_errors, visible, write_lines)

from .query import parse_query
from .request import DEFAULT_K, MAX_K, OPTIONS, SearchRequest

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
image file. A term that looks like a file (a path, or a .png/.dcm/... name)
but is none is an error: a typo, or --text.

\b
Filters apply before the top-k cut: -k 10 --modality CR gives 10 CR images
when 10 exist:
  mi-search "lumbar spine fracture" -k 20 --modality CR --since 2020

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
# mi-search's spelling of the search options where it is not --NAME (retrieval.request.OPTIONS)
FLAGS = {"k": ("-k", "--top"), "duplicates": ("--show-duplicates",)}
NOTES = {"patient": " (needs the index's patient key)"}  # after an --exclude-same-CHOICE option's help


def _flag(name: str) -> str:
    return FLAGS.get(name, (f"--{name.replace('_', '-')}",))[-1]


def request_options(command: Any) -> Any:
    """The options of a search request, one per filter (indexer.filters) and option (retrieval.request)."""
    dates = {"metavar": "DATE"}  # YYYY-MM-DD, YYYY-MM or YYYY: read by indexer.filters, one rule everywhere
    decorators = [click.option(*FLAGS["k"], "k", type=click.IntRange(1, MAX_K), default=DEFAULT_K,
                               show_default=True, help="Number of hits.")]
    decorators += [click.option(_flag(field.name), field.name, help=field.help,
                                **(dates if field.compare in ("from", "to") else
                                   {"type": click.Path(path_type=Path)} if field.compare == "under" else {}))
                   for field in FILTER_FIELDS]
    for option in OPTIONS[1:]:
        if option.name == "exclude_same":  # one flag per choice: --exclude-same-study, --exclude-same-patient
            decorators += [click.option(f"--exclude-same-{choice}", "exclude_same", flag_value=choice,
                                        help=f"Image queries: leave out the query's own {choice}"
                                             f"{NOTES.get(choice, '')}.")
                           for choice in option.choices]
        elif option.name == "fold_near":  # --fold-near alone: the duplicate checks' default threshold
            from .curate.duplicates import DEFAULT_THRESHOLD

            decorators.append(click.option("--fold-near", "fold_near", type=click.FloatRange(0.0, 1.0), is_flag=False,
                                           flag_value=DEFAULT_THRESHOLD, default=None, metavar="[THRESHOLD]",
                                           help=f"{option.help} [THRESHOLD default: {DEFAULT_THRESHOLD}; it depends "
                                                f"on the weights: see mi duplicates]"))
        elif option.kind is bool:
            decorators.append(click.option(*FLAGS.get(option.name, (_flag(option.name),)), option.name, is_flag=True,
                                           help=option.help))
        else:
            decorators.append(click.option(_flag(option.name), option.name, help=option.help,
                                           type=click.Choice(option.choices) if option.choices else option.kind))
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("query", nargs=-1, required=True)
@index_option()
@model_option()
@device_option
@request_options
@click.option("--text", "force", flag_value="text", help="Read every QUERY as text.")
@click.option("--image", "force", flag_value="image", help="Read every QUERY as an image file.")
@json_option("Print the hits as a JSON list.")
@click.option("--paths", "paths_only", is_flag=True, help="Print only the paths, one per line, byte for byte.")
@click.option("--print0", is_flag=True, help="With --paths: end each path with a NUL (for xargs -0).")
@click.option("--no-server", is_flag=True, help="Search in this process even when a mi-serve serves the index.")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-search")
def main(query: tuple[str, ...], index_dir: Path | None, model: str | None, device: str | None,
         force: str | None, as_json: bool, paths_only: bool, print0: bool, no_server: bool, **asked: Any) -> None:
    """Search an index of X-rays and DICOM files by text, by example image, or both.

    QUERY is a text or an image file (PNG, JPEG, TIFF, BMP, DICOM); several are combined
    with + and - (see below). Build the index first with mi-index. When mi-serve serves the
    index (or MI_SERVER names a server), it answers: warm, without loading the model here.
    """
    try:
        with one_line_errors(OSError, message=lambda error: _message(error, index_dir)):
            terms = parse_query(list(query), force=force)
            if force is None:
                _check_no_missing_files(terms)
            request = SearchRequest.make(terms, **asked)
            hits = None
            if not (no_server or _given(("model", "device"))):  # a model or device asked for: search here
                hits = _through_server(index_dir, request)
            if hits is None:
                from .search import Searcher

                with Searcher(index=index_dir, model=model, device=device) as searcher:
                    hits = searcher.search(request)
    except KeyboardInterrupt:
        sys.exit(130)

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


def _looks_like_a_path(text: str) -> bool:
    """Whether a text term was likely meant as a file: one word with a path separator, or a word that
    starts like a path (/, ./, ../, ~/) or ends with a suffix the indexer reads (indexer.decode)."""
    import os

    words = text.split()
    separators = tuple({"/", os.sep})
    if len(words) == 1 and any(sep in words[0] for sep in separators):
        return True
    if any(word.startswith(("/", "./", "../", "~/")) for word in words):
        return True
    if not any(Path(word).suffix for word in words):
        return False
    from indexer.decode import DICOM_SUFFIXES, IMAGE_SUFFIXES  # Pillow: only when a word has a suffix

    return any(Path(word).suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES for word in words)


def _check_no_missing_files(terms: list) -> None:
    """A text term that looks like a file (a typo in its name, most often) is refused, not searched as text."""
    from .errors import QueryError

    for term in terms:
        if term.kind == "text" and _looks_like_a_path(term.value):
            raise QueryError(f"no such file: {term.value}; to search for it as text, add --text")


def _given(names: tuple[str, ...]) -> bool:
    """Whether any of these options was given on the command line (not by the environment)."""
    context = click.get_current_context()
    return any(context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE for name in names)


def _through_server(index_dir: Path | None, request: SearchRequest) -> list | None:
    """The hits of a running mi-serve of this index (or of MI_SERVER), else None: search here.
    Imports neither PyTorch nor FAISS; image files are read here and sent."""
    from indexer.location import default_index_dir

    from .client import Client, ServerUnavailable
    from .discovery import find_server

    folder = Path(index_dir or default_index_dir()).expanduser()
    server = find_server(folder)
    if server is None:
        return None
    # Name the index unless MI_SERVER was chosen for whatever index it serves.
    meant = str(folder.resolve()) if server.index or index_dir else None
    try:
        return Client(server, index=meant).search(request)
    except ServerUnavailable:
        return None


def _message(error: BaseException, index_dir: Path | None) -> str:
    """The error's line, with what the command line adds: the flag a fix is about, how to build a missing index."""
    from indexer.errors import IndexNotFoundError

    message = one_line(error)
    if getattr(error, "option", None):
        message += f" ({_flag(error.option)})"
    if isinstance(error, IndexNotFoundError) and "mi-index" not in message:
        where = f" --index {index_dir}" if index_dir else ""
        message += f"; build it first with `mi-index PATH{where}`"
    return message


def _text(value: Any) -> str:
    return "" if value is None else str(value)


SCORE_FORMAT = "{:6.3f}"  # sign-aware, fixed width: " 0.412", "-0.076"
LABELS_MIN_ROOM = 20      # columns the labels need beside a hit's fields, else they go on the lines below


def _print_table(hits: list, console: Any = None) -> None:
    """Hits for a terminal of 80 columns or more: one line of fields per hit (rank, score,
    DICOM fields, study, labels), its file on the line below, so that nothing is dropped or
    cut; labels wrap within their own column, paths wrap. Paths are relative to the current
    folder when under it."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    width = max(console.width, 40)
    studies = _study_labels([hit.metadata.get("study_instance_uid") for hit in hits])
    columns = [("#", lambda h: str(h.rank), 3, True), ("score", lambda h: SCORE_FORMAT.format(h.score), 6, True)]
    columns += [(title, (lambda h, key=key: visible(h.metadata.get(key) or "", markup=False)), cap, False)
                for title, key, cap in (("modality", "modality", 8), ("part", "body_part", 10),
                                        ("view", "view_position", 6), ("date", "study_date", 10))
                if any(hit.metadata.get(key) for hit in hits)]
    if studies:
        columns.append(("study", lambda h: visible(studies.get(h.metadata.get("study_instance_uid"), ""), markup=False),
                        max(map(len, studies.values())), False))
    rows = [[cell(hit)[:cap] for _, cell, cap, _ in columns] for hit in hits]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, *_rest) in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if columns[i][3] else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    indent = " " * (widths[0] + 2)
    with_labels = any(hit.labels for hit in hits)
    beside = len(line(rows[0])) + 2 + LABELS_MIN_ROOM <= width  # the labels' column, beside the fields
    labels_at = len(line(rows[0])) + 2 if beside else len(indent)
    header = line([title for title, *_ in columns]) + ("  labels" if with_labels and beside else "")
    console.print(Text(header.rstrip(), style="bold"), overflow="fold")
    for hit, row in zip(hits, rows):
        first = line(row)
        if with_labels:
            best = sorted((hit.labels or {}).items(), key=lambda item: -item[1])
            wrapped = _packed([f"{visible(label, markup=False)} {p:.2f}" for label, p in best], width - labels_at)
            if beside:
                first += "  " + wrapped.pop(0)
            first += "".join("\n" + " " * labels_at + part for part in wrapped)
        console.print(Text(first.rstrip()), overflow="fold")
        where = Text(indent + visible(_shown_path(hit.path), markup=False), style="dim")
        notes = _notes(hit)
        if notes:
            where.append(" (" + ", ".join(text for text, _ in notes) + ")")
            if any(alarm for _, alarm in notes):
                where.stylize("bold red", len(where) - len(notes[-1][0]) - 1, len(where) - 1)
        console.print(where, overflow="fold")
        if hit.viewer_url:  # a PACS hit: the link that opens it (mi-index --viewer-url); wrapped, never cut
            console.print(Text(indent + "viewer " + hit.viewer_url, style="dim"), overflow="fold")


def _packed(items: list[str], room: int) -> list[str]:
    """`items` joined by ", " into lines of at most `room` characters, an item split only where it alone is
    longer."""
    import textwrap

    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= room:
            lines[-1] += ", " + item
        else:
            if lines:
                lines[-1] += ","
            lines += textwrap.wrap(item, room - 1, break_on_hyphens=False) or [""]
    return lines or [""]


STUDY_HEAD, STUDY_TAILS = 6, range(6, 13)  # a Study UID shown as its first 6 and last 6 to 12 characters


def _study_labels(uids: list[str | None]) -> dict[str, str]:
    """{Study Instance UID: a short form that tells it from the others shown}: its first 6 and last 6
    characters around an ellipsis, more of its end where two would look alike, the UID itself where
    that is no longer; numbered (#1, #2) where UIDs differ only in their middle."""
    distinct = sorted({uid for uid in uids if uid})
    def shortened(uid: str, tail: int) -> str:
        return uid if len(uid) <= STUDY_HEAD + 1 + tail else f"{uid[:STUDY_HEAD]}…{uid[-tail:]}"

    for tail in STUDY_TAILS:
        short = {uid: shortened(uid, tail) for uid in distinct}
        if len(set(short.values())) == len(distinct):
            return short
    alike: dict[str, list[str]] = {}
    for uid in distinct:
        alike.setdefault(shortened(uid, STUDY_TAILS[0]), []).append(uid)
    return {uid: form if len(same) == 1 else f"{form} #{same.index(uid) + 1}"
            for form, same in alike.items() for uid in same}


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
        notes.append((f"{hit.in_group} {'slices' if 'series_slices' in hit.metadata else 'in group'}", False))
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
    console_script(main)


if __name__ == "__main__":
    main()
