"""Benchmark fine-tuning throughput: ragtune's training path against a plain trainer script.

Both train the bundled MiniLM with MatryoshkaLoss(MNRL) on the same pairs with the same settings
(batch 32, max_seq_length 128, 1 epoch, lr 5e-5, 10% warmup, no-duplicates batches, seed 42)
and save the model; each is timed end to end (load, train, save), back to back in one process,
alternated (ABAB...) so that load from other processes hits both alike. ragtune's path
(`tasks.training.trainer.train`, what the finetune flow runs) adds per-step loss checks, checkpoint
bookkeeping, prompts and `ragtune.json`; the target is >= 0.95 of the plain pairs/s.

Pairs are simple and real: the demo PDF (NIST AI 600-1) chunked at 128 tokens, the first
sentence of a chunk as the anchor and the rest as the positive.
Throughput is taken from each path's least disturbed round (other processes only ever slow a
run down), by wall time and by this process's CPU time, which load from others barely moves.
Peak RSS is the process high-water mark, reset before each run where Linux allows it
(/proc/self/clear_refs), else the running maximum from `resource.getrusage`.
CPU heavy: run it alone, once. Prints a markdown table and writes it, with the command that made
it, to bench/RESULTS-training.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/training.py --pairs 200 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import tempfile
import time
from pathlib import Path

from preamble import NIST_PDF, ROOT, command, machine

import torch
from datasets import Dataset
from transformers import TrainerCallback

from tasks.models import MINILM, load_model
from tasks.retrieval.report import markdown_table
from tasks.training.recipes import matryoshka_dims
from tasks.training.trainer import TrainSettings, train

RESULTS = ROOT / "bench" / "RESULTS-training.md"
SETTINGS = {
    "epochs": 1,
    "batch_size": 32,
    "learning_rate": 5e-5,
    "warmup": 0.1,
    "max_seq_length": 128,
    "seed": 42,
}


def nist_pairs(n: int) -> Dataset:
    from tasks.ingest.chunking import chunk_pages
    from tasks.ingest.documents import read_document

    tokenizer = load_model(MINILM).tokenizer
    chunks = chunk_pages(read_document(NIST_PDF), tokenizer, max_tokens=128, overlap=16)
    rows, seen = [], set()
    for chunk in chunks:
        parts = re.split(r"(?<=[.?!])\s+", chunk.text.strip(), maxsplit=1)
        if len(parts) < 2 or len(parts[0].split()) < 4 or parts[0] in seen:
            continue
        seen.add(parts[0])
        rows.append({"anchor": parts[0], "positive": parts[1]})
        if len(rows) == n:
            break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} pairs in {NIST_PDF.name}; ask for fewer")
    return Dataset.from_list(rows)


class StepClock(TrainerCallback):
    """Times each optimizer step (end to end of consecutive steps), the same way for both
    paths: the fastest steps are the ones other processes disturbed least."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self, *_: object) -> None:
        self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.tick()

    def full_steps(self) -> list[float]:
        """Durations of steps 2..n-1: the first has no start mark, the last batch is partial."""
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][:-1]


