"""The daemon's systemd protocol (sd_notify, watchdog) and the prepare-image command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dtrguard.errors import EXIT_REFUSED

from dtrnode import REPO, Daemon, DtrNode, container_exec
from servers import Relay

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"

pytestmark = pytest.mark.docker


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET, recording every message."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.messages: list[dict[str, str]] = []
        self.closed = threading.Event()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def values(self, key: str) -> list[str]:
        return [m[key] for m in list(self.messages) if key in m]

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_notify_ready_status_stopping(make_node: Any, notify_socket: NotifySocket) -> None:
    node: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa", env={"NOTIFY_SOCKET": str(notify_socket.path)})
    node.install()
    node.seed()
    daemon = node.start()
    daemon.wait_for("schedule.start")
    daemon.wait_for("backup.end", count=2)
    assert daemon.stop() == 0

    assert notify_socket.values("READY") == ["1"]
    assert notify_socket.values("STOPPING") == ["1"]
    statuses = notify_socket.values("STATUS")
    assert statuses[0].startswith("starting")
    assert any(s.startswith("idle; last backup ") and " ok at " in s for s in statuses)
    assert notify_socket.values("WATCHDOG") == []  # no WATCHDOG_USEC, so no pings


def test_watchdog_pings_then_stops_when_stuck(make_node: Any, notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    # A run is stuck once it outlives backup_timeout plus one S3 request's timeouts: 2 s + (1 s + 1 s) x 1 here.
    node: DtrNode = make_node(
        "i-0aaaaaaaaaaaaaaaa", env=env, interval="3s", schedule_config='backup_timeout = "2s"',
        s3_config='connect_timeout = "1s"\nread_timeout = "1s"\nmax_attempts = 1',
    )  # fmt: skip
    node.install()
    node.seed()
    assert node.command("backup").returncode == 0
    # pg_dump waits 8 s before it writes anything, so the run outlives that bound and the watchdog must report it.
    script = f'[ "$1" = --version ] && exec {PG_DUMP}.real --version; sleep 8; exec {PG_DUMP}.real "$@"'
    replace = (
        f"cat {PG_DUMP} > {PG_DUMP}.real && chmod 755 {PG_DUMP}.real && printf '#!/bin/sh\\n{script}\\n' > {PG_DUMP}"
    )
    code, output = container_exec("docker_trusted_registry_postgres", ["sh", "-c", replace], user="root")
    assert code == 0, output
    daemon = node.start()
    stuck = daemon.wait_for("backup.stuck")[0]
    failure = daemon.wait_for("backup.failed")[0]  # stopped at its deadline once pg_dump writes
    code, output = container_exec(
        "docker_trusted_registry_postgres", ["sh", "-c", f"cat {PG_DUMP}.real > {PG_DUMP}"], user="root"
    )
    assert code == 0, output
    pings_before = len(notify_socket.values("WATCHDOG"))
    daemon.wait_for("backup.end")  # the pings resume, and the next run succeeds
    assert daemon.stop() == 0
    assert stuck["level"] == "error"
    assert "schedule.backup_timeout (2 s)" in failure["error"]
    assert len(notify_socket.values("WATCHDOG")) > pings_before, notify_socket.messages


def test_restore_status_shows_progress(make_node: Any, notify_socket: NotifySocket) -> None:
    node_a: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa")
    node_a.install()
    node_a.seed()
    assert node_a.command("backup").returncode == 0
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", env={"NOTIFY_SOCKET": str(notify_socket.path)})
    daemon = node_b.start()
    daemon.wait_for("restore.end")
    daemon.wait_for("schedule.start")
    assert daemon.stop() == 0
    restoring = [s for s in notify_socket.values("STATUS") if s.startswith("restoring set ")]
    assert restoring, notify_socket.messages
    assert " % of " in restoring[-1]


def idle_service(make_node: Any) -> tuple[DtrNode, Daemon]:
    """Start the service on an installed, seeded node, with the next backup an hour away."""
    node: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa", interval="1h")
    node.install()
    node.seed()
    daemon = node.start()
    daemon.wait_for("schedule.start")
    return node, daemon


def accepts_sigterm(pid: int, tid: int) -> bool:
    """Report whether a thread leaves SIGTERM unblocked, so that kill() with its id hands the signal to it."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return not int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1))
    return False


