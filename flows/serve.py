"""Serve every deployment in prefect.yaml from one process: scheduled runs and dashboard runs on
a single box, with no work pool or worker to manage.

prefect.yaml stays the one place deployments are defined; this reads it, so `prefect deploy
--all` (with a worker) and `ragtune serve` (without) always offer the same deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployments(path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml, as `serve` wants them."""
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    root = path.parent
    built = []
    for entry in spec["deployments"]:
        file, _, name = entry["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(f"{root / file}:{name}")
        schedules = [
            Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in entry.get("schedules") or []
        ]
        built.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=entry.get("concurrency_limit"),
            )
        )
    return built


def main() -> None:
    serve(*deployments(), pause_on_shutdown=False)


if __name__ == "__main__":
    main()
