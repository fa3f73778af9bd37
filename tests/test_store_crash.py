"""A publisher killed half-way must leave readers on the old, complete collection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tasks.models import MINILM
from tasks.store import chroma
from tests.conftest import ROOT, nist_rows

# Publishes the rows in a JSON file in batches of 2, printing a line after each stored batch.
PUBLISHER = """
import json, sys
from tasks.store import chroma
from tasks.models import MINILM, load_model

path, rows_file = sys.argv[1:3]
rows = json.loads(open(rows_file).read())
client = chroma.connect(path)
print("ready", flush=True)
chroma.publish(client, rows, load_model(MINILM), MINILM, 384, batch_size=2,
              progress=lambda done, total: print(f"batch {done}/{total}", flush=True))
print("finished", flush=True)
"""


def test_a_publish_killed_mid_way_keeps_the_old_version_live_and_a_rerun_completes(
    tmp_path, minilm
):
    path = tmp_path / "chroma"
    old_rows = nist_rows(range(5, 7), "governance")
    new_rows = old_rows[:4] + nist_rows(range(12, 14), "actions")
    client = chroma.connect(path)
    old = chroma.publish(client, old_rows, minilm, MINILM, 384)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(new_rows))

    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(path), str(rows_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    batches = []
    for line in publisher.stdout:
        if line.startswith("batch"):
            batches.append(line)
        if len(batches) == 3:
            publisher.send_signal(signal.SIGKILL)
            break
    publisher.wait(timeout=60)
    publisher.stdout.close()
    assert len(batches) == 3, "the publisher finished or died before it could be killed"
    assert publisher.returncode == -signal.SIGKILL

    # Readers still see the old collection, whole; the half-written one is not live.
    live = chroma.resolve_alias(client, "docs")
    assert live.name == old.collection and live.count() == len(old_rows)
    assert chroma.search(client, "docs", old_rows[7]["text"], k=1)[0].id == old_rows[7]["id"]
    partial = next(
        c for c in client.list_collections() if c.name not in {old.collection, chroma.REGISTRY}
    )
    stored = client.get_collection(partial.name).count()
    assert 6 <= stored < len(new_rows)

    rerun = chroma.publish(client, new_rows, minilm, MINILM, 384)

    assert rerun.collection == partial.name and rerun.swapped
    assert rerun.previous == old.collection and rerun.count == len(new_rows)
    # Only what the killed run had not stored is paid for again.
    assert rerun.embedded + rerun.copied == len(new_rows) - stored
    target = new_rows[-1]
    assert chroma.search(client, "docs", target["text"], k=1)[0].id == target["id"]
