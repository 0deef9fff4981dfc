"""Run commands inside containers through the Engine's exec API, streaming stdin or stdout.

The docker SDK's high-level exec_run gives no exit code when it streams, so these helpers use
exec create, start and inspect. stdout and stderr are demultiplexed, so stderr never mixes
into a dump.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from docker.errors import APIError, NotFound
from docker.utils.socket import STDERR, frames_iter

from dtrguard.errors import CommandError, DtrguardError

STDERR_LIMIT = 64 * 1024  # the tail of stderr kept for error messages
SEND_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Result:
    """The exit code and captured output of a finished exec."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    def check(self, what: str) -> Result:
        if self.exit_code != 0:
            raise CommandError(
                f"{what} exited with code {self.exit_code}",
                detail=self.stderr.decode(errors="replace").strip()[-2000:] or None,
            )
        return self


class Exec:
    """Exec helpers bound to one Engine API client (docker.APIClient)."""

    def __init__(self, api: Any):
        self.api = api

    def _create(self, container: str, command: list[str], user: str, stdin: bool = False) -> str:
        try:
            return str(self.api.exec_create(container, command, stdout=True, stderr=True, stdin=stdin, user=user)["Id"])
        except NotFound:
            raise DtrguardError(
                f"container {container} not found", hint="check [postgres].container in the config"
            ) from None
        except APIError as exc:
            if exc.status_code == 409:  # the Engine's status code for a container that is not running
                raise DtrguardError(
                    f"container {container} is not running", hint=f"start it with `docker start {container}`"
                ) from None
            raise DtrguardError(f"exec in container {container} failed: {exc.explanation or exc}") from None

    def _exit_code(self, exec_id: str) -> int:
        deadline = time.monotonic() + 30
        while True:
            info = self.api.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() > deadline:
                raise CommandError(f"exec {exec_id[:12]} did not report an exit code within 30 s")
            time.sleep(0.05)

    def _kill(self, exec_id: str) -> None:
        """SIGKILL an exec's process so it cannot act on a partial input (for example commit it)."""
        pid = self.api.exec_inspect(exec_id).get("Pid")
        if pid:
            # Outside the container's PID namespace the kill fails, and closing stdin early still truncates the input.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)

    def run(self, container: str, command: list[str], user: str = "") -> Result:
        """Run a command whose output is small and return it whole."""
        stdout = bytearray()
        result = self.stream_out(container, command, stdout.extend, user)
        return Result(result.exit_code, bytes(stdout), result.stderr)

    def stream_out(self, container: str, command: list[str], sink: Callable[[bytes], Any], user: str = "") -> Result:
        """Run a command and pass each stdout chunk to sink as it arrives."""
        exec_id = self._create(container, command, user)
        stderr = bytearray()
        stream = self.api.exec_start(exec_id, stream=True, demux=True)
        try:
            for out, err in stream:
                if out:
                    sink(out)
                if err:
                    stderr += err
                    del stderr[:-STDERR_LIMIT]
        finally:
            stream.close()
        return Result(self._exit_code(exec_id), b"", bytes(stderr))

    def stream_in(self, container: str, command: list[str], source: IO[bytes], user: str = "") -> Result:
        """Run a command with source as its stdin; return its exit code and output tails.

        If reading source raises (a failed checksum, say), stdin is closed early, the command
        reads a truncated input, and the exception propagates after the command has ended.
        """
        exec_id = self._create(container, command, user, stdin=True)
        connection = self.api.exec_start(exec_id, socket=True)
        raw: socket.socket = getattr(connection, "_sock", connection)
        output: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        reader = threading.Thread(target=_collect, args=(connection, output), daemon=True)
        reader.start()
        failure: BaseException | None = None
        try:
            while chunk := source.read(SEND_CHUNK):
                raw.sendall(chunk)
        except BaseException as exc:  # re-raised below, once the command has ended
            failure = exc
            self._kill(exec_id)
        finally:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
        reader.join()
        connection.close()
        code = self._exit_code(exec_id)
        if failure is not None:
            raise failure
        return Result(code, bytes(output[1]), bytes(output[2]))


def _collect(connection: Any, output: dict[int, bytearray]) -> None:
    try:
        for stream_id, data in frames_iter(connection, tty=False):
            buffer = output[STDERR if stream_id == STDERR else 1]
            buffer += data
            del buffer[:-STDERR_LIMIT]
    except OSError:
        pass
