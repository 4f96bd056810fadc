"""Which model a command uses: one rule for mi-index, mi-search and the APIs, in a module that
imports nothing heavy (a cold query must not pay for PyTorch before it needs it)."""
from __future__ import annotations

import os

from encoders.defaults import named_model


def chosen_model_source(explicit: str | os.PathLike | None, recorded: str | None = None) -> str | None:
    """The model given explicitly (--model, model=), else MI_MODEL, else the one the index
    recorded, else None: the encoder's default (lion-ai/MedImageInsights)."""
    return named_model(explicit) or recorded or None


def named_model_source(explicit: str | os.PathLike | None) -> str | None:
    """The model the user named (explicitly or by MI_MODEL), if any: it must match the index's
    even when nothing needs encoding."""
    return named_model(explicit)
