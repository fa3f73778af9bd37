"""Benchmark learning from a query log on real human queries (SciFact dev).

The 809 dev claims are split 50/50 by the seeded held-out rule of `tasks.learn.querylog` into
a *log* half, whose texts play the users' logged queries (their human judgements are never read for
training), and an *evaluation* half. Zero-shot MiniLM retrieves the top K abstracts of every log
claim, the bundled judge scores them (`tasks.learn.rows.judge_queries`, cached in
`bench/out/learn/`), the rows of each label form train MiniLM, and the tuned model is scored
on the evaluation half against the human judgements: NDCG@10 at full width, the paired
bootstrap interval against zero-shot, and the same with the judge re-ranking each model's top
10. The gain is broken down by whether an evaluation claim's relevant abstract was among the
log's judged candidates (the human judgements are used for that breakdown only), so remembering
popular documents is not mistaken for general improvement. CPU heavy: the judge reads K
abstracts per claim, and every tuned model re-encodes the 5,183 abstracts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/learn.py --top 10 --forms positives,distill

With `--synthetic DIR` (rows that `bench/coldstart.py train --save-rows DIR` wrote: the cold
start's judge-labelled claims), every form trains on the log's rows and those rows together,
each source through its own loss, and the claims shown to the cold start's writer as examples
leave the evaluation half.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preamble import ROOT, beir_folder, command, machine, stored_vectors

import numpy as np

from tasks.learn.judgements import Judgements
from tasks.learn.judges import LocalJudge
from tasks.learn.querylog import is_held_out
from tasks.learn.rows import (
    JudgedQuery,
    choose_nudge_step,
    judge_queries,
    load_training_rows,
    nudge,
    training_rows,
)
from tasks.learn.settings import FORM_RECIPES
from tasks.models import MINILM, load_model
from tasks.retrieval.beir import load_beir
from tasks.retrieval.evaluation import (
    ModelEval,
    distinct,
    evaluate_embeddings,
    paired_bootstrap,
    ranking_metrics,
)
from tasks.retrieval.rerank import reorder_head
from tasks.training.trainer import Source, TrainSettings, train
from tasks.workspace import rows_to_dataset

OUT = ROOT / "bench" / "out" / "learn"
DIM = 384
RECIPE = {
    "positives": "matryoshka-mnrl",
    "negatives": "matryoshka-mnrl",
    "distill": "matryoshka-distill",
}


def reranked_ndcg(
    hits: dict[str, list[tuple[str, float]]], queries, relevant, corpus, judge, cache, top: int
) -> tuple[list[float], float, int]:
    """NDCG@10 per query (in `queries`' order) of `hits` with the top `top` re-ranked by the
    judge (judgements cached: a candidate already judged for that claim costs nothing), the
    judge's seconds and the claims it was asked about."""
    qids = list(queries)
    run = judge_queries(
        [queries[q] for q in qids],
        [hits[q][:top] for q in qids],
        corpus,
        judge,
        cache,
        held_out_share=0.0,
    )
    if run.failed:
        raise RuntimeError(f"judging failed: {run.failed[:3]}")
    out = []
    for qid, judged in zip(qids, run.judged, strict=True):
        ranking = reorder_head([doc for doc, _ in hits[qid]], judged.teacher_order())
        out.append(ranking_metrics(ranking, relevant[qid])["ndcg@10"])
    return out, run.judge_s, run.new


def gains(base: list[float], tuned: list[float], seen: list[bool]) -> dict[str, Any]:
    """The gain with its interval, over all claims, those whose abstract the log saw, the rest."""
    out: dict[str, Any] = {}
    subsets = {"all": [True] * len(seen), "seen": seen, "unseen": [not s for s in seen]}
    for label, mask in subsets.items():
        b = [x for x, m in zip(base, mask, strict=True) if m]
        t = [x for x, m in zip(tuned, mask, strict=True) if m]
        mean, low, high = paired_bootstrap(b, t)
        out[label] = {"claims": len(b), "gain": 100 * mean, "interval": [100 * low, 100 * high]}
    return out


@dataclass
class Stacked:
    """Document vectors as one matrix, a row per distinct text, and each chunk id's row: the
    shape `nudge` and `choose_nudge_step` take."""

    texts: list[str]
    matrix: np.ndarray
    row: dict[str, int]

    @classmethod
    def of(cls, doc_vectors: dict[str, np.ndarray], corpus: dict[str, str]) -> Stacked:
        texts = list(doc_vectors)
        text_row = {text: i for i, text in enumerate(texts)}
        matrix = np.stack([doc_vectors[t] for t in texts])
        return cls(texts, matrix, {cid: text_row[text] for cid, text in corpus.items()})


def nudged_eval(
    docs: Stacked,
    claim_vectors: dict[str, np.ndarray],
    corpus: dict[str, str],
    judged: list[JudgedQuery],
    queries: dict[str, str],
    relevant: dict[str, set[str]],
    step: float,
    target: str,
) -> ModelEval:
    """The corpus vectors nudged towards the judged log claims, evaluated: each claim's
    `target` chunk (the teacher's first, or the judge's alone) moves `step`."""
    answers = [
        q.chunk_ids[q.teacher_order()[0]] if target == "teacher" else q.judge_choice for q in judged
    ]
    moved = nudge(
        docs.matrix,
        np.stack([claim_vectors[q.query] for q in judged]),
        [docs.row[cid] for cid in answers],
        step,
    )
    return evaluate_embeddings(
        claim_vectors,
        dict(zip(docs.texts, moved, strict=True)),
        corpus,
        queries,
        relevant,
        [DIM],
        name=f"nudge-{target}-{step}",
        keep_hits=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beir", type=Path, help="BEIR folder (default: $RAGTUNE_BEIR).")
    parser.add_argument("--top", type=int, default=10, help="Candidates judged per log claim.")
    parser.add_argument("--forms", default="", help="Label forms to train, comma-separated.")
    parser.add_argument(
        "--nudge", default="", help="NUDGE steps to try on the stored vectors, e.g. 0.1,0.2."
    )
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--rerank", type=int, default=10, help="Also re-rank the top N (0: no).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--synthetic", type=Path, help="Cold-start rows to train with the log's (see above)."
    )
    parser.add_argument(
        "--synthetic-weight",
        type=float,
        default=1.0,
        help="Their loss's factor; 0 trains on the log alone, on the same evaluation claims.",
    )
    args = parser.parse_args()
    args.beir = beir_folder(args.beir)
    OUT.mkdir(parents=True, exist_ok=True)

    corpus, claims, relevant = load_beir(args.beir, "dev")
    synthetic, synthetic_form, shown = [], None, set()
    if args.synthetic:
        synthetic, synthetic_form = load_training_rows(args.synthetic)
        shown = set(json.loads((args.synthetic / "examples.json").read_text()))
    log_ids = [q for q in claims if not is_held_out(claims[q], 0.5, args.seed)]
    eval_ids = [
        q for q in claims if is_held_out(claims[q], 0.5, args.seed) and claims[q] not in shown
    ]
    eval_queries = {q: claims[q] for q in eval_ids}
    print(f"{len(log_ids)} log claims, {len(eval_ids)} evaluation claims, {len(corpus)} abstracts")

    # Zero-shot retrieval of every claim once: candidates for the log half, the baseline for
    # the evaluation half. Labels are read for the evaluation half's metrics only.
    model = load_model(MINILM)
    texts = distinct(corpus.values())
    base_vectors = dict(zip(texts, stored_vectors(model, MINILM, texts), strict=True))
    claim_texts = distinct(claims.values())
    claim_vectors = dict(
        zip(claim_texts, model.encode(claim_texts, normalize_embeddings=True), strict=True)
    )
    base = evaluate_embeddings(
        claim_vectors, base_vectors, corpus, claims, relevant, [DIM], keep_hits=True
    )
    base_ndcg = [base.ndcg_per_query[DIM][q] for q in eval_ids]
    judge = LocalJudge()
    started = time.perf_counter()
    run = judge_queries(
        [claims[q] for q in log_ids],
        [base.hits[DIM][q][: args.top] for q in log_ids],
        corpus,
        judge,
        Judgements(OUT / "judgements-log.sqlite"),
        held_out_share=0.0,
    )
    judge_wall = time.perf_counter() - started
    judged: list[JudgedQuery] = run.judged
    seen_docs = {cid for q in judged for cid in q.chunk_ids}
    seen = [bool(relevant[q] & seen_docs) for q in eval_ids]
    print(
        f"judged {run.new} new log claims in {run.judge_s:.0f} s; {sum(seen)}/{len(seen)} "
        "evaluation claims have a relevant abstract among the log's candidates"
    )

    eval_cache = Judgements(OUT / "judgements-eval.sqlite")

    def rerank(evaluation: ModelEval) -> tuple[list[float], float]:
        ndcg, seconds, _ = reranked_ndcg(
            evaluation.hits[DIM], eval_queries, relevant, corpus, judge, eval_cache, args.rerank
        )
        return ndcg, seconds

    common = {
        "command": command(),
        "machine": machine(),
        "log_claims": len(log_ids),
        "eval_claims": len(eval_ids),
        "eval_claims_seen": int(sum(seen)),
        "top": args.top,
        "judge": judge.fingerprint(),
        "judge_new_claims": run.new,
        "judge_wall_s": judge_wall,
        "top1_changed": run.top_changed(),
        "ndcg10_zero_shot": 100 * float(np.mean(base_ndcg)),
    }
    if args.rerank:
        base_rr, _ = rerank(base)
        common["ndcg10_zero_shot_rerank"] = 100 * float(np.mean(base_rr))
        common["rerank_over_zero_shot"] = gains(base_ndcg, base_rr, seen)

    def record(variant: dict[str, Any], tuned: ModelEval) -> None:
        tuned_ndcg = [tuned.ndcg_per_query[DIM][q] for q in eval_ids]
        result = {
            **common,
            **variant,
            "ndcg10_tuned": 100 * float(np.mean(tuned_ndcg)),
            "tuned_over_zero_shot": gains(base_ndcg, tuned_ndcg, seen),
        }
        if args.rerank:
            tuned_rr, seconds = rerank(tuned)
            result["ndcg10_tuned_rerank"] = 100 * float(np.mean(tuned_rr))
            result["tuned_rerank_over_zero_shot_rerank"] = gains(base_rr, tuned_rr, seen)
            result["rerank_judge_s"] = seconds
        result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with (OUT / "runs.jsonl").open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        all_ = result["tuned_over_zero_shot"]["all"]
        print(f"{variant}: {all_['gain']:+.2f} {all_['interval']}")

    def nudges(doc_vectors: dict, query_vectors: dict, before: dict[str, Any]) -> None:
        """Record each nudge of `args.nudge` applied to these vectors (`before`: the model)."""
        docs = Stacked.of(doc_vectors, corpus)
        for given in [x for x in args.nudge.split(",") if x]:
            variant: dict[str, Any] = dict(before)
            if given == "auto":
                # The step as `learn` would choose it: from the log alone, no human label read.
                step, by_step = choose_nudge_step(
                    docs.matrix,
                    docs.row,
                    judged,
                    np.stack([query_vectors[q.query] for q in judged]),
                    seed=args.seed,
                )
                variant["log_mrr10_by_step"] = by_step
            else:
                step = float(given)
            for target in ("teacher", "judge") if given != "auto" else ("judge",):
                tuned = nudged_eval(
                    docs, query_vectors, corpus, judged, eval_queries, relevant, step, target
                )
                how = f"{target}'s choice{', step from the log' if given == 'auto' else ''}"
                form = f"{before.get('form', 'zero-shot')} + nudge ({how})"
                record({**variant, "form": form, "step": step}, tuned)

    nudges(base_vectors, claim_vectors, {})

    for form in [f for f in args.forms.split(",") if f]:
        rows = training_rows(judged, corpus, form)
        with tempfile.TemporaryDirectory(dir=OUT) as folder:
            started = time.perf_counter()
            settings = TrainSettings(
                RECIPE[form],
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                max_seq_length=args.max_seq_length,
                seed=args.seed,
                resume=False,
            )
            sources = {"log": Source(rows_to_dataset(rows), RECIPE[form])}
            if synthetic and args.synthetic_weight > 0:
                sources["synthetic"] = Source(
                    rows_to_dataset(synthetic),
                    FORM_RECIPES[synthetic_form],
                    args.synthetic_weight,
                )
            trained = train(MINILM, sources, Path(folder), settings)
            variant = {
                "form": form,
                "recipe": RECIPE[form],
                "rows": len(rows),
                "synthetic_rows": len(sources["synthetic"].rows) if "synthetic" in sources else 0,
                "synthetic_weight": args.synthetic_weight,
                "synthetic_form": synthetic_form,
                "lr": args.lr,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "max_seq_length": args.max_seq_length,
                "train_s": time.perf_counter() - started,
                "steps": trained.steps,
            }
            student = load_model(folder)
            unit = {"batch_size": 64, "normalize_embeddings": True, "show_progress_bar": False}
            doc_vectors = dict(zip(texts, student.encode_document(texts, **unit), strict=True))
            query_vectors = dict(
                zip(claim_texts, student.encode_query(claim_texts, **unit), strict=True)
            )
            tuned = evaluate_embeddings(
                query_vectors, doc_vectors, corpus, eval_queries, relevant, [DIM], keep_hits=True
            )
            record(variant, tuned)
            nudges(doc_vectors, query_vectors, variant)


if __name__ == "__main__":
    main()
