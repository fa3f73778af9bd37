"""Load a labelled retrieval set in BEIR layout.

Generated questions measure how well a model retrieves the chunks an LLM asked about; a labelled
set with real human queries (BEIR: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) is the
independent check that the gain is not an artefact of the generator's style.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.files import read_jsonl


class BeirFormatError(ValueError):
    """A BEIR folder that is missing a file or has a malformed line; the message names it."""


def load_beir(
    folder: Path, split: str = "test"
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """Read a BEIR folder into (corpus, queries, qrels).

    The corpus text is the title and the text joined, as BEIR and sentence-transformers evaluate
    it. Only judgements with a score above zero count as relevant, and only the queries judged in
    `split` are returned, so the three mappings describe exactly what gets evaluated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"BEIR folder {folder} does not exist or is not a folder.")
    corpus_path = folder / "corpus.jsonl"
    queries_path = folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise BeirFormatError(
                f"{path} is missing: a BEIR folder holds corpus.jsonl, queries.jsonl and "
                f"qrels/<split>.tsv."
            )
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise BeirFormatError(
            f"{qrels_path} is missing: no judgements for split {split!r}. "
            f"Splits found in {folder / 'qrels'}: {', '.join(available) or 'none'}."
        )

    corpus = {
        doc["_id"]: " ".join(
            part for part in (doc.get("title") or "", doc.get("text") or "") if part
        )
        for doc in _read_jsonl(corpus_path)
    }
    all_queries = {query["_id"]: query["text"] for query in _read_jsonl(queries_path)}
    qrels = _read_qrels(qrels_path)

    unknown = sorted(qid for qid in qrels if qid not in all_queries)
    if unknown:
        raise BeirFormatError(
            f"{qrels_path} judges {len(unknown)} queries that {queries_path} does not define "
            f"(first: {unknown[0]!r})."
        )
    missing_docs = sorted({doc for docs in qrels.values() for doc in docs} - corpus.keys())
    if missing_docs:
        raise BeirFormatError(
            f"{qrels_path} judges {len(missing_docs)} documents that {corpus_path} does not "
            f"contain (first: {missing_docs[0]!r})."
        )
    if not qrels:
        raise BeirFormatError(f"{qrels_path} has no judgement with a score above zero.")
    queries = {qid: all_queries[qid] for qid in all_queries if qid in qrels}
    return corpus, queries, qrels


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for number, row in read_jsonl(path):
            if not isinstance(row, dict) or "_id" not in row or "text" not in row:
                raise BeirFormatError(f"{path}, line {number}: needs the fields '_id' and 'text'.")
            row["_id"] = str(row["_id"])
            rows.append(row)
    except BeirFormatError:
        raise
    except ValueError as exc:
        raise BeirFormatError(str(exc)) from None
    return rows


def _read_qrels(path: Path) -> dict[str, set[str]]:
    qrels: dict[str, set[str]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for number, row in enumerate(reader, start=1):
            if not row or (number == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise BeirFormatError(
                    f"{path}, line {number}: expected 'query-id<TAB>corpus-id<TAB>score'."
                )
            try:
                score = float(row[2])
            except ValueError as exc:
                raise BeirFormatError(
                    f"{path}, line {number}: score {row[2]!r} is not a number."
                ) from exc
            if score > 0:
                qrels.setdefault(row[0], set()).add(row[1])
    return qrels
