"""Training rows for fine-tuning: a user's own pairs or triplets, or the generated questions.

The trainer wants columns named (anchor, positive[, negative]). Users' files come with the names
their tools gave them (query/passage, question/answer, pos/neg), so common aliases are renamed;
anything else is a clear error that names the file and the missing column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset

from tasks.files import read_jsonl
from tasks.workspace import rows_to_dataset

#: Accepted names for each training column, in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {
    "anchor": ("anchor", "query", "question", "sentence_0", "sentence1"),
    "positive": (
        "positive",
        "passage",
        "document",
        "text",
        "pos",
        "answer",
        "context",
        "sentence_1",
        "sentence2",
    ),
    "negative": ("negative", "neg", "hard_negative", "sentence_2", "sentence3"),
}


def load_pairs(path: str | Path) -> Dataset:
    """Load (anchor, positive[, negative]) rows from CSV, JSONL or a saved HF dataset folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"training file {path} does not exist")
    if path.is_dir():
        rows = _read_dataset_folder(path)
    elif path.suffix.lower() in {".csv", ".tsv"}:
        rows = _read_csv(path)
    elif path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        rows = _read_jsonl(path)
    else:
        raise ValueError(
            f"{path}: unsupported training file type {path.suffix!r}; "
            "use .csv, .tsv, .jsonl or a folder saved with `Dataset.save_to_disk`."
        )
    return normalise_columns(rows, str(path))


def normalise_columns(rows: list[dict[str, Any]], source: str) -> Dataset:
    """Rename aliases to anchor/positive/negative, drop other columns and empty rows."""
    if not rows:
        raise ValueError(f"{source} has no rows")
    columns = list(rows[0])
    lowered = {name.strip().lower(): name for name in columns}
    chosen: dict[str, str] = {}
    for target, aliases in ALIASES.items():
        found = next((lowered[a] for a in aliases if a in lowered), None)
        if found is not None:
            chosen[target] = found
    missing = [target for target in ("anchor", "positive") if target not in chosen]
    if missing:
        hints = "; ".join(f"{m!r} (or {', '.join(ALIASES[m][1:4])})" for m in missing)
        raise ValueError(f"{source} is missing column {hints}; it has columns {columns}.")
    out = []
    for number, row in enumerate(rows, start=1):
        record = {target: _text(row.get(name)) for target, name in chosen.items()}
        if not record["anchor"] or not record["positive"]:
            continue
        if "negative" in record and not record["negative"]:
            raise ValueError(f"{source}: row {number} has an empty negative")
        out.append(record)
    if not out:
        raise ValueError(f"{source} has no rows with both an anchor and a positive")
    return rows_to_dataset(out)


def pairs_from_questions(
    questions: list[dict[str, Any]], chunks: Mapping[str, str], split: str = "train"
) -> Dataset:
    """(question, chunk text) pairs for the kept questions of one split."""
    rows = []
    for q in questions:
        if q.get("split") != split or not q.get("kept", True):
            continue
        text = chunks.get(q["chunk_id"])
        if text is None:
            raise ValueError(
                f"question {q['question']!r} points to chunk {q['chunk_id']!r}, which is not in "
                "the chunk set: re-run ingest and questions on the same workspace."
            )
        rows.append({"anchor": q["question"], "positive": text})
    if not rows:
        raise ValueError(
            f"no kept questions in the {split!r} split: generate questions first, or lower the "
            "round-trip filter's strictness."
        )
    return rows_to_dataset(rows)


def held_out_queries(
    questions: list[dict[str, Any]], chunks: Mapping[str, str], split: str = "test"
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Kept questions of the held-out split as IR queries, each relevant to its own chunk.

    The one definition of the held-out set, for evaluation during training and after it. Query
    ids are the question's row number, stable for an unchanged question set. A question whose
    chunk is gone (re-chunked since it was asked) is an error: leaving it out would quietly
    shrink the test, counting it a miss would blame the model.
    """
    from tasks.retrieval.evaluation import MetricsError

    queries: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    stale = 0
    for number, q in enumerate(questions):
        if q.get("split") != split or not q.get("kept"):
            continue
        if q["chunk_id"] not in chunks:
            stale += 1
            continue
        qid = f"q{number}"
        queries[qid] = q["question"]
        relevant[qid] = {q["chunk_id"]}
    if stale:
        raise MetricsError(
            f"{stale} {split} questions refer to chunks that are no longer in the corpus: "
            f"re-run the questions flow after re-chunking."
        )
    return queries, relevant


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        sample = handle.read(4096)
        handle.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in sample.split("\n")[0] else ","
        return list(csv.DictReader(handle, delimiter=delimiter))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return json.loads(text)
    rows = []
    for number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        rows.append(row)
    return rows


def _read_dataset_folder(path: Path) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"{path} is not a dataset saved with `save_to_disk`: {exc}") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path} holds splits {list(data)} but no 'train' split")
        data = data["train"]
    return data.to_list()
