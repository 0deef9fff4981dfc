"""How dump and restore bytes reach Postgres: a FIFO in a shared mount, or the exec stream.

Each test starts its own Postgres container under a name of its own, so it needs no DTR names.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dtrguard import fifo
from dtrguard.config import PostgresSettings
from dtrguard.dockerexec import Exec
from dtrguard.errors import CommandError
from dtrguard.postgres import Postgres

from images import PG_UID, PGDATA, ensure_postgres_image

pytestmark = pytest.mark.docker


def start_postgres(name: str, data: Path | None) -> Any:
    client = docker.from_env()
    volumes = {}
    if data is not None:
        data.mkdir(mode=0o700)
        os.chown(data, PG_UID, PG_UID)
        volumes = {str(data): {"bind": PGDATA, "mode": "rw"}}
    container = client.containers.run(ensure_postgres_image(), name=name, detach=True, volumes=volumes)
    return container


@pytest.fixture(params=["fifo", "exec"])
def postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Postgres]:
    """A Postgres with a table of 50,000 rows, its data in a bind mount (fifo) or in the container (exec)."""
    name = f"dtrguard-test-transport-{uuid.uuid4().hex[:8]}"
    container = start_postgres(name, tmp_path / "pgdata" if request.param == "fifo" else None)
    try:
        pg = Postgres(PostgresSettings(container=name, ready_timeout=60), Exec(docker.from_env().api))
        pg.wait_ready()
        pg.query(
            "create table t as select g as id, md5(g::text) as payload from generate_series(1, 50000) g", "postgres"
        )
        yield pg
    finally:
        container.remove(force=True)


def dump(pg: Postgres, database: str = "postgres") -> bytes:
    out = bytearray()
    pg.dump_database(database, out.extend)
    return bytes(out)


def test_transport_chosen_by_mount(postgres: Postgres, tmp_path: Path) -> None:
    shared = postgres.shared_dir()
    if (tmp_path / "pgdata").exists():
        assert shared is not None
        assert shared.host == tmp_path / "pgdata"
        assert str(shared.inside) == PGDATA
    else:
        assert shared is None


def test_dump_and_restore_round_trip(postgres: Postgres, tmp_path: Path) -> None:
    data = dump(postgres)
    assert data.startswith(b"PGDMP")
    postgres.ensure_database("copy", "postgres")
    postgres.restore_database("copy", io.BytesIO(data))
    assert postgres.query("select count(*), md5(string_agg(payload, '' order by id)) from t", "copy") == (
        postgres.query("select count(*), md5(string_agg(payload, '' order by id)) from t", "postgres")
    )
    # No FIFO is left in the shared directory.
    if (tmp_path / "pgdata").exists():
        assert not [p for p in os.listdir(tmp_path / "pgdata") if p.startswith(fifo.PREFIX)]


def test_failed_dump_raises_without_hanging(postgres: Postgres) -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match='database "missing" does not exist'):
        dump(postgres, "missing")
    assert time.monotonic() - started < 60  # the FIFO's reader is released when pg_dump fails before opening it


class FailingSource(io.RawIOBase):
    """A dump that fails its check part-way, as a changed artifact does."""

    def __init__(self, data: bytes, fail_after: int):
        self.data = io.BytesIO(data)
        self.left = fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise RuntimeError("sha256 mismatch")
        chunk = self.data.read(min(size if size > 0 else 65536, self.left))
        self.left -= len(chunk)
        return chunk


def test_failing_source_rolls_back(postgres: Postgres) -> None:
    data = dump(postgres)
    postgres.ensure_database("copy", "postgres")
    postgres.restore_database("copy", io.BytesIO(data))
    postgres.query("insert into t values (-1, 'marker')", "copy")
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        postgres.restore_database("copy", FailingSource(data, len(data) // 2))
    assert postgres.query("select count(*) from t where id = -1", "copy") == [["1"]]


def test_stale_fifo_removed(postgres: Postgres, tmp_path: Path) -> None:
    if not (tmp_path / "pgdata").exists():
        pytest.skip("only a shared mount holds FIFOs")
    stale = tmp_path / "pgdata" / (fifo.PREFIX + "0123456789abcdef")
    os.mkfifo(stale)
    keep = tmp_path / "pgdata" / (fifo.PREFIX + "regular-file")
    keep.write_text("not a FIFO, so not dtrguard's\n")
    dump(postgres)
    assert not stale.exists()
    assert keep.exists()


def test_mount_invisible_to_container_falls_back(postgres: Postgres, tmp_path: Path) -> None:
    """A mount source that exists on this host but is not the container's directory is never used."""
    if not (tmp_path / "pgdata").exists():
        pytest.skip("needs a mount")
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    shared = fifo.SharedDir(impostor, fifo.PurePosixPath(PGDATA), PG_UID)
    assert not fifo._container_sees(postgres.exec, postgres.container, shared)


def switches() -> int:
    """Return how often this thread has given up the CPU to wait."""
    with open("/proc/thread-self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches:"))


def test_fifo_passes_large_chunks(postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pg_dump writes 8 KB at a time and pg_restore reads a few KB, and dtrguard waits for more than that."""
    if not (tmp_path / "pgdata").exists():
        pytest.skip("only a shared mount holds FIFOs")
    postgres.query("create table big as select g as id, md5(g::text) as payload from generate_series(1, 400000) g")
    measured: dict[float, tuple[int, int]] = {}
    dumps: list[bytes] = []
    for pause in (0.0, fifo.PAUSE):
        monkeypatch.setattr(fifo, "PAUSE", pause)
        chunks: list[int] = []
        out = bytearray()

        def sink(chunk: bytes) -> None:
            chunks.append(len(chunk))  # noqa: B023
            out.extend(chunk)  # noqa: B023

        postgres.dump_database("postgres", sink)
        postgres.ensure_database(f"copy{len(measured)}", "postgres")
        before = switches()
        postgres.restore_database(f"copy{len(measured)}", io.BytesIO(out), clean=False)
        measured[pause] = (len(chunks), switches() - before)
        dumps.append(bytes(out))
    (reads_each, waits_each), (reads_paused, waits_paused) = measured.values()
    print(f"reads {reads_each} -> {reads_paused}, waits {waits_each} -> {waits_paused}")
    assert len(dumps[0]) > 10_000_000
    assert dumps[1].startswith(b"PGDMP")
    assert len(dumps[1]) == len(dumps[0])
    assert reads_paused * 4 <= reads_each, measured
    assert waits_paused * 4 <= waits_each, measured
    query = "select count(*), md5(string_agg(payload, '' order by id)) from big"
    assert postgres.query(query, "copy1") == postgres.query(query, "postgres")
