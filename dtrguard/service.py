"""The daemon: decide what a booting node is, restore if it is a replacement, then back up on a schedule.

The first-boot decision, for a node this state file does not already know:

| backups in S3 | node has DTR data | action                                           |
|---------------|-------------------|--------------------------------------------------|
| yes           | no                | restore the newest complete set, start DTR       |
| yes           | yes               | refuse (exit 3): an operator decides             |
| no            | yes               | first node: take the first backup now            |
| no            | no                | nothing to do; decide again at each interval     |
| cannot read   | -                 | retry with capped backoff; never read as "empty" |
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, TypeVar

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from botocore.exceptions import BotoCoreError, ClientError

from dtrguard import lease, log, retention, state
from dtrguard.backup import take_backup
from dtrguard.cancel import ChildEvent
from dtrguard.config import Settings
from dtrguard.errors import (
    Aborted,
    DtrguardError,
    IntegrityError,
    RefusedError,
    RepositoryUnavailable,
    TransientError,
)
from dtrguard.instance import instance_id
from dtrguard.manifest import Manifest, utc_now
from dtrguard.node import Node
from dtrguard.notify import notify
from dtrguard.restore import Progress, restore_set
from dtrguard.state import LastBackup, Leftovers, State

_log = log.get("service")
T = TypeVar("T")


class BackupTimeout(TransientError):
    """A backup ran past schedule.backup_timeout and was stopped."""


class DeadlinePassed(BotoCoreError):  # type: ignore[misc]  # botocore has no type hints
    """Raised instead of sending an S3 request once the running backup has passed its deadline."""

    fmt = "request not sent: the backup passed schedule.backup_timeout"


class RunCancel(ChildEvent):
    """A backup's cancel flag: set once the process is asked to stop (parent) or the run passes its deadline.

    Only is_set() consults the parent and the deadline (a time.monotonic() value). wait() does not.
    """

    def __init__(self, parent: threading.Event, deadline: float):
        super().__init__(parent)
        self.deadline = deadline

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def is_set(self) -> bool:
        return super().is_set() or self.expired()


class Agent:
    """One node's dtrguard: its identity, state file and collaborators."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self.instance_id = ""
        self.node: Node | None = None
        self.state = State(instance_id="")
        self.scheduler: BackgroundScheduler | None = None
        self.job: Job | None = None
        self.refusal: RefusedError | None = None
        self.progress: Progress | None = None  # set while a restore runs
        self.backup_started: float | None = None  # time.monotonic() of the running backup
        self.run_cancel: RunCancel | None = None  # the running backup's deadline
        self.stuck_reported = False

    # Start-up

    def identify(self) -> None:
        """Read the instance id and the state file; forget a state file from another instance."""
        self.instance_id = instance_id(self.settings.node)
        found = state.load(self.settings.node.state_dir)
        if found is not None and found.instance_id != self.instance_id:
            _log.warning(
                "state.foreign", recorded_instance_id=found.instance_id, instance_id=self.instance_id,
                hint="the state file came with the image; this node is treated as new",
            )  # fmt: skip
            found = None
        self.state = found or State(instance_id=self.instance_id)

    def connect(self) -> Node:
        if self.node is None:
            self.node = Node.connect(self.settings)
            self.node.repository.client.meta.events.register("before-send.s3", self._before_s3_request)
        return self.node

    def _before_s3_request(self, **kwargs: Any) -> None:
        """Fail an S3 request at once, without sending it, when the running backup has passed its deadline.

        A request already waiting on S3 ends only by its own timeouts. Every later request,
        the clean-up's included, fails here, so the state file records what it would have
        removed, for the next backup to remove.
        """
        run = self.run_cancel
        if run is not None and run.expired():
            raise DeadlinePassed()

    def save(self) -> None:
        state.save(self.settings.node.state_dir, self.state)

    # Actions shared with the one-shot commands

    def restore(self, manifest: Manifest) -> None:
        """Restore a set, recording it first so an interrupted restore resumes on the next start.

        A set that fails its checks (IntegrityError, RefusedError) changed nothing, so it is not
        resumed: the record is cleared and the error is raised for an operator to act on.
        """
        node = self.connect()
        self.state.restoring_set = manifest.set_id
        self.state.established = False
        self.save()
        self.progress = Progress(manifest)
        notify(STATUS=self.progress.line())
        try:
            restore_set(node, manifest, self.cancel, self.progress)
        except (IntegrityError, RefusedError) as exc:
            self.state.restoring_set = None
            self.state.last_error = f"restore of set {manifest.set_id} failed: {exc}"
            self.save()
            raise
        except DtrguardError as exc:
            self.state.last_error = f"restore of set {manifest.set_id} failed, resumed at next start: {exc}"
            self.save()
            raise
        finally:
            self.progress = None
        lease.take(node.repository, self.instance_id)  # the restored node is now the one that writes
        self.state.restoring_set = None
        self.state.restored_set = manifest.set_id
        self.state.established = True
        self.state.last_error = None
        self.save()

    def backup(self, take_lease: bool = False) -> Manifest:
        """Take a backup set and record the result in the state file (see take_backup for take_lease).

        The run is stopped once it passes schedule.backup_timeout: what it uploaded is deleted
        and BackupTimeout is raised. Objects that S3 did not let a failed run delete are recorded
        in the state file, and removed at the start of the next run.
        """
        node = self.connect()
        clock = self.backup_started = time.monotonic()
        run = self.run_cancel = RunCancel(self.cancel, clock + self.settings.schedule.backup_timeout)
        leftovers = Leftovers()
        try:
            try:
                self.remove_leftovers()
                manifest = take_backup(node, self.instance_id, run, take_lease, leftovers)
            except DtrguardError as exc:
                if run.expired() and not self.cancel.is_set() and not isinstance(exc, RefusedError):
                    raise self._timed_out(exc) from exc
                raise
            finally:
                self.state.leftovers.add(leftovers)
        except Aborted as exc:
            self.state.last_backup = LastBackup("aborted", utc_now().isoformat(), error=str(exc))
            self.save()
            raise
        except DtrguardError as exc:
            self.state.last_backup = LastBackup("failed", utc_now().isoformat(), error=str(exc))
            self.state.last_error = str(exc)
            self.save()
            raise
        finally:
            self.backup_started = None
            self.run_cancel = None
            self.stuck_reported = False
        result = LastBackup("ok", manifest.finished_at, manifest.set_id, manifest.total_size(),
                            round(time.monotonic() - clock, 2))  # fmt: skip
        self.state.last_backup = self.state.last_good_backup = result
        self.state.established = True
        self.state.last_error = None
        self.save()
        self.prune()
        return manifest

    def _timed_out(self, cause: DtrguardError) -> BackupTimeout:
        timeout = self.settings.schedule.backup_timeout
        return BackupTimeout(
            f"backup did not finish within schedule.backup_timeout ({timeout:g} s) and was stopped",
            detail=cause.message + (f"; {cause.detail}" if cause.detail else ""),
            hint="check that S3 and the Postgres container respond; raise schedule.backup_timeout"
            " if a backup needs longer",
        )

    def remove_leftovers(self) -> None:
        """Abort the uploads and delete the artifacts that earlier failed runs could not remove.

        Whatever S3 still does not let dtrguard remove stays recorded for the next run.
        """
        pending = self.state.leftovers
        if not pending:
            return
        repository = self.connect().repository
        client, bucket = repository.client, repository.bucket
        kept = Leftovers()
        errors: list[str] = []
        for key, upload_id in pending.uploads:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # NoSuchUpload: removed already
                    kept.uploads.append([key, upload_id])
                    errors.append(str(exc))
            except BotoCoreError as exc:
                kept.uploads.append([key, upload_id])
                errors.append(str(exc))
        for key in pending.keys:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                kept.keys.append(key)
                errors.append(str(exc))
        self.state.leftovers = kept
        self.save()
        removed_uploads = len(pending.uploads) - len(kept.uploads)
        removed_keys = len(pending.keys) - len(kept.keys)
        if removed_uploads or removed_keys:
            _log.info("leftovers.removed", uploads_aborted=removed_uploads, artifacts_deleted=removed_keys)
        if kept:
            _log.warning(
                "leftovers.kept", uploads=len(kept.uploads), artifacts=len(kept.keys), error=errors[0],
                hint="S3 did not respond, so the next run tries again",
            )  # fmt: skip

    def prune(self, dry_run: bool = False, accept_drop: bool = False) -> retention.PrunePlan | None:
        """Apply the retention policy. A failure is logged, not raised, because the backup itself succeeded.

        accept_drop takes the newest set's rows and bytes as intended (see dtrguard.retention).
        """
        repository = self.connect().repository
        try:
            pruning = retention.plan(repository, self.settings.retention, utc_now(), accept_drop)
            if not dry_run:
                retention.apply(repository, pruning)
        except DtrguardError as exc:
            _log.error("prune.failed", error=str(exc))
            return None
        return pruning

    # The first-boot decision

    def decide(self) -> None:
        """Act on the decision table in this module's docstring; raise TransientError to be retried."""
        node = self.connect()
        if self.state.restoring_set:
            self._resume(node, self.state.restoring_set)
            return
        if self.state.established:
            _log.info("node.running", instance_id=self.instance_id, restored_set=self.state.restored_set)
            return
        keys = node.repository.manifest_keys()
        for warning in node.repository.bucket_warnings():
            _log.warning("bucket.unprotected", warning=warning)
        manifests = node.repository.manifests() if keys else []
        if keys and not manifests:
            raise RepositoryUnavailable(
                f"the repository has {len(keys)} manifests but none is valid",
                hint="check the errors above; dtrguard will not treat the repository as empty",
            )
        if not manifests and node.repository.has_marker():
            raise RepositoryUnavailable(
                f"{node.repository.marker_key()} shows that backups were taken, but no complete set can be read",
                hint="check the prefix, the bucket and the instance's permissions; DTR is not started empty",
            )
        has_data = node.has_data()
        if manifests and not has_data:
            _log.info("node.replacement", instance_id=self.instance_id, set_id=manifests[-1].set_id)
            self._restore_newest(manifests)
        elif manifests:
            raise RefusedError(
                f"node has DTR data and the repository has {len(manifests)} backup sets; nothing was changed",
                detail=f"newest set {manifests[-1].set_id}",
                hint="run `dtrguard restore latest --force` to replace this node's data with the backup, or"
                " `dtrguard backup` to adopt this node's data as the newest set, then start dtrguard again",
            )
        elif has_data:
            _log.info("node.first", instance_id=self.instance_id)
            self.backup(take_lease=True)
        else:
            _log.info("node.empty", instance_id=self.instance_id, message="nothing to restore and nothing to protect")

    def decide_locked(self) -> None:
        """Run the first-boot decision holding the action lock, so no one-shot command overlaps it."""
        with state.locked(self.settings.node.state_dir, state.ACTION_LOCK, wait=True):
            self.decide()

    def _restore_newest(self, manifests: list[Manifest]) -> None:
        """Restore the newest set. If it fails its checks, stop for an operator rather than loop, or,
        with on_bad_set = "restore_older", restore the newest older set that passes."""
        newest = manifests[-1]
        candidates = manifests[::-1] if self.settings.node.on_bad_set == "restore_older" else [newest]
        rejected: list[str] = []
        for manifest in candidates:
            try:
                self.restore(manifest)
            except IntegrityError as exc:
                _log.error("restore.set_rejected", set_id=manifest.set_id, error=exc.message)
                rejected.append(f"{manifest.set_id}: {exc.message}")
                continue
            if rejected:
                _log.warning("restore.older_set", set_id=manifest.set_id, rejected=len(rejected), newest=newest.set_id)
            return
        if len(candidates) > 1:
            raise RefusedError(
                f"all {len(candidates)} sets failed their checks, so nothing was restored",
                detail="; ".join(rejected[:5]),
                hint="check the bucket for damaged objects; the errors above name each artifact",
            )
        older = [m.set_id for m in manifests[-4:-1]][::-1]
        choice = f"`dtrguard restore {older[0]} --force` (newer to older: {', '.join(older)})" if older else None
        hint = f"restore an earlier set with {choice}" if choice else "no earlier complete set exists"
        if older:
            hint += ', or set on_bad_set = "restore_older" in [node] to have the service do it'
        reason = rejected[0].split(": ", 1)[1]
        message = f"the newest set {newest.set_id} failed its checks, so nothing was restored: {reason}"
        raise RefusedError(message, hint=hint)

    def _resume(self, node: Node, set_id: str) -> None:
        _log.warning("restore.resume", set_id=set_id)
        manifest = node.repository.find(set_id)
        if manifest is None:
            raise DtrguardError(
                f"set {set_id}, whose restore was interrupted, is no longer in the repository",
                hint="run `dtrguard restore latest --force` to restore another set",
            )
        self.restore(manifest)

    # The daemon

    def retry(self, what: str, action: Callable[[], T]) -> T | None:
        """Run action until it succeeds, backing off on TransientError; None if asked to stop."""
        delay = self.settings.schedule.retry_initial_delay
        attempt = 0
        while not self.stop.is_set():
            attempt += 1
            try:
                return action()
            except TransientError as exc:
                _log.warning("retry", action=what, attempt=attempt, delay=delay, error=str(exc))
            self.stop.wait(delay)
            delay = min(delay * 2, self.settings.schedule.retry_max_delay)
        return None

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT. Raises DtrguardError on a failure that ends the service."""
        self._install_signal_handlers()
        _log.info("service.start", config=str(self.settings.source))
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        notify(STATUS="starting: deciding whether this node is new")
        self.retry("read instance id", self.identify)
        if self.stop.is_set():
            return
        try:
            self.retry("first-boot decision", self.decide_locked)
        except Aborted as exc:
            _log.warning("service.aborted", error=str(exc))
            return
        except RefusedError as exc:  # recorded so that `dtrguard status` shows why the service stopped
            self.state.last_error = str(exc)
            self.save()
            raise
        if self.stop.is_set():
            return
        self._start_scheduler()
        notify(READY="1", STATUS=self.status_line())
        # Python runs signal handlers in the main thread only. A SIGTERM that the kernel hands to
        # another thread does not wake a wait without a timeout, so the wait wakes every second.
        while not self.stop.wait(1.0):
            pass
        self._shutdown()
        if self.refusal is not None:
            raise self.refusal

    def tick(self) -> None:
        """Back up an established node, or run the first-boot decision again for a new one (the scheduled job)."""
        if self.stop.is_set():
            return
        try:
            with state.locked(self.settings.node.state_dir, state.ACTION_LOCK, wait=True):
                if self.state.established:
                    self.backup()
                else:
                    self.decide()
        except RefusedError as exc:
            self.refusal = exc  # run() raises it once the scheduler has stopped
            self.stop.set()
        except Aborted as exc:  # SIGTERM during a run: what it uploaded was deleted, so no partial set remains
            _log.warning("backup.aborted", error=str(exc), instance_id=self.instance_id)
        except DtrguardError as exc:
            event = "backup.failed" if self.state.established else "decision.failed"
            _log.error(event, error=str(exc), instance_id=self.instance_id, leftovers=len(self.state.leftovers))
        finally:
            self._update_next_run()
            notify(STATUS=self.status_line())

    def healthy(self) -> bool:
        """Report whether to keep pinging systemd's watchdog: False once a backup outlived its deadline.

        A backup is stopped at schedule.backup_timeout, but a request already waiting on S3 ends
        only by its own timeouts, so a run is stuck only once that bound has passed too.
        """
        started = self.backup_started
        timeout = self.settings.schedule.backup_timeout
        limit = timeout + request_bound(self.settings)
        if started is None or time.monotonic() - started <= limit:
            return True
        if not self.stuck_reported:
            self.stuck_reported = True
            _log.error(
                "backup.stuck", timeout_seconds=timeout, limit_seconds=limit,
                hint="watchdog pings stop, so systemd restarts dtrguard",
            )  # fmt: skip
        return False

    def _watchdog(self) -> None:
        """Ping systemd's watchdog while healthy, and publish restore progress as the unit's status."""
        interval = watchdog_interval()
        period = min(interval, 1.0) if interval else 1.0
        while not self.stop.wait(period):
            progress = self.progress
            if progress is not None:
                notify(STATUS=progress.line())
            if interval and self.healthy():
                notify(WATCHDOG="1")

    def status_line(self) -> str:
        last = self.state.last_backup
        if last is None:
            return "idle; no backup yet"
        return f"idle; last backup {last.set_id or '-'} {last.result} at {last.at}; next at {self.state.next_run}"

    def _start_scheduler(self) -> None:
        schedule = self.settings.schedule
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_listener(self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        self.job = scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=schedule.interval, timezone=UTC),
            id="backup",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(schedule.misfire_grace)),
            next_run_time=datetime.now(UTC) + timedelta(seconds=schedule.interval),
        )
        scheduler.start()
        self.scheduler = scheduler
        self._update_next_run()
        _log.info("schedule.start", interval_seconds=schedule.interval, next_run=self.state.next_run)

    def _update_next_run(self) -> None:
        # The Job object that add_job returned is the one the scheduler updates. Asking the scheduler
        # for it (get_job) would take a lock that shutdown() holds while it waits for this job.
        job = self.job
        self.state.next_run = job.next_run_time.isoformat() if job and job.next_run_time else None
        if self.state.instance_id and self.state.established:
            self.save()

    def _on_job_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            _log.warning("backup.missed", scheduled_at=str(event.scheduled_run_time))
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            _log.warning("backup.skipped", reason="the previous backup is still running")
        else:
            _log.error("backup.crashed", error=repr(getattr(event, "exception", None)))

    def _install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self.stop.set()
        self.cancel.set()

    def _shutdown(self) -> None:
        notify(STOPPING="1", STATUS="stopping")
        _log.info("service.stopping")
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.state.established:
            self.state.next_run = None  # no run is scheduled once the service has stopped
            self.save()
        _log.info("service.stop")


def request_bound(settings: Settings) -> float:
    """Return how long one S3 request may take with every attempt waiting out its timeouts, in seconds."""
    s3 = settings.s3
    return (s3.connect_timeout + s3.read_timeout) * s3.max_attempts


def watchdog_interval() -> float | None:
    """Return half of systemd's watchdog timeout in seconds, or None when no watchdog is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
