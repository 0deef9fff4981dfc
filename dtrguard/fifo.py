"""Move a dump or a restore's input through a FIFO in a directory the container shares with the host.

Bytes that pass through the Engine's exec attach stream go through dockerd and the API socket,
which costs CPU and caps throughput well below a pipe's. The Postgres container often has a
writable mount whose host directory dtrguard can reach (the data directory, as a bind mount or
a local volume). pg_dump then writes into, or pg_restore reads from, a FIFO there instead, and
only the command's exit code and stderr pass through exec. Without such a mount, or when the FIFO
cannot be made, the callers stream through exec as before.

A FIFO is used only after the container has been seen to find it under the same random name,
so a host path that only looks like the mount's source (dtrguard in another mount namespace)
is never trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from dtrguard import log
from dtrguard.dockerexec import STDERR_LIMIT, Exec, Result

_log = log.get("fifo")
PREFIX = ".dtrguard-pipe-"
CHUNK = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# pg_dump writes its output 8 KB at a time, and pg_restore reads its input a few KB at a time.
# A reader that keeps up with such a writer wakes for every write: a 966 MB dump arrived in 118,000
# reads, which cost dtrguard 2.8 s of CPU, mostly in the kernel. Pausing PAUSE seconds after a
# short read, or while the FIFO is full, lets the FIFO fill or drain first. The same dump then
# arrived in 4,500 reads for 0.8 s of CPU, in the same wall time (on an idle machine: with every
# core busy the reader falls behind and its reads are long anyway). The pauses are taken only when
# the FIFO has room for CHUNK bytes, which pg_dump fills in one pause only above 1 GB/s.
PAUSE = 0.001
SHORT_READ = CHUNK // 4  # bytes: a read shorter than this is followed by a pause


@dataclass(frozen=True)
class SharedDir:
    """A directory seen by the host at host and by the container at inside, and the uid that owns it."""

    host: Path
    inside: PurePosixPath
    uid: int


def find_shared_dir(runner: Exec, container: str) -> SharedDir | None:
    """Return a writable mount of container that both the host and the container can open, or None."""
    try:
        mounts = runner.api.inspect_container(container).get("Mounts") or []
    except Exception as exc:  # noqa: BLE001 - any failure means "no fast path", never a failed backup
        _log.info("fifo.unavailable", container=container, reason=f"inspect failed: {exc}")
        return None
    for mount in mounts:
        if not mount.get("RW") or mount.get("Type") not in ("bind", "volume") or not mount.get("Source"):
            continue
        host = Path(mount["Source"])
        try:
            info = host.stat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            continue
        shared = SharedDir(host, PurePosixPath(mount["Destination"]), info.st_uid)
        if _container_sees(runner, container, shared):
            return shared
    _log.info("fifo.unavailable", container=container, reason="no writable mount shared with this host")
    return None


def _container_sees(runner: Exec, container: str, shared: SharedDir) -> bool:
    with fifo_in(shared) as (host, inside):
        if host is None:
            return False
        result = runner.run(container, ["sh", "-c", 'test -p "$1"', "sh", str(inside)], user=str(shared.uid))
        return result.exit_code == 0


@contextlib.contextmanager
def fifo_in(shared: SharedDir) -> Iterator[tuple[Path | None, PurePosixPath]]:
    """Make a FIFO with a random name in shared, owned by its uid; yield its two paths; remove it after.

    The host path is None when the FIFO could not be made (a read-only host path, say).
    """
    name = PREFIX + secrets.token_hex(8)
    host = shared.host / name
    try:
        os.mkfifo(host, 0o600)
        os.chown(host, shared.uid, -1)
    except OSError as exc:
        _log.info("fifo.unavailable", directory=str(shared.host), reason=str(exc))
        with contextlib.suppress(OSError):
            host.unlink()
        yield None, shared.inside / name
        return
    try:
        yield host, shared.inside / name
    finally:
        with contextlib.suppress(OSError):
            host.unlink()


def remove_stale(shared: SharedDir) -> None:
    """Remove FIFOs that a killed dtrguard left behind."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(shared.host):
            if entry.name.startswith(PREFIX) and stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


class _Command:
    """An exec running in the background, its stderr tail kept; wakes a FIFO opener when it ends early."""

    def __init__(self, runner: Exec, container: str, command: list[str], user: str, fifo: Path, read_end: bool):
        self.runner = runner
        self.exec_id = runner._create(container, command, user)
        self.fifo = fifo
        self.read_end = read_end  # True when dtrguard reads the FIFO
        self.stderr = bytearray()
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fifo-exec", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = self.runner.api.exec_start(self.exec_id, stream=True, demux=True)
        try:
            for _, err in stream:
                if err:
                    self.stderr += err
                    del self.stderr[:-STDERR_LIMIT]
        except OSError:
            pass
        finally:
            stream.close()
        if not self.opened.is_set():
            # The command ended without opening its end of the FIFO (it failed at start): open the
            # other end briefly, so that dtrguard's open() returns instead of waiting forever.
            flags = (os.O_WRONLY if self.read_end else os.O_RDONLY) | os.O_NONBLOCK
            with contextlib.suppress(OSError):
                os.close(os.open(self.fifo, flags))

    def finish(self) -> Result:
        self.thread.join()
        return Result(self.runner._exit_code(self.exec_id), b"", bytes(self.stderr))

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.runner._kill(self.exec_id)


def _open_end(running: _Command, flags: int) -> tuple[int, bool]:
    """Open dtrguard's end of the FIFO once the command opens its end, or kill the command if that fails.

    Returns the descriptor and whether to pause between reads or writes (see PAUSE).
    """
    try:
        fd = os.open(running.fifo, flags)
    except BaseException:
        running.kill()
        raise
    running.opened.set()
    with contextlib.suppress(OSError):  # a larger pipe means fewer wake-ups; the default works too
        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    try:
        size = fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        size = 0
    return fd, PAUSE > 0 and size >= CHUNK


def read_through(
    runner: Exec, container: str, command: list[str], user: str, fifo: Path, sink: Callable[[bytes], Any]
) -> Result:
    """Run command, which writes the FIFO, and pass what it writes to sink."""
    running = _Command(runner, container, command, user, fifo, read_end=True)
    fd, pause = _open_end(running, os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            sink(chunk)
            if pause and len(chunk) < SHORT_READ:
                time.sleep(PAUSE)
    except BaseException:
        running.kill()
        raise
    finally:
        os.close(fd)
    return running.finish()


def write_through(runner: Exec, container: str, command: list[str], user: str, fifo: Path, source: IO[bytes]) -> Result:
    """Run command, which reads the FIFO, and feed it from source.

    If reading source raises (a failed checksum, say), the command is killed before it reads the
    end of its input, and the exception propagates once it has ended.
    """
    running = _Command(runner, container, command, user, fifo, read_end=False)
    fd, pause = _open_end(running, os.O_WRONLY)
    failure: BaseException | None = None
    try:
        # A write to a full FIFO then returns at once and dtrguard pauses. A blocking write would
        # wake each time the command reads a few KB.
        os.set_blocking(fd, not pause)
        while chunk := source.read(CHUNK):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    time.sleep(PAUSE)
    except BrokenPipeError:
        pass  # the command stopped reading, and its exit code and stderr give the reason
    except BaseException as exc:
        failure = exc
        running.kill()
    finally:
        os.close(fd)
    result = running.finish()
    if failure is not None:
        raise failure
    return result
