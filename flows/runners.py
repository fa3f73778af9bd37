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
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from flows.params import Params

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

TaskRunnerName = Literal["threads", "dask"]


#: The fields that say where work runs, not what it produces.
RUNNER_FIELDS = ("task_runner", "dask_address", "dask_workers")


class RunnerParams(Params):
    """Parameters of a stage that can fan its work out to Dask.

    `workspace` is declared here too, so that it stays the first field of every stage's form
    (pydantic orders inherited fields first).
    """

    workspace: str = Field("workspace", description="Folder where every stage reads and writes.")
    task_runner: TaskRunnerName = Field(
        "threads",
        description="threads: generate and embed in the flow's own process. dask: one Prefect "
        "task per batch on a Dask cluster (prefect-dask).",
    )
    dask_address: str | None = Field(
        None,
        description="Scheduler of a running Dask cluster, e.g. tcp://dask-scheduler:8786 "
        "(Kubernetes, dask-gateway); blank: a temporary local cluster.",
    )
    dask_workers: int = Field(
        2, ge=1, description="Worker processes of the temporary local cluster."
    )

    def runner_settings(self) -> dict[str, Any]:
        """Just the runner fields, to hand on to another flow's parameters."""
        return self.model_dump(include=set(RUNNER_FIELDS))

    def dask_runner(self) -> DaskTaskRunner | None:
        """The Dask task runner these parameters ask for, or None to work in-process."""
        if self.task_runner != "dask":
            return None
        return dask_runner(self.dask_address, self.dask_workers)


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
