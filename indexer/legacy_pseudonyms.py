"""Pseudonyms of indexes made before keyed pseudonyms (schema 1-2), so that a patient keeps one.

Those indexes hashed PatientID with a salt kept in the index: sha256(salt NUL id). Migration 3
keyed each old hash (HMAC under the patient key) and, before this module, deleted the salt:
a newly indexed image, keyed from the ID itself, then got another pseudonym than the migrated
images of its patient. The salt is now kept, encrypted under the patient key (XOR with a keyed
mask), and a migrated index's new images are pseudonymised the same way as its old ones:
HMAC(key, sha256(salt NUL id)). Without the key the stored salt is noise; with the key, nothing
more can be learnt from it than from the key itself.
"""
from __future__ import annotations

import hashlib
import hmac

_MASK_MESSAGE = b"medimageinsight-search legacy salt mask"


class PatientKey(bytes):
    """A patient key (bytes, as before) that knows the salt of a migrated index, if any."""

    legacy_salt: str | None

    def __new__(cls, key: bytes, legacy_salt: str | None = None) -> PatientKey:
        self = super().__new__(cls, key)
        self.legacy_salt = legacy_salt
        return self

    def __reduce__(self):  # to decoding worker processes and Ray actors, salt included
        return (PatientKey, (bytes(self), self.legacy_salt))


def legacy_hash(patient_id: str, salt: str) -> str:
    """The salted hash schema 1-2 stored for a PatientID."""
    return hashlib.sha256((salt + "\x00" + patient_id).encode("utf-8")).hexdigest()[:32]


def _mask(key: bytes, length: int) -> bytes:
    return hmac.new(bytes(key), _MASK_MESSAGE, hashlib.sha512).digest()[:length]


def seal_salt(salt: str, key: bytes) -> str:
    """The salt encrypted under `key` (hex), as the migrated index keeps it."""
    raw = salt.encode("utf-8")
    if len(raw) > 64:
        raise ValueError("a legacy salt is at most 64 bytes")
    return bytes(a ^ b for a, b in zip(raw, _mask(key, len(raw)))).hex()


def open_salt(sealed: str, key: bytes) -> str:
    raw = bytes.fromhex(sealed)
    return bytes(a ^ b for a, b in zip(raw, _mask(key, len(raw)))).decode("utf-8")
