"""Fine-tuning: every recipe trains, saves a model card naming its loss and keeps its prompts;
a diverging run stops with a clear error; an interrupted run resumes from its checkpoint; the
finetune flow trains from the workspace's questions and from a user's file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import SequentialEvaluator

from flows.finetune import finetune
from flows.params import FinetuneParams
from tasks.models import MINILM, load_model
from tasks.training.data import load_pairs
from tasks.training.recipes import RECIPES, matryoshka_dims
from tasks.training.trainer import (
    EvalSet,
    Source,
    TrainingDiverged,
    TrainSettings,
    _evaluator,
    batch_sampler_for,
    mine_negatives,
    train,
)
from tasks.workspace import rows_to_dataset, save_rows
from tests.conftest import ANSWERED, PASSAGES

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("India", "New Delhi"),
    ("Spain", "Madrid"),
    ("Ghana", "Accra"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
    ("Italy", "Rome"),
    ("Nepal", "Kathmandu"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Mexico", "Mexico City"),
    ("Turkey", "Ankara"),
    ("Sweden", "Stockholm"),
    ("Austria", "Vienna"),
    ("Brazil", "Brasilia"),
    ("Vietnam", "Hanoi"),
    ("Portugal", "Lisbon"),
]

#: Fast settings: a few steps of tiny batches of short texts.
FAST = {"batch_size": 8, "max_steps": 2, "max_seq_length": 64, "warmup": 0}

#: What each recipe's model card must name as its loss.
CARD_LOSS = {
    "matryoshka-mnrl": ["loss:MatryoshkaLoss", "loss:MultipleNegativesRankingLoss"],
    "mnrl-prefixed": ["loss:MultipleNegativesRankingLoss"],
    "mnrl": ["loss:MultipleNegativesRankingLoss"],
    "mnrl-bge-instruction": ["loss:MultipleNegativesRankingLoss"],
    "triplet": ["loss:TripletLoss", '"triplet_margin": 5'],
    "cached-mnrl": ["loss:CachedMultipleNegativesRankingLoss"],
    "gist": ["loss:GISTEmbedLoss"],
    "matryoshka-distill": ["loss:MatryoshkaLoss", "loss:DistillKLDivLoss"],
    "matryoshka-margin-mse": ["loss:MatryoshkaLoss", "loss:MarginMSELoss"],
}


def capital_rows() -> list[dict[str, str]]:
    return [
        {
            "anchor": f"What is the capital of {country}?",
            "positive": f"{city} is the capital city of {country}, seat of its government.",
        }
        for country, city in CAPITALS
    ]


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(capital_rows())


def eval_data() -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    rows = capital_rows()
    corpus = {f"d{i}": row["positive"] for i, row in enumerate(rows)}
    queries = {f"q{i}": rows[i]["anchor"] for i in range(6)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(6)}
    return corpus, queries, relevant


def test_matryoshka_dims_run_from_the_model_width_down_to_64():
    assert matryoshka_dims(384) == [384, 256, 128, 64]
    assert matryoshka_dims(768) == [768, 512, 256, 128, 64]
    assert matryoshka_dims(1024) == [1024, 768, 512, 256, 128, 64]


def test_recipes_reproduce_their_seed_cards():
    assert RECIPES["matryoshka-mnrl"].matryoshka and RECIPES["matryoshka-mnrl"].seed_card == "003"
    assert RECIPES["mnrl-prefixed"].query_prompt == "query: "
    assert RECIPES["mnrl-prefixed"].document_prompt == "passage: "
    assert RECIPES["mnrl"].scale == 20.0
    bge = RECIPES["mnrl-bge-instruction"]
    assert bge.query_prompt.startswith("Represent this sentence") and bge.document_prompt is None
    assert RECIPES["triplet"].margin == 5 and RECIPES["triplet"].needs_negatives


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_trains_and_saves_a_model_that_reloads_with_its_card_and_prompts(
    recipe, pairs, tmp_path
):
    corpus, queries, relevant = eval_data() if recipe == "matryoshka-mnrl" else (None,) * 3
    if RECIPES[recipe].needs_labels:
        # A teacher's scores for (positive, negative), or its margin of the one over the
        # other: the next row's passage is the negative.
        rows = pairs.to_list()
        labels = [3.0] if RECIPES[recipe].loss == "MarginMSELoss" else [2.0, -1.0]
        pairs = Dataset.from_list(
            [
                {**row, "negative": rows[(i + 1) % len(rows)]["positive"], "label": labels}
                for i, row in enumerate(rows)
            ]
        )
    steps = []
    result = train(
        MINILM,
        pairs,
        tmp_path / recipe,
        TrainSettings(recipe, **FAST),
        eval_set=EvalSet(corpus, queries, relevant),
        progress=lambda done, total: steps.append((done, total)),
    )

    assert result.steps == 2 and steps == [(1, 2), (2, 2)]
    assert [e["loss"] for e in result.log_history if "loss" in e]
    model_dir = Path(result.model_path)
    assert not (model_dir / "checkpoints").exists(), "checkpoints are deleted after saving"
    card = (model_dir / "README.md").read_text()
    for name in CARD_LOSS[recipe]:
        assert name in card
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card

    reloaded = SentenceTransformer(str(model_dir))
    spec = RECIPES[recipe]
    assert reloaded.prompts == {
        "query": spec.query_prompt or "",
        "document": spec.document_prompt or "",
    }
    assert reloaded.max_seq_length == 256, "the training cap is not the inference length"
    assert reloaded.encode(["What is the capital of Peru?"]).shape == (1, 384)

    record = json.loads((model_dir / "ragtune.json").read_text())
    assert record["recipe"] == recipe and record["steps"] == 2
    assert record["max_seq_length"] == 64
    if recipe == "matryoshka-mnrl":
        assert result.dims == [384, 256, 128, 64]
        assert 0.0 <= result.metrics["dim_64_cosine_ndcg@10"] <= 1.0
        assert "dim_384_cosine_ndcg@10" in record["metrics"]
        assert "* Dataset: `dim_384`" in card and "* Dataset: `dim_64`" in card
    else:
        assert result.dims == ([384, 256, 128, 64] if spec.matryoshka else [384])
    if recipe == "triplet":
        assert record["hard_negatives_mined"] is True


def test_evaluating_while_training_encodes_the_corpus_once_for_every_dimension(minilm):
    evaluator = _evaluator(EvalSet(*eval_data()), [384, 256, 64], RECIPES["mnrl"], 256, 8)
    # The library's way: each dimension's evaluator encodes the corpus itself.
    plain = SequentialEvaluator(
        evaluator.evaluators, main_score_function=evaluator.main_score_function
    )
    expected = plain(minilm)

    corpus_encodes = []
    encode_document = minilm.encode_document

    def counting(sentences, **kwargs):
        corpus_encodes.append(len(sentences))
        return encode_document(sentences, **kwargs)

    minilm.encode_document = counting
    try:
        got = evaluator(minilm)
    finally:
        del minilm.encode_document

    assert corpus_encodes == [len(eval_data()[0])], "one corpus encoding for both dimensions"
    assert got.keys() == expected.keys()
    assert "dim_64_cosine_ndcg@10" in got and "dim_384_cosine_ndcg@10" in got
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_mined_negatives_are_other_passages(minilm, pairs):
    triplets = mine_negatives(pairs, minilm)
    assert triplets.column_names == ["anchor", "positive", "negative"]
    assert len(triplets) >= len(pairs) // 2
    passages = set(pairs["positive"])
    for row in triplets:
        assert row["negative"] in passages and row["negative"] != row["positive"]

    tuples = mine_negatives(pairs, minilm, num_negatives=2)
    assert tuples.column_names == ["anchor", "positive", "negative", "negative_2"]
    assert all(row["negative"] != row["negative_2"] for row in tuples)


def test_training_data_without_a_positive_column_is_refused(tmp_path):
    data = Dataset.from_list([{"anchor": "a question", "answer_text": "a passage"}])
    with pytest.raises(ValueError, match=r"missing column.*'positive'"):
        train(MINILM, data, tmp_path / "m", TrainSettings("mnrl", **FAST))


def test_a_huge_learning_rate_stops_with_training_diverged(pairs, tmp_path):
    huge = FAST | {"max_steps": 4, "learning_rate": 1e6}
    with pytest.raises(TrainingDiverged, match=r"step \d+.*[Ll]ower the learning rate"):
        train(MINILM, pairs, tmp_path / "m", TrainSettings("mnrl", **huge))
    assert not (tmp_path / "m" / "ragtune.json").exists(), "a diverged run records no model"


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of training."""