def plain_script(data: Dataset, out: Path, clock: StepClock) -> int:
    """What a user would write from the sentence-transformers docs, with the same settings."""
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import (
        BatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    model = load_model(MINILM)
    model.max_seq_length = SETTINGS["max_seq_length"]
    loss = losses.MatryoshkaLoss(
        model,
        losses.MultipleNegativesRankingLoss(model),
        matryoshka_dims=matryoshka_dims(model.get_embedding_dimension()),
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=SETTINGS["epochs"],
        per_device_train_batch_size=SETTINGS["batch_size"],
        learning_rate=SETTINGS["learning_rate"],
        warmup_steps=SETTINGS["warmup"],
        seed=SETTINGS["seed"],
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=loss, callbacks=[clock]
    )
    trainer.train()
    model.save(str(out))
    return trainer.state.global_step


def ragtune(data: Dataset, out: Path, clock: StepClock) -> int:
    settings = TrainSettings("matryoshka-mnrl", **SETTINGS)
    return train(MINILM, data, out, settings, progress=clock.tick).steps


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternated A/B rounds")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    data = nist_pairs(args.pairs)
    runs: dict[str, list[dict]] = {"plain": [], "ragtune": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ("plain", "ragtune") if round_ % 2 == 0 else ("ragtune", "plain")
            for name in order:
                out = Path(tmp) / f"{name}-{round_}"
                exact = reset_peak()
                start, cpu_start = time.perf_counter(), time.process_time()
                clock = StepClock()
                steps = (plain_script if name == "plain" else ragtune)(data, out, clock)
                seconds = time.perf_counter() - start
                cpu = time.process_time() - cpu_start
                runs[name].append(
                    {
                        "seconds": seconds,
                        "cpu": cpu,
                        "steps": steps,
                        "peak_mb": peak_mb(),
                        "exact": exact,
                        "step_s": clock.full_steps(),
                    }
                )
                print(f"{name} round {round_}: {seconds:.1f} s, {cpu:.1f} CPU s", flush=True)

    def rate(name: str, key: str) -> float:
        """Pairs per second of the least disturbed run: other processes only ever slow a run."""
        return len(data) * SETTINGS["epochs"] / min(r[key] for r in runs[name])

    wall_ratio = rate("ragtune", "seconds") / rate("plain", "seconds")
    cpu_ratio = rate("ragtune", "cpu") / rate("plain", "cpu")

    def fastest_step(name: str) -> float:
        return min(step for r in runs[name] for step in r["step_s"])

    step_ratio = fastest_step("plain") / fastest_step("ragtune")
    rows = [
        {
            "path": label,
            "pairs": len(data),
            "steps": runs[name][0]["steps"],
            "wall s (each round)": " / ".join(f"{r['seconds']:.1f}" for r in runs[name]),
            "pairs/s (wall, best)": rate(name, "seconds"),
            "CPU s (each round)": " / ".join(f"{r['cpu']:.1f}" for r in runs[name]),
            "pairs per CPU s (best)": rate(name, "cpu"),
            "fastest full step s": fastest_step(name),
            "median full step s": statistics.median(s for r in runs[name] for s in r["step_s"]),
            "peak RSS MB": max(r["peak_mb"] for r in runs[name]),
        }
        for name, label in (
            ("plain", "plain SentenceTransformerTrainer script"),
            ("ragtune", "tasks.training.trainer.train (finetune flow)"),
        )
    ]
    words = statistics.mean(len(t.split()) for t in data["positive"])
    exact = all(r["exact"] for rs in runs.values() for r in rs)
    text = (
        "# Fine-tuning throughput benchmark\n\n"
        f"Command: `{command()}`\n\n"
        f"Machine: {machine()} (shared with other work), "
        f"{'GPU' if torch.cuda.is_available() else 'no GPU'}; "
        f"model {MINILM}, MatryoshkaLoss(MNRL) dims {matryoshka_dims(384)}; {len(data)} NIST "
        f"AI 600-1 pairs (positives ~{words:.0f} words), batch {SETTINGS['batch_size']}, "
        f"max_seq_length {SETTINGS['max_seq_length']}, {SETTINGS['epochs']} epoch; "
        f"{args.rounds} alternated round(s), timed end to end (load, train, save).\n\n"
        + markdown_table(rows)
        + f"\nThroughput ratio ragtune / plain: **{wall_ratio:.3f}** by wall time, "
        f"**{cpu_ratio:.3f}** by CPU time, **{step_ratio:.3f}** by fastest full step "
        "(target >= 0.95). The machine is shared, so wall "
        "time swings with other processes' load; CPU time of this process is the steadier "
        "measure of the work each path does. The first run in the process pays a one-off "
        "warm-up (allocator, kernel caches) that the alternation spreads over both paths.\n\n"
        + (
            "Peak RSS: high-water mark of each run (reset between runs).\n"
            if exact
            else "Peak RSS: process-wide running maximum (could not reset between runs).\n"
        )
    )
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
