"""`mi-serve`: the warm search server and its web page (see retrieval.server)."""
from __future__ import annotations

import secrets
from pathlib import Path

import click

from indexer.terminal import DEVICE_OPTION_HELP, check_device


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  mi-serve                                  the default index, on http://127.0.0.1:8765/
  mi-serve --index /data/idx --port 9000
  mi-serve --host 0.0.0.0 --token "$TOKEN"  reachable from other machines: a token is required
""")
@click.option("--index", "index_dir", envvar="MI_INDEX", type=click.Path(file_okay=False, path_type=Path),
              help="Index folder. [default: MI_INDEX, else the per-user folder mi-index uses]")
@click.option("--model", envvar="MI_MODEL", metavar="SRC", help="Model folder or Hugging Face id. "
                                                               "[default: MI_MODEL, else the index's model]")
@click.option("--device", metavar="DEVICE", callback=check_device, help=DEVICE_OPTION_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires a token.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--token", envvar="MI_SERVER_TOKEN", help="Token every request must carry (Authorization: Bearer). "
                                                        "[default: none on loopback, else generated and printed]")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-serve")
def main(index_dir: Path | None, model: str | None, device: str | None, host: str, port: int,
         token: str | None) -> None:
    """Serve an index: a JSON API (OpenAPI docs at /docs) and a web page to search it."""
    import uvicorn

    from indexer.store import default_index_dir

    from .server import create_app, is_loopback

    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
        click.echo(f"listening beyond this machine: every request needs the token {token}", err=True)
    index_dir = index_dir or default_index_dir()
    app = create_app(index_dir, model=model, device=device, token=token)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}/" + (f"?token={token}" if token else "")
    click.echo(f"serving {index_dir} on {where}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def entry() -> None:
    """The `mi-serve` console script (no fast exit: the server shuts down cleanly)."""
    main()
