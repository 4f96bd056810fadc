"""What an index is, kept in its `meta` table: the model it was built with (one rule for a model
that fits it), its patient pseudonym key, and the generation of its content."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..errors import ModelMismatchError, StoreError
from .database import fetch_raw
from .sql import set_meta


def read_meta(conn: Connection) -> dict[str, str]:
    return dict(conn.execute(text("SELECT key, value FROM meta")).all())


def check_same_model(folder: Path | str, index_model: dict[str, Any] | None, fingerprint: str, dim: int,
                     source: str | None) -> None:
    """The one rule for a model and an index: it fits an index that holds none yet (None, or no
    fingerprint recorded) or whose fingerprint and dimension are its own; ModelMismatchError
    otherwise, naming both."""
    if not index_model:
        return
    same_dim = index_model.get("dim") in (None, dim)
    if same_dim and index_model.get("fingerprint") in (None, fingerprint):
        return
    raise ModelMismatchError.between(folder, index_model, source, fingerprint, dim)


class Identity:
    """The meta-table half of IndexStore (`engine` and `folder` are the store's)."""

    engine: Engine
    folder: Path

    @property
    def model_info(self) -> dict[str, Any] | None:
        """{fingerprint, dim, source} of the model the index was built with; None before the first image."""
        with self.engine.connect() as conn:
            meta = read_meta(conn)
        if "model_fingerprint" not in meta:
            return None
        return {"fingerprint": meta["model_fingerprint"], "dim": int(meta["model_dim"]),
                "source": meta.get("model_source")}

    def check_model(self, fingerprint: str, dim: int, source: str | None, *, record: bool = True) -> None:
        """Refuse a model other than the index's (`check_same_model`); with `record`, make it
        the index's model if the index has none yet."""
        info = self.model_info
        check_same_model(self.folder, info, fingerprint, dim, source)
        if info is None and record:
            with self.engine.begin() as conn:
                set_meta(conn, {"model_fingerprint": fingerprint, "model_dim": str(dim), "model_source": source})

    def patient_key(self, searching: bool = False):
        """The key of this index's patient pseudonyms (see indexer.privacy): recorded by its id
        on first use, and refused when another key is in place (pseudonyms made with two keys
        would split each patient in two). `searching`: refused too where there is no key file
        (none is made), and nothing recorded."""
        from ..legacy_pseudonyms import PatientKey, open_salt
        from ..privacy import KEY_ENV, PatientKeyError, key_id, key_path, patient_key

        try:
            key = patient_key(create=not searching)
        except PatientKeyError as e:
            raise StoreError(str(e)) from None
        with self.engine.connect() as conn:
            meta = read_meta(conn)
        recorded = meta.get("patient_key_id")
        if recorded is None and not searching:
            with self.engine.begin() as conn:
                set_meta(conn, {"patient_key_id": key_id(key)})
        elif recorded is not None and recorded != key_id(key):
            raise StoreError(f"the index at {self.folder} pseudonymised patients with another key than "
                             f"{key_path()} (key id {recorded}): set {KEY_ENV} to that key's file")
        sealed = meta.get("patient_salt_sealed")
        return PatientKey(key, open_salt(sealed, key) if sealed else None)

    def generation(self, conn: Connection | None = None) -> int:
        """The generation committed last (as `conn` sees it): every search reads it, to answer from it."""
        if conn is None:
            return int(fetch_raw(self.engine, "SELECT value FROM meta WHERE key='generation'")[0][0])
        return int(conn.execute(text("SELECT value FROM meta WHERE key='generation'")).scalar())

    def version(self) -> tuple[str | None, ...]:
        """What changes whenever what `status` reports does: the generation (every commit) and the
        last run (recorded also by a run that changed nothing)."""
        with self.engine.connect() as conn:
            meta = read_meta(conn)
        return meta.get("generation"), meta.get("last_run_at"), meta.get("last_run_seconds")

    @property
    def viewer_template(self) -> str | None:
        """The viewer URL template of `indexer.viewer_links` (mi-index --viewer-url), None if not set."""
        from ..viewer_links import META_KEY
        found = fetch_raw(self.engine, "SELECT value FROM meta WHERE key = ?", (META_KEY,))
        return (found[0][0] if found else None) or None

    def set_viewer_template(self, template: str) -> None:
        """Set (or, with '', clear) the viewer URL template, checked first."""
        from ..viewer_links import META_KEY, checked_template
        template = checked_template(template)
        with self.engine.begin() as conn:
            if template:
                set_meta(conn, {META_KEY: template})
            else:
                conn.execute(text("DELETE FROM meta WHERE key = :key"), {"key": META_KEY})

    @property
    def index_id(self) -> str:
        with self.engine.connect() as conn:
            return read_meta(conn)["index_id"]
