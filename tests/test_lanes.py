"""How a backup set's jobs are shared between its two threads (dtrguard.backup._Lanes)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dtrguard.backup import ARCHIVE_NICENESS, _Lanes
from dtrguard.errors import Aborted, RepositoryUnavailable


def niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_archiving_thread_runs_at_lower_priority() -> None:
    seen: dict[str, int] = {}
    lanes = _Lanes(threading.Event())
    lanes.run([lambda: seen.update(archive=niceness())], lambda: seen.update(plan=niceness()))
    assert seen["plan"] == niceness()
    assert seen["archive"] == min(19, seen["plan"] + ARCHIVE_NICENESS)


def test_largest_dump_taken_by_planning_thread() -> None:
    """The planning thread takes the first shared job at once; the other takes the rest once its own are done."""
    finished: list[tuple[str, str]] = []
    lanes = _Lanes(threading.Event())

    def job(name: str, seconds: float = 0.0) -> None:
        time.sleep(seconds)
        finished.append((name, threading.current_thread().name))

    def plan() -> None:
        lanes.share([lambda: job("largest", 1.0), lambda: job("small"), lambda: job("roles")])

    lanes.run([lambda: job("directory", 0.3)], plan)
    threads = dict(finished)
    assert sorted(threads) == ["directory", "largest", "roles", "small"]
    assert threads["largest"] == threading.current_thread().name
    assert threads["small"] == threads["roles"] == threads["directory"] != threads["largest"]


def test_first_failure_raised_and_stops_other_jobs() -> None:
    stop = threading.Event()
    lanes = _Lanes(stop)
    ran: list[str] = []

    def failing() -> None:
        raise RepositoryUnavailable("S3 upload of etc.tar.zst failed")

    def waits_for_stop() -> None:
        assert stop.wait(10)
        raise Aborted("stopped")

    def plan() -> None:
        lanes.share([waits_for_stop, lambda: ran.append("never")])

    with pytest.raises(RepositoryUnavailable, match="etc.tar.zst"):
        lanes.run([failing], plan)
    assert stop.is_set()
    assert ran == []


def test_failed_planning_releases_archiving_thread() -> None:
    """The archiving thread waits for shared jobs; a planning failure must end that wait."""
    lanes = _Lanes(threading.Event())

    def plan() -> None:
        raise RepositoryUnavailable("Postgres did not accept connections")

    with pytest.raises(RepositoryUnavailable, match="Postgres"):
        lanes.run([lambda: None], plan)
    assert lanes.stop.is_set()
