"""Benchmark the cold start on real human queries: documents only, judge-labelled synthetic
claims, MiniLM tuned on them, scored on SciFact's dev claims (issue 31).

Cold start means no claim's relevance judgements are read for training, and at most 8 claim
texts (with the abstract each was judged against, Promptagator's few-shot pairs) are shown to
the writer as examples; those claims leave the evaluated set (`tasks.questions.fewshot`).

1. `generate`: the bundled Gemma writes `--n` claims for each of a seeded sample of `--sample`
   abstracts (the question cache in `bench/out/coldstart/` makes it resumable), cleaned by the
   questions stage's text filters.
2. `label`: zero-shot MiniLM retrieves each kept claim's top K abstracts from the whole corpus,
   its own abstract is added, and the bundled judge scores them (`tasks.learn.synthetic`,
   judgements cached in SQLite, resumable).
3. `train`: for each variant (grounding rule, label form, claims per abstract, epochs, lr),
   rows are built from the judged claims, MiniLM is tuned, and base and tuned are scored on
   the dev claims against the human judgements: NDCG@10 at full width with the paired
   bootstrap interval. Each run appends a record to `runs.jsonl`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/coldstart.py generate --sample 1500
    HF_HUB_OFFLINE=1 .venv/bin/python bench/coldstart.py label --sample 1500
    HF_HUB_OFFLINE=1 .venv/bin/python bench/coldstart.py train --sample 1500 --ground 1

`rows --save-rows DIR` writes a variant's rows without training, for `bench/learn.py
--synthetic DIR` (cold start + log).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

from preamble import ROOT, beir_folder, command, machine, stored_vectors

import numpy as np

OUT = ROOT / "bench" / "out" / "coldstart"
DIM = 384


def writer_settings(args: argparse.Namespace, split: Any) -> dict[str, Any]:
    """The local writer, shown the example claims with their abstracts (or, with
    `--examples 0`, the generic question examples)."""
    settings: dict[str, Any] = {"backend": "local", "batch_size": 16, "max_passage_chars": 1000}
    if args.examples:
        settings["few_shot"] = split.example_pairs
    return settings


def sampled(corpus: dict[str, str], size: int, seed: int) -> list[str]:
    """A seeded sample of abstract ids, in a stable order."""
    ids = sorted(corpus)
    return sorted(random.Random(seed).sample(ids, min(size, len(ids))))


def generate(args: argparse.Namespace, split: Any) -> list[dict[str, Any]]:
    """Kept claims as question rows (question, chunk_id, kept, reason), generated where the
    cache lacks them; records the generation time."""
    from tasks.questions.cache import QuestionCache, generate_with_cache
    from tasks.questions.curation import filter_questions
    from tasks.questions.fewshot import check_training
    from tasks.questions.writers import make_generator

    ids = sampled(split.corpus, args.sample, args.seed)
    generator = make_generator(writer_settings(args, split), n=args.n, seed=args.seed)
    started = time.perf_counter()
    asked, stats = generate_with_cache(
        [{"id": cid, "text": split.corpus[cid]} for cid in ids],
        generator,
        QuestionCache(OUT / f"questions-{args.examples}"),
        batch_size=16,
    )
    seconds = time.perf_counter() - started
    filter_questions(asked, split.corpus, questions_only=not args.examples)
    kept = [q for q in asked if q.kept]
    check_training([q.question for q in kept], [*split.queries.values(), *split.examples])
    record = {
        "generated": len(asked),
        "kept": len(kept),
        "generated_now": stats["llm_calls"],
        "seconds_now": round(seconds, 1),
    }
    print(f"generation: {record}")
    timing = OUT / f"generation-{args.examples}-{args.sample}-{args.n}.json"
    if stats["llm_calls"] or not timing.exists():
        timing.write_text(json.dumps(record))
    return [{"question": q.question, "chunk_id": q.chunk_id, "n": i} for i, q in enumerate(kept)]


def label(args: argparse.Namespace, split: Any, rows: list[dict[str, Any]]) -> Any:
    """The judge's view of each kept claim (the first `--label-n` of each abstract): its base
    top K abstracts from the whole corpus plus its own, scored through the judgement cache."""
    from tasks.learn.judgements import Judgements
    from tasks.learn.judges import LocalJudge
    from tasks.learn.rows import Retrieval
    from tasks.learn.synthetic import label_questions
    from tasks.models import MINILM, load_model

    seen: dict[str, int] = {}
    chosen = []
    for row in rows:
        seen[row["chunk_id"]] = seen.get(row["chunk_id"], 0) + 1
        if seen[row["chunk_id"]] <= args.label_n:
            chosen.append({**row, "split": "train"})
    chosen = chosen[: args.label_max or None]
    model = load_model(MINILM)
    ids = sorted(split.corpus)
    texts = corpus_texts(split)
    column = {text: i for i, text in enumerate(texts)}
    retrieval = Retrieval(
        ids=ids,
        row={cid: column[split.corpus[cid]] for cid in ids},
        documents=stored_vectors(model, MINILM, texts),
        queries=model.encode_query(
            [q["question"] for q in chosen], batch_size=64, normalize_embeddings=True
        ),
    )
    started = time.perf_counter()
    run = label_questions(
        chosen,
        split.corpus,
        retrieval,
        LocalJudge(),
        Judgements(OUT / "judgements.sqlite"),
        top_k=args.top,
    )
    seconds = time.perf_counter() - started
    print(f"judged {run.new} new claims in {seconds:.0f} s ({len(run.judged)} judged in all)")
    timing = (
        OUT / f"label-{args.examples}-{args.sample}-{args.label_n}-{args.top}-{args.label_max}.json"
    )
    if run.new or not timing.exists():
        per = run.judge_s / run.new if run.new else None
        timing.write_text(json.dumps({"new": run.new, "seconds": seconds, "s_per_claim": per}))
    return run


def corpus_texts(split: Any) -> list[str]:
    """The corpus's distinct abstracts in one order, so labelling and evaluating share the
    base model's stored vectors."""
    from tasks.retrieval.evaluation import distinct

    return distinct(split.corpus[cid] for cid in sorted(split.corpus))


