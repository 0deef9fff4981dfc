"""Restore one backup set onto this node, in the order DTR needs.

1. Check the set's Postgres major against the server, starting DTR's Postgres container if it
   exists and is stopped.
2. Check the set's contents without changing anything live, while DTR keeps running: extract
   each directory archive into staging, and at the same time either restore each database into
   a new database beside the live one (when DTR's Postgres container exists), or download and
   verify the dumps (when DTR is not installed yet).
3. Stop DTR's containers except Postgres and swap each staged directory in.
4. Install DTR if its containers do not exist yet, and stop all but Postgres again.
5. Wait for Postgres, check its major, apply the roles, then rename the restored databases into
   place in one transaction, or, without them, restore each database in place.
6. Start DTR's containers in order and wait until they run.

A failure before step 3 changes nothing live: staging and the new databases are removed and
DTR's containers started again.
"""

from __future__ import annotations

import errno
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dtrguard import log
from dtrguard.archive import SwapJournal, excluded_paths, extract_archive, root_attributes
from dtrguard.cancel import ChildEvent, wait_waking
from dtrguard.config import DirectorySettings
from dtrguard.errors import Aborted, DtrguardError, IntegrityError, RefusedError
from dtrguard.manifest import Artifact, Manifest, major_key
from dtrguard.node import Node

_log = log.get("restore")


class Progress:
    """Bytes of a set downloaded so far, for the status line systemd shows."""

    def __init__(self, manifest: Manifest):
        self.set_id = manifest.set_id
        self.dumps = sum(a.size for a in manifest.artifacts if a.kind in ("globals", "database"))
        # A restore in place downloads the dumps twice: once to verify them, once to restore them.
        self.total = manifest.total_size() + self.dumps
        self.done = 0
        self.phase = "directories"

    def dumps_once(self) -> None:
        """Count each dump once: a restore beside the live databases verifies while it restores."""
        self.total -= self.dumps
        self.dumps = 0

    def add(self, count: int) -> None:
        self.done += count

    def line(self) -> str:
        percent = 100 * self.done // self.total if self.total else 100
        return f"restoring set {self.set_id}: {percent} % of {human_size(self.total)} ({self.phase})"


