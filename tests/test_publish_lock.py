"""One publisher at a time, with locks that end with their holder: real processes, SIGKILL,
an embedded store and a real `chroma run` server.

Processes are synchronised through their pipes: a child says what it has done on stdout and,
where the test needs it to hold still, waits for a line on stdin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.models import MINILM
from tasks.store import chroma, locks
from tests.conftest import nist_rows

ROOT = Path(__file__).resolve().parents[1]

# Publishes the rows of a JSON file in batches of 2. After its first batch it says "holding"
# and waits for a line on stdin; if it has to wait for the lock it says whom it waits for.
PUBLISHER = """
import json, sys
from tasks.store import chroma
from tasks.models import MINILM, load_model

where, rows_file, hold = sys.argv[1:4]
rows = json.loads(open(rows_file).read())
if where.startswith("port:"):
    client = chroma.connect(host="127.0.0.1", port=int(where[5:]))
else:
    client = chroma.connect(where)
model = load_model(MINILM)
print("ready", flush=True)

def progress(done, total):
    print(f"batch {done}/{total}", flush=True)
    if hold == "hold" and done == 2:
        print("holding", flush=True)
        sys.stdin.readline()

def waiting(holder):
    print(f"waiting for pid {holder.pid if holder else None}", flush=True)

result = chroma.publish(client, rows, model, MINILM, 384, batch_size=2, progress=progress,
                       on_wait=waiting, lock_timeout=120)
print("published " + result.collection, flush=True)
"""


def start_publisher(where: str, rows: list[dict], tmp_path: Path, name: str, hold: bool):
    rows_file = tmp_path / f"{name}.json"
    rows_file.write_text(json.dumps(rows))
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, where, str(rows_file), "hold" if hold else "go"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    """The child's first line starting with `prefix` (the child dying first fails the test)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"child exited ({proc.wait(timeout=60)}) before saying {prefix!r}")


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return next(line for line in out.splitlines() if line.startswith("published "))[10:]


@pytest.fixture(scope="module")
def two_corpora():
    return nist_rows(range(5, 7), "governance"), nist_rows(range(12, 14), "actions")


def test_two_publishers_started_together_both_finish_one_after_the_other(tmp_path, two_corpora):
    path = str(tmp_path / "chroma")
    first_rows, second_rows = two_corpora
    first = start_publisher(path, first_rows, tmp_path, "first", hold=True)
    read_until(first, "holding")

    second = start_publisher(path, second_rows, tmp_path, "second", hold=False)
    # The second says at once whom it waits for, while the first holds the lock mid-publish.
    assert read_until(second, "waiting for") == f"waiting for pid {first.pid}"
    first.stdin.write("go\n")
    first.stdin.flush()

    first_name, second_name = finish(first), finish(second)
    client = chroma.connect(path)
    live = chroma.resolve_alias(client, "docs")
    assert live.name == second_name and live.count() == len(second_rows)
    assert chroma.list_versions(client, "docs") == [second_name, first_name]


def test_a_publisher_killed_while_it_embeds_does_not_block_the_next(tmp_path, two_corpora, minilm):
    """SIGKILL leaves no chance to clean up; the kernel still releases the file lock."""
    path = tmp_path / "chroma"
    old_rows, new_rows = two_corpora
    client = chroma.connect(path)
    old = chroma.publish(client, old_rows, minilm, MINILM, 384)
    killed = start_publisher(str(path), new_rows, tmp_path, "killed", hold=True)
    read_until(killed, "holding")
    assert locks.file_holder(path / locks.LOCK_FILE).pid == killed.pid
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    killed.stdout.close()
    partial = next(
        c.name
        for c in client.list_collections()
        if c.name not in {old.collection, chroma.REGISTRY, locks.LEASES}
    )
    # Readers still see the old version, whole.
    assert chroma.resolve_alias(client, "docs").name == old.collection
    other_rows = nist_rows(range(7, 9), "risks")

    waits = []
    done = chroma.publish(
        client, other_rows, minilm, MINILM, 384, lock_timeout=60, on_wait=waits.append
    )

    assert waits == []  # nothing held the lock: its holder was dead
    assert done.swapped and done.previous == old.collection
    assert chroma.resolve_alias(client, "docs").count() == len(other_rows)
    # The half-written version of the killed publish is gone and reported; live and previous stay.
    assert done.removed == [partial]
    names = {c.name for c in client.list_collections()}
    assert partial not in names and {old.collection, done.collection} <= names


def test_a_publisher_that_cannot_get_the_lock_in_time_names_the_holder(tmp_path, minilm):
    client = chroma.connect(tmp_path / "chroma")
    seen = []
    with (
        locks.publish_lock(client, what="a long publish"),
        pytest.raises(locks.LockTimeout, match=rf"held by pid {os.getpid()} on .*kill"),
    ):
        chroma.publish(
            client,
            nist_rows(range(5, 6), "governance"),
            minilm,
            MINILM,
            384,
            lock_timeout=1,
            on_wait=seen.append,
        )
    assert [holder.what for holder in seen] == ["a long publish"]
    # Nothing was written while it waited.
    assert {c.name for c in client.list_collections()} <= {chroma.REGISTRY}


# Takes the server's publish lease with a short lifetime, says "held", then waits on stdin.
LEASE_HOLDER = """
import sys
from tasks.store import chroma, locks

client = chroma.connect(host="127.0.0.1", port=int(sys.argv[1]))
with locks.publish_lock(client, what="a publisher about to die", lease_seconds=3):
    print("held", flush=True)
    sys.stdin.readline()
"""


def hold_lease(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    read_until(proc, "held")
    return proc


def test_a_dead_publishers_lease_on_a_server_runs_out(chroma_server, minilm):
    holder = hold_lease(chroma_server)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    client = chroma.connect(host="127.0.0.1", port=chroma_server)
    rows = nist_rows(range(5, 6), "governance")
    waits = []

    done = chroma.publish(
        client, rows, minilm, MINILM, 384, alias="leased", lock_timeout=60, on_wait=waits.append
    )

    # It had to wait (the lease outlived its holder by at most its 3 s), then published.
    assert [(h.pid, h.what) for h in waits] == [(holder.pid, "a publisher about to die")]
    assert done.swapped and chroma.resolve_alias(client, "leased").count() == len(rows)


def test_a_live_lease_holder_keeps_others_out_and_unlock_clears_a_dead_ones_lease(chroma_server):
    holder = hold_lease(chroma_server)
    client = chroma.connect(host="127.0.0.1", port=chroma_server)
    try:
        # Renewed every second, so a waiter more patient than the lease's 3 s still times out.
        with (
            pytest.raises(locks.LockTimeout, match=rf"held by pid {holder.pid}.*ragtune unlock"),
            locks.publish_lock(client, timeout=5),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)

    cleared = locks.break_lock(client)

    assert cleared is not None and cleared.pid == holder.pid
    # Free at once, well before the dead holder's lease would have run out.
    with locks.publish_lock(client, timeout=0.5) as held:
        held.check()
    assert locks.break_lock(client) is None
