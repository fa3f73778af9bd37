"""The ingest flow on a real Prefect API: a good PDF is chunked and saved, a bad file is
skipped and reported, and the dashboard gets a summary artifact."""

from __future__ import annotations

import shutil

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.ingest import IngestResult, ingest
from flows.params import IngestParams
from tasks.workspace import fingerprint_rows, load_rows
from tests.conftest import FIXTURES


def test_ingest_saves_chunks_and_reports_the_bad_file(prefect_api, workspace, tmp_path):
    sources = tmp_path / "docs"
    sources.mkdir()
    shutil.copy(FIXTURES / "RAGAS_2309.15217.pdf", sources / "ragas.pdf")
    (sources / "minutes.docx").write_bytes(b"PK\x03\x04 a word file")
    (sources / "menu.txt").write_bytes("Crème brûlée, thé glacé à la carte.".encode("cp1252"))

    state = ingest(
        IngestParams(workspace=str(workspace.root), sources=[str(sources)], max_tokens=512),
        return_state=True,
    )
    result = state.result()

    assert isinstance(result, IngestResult)
    assert (result.files, result.pages) == (2, 9)
    assert result.skipped == ["minutes.docx: unsupported file type '.docx'"]
    assert result.decoded == ["menu.txt: decoded as cp1252"]
    rows = load_rows(workspace.chunks_dir)
    assert result.chunks_path == str(workspace.chunks_dir)
    assert len(rows) == result.chunks > 10
    assert set(rows[0]) == {"id", "doc_id", "source", "page_start", "page_end", "text", "n_tokens"}
    assert {r["doc_id"] for r in rows} == {"ragas.pdf", "menu.txt"}
    assert any("Crème brûlée" in r["text"] for r in rows)
    # 512 asked, but MiniLM embeds 256 tokens including [CLS] and [SEP]: capped at 254
    assert max(r["n_tokens"] for r in rows) <= 254
    assert sum(r["n_tokens"] for r in rows) == result.tokens
    assert result.fingerprint == fingerprint_rows(rows)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    summary = next(a for a in artifacts if a.key == "ingest-summary")
    assert "minutes.docx: unsupported file type '.docx'" in summary.data
    assert "menu.txt: decoded as cp1252" in summary.data
    assert f"| 2 | 9 | {result.chunks} | {result.tokens} |" in summary.data
