"""Benchmark learning from a query log on real human queries (SciFact dev).

The 809 dev claims are split 50/50 by the seeded held-out rule of `tasks.querylog` into a *log*
half, whose texts play the users' logged queries (their human judgements are never read for
training), and an *evaluation* half. Zero-shot MiniLM retrieves the top K abstracts of every log
claim, the bundled judge scores them (`tasks.learning.judge_queries`, cached in
`bench/out/learn/`), the rows of each label form train MiniLM, and the tuned model is scored
on the evaluation half against the human judgements: NDCG@10 at full width, the paired
bootstrap interval against zero-shot, and the same with the judge re-ranking each model's top
10. The gain is broken down by whether an evaluation claim's relevant abstract was among the
log's judged candidates (the human judgements are used for that breakdown only), so remembering
popular documents is not mistaken for general improvement. CPU heavy: the judge reads K
abstracts per claim, and every tuned model re-encodes the 5,183 abstracts.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/learn.py --top 10 --forms positives,distill
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from preamble import ROOT, beir_folder, machine

import numpy as np

from tasks.beir import load_beir
from tasks.evaluation import ModelEval, evaluate_model, paired_bootstrap, ranking_metrics
from tasks.judgements import Judgements
from tasks.judges import LocalJudge
from tasks.learning import JudgedQuery, judge_queries, training_rows
from tasks.models import MINILM, load_model
from tasks.querylog import is_held_out
from tasks.relevance import reorder_head
from tasks.training import train
from tasks.workspace import rows_to_dataset

OUT = ROOT / "bench" / "out" / "learn"
DIM = 384
RECIPE = {
    "positives": "matryoshka-mnrl",
    "negatives": "matryoshka-mnrl",
    "distill": "matryoshka-distill",
}


def evaluate(model_ref: str, name: str, corpus, queries, relevant) -> ModelEval:
    return evaluate_model(
        load_model(model_ref), corpus, queries, relevant, [DIM], name=name, keep_hits=True
    )


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beir", type=Path, help="BEIR folder (default: $RAGTUNE_BEIR).")
    parser.add_argument("--top", type=int, default=10, help="Candidates judged per log claim.")
    parser.add_argument("--forms", default="positives,distill", help="Label forms to train.")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rerank", type=int, default=10, help="Also re-rank the top N (0: no).")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    args.beir = beir_folder(args.beir)
    OUT.mkdir(parents=True, exist_ok=True)

    corpus, claims, relevant = load_beir(args.beir, "dev")
    log_ids = [q for q in claims if not is_held_out(claims[q], 0.5, args.seed)]
    eval_ids = [q for q in claims if is_held_out(claims[q], 0.5, args.seed)]
    eval_queries = {q: claims[q] for q in eval_ids}
    print(f"{len(log_ids)} log claims, {len(eval_ids)} evaluation claims, {len(corpus)} abstracts")

    # Zero-shot retrieval of every claim once: candidates for the log half, the baseline for
    # the evaluation half. Labels are read for the evaluation half's metrics only.
    base = evaluate(MINILM, "zero-shot", corpus, claims, relevant)
    base_ndcg = [base.ndcg_per_query[DIM][q] for q in eval_ids]
    judge = LocalJudge()
    log_cache = Judgements(OUT / "judgements-log.sqlite")
    started = time.perf_counter()
    run = judge_queries(
        [claims[q] for q in log_ids],
        [base.hits[DIM][q][: args.top] for q in log_ids],
        corpus,
        judge,
        log_cache,
        held_out_share=0.0,
    )
    judge_wall = time.perf_counter() - started
    judged: list[JudgedQuery] = run.judged
    seen_docs = {cid for q in judged for cid in q.chunk_ids}
    seen = [bool(relevant[q] & seen_docs) for q in eval_ids]
    print(
        f"judged {run.new} new log claims in {run.judge_s:.0f} s "
        f"({run.seconds_per_new_query:.2f} s each); {sum(seen)}/{len(seen)} evaluation claims "
        f"have a relevant abstract among the log's candidates"
    )

    eval_cache = Judgements(OUT / "judgements-eval.sqlite")
    if args.rerank:
        base_rr, _, _ = reranked_ndcg(
            base.hits[DIM], eval_queries, relevant, corpus, judge, eval_cache, args.rerank
        )
    common = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/learn.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "log_claims": len(log_ids),
        "eval_claims": len(eval_ids),
        "eval_claims_seen": int(sum(seen)),
        "top": args.top,
        "judge": judge.fingerprint(),
        "judge_new_claims": run.new,
        "judge_s_per_claim": run.seconds_per_new_query,
        "judge_wall_s": judge_wall,
        "top1_changed": run.top_changed(),
        "ndcg10_zero_shot": 100 * float(np.mean(base_ndcg)),
    }
    if args.rerank:
        common["ndcg10_zero_shot_rerank"] = 100 * float(np.mean(base_rr))
        common["rerank_over_zero_shot"] = gains(base_ndcg, base_rr, seen)

    for form in args.forms.split(","):
        rows = training_rows(judged, corpus, form)
        with tempfile.TemporaryDirectory(dir=OUT) as folder:
            started = time.perf_counter()
            trained = train(
                MINILM,
                rows_to_dataset(rows),
                Path(folder),
                RECIPE[form],
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                max_seq_length=256,
                seed=args.seed,
                resume=False,
            )
            train_s = time.perf_counter() - started
            tuned = evaluate(folder, form, corpus, eval_queries, relevant)
            tuned_ndcg = [tuned.ndcg_per_query[DIM][q] for q in eval_ids]
            record = {
                **common,
                "form": form,
                "recipe": RECIPE[form],
                "rows": len(rows),
                "lr": args.lr,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "train_s": train_s,
                "steps": trained.steps,
                "ndcg10_tuned": 100 * float(np.mean(tuned_ndcg)),
                "tuned_over_zero_shot": gains(base_ndcg, tuned_ndcg, seen),
            }
            if args.rerank:
                tuned_rr, rr_s, _ = reranked_ndcg(
                    tuned.hits[DIM], eval_queries, relevant, corpus, judge, eval_cache, args.rerank
                )
                record["ndcg10_tuned_rerank"] = 100 * float(np.mean(tuned_rr))
                record["tuned_rerank_over_zero_shot_rerank"] = gains(base_rr, tuned_rr, seen)
                record["rerank_judge_s"] = rr_s
        record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with (OUT / "runs.jsonl").open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
