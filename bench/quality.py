"""Benchmark retrieval quality on real human queries: base vs tuned MiniLM on SciFact dev.

Does what a user would, from the corpus alone: ingest the 5,183 abstracts (`corpus.jsonl`) with
the ingest flow, generate questions with the bundled Gemma (`local` generator) through the
questions flow's body (`flows.questions.ask`), keep those that survive the text filters and the
round trip, fine-tune with the finetune flow, then evaluate base and tuned on the 809 human
claims (`qrels/dev.tsv`) against the whole corpus, with the paired bootstrap interval.

The only labelled data the pipeline sees is at most 8 claims shown to the generator as
`example_queries` (Promptagator): they are removed from the evaluated claims, and every
training question is checked against the evaluated claims (tasks/fewshot.py raises
`LeakageError` on either leak). Evaluation is per document: the corpus is the BEIR records as
`load_beir` returns them, not ragtune's chunks (70% of the abstracts are two or more chunks at
256 tokens), so a query is scored on the abstracts the judges marked.

Several variants share one workspace (`bench/out/quality`): the question cache makes a variant
that changes only the filter or the training pay nothing for generation, and the base model's
evaluation is cached (it is the same for every variant evaluated on the same claims). Each run
appends a record to `runs.jsonl` in the workspace and prints the results table. CPU heavy.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality.py --variant baseline --chunks 700
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from preamble import ROOT, beir_folder, command, machine

WORKSPACE = ROOT / "bench" / "out" / "quality"
os.environ.setdefault("PREFECT_HOME", str(WORKSPACE / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import numpy as np  # noqa: E402

from tasks.models import MINILM, load_model  # noqa: E402
from tasks.questions.fewshot import LabelledSplit, check_held_out, check_training, labelled_split  # noqa: E402
from tasks.retrieval.evaluation import (  # noqa: E402
    ModelEval,
    evaluate_model,
    gate,
    intervals_by_dim,
    matryoshka_eval_dims,
)
from tasks.workspace import Workspace, fingerprint, load_rows  # noqa: E402

HEADLINE_DIM = 384


class TimedGenerator:
    """A question generator that adds up the wall time spent inside `generate`, so generation
    is timed apart from cleaning and the round trip."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.seconds = 0.0

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def generate(self, passages, progress=None):
        started = time.perf_counter()
        try:
            return self.inner.generate(passages, progress)
        finally:
            self.seconds += time.perf_counter() - started


def base_eval(split: LabelledSplit, model_ref: str, dims: list[int], folder: Path) -> ModelEval:
    """The base model's evaluation, cached on disk by model, corpus, claims and dims."""
    key = fingerprint(
        model_ref,
        sorted(split.corpus.items()),
        sorted(split.queries.items()),
        sorted((qid, sorted(ids)) for qid, ids in split.relevant.items()),
        dims,
    )
    path = folder / f"base-eval-{key[:16]}.json"
    if path.exists():
        raw = json.loads(path.read_text())
        return ModelEval(
            name=raw["name"],
            model=raw["model"],
            metrics={int(d): v for d, v in raw["metrics"].items()},
            ndcg_per_query={int(d): v for d, v in raw["ndcg_per_query"].items()},
            first_rank={int(d): v for d, v in raw["first_rank"].items()},
            query_prompt=raw["query_prompt"],
            corpus_prompt=raw["corpus_prompt"],
            n_queries=raw["n_queries"],
            n_corpus=raw["n_corpus"],
        )
    evaluation = evaluate_model(
        load_model(model_ref),
        split.corpus,
        split.queries,
        split.relevant,
        dims,
        name="base",
        model_ref=model_ref,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation.__dict__))
    return evaluation


