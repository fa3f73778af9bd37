"""Where a stage's heavy steps run: in the flow's own process, or on a Dask cluster.

Question generation and embedding split into independent batches, so `task_runner="dask"` sends
each batch to a worker of a Dask cluster as a Prefect task (prefect-dask's `DaskTaskRunner`):
a temporary local cluster of `dask_workers` processes, or an existing scheduler at
`dask_address` (a cluster on Kubernetes, one from dask-gateway). Workers rebuild the generator or
the model by name, so only names, settings, texts and results cross the wire; results come back
to the flow's process, which alone writes the question cache and the Chroma store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner


def fan_out(runner: DaskTaskRunner, task: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Submit `task` once per parameter dict to the Dask cluster as a Prefect task run; the
    futures come back in the order of `calls`. How both generation batches and embedding shards
    go to the workers."""
    return [runner.submit(task, parameters) for parameters in calls]


def worker_slots(runner: DaskTaskRunner) -> int:
    """Threads across the cluster's workers: how many tasks run at once."""
    return max(1, sum(runner.client.nthreads().values()))


def started_on_first_use(
    stack: contextlib.ExitStack, runner: DaskTaskRunner
) -> Callable[[], DaskTaskRunner]:
    """A function that starts `runner` in `stack` the first time it is called, then returns it.

    A run with nothing to fan out (an unchanged corpus) then never starts a cluster.
    """
    started: list[DaskTaskRunner] = []

    def get() -> DaskTaskRunner:
        if not started:
            started.append(stack.enter_context(runner))
        return started[0]

    return get


def dask_runner(address: str | None = None, workers: int = 2) -> DaskTaskRunner:
    """A `DaskTaskRunner` on the scheduler at `address`, else on a temporary local cluster of
    `workers` single-threaded processes (torch parallelises inside each; a process per worker
    keeps the GIL and the models apart)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError(
            "task_runner='dask' needs prefect-dask: pip install prefect-dask"
        ) from exc
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
    )
