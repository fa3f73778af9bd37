"""What `make demo` prints at the end: where everything is, the report, and one example.

The example must teach something true. A generated question can be one its chunk does not
answer (a 270M model makes things up), and its chunk's rank then says nothing about the
retriever. So the example is a held-out question whose chunk the LLM judge prefers over the
chunks the tuned model ranks highest, shown with its chunk's rank under the base and the tuned
model side by side, whatever those ranks are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Held-out questions the judge reads, at most, to find one whose chunk answers it.
CANDIDATES = 8
#: Chunks the judge compares the question's own chunk with.
RIVALS = 3


@dataclass(frozen=True)
class Example:
    question: str
    chunk_id: str
    source: str
    page: int
    base_rank: int | None
    tuned_rank: int | None
    rivals: int


def answered_example(workspace: str, base_model: str, tuned_model: str, dim: int) -> Example | None:
    """The first of the held-out questions whose own chunk the judge ranks above the tuned
    model's top other chunks, with that chunk's rank (None: beyond 100) under both models."""
    from tasks.llm.likelihood import style_judges
    from tasks.models import load_model
    from tasks.retrieval.evaluation import evaluate_model
    from tasks.training.data import held_out_queries
    from tasks.workspace import Workspace, load_rows

    ws = Workspace.at(workspace)
    rows = {row["id"]: row for row in load_rows(ws.chunks_dir)}
    corpus = {cid: row["text"] for cid, row in rows.items()}
    queries, relevant = held_out_queries(load_rows(ws.questions_dir), corpus)
    picked = dict(list(queries.items())[:CANDIDATES])
    if not picked:
        return None
    args = (corpus, picked, relevant, [dim])
    base = evaluate_model(load_model(base_model), *args, name="base")
    tuned = evaluate_model(load_model(tuned_model), *args, name="tuned", keep_hits=True)
    judge_for = style_judges()
    for qid, question in picked.items():
        own = next(iter(relevant[qid]))
        others = [cid for cid, _ in tuned.hits[dim][qid] if cid != own][:RIVALS]
        scores = judge_for(question).score(
            question, [corpus[own], *(corpus[cid] for cid in others)]
        )
        if max(range(len(scores)), key=scores.__getitem__) == 0:
            return Example(
                question=question,
                chunk_id=own,
                source=str(rows[own].get("source", "")),
                page=int(rows[own].get("page_start") or 0),
                base_rank=base.first_rank[dim][qid],
                tuned_rank=tuned.first_rank[dim][qid],
                rivals=len(others),
            )
    return None


def _rank(rank: int | None) -> str:
    return f"rank {rank}" if rank is not None else "not in the top 100"


def print_demo_summary(result: Any, workspace: str) -> None:
    from flows.params import SearchParams
    from flows.search import search as search_flow
    from tasks.workspace import Workspace

    ws = Workspace.at(workspace)
    print("\n" + "=" * 72)
    print(f"model:   {result.model_path}")
    print(f"report:  {result.report_dir}/report.md")
    print(f"chroma:  {ws.chroma_dir}")
    if result.published:
        print(f"alias:   {result.alias} -> {result.collection}")
    else:
        print(f"gate:    not published: {result.gate_reason}")
    print(f"seconds: {json.dumps(result.seconds)}")
    report = Path(result.report_dir) / "report.md"
    if report.exists():
        print("\n" + report.read_text())
    metrics = json.loads((Path(result.report_dir) / "metrics.json").read_text())
    base_model = next(m["model"] for m in metrics["models"] if m["name"] == "base")
    example = answered_example(workspace, base_model, result.model_path, result.dim)
    if example is None:
        print(f"\nNo example: the judge found none of the first {CANDIDATES} held-out questions")
        print("answered best by its own chunk (a small generator writes some it cannot answer).")
        return
    print(f"\nExample, a held-out question the model never trained on: {example.question!r}")
    print(
        f"Its chunk ({example.source} p.{example.page}) answers it: the LLM judge prefers it to "
        f"the tuned model's {example.rivals} other top chunks."
    )
    print(
        f"At dim {result.dim} that chunk is {_rank(example.base_rank)} with the base model and "
        f"{_rank(example.tuned_rank)} with the tuned one."
    )
    if result.published:
        print("\nWhat `ragtune search` returns for it now:")
        search_flow.fn(
            SearchParams(workspace=workspace, query=example.question, k=3, alias=result.alias)
        )
