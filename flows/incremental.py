"""Skip stages whose inputs have not changed since they last completed.

Each stage's key chains the key of the stage before it with its own parameters, and the first
key hashes the source files' contents: change a document and everything downstream re-runs,
change only the training recipe and ingest and generation are reused. Keys and summaries live
in the workspace's ledger (`stages.json`), next to the outputs they describe.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from flows.params import RUNNER_FIELDS
from tasks.workspace import Ledger, Workspace, fingerprint, fingerprint_files

R = TypeVar("R", bound=BaseModel)


#: Stages that always run: publishing is idempotent and cheap when nothing changed, and
#: re-pointing the alias is the point of running it.
ALWAYS_RUN = frozenset({"publish"})


class StageFailed(RuntimeError):
    """A stage's error, named by stage, so a failed run's final message says where it broke.

    Stages that completed before it stay recorded: the next run resumes after them.
    """


class StageRunner:
    """Runs stage flows in order, reusing a stage's last result when its inputs are unchanged."""

    def __init__(self, workspace: str, first_key: str = "") -> None:
        self.ledger = Ledger(Workspace.at(workspace))
        self.key = first_key
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def run(
        self, stage: str, flow: Callable[[BaseModel], R], params: BaseModel, reads: str = ""
    ) -> R:
        """Run `flow`, or reuse its last result; `reads` fingerprints inputs that are not in
        the parameters (the query log a learn stage reads)."""
        # Where the work runs does not change what it produces, so it is not part of the key.
        inputs = params.model_dump(mode="json", exclude=RUNNER_FIELDS)
        self.key = fingerprint(self.key, stage, inputs, reads)
        done = None if stage in ALWAYS_RUN else self.ledger.completed(stage, self.key)
        if done is not None and _outputs_exist(done):
            self.reused.append(stage)
            self.seconds[stage] = 0.0
            print(f"{stage}: inputs unchanged since its last run; reusing its result")
            return _result_class(flow).model_validate(done)
        start = time.perf_counter()
        try:
            result = flow(params)
        except Exception as exc:
            raise StageFailed(f"stage {stage!r} failed: {type(exc).__name__}: {exc}") from exc
        self.seconds[stage] = round(time.perf_counter() - start, 1)
        if _complete(result):
            self.ledger.record(stage, self.key, result.model_dump(mode="json"))
        return result


def _outputs_exist(summary: dict) -> bool:
    """A recorded result is only reusable while the files it points at are still there."""
    paths = [v for k, v in summary.items() if k.endswith(("_path", "_dir")) and v]
    return all(Path(p).exists() for p in paths)


def _complete(result: BaseModel) -> bool:
    """A stage with failed items (LLM calls that gave up) is re-run next time to retry them."""
    return not getattr(result, "failed", 0)


def _result_class(flow: Callable) -> type[BaseModel]:
    """The pydantic result model a stage flow declares as its return type."""
    return typing.get_type_hints(getattr(flow, "fn", flow))["return"]


def sources_key(sources: list[str]) -> str:
    """The first key of a run: the content of every source document."""
    from tasks.ingest.documents import find_documents

    return fingerprint_files(path for path, _root in find_documents(sources))
