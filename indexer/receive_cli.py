"""`mi receive` / `mi-receive`: the DICOM receiver as a service of its own (see indexer.receive):
modalities and the PACS send with C-STORE, each instance is kept under
--store and searchable within seconds; mi-serve goes on answering searches from the same index
(the index has one writer, the receiver, and any number of readers)."""
from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from .terminal import device_option, index_option, is_user_error, model_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog="""\b
Examples:
  mi receive --store /data/received
                          listen on 127.0.0.1:11112 as AE MI, index into the default index
  mi receive --store /data/received --host 0.0.0.0 --allow PACS@10.0.0.5 --allow CT1@10.0.0.7
                          reachable from the hospital network: only these callers
  mi receive --store /data/received --host 0.0.0.0 --allow-file callers.txt \\
             --tls-cert node.pem --tls-key node.key --tls-ca hospital-ca.pem
""")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to keep the received instances in: STORE/<Study UID>/<Series UID>/<SOP UID>.dcm. "
                   "They hold PHI, as any PACS's files do.")
@index_option()
@model_option()
@device_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires --allow or --allow-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True,
              help="TCP port (0: a free one, printed).")
@click.option("--ae-title", default="MI", show_default=True, help="This node's AE title (the called AE title).")
@click.option("--allow", "allow", multiple=True, metavar="AET@HOST",
              help="A caller that may send: its AE title at its host (a name or address), or an AE title alone "
                   "(from any host). Repeatable. [default: any caller]")
@click.option("--allow-file", "allow_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A file of callers that may send, one AET@HOST a line (# starts a comment).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), help="TLS certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="Its private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificates (PEM): callers must present a certificate they signed.")
@click.option("--batch-seconds", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Index what arrived at most this long after it arrived, even mid-association.")
@click.option("--batch-files", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Index as soon as this many instances wait.")
@click.option("--workers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Decoding processes per batch (0: in the receiver's process).")
@click.version_option(package_name="medimageinsight-search", prog_name="mi-receive")
def main(store_dir: Path, index_dir: Path | None, model: str | None, device: str | None, host: str, port: int,
         ae_title: str, allow: tuple[str, ...], allow_files: tuple[Path, ...], tls_cert: Path | None,
         tls_key: Path | None, tls_ca: Path | None, batch_seconds: float, batch_files: int, workers: int) -> None:
    """Receive DICOM images (a C-STORE SCP) and index them as they arrive.

    Accepts CR, DX, mammography, CT, MR, ultrasound and secondary capture images in every
    transfer syntax the indexer decodes, kept as sent. At start-up, whatever STORE holds but the
    index lacks is indexed. Stop with SIGTERM or Ctrl-C: what arrived is indexed first.
    """
    if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key (and --tls-ca only with them)")
    _log_to_stderr()
    try:
        receiving = _start(store_dir, index_dir, model, device, host, port, ae_title, allow, allow_files,
                           tls_cert, tls_key, tls_ca, batch_seconds, batch_files, workers)
    except Exception as e:
        if is_user_error(e):
            from .errors import one_line
            raise click.ClickException(one_line(e)) from None
        raise
    receiver, indexer = receiving
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    receiver.stop()
    indexer.stop()
    logging.getLogger("indexer.receive").info("stopped")


def _start(store_dir, index_dir, model_arg, device, host, port, ae_title, allow, allow_files, tls_cert, tls_key,
           tls_ca, batch_seconds, batch_files, workers):
    from . import IndexOptions
    from .receive import ArrivalIndexer, InstanceFolder
    from .location import default_index_dir
    from .receive import Receiver, ReceiverError, allowed_callers, tls_context

    allowed = allowed_callers(allow, allow_files) or None
    if allowed is None and not _is_loopback(host):
        raise ReceiverError(f"listening on {host} (beyond this machine) needs --allow or --allow-file: "
                            f"the AE titles and hosts that may send")
    context = tls_context(tls_cert, tls_key, tls_ca) if tls_cert is not None else None
    index_dir = Path(index_dir or default_index_dir()).expanduser().resolve()
    store_dir = store_dir.expanduser().resolve()
    if index_dir == store_dir or store_dir in index_dir.parents:
        raise ReceiverError(f"--store {store_dir} must not hold the index folder {index_dir}")
    folder = InstanceFolder(store_dir)
    try:
        folder.create()
    except OSError as e:
        raise ReceiverError(f"cannot make the store folder {store_dir}: {e.strerror or e}") from None
    encoder = _load_model(model_arg, device, index_dir)
    indexer = ArrivalIndexer(folder, index_dir, encoder, IndexOptions(workers=workers, device=device),
                             batch_files=batch_files, batch_seconds=batch_seconds)
    receiver = Receiver(folder, ae_title=ae_title, arrived=indexer.arrived, ended=indexer.association_ended,
                        allowed=allowed, ssl_context=context)
    bound_host, bound_port = receiver.start(host, port)
    indexer.start(initial_pass=True)
    who = "callers on the allow list" if allowed else "any caller"
    logging.getLogger("indexer.receive").info(
        "receiving on %s:%d as AE %s (%s%s), storing in %s, indexing into %s", bound_host, bound_port, ae_title,
        who, ", TLS" if context else "", store_dir, index_dir)
    return receiver, indexer


def _load_model(model_arg, device, index_dir: Path):
    """The image tower, loaded once; checked against the index's model when there is an index."""
    from encoders import load_model

    from .model_choice import chosen_model_source
    from .store import DB_NAME, IndexStore

    recorded = None
    if (index_dir / DB_NAME).exists():
        with IndexStore.open(index_dir, readonly=True) as store:
            recorded = (store.model_info or {}).get("source")
            encoder = load_model(chosen_model_source(model_arg, recorded), device=device, towers=("image",))
            if store.model_info is not None:
                store.check_model(encoder.fingerprint, encoder.dim, encoder.source)
            return encoder
    return load_model(chosen_model_source(model_arg, recorded), device=device, towers=("image",))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _log_to_stderr() -> None:
    """One line per event on stderr (a service manager's journal): ours at INFO, pynetdicom's
    warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name, level in (("indexer", logging.INFO), ("pynetdicom", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False


def entry() -> None:
    """The `mi-receive` console script."""
    main()


if __name__ == "__main__":
    main()