def evaluate(model_ref: str, split: Any, eval_ids: list[str]) -> dict[str, float]:
    """NDCG@10 at full width of each evaluated claim against the human judgements."""
    from tasks.models import MINILM, load_model
    from tasks.retrieval.evaluation import distinct, evaluate_embeddings

    model = load_model(model_ref)
    texts = corpus_texts(split)
    unit = {"batch_size": 64, "normalize_embeddings": True, "show_progress_bar": False}
    documents = (
        stored_vectors(model, MINILM, texts)
        if model_ref == MINILM
        else model.encode_document(texts, **unit)
    )
    queries = {q: split.queries[q] for q in eval_ids}
    claims = distinct(queries.values())
    result = evaluate_embeddings(
        dict(zip(claims, model.encode_query(claims, **unit), strict=True)),
        dict(zip(texts, documents, strict=True)),
        split.corpus,
        queries,
        split.relevant,
        [DIM],
    )
    return result.ndcg_per_query[DIM]


def variant_rows(args: argparse.Namespace, split: Any, run: Any) -> list[dict[str, Any]]:
    """The training rows of the judged claims the variant's grounding rule keeps, in its label
    form; saved with the example claims where `--save-rows` asks (for bench/learn.py)."""
    from tasks.learn.rows import save_training_rows, training_rows
    from tasks.learn.synthetic import grounded

    kept = [q for q in run.judged if not args.ground or grounded(q, args.ground)]
    rows = training_rows(kept, split.corpus, args.form)
    if args.save_rows:
        save_training_rows(args.save_rows, rows, args.form)
        (args.save_rows / "examples.json").write_text(json.dumps(split.examples))
        print(f"{len(rows)} {args.form} rows saved in {args.save_rows}")
    return rows


