"""Benchmark query-time re-ranking by the bundled LLM judge on real human queries (SciFact dev).

Zero-shot MiniLM retrieves the top `--top` abstracts for each of the 801 evaluated dev claims
(the same 8 claims as `bench/quality.py` are set aside, so the numbers compare); the bundled Gemma
3 270M then scores each candidate by the log-probability of the claim after the abstract, and
`tasks.retrieval.rerank.rerank_order` mixes both scores. NDCG@10 with and without re-ranking, paired
bootstrap interval, and the judge's wall time per query (amortised over `--group` claims judged
together). CPU heavy (one LLM pass per candidate); the corpus's MiniLM vectors are kept in
bench/out/rerank/ after the first run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py --top 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from preamble import ROOT, add_passage_tokens, beir_folder, command, machine, stored_vectors

import numpy as np
from tqdm import tqdm

from tasks.llm.likelihood import local_judge_name, score_grouped, style_judges
from tasks.models import MINILM, load_model
from tasks.questions.fewshot import labelled_split
from tasks.retrieval.evaluation import paired_bootstrap, ranking_metrics
from tasks.retrieval.rerank import reorder_head, rerank_order

OUT = ROOT / "bench" / "out" / "rerank"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beir", type=Path, help="BEIR folder (default: $RAGTUNE_BEIR).")
    parser.add_argument("--split", default="dev", help="qrels/<split>.tsv to evaluate on.")
    parser.add_argument("--top", type=int, default=10, help="Candidates the judge re-scores.")
    parser.add_argument(
        "--weight", type=float, default=1.0, help="The judge's weight (the default's 1.0)."
    )
    parser.add_argument("--limit", type=int, default=0, help="Only the first n claims (0: all).")
    parser.add_argument(
        "--cache", type=int, default=0, help="Passages whose states the judge keeps (0: none)."
    )
    parser.add_argument(
        "--group", type=int, default=1, help="Claims judged together in shared batches."
    )
    add_passage_tokens(parser)
    args = parser.parse_args()
    args.beir = beir_folder(args.beir)

    split = labelled_split(args.beir, args.split, 8, 42)
    query_ids = [q for q in split.queries if split.relevant.get(q)]
    if args.limit:
        query_ids = query_ids[: args.limit]
    doc_ids = list(split.corpus)
    model = load_model(MINILM)
    encode = {"batch_size": 64, "normalize_embeddings": True}
    corpus = stored_vectors(model, MINILM, [split.corpus[d] for d in doc_ids])
    queries = model.encode([split.queries[q] for q in query_ids], **encode)
    scores = queries @ corpus.T

    judge_for = style_judges(args.cache, args.passage_tokens or None)
    rankings, top_scores = [], []
    for row in range(len(query_ids)):
        order = np.argsort(-scores[row])[:100]
        rankings.append([doc_ids[i] for i in order])
        top_scores.append(scores[row][order[: args.top]].tolist())
    judged, seconds = [], []
    for start in tqdm(range(0, len(query_ids), args.group), desc="judging", unit="group"):
        rows = range(start, min(start + args.group, len(query_ids)))
        items = [
            (split.queries[query_ids[r]], [split.corpus[d] for d in rankings[r][: args.top]])
            for r in rows
        ]
        started = time.perf_counter()
        judged += score_grouped(judge_for, items)
        seconds += [(time.perf_counter() - started) / len(rows)] * len(rows)

    def ndcg(weight: float) -> list[float]:
        out = []
        for row, qid in enumerate(query_ids):
            order = rerank_order(top_scores[row], judged[row], weight)
            reranked = reorder_head(rankings[row], order)
            out.append(ranking_metrics(reranked, split.relevant[qid])["ndcg@10"])
        return out

    base_ndcg, reranked_ndcg = ndcg(0.0), ndcg(args.weight)
    gain, low, high = paired_bootstrap(base_ndcg, reranked_ndcg)
    # How much the weight matters (read, not tuned: the default stays 1.0, equal opinions).
    sensitivity = {w: float(np.mean(ndcg(w))) for w in (0.5, 2.0, 1000.0)}
    record = {
        "command": command(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "claims": len(query_ids),
        "top": args.top,
        "weight": args.weight,
        "judge": local_judge_name(),
        "judge_cache": args.cache,
        "group": args.group,
        "passage_tokens": args.passage_tokens,
        "ndcg10_base": float(np.mean(base_ndcg)),
        "ndcg10_reranked": float(np.mean(reranked_ndcg)),
        "gain": gain,
        "interval": [low, high],
        "claims_better": int(sum(r > b for b, r in zip(base_ndcg, reranked_ndcg, strict=True))),
        "claims_worse": int(sum(r < b for b, r in zip(base_ndcg, reranked_ndcg, strict=True))),
        "ndcg10_by_weight": sensitivity,
        "judge_s_per_query_p50": float(np.percentile(seconds, 50)),
        "judge_s_per_query_p95": float(np.percentile(seconds, 95)),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "runs.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
