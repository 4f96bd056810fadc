"""mi-search through a running mi-serve: the same output as a search in the process, without
importing PyTorch, FAISS or SQLAlchemy; a fallback when no server answers; one-line errors; and
8 clients searching while mi-index adds files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from raw_sqlite import fetch_rows
from servers import FIXTURE, command_env, start_server, stop_server

# mi-search in a fresh process; afterwards it writes which heavy modules it imported.
RUN = """import os, sys
from retrieval.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
heavy = [m for m in ("torch", "faiss", "sqlalchemy") if m in sys.modules]
open(os.environ["MODULES_OUT"], "w").write(" ".join(heavy))
sys.stdout.flush()
os._exit(code)
"""
HEAVY = ["torch", "faiss", "sqlalchemy"]

# Several mi-search command lines in one fresh process, each through click's CliRunner (stdout and
# stderr captured, not a terminal): per command line, its exit code, output, the heavy modules
# loaded so far (they accumulate: the first line that loads one is the one that shows it) and the
# sockets it connected (sys.addaudithook sees every connect the standard library makes).
RUN_MANY = """import os, pickle, sys, traceback
from click.testing import CliRunner
from retrieval.cli import main
connected = []
sys.addaudithook(lambda event, args: connected.append(args[1]) if event == "socket.connect" else None)
results = []
for argv in pickle.load(open(os.environ["ARGV_IN"], "rb")):
    connected.clear()
    result = CliRunner().invoke(main, argv)
    failure = "" if result.exception is None or isinstance(result.exception, SystemExit) else \\
        "".join(traceback.format_exception(result.exception))
    results.append({"code": result.exit_code, "stdout": result.stdout_bytes, "stderr": result.stderr + failure,
                    "heavy": [m for m in ("torch", "faiss", "sqlalchemy") if m in sys.modules],
                    "connected": len(connected)})
