"""`mi-serve`: the warm search server and its web page (see retrieval.server)."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import click

from indexer.terminal import device_option, index_option, model_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  mi-serve                         the default index, http://127.0.0.1:8765/
  mi-serve --index /data/idx --port 9000
  mi-serve --host 0.0.0.0 --token "$TOKEN"
                                   reachable from other machines: with a token
""")
@index_option()
@model_option()
@device_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--token", envvar="MI_SERVER_TOKEN", help="Token every request must carry (Authorization: Bearer). "
                                                        "[default: none on loopback, else generated and printed]")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-serve")
def main(index_dir: Path | None, model: str | None, device: str | None, host: str, port: int,
         token: str | None) -> None:
    """Serve an index: a JSON API (OpenAPI docs at /docs) and a web page to search it.

    While it runs, mi-search on the same index asks it (warm: no model loading) unless given
    --no-server; the server announces itself in INDEX/server.json (mode 0600: it holds the
    token), removed when it stops. --port 0 takes a free port.
    """
    import uvicorn

    from indexer.errors import one_line
    from indexer.location import default_index_dir

    from .discovery import ServerInfo, ServerRunningError, claim_server_file, remove_server_file
    from .server import create_app, is_loopback
    from .server.app import check_model_source

    made_token = not is_loopback(host) and not token
    if made_token:
        token = secrets.token_urlsafe(24)
        click.echo(f"listening beyond this machine: every request needs the token {token}", err=True)
    index_dir = (index_dir or default_index_dir()).expanduser().resolve()
    listener = _listen(host, port)  # before anything slow: a port in use is one line at once
    port = listener.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    announced = False
    if index_dir.is_dir():  # a missing index is served (the page says so) but not announced in it
        try:
            claim_server_file(index_dir, ServerInfo(url=url, token=token, pid=os.getpid(),
                                                    host=socket.gethostname(), index=str(index_dir)))
            announced = True
        except ServerRunningError as error:  # two servers of one index: mi-search would find only one
            listener.close()
            raise click.ClickException(one_line(error)) from None
        except OSError:  # a read-only index: mi-search finds the server through MI_SERVER only
            pass
    try:  # a wrong --model is one line now, not a 500 at the first search
        check_model_source(index_dir, model)
    except Exception as error:  # noqa: BLE001 - the model's errors are not all MIErrors
        listener.close()
        if announced:
            remove_server_file(index_dir, os.getpid())
        raise click.ClickException(one_line(error)) from None
    app = create_app(index_dir, model=model, device=device, token=token, hosts=[host])
    # A token of the user's (--token, MI_SERVER_TOKEN) is never echoed: stderr ends up in logs.
    if token and not made_token:
        click.echo("every request needs the token given by --token or MI_SERVER_TOKEN", err=True)
    click.echo(f"serving {index_dir} on {url}/" + (f"?token={token}" if made_token else ""), err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # uvicorn shuts down cleanly on SIGTERM, then raises it again: exit, rather than die, then.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run(sockets=[listener])
    finally:
        if announced:
            remove_server_file(index_dir, os.getpid())


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it a kept-alive connection (a browser's) waited 40 ms for the client's delayed ACK
    # between a response's headers and its body (Nagle), on every request.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


def entry() -> None:
    """The `mi-serve` console script (no fast exit: the server shuts down cleanly)."""
    main()


if __name__ == "__main__":
    main()
