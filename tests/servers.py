"""Servers the tests start on 127.0.0.1: moto's S3 server, a TCP relay that can be cut, and an IMDSv2 stub."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """moto's standalone server (`python -m moto.server`), serving the S3 API over HTTP.

    With log_path, its stderr, where werkzeug logs one line per request, goes to that file.
    """

    def __init__(self, python: str = sys.executable, log_path: Path | None = None) -> None:
        self.python = python
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file: IO[bytes] | None = None

    def start(self) -> None:
        if self.log_path is not None:
            self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self.log_file or subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            time.sleep(0.2)
        raise RuntimeError(f"moto server on {self.url} did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


class Relay:
    """A TCP relay from a port of its own to a backend port, which a test can switch between modes.

    up() forwards; down() closes the port, so clients get "connection refused" as from a stopped
    endpoint; blackhole() accepts connections and reads requests but never answers, as an
    endpoint behind a dead proxy. Each switch closes the connections open at the time. With
    record set, the relay keeps each request's method, target and SigV4 access key id.
    """

    def __init__(self, backend_port: int, record: bool = False):
        self.backend_port = backend_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.mode = "down"
        self.listener: socket.socket | None = None
        self.reserved = self._bind()  # bound but not listening while down, so no other socket takes the port
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        self._switch("up")

    def down(self) -> None:
        self._switch("down")

    def blackhole(self) -> None:
        self._switch("blackhole")

    def _switch(self, mode: str) -> None:
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self.connections.clear()
            self.mode = mode
            if mode == "down" and self.listener is not None:
                with contextlib.suppress(OSError):
                    self.listener.shutdown(socket.SHUT_RDWR)  # stops listening and wakes the accept thread
                self.listener.close()
                self.listener = None
                self.reserved = self._bind()
            elif mode != "down" and self.listener is None:
                listener, self.reserved = self.reserved or self._bind(), None
                listener.listen(64)
                self.listener = listener
                threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _bind(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        return sock

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self.mode
                self.connections.append(client)
            if mode == "blackhole":
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections.append(backend)
            parser = _RequestParser(self.requests) if self.record else None
            threading.Thread(target=self._pipe, args=(client, backend, parser), daemon=True).start()
            threading.Thread(target=self._pipe, args=(backend, client, None), daemon=True).start()

    @staticmethod
    def _swallow(client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, parser: _RequestParser | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if parser is not None:
                    parser.feed(data)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request a Relay forwarded."""

    method: str
    target: str
    access_key_id: str | None  # from the SigV4 Authorization header's Credential=<id>/...


_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


class _RequestParser:
    """Splits one connection's client-to-server bytes into HTTP/1.1 requests and records each head."""

    def __init__(self, sink: list[RecordedRequest]):
        self.sink = sink
        self.buffer = b""
        self.body_left = 0  # bytes of the current request's body still to skip
        self.chunked = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.body_left:
                skipped = min(self.body_left, len(self.buffer))
                self.buffer = self.buffer[skipped:]
                self.body_left -= skipped
                if self.body_left:
                    return
            elif self.chunked:
                if not self._skip_chunk():
                    return
            elif not self._read_head():
                return

    def _read_head(self) -> bool:
        """Record the next request's head; return False when more bytes are needed."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
        lines = head.split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        match = _CREDENTIAL.search(headers.get("authorization", ""))
        self.sink.append(RecordedRequest(method, target, match.group(1) if match else None))
        self.chunked = "chunked" in headers.get("transfer-encoding", "")
        self.body_left = 0 if self.chunked else int(headers.get("content-length", "0"))
        return True

    def _skip_chunk(self) -> bool:
        """Skip one chunk of a chunked body; return False when more bytes are needed."""
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buffer[:end].split(b";")[0], 16)
        if size == 0:  # the last chunk, then trailers up to a blank line
            trailer_end = self.buffer.find(b"\r\n\r\n", end)
            if trailer_end < 0:
                return False
            self.buffer = self.buffer[trailer_end + 4 :]
            self.chunked = False
            return True
        if len(self.buffer) < end + 2 + size + 2:
            return False
        self.buffer = self.buffer[end + 2 + size + 2 :]
        return True


# Every secret access key and session token a MetadataStub served. No dtrguard output may contain one.
SERVED_SECRETS: set[str] = set()


class MetadataStub:
    """The IMDSv2 calls dtrguard and botocore make: PUT /latest/api/token, GET .../instance-id and,
    with credentials_ttl set, an IAM role's credentials.

    drop_first makes the first N requests end with the connection closed and no response, as a
    metadata service that is not up yet. Each credentials fetch returns a new key pair that
    expires credentials_ttl seconds later; fetched_keys lists the access key ids in order.
    """

    ROLE = "dtrguard-node"
    CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"

    def __init__(self, instance_id: str, drop_first: int = 0, credentials_ttl: float | None = None):
        self.instance_id = instance_id
        self.token = secrets.token_hex(16)
        SERVED_SECRETS.add(self.token)  # the IMDSv2 session token is a credential too
        self.requests = 0
        self.drops_left = drop_first
        self.dropped = 0
        self.credentials_ttl = credentials_ttl
        self.fetched_keys: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if stub._drop(self):
                    return
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._reply(200, stub.token)
                else:
                    self._reply(400, "bad token request")

            def do_GET(self) -> None:
                if stub._drop(self):
                    return
                if self.headers.get("X-aws-ec2-metadata-token") != stub.token:
                    self._reply(401, "")
                elif self.path == "/latest/meta-data/instance-id":
                    self._reply(200, stub.instance_id)
                elif stub.credentials_ttl is not None and self.path == stub.CREDENTIALS_PATH:
                    self._reply(200, stub.ROLE)
                elif stub.credentials_ttl is not None and self.path == stub.CREDENTIALS_PATH + stub.ROLE:
                    self._reply(200, stub._credentials())
                else:
                    self._reply(404, "")

            def _reply(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _drop(self, handler: http.server.BaseHTTPRequestHandler) -> bool:
        """Count a request, and close its connection without a response while drops are left."""
        with self.lock:
            self.requests += 1
            if self.drops_left <= 0:
                return False
            self.drops_left -= 1
            self.dropped += 1
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        return True

    def _credentials(self) -> str:
        assert self.credentials_ttl is not None
        key_id = "ASIA" + secrets.token_hex(8).upper()
        secret_key = secrets.token_urlsafe(30)
        session_token = secrets.token_urlsafe(90)
        SERVED_SECRETS.update((secret_key, session_token))
        with self.lock:
            self.fetched_keys.append(key_id)
        now = datetime.now(UTC)
        # NOTE: Expiration carries milliseconds, because botocore 1.44's IMDS fetcher parses only
        # IMDS's own form (to the second) for its extension rule. That rule moves an expiry under
        # 17 to 25 minutes away to 17 to 25 minutes from now, so botocore would not refresh for minutes.
        expiration = (now + timedelta(seconds=self.credentials_ttl)).isoformat(timespec="milliseconds")
        return json.dumps(
            {
                "Code": "Success",
                "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Type": "AWS-HMAC",
                "AccessKeyId": key_id,
                "SecretAccessKey": secret_key,
                "Token": session_token,
                "Expiration": expiration.replace("+00:00", "Z"),
            }
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[MetadataStub]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
