"""`mi-index`: index folders of X-rays and DICOM files, incrementally and crash-safely."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .terminal import DEVICE_OPTION_HELP, check_device, console_script

EPILOG = """\b
Examples:
  mi-index ./xrays                         index a folder (again: only what changed)
  mi-index ./xrays ./more/case1.dcm        several folders and files into one index
  mi-index /archive --index /data/idx --device cuda --batch-size 128 --workers 12
  mi-index ./xrays --json                  the summary as one JSON object

\b
Files: PNG, JPEG, TIFF, BMP (8/16-bit grey, RGB) and DICOM (by extension or its DICM
preamble; uncompressed, JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE). Hidden files and
folders are left out. A file that cannot be read is skipped with its reason and retried
once it changes. Unchanged files (same size and mtime) are not opened again; renamed or
copied files reuse their stored vectors. Killing mi-index loses at most the batch in flight.
"""


def _user_index_dir() -> str:
    import platformdirs
    return str(Path(platformdirs.user_data_dir("medimageinsight-search")) / "index")


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--index", "index_dir", envvar="MI_INDEX", type=click.Path(file_okay=False, path_type=Path),
              help=f"Index folder. [default: MI_INDEX, else {_user_index_dir()}]")
@click.option("--model", metavar="SRC", envvar="MI_MODEL",
              help="Model folder or Hugging Face id. [default: MI_MODEL, else the index's model, "
                   "else lion-ai/MedImageInsights]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per model call. [default: 64 on CUDA, 8 on CPU]")
@click.option("--workers", type=click.IntRange(min=0), help="Decoding processes (0: in this process). "
                                                             "[default: cores - 1, at most 8]")
@click.option("--device", metavar="DEVICE", callback=check_device, help=DEVICE_OPTION_HELP)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="[default: float32 on CPU (exact), bfloat16 on CUDA; bfloat16 is 2.5x faster on CPUs with AMX]")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Skip larger images (decompression bombs).")
@click.option("--frames", type=click.Choice(["middle", "all"]), default="middle", show_default=True,
              help="Multi-frame files: the middle frame, or every frame.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-index")
def main(paths: tuple[Path, ...], index_dir: Path | None, model: str | None, batch_size: int | None,
         workers: int | None, device: str | None, dtype: str | None, max_megapixels: float, frames: str,
         as_json: bool) -> None:
    """Index PATHS (folders, walked recursively, or files) for mi-search."""
    from rich.console import Console

    from . import index_paths
    from .store import default_index_dir
    from .terminal import ProgressBar, is_user_error

    err = Console(stderr=True)
    index_dir = index_dir or default_index_dir()
    try:
        with ProgressBar(err, enabled=err.is_terminal and not as_json) as update:
            summary = index_paths(paths, index_dir, model=model, batch_size=batch_size, workers=workers,
                                  device=device, dtype=dtype, max_megapixels=max_megapixels, frames=frames,
                                  progress=update)
    except KeyboardInterrupt:
        err.print("interrupted: what was committed stays; run mi-index again to finish")
        sys.exit(130)
    except Exception as e:
        if not is_user_error(e):
            raise
        from .terminal import visible
        raise click.ClickException(visible(" ".join(str(e).split()), markup=False)) from None
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_summary(Console(), summary)


def entry() -> None:
    """The `mi-index` console script."""
    console_script(main)


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    from .terminal import visible

    table = Table(title=f"index {visible(summary['index'])}", show_header=False, box=None)
    for key in ("new", "updated", "unchanged", "removed", "skipped"):
        table.add_row(key, str(summary[key]))
    if summary["still_skipped"]:
        table.add_row("", f"(and {summary['still_skipped']} unchanged files skipped before)")
    table.add_row("encoded", f"{summary['encoded']} images ({summary['reused']} files reused stored vectors)")
    table.add_row("in index", f"{summary['images']} images")
    seconds = summary["seconds"]
    rate = summary["encoded"] / seconds["total"] if seconds.get("total") else 0
    table.add_row("time", f"{seconds.get('total', 0):.1f} s ({rate:.1f} images/s)")
    console.print(table)
    if summary["skipped_files"]:
        from collections import Counter
        reasons = Table("skipped", "reason", title="skipped files (retried when they change)")
        for reason, count in Counter(row["reason"] for row in summary["skipped_files"]).most_common():
            reasons.add_row(str(count), visible(reason))
        console.print(reasons)
        skipped = Table("file", "reason")
        skipped.columns[0].overflow = "fold"  # paths are what the user acts on: wrapped, never cut
        for row in summary["skipped_files"][:50]:
            skipped.add_row(visible(row["path"]), visible(row["reason"]))
        console.print(skipped)
        if len(summary["skipped_files"]) > 50:
            console.print(f"... and {len(summary['skipped_files']) - 50} more (mi-index --json lists them all)")
