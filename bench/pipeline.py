"""Cold versus warm `pipeline` on the demo corpus, and what one new 8-page PDF adds.

Runs the demo profile three times in one fresh workspace:
1. cold: empty workspace (the dequantised Gemma cache may already exist; reported);
2. warm: the same corpus again: every stage should be reused;
3. +1 PDF: the RAGAS paper (8 pages) added: ingest, questions for its chunks only, retrain,
   evaluate, publish; then a nightly `refresh` with nothing new.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/pipeline.py [--out bench/out/pipeline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW_PDF = ROOT / "tests" / "fixtures" / "RAGAS_2309.15217.pdf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/pipeline")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

    from flows.params import PipelineParams
    from flows.pipeline import pipeline
    from flows.refresh import refresh
    from tasks.llm.gemma import cache_root

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    sources = out / "sources"
    sources.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "sources" / "NIST.AI.600-1.pdf", sources)
    gemma_cached = any(cache_root().glob("gemma-*/config.json"))
    params = PipelineParams(workspace=str(out / "workspace"), sources=[str(sources)])

    rows: list[dict] = []
    reports: list[Path] = []
    for label in ("cold", "warm"):
        start = time.perf_counter()
        result = pipeline(params)
        rows.append(_row(label, time.perf_counter() - start, result, params.workspace))
        reports = reports or [Path(result.report_dir) / "report.md"]
    shutil.copy(NEW_PDF, sources)
    start = time.perf_counter()
    result = pipeline(params)
    rows.append(_row("+1 PDF (8 pages)", time.perf_counter() - start, result, params.workspace))
    start = time.perf_counter()
    refreshed = refresh(params)
    rows.append(
        {
            "run": "refresh, unchanged",
            "wall_s": round(time.perf_counter() - start, 1),
            "stages_s": refreshed.seconds,
            "reused": refreshed.reused,
            "published": refreshed.collection,
            "llm_calls": refreshed.new_llm_calls,
            "embedded": refreshed.embedded,
        }
    )

    print(f"Gemma dequantised cache present before the cold run: {gemma_cached}\n")
    print("| run | wall s | seconds per stage | reused stages | LLM calls | embedded | published |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['wall_s']} | {json.dumps(row['stages_s'])} | "
            f"{', '.join(row['reused']) or '-'} | {row['llm_calls']} | {row['embedded']} | "
            f"{row['published']} |"
        )
    _print_report(reports[0])


def _print_report(path: Path) -> None:
    print(f"\nEvaluation of the cold run ({path}):\n")
    print(path.read_text())


def _row(label: str, wall_s: float, result, workspace: str) -> dict:
    """One run's line; LLM calls and chunks embedded come from the stages that really ran."""
    ledger = json.loads((Path(workspace) / "stages.json").read_text())
    ran = {stage: entry["summary"] for stage, entry in ledger.items()}
    return {
        "llm_calls": 0 if "questions" in result.reused else ran["questions"]["llm_calls"],
        "embedded": ran["publish"]["embedded"] if result.published else 0,
        "run": label,
        "wall_s": round(wall_s, 1),
        "stages_s": result.seconds,
        "reused": result.reused,
        "published": result.published,
        "chunks": result.chunks,
        "kept": result.questions_kept,
        "gate": result.gate_reason,
    }


if __name__ == "__main__":
    main()
