"""The `ragtune` command: run the pipeline or one stage, search, roll back, serve.

Every command is a thin shell over a flow, so what runs from the shell is exactly what runs
from a deployment or the dashboard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

STAGES = ("ingest", "questions", "finetune", "evaluate", "publish")


def _configure_environment() -> None:
    """Offline-friendly defaults, set before Prefect or Hugging Face libraries are imported.

    Prefect keeps its database in the project (`.prefect/`) rather than the home folder, and an
    ephemeral API gets time to start on a slow, cold machine.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, lists, true)."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def _stage(name: str):
    """The flow and its parameter model for a stage name."""
    import importlib

    module = importlib.import_module(f"flows.{name}")
    params_cls = next(
        getattr(module, attr)
        for attr in dir(module)
        if attr.endswith("Params") and getattr(module, attr).__module__ == module.__name__
    )
    return getattr(module, name), params_cls


def run_pipeline(settings: dict[str, Any]):
    from flows.pipeline import PipelineParams, pipeline

    return pipeline(PipelineParams(**settings))


def print_search(
    workspace: str, query: str, k: int, alias: str, rerank: int = 0
) -> list[dict[str, Any]]:
    """Run the search flow's body here (no flow run for a one-off query); it prints the hits."""
    from flows.search import SearchParams
    from flows.search import search as search_flow

    params = SearchParams(workspace=workspace, query=query, k=k, alias=alias, rerank=rerank)
    return search_flow.fn(params)


def print_demo_summary(result, workspace: str) -> None:
    from tasks.workspace import Workspace, load_rows

    ws = Workspace.at(workspace)
    print("\n" + "=" * 72)
    print(f"model:   {result.model_path}")
    print(f"report:  {result.report_dir}/report.md")
    print(f"chroma:  {ws.chroma_dir}")
    if result.published:
        print(f"alias:   {result.alias} -> {result.collection}")
    else:
        print(f"gate:    not published: {result.gate_reason}")
    print(f"seconds: {json.dumps(result.seconds)}")
    metrics_md = Path(result.report_dir) / "report.md"
    if metrics_md.exists():
        print("\n" + metrics_md.read_text())
    if result.published:
        test = [q for q in load_rows(ws.questions_dir) if q["kept"] and q["split"] == "test"]
        if test:
            # The first held-out question, whatever its fate: a demo that picked a question
            # the model gets right would show nothing.
            query, source = test[0]["question"], test[0]["chunk_id"]
            print(f"\nExample search, a held-out question: {query!r}")
            hits = print_search(workspace, query, 5, result.alias)
            ranks = [rank for rank, hit in enumerate(hits, 1) if hit["id"] == source]
            where = f"rank {ranks[0]}" if ranks else "not in the top 5"
            print(f"The chunk this question was generated from ({source}) is {where}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="Run the offline demo pipeline on data/sources.")
    demo.add_argument("--workspace", default="workspace")

    run = sub.add_parser("run", help="Run the whole pipeline.")
    run.add_argument("--profile", default="demo", choices=["demo", "production"])
    run.add_argument("--workspace", default="workspace")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    for name in STAGES:
        stage = sub.add_parser(name, help=f"Run the {name} stage alone.")
        stage.add_argument("--workspace", default="workspace")
        stage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    search = sub.add_parser("search", help="Query the published collection.")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--alias", default="docs")
    search.add_argument("--workspace", default="workspace")
    search.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="Let the bundled LLM read the top N chunks and reorder them (slower, better).",
    )

    sub.add_parser("serve", help="Serve every deployment in prefect.yaml from this process.")

    rollback = sub.add_parser("rollback", help="Point the alias back at the previous version.")
    rollback.add_argument("--alias", default="docs")
    store_options(rollback)

    prune = sub.add_parser(
        "prune", help="Remove versions no alias uses (what an interrupted publish left)."
    )
    store_options(prune)

    unlock = sub.add_parser(
        "unlock", help="Clear a Chroma server's publish lease whose holder is dead."
    )
    store_options(unlock)
    return parser


def store_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--workspace", default="workspace")
    command.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Store settings: chroma_path, chroma_host, chroma_port, chroma_token_env.",
    )


def open_store(args: argparse.Namespace):
    from flows.search import StoreParams

    return StoreParams(workspace=args.workspace, **parse_settings(args.set)).open_store()


def print_waiting(holder) -> None:
    who = holder.describe() if holder else "another process"
    print(f"waiting for the publish lock: held by {who}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_environment()
    if args.command == "demo":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = run_pipeline({"workspace": args.workspace, "profile": "demo"})
        print_demo_summary(result, args.workspace)
    elif args.command == "run":
        settings = {"workspace": args.workspace, "profile": args.profile}
        result = run_pipeline(settings | parse_settings(args.set))
        print(result.model_dump_json(indent=2))
    elif args.command in STAGES:
        flow_fn, params_cls = _stage(args.command)
        params = params_cls(workspace=args.workspace, **parse_settings(args.set))
        print(flow_fn(params).model_dump_json(indent=2))
    elif args.command == "search":
        print_search(args.workspace, args.query, args.k, args.alias, args.rerank)
    elif args.command == "serve":
        from flows.serve import main as serve

        serve()
    elif args.command == "rollback":
        from tasks.store import rollback

        live = rollback(open_store(args), args.alias, on_wait=print_waiting)
        print(f"{args.alias} -> {live}")
    elif args.command == "prune":
        from tasks.store import remove_unaliased

        removed = remove_unaliased(open_store(args), on_wait=print_waiting)
        print(f"removed {len(removed)} unaliased version(s)" + "".join(f"\n  {n}" for n in removed))
    elif args.command == "unlock":
        from tasks.locks import break_lock

        holder = break_lock(open_store(args))
        print(
            f"cleared the publish lease of {holder.describe()}"
            if holder
            else "no lease to clear (an embedded store's lock ends with its process)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
