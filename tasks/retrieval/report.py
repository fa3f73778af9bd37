"""The evaluation report: metrics.json for machines, report.md and a plot for people, and the
tuned model's card, so the numbers travel with the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.retrieval.evaluation import (
    HEADLINE,
    METRICS,
    GateDecision,
    MetricsError,
    ModelEval,
    check_metrics,
)
from tasks.text import shorten

CARD_HEADING = "## ragtune evaluation"


def write_report(
    out_dir: Path,
    evals: list[ModelEval],
    decision: GateDecision | None,
    intervals: dict[int, tuple[float, float, float]],
    regressions: list[dict],
    title: str,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write metrics.json, report.md and ndcg_by_dim.png into `out_dir`; return their paths.

    The first evaluation is the baseline and the second the tuned model when a decision or
    intervals are given. Every metric is checked first: a NaN never reaches a report.
    """
    if not evals:
        raise MetricsError("Nothing to report: no model was evaluated.")
    for evaluation in evals:
        check_metrics(evaluation)
    for dim, values in intervals.items():
        if not all(math.isfinite(v) for v in values):
            raise MetricsError(f"The bootstrap interval at dim {dim} is not finite: {values}.")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out_dir / "metrics.json",
        "report": out_dir / "report.md",
        "plot": out_dir / "ndcg_by_dim.png",
    }
    payload = {
        "title": title,
        "models": [
            {
                "name": e.name,
                "model": e.model,
                "query_prompt": e.query_prompt,
                "corpus_prompt": e.corpus_prompt,
                "n_queries": e.n_queries,
                "n_corpus": e.n_corpus,
                "metrics": {str(dim): e.metrics[dim] for dim in e.dims},
                # Each query's first relevant document's rank (null: not in the top 100), so
                # a per-query comparison needs no second encoding of the corpus.
                "first_rank": {str(dim): e.first_rank[dim] for dim in e.dims},
            }
            for e in evals
        ],
        "decision": _decision_dict(decision),
        "intervals": {
            str(dim): {"gain": gain, "low": low, "high": high}
            for dim, (gain, low, high) in sorted(intervals.items(), reverse=True)
        },
        "regressions": regressions,
    }
    paths["metrics"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    _plot(paths["plot"], evals, title, decision)
    paths["report"].write_text(
        report_markdown(
            evals, decision, intervals, regressions, title, paths["plot"].name, notes=notes
        ),
        encoding="utf-8",
    )
    return paths


def dim_rows(
    evals: list[ModelEval], intervals: dict[int, tuple[float, float, float]] | None = None
) -> list[dict[str, Any]]:
    """One row per dimension: NDCG@10 and MRR@10 of each model, and the paired gain if known."""
    dims = sorted({dim for e in evals for dim in e.metrics}, reverse=True)
    rows = []
    for dim in dims:
        row: dict[str, Any] = {"dim": dim}
        for metric in ("ndcg@10", "mrr@10"):
            for e in evals:
                value = e.metrics.get(dim, {}).get(metric)
                row[f"{e.name} {metric}"] = round(value, 4) if value is not None else "-"
        if intervals and dim in intervals:
            gain, low, high = intervals[dim]
            row["ndcg@10 gain"] = round(gain, 4)
            row["95% interval"] = f"[{low:+.4f}, {high:+.4f}]"
        rows.append(row)
    return rows


def report_markdown(
    evals: list[ModelEval],
    decision: GateDecision | None,
    intervals: dict[int, tuple[float, float, float]],
    regressions: list[dict],
    title: str,
    plot_name: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The human report: decision first (and any `notes`, one paragraph each), then the plot's
    numbers, intervals and regressions."""
    parts = [f"# {title}\n"]
    if decision is not None:
        parts.append(f"**Gate decision.** {decision.reason}\n")
    parts.extend(f"{note}\n" for note in notes)
    parts.append(
        "Models: "
        + "; ".join(
            f"`{e.name}` = `{e.model}` ({e.n_queries} queries, {e.n_corpus} documents"
            + (f", query prompt {shorten(e.query_prompt, 60)!r}" if e.query_prompt else "")
            + (f", document prompt {shorten(e.corpus_prompt, 60)!r}" if e.corpus_prompt else "")
            + ")"
            for e in evals
        )
        + "\n"
    )
    parts.append("## NDCG@10 by dimension\n")
    if plot_name:
        parts.append(f"![NDCG@10 by dimension]({plot_name})\n")
    parts.append(markdown_table(dim_rows(evals, intervals)))
    if intervals:
        parts.append(
            "The gain is tuned minus base NDCG@10, paired by query; the interval is a 95% "
            "percentile bootstrap over queries (2,000 resamples).\n"
        )
    parts.append("## Metrics per dimension\n")
    for e in evals:
        parts.append(f"### {e.name}\n")
        parts.append(markdown_table(metric_rows(e)))
    if regressions:
        dim = f" at dimension {decision.dim}" if decision is not None else ""
        parts.append(f"## Queries that got worse{dim}\n")
        parts.append(
            "Rank of the first relevant document before and after tuning (empty: not in the "
            "top 100).\n"
        )
        parts.append(markdown_table(regressions))
    return "\n".join(parts)


def metric_rows(evaluation: ModelEval) -> list[dict[str, Any]]:
    """Rows of metric name and one column per dimension, like the sentence-transformers card."""
    return [
        {"metric": metric, **{str(dim): evaluation.metrics[dim][metric] for dim in evaluation.dims}}
        for metric in METRICS
    ]


def card_section(
    evals: list[ModelEval],
    decision: GateDecision | None,
    intervals: dict[int, tuple[float, float, float]],
    source: str | None = None,
) -> str:
    """The "## ragtune evaluation" section of a model card."""
    lines = [CARD_HEADING, ""]
    if source:
        lines += [f"Evaluated on {source}, against `{evals[0].model}`.", ""]
    if decision is not None:
        lines += [f"Gate decision: {decision.reason}", ""]
    lines.append(markdown_table(dim_rows(evals, intervals)))
    tuned = evals[-1]
    lines.append(f"All metrics of `{tuned.name}` ({tuned.n_queries} queries):\n")
    lines.append(markdown_table(metric_rows(tuned)))
    return "\n".join(lines)


def update_model_card(model_dir: Path, section: str, data: dict[str, Any]) -> None:
    """Put `section` into README.md (replacing an earlier one) and merge `data` into
    ragtune.json under "evaluation", so a re-evaluation updates the card instead of piling up."""
    model_dir = Path(model_dir)
    readme = model_dir / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    start = text.find(CARD_HEADING)
    if start >= 0:
        end = text.find("\n## ", start + len(CARD_HEADING))
        text = text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section.rstrip() + "\n"
    readme.write_text(text, encoding="utf-8")

    meta_path = model_dir / "ragtune.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    meta["evaluation"] = data
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _decision_dict(decision: GateDecision | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    return {
        "publish": decision.publish,
        "dim": decision.dim,
        "reason": decision.reason,
        "gain": decision.gain,
        "low": decision.low,
        "high": decision.high,
        "base_ndcg": decision.base_ndcg,
        "tuned_ndcg": decision.tuned_ndcg,
    }


def _plot(path: Path, evals: list[ModelEval], title: str, decision: GateDecision | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    try:
        for e in evals:
            dims = sorted(e.metrics)
            ax.plot(dims, [e.metrics[d][HEADLINE] for d in dims], marker="o", label=e.name)
        if decision is not None:
            ax.axvline(
                decision.dim,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"chosen dim {decision.dim}" + ("" if decision.publish else " (blocked)"),
            )
        all_dims = sorted({d for e in evals for d in e.metrics})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_dims, [str(d) for d in all_dims])
        ax.minorticks_off()
        ax.set_xlabel("embedding dimension")
        ax.set_ylabel("NDCG@10")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a GitHub-flavoured markdown table: floats to 4 places, None as an empty cell."""
    if not rows:
        return "_(none)_\n"
    headers = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return ""
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row.get(h, "")) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"
