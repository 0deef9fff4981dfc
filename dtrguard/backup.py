"""Take one backup set: every directory, the roles and every database, then the manifest.

The directories are archived in one thread while the roles and databases are dumped in
another, so the dump, which waits on Postgres, overlaps the archiving, which waits on the
disk and on zstd. The manifest goes up last, so a failure at any step leaves no set: the
artifacts already uploaded for it are deleted and earlier sets are never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from dtrguard import __version__, lease, log
from dtrguard.archive import EXAMPLES, write_archive
from dtrguard.cancel import ChildEvent, wait_waking
from dtrguard.crypto import DataKey
from dtrguard.errors import Aborted
from dtrguard.manifest import Artifact, Manifest, new_set_id, utc_now
from dtrguard.node import Node
from dtrguard.postgres import Postgres
from dtrguard.repository import ArtifactUpload
from dtrguard.state import Leftovers

_log = log.get("backup")


def take_backup(
    node: Node,
    instance_id: str,
    cancel: threading.Event,
    take_lease: bool = False,
    leftovers: Leftovers | None = None,
) -> Manifest:
    """Upload a complete backup set and return its manifest.

    When the set fails and S3 does not confirm the abort of an upload or the deletion of an
    artifact, they are added to leftovers, for the caller to record and remove later.

    Before the manifest is written the writer lease is renewed, or taken when take_lease is set
    (the first backup of a first node, or an operator's one-shot backup). A lease held by another
    instance raises RefusedError, and the set's uploads are deleted.
    """
    started = utc_now()
    set_id = new_set_id(started)
    clock = time.monotonic()
    _log.info("backup.start", set_id=set_id)
    data_key = node.repository.new_data_key(set_id)
    uploader = _SetUploader(node, set_id, cancel, data_key, leftovers if leftovers is not None else Leftovers())
    try:
        manifest = _take(node, instance_id, started.isoformat(), uploader, take_lease)
    except BaseException:
        uploader.delete_uploaded()
        raise
    _log.info(
        "backup.end",
        set_id=set_id,
        seconds=round(time.monotonic() - clock, 2),
        bytes=manifest.total_size(),
        artifacts=len(manifest.artifacts),
        rows=manifest.total_rows(),
    )
    return manifest


def _take(node: Node, instance_id: str, started_at: str, uploader: _SetUploader, take_lease: bool) -> Manifest:
    containers = node.dtr.describe()
    pg = node.postgres
    pg.wait_ready()
    server_version, server_version_num = pg.server_version()
    dump_tool = pg.dump_tool_version()
    databases = pg.databases()
    row_counts = {name: pg.row_counts(name) for name in databases}

    def archive_directories() -> list[Artifact]:
        found = []
        for directory in node.settings.directories:
            produce = functools.partial(_archive, directory.path, node.excludes(directory))
            found.append(uploader.upload(f"{directory.name}.tar.zst", "directory", str(directory.path), produce))
        return found

    def dump_databases() -> list[Artifact]:
        found = [uploader.upload("globals.sql.zst", "globals", "", lambda out: pg.dump_globals(out.write))]
        for name, owner in databases.items():
            artifact = uploader.upload(f"db-{name}.dump.zst", "database", name, functools.partial(_dump, pg, name))
            found.append(dataclasses.replace(artifact, owner=owner))
        return found

    directories, dumps = _both(archive_directories, dump_databases, uploader.stop)
    artifacts = [*directories, *dumps]
    manifest = Manifest(
        set_id=uploader.set_id,
        started_at=started_at,
        finished_at=utc_now().isoformat(),
        instance_id=instance_id,
        dtrguard_version=__version__,
        artifacts=tuple(artifacts),
        containers=containers,
        dtr_version=node.dtr.version(containers),
        postgres_server_version=server_version,
        postgres_server_version_num=server_version_num,
        dump_tool_version=dump_tool,
        row_counts=row_counts,
        encryption=uploader.data_key.envelope if uploader.data_key else None,
    )
    writer = lease.take if take_lease else lease.renew
    held = writer(node.repository, instance_id)
    manifest = dataclasses.replace(manifest, lease_epoch=held.epoch)
    node.repository.put_manifest(manifest)
    return manifest


def _both(
    first: Callable[[], list[Artifact]], second: Callable[[], list[Artifact]], stop: threading.Event
) -> tuple[list[Artifact], list[Artifact]]:
    """Run first in a thread and second in this one, and return both results.

    The first to fail sets stop, which ends the other at its next write. The error raised is that
    failure, not the Aborted of the side it stopped.
    """

    def guarded(work: Callable[[], list[Artifact]]) -> list[Artifact]:
        try:
            return work()
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive") as pool:
        future = pool.submit(guarded, first)
        second_error: BaseException | None = None
        try:
            second_result = guarded(second)
        except BaseException as exc:
            second_error = exc
        wait_waking(future)
        first_error = future.exception()
    errors = [e for e in (first_error, second_error) if e is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
    return future.result(), second_result


def _archive(path: Path, excludes: list[str], out: ArtifactUpload) -> None:
    stats = write_archive(path, excludes, out)
    if stats.skipped:
        _log.warning(
            "archive.skipped",
            directory=str(path),
            count=len(stats.skipped),
            paths=stats.skipped[:EXAMPLES],
            detail="left out: entries that vanished while listed, sockets and device files",
        )


def _dump(pg: Postgres, database: str, out: ArtifactUpload) -> None:
    pg.dump_database(database, out.write)


class _SetUploader:
    """Uploads the artifacts of one set and remembers them, to delete them if the set fails."""

    def __init__(
        self, node: Node, set_id: str, cancel: threading.Event, data_key: DataKey | None, leftovers: Leftovers
    ):
        self.repository = node.repository
        self.set_id = set_id
        self.stop = ChildEvent(cancel)  # set by a failing side of the set, or with cancel
        self.data_key = data_key
        self.uploaded: list[str] = []
        self.leftovers = leftovers  # what S3 did not let this set's clean-up remove

    def upload(self, name: str, kind: str, source: str, produce: Callable[[ArtifactUpload], object]) -> Artifact:
        upload = self.repository.upload(self.set_id, name, self.stop, self.data_key)
        clock = time.monotonic()
        _log.info("artifact.start", set_id=self.set_id, artifact=name)
        try:
            produce(upload)
            size, sha256, raw_size = upload.finish()
        except BaseException:
            upload_id = upload.upload_id
            if not upload.abort() and upload_id is not None:
                self.leftovers.uploads.append([upload.key, upload_id])
            raise
        self.uploaded.append(upload.key)
        seconds = round(time.monotonic() - clock, 2)
        _log.info("artifact.end", set_id=self.set_id, artifact=name, bytes=size, raw_bytes=raw_size, seconds=seconds)
        return Artifact(
            name=name, kind=kind, key=upload.key, size=size, sha256=sha256, raw_size=raw_size, source=source
        )

    def delete_uploaded(self) -> None:
        """Delete the artifacts of a set that will never get a manifest."""
        for key in self.uploaded:
            try:
                self.repository.client.delete_object(Bucket=self.repository.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                _log.warning("artifact.delete_failed", key=key, error=str(exc))
                self.leftovers.keys.append(key)
