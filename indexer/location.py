"""Where the index lives by default: one rule, in a module that imports nothing heavy (a
`mi-search` answered by a running server must not load SQLAlchemy to find its index)."""
from __future__ import annotations

import os
from pathlib import Path

INDEX_ENV = "MI_INDEX"


def default_index_dir() -> Path:
    """MI_INDEX if set, else the per-user data folder (e.g. ~/.local/share/medimageinsight-search/index)."""
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV]).expanduser()
    import platformdirs
    return Path(platformdirs.user_data_dir("medimageinsight-search")) / "index"