def test_sigterm_to_another_thread_stops_service(make_node: Any) -> None:
    """kill() with a thread's id hands the signal to that thread, and the service still stops at once."""
    node, daemon = idle_service(make_node)
    pid = daemon.process.pid
    others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid and accepts_sigterm(pid, int(tid))]
    assert others, "the service runs no thread besides the main one that accepts SIGTERM"
    os.kill(others[0], signal.SIGTERM)
    assert daemon.process.wait(20) == 0
    assert daemon.named("service.stop")


WAITER = """
import concurrent.futures, os, signal, threading, time
from dtrguard.cancel import wait_waking
signal.signal(signal.SIGTERM, lambda number, frame: os._exit(7))
started = threading.Event()
def work():
    started.set()
    time.sleep(60)
pool = concurrent.futures.ThreadPoolExecutor(1)
future = pool.submit(work)
started.wait()
print("waiting", flush=True)
wait_waking(future)
"""


def test_wait_waking_lets_sigterm_in() -> None:
    """The main thread waiting on a worker still runs its SIGTERM handler when the worker takes the signal."""
    process = subprocess.Popen([sys.executable, "-c", WAITER], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        pid = process.pid
        workers = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid and accepts_sigterm(pid, int(t))]
        assert workers
        os.kill(workers[0], signal.SIGTERM)
        assert process.wait(10) == 7
    finally:
        process.kill()
        process.wait()


def test_prepare_image_rejects_node_with_data(make_node: Any) -> None:
    node: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa")
    node.install()
    node.seed()
    assert node.command("backup").returncode == 0
    state_file = node.state_dir / "state.json"
    result = node.command("prepare-image", "--yes")
    assert result.returncode == EXIT_REFUSED
    assert "has DTR data" in result.stderr
    assert state_file.exists()


def test_prepare_image_removes_state(make_node: Any) -> None:
    node: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa")
    node.state_dir.mkdir(parents=True)
    state_file = node.state_dir / "state.json"
    state_file.write_text('{"instance_id": "i-0aaaaaaaaaaaaaaaa"}')
    dry_run = node.command("prepare-image")
    assert dry_run.returncode == 0, dry_run.stderr
    assert "would remove" in dry_run.stdout
    assert state_file.exists()
    result = node.command("prepare-image", "--yes")
    assert result.returncode == 0, result.stderr
    assert not state_file.exists()


def test_one_shot_commands_beside_service(make_node: Any) -> None:
    node, daemon = idle_service(make_node)
    status = node.command("status")
    assert f"service: running (pid {daemon.process.pid})" in status.stdout
    restore = node.command("restore", "latest", "--force")
    assert restore.returncode == EXIT_REFUSED
    assert "systemctl stop dtrguard" in restore.stderr
    backup = node.command("backup")  # waits for the action lock, then runs beside the idle service
    assert backup.returncode == 0, backup.stderr
    assert daemon.stop() == 0
    assert "service: not running" in node.command("status").stdout


def test_requests_per_backup_stay_flat(make_node: Any, moto_server: Any) -> None:
    """Each scheduled backup makes the same S3 requests however many sets the repository holds."""
    relay = Relay(int(moto_server.url.rsplit(":", 1)[1]), record=True)
    relay.up()
    try:
        node: DtrNode = make_node("i-0aaaaaaaaaaaaaaaa", s3_url=relay.url, interval="1s")
        node.install()
        node.seed()
        daemon = node.start()
        daemon.wait_for("backup.end", count=6)
        assert daemon.stop() == 0
    finally:
        relay.down()
    # A run starts with the upload of its first artifact, the small etc-dtr.tar.zst (one PUT); split the log there.
    runs: list[list[str]] = []
    for request in relay.requests:
        path = request.target.split("?")[0]
        if request.method == "PUT" and path.endswith("/etc-dtr.tar.zst"):
            runs.append([])
        if runs:
            runs[-1].append(f"{request.method} {path}")
    complete = runs[1:5]  # the first run reads the repository for the first time; the last may be cut off
    assert len(complete) == 4
    assert len({len(run) for run in complete}) == 1, [len(run) for run in complete]
    for run in complete:
        assert not [line for line in run if line.startswith("GET") and "/manifests/" in line], run