def human_size(count: float) -> str:
    """Format a byte count as 1.2 GB, 340 MB, 12 kB or 512 B (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def restore_set(node: Node, manifest: Manifest, cancel: threading.Event, progress: Progress | None = None) -> None:
    """Restore every artifact of manifest and start DTR.

    Every check that can fail on the set's contents runs before the first live change: the
    database dumps are downloaded and verified, and the directories are extracted into staging.
    A set that fails a check therefore changes nothing, and DTR's containers are started again.
    """
    progress = progress or Progress(manifest)
    set_id = manifest.set_id
    clock = time.monotonic()
    _log.info("restore.start", set_id=set_id, bytes=manifest.total_size(), instance_id=manifest.instance_id)
    check_free_space(node, manifest)
    # With DTR's Postgres container present, the databases are restored beside the live ones while
    # the directories are staged. Without it (DTR not installed yet) they wait for the install.
    if not node.dtr.containers():
        node.dtr.check_install(manifest.dtr_version)  # an install that cannot run fails before any change
    beside = node.dtr.postgres() is not None
    if beside:
        progress.dumps_once()
        node.dtr.start_postgres()
        node.postgres.wait_ready()
        check_postgres_version(node, manifest)

    # A swap that an earlier run left unfinished changes live files, so it runs with DTR stopped.
    # Otherwise DTR keeps running while the set is checked and staged, and stops only for the swap.
    stopped = any(_pending_swap(directory.path) is not None for directory in node.settings.directories)
    if stopped:
        node.dtr.stop_all_but_postgres()
    try:
        staged, roles = _check_and_stage(node, manifest, cancel, progress, beside)
    except BaseException:
        for directory in node.settings.directories:
            SwapJournal(directory.path).discard()
        if beside:
            _drop_side_databases(node)
        if stopped:
            _restart_after_failure(node)
        raise
    if not stopped:
        node.dtr.stop_all_but_postgres()
    for directory, staging in zip(node.settings.directories, staged, strict=True):
        swap_directory(node, manifest, directory, staging)

    if not node.dtr.containers():
        progress.phase = "installing DTR"
        node.dtr.install(manifest.dtr_version)
        node.dtr.stop_all_but_postgres()
    node.dtr.start_postgres()
    node.postgres.wait_ready()
    check_postgres_version(node, manifest)
    _checkpoint(cancel, set_id)
    progress.phase = "database"
    if roles is not None:
        node.postgres.apply_globals(roles)
        databases = [a.source for a in manifest.artifacts if a.kind == "database"]
        not_dropped = node.postgres.swap_in(databases)
        _log.info("database.swapped", set_id=set_id, databases=databases)
        for old, error in not_dropped.items():
            _log.warning(
                "database.old_not_dropped",
                set_id=set_id,
                database=old,
                error=error,
                detail="the restored databases are in place, and this one contains the data they replaced",
                hint=f"the next restore drops it, or drop it by hand: drop database {old}",
            )
    else:
        restore_database(node, manifest, progress)

    progress.phase = "starting DTR"
    node.dtr.start_all()
    _log.info("restore.end", set_id=set_id, bytes=manifest.total_size(), seconds=round(time.monotonic() - clock, 2))


def _pending_swap(path: Path) -> str | None:
    """Return the set id of a swap that an earlier run left unfinished in path, or None."""
    journal = SwapJournal(path).read()
    if journal is None or journal.get("phase") == "extracting":
        return None
    return str(journal.get("set_id"))


def _check_and_stage(
    node: Node, manifest: Manifest, cancel: threading.Event, progress: Progress, beside: bool
) -> tuple[list[Staged], bytes | None]:
    """Check the databases in one thread while the directories are staged in this one.

    With beside, the databases are restored next to the live ones, which checks the dumps as
    they are read, and the roles dump is returned. Otherwise the dumps are downloaded and
    verified, and None is returned for the roles. The first failure stops the other side at its next chunk,
    and is the one raised.
    """
    data_key = node.repository.data_key(manifest)  # an encrypted set's key is unwrapped before any change
    stop = ChildEvent(cancel)  # also set by the first worker that fails, to stop the other

    def on_bytes(count: int) -> None:
        progress.add(count)
        if stop.is_set():
            raise Aborted(f"restore of set {manifest.set_id} stopped")

    def verify_dumps() -> bytes | None:
        for artifact in manifest.artifacts:
            if artifact.kind in ("globals", "database"):
                node.repository.verify(artifact, stop, on_bytes, data_key)
        return None

    def restore_beside() -> bytes | None:
        dropped = node.postgres.drop_side_databases()
        if dropped:
            _log.warning("database.leftover_dropped", databases=dropped)
        with node.repository.open(_artifact(manifest, "globals", ""), on_bytes, data_key) as stream:
            roles = stream.read()
        node.postgres.apply_globals(roles, create_only=True)
        clock = time.monotonic()
        _log.info("database.start", set_id=manifest.set_id, beside=True)
        for artifact in manifest.artifacts:
            if artifact.kind == "database":
                owner = artifact.owner or node.settings.postgres.user
                with node.repository.open(artifact, on_bytes, data_key) as stream:
                    side = node.postgres.restore_beside(artifact.source, owner, stream)
                _log.info("database.restored", set_id=manifest.set_id, database=artifact.source, into=side,
                          bytes=artifact.size)  # fmt: skip
        _log.info("database.end", set_id=manifest.set_id, seconds=round(time.monotonic() - clock, 2))
        return roles

    def databases() -> bytes | None:
        try:
            return restore_beside() if beside else verify_dumps()
        except BaseException:
            stop.set()
            raise

    progress.phase = "restoring the databases and staging the directories" if beside else (
        "checking the dumps and staging the directories")  # fmt: skip
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="database") as pool:
        checked = pool.submit(databases)
        staged: list[Staged] = []
        staging_error: BaseException | None = None
        try:
            for directory in node.settings.directories:
                _checkpoint(cancel, manifest.set_id)
                staged.append(stage_directory(node, manifest, directory, on_bytes))
        except BaseException as exc:
            stop.set()
            staging_error = exc
        wait_waking(checked)
        database_error = checked.exception()
    errors = [e for e in (staging_error, database_error) if e is not None]
    if errors:  # the worker that failed first is the one whose error is not Aborted
        raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
    return staged, checked.result()


def _drop_side_databases(node: Node) -> None:
    """Remove what a failed restore put beside the live databases; the live ones were never touched."""
    try:
        node.postgres.drop_side_databases()
    except DtrguardError as exc:
        _log.error("database.cleanup_failed", error=str(exc))


def _restart_after_failure(node: Node) -> None:
    """Start DTR's containers again after a restore failed before changing anything live."""
    try:
        if node.dtr.containers():
            node.dtr.start_all()
    except DtrguardError as exc:
        _log.error("restore.restart_failed", error=str(exc))


