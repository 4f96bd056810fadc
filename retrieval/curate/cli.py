"""The dataset checks' command lines: `mi duplicates`, `mi leakage`, `mi outliers`, `mi export`,
`mi evaluate`, `mi map` (registered in retrieval.commands). Each prints a short table, or JSON
with --json, and writes the items to a CSV file with --csv FILE; errors are one line."""
from __future__ import annotations

import contextlib
import os
import csv
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from indexer.errors import one_line
from indexer.terminal import index_option, model_option

INDEX_OPTION = index_option()
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
CSV_OPTION = click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
                          help="Also write the items to this CSV file.")
CONTEXT = {"help_option_names": ["-h", "--help"]}


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Our typed errors (and the OS refusing a file) as one line on stderr, exit status 1
    (click's: a missing option is 2); anything else is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        from indexer.terminal import is_user_error, visible

        from ..errors import SearchError
        if not is_user_error(error, SearchError, OSError):
            raise
        raise click.ClickException(visible(one_line(error), markup=False)) from None


def reader_of(index_dir: Path | None):
    from .reader import IndexReader
    return IndexReader(index_dir)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def echo_json(report: Any) -> None:
    click.echo(json.dumps(report, indent=2, default=str, ensure_ascii=False))


def shown(value: Any) -> str:
    from indexer.terminal import visible
    return visible("" if value is None else value, markup=False)


def print_distribution(report: dict[str, Any], echo: Callable[..., None] = click.echo) -> None:
    near = report.get("nearest_similarity")
    if not near:
        return
    q = near["quantiles"]
    if q:
        echo("Similarity of each image to its nearest other image: " +
             ", ".join(f"{name} {value:.4f}" for name, value in q.items()))
    bins = [b for b in near["histogram"] if b["images"]]
    for b in bins:
        echo(f"  {b['from']:>6.3f} .. {b['to']:<6.3f} {b['images']:>8}")
    echo(f"Note: {near['note']}.")


# ---------------------------------------------------------------- mi duplicates
DUPLICATE_COLUMNS = ["cluster", "kind", "size", "relations", "id", "path", "frame", "similarity", "content_group",
                     "sop_group", "pixel_group",
                     "sop_instance_uid", "study_instance_uid", "series_instance_uid", "patient", "width", "height",
                     "transfer_syntax", "source_format"]


@click.command(context_settings=CONTEXT)
@INDEX_OPTION
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Near duplicates: cosine similarity at or above this. [default: 0.98; depends on the weights]")
@click.option("--exact-only", is_flag=True, help="Only exact duplicates (same SOP Instance UID or file content).")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Neighbours compared per image.")
@click.option("--pixels", is_flag=True, help="Decode cluster members to tell which have the same pixels (slower).")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="Clusters shown in the table (--json and --csv hold all).")
@JSON_OPTION
@CSV_OPTION
def duplicates(index_dir: Path | None, threshold: float | None, exact_only: bool, k: int, pixels: bool,
               limit: int, as_json: bool, csv_file: Path | None) -> None:
    """Exact and near-duplicate images of an index, in clusters, with how each cluster's
    members relate (same file content, SOP Instance UID, study, series, patient; different
    transfer syntax or size). Prints the distribution of nearest-neighbour similarities to
    choose --threshold from."""
    from .duplicates import DEFAULT_THRESHOLD, find_duplicates

    with one_line_errors(), reader_of(index_dir) as reader:
        report = find_duplicates(reader, threshold=DEFAULT_THRESHOLD if threshold is None else threshold, k=k,
                                 near=not exact_only, pixels=pixels)
        if csv_file:
            write_csv(csv_file, DUPLICATE_COLUMNS, [
                [c["cluster"], c["kind"], c["size"], "; ".join(c["relations"])] +
                [m.get(name) for name in DUPLICATE_COLUMNS[4:]]
                for c in report["clusters"] for m in c["members"]])
    if as_json:
        echo_json(report)
        return
    s = report["summary"]
    click.echo(f"{report['images']} images: {s['clusters']} duplicate clusters ({s['exact_clusters']} exact, "
               f"{s['near_clusters']} near, {s['mixed_clusters']} mixed"
               + (f", cosine >= {report['threshold']}" if report["threshold"] is not None else "")
               + f"), {s['redundant_images']} redundant images.")
    if report["clusters"][:limit]:
        click.echo("Members: similarity to the first, path (copies: file content group / SOP Instance UID group"
                   + (" / decoded pixels group" if pixels else "") + ", size, transfer syntax)")
    for cluster in report["clusters"][:limit]:
        click.echo(f"\ncluster {cluster['cluster']}: {cluster['kind']}, {cluster['size']} images, "
                   f"min similarity {cluster['min_similarity']:.4f}: {', '.join(cluster['relations']) or '-'}")
        for m in cluster["members"]:
            copies = "/".join(str(m.get(g) or "-") for g in ("content_group", "sop_group", "pixel_group") if g in m)
            extra = ", ".join(str(x) for x in (f"copies {copies}", f"frame {m['frame']}" if m["frame"] else None,
                                                f"{m['width']}x{m['height']}" if m["width"] else None,
                                                m["transfer_syntax"]) if x)
            click.echo(f"  {m['similarity']:.4f}  {shown(m['path'])}" + (f"  ({extra})" if extra else ""))
    if len(report["clusters"]) > limit:
        click.echo(f"\n... {len(report['clusters']) - limit} more clusters (--limit, --json, --csv)")
    click.echo("")
    print_distribution(report)


