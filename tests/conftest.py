"""Settings shared by every test."""
from __future__ import annotations

import os
import secrets

import pytest


@pytest.fixture(autouse=True, scope="session")
def patient_key_outside_the_home_folder(tmp_path_factory):
    """Pseudonym keys live in the user's config folder by default; tests keep theirs in a temporary
    file (subprocesses inherit the variable)."""
    key_file = tmp_path_factory.mktemp("config") / "patient.key"
    key_file.write_text(secrets.token_hex(32))
    os.environ["MI_PATIENT_KEY_FILE"] = str(key_file)
    yield key_file
    os.environ.pop("MI_PATIENT_KEY_FILE", None)
