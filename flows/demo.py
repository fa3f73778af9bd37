"""What `make demo` prints at the end: where everything is, the report, and one example.

Every line must be true as printed. A held-out question is one the bundled Gemma wrote from a
chunk; a 270M model writes some its chunk cannot answer, so the label stage keeps only the
grounded ones (the judge ranks their own chunk high among the base model's candidates), and
the demo still says "written from", never "answered by": a grounded question is one the judge
prefers its chunk for, not one a person checked. It counts, over all held-out questions, how
often the tuned model ranks the chunk a question was written from higher, lower or the same as
the base model, and shows the question at the median of those rank changes: a rule the output
states, so the example is neither the best case nor picked to flatter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.params import LabelSettings

#: What "not in the top 100" counts as when ranks are compared.
BEYOND = 101


@dataclass(frozen=True)
class Example:
    question: str
    chunk_id: str
    source: str
    page: int
    base_rank: int | None
    tuned_rank: int | None


@dataclass(frozen=True)
class RankChanges:
    """How the tuned model moved each held-out question's own chunk, against the base model."""

    #: each question's rank change (positive: the tuned model ranks its chunk higher), sorted
    moves: tuple[int, ...]
    #: the held-out question at the median rank change
    median: Example | None

    @property
    def better(self) -> int:
        return sum(1 for move in self.moves if move > 0)

    @property
    def worse(self) -> int:
        return sum(1 for move in self.moves if move < 0)

    @property
    def same(self) -> int:
        return sum(1 for move in self.moves if move == 0)


def rank_changes(
    workspace: str,
    base_model: str,
    tuned_model: str,
    dim: int,
    metrics: Mapping[str, Any] | None = None,
) -> RankChanges:
    """Every held-out question's own-chunk rank under both models at `dim`, counted as better,
    worse or the same, and the question at the median change (the earlier one of two).

    The ranks are the evaluation's own when its report's `metrics` (metrics.json) hold them;
    without them (a report written before reports held ranks) both models are evaluated
    again."""
    from tasks.models import load_model
    from tasks.retrieval.evaluation import evaluate_model
    from tasks.training.data import held_out_queries
    from tasks.workspace import Workspace, load_rows

    ws = Workspace.at(workspace)
    rows = {row["id"]: row for row in load_rows(ws.chunks_dir)}
    corpus = {cid: row["text"] for cid, row in rows.items()}
    queries, relevant = held_out_queries(load_rows(ws.questions_dir), corpus)
    if not queries:
        return RankChanges((), None)
    saved = saved_ranks(metrics, dim) if metrics else None
    if saved is not None and saved[0].keys() == saved[1].keys() == queries.keys():
        base, tuned = saved
    else:
        args = (corpus, queries, relevant, [dim])
        base = evaluate_model(load_model(base_model), *args, name="base").first_rank[dim]
        tuned = evaluate_model(load_model(tuned_model), *args, name="tuned").first_rank[dim]
    # Positive: the tuned model ranks the chunk higher (a smaller rank).
    change = {qid: (base[qid] or BEYOND) - (tuned[qid] or BEYOND) for qid in base}
    order = sorted(change, key=change.__getitem__)
    qid = order[(len(order) - 1) // 2]
    own = next(iter(relevant[qid]))
    return RankChanges(
        moves=tuple(change[q] for q in order),
        median=Example(
            question=queries[qid],
            chunk_id=own,
            source=str(rows[own].get("source", "")),
            page=int(rows[own].get("page_start") or 0),
            base_rank=base[qid],
            tuned_rank=tuned[qid],
        ),
    )


def saved_ranks(
    metrics: Mapping[str, Any], dim: int
) -> tuple[dict[str, int | None], dict[str, int | None]] | None:
    """The base and tuned models' first-relevant ranks at `dim` from an evaluation report's
    metrics.json, or None where the report holds none."""
    models = {m["name"]: m for m in metrics["models"]}
    try:
        return models["base"]["first_rank"][str(dim)], models["tuned"]["first_rank"][str(dim)]
    except KeyError:
        return None


def _rank(rank: int | None) -> str:
    return f"rank {rank}" if rank is not None else "not in the top 100"


def held_out_line(total: int, dim: int, label: LabelSettings | None) -> str:
    """What the held-out questions are, as the run made them."""
    checked = (
        f"each grounded: the judge ranked its own chunk in its top {label.ground_top_r} among "
        f"the base model's top {label.top_k} and that chunk"
        if label is not None and label.enabled
        else "not checked for being answerable"
    )
    return (
        f"On the {total} held-out questions (written by the bundled Gemma from their chunks, "
        f"never trained on; {checked}), at dim {dim}"
    )


def print_demo_summary(result: Any, workspace: str, label: LabelSettings | None = None) -> None:
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
    changes = rank_changes(workspace, base_model, result.model_path, result.dim, metrics)
    total = changes.better + changes.worse + changes.same
    print(
        f"\n{held_out_line(total, result.dim, label)} the tuned model ranks a question's own "
        f"chunk higher than the base model for {changes.better}, lower for {changes.worse} and "
        f"the same for {changes.same}."
    )
    print(
        "Tuning helped on these questions by the gate's test: the tuned model is published."
        if result.published
        else "Tuning did not clearly help on these questions, so nothing was published (the "
        "gate's reason is above)."
    )
    example = changes.median
    if example is None:
        return
    print(
        f"\nExample, the held-out question at the median rank change: {example.question!r}, "
        f"written from {example.source} p.{example.page}. That chunk is "
        f"{_rank(example.base_rank)} with the base model and {_rank(example.tuned_rank)} with "
        "the tuned one."
    )
    if result.published:
        print("\nWhat `ragtune search` returns for it now:")
        search_flow.fn(
            SearchParams(workspace=workspace, query=example.question, k=3, alias=result.alias)
        )
