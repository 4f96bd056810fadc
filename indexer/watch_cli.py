"""`mi-index DIR --watch` on a terminal: one line per pass (or one JSON object per pass with
--json), SIGINT and SIGTERM ending the watch between batches."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from .terminal import visible


def watch(files: tuple[Path, ...], index_dir: Path, model: str | None, options: Any, as_json: bool) -> None:
    from .watch import Pass, watch_paths

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

    def report(done: Pass) -> None:
        if as_json:
            row = {"changed": done.changed, "error": done.error, **(done.summary or {})}
            click.echo(json.dumps(row))
        else:
            click.echo(visible(_line(done), markup=False))
        sys.stdout.flush()
        if done.changed == 0 and not as_json:
            click.echo(f"watching {visible(', '.join(map(str, files)), markup=False)} (Ctrl-C stops)", err=True)

    try:
        watch_paths(files, index_dir, model=model, options=options, stop=stop, on_pass=report)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped: the index holds every pass that finished", err=True)


def _line(done: Any) -> str:
    when = time.strftime("%H:%M:%S")
    what = "first pass" if done.changed == 0 else f"{done.changed} changed"
    if done.error:
        return f"{when} {what}: {done.error}"
    s = done.summary
    return (f"{when} {what}: {s['new']} new, {s['updated']} updated, {s['removed']} removed, "
            f"{s['skipped']} skipped; {s['images']} images")
