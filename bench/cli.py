"""How long the command line takes to answer `--help`, against Python starting and doing nothing.

Each command runs as a fresh process, the way a user types it, `--repeat` times; the table gives
the median and the fastest. `--compare REV` also times the same commands on an older commit
(checked out into a temporary worktree and run with `python -m flows.cli` from there), in the
same run, so the two are measured on the same machine under the same load.

    .venv/bin/python bench/cli.py --repeat 7 --compare 894627b
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import preamble

COMMANDS = (["--help"], ["run", "--help"], ["questions", "--help"], ["--version"])


def seconds(argv: list[str], cwd: Path, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def row(what: str, times: list[float]) -> str:
    return f"| {what} | {statistics.median(times):.2f} | {min(times):.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--compare", metavar="REV", help="also time this older commit")
    args = parser.parse_args()

    print(f"machine: {preamble.machine()}")
    print(f"command: {preamble.command()}\n")
    print("| command | median s | fastest s |\n|---|---|---|")
    print(
        row("python -c pass", seconds([sys.executable, "-c", "pass"], preamble.ROOT, args.repeat))
    )
    for command in COMMANDS:
        argv = [sys.executable, "-m", "flows.cli", *command]
        print(row(f"ragtune {' '.join(command)}", seconds(argv, preamble.ROOT, args.repeat)))
    if args.compare:
        with tempfile.TemporaryDirectory() as folder:
            old = Path(folder) / "old"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(old), args.compare],
                cwd=preamble.ROOT,
                check=True,
                capture_output=True,
            )
            try:
                for command in COMMANDS[:-1]:
                    argv = [sys.executable, "-m", "flows.cli", *command]
                    times = seconds(argv, old, args.repeat)
                    print(row(f"{args.compare}: ragtune {' '.join(command)}", times))
            finally:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(old)],
                    cwd=preamble.ROOT,
                    check=True,
                    capture_output=True,
                )


if __name__ == "__main__":
    main()
