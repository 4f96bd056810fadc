"""The index database's schema, as numbered migrations applied in order (sqlite-utils' way):
`meta.schema_version` says how far a database is. A migration runs inside the transaction that
opens the database, so one killed halfway leaves nothing behind. Never edit a released one:
add the next."""
from __future__ import annotations

import secrets

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..errors import StoreError


def _m001_initial(conn: Connection) -> None:
    conn.execute(text("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"))
    conn.execute(text("""
        CREATE TABLE files (            -- every file seen under an indexed folder
            path TEXT PRIMARY KEY,      -- absolute, symlinks resolved
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            content_hash TEXT,
            error TEXT,                 -- NULL: indexed; else why the file was skipped
            indexed_at TEXT NOT NULL
        )"""))
    conn.execute(text("""
        CREATE TABLE images (           -- one row per indexed image (a DICOM frame, a TIFF page)
            id INTEGER PRIMARY KEY AUTOINCREMENT,   -- the FAISS id; never reused
            path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
            frame INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            width INTEGER, height INTEGER, source_format TEXT,
            sop_instance_uid TEXT, study_instance_uid TEXT, series_instance_uid TEXT,
            modality TEXT, body_part TEXT, view_position TEXT, study_date TEXT,
            series_description TEXT, patient_sex TEXT, patient_age TEXT,
            patient_hash TEXT,          -- pseudonym of PatientID (indexer.privacy); never names or birth dates
            embedding BLOB NOT NULL,    -- float32, L2-normalised (in embeddings.f16 since migration 8)
            UNIQUE (path, frame)
        )"""))
    conn.execute(text("CREATE INDEX images_by_hash ON images (content_hash)"))
    conn.execute(text("CREATE INDEX images_by_modality ON images (modality COLLATE NOCASE)"))
    conn.execute(text("CREATE INDEX images_by_study_date ON images (study_date)"))
    conn.execute(text("INSERT INTO meta VALUES ('generation', '0'), ('patient_salt', :salt)"),
                 {"salt": secrets.token_hex(16)})


def _m002_index_id(conn: Connection) -> None:
    # A random identity for the database: FAISS cache files carry it in their name, so a cache
    # left by another database in the same folder (moved away and rebuilt) is never taken for
    # this one's, whatever its generation number.
    conn.execute(text("INSERT OR IGNORE INTO meta VALUES ('index_id', :id)"), {"id": secrets.token_hex(8)})
    # Failures of a run rather than of the file (out of memory): tried again on the next run.
    conn.execute(text("ALTER TABLE files ADD COLUMN retry INTEGER NOT NULL DEFAULT 0"))


def _m003_keyed_patient_pseudonyms(conn: Connection) -> None:
    # PatientID was hashed with a salt stored in this database, so anyone holding the index could
    # test guessed IDs. Pseudonyms are now keyed with a key kept outside the index (see
    # indexer.privacy); the old hashes are keyed the same way (a patient's images stay grouped)
    # and the salt is deleted, its page overwritten.
    from ..privacy import PatientKeyError, key_id, patient_key, pseudonym

    conn.exec_driver_sql("PRAGMA secure_delete = ON")
    if conn.execute(text("SELECT count(*) FROM images WHERE patient_hash IS NOT NULL")).scalar():
        try:
            key = patient_key()
        except PatientKeyError as e:
            raise StoreError(str(e)) from None
        conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('patient_key_id', :k)"), {"k": key_id(key)})
        _keep_sealed_salt(conn, key)
        old = conn.execute(text("SELECT DISTINCT patient_hash FROM images WHERE patient_hash IS NOT NULL")).scalars()
        conn.execute(text("UPDATE images SET patient_hash = :new WHERE patient_hash = :old"),
                     [{"old": value, "new": pseudonym(value, key)} for value in old.all()])
    conn.execute(text("DELETE FROM meta WHERE key = 'patient_salt'"))


def _keep_sealed_salt(conn: Connection, key: bytes) -> None:
    # New images of a migrated index must get the pseudonyms its migrated images got: the salt
    # is kept for that, sealed under the key (indexer.legacy_pseudonyms). Added after release:
    # indexes migrated before it lost their salt, and cannot be helped.
    from ..legacy_pseudonyms import seal_salt

    salt = conn.execute(text("SELECT value FROM meta WHERE key = 'patient_salt'")).scalar()
    if salt:
        conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('patient_salt_sealed', :s)"),
                     {"s": seal_salt(salt, key)})


