"""Finetune: the workspace's questions (or a user's own pairs) → a tuned embedding model.

Trains with a named recipe (`tasks.training.trainer.RECIPES`), evaluates on the held-out
questions against every chunk while training, and saves the model with its card under
`models/<name>/`. The dashboard gets a progress bar while it trains, then the loss curve and
where the card is.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from prefect import flow

from flows.artifacts import markdown, progress_artifact
from flows.params import FinetuneParams
from tasks.models import model_tag
from tasks.retrieval.report import markdown_table
from tasks.training.data import held_out_queries, load_pairs, mix, pairs_from_questions
from tasks.training.recipes import get_recipe
from tasks.training.trainer import EvalSet, TrainResult, TrainSettings, TrainSummary, train
from tasks.workspace import Workspace, fingerprint, load_rows

#: At most this many rows in the loss-curve artifact; longer runs are averaged into buckets.
CURVE_ROWS = 60


class FinetuneResult(TrainSummary):
    """The flow's result: paths and counts (the log history is in its artifacts)."""


#: The stage's fields that are training settings (`TrainSettings`).
TRAIN_FIELDS = {
    "epochs",
    "batch_size",
    "learning_rate",
    "max_steps",
    "max_seq_length",
    "hard_negatives",
    "seed",
}


@flow(name="finetune", log_prints=True)
def finetune(params: FinetuneParams = FinetuneParams()) -> FinetuneResult:  # noqa: B008
    """Fine-tune the base model on the workspace's questions or a training file."""
    ws = Workspace.at(params.workspace)
    spec = get_recipe(params.recipe)
    if params.train_file:
        data = load_pairs(params.train_file)
        source = params.train_file
        # Held-out questions still measure the model when the workspace has them.
        chunks = _chunks(ws) if ws.chunks_dir.exists() else {}
        questions = load_rows(ws.questions_dir) if chunks and ws.questions_dir.exists() else []
    else:
        chunks = _chunks(ws)
        questions = load_rows(ws.questions_dir)
        data, source = _training_set(ws, params, questions, chunks)
    data_fp = fingerprint(sorted(tuple(row.values()) for row in data.to_list()))
    chosen = params.model_dump(include=TRAIN_FIELDS)
    settings = TrainSettings(recipe=spec.name, **chosen)
    # The name follows what changes the model: recipe, base model, data and these settings.
    made_of = {"recipe": spec.name, "base_model": params.base_model, **chosen}
    name = params.output_name or (
        f"{model_tag(params.base_model)}-tuned-{fingerprint(made_of, data_fp)[:6]}"
    )
    queries, relevant = held_out_queries(questions, chunks)
    print(
        f"training {params.base_model} with {spec.name} on {len(data)} rows from {source}; "
        f"evaluating on {len(queries)} held-out questions against {len(chunks)} chunks"
    )
    result = train(
        params.base_model,
        data,
        ws.model_dir(name),
        settings,
        eval_set=EvalSet(chunks, queries, relevant) if queries else None,
        negatives_from=list(chunks.values()) or None,
        data_fingerprint=data_fp,
        progress=progress_artifact("finetune-progress", f"Training {name}"),
    )
    print(f"saved {result.model_path} after {result.steps} steps in {result.wall_s:.0f} s")
    markdown(
        "finetune-curve",
        training_report(result, name),
        description=f"Training curve and model card of {name}",
    )
    # The task's TrainResult also carries the log history and metrics, which the report
    # artifacts above already show; the flow's result keeps paths and counts.
    return FinetuneResult.model_validate(result, from_attributes=True)


def training_report(result: TrainResult, name: str) -> str:
    """Markdown: the loss per logged step (bucketed when long), evaluations, the card's path."""
    losses = [(e["step"], e["loss"]) for e in result.log_history if "loss" in e]
    size = max(1, -(-len(losses) // CURVE_ROWS))
    curve = []
    for start in range(0, len(losses), size):
        bucket = losses[start : start + size]
        curve.append(
            {
                "step": bucket[-1][0],
                "loss": sum(loss for _, loss in bucket) / len(bucket),
            }
        )
    evals = [
        {"step": e["step"]}
        | {k.removeprefix("eval_"): v for k, v in e.items() if k.endswith("cosine_ndcg@10")}
        for e in result.log_history
        if any(k.endswith("cosine_ndcg@10") for k in e)
    ]
    card = Path(result.model_path) / "README.md"
    averaged = f" (each row averages {size} steps)" if size > 1 else ""
    text = (
        f"# Fine-tuning {name}\n\n"
        f"Recipe `{result.recipe}`, {result.train_pairs} training rows, {result.steps} steps, "
        f"{result.wall_s:.0f} s. Matryoshka dims: {result.dims}.\n\n"
        f"Model: `{result.model_path}`; model card: [{card}]({card.as_uri()})\n\n"
        f"## Training loss{averaged}\n\n{markdown_table(curve)}"
    )
    if evals:
        text += f"\n## NDCG@10 on held-out questions during training\n\n{markdown_table(evals)}"
    return text


def _training_set(
    ws: Workspace, params: FinetuneParams, questions: list[dict], chunks: dict[str, str]
) -> tuple[Dataset, str]:
    """The synthetic questions' train split, mixed with what `learn` made of the query log
    where it made anything, each with its weight."""
    learned = ws.learned_dir / "train"
    sets, sources = [], []
    if params.synthetic_weight > 0:
        synthetic = pairs_from_questions(questions, chunks, "train").to_list()
        sets.append((synthetic, params.synthetic_weight))
        sources.append(f"{ws.questions_dir} (train split, weight {params.synthetic_weight:g})")
    if learned.exists() and params.log_weight > 0:
        sets.append((load_rows(learned), params.log_weight))
        sources.append(f"{learned} (judged query log, weight {params.log_weight:g})")
    return mix(sets, params.seed), " + ".join(sources) or "nothing"


def _chunks(ws: Workspace) -> dict[str, str]:
    return {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
