"""The command lines' plumbing: shared options, errors as one line, and output safe for a terminal.

mi-index, mi-search and mi-serve take --index, --model, --device and --json from here, and turn our typed
errors into one click error line with `one_line_errors`; the libraries never import this module. User strings
are made safe for a terminal, and paths written byte-exact where a program reads them.

A file name is data, never markup or terminal control: `[bold red]x.png` must show as typed,
`[/x]` must not crash rich, and an ESC in a name must not clear the screen or retitle the
window. Names that are not valid UTF-8 (legal on Linux) arrive as surrogate escapes."""
from __future__ import annotations

import functools
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from encoders.defaults import DEVICE_CHOICES, MODEL_ENV, device_name

from .errors import one_line
from .location import INDEX_ENV

DEVICE_OPTION_HELP = f"{DEVICE_CHOICES}. [default: cuda if available, else cpu]"
INDEX_HELP = "Index folder. [default: MI_INDEX, else the per-user folder mi-index uses]"
MODEL_HELP = "Model folder or Hugging Face id. [default: MI_MODEL, else the index's model]"


def index_option(help: str = INDEX_HELP) -> Callable:
    """--index (MI_INDEX), the index folder, as `index_dir`."""
    return click.option("--index", "index_dir", envvar=INDEX_ENV, type=click.Path(file_okay=False, path_type=Path),
                        help=help)


def model_option(help: str = MODEL_HELP) -> Callable:
    """--model (MI_MODEL): a model folder or Hugging Face id."""
    return click.option("--model", envvar=MODEL_ENV, metavar="SRC", help=help)


def device_option(command: Callable) -> Callable:
    """--device, checked before anything is loaded."""
    return click.option("--device", metavar="DEVICE", callback=check_device, help=DEVICE_OPTION_HELP)(command)


def json_option(help: str) -> Callable:
    """--json, as `as_json`."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def collected(name: str, build: Callable[..., object], *options: Callable) -> Callable:
    """Click options (top to bottom) whose values reach the command as one object: `build(**their values)`,
    passed as `name`; so that a command with many options takes a few grouped arguments."""
    holder: Callable = lambda: None  # noqa: E731 - collects the options' parameters
    for option in reversed(options):
        holder = option(holder)
    params = holder.__click_params__  # type: ignore[attr-defined]
    names = [param.name for param in params]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def grouped(*args: object, **values: object) -> object:
            mine = {key: values.pop(key) for key in names}
            return command(*args, **values, **{name: build(**mine)})
        grouped.__click_params__ = [*getattr(command, "__click_params__", []), *params]  # type: ignore[attr-defined]
        return grouped
    return decorate


@contextmanager
def one_line_errors(*kinds: type, message: Callable[[BaseException], str] = one_line) -> Iterator[None]:
    """Our typed errors (and `kinds`) raised inside become one click error line (`message(error)`, made
    visible); anything else, a bug, goes on as it is, traceback and all."""
    try:
        yield
    except Exception as error:
        if not is_user_error(error, *kinds):
            raise
        raise click.ClickException(visible(message(error), markup=False)) from None


def check_device(_context: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A click callback: --device is checked (`encoders.defaults.device_name`) before anything is
    loaded, PyTorch included."""
    if value is None:
        return None
    try:
        return device_name(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def visible(value: object, markup: bool = True) -> str:
    """`value` as text for a rich table or message: control characters and undecodable bytes
    shown as \\xNN / \\uNNNN escapes, everything else as it is; rich markup escaped unless
    `markup` is False (for plain text such as click's error line)."""
    from rich.markup import escape

    text = "" if value is None else str(value)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:                     # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")                            # so that the escapes stay unambiguous
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return escape("".join(out)) if markup else "".join(out)


def write_lines(lines: list[str], separator: bytes = b"\n") -> None:
    """Write lines to stdout as the bytes they stand for (file names included, byte for byte:
    no ANSI stripping, no re-encoding), each ended by `separator` (b"\\0" for --print0)."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    for line in lines:
        out.write(os.fsencode(line) + separator)
    out.flush()


def is_user_error(error: BaseException, *kinds: type) -> bool:
    """The typed errors of our libraries (and `kinds`), which a CLI prints as one line. Looked up
    in sys.modules, so that catching them imports nothing: an unchanged re-run of mi-index never
    loads the encoder (PyTorch, 2 s), and a module never imported cannot have raised."""
    for module, name in (("indexer.errors", "MIError"), ("encoders.checkpoint", "ModelError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            kinds += (getattr(loaded, name),)
    return isinstance(error, kinds)


def console_script(command: click.Command) -> None:
    """Run a click command as a console script, then leave without the interpreter's teardown:
    unloading PyTorch and freeing a gigabyte of weights costs 0.4 s of every cold query. Output
    is flushed first, and the commands close their index before returning."""
    try:
        command()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ProgressBar:
    """A rich progress bar (files done / total, images/s, ETA), fed by the pipeline's callback."""

    def __init__(self, console, enabled: bool):
        self.console, self.enabled = console, enabled
        self.bar = self.task = None

    def __enter__(self):
        if not self.enabled:
            return lambda done, total, encoded: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                            console=self.console)
        self.bar.start()
        self.task = self.bar.add_task("index", total=None, rate="")
        start = time.perf_counter()

        def update(done: int, total: int, encoded: int) -> None:
            rate = encoded / max(time.perf_counter() - start, 1e-9)
            self.bar.update(self.task, completed=done, total=total, rate=f"{rate:.1f} images/s")
        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