def train_variant(args: argparse.Namespace, split: Any, run: Any) -> None:
    """Rows from the judged claims by the variant's rule and form, MiniLM tuned on them,
    base and tuned scored on every evaluated claim; appends the record to runs.jsonl."""
    import tempfile

    from tasks.learn.settings import FORM_RECIPES
    from tasks.models import MINILM
    from tasks.retrieval.evaluation import paired_bootstrap
    from tasks.training.trainer import TrainSettings, train
    from tasks.workspace import rows_to_dataset

    rows = variant_rows(args, split, run)
    eval_ids = sorted(split.queries)
    base = evaluate(MINILM, split, eval_ids)
    with tempfile.TemporaryDirectory(dir=OUT) as folder:
        started = time.perf_counter()
        settings = TrainSettings(
            FORM_RECIPES[args.form],
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            max_seq_length=args.max_seq_length,
            seed=args.seed,
            resume=False,
        )
        steps = train(MINILM, rows_to_dataset(rows), Path(folder), settings).steps
        train_s = time.perf_counter() - started
        # The trainer's activations and optimizer state are garbage by now; without a collect
        # they stay resident while the tuned model encodes the corpus.
        gc.collect()
        tuned = evaluate(folder, split, eval_ids)
    b = [base[q] for q in eval_ids]
    t = [tuned[q] for q in eval_ids]
    gain, low, high = paired_bootstrap(b, t)
    generation = json.loads(
        (OUT / f"generation-{args.examples}-{args.sample}-{args.n}.json").read_text()
    )
    labelling = json.loads(
        (
            OUT
            / f"label-{args.examples}-{args.sample}-{args.label_n}-{args.top}-{args.label_max}.json"
        ).read_text()
    )
    record = {
        "command": command(),
        "machine": machine(),
        "examples": args.examples,
        "sample": args.sample,
        "claims_per_abstract": args.label_n,
        "claims_judged_at_most": args.label_max or None,
        "top": args.top,
        "ground": args.ground,
        "form": args.form,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "judged": len(run.judged),
        "rows": len(rows),
        "steps": steps,
        "generation": generation,
        "labelling": labelling,
        "train_s": round(train_s, 1),
        "eval_claims": len(eval_ids),
        "ndcg10_zero_shot": 100 * float(np.mean(b)),
        "ndcg10_tuned": 100 * float(np.mean(t)),
        "gain": 100 * gain,
        "interval": [100 * low, 100 * high],
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with (OUT / "runs.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    print(
        f"ground {args.ground}, {args.form}, {len(rows)} rows: "
        f"{record['gain']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["generate", "label", "rows", "train"])
    parser.add_argument("--beir", type=Path, help="BEIR folder (default: $RAGTUNE_BEIR).")
    parser.add_argument("--sample", type=int, default=1500, help="Abstracts written for.")
    parser.add_argument("--n", type=int, default=2, help="Claims written per abstract.")
    parser.add_argument("--examples", type=int, default=8, help="Dev claims shown (0 or 8).")
    parser.add_argument("--label-n", type=int, default=1, help="Claims judged per abstract.")
    parser.add_argument("--label-max", type=int, default=0, help="Judge at most N (0: all).")
    parser.add_argument("--top", type=int, default=10, help="Base candidates judged per claim.")
    parser.add_argument("--ground", type=int, default=1, help="Own abstract in the judge's top r.")
    parser.add_argument("--form", default="distill", help="Label form of the training rows.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--save-rows",
        type=Path,
        help="Also save the variant's rows (and the example claims) here, for bench/learn.py.",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    from tasks.questions.fewshot import labelled_split

    split = labelled_split(beir_folder(args.beir), "dev", k=args.examples, seed=args.seed)
    print(machine())
    rows = generate(args, split)
    if args.phase == "generate":
        return
    run = label(args, split, rows)
    if args.phase == "rows":
        variant_rows(args, split, run)
    if args.phase == "train":
        train_variant(args, split, run)


if __name__ == "__main__":
    main()
