"""Files the stages read and write: JSON lines and content hashes, one way each.

JSON-lines files are appended to by one write per call, so two processes appending at once
never interleave within a line, and a line a crash cut short is skipped by lenient readers and
closed off by the next append. Content hashes stream a file, so a gigabyte of weights never
sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BadLine:
    """A line of a JSON-lines file that is not JSON, with the parser's reason."""

    reason: str


def read_jsonl(
    path: Path, *, encoding: str = "utf-8", strict: bool = True
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of `path`. A line that is not JSON raises a
    `ValueError` naming the file and the line; with `strict=False` it comes as a `BadLine`
    instead, so a reader can skip it and go on."""
    with Path(path).open(encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                if strict:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
                yield number, BadLine(exc.msg)


def append_jsonl(path: Path, rows: Iterable[Any], *, mode: int = 0o644, sync: bool = False) -> None:
    """Append `rows` to `path` as JSON lines, in one write. `mode` is the new file's
    permissions (0o600 for what only its owner may read); `sync` waits until it is on disk."""
    blob = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if not blob:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, mode)
    try:
        size = os.fstat(fd).st_size
        # A crash mid-line leaves no newline; start a fresh line so this write stays whole.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            blob = b"\n" + blob
        os.write(fd, blob)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def hash_file_into(digest: Any, path: Path) -> None:
    """Stream the bytes of `path` into a hashlib `digest`, a megabyte at a time."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()
