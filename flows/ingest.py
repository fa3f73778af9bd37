"""Ingest: a folder of documents → the workspace's chunk set.

Reads every source (bad files are skipped and reported, not fatal), splits pages into chunks
measured with the embedding model's own tokenizer, and saves them to `chunks/` for the later
stages. The dashboard gets a summary artifact listing what was read and what was skipped, why.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from flows.artifacts import markdown, progress_artifact
from flows.params import IngestParams
from tasks.ingest.chunking import chunk_pages, max_chunk_tokens
from tasks.ingest.documents import RecordFields, read_documents
from tasks.models import cached_model
from tasks.retrieval.report import markdown_table
from tasks.workspace import Workspace, fingerprint_rows, save_rows


class IngestResult(BaseModel):
    chunks_path: str
    files: int
    pages: int
    chunks: int
    tokens: int
    skipped: list[str] = Field(default_factory=list)
    decoded: list[str] = Field(
        default_factory=list, description="Text files that were not UTF-8, with the encoding read."
    )
    fingerprint: str


@flow(name="ingest", log_prints=True)
def ingest(params: IngestParams = IngestParams()) -> IngestResult:  # noqa: B008
    """Read the sources, chunk them with the model's tokenizer and save the chunk set."""
    logger = get_run_logger()
    ws = Workspace.at(params.workspace)
    model = cached_model(params.base_model)
    limit = max_chunk_tokens(model)
    max_tokens = min(params.max_tokens, limit)
    if max_tokens < params.max_tokens:
        print(f"max_tokens {params.max_tokens} capped at {limit}: what {params.base_model} embeds")

    pages, skipped = read_documents(
        params.sources,
        progress=progress_artifact("ingest-reading", "Reading documents"),
        records=RecordFields(
            params.records_id_field, params.records_text_field, params.records_title_field
        ),
    )
    for item in skipped:
        logger.warning("skipped %s: %s", item.source, item.reason)
    decoded = sorted({f"{p.source}: decoded as {p.encoding}" for p in pages if p.encoding})
    for line in decoded:
        logger.info("%s (not UTF-8)", line)

    chunks = chunk_pages(pages, model.tokenizer, max_tokens=max_tokens, overlap=params.overlap)
    rows = [asdict(chunk) for chunk in chunks]
    path = save_rows(ws.chunks_dir, rows)

    # A record file yields many pages with one source each (`file#id`); count files, not ids.
    files = len({page.source.split("#", 1)[0] for page in pages})
    tokens = sum(chunk.n_tokens for chunk in chunks)
    skipped_lines = [f"{item.source}: {item.reason}" for item in skipped]
    print(
        f"read {files} files ({len(pages)} pages) → {len(chunks)} chunks, {tokens} tokens; "
        f"skipped {len(skipped)}"
    )
    markdown(
        "ingest-summary",
        _summary(params, files, len(pages), len(chunks), tokens, max_tokens, skipped_lines)
        + "".join(f"\n- {line}" for line in decoded),
        description="What ingest read, chunked and skipped",
    )
    return IngestResult(
        chunks_path=str(path),
        files=files,
        pages=len(pages),
        chunks=len(chunks),
        tokens=tokens,
        skipped=skipped_lines,
        decoded=decoded,
        fingerprint=fingerprint_rows(rows),
    )


def _summary(
    params: IngestParams,
    files: int,
    pages: int,
    chunks: int,
    tokens: int,
    max_tokens: int,
    skipped: list[str],
) -> str:
    counts = [
        {"files read": files, "pages": pages, "chunks": chunks, "tokens": tokens},
    ]
    text = (
        f"# Ingest\n\nSources: {', '.join(params.sources)}; chunks of at most {max_tokens} "
        f"{params.base_model} tokens, {params.overlap} overlapping.\n\n" + markdown_table(counts)
    )
    if skipped:
        text += f"\n## Skipped ({len(skipped)})\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    else:
        text += "\nNo file was skipped.\n"
    return text
