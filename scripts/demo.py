"""The local demo that `bash scripts/demo.sh` runs: node A backs up to S3 and is destroyed, then node B restores it.

Everything runs on this machine: moto's S3 server and an IMDSv2 stub on 127.0.0.1, the DTR stand-in's
containers from locally built images, and `dtrguard run` as a child process. The work directory demo-run/
is wiped at the start and left behind with node B's config and the events of both daemons.
Exit codes: 0 when node B's data equals node A's, 1 on a failure, 128 + the signal number when interrupted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Dummy credentials, so that neither boto3 nor dtrguard looks for real ones or queries 169.254.169.254.
DEMO_ENV = {
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(DEMO_ENV)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)

import boto3  # noqa: E402
from docker.errors import DockerException, ImageNotFound, NotFound  # noqa: E402

from dtr_install import APP_ROLES  # noqa: E402
from dtrnode import CONTAINERS, DTR_NAMES_LOCK, Daemon, DtrNode, client, remove_containers, table_contents, tree  # noqa: E402
from images import APP_IMAGE_REPO, APP_VERSION, POSTGRES_IMAGE, ensure_app_image, ensure_postgres_image  # noqa: E402
from servers import MetadataStub, MotoServer  # noqa: E402

RUN_DIR = REPO / "demo-run"
NODE_ROOT = RUN_DIR / "node"
EVENTS_LOG = RUN_DIR / "events.jsonl"
OTHER_OUTPUT_LOG = RUN_DIR / "daemon-output.log"
BUCKET = "dtrguard-demo"
INTERVAL_SECONDS = 5
# Seconds to wait for each event before the demo fails. A backup or a restore of the sample data (about
# 20 KB in S3) took under 5 s on the development machine, so these limits leave room for a slower one.
FIRST_BACKUP_TIMEOUT = 60
RESTORE_TIMEOUT = 90
SCHEDULED_BACKUP_TIMEOUT = INTERVAL_SECONDS + 30
STOP_TIMEOUT = 30
COMMAND_TIMEOUT = 60


class DemoError(Exception):
    """A failure with a reason the demo prints before it exits with code 1."""


class Interrupted(BaseException):
    """A SIGTERM, raised as an exception in the main thread so that the cleanup runs as it does for Ctrl-C."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal_number)


def new_instance_id() -> str:
    return "i-0" + secrets.token_hex(8)