def _m004_roots(conn: Connection) -> None:
    # The folders and files given to mi-index, so that `mi-index --update` re-indexes them all
    # without naming them, --status lists them, and --remove takes one out.
    conn.execute(text("""
        CREATE TABLE roots (
            path TEXT PRIMARY KEY,      -- absolute, symlinks resolved, as given to mi-index
            last_indexed_at TEXT NOT NULL
        )"""))
    # Indexes made before: the folders can only be guessed, so none is; --status says so.


def _m005_excluded(conn: Connection) -> None:
    # Folders taken out with `mi-index --remove` that lie under a folder still indexed: the next
    # --update walks that folder again and must not put them back.
    conn.execute(text("""
        CREATE TABLE excluded (
            path TEXT PRIMARY KEY,      -- absolute, symlinks resolved, as given to --remove
            root TEXT NOT NULL          -- the indexed folder it lies under
        )"""))


def _m006_series(conn: Connection) -> None:
    # One vector per CT or MR series (indexer.store.series): the normalised mean of its slices,
    # kept up to date by every write; the partial index finds a series' slices without one
    # entry per image of other modalities.
    from .series import refresh_all_series

    conn.execute(text("""
        CREATE TABLE series (
            series_instance_uid TEXT PRIMARY KEY,
            study_instance_uid TEXT,
            modality TEXT,
            slices INTEGER NOT NULL,    -- its CT/MR images in the index
            representative INTEGER NOT NULL,  -- images.id of the slice nearest the mean
            embedding BLOB NOT NULL     -- float32, L2-normalised mean of the slices' embeddings
        )"""))
    conn.execute(text("CREATE INDEX images_by_series ON images (series_instance_uid) "
                      "WHERE modality IN ('CT', 'MR') AND series_instance_uid IS NOT NULL"))
    refresh_all_series(conn, lambda ids: _blob_vectors(conn, ids))


def _blob_vectors(conn: Connection, ids) -> np.ndarray:
    # The vectors as migrations 1-7 kept them: float32 blobs in images.embedding.
    raw = conn.connection.driver_connection
    found = dict(raw.execute(f"SELECT id, embedding FROM images WHERE id IN ({','.join(map(str, map(int, ids)))})"))
    return np.stack([np.frombuffer(found[int(i)], np.float32) for i in ids])


def _m007_facet_indexes(conn: Connection) -> None:
    # The page's facets and the map's colours count images by body part and view: without an index
    # each count scans every row (each row carries its vector, so that is the whole file); with one
    # it walks the index in order.
    conn.execute(text("CREATE INDEX images_by_body_part ON images (body_part COLLATE NOCASE)"))
    conn.execute(text("CREATE INDEX images_by_view ON images (view_position COLLATE NOCASE)"))


def _m008_vectors_in_their_own_file(conn: Connection) -> None:
    # The vectors leave SQLite for a float16 file (indexer.store.vector_file says why). Written and
    # fsynced before the column goes, in this transaction: a kill before the commit leaves the
    # column, and the next open writes the file again. The freed pages are zeroed (secure_delete)
    # and given back by the VACUUM that follows the commit (indexer.store.database).
    from .vector_file import VectorFile

    vector_file = VectorFile(conn.info["index_folder"])
    vector_file.reset()
    raw = conn.connection.driver_connection
    last = 0
    while rows := raw.execute("SELECT id, embedding FROM images WHERE id > ? ORDER BY id LIMIT 20000",
                              (last,)).fetchall():
        ids = np.fromiter((row[0] for row in rows), np.int64, count=len(rows))
        vector_file.write(ids, np.stack([np.frombuffer(row[1], np.float32) for row in rows]))
        last = int(ids[-1])
    conn.execute(text("ALTER TABLE images DROP COLUMN embedding"))
    conn.execute(text("INSERT OR REPLACE INTO meta VALUES ('vacuum_after_migration', '1')"))


MIGRATIONS = [_m001_initial, _m002_index_id, _m003_keyed_patient_pseudonyms, _m004_roots, _m005_excluded,
              _m006_series, _m007_facet_indexes, _m008_vectors_in_their_own_file]
SCHEMA_VERSION = len(MIGRATIONS)