def _checkpoint(cancel: threading.Event, set_id: str) -> None:
    if cancel.is_set():
        raise Aborted(f"restore of set {set_id} stopped on request; starting dtrguard again resumes it")


def _artifact(manifest: Manifest, kind: str, source: str) -> Artifact:
    for artifact in manifest.artifacts:
        if artifact.kind == kind and artifact.source == source:
            return artifact
    raise IntegrityError(
        f"set {manifest.set_id} has no {kind} artifact for {source or 'the roles'}",
        hint="restore a set taken with the same [[directories]] config, or fix the config",
    )


def check_free_space(node: Node, manifest: Manifest) -> None:
    """Reject, before any change, a restore whose directories cannot be staged beside the old contents.

    Staging keeps the new contents while the old ones stay, so each file system needs about the
    archives' size free. A directory whose swap of this same set is already under way needs none.
    """
    needed: dict[int, tuple[int, list[str], Path]] = {}  # per file system: bytes, directories, a path on it
    for directory in node.settings.directories:
        if _pending_swap(directory.path) == manifest.set_id:
            continue
        probe = _existing_ancestor(directory.path)
        device = probe.stat().st_dev
        size, paths, _ = needed.get(device, (0, [], probe))
        raw_size = _artifact(manifest, "directory", str(directory.path)).raw_size
        needed[device] = (size + raw_size, [*paths, str(directory.path)], probe)
    for size, paths, probe in needed.values():
        usage = shutil.disk_usage(probe)
        # A file system that reports no size at all (ramfs) has no limit to check against.
        if usage.total and size > usage.free:
            raise _no_space(manifest, paths, size, usage.free)


def _no_space(manifest: Manifest, paths: list[str], size: int, free: int) -> DtrguardError:
    short = human_size(size - free)
    return DtrguardError(
        f"no space to restore set {manifest.set_id} into {', '.join(paths)}: it needs about {human_size(size)}"
        f" of staging beside the current contents, and the file system has {human_size(free)} free",
        hint=f"free at least {short} on that file system (nothing was changed), then start dtrguard again",
    )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_postgres_version(node: Node, manifest: Manifest) -> None:
    """Refuse a dump from a newer Postgres major than the target server, before any change."""
    version, version_num = node.postgres.server_version()
    if major_key(version_num) < manifest.postgres_major:
        raise RefusedError(
            f"set {manifest.set_id} was dumped from Postgres {manifest.postgres_server_version},"
            f" newer than the target server {version}",
            hint="run DTR's Postgres at the same or a newer major version, or restore an older set",
        )


@dataclass
class Staged:
    """A directory archive extracted into staging, ready to swap in."""

    journal: SwapJournal
    root: dict[str, float] | None
    complete: bool  # an interrupted swap of this same set was finished, so there is nothing to swap