def make_questions(args: argparse.Namespace, split: LabelledSplit, ws: Workspace) -> dict:
    """Ingest the corpus and ask the local generator about a seeded sample of its chunks,
    through the flows a user runs; returns the counts and timings."""
    from flows.ingest import ingest
    from flows.params import IngestParams, QuestionParams
    from flows.questions import ask
    from tasks.llm.gemma import unload_gemma
    from tasks.questions.writers import make_generator

    t = time.perf_counter()
    ingested = ingest(
        IngestParams(workspace=str(ws.root), sources=[str(args.beir / "corpus.jsonl")])
    )
    ingest_s = time.perf_counter() - t

    settings: dict[str, Any] = {"backend": "local", "batch_size": args.gen_batch_size}
    if args.few_shot_mode == "example_queries" and split.examples:
        settings["example_queries"] = split.examples
    if args.few_shot_mode == "pairs" and split.example_pairs:
        settings["few_shot"] = split.example_pairs
        settings["max_passage_chars"] = args.max_passage_chars
    params = QuestionParams(
        workspace=str(ws.root),
        generator=settings,
        questions_per_chunk=args.n,
        max_chunks=args.chunks,
        round_trip_top_k=args.round_trip_top_k,
        base_model=args.base_model,
        # Claims are statements: in pairs mode the examples show that style, so keep it.
        questions_only=args.few_shot_mode != "pairs",
        test_size=0.0,
        seed=args.seed,
    )
    # The settings the questions flow itself gives make_generator.
    generator = TimedGenerator(make_generator(params.generator, n=args.n, seed=args.seed))
    t = time.perf_counter()
    asked = ask(params, generator)
    questions_s = time.perf_counter() - t
    unload_gemma()
    per_s = asked.generated / generator.seconds if asked.llm_calls and generator.seconds else None
    return {
        "variant": args.variant,
        "corpus_chunks": ingested.chunks,
        "ingest_s": round(ingest_s, 1),
        "chunks_asked": asked.chunks,
        "generated": asked.generated,
        "kept": asked.kept,
        "rejected": asked.rejected,
        "llm_calls": asked.llm_calls,
        "cached_chunks": asked.cached,
        "generation_s": round(generator.seconds, 1),
        "questions_stage_s": round(questions_s, 1),
        "questions_per_s": round(per_s, 3) if per_s else None,
        # Every chunk of the corpus, n questions each, at the measured rate.
        "projected_full_generation_s": round(ingested.chunks * args.n / per_s) if per_s else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from flows.finetune import finetune
    from flows.params import FinetuneParams

    started = time.perf_counter()
    split = labelled_split(args.beir, args.split, args.few_shot, args.seed)
    check_held_out(split.examples, split.queries)
    print(
        f"{len(split.corpus)} documents; {len(split.examples)} claims shown as examples, "
        f"{len(split.queries)} claims evaluated"
    )
    ws = Workspace.at(args.workspace)
    dims = matryoshka_eval_dims(load_model(args.base_model).get_embedding_dimension())
    t = time.perf_counter()
    base = base_eval(split, args.base_model, dims, ws.root)
    base_s = time.perf_counter() - t
    print(f"base NDCG@10 {base.metrics[HEADLINE_DIM]['ndcg@10']:.4f} ({base_s:.0f} s)")

    stage = ws.root / "questions-run.json"
    if args.reuse_questions:
        if not stage.exists():
            raise SystemExit(f"--reuse-questions: {stage} is missing; run without it first")
        questions = json.loads(stage.read_text())
        print(f"reusing the questions of variant {questions['variant']!r} in {ws.questions_dir}")
    else:
        questions = make_questions(args, split, ws)
        stage.write_text(json.dumps(questions))

    rows = load_rows(ws.questions_dir)
    anchors = [r["question"] for r in rows if r["kept"] and r["split"] == "train"]
    check_training(anchors, split.queries.values())
    samples = random.Random(args.seed).sample(anchors, min(12, len(anchors)))
    doc_of = {c["id"]: c["doc_id"] for c in load_rows(ws.chunks_dir)}
    asked_docs = {doc_of[r["chunk_id"]] for r in rows}
    judged = {d for ids in split.relevant.values() for d in ids}

    t = time.perf_counter()
    tuned_run = finetune(
        FinetuneParams(
            workspace=str(ws.root),
            base_model=args.base_model,
            recipe=args.recipe,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_seq_length=args.max_seq_length,
            hard_negatives=args.hard_negatives or None,
            seed=args.seed,
        )
    )
    train_s = time.perf_counter() - t

    t = time.perf_counter()
    tuned = evaluate_model(
        load_model(tuned_run.model_path),
        split.corpus,
        split.queries,
        split.relevant,
        dims,
        name="tuned",
        model_ref=tuned_run.model_path,
    )
    tuned_s = time.perf_counter() - t
    intervals = intervals_by_dim(base, tuned)
    decision = gate(base, tuned)
    gain, low, high = intervals[HEADLINE_DIM]
    per_query = np.array(
        [
            tuned.ndcg_per_query[HEADLINE_DIM][q] - base.ndcg_per_query[HEADLINE_DIM][q]
            for q in base.ndcg_per_query[HEADLINE_DIM]
        ]
    )
    record = {
        "variant": args.variant,
        "command": command(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "few_shot_mode": args.few_shot_mode,
        "example_claims": split.examples,
        "evaluated_claims": len(split.queries),
        "corpus_docs": len(split.corpus),
        **{k: v for k, v in questions.items() if k != "variant"},
        "questions_from": questions["variant"],
        "docs_asked": len(asked_docs),
        "judged_docs_asked": len(asked_docs & judged),
        "samples": samples,
        "train_pairs": tuned_run.train_pairs,
        "train_steps": tuned_run.steps,
        "training_s": round(train_s, 1),
        "base_eval_s": round(base_s, 1),
        "tuned_eval_s": round(tuned_s, 1),
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("beir", "workspace", "variant")
        },
        "model_path": tuned_run.model_path,
        "ndcg10_base": base.metrics[HEADLINE_DIM]["ndcg@10"],
        "ndcg10_tuned": tuned.metrics[HEADLINE_DIM]["ndcg@10"],
        "gain": gain,
        "interval": [low, high],
        "recall10_base": base.metrics[HEADLINE_DIM]["recall@10"],
        "recall10_tuned": tuned.metrics[HEADLINE_DIM]["recall@10"],
        "queries_better": int((per_query > 0).sum()),
        "queries_worse": int((per_query < 0).sum()),
        "by_dim": {
            dim: {
                "base": base.metrics[dim]["ndcg@10"],
                "tuned": tuned.metrics[dim]["ndcg@10"],
                "interval": list(intervals[dim]),
            }
            for dim in dims
        },
        "gate": decision.reason,
        "total_s": round(time.perf_counter() - started, 1),
    }
    with (ws.root / "runs.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    return record


def results_table(records: list[dict[str, Any]]) -> str:
    from flows.artifacts import markdown_table

    rows = [
        {
            "variant": r["variant"],
            "chunks asked (docs)": f"{r['chunks_asked']} ({r['docs_asked']})",
            "generated / kept (pairs)": f"{r['generated']} / {r['kept']} ({r['train_pairs']})",
            "generation s": f"{r['generation_s']:.0f}",
            "training s": f"{r['training_s']:.0f}",
            "NDCG@10 base": f"{r['ndcg10_base']:.4f}",
            "tuned": f"{r['ndcg10_tuned']:.4f}",
            "gain (pt)": f"{100 * r['gain']:+.2f}",
            "95% interval (pt)": f"[{100 * r['interval'][0]:+.2f}, {100 * r['interval'][1]:+.2f}]",
        }
        for r in records
    ]
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help="Name of this run in the results.")
    parser.add_argument("--beir", type=Path, help="BEIR folder (default: $RAGTUNE_BEIR).")
    parser.add_argument("--split", default="dev", help="qrels/<split>.tsv to evaluate on.")
    parser.add_argument("--workspace", type=Path, default=WORKSPACE)
    parser.add_argument("--base-model", default=MINILM)
    parser.add_argument("--chunks", type=int, default=700, help="Seeded sample of chunks asked.")
    parser.add_argument("--n", type=int, default=2, help="Questions per chunk.")
    parser.add_argument("--gen-batch-size", type=int, default=16)
    parser.add_argument("--few-shot", type=int, default=8, help="Claims shown as examples.")
    parser.add_argument(
        "--few-shot-mode",
        choices=("example_queries", "pairs", "none"),
        default="example_queries",
        help="example_queries: the claims set the style above the generic (passage, question) "
        "examples; pairs: the claims with their judged abstracts are the examples "
        "(Promptagator), and generated statements are kept; none: the generic pool only (the "
        "claims are still held out, so every variant is scored on the same queries).",
    )
    parser.add_argument(
        "--max-passage-chars", type=int, default=800, help="Prompt cut, pairs mode (speed)."
    )
    parser.add_argument("--round-trip-top-k", type=int, default=10)
    parser.add_argument("--recipe", default="matryoshka-mnrl")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--hard-negatives",
        action="store_true",
        help="Mine a hard negative per pair from the corpus's chunks (the finetune flow's option).",
    )
    parser.add_argument(
        "--reuse-questions",
        action="store_true",
        help="Train on the workspace's questions from its previous run (a training-only "
        "variant: skips ingest, generation and the round trip).",
    )
    parser.add_argument("--table", action="store_true", help="Print the table of past runs.")
    args = parser.parse_args()
    args.beir = beir_folder(args.beir)
    if not args.table:
        record = run(args)
        print(json.dumps({k: v for k, v in record.items() if k != "example_claims"}, indent=2))
    runs = args.workspace / "runs.jsonl"
    records = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    print(results_table(records))


if __name__ == "__main__":
    main()