def event_time(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def byte_count(size: int) -> str:
    return f"{size:,} bytes"


class Demo:
    """The demo's steps, and the servers, daemon and containers that its cleanup stops or removes."""

    def __init__(self) -> None:
        self.clock = time.monotonic()
        self.stack = contextlib.ExitStack()
        self.daemon: Daemon | None = None
        self.daemon_label = ""
        self.owns_containers = False
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.moto_url = ""
        self.wiped_run_dir = False  # True once this run wiped demo-run/, so the files there are its own

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.clock:5.1f} s] {message}", flush=True)

    # Steps

    def run(self) -> bool:
        """Run every step and print the report. Return whether node B's data equals node A's."""
        self.check_containers()
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        RUN_DIR.mkdir()
        self.wiped_run_dir = True
        self.start_s3()
        self.build_images()

        node_a = DtrNode(
            NODE_ROOT, self.moto_url, BUCKET, new_instance_id(), interval=f"{INTERVAL_SECONDS}s", env=DEMO_ENV
        )
        self.run_node_a(node_a)
        data_a = self.capture(node_a)
        node_a.destroy()
        self.say("node A: destroyed (DTR containers removed, demo-run/node wiped)")

        imds = self.stack.enter_context(MetadataStub(new_instance_id()).running())
        node_b = DtrNode(
            NODE_ROOT,
            self.moto_url,
            BUCKET,
            imds.instance_id,
            interval=f"{INTERVAL_SECONDS}s",
            imds_url=imds.url,
            env=DEMO_ENV,
        )
        launched = self.run_node_b(node_b)
        data_b = self.capture(node_b)

        self.print_timeline(launched)
        same = self.compare_nodes(data_a, data_b)
        self.print_command(node_b, "list")
        self.print_command(node_b, "status")
        return same

    def check_containers(self) -> None:
        """Remove DTR-named containers that an earlier demo left. Raise DemoError if others use those names."""
        try:
            docker_client = client()
            docker_client.ping()
        except DockerException as exc:
            raise DemoError(
                f"cannot reach the Docker Engine ({exc}). Run `bash scripts/setup.sh` to start it."
            ) from None
        leftovers, foreign = [], []
        for name in CONTAINERS:
            try:
                container = docker_client.containers.get(name)
            except NotFound:
                continue
            sources = [Path(mount.get("Source", "")) for mount in container.attrs.get("Mounts", [])]
            if any(source.is_relative_to(RUN_DIR) for source in sources):
                leftovers.append(name)
            else:
                foreign.append(name)
        if foreign:
            raise DemoError(
                "DTR-named containers exist that do not mount demo-run/ and may belong to a test run:"
                f" {', '.join(foreign)}. The demo needs these names, so remove them with `docker rm -f NAME`"
                " once nothing uses them."
            )
        self.owns_containers = True
        if leftovers:
            self.say(f"removing containers left by an earlier demo: {', '.join(leftovers)}")
            remove_containers()

    def start_s3(self) -> None:
        moto = MotoServer()
        self.stack.callback(self.stop_moto, moto)  # before start(), which leaves the process running on a timeout
        moto.start()
        self.moto_url = moto.url
        s3 = boto3.client("s3", endpoint_url=moto.url, region_name=DEMO_ENV["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket=BUCKET)
        self.say(f"S3: moto server on {moto.url}, bucket {BUCKET}")

    def build_images(self) -> None:
        tags = [POSTGRES_IMAGE, *(f"{APP_IMAGE_REPO.format(role=role)}:{APP_VERSION}" for role in APP_ROLES)]
        missing = []
        for tag in tags:
            try:
                client().images.get(tag)
            except ImageNotFound:
                missing.append(tag)
        if missing:
            self.say(f"images: building {len(missing)} test images from this host's files (a minute or so)")
        started = time.monotonic()
        ensure_postgres_image()
        for role in APP_ROLES:
            ensure_app_image(role, APP_VERSION)
        seconds = time.monotonic() - started
        if missing:
            self.say(f"images: built {len(missing)} images in {seconds:.1f} s")
        else:
            self.say(f"images: all {len(tags)} already built (checked in {seconds:.1f} s)")

    def run_node_a(self, node: DtrNode) -> None:
        node.write_config()
        self.say(f"node A ({node.instance_id}): installing the DTR stand-in and seeding sample data in demo-run/node")
        node.install()
        node.seed()
        self.say(f"node A: dtrguard run, backing up every {INTERVAL_SECONDS} s")
        daemon = self.start_daemon(node, "A")
        first = self.wait_for(daemon, "backup.end", 1, FIRST_BACKUP_TIMEOUT)[0]
        if not daemon.named("node.first"):
            raise DemoError("node A's dtrguard took a backup without deciding that this is the first node")
        self.say(f"node A: first backup done, set {first['set_id']}")
        scheduled = self.wait_for(daemon, "backup.end", 2, SCHEDULED_BACKUP_TIMEOUT)[1]
        self.say(f"node A: scheduled backup done, set {scheduled['set_id']}")
        self.stop_daemon()

    def run_node_b(self, node: DtrNode) -> datetime:
        """Run dtrguard on an empty node B until its restore and one scheduled backup. Return when it was launched."""
        node.write_config()
        self.say(f"node B ({node.instance_id}, read from the IMDS stub): dtrguard run on an empty node")
        launched = datetime.now(UTC)
        daemon = self.start_daemon(node, "B")
        restore = self.wait_for(daemon, "restore.end", 1, RESTORE_TIMEOUT)[0]
        if not daemon.named("node.replacement"):
            raise DemoError("node B's dtrguard restored without deciding that this is a replacement node")
        running = client().containers.list(filters={"name": "docker_trusted_registry_"})
        self.say(f"node B: restored set {restore['set_id']}; {len(running)} of {len(CONTAINERS)} DTR containers run")
        scheduled = self.wait_for(daemon, "backup.end", 1, SCHEDULED_BACKUP_TIMEOUT)[0]
        self.say(f"node B: scheduled backup done, set {scheduled['set_id']}")
        self.stop_daemon()
        return launched

    def capture(self, node: DtrNode) -> dict[str, dict[str, Any]]:
        return {"etc": tree(node.etc), "var": tree(node.var), "tables": table_contents()}

    # The daemon

    def start_daemon(self, node: DtrNode, label: str) -> Daemon:
        self.daemon = node.start()
        self.daemon_label = label
        return self.daemon

    def wait_for(self, daemon: Daemon, name: str, count: int, timeout: float) -> list[dict[str, Any]]:
        try:
            return daemon.wait_for(name, count, timeout)
        except AssertionError as exc:
            reason = str(exc).splitlines()[0].rstrip(":")
            problems = [e for e in daemon.events if e.get("level") in ("warning", "error")][-5:]
            details = "".join(f"\n  {describe_problem(e)}" for e in problems)
            raise DemoError(f"node {self.daemon_label}: {reason}{details}") from None

    def stop_daemon(self, check: bool = True) -> None:
        """Stop the running daemon with SIGTERM and append its output to the logs in demo-run/.

        With check, raise DemoError unless it exits with code 0 after a service.stop event.
        """
        daemon, label = self.daemon, self.daemon_label
        if daemon is None:
            return
        self.daemon = None
        exited_before = daemon.process.poll() is not None
        try:
            code = daemon.stop(STOP_TIMEOUT)
        except AssertionError:
            raise DemoError(f"node {label}: dtrguard did not exit within {STOP_TIMEOUT} s of SIGTERM") from None
        finally:
            read_remaining_output(daemon)
            self.events[label] = list(daemon.events)
            self.save_output(daemon, label)
        if exited_before:
            self.say(f"node {label}: dtrguard had exited with code {code}")
        else:
            self.say(f"node {label}: dtrguard stopped with SIGTERM, exit code {code}")
        if check and (code != 0 or not daemon.named("service.stop")):
            raise DemoError(f"node {label}: dtrguard exited with code {code} and no service.stop event after SIGTERM")

    def save_output(self, daemon: Daemon, label: str) -> None:
        with EVENTS_LOG.open("a") as log:
            log.writelines(json.dumps(event) + "\n" for event in daemon.events)
        if daemon.other_lines:
            with OTHER_OUTPUT_LOG.open("a") as log:
                log.write(f"# node {label}: lines of dtrguard output that are not JSON\n")
                log.writelines(line + "\n" for line in daemon.other_lines)

    # The report

    def print_timeline(self, launched: datetime) -> None:
        """Print each backup and the restore with its set id, size and duration."""
        events_a, events_b = self.events["A"], self.events["B"]
        print("\nWhat happened (sizes are the compressed sets in S3, durations are dtrguard's own measurements)")
        for index, event in enumerate(named(events_a, "backup.end")):
            phase = "first backup" if index == 0 else "scheduled backup"
            print(f"  node A  {phase:<17} set {event['set_id']}  {byte_count(event['bytes'])}  {event['seconds']} s")
        print("  node A  destroyed: DTR containers removed, directories wiped")

        restore_start = named(events_b, "restore.start")[0]
        restore_end = named(events_b, "restore.end")[0]
        print(
            f"  node B  {'restore':<17} set {restore_end['set_id']}  {byte_count(restore_start['bytes'])}"
            f"  {restore_end['seconds']} s"
        )
        for event in named(events_b, "directory.staged"):
            directory = Path(event["directory"]).relative_to(REPO)
            size = byte_count(event["bytes"])
            print(f"            directory {directory}: {event['files']} files, {size}, {event['seconds']} s")
        for event in named(events_b, "dtr.install.end"):
            print(f"            DTR install command: {event['seconds']} s")
        for event in named(events_b, "database.end"):
            print(f"            database: {event['seconds']} s")
        from_launch = (event_time(restore_end) - launched).total_seconds()
        print(f"            from launching dtrguard to the end of the restore: {from_launch:.1f} s")
        for event in named(events_b, "backup.end"):
            size = byte_count(event["bytes"])
            print(f"  node B  {'scheduled backup':<17} set {event['set_id']}  {size}  {event['seconds']} s")

    def compare_nodes(self, data_a: dict[str, dict[str, Any]], data_b: dict[str, dict[str, Any]]) -> bool:
        """Print whether node B restored node A's last set and data, and return whether it did."""
        restored = named(self.events["B"], "restore.end")[0]["set_id"]
        last_backup = named(self.events["A"], "backup.end")[-1]["set_id"]
        same = bool(restored == last_backup)
        print("\nNode B against node A")
        print(f"  restored set is node A's last backup: {'yes' if same else 'NO'}")
        same &= compare("directory usr-local-etc-dtr", data_a["etc"], data_b["etc"])
        same &= compare("directory var-local-dtr", data_a["var"], data_b["var"])
        same &= compare("database tables", data_a["tables"], data_b["tables"])
        return same

    def print_command(self, node: DtrNode, command: str) -> None:
        result = node.command(command, timeout=COMMAND_TIMEOUT)
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DemoError(f"`dtrguard {command}` exited with code {result.returncode}: {last_line}")
        print(f"\n$ dtrguard --config {node.config_path.relative_to(REPO)} {command}")
        for line in result.stdout.splitlines():
            print(f"  {line}")

    # Cleanup

    def cleanup(self) -> list[str]:
        """Stop the daemon, remove the DTR containers and stop the servers. Return a message for each failed step."""
        failures = []
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stop dtrguard", lambda: self.stop_daemon(check=False)),
            ("remove the DTR containers", self.remove_owned_containers),
            ("stop the servers", self.stack.close),
        ]
        for description, step in steps:
            try:
                step()
            except Exception as exc:  # every step runs, and each failure is reported
                failures.append(f"cleanup: could not {description}: {exc}")
        return failures

    def remove_owned_containers(self) -> None:
        if self.owns_containers:
            remove_containers()
            self.say(f"cleanup: removed the {len(CONTAINERS)} DTR containers by name (docker_trusted_registry_*)")

    def stop_moto(self, moto: MotoServer) -> None:
        moto.stop()
        self.say("cleanup: stopped the moto server")


def read_remaining_output(daemon: Daemon) -> None:
    """Wait, after the daemon's process has exited, until its output reader has gone 0.5 s without a new line."""
    with daemon.changed:
        while daemon.changed.wait(0.5):
            pass


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def describe_problem(event: dict[str, Any]) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "level", "timestamp", "component"))
    return f"{event.get('level')} {event.get('event')}: {fields}"


