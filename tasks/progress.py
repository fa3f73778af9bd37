"""How long work reports its progress: a callback told (done, total) each time it advances.

Tasks take one so they stay free of Prefect; a flow passes one that updates a progress
artifact on the dashboard (`flows.artifacts.progress_artifact`), the terminal gets tqdm.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
