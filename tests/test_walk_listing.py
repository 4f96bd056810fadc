"""What a folder walk lists (folders read through a descriptor, entries stat'ed relative to it) and what an
unchanged re-run's planning finds: links resolved, hidden and odd entries left out, changes found."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from made_images import make_images
from other_model import FIXTURE, model_with_other_weights

from indexer.run.pipeline import Summary
from indexer.run.plan import _compare, _compare_unique, plan
from indexer.sources import FolderSource, Item, folders
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


def _noted(walk, pids):
    """A child walk, its children's pids noted in `pids` (not the walk itself: it would keep it alive)."""
    pids.extend(walk.pids)
    return walk


def _walk_both_ways(source_args, monkeypatch):
    """(items, refused, unreadable) of FolderSource(*source_args), walked in a child process and here."""
    found = []
    for in_child in (True, False):
        monkeypatch.setattr(folders, "_CHILD_WALK", in_child)
        source = FolderSource(*source_args)
        found.append((list(source.items()), source.refused, source._unreadable))
    return found


def test_a_walk_in_a_child_process_lists_what_one_here_does(tmp_path, monkeypatch, caplog):
    data, _, via = _tree(tmp_path)
    started = []
    real_start = folders._ChildWalk.start
    monkeypatch.setattr(folders._ChildWalk, "start", lambda *a: _noted(real_start(*a), started))
    (data / os.fsdecode(b"not-utf8-\xff.dcm")).write_bytes(b"7")  # a name that is no UTF-8 crosses the pipe too
    in_child, here = _walk_both_ways(([via, data / "pipe.dcm"],), monkeypatch)
    assert in_child == here and len(in_child[0]) == 7 and in_child[1] and started
    real_open = os.open

    def refused(path, *args, **kwargs):  # as in the test above: an unlistable folder, in the child too
        if isinstance(path, str) and path.endswith("/deep"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refused)
    caplog.clear()
    in_child, here = _walk_both_ways(([data],), monkeypatch)
    assert in_child == here and in_child[2] == [str(data.resolve() / "a" / "deep")]
    # the child logs nothing (a lock held at the fork would hang it): its warning is made here, once per walk
    assert sum("cannot read folder" in record.getMessage() for record in caplog.records) == 2
    for pid in started:
        with pytest.raises(ChildProcessError):  # each child reaped: no zombie left behind
            os.waitpid(pid, os.WNOHANG)


def test_a_failed_or_abandoned_child_walk_leaves_the_walk_to_this_process(tmp_path, monkeypatch):
    data, _, _ = _tree(tmp_path)
    expected = list(FolderSource([data]).items())

    def dies(*args):  # in the child: it ends without sending anything, as a killed one would
        raise MemoryError
    monkeypatch.setattr(folders, "_send_walk", dies)
    assert list(FolderSource([data]).items()) == expected
    monkeypatch.undo()
    started = []
    real_start = folders._ChildWalk.start
    monkeypatch.setattr(folders._ChildWalk, "start", lambda *a: _noted(real_start(*a), started))
    listing = FolderSource([data]).items()
    del listing  # dropped unread: its child is stopped and reaped, not left waiting to write
    gc.collect()
    with pytest.raises(ChildProcessError):
        os.waitpid(started[0], os.WNOHANG)


class _ImagesOnly:
    def accepts(self, item):
        return item.key.endswith(".dcm")


@pytest.mark.parametrize("seed", range(6))
def test_the_quick_comparison_of_a_listing_without_repeats_agrees_with_the_loop(seed):
    rng = np.random.default_rng(seed)
    listed, known = [], {}
    for i in range(400):
        key = f"/data/{i}.{'dcm' if rng.random() < 0.9 else 'txt'}"
        size, mtime = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        kind = rng.choice(["unchanged", "changed", "new", "gone", "skipped", "retry"], p=[.5, .1, .1, .1, .1, .1])
        if kind != "gone":
            listed.append(Item(key, size, mtime))
        if kind != "new":
            known[key] = (size if kind != "changed" else size + 1, mtime, "bad" if kind in ("skipped", "retry") else None,
                          kind == "retry")
    if seed == 0:  # nothing gone: the quick one says so without the set of keys
        known = {key: record for key, record in known.items() if key in {item.key for item in listed}}
    quick, loop = Summary(), Summary()
    todo, keep, unchanged, still = _compare_unique(listed, {item.key for item in listed}, known, _ImagesOnly(), quick)
    todo_l, keep_l, unchanged_l, still_l = _compare(listed, known, _ImagesOnly(), loop)
    assert (todo, unchanged, still, quick) == (todo_l, unchanged_l, still_l, loop)
    assert (known.keys() - keep if keep is not None else set()) == known.keys() - keep_l
    assert (keep is None) == (seed == 0 and not known.keys() - keep_l)


@pytest.mark.parametrize("walks", [2, 3])
def test_walks_split_between_children_give_one_walks_listing_in_its_order(tmp_path, monkeypatch, walks):
    """Children take a root's subfolders by name; their listings merge into exactly what one walk here gives,
    in its order, a folder linked from another child's part listed once, where that walk lists it."""
    rng = np.random.default_rng(walks)
    data = tmp_path / "data"
    for top in range(12):
        for sub in range(3):
            folder = data / f"p{top:02d}" / f"s{sub}"
            folder.mkdir(parents=True)
            for i in range(int(rng.integers(0, 4))):
                (folder / f"{i}.dcm").write_bytes(b"x" * i)
    (data / "root-file.dcm").write_bytes(b"r")
    (data / "p00" / "to-p07").symlink_to(data / "p07" / "s1", target_is_directory=True)   # across the parts
    (data / "p09" / "s2" / "to-p03").symlink_to(data / "p03", target_is_directory=True)
    (data / "p05" / "s0" / "loop").symlink_to(data, target_is_directory=True)
    lone = tmp_path / "lone.dcm"
    lone.write_bytes(b"l")
    roots = ([data, lone, data / "p04"],)  # p04 again: listed once, as one walk does
    monkeypatch.setattr(folders, "_WALKS", walks)
    in_child, here = _walk_both_ways(roots, monkeypatch)
    assert in_child == here and len(here[0]) > 50
    assert {folders._part_of(f"p{top:02d}", walks) for top in range(12)} == set(range(walks))  # each child has some
