"""prefect.yaml as a user runs it: a real `prefect server`, `prefect deploy --all`, a real
process worker picking up a run of the `demo` deployment, and its artifacts read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pypdf import PdfReader, PdfWriter

from tests.conftest import NIST_PDF, ROOT, free_port

BIN = Path(sys.executable).parent


def wait_until(check, deadline_s: float, what: str):
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 120, "prefect server health")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def prefect(env, *args: str) -> str:
    done = subprocess.run(
        [BIN / "prefect", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_deployments_apply_and_a_worker_runs_the_demo(prefect_server, tmp_path):
    env = prefect_server
    sources = tmp_path / "sources"
    sources.mkdir()
    writer = PdfWriter()
    for page in PdfReader(NIST_PDF).pages[8:9]:
        writer.add_page(page)
    with open(sources / "excerpt.pdf", "wb") as handle:
        writer.write(handle)

    prefect(env, "work-pool", "create", "ragtune", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    listed = prefect(env, "deployment", "ls")
    for name in ("demo", "refresh-nightly", "retrain-weekly"):
        assert name in listed

    params = {
        "workspace": str(tmp_path / "workspace"),
        "sources": [str(sources)],
        "ingest": {"max_tokens": 128},
        "questions": {"questions_per_chunk": 2},
        "finetune": {"max_steps": 2, "batch_size": 8, "max_seq_length": 64},
        "publish_if_gated": True,
    }
    # A misspelt setting is refused before any run starts, naming it.
    typo = json.dumps({"params": params | {"finetune": {"epochz": 5}}})
    refused = subprocess.run(
        [BIN / "prefect", "deployment", "run", "pipeline/demo", "--params", typo],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "epochz" in refused.stdout + refused.stderr

    out = prefect(
        env, "deployment", "run", "pipeline/demo", "--params", json.dumps({"params": params})
    )
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    worker = subprocess.run(
        [BIN / "prefect", "worker", "start", "--pool", "ragtune", "--run-once"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    api = env["PREFECT_API_URL"]
    run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    assert "Published" in run["state"]["message"]

    artifacts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).json()
    keys = {a["key"] for a in artifacts if a.get("key")}
    assert {"ingest-summary", "questions-summary", "pipeline-summary"} <= keys
    assert "evaluation-metrics" in keys


def test_serve_offers_the_same_deployments_as_prefect_yaml():
    from flows.serve import deployments

    built = {d.name: d for d in deployments()}
    assert set(built) == {"demo", "refresh-nightly", "learn-nightly", "retrain-weekly"}
    assert built["refresh-nightly"].schedules[0].schedule.cron == "0 2 * * *"
    assert built["learn-nightly"].schedules[0].schedule.cron == "0 1 * * *"
    assert not built["demo"].schedules
