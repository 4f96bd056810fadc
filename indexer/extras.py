"""Optional dependencies (the `pacs` and `ray` extras): imported on demand, and when one is missing
a one-line error naming the extra to install, never a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MIError

PACKAGE = "medimageinsight-search"


class MissingExtraError(MIError):
    """An optional dependency of what was asked is not installed; the message names the extra."""


def require(extra: str, module: str, needed_for: str) -> ModuleType:
    """`module`, imported; MissingExtraError naming `extra` when it (or one of its own imports) is
    missing. `needed_for`: what asked for it, as the message's subject ("indexing a PACS")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError, and a broken install of it
        missing = getattr(e, "name", None) or module
        raise MissingExtraError(f'{needed_for} needs the {extra} extra ({missing} is not installed): '
                                f'pip install "{PACKAGE}[{extra}]"') from None
