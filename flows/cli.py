"""The `ragtune` command: run the pipeline or one stage, search, roll back, serve.

Every command is a thin shell over a flow or a task, so what runs from the shell is exactly what
runs from a deployment or the dashboard. Options are made from the same pydantic parameter
models as the dashboard's forms, with the same descriptions as their help, so the two never
drift; `--set KEY=VALUE` reaches any field, a dotted key a field of a section
(`--set finetune.epochs=3`). Built on click (the library under typer), because the options are
generated from the models rather than written out.

Commands that need no flow run (search, rollback, prune, unlock) start no Prefect server. The
options come from `flows.params`, which imports neither Prefect nor torch nor Chroma; each
command imports what it runs only when it runs, so `--help` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import BaseModel, ValidationError

_SCALARS = {str: click.STRING, int: click.INT, float: click.FLOAT, bool: click.BOOL}


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


def parse_settings(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, lists, true). A
    dotted key reaches into a section: `finetune.epochs=3` is `{"finetune": {"epochs": 3}}`."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        target = settings
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise click.UsageError(f"--set {key}: {part!r} is a value, not a section")
        target[leaf] = value
    return settings


# --- options from parameter models ------------------------------------------------------------


def backend_models(annotation: Any) -> dict[str, type[BaseModel]]:
    """The settings models of a field that chooses a backend (a union discriminated by
    `backend`), by backend name; empty for any other field."""
    found: dict[str, type[BaseModel]] = {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        backend = annotation.model_fields.get("backend")
        if backend is not None and typing.get_origin(backend.annotation) is Literal:
            found[typing.get_args(backend.annotation)[0]] = annotation
        return found
    for arg in typing.get_args(annotation):
        found |= backend_models(arg)
    return found


def _option_type(annotation: Any) -> tuple[click.ParamType | None, bool]:
    """(click type, several values?) for a field's annotation; None for what only `--set`
    takes (sections, dicts). A backend field takes the backend's name."""
    backends = backend_models(annotation)
    if backends:
        return click.Choice(list(backends)), False
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)
        return (_SCALARS.get(inner[0]) if inner else None), True
    return _SCALARS.get(annotation), False


def model_options(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[click.Option]:
    """A `--field-name` option per scalar field, its help the field's description. No option
    has a default of its own: what is not given stays unset, so a profile can fill it."""
    options = []
    for name, field in model.model_fields.items():
        kind, multiple = _option_type(field.annotation)
        if name in skip or kind is None:
            continue
        flag = f"-{name}" if len(name) == 1 else f"--{name.replace('_', '-')}"
        default = field.get_default(call_default_factory=True)
        default = getattr(default, "backend", default)
        shown = "" if default in (None, "", [], {}) else f" [default: {default}]"
        if kind is click.BOOL and not multiple:
            decls = [f"{flag}/--no-{name.replace('_', '-')}"]
        else:
            decls = [flag]
        options.append(
            click.Option(
                [*decls, name],
                type=None if kind is click.BOOL else kind,
                multiple=multiple,
                default=None,
                show_default=False,
                help=(field.description or "") + shown,
            )
        )
    return options


def settings_help(model: type[BaseModel]) -> str | None:
    """The fields inside `model`'s sections and backends, for the help of commands that take
    them: each section's fields, and each backend's own under the field that chooses it."""
    blocks = [
        block
        for name, field in model.model_fields.items()
        for block in _nested_help(name, field.annotation, field.description or "")
    ]
    if not blocks:
        return None
    heading = "Settings inside sections and backends, set with --set KEY=VALUE:"
    return "\n\n".join([heading, *blocks])


def _nested_help(prefix: str, annotation: Any, description: str) -> list[str]:
    backends = backend_models(annotation)
    if backends:
        return [
            "\n".join(
                [f"\b\n{prefix}.backend={backend}  {(cls.__doc__ or '').splitlines()[0]}"]
                + [
                    f"  {prefix}.{key}: {sub.description}"
                    for key, sub in cls.model_fields.items()
                    if key != "backend"
                ]
            )
            for backend, cls in backends.items()
        ]
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return []
    lines = [f"\b\n{prefix}.*  {description}"]
    nested: list[str] = []
    for key, sub in annotation.model_fields.items():
        lines.append(f"  {prefix}.{key}: {sub.description}")
        nested += _nested_help(f"{prefix}.{key}", sub.annotation, sub.description or "")
    return ["\n".join(lines), *nested]


def build_params(model: type[BaseModel], given: dict[str, Any], pairs: tuple[str, ...]) -> Any:
    """The model from the options given and the `--set` pairs; a bad or unknown setting is a
    usage error that names it."""
    values = {key: value for key, value in given.items() if value not in (None, ())}
    values = {key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}
    for key in list(values):
        if backend_models(model.model_fields[key].annotation):
            values[key] = {"backend": values[key]}
    try:
        return model(**_merged(values, parse_settings(pairs)))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or model.__name__}: {e['msg']}" for e in exc.errors()
        )
        raise click.UsageError(problems) from None


