"""Time the two LLM stages of the demo on a workspace's real chunks and questions: the local
generator at several batch sizes (3 questions per chunk, as the demo asks) and the label stage's
judging (`tasks.learn.synthetic.label_questions`, top K plus the own chunk, a fresh judgement
cache, the demo's judge with its passage-state cache).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/label_speed.py --workspace workspace
    HF_HUB_OFFLINE=1 bench/avx2-only .venv/bin/python bench/label_speed.py --no-judge

The workspace must hold a questions stage's output (`make demo` writes one). Run it alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from preamble import command, machine

from tasks.learn.judgements import Judgements
from tasks.learn.judges import make_judge
from tasks.learn.rows import embed_for_retrieval
from tasks.learn.synthetic import label_questions, labelled
from tasks.models import MINILM, load_model
from tasks.questions.writers import make_generator
from tasks.workspace import Workspace, load_rows


def time_generator(chunks: list[str], batch_size: int) -> str:
    generator = make_generator("local", n=3, batch_size=batch_size, show_progress=False)
    generator.generate(chunks[:1])  # loads the model
    started = time.perf_counter()
    results = generator.generate(chunks)
    seconds = time.perf_counter() - started
    questions = sum(len(r.questions) for r in results)
    return (
        f"| generator, batch {batch_size} | {len(chunks)} chunks, {questions} questions | "
        f"{seconds:.1f} | {questions / seconds:.2f} questions/s |"
    )


def time_judge(ws: Workspace, questions: int, top_k: int) -> str:
    texts = {row["id"]: row["text"] for row in load_rows(ws.chunks_dir)}
    asked = labelled(load_rows(ws.questions_dir))[:questions]
    retrieval = embed_for_retrieval(load_model(MINILM), texts, [q["question"] for q in asked])
    judge = make_judge({"backend": "local", "cache_size": 256})
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        label_questions(asked, texts, retrieval, judge, Judgements(Path(folder) / "j"), top_k)
        seconds = time.perf_counter() - started
    return (
        f"| label, top {top_k} + own chunk | {len(asked)} questions | {seconds:.1f} | "
        f"{seconds / len(asked):.3f} s/question |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--chunks", type=int, default=48, help="Chunks the generator writes for.")
    parser.add_argument("--batch-sizes", default="15,48")
    parser.add_argument("--questions", type=int, default=96, help="Questions judged.")
    parser.add_argument("--tops", default="10,5")
    parser.add_argument("--no-judge", action="store_true")
    args = parser.parse_args()
    ws = Workspace.at(args.workspace)
    print(command())
    print(machine())
    print("| work | size | s | rate |\n|---|---|---|---|")
    chunks = [row["text"] for row in load_rows(ws.chunks_dir)][: args.chunks]
    for size in args.batch_sizes.split(","):
        print(time_generator(chunks, int(size)), flush=True)
    if not args.no_judge:
        for top in args.tops.split(","):
            print(time_judge(ws, args.questions, int(top)), flush=True)


if __name__ == "__main__":
    main()
