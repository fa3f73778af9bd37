"""One publisher per Chroma store at a time, and a lock that never outlives its holder.

Two publishers must not race on an alias, and an embedded Chroma store is not safe with two
writers. A lock that a crashed publisher keeps would stop every later publish (a scheduled
refresh, a weekly retrain) without a word, so both kinds of lock here end with their holder:

- an embedded store takes an operating-system file lock (`flock`) on a file in the store's
  folder: the kernel releases it when the holding process dies, however it dies;
- a Chroma server is shared by processes on several machines, so the lock is a *lease*, a
  record in the server itself (collection `ragtune__leases`) with an expiry that a live holder
  renews from a background thread. A dead holder stops renewing and its lease runs out.

Prefect's global concurrency limits are not used for this: in Prefect 3.8 a slot's lease lives in
the API server's memory, so with an ephemeral API (one per `ragtune` command) a killed publisher's
slot is never given back and every later publish waits forever.

A publisher that has to wait is told at once who holds the lock and since when (`on_wait`), and
gives up after `timeout` seconds with a message that says how to clear the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chromadb.api import ClientAPI

LOCK_FILE = "ragtune-publish.lock"
LEASES = "ragtune__leases"
LEASE_ID = "publish"
#: How often a waiting publisher looks again.
POLL_SECONDS = 0.5
#: A lease's lifetime; its holder renews it three times per lifetime.
LEASE_SECONDS = 60.0
#: Chroma needs a vector per record; the lease record has no use for one.
_LEASE_VECTOR = [1.0]


class LockTimeout(TimeoutError):
    """Another publisher held the lock for longer than this one would wait."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) the lock: enough for a person to find the process."""

    pid: int
    host: str
    since: str
    what: str

    @classmethod
    def me(cls, what: str) -> Holder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            what=what,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since} ({self.what})"


OnWait = Callable[[Holder | None], None]


@dataclass
class Held:
    """The lock, while held. `check()` raises if it was lost (a lease that expired because its
    renewals stopped), so the holder never swaps an alias it no longer owns."""

    holder: Holder
    lost: threading.Event

    def check(self) -> None:
        if self.lost.is_set():
            raise LockTimeout(
                f"the publish lease of {self.holder.describe()} expired before the publish "
                f"finished (its renewals stopped); not swapping the alias: re-run publish"
            )


@contextlib.contextmanager
def publish_lock(
    client: ClientAPI,
    timeout: float | None = 3600.0,
    on_wait: OnWait | None = None,
    what: str = "publish",
    lease_seconds: float = LEASE_SECONDS,
) -> Iterator[Held]:
    """Hold the store's one publisher slot for the `with` block (a file lock when the store is
    embedded, a lease on a server). Waits at most `timeout` seconds (None: no limit), calling
    `on_wait` once with the holder when it has to wait."""
    settings = client.get_settings()
    me = Holder.me(what)
    if settings.is_persistent and settings.persist_directory:
        lock = _file_lock(Path(settings.persist_directory) / LOCK_FILE, me, timeout, on_wait)
    else:
        lock = _lease(client, me, timeout, on_wait, lease_seconds)
    with lock as held:
        yield held


def _deadline(timeout: float | None) -> float:
    return float("inf") if timeout is None else time.monotonic() + timeout


