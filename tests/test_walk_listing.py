"""What a folder walk lists (folders read through a descriptor, entries stat'ed relative to it) and what an
unchanged re-run's planning finds: links resolved, hidden and odd entries left out, changes found."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from made_images import make_images
from other_model import FIXTURE, model_with_other_weights

from indexer.run.pipeline import Summary
from indexer.run.plan import Comparison, _compare, _compare_unique, compare, plan
from indexer.sources import FolderSource, Item, child_walks
from indexer.sources.child_walks import ChildWalks
from indexer.sources.folder_walk import WalkNotes, shares, tagged_batches
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


def _archive(tmp_path, links: bool = False):
    """data/ as an archive on disk: 12 top folders of 3 subfolders, a few files each, files in the root
    too, a name that is no UTF-8 and a text file (not ours); with `links`, folders linked across the
    shares and a loop."""
    rng = np.random.default_rng(7)
    data = tmp_path / "data"
    for top in range(12):
        for sub in range(3):
            folder = data / f"p{top:02d}" / f"s{sub}"
            folder.mkdir(parents=True)
            for i in range(int(rng.integers(0, 4))):
                (folder / f"{i}.dcm").write_bytes(b"x" * i)
    for name in ("root-a.dcm", "root-z.dcm", "notes.txt", os.fsdecode(b"not-utf8-\xff.dcm")):
        (data / name).write_bytes(b"r")
    (data / "p03" / os.fsdecode(b"\xfe-odd")).mkdir()
    (data / "p03" / os.fsdecode(b"\xfe-odd") / "7.dcm").write_bytes(b"7")
    if links:
        (data / "p00" / "to-p07").symlink_to(data / "p07" / "s1", target_is_directory=True)
        (data / "p09" / "s2" / "to-p03").symlink_to(data / "p03", target_is_directory=True)
        (data / "p05" / "s0" / "loop").symlink_to(data, target_is_directory=True)
    return data


def _indexed_then_changed(tmp_path, data):
    """An index that knows every file under `data` (as skipped, one to retry), then on disk: a file
    touched, one grown, one new, one deleted, a whole folder deleted and the text file changed (not ours:
    gone from the index)."""
    store = IndexStore.open(tmp_path / "index", create=True)
    listed = list(FolderSource([data]).items())
    retried = str(data.resolve() / "root-a.dcm")
    store.commit(skipped=[{"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns, "content_hash": None,
                           "error": "not an image", "retry": item.key == retried} for item in listed])
    st = os.stat(data / "p01" / "s1" / "1.dcm")
    os.utime(data / "p01" / "s1" / "1.dcm", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    (data / "p10" / "s0" / "grown.dcm").write_bytes(b"g")
    store.commit(skipped=[{"path": str(data.resolve() / "p10" / "s0" / "grown.dcm"), "size": 0, "mtime_ns": 1,
                           "content_hash": None, "error": "not an image"}])
    (data / "p06" / "s2" / "new.dcm").write_bytes(b"n")
    (data / "p02" / "s0" / "gone.dcm").write_bytes(b"g")
    store.commit(skipped=[{"path": str(data.resolve() / "p02" / "s0" / "gone.dcm"), "size": 1, "mtime_ns": 1,
                           "content_hash": None, "error": "not an image"}])
    (data / "p02" / "s0" / "gone.dcm").unlink()
    shutil.rmtree(data / "p08")
    (data / "notes.txt").write_bytes(b"longer now")
    return store


def _plan_both_ways(roots, store, monkeypatch, in_order: bool):
    """What planning finds over `roots`, compared in child processes and here: (todo, removed, summary,
    refused, the folders that could not be read). `in_order`: the to-do list in its order (the children
    sent their listings and one walk's order was rebuilt), else sorted (comparisons joined share by share)."""
    found = []
    for in_children in (True, False):
        monkeypatch.setattr(child_walks, "CHILD_WALKS", in_children)
        monkeypatch.setattr(child_walks, "WALKS", 3)
        source = FolderSource(roots)
        todo, removed = plan(source, store, summary := Summary())
        keys = list(todo) if in_order else sorted(todo)
        found.append((keys, sorted(removed), summary, source.refused, source._unreadable))  # removed: in no set order
    return found


def _spied(monkeypatch, store, alone: bool = True):
    """The children started (their pids), whether they were asked for their listings and whether this
    process read the index's records of the roots. `alone`: taken for the only thread of this process
    (another test's server may have left one behind), as mi-index is when it plans."""
    seen = {"pids": [], "listings": 0, "read here": 0}
    real_start, real_listings, real_under = ChildWalks.start, ChildWalks.listings, store.files_under
    if alone:
        monkeypatch.setattr(threading, "active_count", lambda: 1)

    def files_under(*args):
        seen["read here"] += 1
        return real_under(*args)
    monkeypatch.setattr(store, "files_under", files_under)

    def start(*args):
        walks = real_start(*args)
        seen["pids"].extend(walks.pids)
        return walks

    def listings(self):
        seen["listings"] += 1
        return real_listings(self)
    monkeypatch.setattr(ChildWalks, "start", start)
    monkeypatch.setattr(ChildWalks, "listings", listings)
    return seen


def _reaped(pids):
    for pid in pids:
        with pytest.raises(ChildProcessError):  # each child reaped: no zombie left behind
            os.waitpid(pid, os.WNOHANG)
    return True


def test_planning_compared_in_child_processes_finds_what_planning_here_does(tmp_path, monkeypatch, caplog):
    data = _archive(tmp_path)
    store = _indexed_then_changed(tmp_path, data)
    real = data.resolve()
    os.mkfifo(tmp_path / "pipe.dcm")
    seen = _spied(monkeypatch, store)
    in_children, here = _plan_both_ways([data, tmp_path / "pipe.dcm"], store, monkeypatch, in_order=False)
    assert in_children == here
    todo, removed, summary, refused, _ = here
    assert [item.key for item in todo] == sorted(str(real / name) for name in (
        "root-a.dcm", "p01/s1/1.dcm", "p10/s0/grown.dcm", "p06/s2/new.dcm"))
    assert str(real / "p02" / "s0" / "gone.dcm") in removed and any("/p08/" in key for key in removed)
    assert str(real / "notes.txt") in removed and not [key for key in removed if "/p08/" not in key and not
                                                         key.endswith(("gone.dcm", "notes.txt"))]
    assert (summary.new, summary.updated) == (1, 3) and summary.unchanged == summary.still_skipped > 40
    assert refused == [(str(tmp_path / "pipe.dcm"), "not a regular file (a FIFO, device or socket)")]
    assert len(seen["pids"]) == 3 and seen["listings"] == 0 and _reaped(seen["pids"])  # compared in each share
    assert seen["read here"] == 1  # by the planning done here only

    # a folder that cannot be read (in the children too: they are forked with the patch) and one --remove took out
    real_open = os.open

    def refused_open(path, *args, **kwargs):  # root opens everything: the folder's permission error is simulated
        if isinstance(path, str) and path.endswith("/p04/s1"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", refused_open)
    monkeypatch.setattr(store, "excluded", lambda: [str(real / "p05")])
    caplog.clear()
    in_children, here = _plan_both_ways([data], store, monkeypatch, in_order=False)
    assert in_children == here and here[4] == [str(real / "p04" / "s1")]
    assert not any("/p04/s1/" in key for key in here[1]) and any("/p05/" in key for key in here[1])
    # the children log nothing (a lock held at the fork would hang them): the warning is made here, once a planning
    assert sum("cannot read folder" in record.getMessage() for record in caplog.records) == 2
    store.close()


@pytest.mark.parametrize("roots", ["linked", "nested"])
def test_links_or_nested_roots_bring_the_listings_back_in_one_walks_order(tmp_path, monkeypatch, roots):
    """A child that met a symlink, or roots under one another, may list files of another share: then the
    listings come back and are merged into exactly what one walk here lists, in its order (a folder linked
    from another share listed once, where that walk lists it)."""
    data = _archive(tmp_path, links=roots == "linked")
    lone = tmp_path / "lone.dcm"
    lone.write_bytes(b"l")
    store = IndexStore.open(tmp_path / "index", create=True)  # empty: every file listed is to do, in listing order
    seen = _spied(monkeypatch, store)
    given = [data, lone] if roots == "linked" else [data, lone, data / "p04"]  # p04 again: listed once
    in_children, here = _plan_both_ways(given, store, monkeypatch, in_order=True)
    assert in_children == here and len(here[0]) > 50 and seen["listings"] == 1 and _reaped(seen["pids"])
    assert here[0][-1].key == str(lone.resolve())
    store.close()


def test_with_another_thread_running_the_children_only_walk_and_the_index_is_read_here(tmp_path, monkeypatch):
    """A forked child would hold a copy of any lock the other thread held at the fork (SQLite's, its pool's)."""
    data = _archive(tmp_path)
    store = _indexed_then_changed(tmp_path, data)
    seen = _spied(monkeypatch, store, alone=False)
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        in_children, here = _plan_both_ways([data], store, monkeypatch, in_order=True)  # in order: one walk's
    finally:
        done.set()
        other.join()
    assert in_children == here and len(here[0]) == 4 and seen["listings"] == 1 and _reaped(seen["pids"])
    assert seen["read here"] == 2  # while the children walked, and by the planning done here
    store.close()


def test_a_failed_child_leaves_the_planning_to_this_process(tmp_path, monkeypatch):
    data = _archive(tmp_path)
    store = _indexed_then_changed(tmp_path, data)
    seen = _spied(monkeypatch, store)

    def dies(*args):  # in the child: it ends without sending anything, as a killed one would
        raise MemoryError
    monkeypatch.setattr(child_walks, "_child", dies)
    in_children, here = _plan_both_ways([data], store, monkeypatch, in_order=True)  # in order: planned here
    assert in_children == here and here[0] and seen["pids"] and _reaped(seen["pids"])
    monkeypatch.undo()

    # one child met a link and sent its listing; those that compared end before they are asked for theirs
    (data / "p00" / "to-p07").symlink_to(data / "p07" / "s1", target_is_directory=True)
    seen = _spied(monkeypatch, store)
    real_send = child_walks._send

    def send_then_end(pipe, message):
        real_send(pipe, message)
        if message[0] == "compared":
            os._exit(0)
    monkeypatch.setattr(child_walks, "_send", send_then_end)
    in_children, here = _plan_both_ways([data], store, monkeypatch, in_order=True)
    assert in_children == here and here[0] and seen["listings"] == 1 and _reaped(seen["pids"])
    store.close()


def _few_folders(tmp_path):
    """An archive of three top folders of unequal size (CR/ the most), a file beside them."""
    data = tmp_path / "data"
    for modality, studies in (("CR", 30), ("CT", 6), ("MR", 2)):
        for study in range(studies):
            folder = data / modality / f"study-{study:02d}"
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}.dcm").write_bytes(b"x" * (i + 1))
        (data / modality / "index.txt").write_bytes(b"i")
    (data / "README.dcm").write_bytes(b"r")
    return data


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("layout", ["many folders and files", "few folders"])
def test_shares_take_every_entry_of_a_root_once_and_the_index_range_of_each_holds_its_files(tmp_path, parts, layout):
    if layout == "few folders":  # cut by the folders' own entries: CR/ is split between shares
        data = _few_folders(tmp_path)
    else:
        data = _archive(tmp_path)
        for i in range(40):  # a flat part of the root: its files are shared out too
            (data / f"flat-{i:02d}.dcm").write_bytes(b"f")
    everything = sorted(item.key for item in FolderSource([data]).items())
    listed = []
    for share in shares([data], parts):
        notes = WalkNotes()
        mine = [path for _, _, batch in tagged_batches([data], None, notes, share) for path, _ in batch]
        low, high = share.ranges[0]
        assert len(mine) >= len(everything) // (3 * parts)  # each share has a fair part of them
        assert all(low <= os.fsencode(path) < high for path in mine)  # in its range
        listed.extend(mine)
    assert sorted(listed) == everything  # all of them, none twice


def test_planning_over_few_big_folders_is_shared_and_finds_what_planning_here_does(tmp_path, monkeypatch):
    data = _few_folders(tmp_path)
    store = IndexStore.open(tmp_path / "index", create=True)
    listed = list(FolderSource([data]).items())
    store.commit(skipped=[{"path": item.key, "size": item.size, "mtime_ns": item.mtime_ns, "content_hash": None,
                           "error": "not an image"} for item in listed])
    shutil.rmtree(data / "CR" / "study-07")  # gone, in the folder the shares split
    (data / "CR" / "study-21" / "new.dcm").write_bytes(b"n")
    seen = _spied(monkeypatch, store)
    in_children, here = _plan_both_ways([data], store, monkeypatch, in_order=False)
    assert in_children == here and seen["listings"] == 0 and _reaped(seen["pids"])
    assert [item.key for item in here[0]] == [str(data.resolve() / "CR" / "study-21" / "new.dcm")]
    assert len(here[1]) == 3 and all("/CR/study-07/" in key for key in here[1])
    store.close()


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
    if seed == 0:  # none gone from disk: only the changed text files are (not ours), found without the set of keys
        known = {key: record for key, record in known.items() if key in {item.key for item in listed}}
    quick = _compare_unique(listed, {item.key for item in listed}, known, _ImagesOnly())
    loop = _compare(listed, known, _ImagesOnly())
    assert quick == loop and quick.todo and quick.gone
    if seed == 0:
        assert all(key.endswith(".txt") for key in quick.gone)
    halves = [compare([item for item in listed if (item.key < "/data/2") == low],
                      {key: record for key, record in known.items() if (key < "/data/2") == low}, _ImagesOnly())
              for low in (True, False)]
    assert Comparison.joined(halves)._replace(todo=sorted(quick.todo), gone=sorted(quick.gone)) == \
        quick._replace(todo=sorted(quick.todo), gone=sorted(quick.gone))  # disjoint keys add up