pickle.dump(results, open(os.environ["RESULTS_OUT"], "wb"))
sys.stdout.flush()
os._exit(0)
"""


def mi_search(archive, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """mi-search ARGS --index INDEX as a fresh process: its result and the heavy modules it loaded."""
    out = archive["root"] / "modules.txt"
    out.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-c", RUN, *args, "--index", str(archive["index"])],
                            env={**(env or command_env()), "MODULES_OUT": str(out)},
                            capture_output=True, timeout=300)
    return result, out.read_text().split() if out.exists() else []


def mi_search_many(archive, argvs: list[list[str]]) -> list[dict]:
    """Each of `argvs` (with --index INDEX) as mi-search in one fresh process, in order (RUN_MANY)."""
    import pickle

    argv_in, results_out = archive["root"] / "argv.pickle", archive["root"] / "results.pickle"
    argv_in.write_bytes(pickle.dumps([[*argv, "--index", str(archive["index"])] for argv in argvs]))
    results_out.unlink(missing_ok=True)
    ran = subprocess.run([sys.executable, "-c", RUN_MANY],
                         env={**command_env(), "ARGV_IN": str(argv_in), "RESULTS_OUT": str(results_out)},
                         capture_output=True, timeout=300)
    assert ran.returncode == 0 and results_out.exists(), ran.stderr.decode()
    return pickle.loads(results_out.read_bytes())


def queries(archive) -> list[list[str]]:
    data = archive["data"]
    return [
        ["chest x-ray"],
        [str(data / "png1.png")],
        ["2:chest", "+", str(data / "CT_small.dcm"), "-", "pacemaker"],
        [str(data / "MR_small.dcm"), "--exclude-same-study", "--labels", "normal,pneumonia", "-k", "4"],
        ["x", "--group", "study", "-k", "3", "--min-score", "-1"],
        ["x", "--modality", "ct"],
        ["x", "--under", str(data), "--since", "1990-01-01", "--show-duplicates", "--multilabel",
         "--labels", "a,b"],
        ["--image", str(data / "png2.png")],
    ]


@pytest.mark.parametrize("output", [[], ["--json"], ["--paths"]], ids=["tsv", "json", "paths"])
def test_the_output_is_identical_through_the_server(archive, served, output):
    """Each query through the server (one process that never imports the heavy modules) and with
    --no-server (one process that searches here and connects nowhere) prints the same bytes."""
    asked = [[*query, *output] for query in queries(archive)]
    remotes = mi_search_many(archive, asked)
    locals_ = mi_search_many(archive, [[*argv, "--no-server"] for argv in asked])
    for query, remote, local in zip(asked, remotes, locals_):
        assert remote["code"] == 0, remote["stderr"]
        assert remote["heavy"] == [], f"{query}: the server's answer still imported {remote['heavy']}"
        assert remote["connected"] >= 1, f"{query}: the server was not asked"
        assert local["code"] == 0, local["stderr"]
        assert set(local["heavy"]) == set(HEAVY) and local["connected"] == 0, query  # it did search here
        assert remote["stdout"] == local["stdout"], query
        assert remote["stdout"].strip()


def test_errors_are_the_same_one_line(archive, served):
    for query in (["x", "--labels", " , "], [str(archive["data"] / "png1.png"), "-",
                                              str(archive["data"] / "png1.png")]):
        remote, heavy = mi_search(archive, *query)
        local, _ = mi_search(archive, *query, "--no-server")
        assert remote.returncode == local.returncode == 1 and heavy == []
        assert remote.stderr == local.stderr and len(remote.stderr.strip().splitlines()) == 1, remote.stderr


def test_the_server_file_names_the_server_and_leaves_with_it(archive, tmp_path):
    index = tmp_path / "index"
    import shutil
    shutil.copytree(archive["index"], index)
    served = start_server(index)
    announced = json.loads((index / "server.json").read_text())
    assert announced["url"] == served.url and announced["pid"] == served.process.pid
    assert oct((index / "server.json").stat().st_mode & 0o777) == "0o600"
    stop_server(served.process)
    assert not (index / "server.json").exists()


def test_a_dead_servers_file_and_a_wrong_index_fall_back_to_searching_here(archive, served, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(archive["index"], other)
    (other / "server.json").write_text(json.dumps(
        {"url": served.url, "pid": 2 ** 22 + 12345, "host": os.uname().nodename, "index": str(other)}))
    result, heavy = mi_search({**archive, "index": other}, "chest")
    assert result.returncode == 0 and set(heavy) == set(HEAVY)  # a dead process: searched here
    # MI_SERVER names a live server, but of another index than the one asked for: searched here
    result, heavy = mi_search({**archive, "index": other}, "chest", env=command_env(MI_SERVER=served.url))
    assert result.returncode == 0 and set(heavy) == set(HEAVY)
    # and of this index: answered there
    result, heavy = mi_search(archive, "chest", env=command_env(MI_SERVER=served.url))
    assert result.returncode == 0 and heavy == []


def test_a_token_server_is_used_with_its_token(archive, tmp_path):
    import shutil
    index = tmp_path / "index"
    shutil.copytree(archive["index"], index)
    served = start_server(index, "--token", "s3cret")
    try:
        result, heavy = mi_search({**archive, "index": index}, "chest", "--json")
        assert result.returncode == 0 and heavy == [], result.stderr
        request = urllib.request.Request(f"{served.url}/api/query", data=b'{"terms":[{"kind":"text","text":"x"}]}',
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    finally:
        stop_server(served.process)


def test_eight_clients_while_mi_index_adds_files(archive, tmp_path):
    """Every answer comes from one committed generation: each hit's id is a row of the index with
    that path, and a client never sees the index shrink while files are only added. The indexer
    runs here (indexer.index_paths, what mi-index runs), the server in its own process."""
    import shutil
    import time

    import numpy as np
    from PIL import Image

    import indexer

    root = tmp_path / "live"
    data = root / "data"
    shutil.copytree(archive["data"], data)
    index = root / "index"

    def mi_index() -> None:
        indexer.index_paths([data], index, model=archive["model"], workers=0)

    def until_every_client(has_answered, what: str) -> None:
        deadline = time.monotonic() + 120
        while not all(any(has_answered(size) for size, _ in per_client) for per_client in answers):
            assert not errors and time.monotonic() < deadline, f"{what}: {errors}"
            time.sleep(0.02)

    mi_index()
    served = start_server(index)
    errors: list[str] = []
    answers: list[list[tuple[int, list[tuple[int, str]]]]] = [[] for _ in range(8)]
    stop = threading.Event()

    def client(number: int) -> None:
        body = json.dumps({"terms": [{"kind": "text", "text": f"query {number}"}], "k": 100}).encode()
        while not stop.is_set():
            request = urllib.request.Request(f"{served.url}/api/query", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    hits = json.load(response)["hits"]
            except Exception as error:  # noqa: BLE001 - any failure is the finding
                errors.append(f"client {number}: {error}")
                return
            answers[number].append((len(hits), [(hit["id"], hit["path"]) for hit in hits]))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        until_every_client(lambda size: True, "an answer before the additions")
        rng = np.random.default_rng(1)
        for batch in range(3):
            folder = data / f"batch{batch}"
            folder.mkdir()
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(folder / f"new{i}.png")
            mi_index()
        until_every_client(lambda size: size == 22, "an answer after the additions")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        stop_server(served.process)
    assert errors == []
    rows = dict(fetch_rows(index, "SELECT id, path FROM images"))
    assert len(rows) == 7 + 15
    for per_client in answers:
        assert per_client, "a client got no answer"
        sizes = [size for size, _ in per_client]
        assert sizes == sorted(sizes), "an answer came from an older generation than one before it"
        for _, hits in per_client:
            for image_id, path in hits:
                assert rows.get(image_id) == path
    sizes = [size for per_client in answers for size, _ in per_client]
    assert min(sizes) < 22 == max(sizes)  # answers from before, during and after the additions