def crash_at_step_2(seen: list[int]):
    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done == 2:
            raise Interrupted

    return progress


def test_an_interrupted_run_resumes_from_its_checkpoint_only_with_the_same_settings(
    pairs, tmp_path
):
    settings = TrainSettings("mnrl", **(FAST | {"max_steps": 3, "save_steps": 1}))
    first: list[int] = []
    with pytest.raises(Interrupted):
        train(MINILM, pairs, tmp_path / "m", settings, progress=crash_at_step_2(first))
    assert first == [1, 2]
    assert (tmp_path / "m" / "checkpoints" / "checkpoint-1").is_dir()

    # Another learning rate is another run: its checkpoint must not be continued.
    other: list[int] = []
    with pytest.raises(Interrupted):
        train(
            MINILM,
            pairs,
            tmp_path / "m",
            replace(settings, learning_rate=1e-5),
            progress=crash_at_step_2(other),
        )
    assert other == [1, 2]

    resumed: list[int] = []
    result = train(
        MINILM,
        pairs,
        tmp_path / "m",
        replace(settings, learning_rate=1e-5),
        progress=lambda done, total: resumed.append(done),
    )
    assert resumed == [2, 3], "step 1 comes from the checkpoint, not from training again"
    assert result.steps == 3
    assert [e["step"] for e in result.log_history if "loss" in e] == [1, 2, 3]
    record = json.loads((tmp_path / "m" / "ragtune.json").read_text())
    assert record["resumed_from"] == "checkpoint-1"
    assert not (tmp_path / "m" / "checkpoints").exists()


