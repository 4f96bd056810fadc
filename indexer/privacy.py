"""Patient pseudonyms: a keyed hash of PatientID whose key never enters the index.

Threat model. The index folder holds no names, birth dates or IDs. To let a researcher group
images by patient (and exclude a query's own patient), it holds a pseudonym per image:
HMAC-SHA256(key, PatientID), truncated to 128 bits. The key lives outside the index: in the
user's config folder (`patient.key`, created 0600 on first use) or in the file named by
MI_PATIENT_KEY_FILE (to share one key across a team's indexes, or keep it on other storage).
A person holding only the index folder can tell which images belong to the same patient, but
cannot test guesses of an ID: without the key every guess costs a brute force of a 256-bit
key. (A salt stored in the index, as before, let an 8-digit ID be recovered in seconds.) A
person holding the index *and* the key can confirm a guessed ID, so keep the key like the
archive itself. Losing the key loses nothing but the link between images indexed before and
after it (an index refuses a different key rather than mixing the two).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "MI_PATIENT_KEY_FILE"
_KEY_ID_MESSAGE = b"medimageinsight-search patient key id"


class PatientKeyError(Exception):
    """The pseudonym key cannot be read or created; the message says where and why."""


def key_path() -> Path:
    """MI_PATIENT_KEY_FILE, else patient.key in the per-user config folder."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    import platformdirs
    return Path(platformdirs.user_config_dir("medimageinsight-search")) / "patient.key"


def patient_key(create: bool = True) -> bytes:
    """The key, created (32 random bytes, hex, mode 0600) the first time it is needed; not
    `create`: PatientKeyError where there is none (a search never makes one)."""
    path = key_path()
    try:
        if not path.exists():
            if not create:
                raise PatientKeyError(f"no patient key at {path}: set {KEY_ENV} to the file of the key the index "
                                      f"was built with")
            if os.environ.get(KEY_ENV):
                raise PatientKeyError(f"no patient key file at {path} ({KEY_ENV}): create one with "
                                      f"`python -c \"import secrets; print(secrets.token_hex(32))\" > {path}`")
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        key = path.read_bytes().strip()
    except FileExistsError:  # another process created it meanwhile
        key = path.read_bytes().strip()
    except OSError as e:
        raise PatientKeyError(f"cannot read or create the patient key {path}: {e.strerror or e}; set "
                              f"{KEY_ENV} to a file you can read") from None
    if len(key) < 16:
        raise PatientKeyError(f"the patient key {path} is too short: use at least 16 random bytes")
    return key


def key_id(key: bytes) -> str:
    """Names a key without revealing it: which key an index's pseudonyms were made with."""
    return hmac.new(key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def pseudonym(patient_id: str | None, key: bytes) -> str | None:
    """The pseudonym of a PatientID (None for none): the same for every image of one patient
    under one key, and useless for testing guessed IDs without the key."""
    if not patient_id:
        return None
    salt = getattr(key, "legacy_salt", None)
    if salt is not None:  # an index migrated from salted hashes: as its migrated images were keyed
        from .legacy_pseudonyms import legacy_hash
        patient_id = legacy_hash(patient_id, salt)
    return hmac.new(bytes(key), patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
