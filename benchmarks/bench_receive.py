"""The DICOM receiver's pace: instances/s received and indexed, and the delay from each C-STORE
response to the instance being searchable (its row committed in the index), p50 and p95.

A real `mi receive` process (the tiny test model unless --model) on a free loopback port; a
pynetdicom sender sends --instances small CT images (32x32, own UIDs) in associations of
--per-association (--pause seconds apart); the index is polled every 20 ms. On a CPU the
encoder bounds the pace: a burst queues behind it, a trickle below its pace shows the
receiver's own delay (batching, commit, FAISS write).

    python benchmarks/bench_receive.py [--instances 200] [--per-association 20] [--model DIR]
    python benchmarks/bench_receive.py --instances 10 --per-association 1 --pause 3
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_receiver import FIXTURE, ct_dataset, start_receiver, stop_receiver  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--per-association", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between associations (a trickle)")
    parser.add_argument("--model", default=str(FIXTURE))
    args = parser.parse_args()
    from pynetdicom import AE

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MI_PATIENT_KEY_FILE", str(Path(tmp) / "patient.key"))
        (Path(tmp) / "patient.key").write_text("00" * 32)
        running = start_receiver(Path(tmp), "--model", args.model)
        datasets = [ct_dataset() for _ in range(args.instances)]
        answered: dict[str, float] = {}
        visible: dict[str, float] = {}
        done = threading.Event()

        def poll() -> None:
            db_path = running.index / "index.sqlite"
            while not done.is_set():
                if db_path.exists():
                    try:
                        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
                        now = time.monotonic()
                        for (uid,) in db.execute("SELECT sop_instance_uid FROM images"):
                            visible.setdefault(uid, now)
                        db.close()
                    except sqlite3.Error:
                        pass
                if len(visible) >= len(datasets):
                    return
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        start = time.monotonic()
        ae = AE(ae_title="BENCH")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        for first in range(0, len(datasets), args.per_association):
            assoc = ae.associate("127.0.0.1", running.port, ae_title="MI")
            for ds in datasets[first:first + args.per_association]:
                status = assoc.send_c_store(ds)
                assert int(status.Status) == 0, status
                answered[str(ds.SOPInstanceUID)] = time.monotonic()
            assoc.release()
            time.sleep(args.pause)
        sent = time.monotonic() - start
        poller.join(timeout=600)
        done.set()
        total = max(visible.values()) - start
        delays = sorted(visible[uid] - answered[uid] for uid in answered if uid in visible)
        stop_receiver(running)
    print(f"{len(datasets)} instances, {args.per_association} per association, {args.pause:g} s between "
          f"associations, model {Path(args.model).name} (one encoder thread: OMP_NUM_THREADS=1)")
    print(f"received: {len(datasets) / sent:.1f} instances/s ({sent:.2f} s)")
    print(f"received and indexed: {len(delays) / total:.1f} instances/s ({total:.2f} s)")
    p95 = delays[max(0, int(round(0.95 * len(delays))) - 1)]
    print(f"C-STORE response -> searchable: p50 {statistics.median(delays):.2f} s, p95 {p95:.2f} s, "
          f"max {delays[-1]:.2f} s")


if __name__ == "__main__":
    main()