def test_trains_from_a_user_csv_of_query_passage_pairs(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    lines = ["query,passage"] + [f'"{r["anchor"]}","{r["positive"]}"' for r in capital_rows()]
    csv_file.write_text("\n".join(lines) + "\n")
    result = train(
        MINILM, load_pairs(csv_file), tmp_path / "m", TrainSettings("mnrl-prefixed", **FAST)
    )
    assert result.train_pairs == len(CAPITALS)
    assert SentenceTransformer(result.model_path).prompts["query"] == "query: "


def save_capitals_workspace(workspace) -> None:
    """Chunks and questions as ingest and questions write them: every fourth question is
    held out (test split) and one is rejected."""
    rows = capital_rows()
    save_rows(
        workspace.chunks_dir,
        [
            {
                "id": f"c{i}",
                "doc_id": "capitals",
                "source": "capitals.md",
                "page_start": 1,
                "page_end": 1,
                "text": row["positive"],
                "n_tokens": 16,
            }
            for i, row in enumerate(rows)
        ],
    )
    questions = [
        {
            "question": row["anchor"],
            "chunk_id": f"c{i}",
            "generator": "hand",
            "split": "test" if i % 4 == 0 else "train",
            "kept": True,
            "reject_reason": "",
        }
        for i, row in enumerate(rows)
    ]
    questions.append({**questions[1], "question": "Capital?", "kept": False})
    save_rows(workspace.questions_dir, questions)


def flow_artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found if artifact.key}


def test_finetune_flow_trains_on_the_train_split_and_evaluates_on_the_test_split(
    prefect_api, workspace
):
    save_capitals_workspace(workspace)
    state = finetune(
        FinetuneParams(workspace=str(workspace.root), batch_size=8, max_steps=2, max_seq_length=64),
        return_state=True,
    )
    result = state.result()

    assert result.train_pairs == 18, "6 of 24 questions are held out; the rejected one is not used"
    assert result.dims == [384, 256, 128, 64] and result.steps == 2
    model_dir = Path(result.model_path)
    assert model_dir.parent == workspace.models_dir
    assert model_dir.name.startswith("all-minilm-l6-v2-tuned-")
    record = json.loads((model_dir / "ragtune.json").read_text())
    assert record["data_fingerprint"] and record["recipe"] == "matryoshka-mnrl"
    assert 0.0 <= record["metrics"]["dim_64_cosine_ndcg@10"] <= 1.0

    artifacts = flow_artifacts(state.state_details.flow_run_id)
    curve = artifacts["finetune-curve"].data
    assert "| step | loss |" in curve and str(model_dir / "README.md") in curve
    assert "dim_384_cosine_ndcg@10" in curve
    assert artifacts["finetune-progress"].data == 100.0


def test_finetune_flow_trains_the_judged_query_log_with_the_questions_each_by_its_weight(
    prefect_api, workspace
):
    save_capitals_workspace(workspace)
    learned = [
        {"anchor": f"Which city governs country {i}?", "positive": row["positive"]}
        for i, row in enumerate(capital_rows()[:5])
    ]
    save_rows(workspace.learned_dir / "train", learned)
    quick = {"workspace": str(workspace.root), "batch_size": 8, "max_steps": 1}

    mixed = finetune(FinetuneParams(**quick, log_weight=2))
    logged_only = finetune(FinetuneParams(**quick, synthetic_weight=0))

    assert mixed.train_pairs == 18 + 5 and logged_only.train_pairs == 5
    made = json.loads((Path(mixed.model_path) / "ragtune.json").read_text())["sources"]
    assert made == {
        "synthetic": {"recipe": "matryoshka-mnrl", "weight": 1.0, "rows": 18},
        "log": {"recipe": "matryoshka-mnrl", "weight": 2.0, "rows": 5},
    }
    with pytest.raises(ValueError, match="nothing to train on"):
        finetune(FinetuneParams(**quick, synthetic_weight=0, log_weight=0))


