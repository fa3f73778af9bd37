"""Where every stage reads and writes.

Stages talk through files, not through Prefect results, so that each flow can run alone, be
inspected with ordinary tools, be resumed after a crash and be cached by content. Large objects
(chunks, question sets, models) never travel as task results; paths and small summaries do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.files import file_sha256

if TYPE_CHECKING:
    from datasets import Dataset

DEFAULT_WORKSPACE = "workspace"


@dataclass(frozen=True)
class Workspace:
    """The folder layout shared by all stages (see docs/architecture.md)."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] = DEFAULT_WORKSPACE) -> Workspace:
        path = Path(root).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    @property
    def questions_dir(self) -> Path:
        return self.root / "questions"

    @property
    def question_cache(self) -> Path:
        return self.root / "cache" / "questions"

    @property
    def querylog_dir(self) -> Path:
        return self.root / "querylog"

    @property
    def judgement_cache(self) -> Path:
        return self.root / "cache" / "judgements.sqlite"

    @property
    def learned_dir(self) -> Path:
        """What `learn` made of the log: training rows and the held-out judged queries."""
        return self.root / "learned"

    @property
    def judged_questions_dir(self) -> Path:
        """Training rows the label stage made of the synthetic questions' judgements."""
        return self.learned_dir / "synthetic"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def chroma_dir(self) -> Path:
        return self.root / "chroma"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def newest_model(self) -> Path:
        """The most recently saved sentence-transformers folder under models/: what evaluate
        and publish use when no model is named."""
        saved = list(self.models_dir.glob("*/modules.json")) if self.models_dir.is_dir() else []
        if not saved:
            raise FileNotFoundError(
                f"no model in {self.models_dir}: run `ragtune finetune` first, or name one "
                f"(a folder, a hub id, or the bundled all-MiniLM-L6-v2)"
            )
        return max(saved, key=lambda p: p.stat().st_mtime).parent

    def report_dir(self, run: str) -> Path:
        return self.reports_dir / run


def save_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Save rows as a `datasets` dataset, replacing what was there.

    Written to a sibling folder first and renamed, so a crash never leaves a half-written set
    where the next stage would read it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    rows_to_dataset(rows).save_to_disk(str(tmp))
    if path.exists():
        _rmtree(path)
    tmp.rename(path)
    return path


def rows_to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """`Dataset.from_list` with a random fingerprint instead of a hashed one.

    `datasets` fingerprints a new dataset by pickling its table with dill, and dill disassembles
    functions by printing them; inside a Prefect run with `log_prints` every line of that
    bytecode lands in the run log. ragtune never relies on `datasets`' transform cache, so a
    random fingerprint loses nothing.
    """
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable.from_pylist(rows), fingerprint=generate_random_fingerprint())


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Load rows saved by `save_rows`; a missing folder is a clear error naming the stage."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the stage that writes it first (see `ragtune --help`)."
        )
    return load_from_disk(str(path)).to_list()


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (used for cache keys and names)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def fingerprint_rows(rows: Iterable[dict[str, Any]], key: str = "id") -> str:
    """Fingerprint a set of rows by their ids, independent of order."""
    return fingerprint(sorted(str(row[key]) for row in rows))


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def fingerprint_files(paths: Iterable[Path]) -> str:
    """Fingerprint files by name and content, so a touched but unchanged file is not "new"."""
    return fingerprint([(str(path), file_sha256(path)) for path in sorted(Path(p) for p in paths)])


class Ledger:
    """Which stage last ran on which inputs, and what it produced.

    A stage whose inputs (content fingerprints plus parameters) match its last completed run is
    skipped and its recorded summary reused: an unchanged corpus costs seconds, and a run that
    failed half way resumes from the last stage that completed.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.path = workspace.root / "stages.json"

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def completed(self, stage: str, key: str) -> dict[str, Any] | None:
        entry = self._read().get(stage)
        return entry["summary"] if entry and entry["key"] == key else None

    def record(self, stage: str, key: str, summary: dict[str, Any]) -> None:
        entries = self._read()
        entries[stage] = {"key": key, "summary": summary}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=2, default=str))
        tmp.replace(self.path)
