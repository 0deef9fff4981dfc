"""The local state file: which instance this node is, and what it restored and backed up.

A state file written under another instance id was baked into the image by mistake, so the
node is treated as new.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from dtrguard.errors import DtrguardError

FILE_NAME = "state.json"


@dataclass
class LastBackup:
    """The outcome of the most recent backup attempt."""

    result: str  # "ok", "failed" or "aborted" (stopped by SIGTERM)
    at: str
    set_id: str | None = None
    size: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Leftovers:
    """The objects a failed backup could not remove from S3, because S3 did not respond.

    The next backup removes these before it starts. Without this record, pruning would find
    them only once they are older than retention.orphan_grace. A run killed outright (SIGKILL,
    power loss) records nothing, so pruning removes its objects after that grace.
    """

    # [key, upload id] of multipart uploads to abort: written by earlier builds, which uploaded
    # artifacts in multipart uploads, and still read and aborted.
    uploads: list[list[str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # artifacts of sets that never got a manifest

    def __len__(self) -> int:
        return len(self.uploads) + len(self.keys)

    def add(self, other: Leftovers) -> None:
        self.uploads += [u for u in other.uploads if u not in self.uploads]
        self.keys += [k for k in other.keys if k not in self.keys]


@dataclass
class State:
    """Record of this node's identity, restores and backups, kept in <state_dir>/state.json."""

    instance_id: str
    established: bool = False  # restored, or backed up its own data: scheduled backups may run
    restored_set: str | None = None
    restoring_set: str | None = None  # a restore that started and has not finished
    last_backup: LastBackup | None = None
    last_good_backup: LastBackup | None = None
    last_error: str | None = None
    next_run: str | None = None
    leftovers: Leftovers = field(default_factory=Leftovers)
    extra: dict[str, Any] = field(default_factory=dict)  # unused; kept so older state files still load


def load(state_dir: Path) -> State | None:
    """Read the state file, or return None when there is none."""
    path = state_dir / FILE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DtrguardError(
            f"state file {path} is unreadable: {exc}",
            hint="move it aside; dtrguard then treats the node as new and restores only if it is empty",
        ) from None
    try:
        for key in ("last_backup", "last_good_backup"):
            if data.get(key):
                data[key] = LastBackup(**data[key])
        if "leftovers" in data:
            data["leftovers"] = Leftovers(**data["leftovers"])
        return State(**data)
    except TypeError as exc:
        raise DtrguardError(f"state file {path} has unexpected fields: {exc}", hint="move it aside") from None


def save(state_dir: Path, state: State) -> None:
    """Write the state file atomically (write, fsync, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / FILE_NAME
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(asdict(state), handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# The service holds SERVICE_LOCK while it runs. Every backup, restore and prune, the service's
# or a one-shot command's, holds ACTION_LOCK, so two of them never overlap.
SERVICE_LOCK = "service.lock"
ACTION_LOCK = "action.lock"


@contextlib.contextmanager
def locked(state_dir: Path, name: str, wait: bool) -> Iterator[None]:
    """Hold one of the node's locks. With wait, block until it is free; otherwise raise naming the holder."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(state_dir / name, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(handle)
            if not wait:
                raise DtrguardError(
                    f"another dtrguard process (pid {holder or 'unknown'}) holds {state_dir / name}",
                    hint="stop the service first (systemctl stop dtrguard), run this command, then start it again",
                ) from None
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def lock_holder(state_dir: Path, name: str = SERVICE_LOCK) -> int | None:
    """Return the pid of the process holding a lock (-1 if unknown), or None when the lock is free."""
    try:
        handle = open(state_dir / name)  # noqa: SIM115 - closed below in every branch
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(handle) or -1
        return None


def _read_pid(handle: IO[str]) -> int | None:
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else None
