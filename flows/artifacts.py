"""Dashboard artifacts that every flow shares: progress bars, tables, markdown.

Tasks report progress through a plain callback, `progress(done, total)`, so they stay testable
without Prefect; flows turn that callback into a Prefect progress artifact here. Outside a flow
run (a task called directly from Python) the artifact calls are skipped, so the same code runs
ad hoc without an API.
"""

from __future__ import annotations

import re
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from tasks.progress import Progress


def in_run() -> bool:
    """True inside a Prefect flow or task run, where artifacts can be created."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(text: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def progress_artifact(key: str, description: str, every: float = 0.05) -> Progress:
    """A `progress(done, total)` callback that moves a Prefect progress artifact.

    Updates are throttled to steps of `every` (a fraction) so a long loop does not flood the API.
    """
    if not in_run():
        return lambda done, total: None
    artifact_id = create_progress_artifact(0.0, key=artifact_key(key), description=description)
    last = [0.0]

    def report(done: int, total: int) -> None:
        share = 100.0 * done / total if total else 100.0
        if share - last[0] >= 100.0 * every or done >= total:
            last[0] = share
            update_progress_artifact(artifact_id, share)

    return report


def markdown(key: str, text: str, description: str | None = None) -> None:
    if in_run():
        create_markdown_artifact(text, key=artifact_key(key), description=description)


def table(key: str, rows: list[dict[str, Any]], description: str | None = None) -> None:
    if in_run() and rows:
        create_table_artifact(rows, key=artifact_key(key), description=description)
