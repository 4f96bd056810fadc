"""`mi`: one command with the others as subcommands (`mi index`, `mi search`), for those who
prefer a single entry point; `mi-index` and `mi-search` stay as they are."""
from __future__ import annotations

import json
from pathlib import Path

import click

from indexer.cli import main as index_command
from indexer.receive_cli import main as receive_command
from indexer.terminal import console_script, device_option, index_option, model_option

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
mi.add_command(receive_command, "receive")
mi.add_command(curate_cli.duplicates, "duplicates")
mi.add_command(curate_cli.leakage, "leakage")
mi.add_command(curate_cli.export, "export")
mi.add_command(curate_cli.outliers, "outliers")
mi.add_command(curate_cli.evaluate, "evaluate")
mi.add_command(curate_cli.map_command, "map")


@mi.command("doctor")
@click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Index folder to check. [default: MI_INDEX, else the per-user folder mi-index uses]")
@model_option("Model folder or Hugging Face id (never downloaded here). [default: MI_MODEL, else the index's model]")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {check, status, detail}.")
def doctor_command(index_dir: Path | None, model: str | None, as_json: bool) -> None:
    """Check this install as a whole: PyTorch and the device, the DICOM decoders, FAISS, the
    index, the model, and the real weights against their published outputs. One line per check
    (ok / warn / fail); the exit status is 1 when any check fails."""
    from indexer.terminal import visible

    from .doctor import failed, run_checks

    checks = run_checks(index_dir, model)
    if as_json:
        click.echo(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        width = max(len(check.check) for check in checks)
        for check in checks:
            click.echo(f"{check.status:<4}  {check.check:<{width}}  {visible(check.detail, markup=False)}")
    if failed(checks):
        raise SystemExit(1)


@mi.command("mcp")
@index_option()
@model_option()
@device_option
def mcp_command(index_dir: Path | None, model: str | None, device: str | None) -> None:
    """Serve an index to agents over the Model Context Protocol, on stdin and stdout: tools to
    search it by text, by an image's bytes or by an indexed image, and to read an image's fields,
    thumbnail and zero-shot labels. No tool takes a file path. Needs the `mcp` extra."""
    try:
        from .mcp_server import create_server
    except ImportError as error:
        if not (error.name or "").startswith("mcp"):
            raise
        raise click.ClickException(f"mi mcp needs the MCP SDK ({error.name or error}): "
                                   "pip install 'medimageinsight-search[mcp]'") from None
    create_server(index_dir, model=model, device=device).run("stdio")


def entry() -> None:
    """The `mi` console script."""
    console_script(mi)
