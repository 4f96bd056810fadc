"""What a folder walk lists (folders read through a descriptor, entries stat'ed relative to it) and what an
unchanged re-run's planning finds: links resolved, hidden and odd entries left out, changes found."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from made_images import make_images
from other_model import FIXTURE, model_with_other_weights

from indexer.run.pipeline import Summary
from indexer.run.plan import plan
from indexer.sources import FolderSource
from indexer.store import IndexStore


def _tree(tmp_path):
    """data/ with files, a hidden file and folder, a symlinked file and folder (outside data/), a link back
    to data/ (a loop), a dangling link and a FIFO; reached through a symlinked root `via`."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "a" / "deep").mkdir(parents=True)
    (data / ".hidden").mkdir()
    outside.mkdir()
    (data / "one.dcm").write_bytes(b"1")
    (data / "a" / "two.dcm").write_bytes(b"22")
    (data / "a" / "deep" / "three.dcm").write_bytes(b"333")
    (data / ".secret.dcm").write_bytes(b"x")
    (data / ".hidden" / "four.dcm").write_bytes(b"x")
    (outside / "five.dcm").write_bytes(b"55555")
    (outside / "six.dcm").write_bytes(b"666666")
    (data / "linked").symlink_to(outside, target_is_directory=True)
    (data / "a" / "file-link.dcm").symlink_to(outside / "six.dcm")
    (data / "a" / "loop").symlink_to(data, target_is_directory=True)
    (data / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    os.mkfifo(data / "pipe.dcm")
    via = tmp_path / "via"
    via.symlink_to(data, target_is_directory=True)
    return data, outside, via


def test_the_walk_lists_resolved_files_with_their_own_size_and_mtime(tmp_path):
    data, outside, via = _tree(tmp_path)
    items = list(FolderSource([via]).items())
    real, elsewhere = data.resolve(), outside.resolve()
    expected = [str(real / "one.dcm"), str(real / "a" / "two.dcm"), str(real / "a" / "deep" / "three.dcm"),
                str(elsewhere / "five.dcm"), str(elsewhere / "six.dcm"), str(elsewhere / "six.dcm")]
    assert sorted(item.key for item in items) == sorted(expected)  # six.dcm: through the folder and the file link
    for item in items:
        st = os.stat(item.key)
        assert (item.size, item.mtime_ns) == (st.st_size, st.st_mtime_ns)
    # each folder's entries in reverse name order, subfolders after (as the walk always gave them)
    assert [item.key for item in items] == [str(real / "one.dcm"), str(real / "a" / "two.dcm"),
                                            str(elsewhere / "six.dcm"), str(real / "a" / "deep" / "three.dcm"),
                                            str(elsewhere / "six.dcm"), str(elsewhere / "five.dcm")]

def test_the_index_folder_and_an_unlistable_folder_are_left_out(tmp_path, monkeypatch):
    data, _, _ = _tree(tmp_path)
    keys = [item.key for item in FolderSource([data], skip=(data / "a").resolve()).items()]
    assert not any("/a/" in key for key in keys) and str(data.resolve() / "one.dcm") in keys
    real_open = os.open

    def refused(path, *args, **kwargs):  # root opens everything: the folder's permission error is simulated
        if isinstance(path, str) and path.endswith("/deep"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refused)
    source = FolderSource([data])
    keys = [item.key for item in source.items()]
    assert not any(key.endswith("three.dcm") for key in keys)
    assert not source.sweepable(str(data.resolve() / "a" / "deep" / "three.dcm"))  # not taken for deleted
    assert source.sweepable(str(data.resolve() / "a" / "gone.dcm"))


def test_planning_finds_changed_new_removed_and_retried_files_and_nothing_else(tmp_path):
    data, outside, via = _tree(tmp_path)
    store = IndexStore.open(tmp_path / "index", create=True)
    listed = list(FolderSource([via]).items())
    retried = str(data.resolve() / "a" / "two.dcm")
    store.commit(skipped=[{"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns, "content_hash": None,
                           "error": "not an image", "retry": item.key == retried} for item in listed])
    todo, removed = plan(FolderSource([via]), store, summary := Summary())
    assert [item.key for item in todo] == [retried] and removed == []
    assert (summary.unchanged, summary.still_skipped, summary.updated) == (4, 4, 1)  # six.dcm listed twice, once

    st = os.stat(data / "one.dcm")
    os.utime(data / "one.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # same size, another mtime
    (outside / "five.dcm").write_bytes(b"5")                                 # through the symlinked folder
    (data / "a" / "deep" / "new.dcm").write_bytes(b"new")
    (data / "a" / "deep" / "three.dcm").unlink()
    todo, removed = plan(FolderSource([via]), store, summary := Summary())
    real, elsewhere = data.resolve(), outside.resolve()
    assert sorted(item.key for item in todo) == sorted([str(real / "one.dcm"), str(elsewhere / "five.dcm"),
                                                        str(real / "a" / "deep" / "new.dcm"), retried])
    assert removed == [str(real / "a" / "deep" / "three.dcm")]
    assert (summary.new, summary.updated, summary.unchanged) == (1, 3, 1)
    store.close()


def test_an_unchanged_run_with_a_named_model_does_not_import_pytorch(tmp_path):
    """The named model is still checked against the index's (from its checkpoint's header), without PyTorch:
    its import was most of an unchanged run's time."""
    make_images(tmp_path / "data", 2)
    run = ("import json, sys, indexer; s = indexer.index_paths([sys.argv[1]], sys.argv[2], model=sys.argv[3], "
           "workers=0); print(json.dumps([s['new'], s['unchanged'], 'torch' in sys.modules]))")
    args = [sys.executable, "-c", run, str(tmp_path / "data"), str(tmp_path / "index"), str(FIXTURE)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    assert json.loads(first.stdout) == [2, 0, True]  # encoding loads it
    again = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    assert json.loads(again.stdout) == [0, 2, False]
    other = subprocess.run([*args[:-1], str(model_with_other_weights(tmp_path))], capture_output=True, text=True,
                           env=env)
    assert other.returncode != 0 and "ModelMismatchError" in other.stderr  # another model is still refused
