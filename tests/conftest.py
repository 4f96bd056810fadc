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


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A small archive of real DICOM and PNG files and its index (tiny model), per test module."""
    from servers import build_archive
    return build_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def served(archive):
    """A real mi-serve process over the module's archive."""
    from servers import start_server, stop_server
    served = start_server(archive["index"])
    yield served
    stop_server(served.process)
