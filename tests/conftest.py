"""Shared fixtures: a real ephemeral Prefect API, the real bundled models, real PDFs."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Set before prefect, transformers or chromadb are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NIST_PDF = ROOT / "data" / "sources" / "NIST.AI.600-1.pdf"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real, throwaway Prefect API for tests that run flows."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, loaded once per session."""
    from tasks.models import MINILM, load_model

    return load_model(MINILM)


@pytest.fixture
def workspace(tmp_path):
    from tasks.workspace import Workspace

    return Workspace.at(tmp_path / "workspace")


@pytest.fixture
def ready_workspace(workspace, minilm):
    """Chunks saved by ingest and a model folder saved with a query prompt, as finetune does."""
    from tasks.workspace import save_rows
    from tests.test_store import nist_rows

    rows = nist_rows(range(5, 8), "nist")
    save_rows(workspace.chunks_dir, rows)
    save_with_prompts(minilm, workspace.model_dir("m"), {"query": "query: ", "document": ""})
    return workspace, rows


def save_with_prompts(model, folder: Path, prompts: dict[str, str]) -> Path:
    """Save `model` to `folder` with these prompts in its config, as the finetune flow does."""
    model.save(str(folder))
    config = folder / "config_sentence_transformers.json"
    settings = json.loads(config.read_text())
    settings["prompts"] = prompts
    config.write_text(json.dumps(settings))
    return folder
