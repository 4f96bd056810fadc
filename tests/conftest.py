"""Settings shared by every test."""
from __future__ import annotations

import os
import secrets

import pytest

# One OpenMP thread in the test process, as in the commands it starts (servers.command_env): on 2
# cores shared with those commands (and a server or two), two PyTorch/FAISS threads spin-wait for
# each other. Measured under load, 24 images indexed in this process: 52 s with 2 threads, 8 s with 1.
# Set before anything imports torch; a value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
