"""Finetune: the workspace's questions (or a user's own pairs) → a tuned embedding model.

Trains with a named recipe (`tasks.training.trainer.RECIPES`), evaluates on the held-out
questions against every chunk while training, and saves the model with its card under
`models/<name>/`. The dashboard gets a progress bar while it trains, then the loss curve and
where the card is.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.artifacts import markdown, progress_artifact
from flows.params import FinetuneParams
from tasks.learn.rows import load_training_rows
from tasks.learn.settings import FORM_RECIPES
from tasks.models import model_tag
from tasks.retrieval.report import markdown_table
from tasks.training.data import held_out_queries, load_pairs, pairs_from_questions
from tasks.training.recipes import get_recipe
from tasks.training.trainer import (
    EvalSet,
    Source,
    TrainResult,
    TrainSettings,
    TrainSummary,
    train,
)
from tasks.workspace import Workspace, fingerprint, load_rows, rows_to_dataset

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
    # With a train file the workspace is optional; its held-out questions still measure.
    chunks = _chunks(ws) if ws.chunks_dir.exists() or not params.train_file else {}
    questions = load_rows(ws.questions_dir) if chunks and ws.questions_dir.exists() else []
    sources, described = _training_set(ws, params, questions, chunks)
    data_fp = fingerprint(
        sorted(
            json.dumps([name, s.recipe, s.weight, row], sort_keys=True)
            for name, s in sources.items()
            for row in s.rows.to_list()
        )
    )
    chosen = params.model_dump(include=TRAIN_FIELDS)
    settings = TrainSettings(recipe=spec.name, **chosen)
    # The name follows what changes the model: recipe, base model, data and these settings.
    made_of = {"recipe": spec.name, "base_model": params.base_model, **chosen}
    name = params.output_name or (
        f"{model_tag(params.base_model)}-tuned-{fingerprint(made_of, data_fp)[:6]}"
    )
    queries, relevant = held_out_queries(questions, chunks)
    print(
        f"training {params.base_model} on "
        f"{sum(len(s.rows) for s in sources.values())} rows from {described}; "
        f"evaluating on {len(queries)} held-out questions against {len(chunks)} chunks"
    )
    result = train(
        params.base_model,
        sources,
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
) -> tuple[dict[str, Source], str]:
    """Every source of training rows the workspace has, each with its weight and the loss its
    rows are for: the user's own pairs, the synthetic questions (the judge's labels where the
    label stage wrote them, else (question, own chunk) pairs), and what `learn` made of the
    query log. The same rows reach the trainer whichever flow made them."""
    sources: dict[str, Source] = {}
    described = []
    if params.train_file:
        sources["yours"] = Source(load_pairs(params.train_file), params.recipe)
        described.append(f"{params.train_file} ({params.recipe})")
    judged = ws.judged_questions_dir
    if questions and params.synthetic_weight > 0:
        if judged.exists():
            rows, form = load_training_rows(judged)
            data = rows_to_dataset(rows)
            what = f"{judged} (judge-labelled questions, {form})"
        else:
            data, form = pairs_from_questions(questions, chunks, "train"), "positives"
            what = f"{ws.questions_dir} (train split)"
        sources["synthetic"] = Source(data, _recipe(form, params), params.synthetic_weight)
        described.append(
            f"{what}, {sources['synthetic'].recipe}, weight {params.synthetic_weight:g}"
        )
    logged = ws.learned_dir / "train"
    if logged.exists() and params.log_weight > 0:
        rows, form = load_training_rows(logged)
        sources["log"] = Source(rows_to_dataset(rows), _recipe(form, params), params.log_weight)
        described.append(
            f"{logged} (judged query log, {form}), {sources['log'].recipe}, "
            f"weight {params.log_weight:g}"
        )
    if not sources:
        raise ValueError(
            f"nothing to train on in {ws.root}: no questions, no judged log and no train_file"
        )
    return sources, " + ".join(described)


def _recipe(form: str, params: FinetuneParams) -> str:
    """The recipe a source's rows train with: pairs and triplets with the run's own recipe,
    the judge's scores or margins with the distillation recipe for them."""
    return params.recipe if form in ("positives", "negatives") else FORM_RECIPES[form]


def _chunks(ws: Workspace) -> dict[str, str]:
    return {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