def compare(label: str, before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Print whether node B's entries equal node A's, and return whether they do."""
    if label == "database tables":
        rows = sum(int(value.split(":")[0]) for value in after.values())
        size = f"{len(after)} tables, {rows:,} rows"
    else:
        size = f"{len(after)} entries"
    if before == after:
        print(f"  {label}: same ({size})")
        return True
    differing = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    print(f"  {label}: DIFFERENT, {len(differing)} of {len(before | after)} entries differ: {', '.join(differing[:5])}")
    return False


def main() -> int:
    if os.geteuid() != 0:
        print(
            "demo failed: run it as root, because the DTR stand-in and dtrguard's restore chown files", file=sys.stderr
        )
        return 1
    signal.signal(signal.SIGTERM, _raise_interrupted)
    # The tests and the demo use DTR's fixed container names, so they take turns through this lock.
    lock = open(DTR_NAMES_LOCK, "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("waiting for a test run or another demo to release the DTR container names", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    print("dtrguard demo: node A backs up to S3 and is destroyed; node B replaces it and restores from S3", flush=True)
    demo = Demo()
    outcome, failure = 1, ""
    try:
        outcome = 0 if demo.run() else 1
        if outcome:
            failure = "node B's data differs from node A's (see above)"
    except DemoError as exc:
        failure = str(exc)
    except (KeyboardInterrupt, Interrupted) as exc:
        number = exc.signal_number if isinstance(exc, Interrupted) else signal.SIGINT
        outcome, failure = 128 + number, f"interrupted by {signal.Signals(number).name}"
    except Exception as exc:  # the traceback is printed, and the cleanup still runs
        traceback.print_exc()
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        # A second Ctrl-C would leave containers or servers behind, so the cleanup ignores it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(flush=True)
        cleanup_failures = demo.cleanup()

    for line in cleanup_failures:
        print(line, file=sys.stderr)
    if demo.wiped_run_dir:
        for label, path in (
            ("events of both daemons", EVENTS_LOG),
            ("other daemon output", OTHER_OUTPUT_LOG),
            ("config", NODE_ROOT / "dtrguard.toml"),
        ):
            if path.exists():
                print(f"{label}: {path}")
    seconds = time.monotonic() - demo.clock
    if outcome == 0 and cleanup_failures:
        outcome, failure = 1, "the cleanup failed (see above)"
    if outcome == 0:
        print(f"demo passed in {seconds:.1f} s")
    else:
        print(f"demo failed after {seconds:.1f} s: {failure}", file=sys.stderr)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