@contextlib.contextmanager
def _file_lock(
    path: Path, me: Holder, timeout: float | None, on_wait: OnWait | None
) -> Iterator[Held]:
    deadline, told = _deadline(timeout), False
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = file_holder(path)
                if not told and on_wait is not None:
                    on_wait(holder)
                told = True
                if time.monotonic() > deadline:
                    who = holder.describe() if holder else "another process"
                    pid = f"`kill {holder.pid}`" if holder else "stopping it"
                    raise LockTimeout(
                        f"gave up after {timeout:.0f} s waiting for the publish lock on {path}, "
                        f"held by {who}. The lock ends with that process: wait for it, or stop it "
                        f"({pid}); nothing else needs clearing."
                    ) from None
                time.sleep(POLL_SECONDS)
        # "a+" appends, so the file must be empty before the holder is written.
        handle.truncate(0)
        handle.write(json.dumps(asdict(me)))
        handle.flush()
        try:
            yield Held(me, threading.Event())
        finally:
            handle.truncate(0)
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_holder(path: Path) -> Holder | None:
    """Who holds the file lock, as its holder wrote it (None if free or not yet written)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def _lease(
    client: ClientAPI,
    me: Holder,
    timeout: float | None,
    on_wait: OnWait | None,
    seconds: float,
) -> Iterator[Held]:
    leases = client.get_or_create_collection(LEASES, embedding_function=None)
    token = uuid.uuid4().hex
    deadline, told = _deadline(timeout), False
    while True:
        current = _read_lease(leases)
        if current is None or float(current["expires"]) < time.time():
            if current is not None:
                # Only the expired record goes: one another waiter has just taken is kept.
                leases.delete(ids=[LEASE_ID], where={"token": str(current["token"])})
            # `add` never overwrites an existing id, so of two publishers adding at once
            # exactly one record survives, and the read-back says whose it is.
            leases.add(
                ids=[LEASE_ID],
                embeddings=[_LEASE_VECTOR],
                metadatas=[_lease_record(me, token, seconds)],
            )
            mine = _read_lease(leases)
            if mine is not None and mine["token"] == token:
                break
            continue
        holder = _holder_of(current)
        if not told and on_wait is not None:
            on_wait(holder)
        told = True
        if time.monotonic() > deadline:
            expires = datetime.fromtimestamp(float(current["expires"]), UTC)
            raise LockTimeout(
                f"gave up after {timeout:.0f} s waiting for the publish lease on the Chroma "
                f"server, held by {holder.describe()}; it expires at "
                f"{expires.isoformat(timespec='seconds')} unless that publisher renews it. If it "
                f"is dead, wait for the expiry or clear it now with `ragtune unlock` (with the "
                f"same chroma_host and chroma_port settings)."
            )
        time.sleep(POLL_SECONDS)

    lost, stop = threading.Event(), threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            current = _read_lease(leases)
            if current is None or current["token"] != token:
                lost.set()
                return
            leases.update(ids=[LEASE_ID], metadatas=[_lease_record(me, token, seconds)])

    renewer = threading.Thread(target=renew, name="ragtune-lease", daemon=True)
    renewer.start()
    try:
        yield Held(me, lost)
    finally:
        stop.set()
        renewer.join()
        leases.delete(ids=[LEASE_ID], where={"token": token})


def _lease_record(me: Holder, token: str, seconds: float) -> dict[str, str | int | float]:
    return {**asdict(me), "token": token, "expires": time.time() + seconds}


def _read_lease(leases) -> dict | None:
    got = leases.get(ids=[LEASE_ID], include=["metadatas"])
    return dict(got["metadatas"][0]) if got["ids"] else None


def _holder_of(record: dict) -> Holder:
    return Holder(
        pid=int(record["pid"]),
        host=str(record["host"]),
        since=str(record["since"]),
        what=str(record["what"]),
    )


def break_lock(client: ClientAPI) -> Holder | None:
    """Clear a server's publish lease, whoever holds it; returns the holder it cleared.

    For a lease whose holder is known to be dead. An embedded store's file lock needs no
    clearing: it ends with its process.
    """
    settings = client.get_settings()
    if settings.is_persistent and settings.persist_directory:
        return None
    if LEASES not in {c.name for c in client.list_collections()}:
        return None
    leases = client.get_collection(LEASES, embedding_function=None)
    current = _read_lease(leases)
    if current is None:
        return None
    leases.delete(ids=[LEASE_ID], where={"token": str(current["token"])})
    return _holder_of(current)