def test_finetune_flow_mines_hard_negatives_from_every_chunk_of_the_workspace(
    prefect_api, workspace
):
    save_capitals_workspace(workspace)
    result = finetune(
        FinetuneParams(
            workspace=str(workspace.root),
            hard_negatives=True,
            batch_size=8,
            max_steps=1,
            max_seq_length=64,
        )
    )

    record = json.loads((Path(result.model_path) / "ragtune.json").read_text())
    assert record["hard_negatives_mined"] is True
    # 18 training pairs have 18 positives; the held-out questions' chunks are candidates too.
    assert record["negatives_mined_from"] == len(CAPITALS) == 24
    assert (
        "* Columns: <code>anchor</code>, <code>positive</code>, and <code>negative</code>"
        in (Path(result.model_path) / "README.md").read_text()
    )


def test_finetune_flow_trains_on_a_user_jsonl_of_triplets(prefect_api, workspace, tmp_path):
    rows = capital_rows()
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text(
        "\n".join(
            json.dumps({"query": row["anchor"], "pos": row["positive"], "neg": other["positive"]})
            for row, other in zip(rows, rows[1:] + rows[:1], strict=True)
        )
    )
    result = finetune(
        FinetuneParams(
            workspace=str(workspace.root),
            recipe="triplet",
            train_file=str(triplets),
            output_name="from-triplets",
            batch_size=8,
            max_steps=2,
            max_seq_length=64,
        )
    )

    assert result.model_path == str(workspace.model_dir("from-triplets"))
    assert result.train_pairs == len(rows)
    record = json.loads((workspace.model_dir("from-triplets") / "ragtune.json").read_text())
    assert record["hard_negatives_mined"] is False, "the file's own negatives are used"
    assert "loss:TripletLoss" in (workspace.model_dir("from-triplets") / "README.md").read_text()


def test_synthetic_distill_rows_and_logged_pairs_train_together_in_one_run(tmp_path):
    distill = rows_to_dataset(
        [
            {
                "anchor": "Which city lies at the head of the Oslofjord?",
                "positive": PASSAGES[0],
                "negative": PASSAGES[1],
                "negative_2": PASSAGES[2],
                "label": [1.5, -0.5, -1.0],
            },
            {
                "anchor": "How do plants make sugar from light?",
                "positive": PASSAGES[2],
                "negative": PASSAGES[0],
                "negative_2": PASSAGES[1],
                "label": [1.2, -0.2, -1.0],
            },
        ]
    )
    logged = rows_to_dataset([{"anchor": q, "positive": PASSAGES[i]} for q, i in ANSWERED])
    sources = {
        "synthetic": Source(distill, "matryoshka-distill"),
        "log": Source(logged, "matryoshka-mnrl", weight=0.5),
    }

    result = train(MINILM, sources, tmp_path / "m", TrainSettings(batch_size=2, epochs=1))

    # A distill row of 4 texts fills a batch as two pairs do: two batches of one row, and two
    # batches of the log's pairs.
    assert result.train_pairs == 5 and result.steps == 4
    made = json.loads((tmp_path / "m" / "ragtune.json").read_text())["sources"]
    assert made == {
        "synthetic": {"recipe": "matryoshka-distill", "weight": 1.0, "rows": 2},
        "log": {"recipe": "matryoshka-mnrl", "weight": 0.5, "rows": 3},
    }
    assert load_model(str(tmp_path / "m")).encode(["Lima"]).shape == (1, 384)


def test_a_batch_of_labelled_rows_holds_as_many_texts_as_a_batch_of_pairs():
    import torch

    texts = [f"passage {i}" for i in range(5)]
    distill = Dataset.from_list(
        [
            {
                "anchor": f"query {i}",
                **{f"p{j}": t for j, t in enumerate(texts)},
                "label": [0.0] * 5,
            }
            for i in range(12)
        ]
    )
    pairs = Dataset.from_list(
        [{"anchor": f"query {i}", "positive": texts[i % 5]} for i in range(5)]
    )
    options = {"batch_size": 6, "drop_last": False, "generator": torch.Generator().manual_seed(0)}

    labelled = [len(batch) for batch in batch_sampler_for(distill, **dict(options))]
    paired = [len(batch) for batch in batch_sampler_for(pairs, **dict(options))]

    assert labelled == [2] * 6, "6 pairs are 12 texts: two rows of a query and 5 passages"
    assert paired == [5], "pairs keep the batch size (5 distinct passages fill one batch)"