# ---------------------------------------------------------------- mi leakage
LEAKAGE_COLUMNS = ["check", "split_a", "split_b", "key", "split", "id", "path", "frame", "similarity"]
CHECK_NAMES = {"same_images": "images in both", "patients": "patients in both", "studies": "studies in both",
               "exact_duplicates": "exact duplicates across", "near_duplicates": "near duplicates across"}


@click.command(context_settings=CONTEXT)
@INDEX_OPTION
@click.option("--split", "split_folders", multiple=True, metavar="NAME=FOLDER",
              help="A split and its folder; give two or more (--split train=data/train --split test=data/test).")
@click.option("--splits-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="A CSV with a `split` column and a `path` or `sop_instance_uid` column.")
@click.option("--split-by", metavar="FIELD", help="A stored field whose values are the splits.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=None,
              help="Near duplicates across splits: cosine at or above this. [default: 0.98; depends on the weights]")
@click.option("--no-near", is_flag=True, help="Skip near duplicates (no vectors compared).")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Neighbours compared per image.")
@JSON_OPTION
@CSV_OPTION
@click.pass_context
def leakage(context: click.Context, index_dir: Path | None, split_folders: tuple[str, ...], splits_csv: Path | None,
            split_by: str | None, threshold: float | None, no_near: bool, k: int, as_json: bool,
            csv_file: Path | None) -> None:
    """Leakage between dataset splits: patients (by pseudonym) and studies in two splits, exact
    and near duplicates across them, images placed in two. Exit status 1 when any is found (a CI
    guard), 0 when the splits are clean."""
    from . import splits as split_sources
    from .duplicates import DEFAULT_THRESHOLD
    from .leakage import CHECKS, find_leakage

    given = sum(bool(x) for x in (split_folders, splits_csv, split_by))
    if given != 1:
        raise click.UsageError("give the splits one way: --split NAME=FOLDER (twice or more), --splits-csv FILE "
                               "or --split-by FIELD")
    with one_line_errors(), reader_of(index_dir) as reader:
        if split_folders:
            splits = split_sources.from_folders(reader, [split_sources.parse_split_option(v) for v in split_folders])
        elif splits_csv:
            splits = split_sources.from_csv(reader, splits_csv)
        else:
            splits = split_sources.from_field(reader, split_by)
        report = find_leakage(reader, splits, k=k,
                              threshold=None if no_near else (DEFAULT_THRESHOLD if threshold is None else threshold))
        if csv_file:
            write_csv(csv_file, LEAKAGE_COLUMNS, _leakage_rows(reader, report))
    if as_json:
        echo_json(report)
    else:
        click.echo(f"{report['images']} images; splits: " +
                   ", ".join(f"{shown(name)} {n}" for name, n in report["splits"].items()) +
                   f"; {report['unassigned']} in no split.")
        for note in report["notes"]:
            click.echo(f"Note: {shown(note)}.")
        if report["without_patient"]:
            click.echo(f"Note: {report['without_patient']} images have no patient pseudonym (no PatientID, or "
                       f"indexed without the patient key): they cannot be checked by patient.")
        for pair in report["pairs"]:
            a, b = (shown(s) for s in pair["splits"])
            counts = ", ".join(f"{pair[c]['count']} {CHECK_NAMES[c]}" for c in CHECKS if c in pair)
            click.echo(f"{a} / {b}: {'LEAKAGE' if pair['leaks'] else 'clean'}: {counts}")
        if report["threshold"] is not None:
            click.echo(f"(near duplicates: cosine >= {report['threshold']}; thresholds depend on the model's weights)")
    context.exit(1 if report["leakage"] else 0)


def _leakage_rows(reader, report: dict[str, Any]) -> list[list[Any]]:
    """One row per offending image of each finding: check, the pair of splits, the key that links
    (patient pseudonym, study UID, pair number), the image's split, id, path, frame, similarity."""
    wanted: list[tuple] = []
    for pair in report["pairs"]:
        a, b = pair["splits"]
        for item in pair["same_images"]["items"]:
            wanted.append(("same_images", a, b, item["id"], f"{a}+{b}", item["id"], None))
        for check, key_name in (("patients", "patient"), ("studies", "study_instance_uid")):
            for item in pair[check]["items"]:
                for split in (a, b):
                    wanted += [(check, a, b, item[key_name], split, i, None) for i in item["images"][split]]
        for check in ("exact_duplicates", "near_duplicates"):
            for number, item in enumerate(pair.get(check, {"items": []})["items"], start=1):
                score = item.get("similarity")
                key = f"pair {number}" + (f" ({item['relation']})" if item.get("relation") else "")
                wanted += [(check, a, b, key, split, i, score) for i, split in zip(item["ids"], item["splits"])]
    rows = reader.rows(sorted({w[5] for w in wanted}))
    out = []
    for check, a, b, key, split, row_id, score in wanted:
        row = rows.get(row_id, {})
        out.append([check, a, b, key, split, row_id, row.get("path"), row.get("frame"),
                    score])
    return out


# ---------------------------------------------------------------- mi export
@click.command(context_settings=CONTEXT)
@click.argument("query", nargs=-1)
@INDEX_OPTION
@click.option("--ids", help="Comma-separated image ids (the `id` of mi-search --json and of the reports).")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A report of mi duplicates, mi leakage or mi outliers (--json) whose images to export.")
@click.option("--cluster", type=click.IntRange(min=1), help="With a duplicate report: only this cluster.")
@click.option("-k", "--top", "k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Search hits exported for a QUERY.")
@click.option("--modality", help="QUERY: only this DICOM Modality.")
@model_option("QUERY: model folder or Hugging Face id.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "ohif", "wado"]), default="csv", show_default=True,
              help="csv / json rows; ohif: a DICOM JSON manifest for OHIF's dicomjson data source; wado: WADO-RS URLs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
@click.option("--url-prefix", help="ohif, local files: the web address that serves --root.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="ohif, local files: the folder --url-prefix serves. [default: the files' common folder]")
def export(query: tuple[str, ...], index_dir: Path | None, ids: str | None, report_file: Path | None,
           cluster: int | None, k: int, modality: str | None, model: str | None, fmt: str, output: Path | None,
           url_prefix: str | None, root: Path | None) -> None:
    """Export images as CSV, JSON, WADO-RS URLs or an OHIF DICOM JSON manifest: the hits of a
    QUERY (mi-search's syntax), a report of mi duplicates / leakage / outliers, or --ids."""
    from . import export as exporting

    if sum(bool(x) for x in (query, ids, report_file)) != 1:
        raise click.UsageError("give one selection: a QUERY, --ids or --report")
    with one_line_errors():
        if query:
            from ..search import Searcher

            with Searcher(index=index_dir, model=model) as searcher:
                hits = searcher.search(list(query), k=k, modality=modality)
            selection = [(hit.id, hit.score, f"rank {hit.rank}") for hit in hits]
        elif ids:
            try:
                selection = [(int(i), None, None) for i in ids.split(",") if i.strip()]
            except ValueError:
                raise click.BadParameter(f"--ids takes comma-separated numbers, not {ids!r}") from None
        else:
            try:
                report = json.loads(report_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise exporting.ExportError(f"{report_file} is not a JSON report: {e}") from None
            selection = exporting.selection_from_report(report, cluster)
        with reader_of(index_dir) as reader:
            rows = exporting.rows_of(reader, selection)
        if fmt == "csv":
            text_out = exporting.csv_text(rows)
        elif fmt == "json":
            text_out = exporting.dumps(rows) + "\n"
        elif fmt == "wado":
            text_out = "".join(url + "\n" for url in exporting.wado_urls(rows))
        else:
            text_out = exporting.dumps(exporting.ohif_manifest(rows, url_prefix, str(root) if root else None)) + "\n"
        if output:
            output.write_text(text_out, encoding="utf-8", errors="surrogateescape")
            click.echo(f"{len(rows)} images written to {shown(output)}", err=True)
        else:
            click.echo(text_out, nl=False)


# ---------------------------------------------------------------- mi outliers
@click.command(context_settings=CONTEXT)
@INDEX_OPTION
@click.option("--by", type=click.Choice(["folder", "modality", "body_part", "view"]),
              help="Also judge each image against its group.")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True, help="Neighbours per image.")
@click.option("-n", "--top", "top", type=click.IntRange(min=1), default=20, show_default=True, help="Outliers listed.")
@JSON_OPTION
@CSV_OPTION
def outliers(index_dir: Path | None, by: str | None, k: int, top: int, as_json: bool, csv_file: Path | None) -> None:
    """Images unlike their group (--by) or unlike anything in the index, most unusual first,
    each with a score (robust z: MADs below the median), the reason and nearest neighbours."""
    from .outliers import find_outliers

    with one_line_errors(), reader_of(index_dir) as reader:
        report = find_outliers(reader, by=by, k=k, top=top)
    if csv_file:
        write_csv(csv_file, ["rank", "id", "path", "frame", "score", "reason", "group", "neighbours"],
                  [[rank, o["id"], o["path"], o["frame"], o["score"], o["reason"], o["group"],
                    " ".join(str(n["id"]) for n in o["neighbours"])]
                   for rank, o in enumerate(report["outliers"], start=1)])
    if as_json:
        echo_json(report)
        return
    for rank, o in enumerate(report["outliers"], start=1):
        click.echo(f"{rank:>3}  {o['score']:>6.2f}  {shown(o['path'])}" + (f" (frame {o['frame']})" if o["frame"] else ""))
        click.echo(f"          {shown(o['reason'])}; nearest: " +
                   ", ".join(shown(os.path.basename(n["path"])) for n in o["neighbours"]))


# ---------------------------------------------------------------- mi evaluate
@click.command(context_settings=CONTEXT)
@INDEX_OPTION
@click.option("--labels", "labels_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV: a `path` or `sop_instance_uid` column and a `label` or `labels` column "
                   "(several labels separated by ';', or one row per label).")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Neighbours: precision@k and the kNN vote.")
@click.option("--zero-shot", is_flag=True, help="Also zero-shot AUC from a prompt per label (loads the text tower).")
@click.option("--prompt", metavar="TEMPLATE", help="Zero-shot prompt with {label}, e.g. \"a chest x-ray showing "
                                                  "{label}\" (implies --zero-shot). [default: {label}]")
@model_option("Zero-shot: model folder or Hugging Face id. [default: the index's model]")
@click.option("--max-queries", type=click.IntRange(min=1), help="Query with a seeded sample of this many images.")
@JSON_OPTION
def evaluate(index_dir: Path | None, labels_file: Path, k: int, zero_shot: bool, prompt: str | None,
             model: str | None, max_queries: int | None, as_json: bool) -> None:
    """How well the embeddings separate labelled images: image-to-image retrieval (precision@k,
    mAP per label), kNN classification (accuracy, macro AUC) with each query's own patient and
    study left out of its neighbours, and with --zero-shot / --prompt the zero-shot AUC per label."""
    from .evaluate import evaluate as run_evaluation
    from .labelled import read_labels

    template = prompt or "{label}"
    with one_line_errors(), reader_of(index_dir) as reader:
        if "{label}" not in template:
            raise click.BadParameter(f"the prompt needs {{label}} where the label goes, not {template!r}",
                                     param_hint="--prompt")
        labels = read_labels(reader, labels_file)
        searcher = None
        if zero_shot or prompt:
            from ..search import Searcher

            searcher = Searcher(index=reader.folder, model=model)
        encode = _text_encoder(searcher) if searcher is not None else None
        try:
            report = run_evaluation(reader, labels, k=k, max_queries=max_queries, zero_shot=encode, prompt=template)
        finally:
            if searcher is not None:
                searcher.close()
    if as_json:
        echo_json(report)
        return

    def number(value: float | None) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    click.echo(f"{report['labelled_images']} labelled images, {len(report['labels'])} labels, "
               f"{report['queries']} queries{' (sampled)' if report['sampled_queries'] else ''}, k={report['k']}; "
               f"neighbours exclude the query's own file, patient and study.")
    for note in report["notes"]:
        click.echo(f"Note: {shown(note)}.")
    if report["without_patient"] or report["without_study"]:
        click.echo(f"Note: {report['without_patient']} images have no patient pseudonym and "
                   f"{report['without_study']} no study UID: for them that exclusion cannot apply.")
    zero = report["zero_shot"] is not None
    click.echo(f"{'label':<24} {'images':>7} {'P@k':>6} {'AP':>6} {'kNN AUC':>7}"
               + (f" {'0-shot AUC':>10}" if zero else ""))
    for e in report["per_label"]:
        click.echo(f"{shown(e['label'])[:24]:<24} {e['images']:>7} {number(e['precision_at_k'])} "
                   f"{number(e['average_precision'])} {number(e['knn_auc']):>7}"
                   + (f" {number(e.get('zero_shot_auc')):>10}" if zero else ""))
    r, knn = report["retrieval"], report["knn"]
    click.echo(f"retrieval: precision@{report['k']} {number(r['precision_at_k']).strip()}, "
               f"mAP {number(r['map']).strip()}")
    click.echo(f"kNN classification: accuracy {number(knn['accuracy']).strip()}, "
               f"macro AUC {number(knn['macro_auc']).strip()}")
    if zero:
        z = report["zero_shot"]
        click.echo(f"zero-shot ({shown(z['prompt'])}): accuracy {number(z['accuracy']).strip()}, "
                   f"macro AUC {number(z['macro_auc']).strip()}")


def _text_encoder(searcher) -> Callable[[list[str]], tuple[Any, float]]:
    """texts -> (unit vectors, logit scale) through the searcher's text tower (loaded on first use
    and checked against the index's model)."""
    def encode(texts: list[str]) -> tuple[Any, float]:
        tower = searcher.encoder("text")
        return tower.encode_texts(texts), float(tower.logit_scale)
    return encode


# ---------------------------------------------------------------- mi map
@click.command("map", context_settings=CONTEXT)
@INDEX_OPTION
@click.option("--method", type=click.Choice(["tsne", "pca"]),
              help="tsne (openTSNE, the `curate` extra) or pca. [default: tsne when openTSNE is installed]")
@click.option("--refit", is_flag=True, help="Lay every image out again (else new images are placed into the map).")
@click.option("--png", "png_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the map to this PNG file, coloured by modality.")
@JSON_OPTION
def map_command(index_dir: Path | None, method: str | None, refit: bool, png_file: Path | None,
                as_json: bool) -> None:
    """A 2D map of every image (PCA to 50 dimensions, then t-SNE), stored in the index folder
    as map.g<generation>.npz. Images added since are placed into the existing map (the points
    already there stay put), removed ones dropped; a refit happens with --refit, when the method
    changes, or when the images added since the last fit exceed a quarter of those it was fitted on."""
    from .imagemap import build_map, draw_png

    with one_line_errors(), reader_of(index_dir) as reader:
        summary = build_map(reader, method=method, refit=refit)
        if png_file:
            summary["modalities"] = draw_png(reader, png_file)
            summary["png"] = str(png_file)
    if as_json:
        echo_json(summary)
        return
    how = f"refitted ({summary['refit_reason']})" if summary["refit"] else \
        f"{summary['placed']} placed, {summary['removed']} removed"
    click.echo(f"map of {summary['points']} images ({summary['method']}, generation {summary['generation']}): "
               f"{how}, {summary['seconds']:.1f} s; {summary['file']}" +
               (f"; drawn to {shown(png_file)}" if png_file else ""))