def _merged(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """`base` with `more` laid over it, sections merged key by key: `--generator api` and
    `--set generator.model=m` together are one generator."""
    out = dict(base)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


SET_OPTION = click.Option(
    ["--set", "pairs"],
    multiple=True,
    metavar="KEY=VALUE",
    help="Any field, JSON values; a dotted key sets a field of a section (finetune.epochs=3).",
)


def model_command(
    name: str,
    model: type[BaseModel],
    action: Callable[[Any], Any],
    help: str,
    arguments: tuple[str, ...] = (),
) -> click.Command:
    """A command whose options are `model`'s fields (`arguments` positional), plus `--set`."""
    params: list[click.Parameter] = []
    for argument in arguments:
        multiple = _option_type(model.model_fields[argument].annotation)[1]
        params.append(click.Argument([argument], nargs=-1 if multiple else 1, required=False))

    def callback(pairs: tuple[str, ...], **given: Any) -> None:
        _configure_environment()
        action(build_params(model, given, pairs))

    return click.Command(
        name,
        callback=callback,
        params=[*params, *model_options(model, skip=arguments), SET_OPTION],
        help=help,
        epilog=settings_help(model),
    )


# --- what the commands do ---------------------------------------------------------------------


def _print_json(result: BaseModel) -> None:
    click.echo(result.model_dump_json(indent=2))


def run_pipeline(params: Any) -> Any:
    from flows.pipeline import pipeline

    return pipeline(params)


def print_waiting(holder: Any) -> None:
    who = holder.describe() if holder else "another process"
    click.echo(f"waiting for the publish lock: held by {who}")


def print_search(params: Any) -> list[dict[str, Any]]:
    """Run the search flow's body here (no flow run for a one-off query); it prints the hits."""
    from flows.search import search as search_flow

    return search_flow.fn(params)


def serve_search(params: Any) -> None:
    """Answer searches over HTTP until interrupted (tasks.serving.service)."""
    import uvicorn

    from tasks.serving.retriever import Retriever
    from tasks.serving.service import create_app

    retriever = Retriever.open(
        params.alias,
        **params.store_settings(),
        log_queries=params.log_queries,
        recheck_seconds=params.recheck_seconds,
    )
    from tasks.store.chroma import AliasNotFound

    try:
        # Load the model now, so the first search does not pay for it.
        click.echo(f"serving {retriever.live().name}")
    except AliasNotFound as exc:
        click.echo(f"{exc}; searches get 503 until a publish")
    token = params.token()
    app = create_app(retriever, token=token, max_batch=params.max_batch)
    click.echo(
        f"searching alias {params.alias!r} at http://{params.host}:{params.port}/search "
        f"(OpenAPI: /docs); bearer token "
        + (f"required (from ${params.token_env})" if token else "not required")
        + f"; query log: {retriever.querylog.path if retriever.querylog else 'off'}"
    )
    uvicorn.run(app, host=params.host, port=params.port, log_level="info")


def rollback(params: Any) -> None:
    from tasks.store.chroma import rollback as roll_back

    live = roll_back(params.open_store(), params.alias, on_wait=print_waiting)
    click.echo(f"{params.alias} -> {live}")


def prune(params: Any) -> None:
    from tasks.store.chroma import remove_unaliased

    removed = remove_unaliased(params.open_store(), on_wait=print_waiting)
    click.echo(f"removed {len(removed)} unaliased version(s)")
    for name in removed:
        click.echo(f"  {name}")


def unlock(params: Any) -> None:
    from tasks.store.locks import break_lock

    holder = break_lock(params.open_store())
    click.echo(
        f"cleared the publish lease of {holder.describe()}"
        if holder
        else "no lease to clear (an embedded store's lock ends with its process)"
    )


def demo(workspace: str) -> None:
    from flows.demo import print_demo_summary
    from flows.params import PipelineParams

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _configure_environment()
    params = PipelineParams(workspace=workspace, profile="demo")
    result = run_pipeline(params)
    print_demo_summary(result, workspace, params.resolved().label)


def build_cli() -> click.Group:
    from flows.params import (
        AliasParams,
        EvaluateParams,
        FinetuneParams,
        IngestParams,
        LabelParams,
        LearnParams,
        PipelineParams,
        PublishParams,
        QuestionParams,
        SearchParams,
        SearchServiceParams,
        StoreParams,
    )

    cli = click.Group("ragtune", help=__doc__.split("\n\n")[0])
    click.version_option(package_name="ragtune", prog_name="ragtune")(cli)
    cli.add_command(
        click.Command(
            "demo",
            callback=demo,
            params=[click.Option(["--workspace"], default="workspace", show_default=True)],
            help="Run the offline demo pipeline on data/sources and show what it did.",
        )
    )
    cli.add_command(
        model_command(
            "run",
            PipelineParams,
            lambda p: _print_json(run_pipeline(p)),
            "Run the whole pipeline on SOURCES (folders or files).",
            arguments=("sources",),
        )
    )
    stages = {
        "ingest": (IngestParams, ("sources",)),
        "questions": (QuestionParams, ()),
        "label": (LabelParams, ()),
        "learn": (LearnParams, ()),
        "finetune": (FinetuneParams, ()),
        "evaluate": (EvaluateParams, ()),
        "publish": (PublishParams, ()),
    }
    for name, (model, arguments) in stages.items():
        cli.add_command(
            model_command(
                name,
                model,
                lambda p, name=name: _print_json(_stage_flow(name)(p)),
                f"Run the {name} stage alone.",
                arguments=arguments,
            )
        )
    cli.add_command(
        model_command(
            "search", SearchParams, print_search, "Query the published collection.", ("query",)
        )
    )
    cli.add_command(
        model_command(
            "serve-search",
            SearchServiceParams,
            serve_search,
            "Serve searches over HTTP (POST /search, GET /health), logging each query.",
        )
    )
    cli.add_command(
        model_command(
            "rollback", AliasParams, rollback, "Point the alias back at the previous version."
        )
    )
    cli.add_command(
        model_command(
            "prune", StoreParams, prune, "Remove versions no alias uses (left by a killed publish)."
        )
    )
    cli.add_command(
        model_command(
            "unlock", StoreParams, unlock, "Clear a Chroma server's publish lease (holder dead)."
        )
    )
    cli.add_command(
        click.Command(
            "serve",
            callback=_serve,
            help="Serve every deployment in prefect.yaml from this process (no work pool).",
        )
    )
    return cli


def _stage_flow(name: str) -> Callable[[Any], Any]:
    import importlib

    return getattr(importlib.import_module(f"flows.{name}"), name)


def _serve() -> None:
    from flows.serve import main as serve

    _configure_environment()
    serve()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a usage error, as click does)."""
    try:
        build_cli().main(args=argv, prog_name="ragtune", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
