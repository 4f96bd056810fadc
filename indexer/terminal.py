"""What both command lines print, and how: user strings made safe for a terminal, and paths
written byte-exact where a program reads them.

A file name is data, never markup or terminal control: `[bold red]x.png` must show as typed,
`[/x]` must not crash rich, and an ESC in a name must not clear the screen or retitle the
window. Names that are not valid UTF-8 (legal on Linux) arrive as surrogate escapes."""
from __future__ import annotations

import os
import sys
import unicodedata


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
