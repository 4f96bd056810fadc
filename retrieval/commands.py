"""`mi`: one command with the others as subcommands (`mi index`, `mi search`), for those who
prefer a single entry point; `mi-index` and `mi-search` stay as they are."""
from __future__ import annotations

import click

from indexer.cli import main as index_command
from indexer.terminal import console_script

from .cli import main as search_command
from .serve_cli import main as serve_command
from .curate import cli as curate_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medimageinsight-search", prog_name="mi")
def mi() -> None:
    """Medical image search: index folders of X-rays and DICOM files, search them by text or image."""


mi.add_command(index_command, "index")
mi.add_command(search_command, "search")
mi.add_command(serve_command, "serve")
mi.add_command(curate_cli.duplicates, "duplicates")
mi.add_command(curate_cli.leakage, "leakage")
mi.add_command(curate_cli.export, "export")
mi.add_command(curate_cli.outliers, "outliers")


def entry() -> None:
    """The `mi` console script."""
    console_script(mi)