def stage_directory(
    node: Node, manifest: Manifest, directory: DirectorySettings, on_bytes: Callable[[int], None] | None = None
) -> Staged:
    """Extract a directory's archive into staging, after finishing any swap an earlier run left."""
    artifact = _artifact(manifest, "directory", str(directory.path))
    target = directory.path
    journal = SwapJournal(target)
    pending = journal.read()
    if pending and pending.get("phase") != "extracting":
        _log.warning(
            "directory.resume", directory=str(target), set_id=pending.get("set_id"), phase=pending.get("phase")
        )
        journal.swap(str(pending.get("set_id")), None, excluded_paths(target, node.excludes(directory)))
        if pending.get("set_id") == manifest.set_id:
            return Staged(journal, None, complete=True)

    clock = time.monotonic()
    _log.info("directory.start", set_id=manifest.set_id, directory=str(target), bytes=artifact.size)
    journal.begin(manifest.set_id)
    data_key = node.repository.data_key(manifest)
    with node.repository.open(artifact, on_bytes, data_key) as stream:
        try:
            stats, root = extract_archive(stream, journal.staging, target)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(journal.work).free
                raise _no_space(manifest, [str(target)], artifact.raw_size, free) from None
            raise DtrguardError(
                f"extracting {artifact.key} into {journal.staging} failed: {exc}",
                hint=f"check the file system of {target}; nothing was changed, and starting dtrguard again retries",
            ) from None
    _log.info(
        "directory.staged", set_id=manifest.set_id, directory=str(target), files=stats.files,
        bytes=stats.bytes, seconds=round(time.monotonic() - clock, 2),
    )  # fmt: skip
    return Staged(journal, root_attributes(root), complete=False)


def swap_directory(node: Node, manifest: Manifest, directory: DirectorySettings, staged: Staged) -> None:
    """Replace a directory's live contents with its staged ones; excluded paths stay as they are."""
    if not staged.complete:
        # Computed now, after any resumed swap, which may have carried kept paths into staging and back.
        keep = excluded_paths(directory.path, node.excludes(directory))
        staged.journal.swap(manifest.set_id, staged.root, keep)
    _log.info("directory.end", set_id=manifest.set_id, directory=str(directory.path))


def restore_database(node: Node, manifest: Manifest, progress: Progress | None = None) -> None:
    """Restore the roles, then every database, each in one transaction."""
    clock = time.monotonic()
    _log.info("database.start", set_id=manifest.set_id)
    on_bytes = progress.add if progress else None
    data_key = node.repository.data_key(manifest)
    with node.repository.open(_artifact(manifest, "globals", ""), on_bytes, data_key) as stream:
        node.postgres.restore_globals(stream)
    for artifact in manifest.artifacts:
        if artifact.kind != "database":
            continue
        node.postgres.ensure_database(artifact.source, artifact.owner or node.settings.postgres.user)
        with node.repository.open(artifact, on_bytes, data_key) as stream:
            node.postgres.restore_database(artifact.source, stream)
        _log.info("database.restored", set_id=manifest.set_id, database=artifact.source, bytes=artifact.size)
    _log.info("database.end", set_id=manifest.set_id, seconds=round(time.monotonic() - clock, 2))


def describe_plan(node: Node, manifest: Manifest) -> list[str]:
    """List what restore_set would do, for --dry-run."""
    lines = [f"restore set {manifest.set_id} ({manifest.total_size()} bytes, finished {manifest.finished_at})"]
    for artifact in manifest.artifacts:
        where = artifact.source or "roles"
        lines.append(f"  {artifact.kind:9} {where}: {artifact.key} ({artifact.size} bytes)")
    if not node.dtr.containers():
        command = shlex.join(node.settings.dtr.install_command).replace("{version}", manifest.dtr_version or "?")
        lines.append(f"  install DTR: {command}")
    lines.append("  start DTR containers: " + ", ".join(node.settings.dtr.start_order))
    return lines
