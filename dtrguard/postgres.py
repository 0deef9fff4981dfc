"""DTR's Postgres, reached only through `docker exec`, never by a container address.

Dumps use pg_dump's custom format without its own compression (zstd compresses the stream).
A restore goes one of two ways, both all or nothing:

- beside the live database: pg_restore fills a new database named after it (side_name) while
  DTR still runs, and swap_in() later renames it into place in one transaction;
- in place: pg_restore runs with --clean --if-exists --single-transaction, so running it again
  gives the same rows, not duplicates.

A dump or a database restore passes its bytes through a FIFO in a mount the container shares
with the host when there is one (see dtrguard.fifo), and through the exec stream otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from dtrguard import fifo, log
from dtrguard.config import PostgresSettings
from dtrguard.dockerexec import Exec, Result
from dtrguard.errors import CommandError, DtrguardError, IntegrityError

_log = log.get("postgres")

# Row counts of every user table, with no function created in the database: query_to_xml runs
# count(*) per table (available since Postgres 8.3).
_ROW_COUNTS_SQL = """
select table_schema || '.' || table_name,
       (xpath('/row/c/text()', query_to_xml(format('select count(*) as c from %I.%I',
              table_schema, table_name), false, true, '')))[1]::text
from information_schema.tables
where table_type = 'BASE TABLE' and table_schema not in ('pg_catalog', 'information_schema')
order by 1
"""
_CREATE_ROLE = re.compile(rb"^CREATE ROLE (.+);$", re.MULTILINE)
# Databases a restore fills beside the live ones (new) and the live ones it replaced (old).
_SIDE_KINDS = ("new", "old")
_SIDE_PATTERN = re.compile(r"^dtrguard_(new|old)_[0-9a-f]{16}$")


def side_name(database: str, kind: str) -> str:
    """Return the name of the database a restore fills beside database (new) or moves it to (old).

    A hash keeps the name within Postgres's 63 bytes whatever the database is called.
    """
    assert kind in _SIDE_KINDS
    return f"dtrguard_{kind}_{hashlib.sha256(database.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class DumpRoute:
    """The route by which the dumps of one backup set reach dtrguard, found once for the set."""

    shared: fifo.SharedDir | None  # the mount that FIFOs pass through, or None for the exec stream
    tool_version: str  # pg_dump --version in the container
    flags: tuple[str, ...]  # pg_dump options that writing into a FIFO needs


class Postgres:
    """Dump and restore DTR's databases in the configured container."""

    def __init__(self, settings: PostgresSettings, runner: Exec):
        self.settings = settings
        self.exec = runner
        self.container = settings.container

    def _psql(self, sql: str, database: str = "postgres") -> Result:
        command = ["psql", "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-U", self.settings.user]
        return self.exec.run(self.container, [*command, "-d", database, "-c", sql])

    def query(self, sql: str, database: str = "postgres") -> list[list[str]]:
        """Run one SQL statement and return its rows as lists of text fields."""
        result = self._psql(sql, database).check(f"psql in {self.container}")
        lines = result.stdout.decode().splitlines()
        return [line.split("\t") for line in lines if line]

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the server accepts queries, or raise after timeout seconds."""
        limit = timeout or self.settings.ready_timeout
        deadline = time.monotonic() + limit
        last = ""
        while time.monotonic() < deadline:
            result = self._psql("select 1")  # raises at once when the container is missing or stopped
            if result.exit_code == 0:
                return
            last = result.stderr.decode(errors="replace").strip()
            time.sleep(0.5)
        raise DtrguardError(
            f"Postgres in {self.container} did not accept connections within {limit:.0f} s",
            detail=last or None,
            hint=f"check `docker logs {self.container}`",
        )

    def server_version(self) -> tuple[str, int]:
        rows = self.query("select current_setting('server_version'), current_setting('server_version_num')")
        return rows[0][0], int(rows[0][1])

    def dump_tool_version(self) -> str:
        return (
            self.exec.run(self.container, ["pg_dump", "--version"]).check("pg_dump --version").stdout.decode().strip()
        )

    def databases(self) -> dict[str, str]:
        """Return every non-template database that accepts connections with its owner, largest first.

        A restore's side databases are left out: they are never backed up.
        """
        rows = self.query(
            "select datname, pg_get_userbyid(datdba) from pg_database"
            " where not datistemplate and datallowconn order by pg_database_size(oid) desc, datname"
        )
        return {name: owner for name, owner in rows if not _SIDE_PATTERN.match(name)}

    def row_counts(self, database: str) -> dict[str, int]:
        return {table: int(count) for table, count in self.query(_ROW_COUNTS_SQL, database)}

    def dump_globals(self, sink: Callable[[bytes], Any]) -> None:
        """Stream the roles and tablespaces (pg_dumpall --globals-only) to sink."""
        command = ["pg_dumpall", "--globals-only", "-U", self.settings.user]
        self.exec.stream_out(self.container, command, sink).check(f"pg_dumpall in {self.container}")

    def shared_dir(self) -> fifo.SharedDir | None:
        """Return the container's mount that a FIFO can pass through, or None (then exec streams)."""
        shared = fifo.find_shared_dir(self.exec, self.container)
        if shared is not None:
            fifo.remove_stale(shared)
        return shared

    def dump_route(self) -> DumpRoute:
        """Find how dumps reach dtrguard: through a FIFO in a shared mount, or through the exec stream."""
        shared = self.shared_dir()
        version = self.dump_tool_version()
        # pg_dump 10 and newer fsync their output file, which a FIFO refuses.
        no_sync = ("--no-sync",) if shared is not None and _major(version) >= 10 else ()
        return DumpRoute(shared, version, no_sync)

    def dump_database(self, database: str, sink: Callable[[bytes], Any], route: DumpRoute | None = None) -> None:
        """Stream one database in custom format, uncompressed, to sink.

        route, from dump_route(), saves finding it again for each database of a set.
        """
        command = ["pg_dump", "-Fc", "-Z0", "-U", self.settings.user, "-d", database]
        what = f"pg_dump of database {database} in {self.container}"
        checked = _DumpCheck(sink, what)
        if route is None:
            route = self.dump_route()
        shared = route.shared
        with contextlib.ExitStack() as stack:
            host, inside = stack.enter_context(fifo.fifo_in(shared)) if shared else (None, None)
            if shared is not None and host is not None:
                command = [*command, *route.flags, "-f", str(inside)]
                result = fifo.read_through(self.exec, self.container, command, str(shared.uid), host, checked)
            else:
                result = self.exec.stream_out(self.container, command, checked)
        result.check(what)
        checked.finish()

    def restore_globals(self, source: IO[bytes]) -> None:
        """Apply a globals dump in one transaction; roles that already exist are altered, not recreated."""
        self.apply_globals(source.read())

    def apply_globals(self, dump: bytes, create_only: bool = False) -> None:
        """Apply a globals dump (pg_dumpall --globals-only) in one transaction.

        Roles that already exist are altered, not recreated. With create_only, only the missing
        roles are created, with no attributes, password or membership: enough to own the objects
        of a database restored beside the live one, and nothing that changes what a live role can do.
        """
        guarded = rb"DO $dtrguard$BEGIN CREATE ROLE \1; EXCEPTION WHEN duplicate_object THEN NULL; END$dtrguard$;"
        if create_only:
            sql = b"\n".join(_CREATE_ROLE.sub(guarded, m.group(0)) for m in _CREATE_ROLE.finditer(dump))
        else:
            sql = _CREATE_ROLE.sub(guarded, dump)
        command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-U", self.settings.user]
        _run_input(self.exec, self.container, [*command, "-d", "postgres"], io.BytesIO(sql), "restore of roles")

    def drop_side_databases(self) -> list[str]:
        """Drop the side databases an earlier restore left (killed, or failed); return their names."""
        rows = self.query("select datname from pg_database where datname like 'dtrguard\\_%'")
        names = [row[0] for row in rows if _SIDE_PATTERN.match(row[0])]
        for name in names:
            self._terminate([name])
            self._psql(f"drop database if exists {_ident(name)}", "template1").check(f"drop database {name}")
        return names

    def restore_beside(self, database: str, owner: str, source: IO[bytes]) -> str:
        """Restore a custom-format dump into a new database beside database; return its name.

        The live database is not touched. On failure the new database is dropped again.
        """
        side = side_name(database, "new")
        self._psql(f"drop database if exists {_ident(side)}", "template1").check(f"drop database {side}")
        create = f"create database {_ident(side)} owner {_ident(owner)} template template0"
        self._psql(create, "template1").check(f"create database {side}")
        try:
            self.restore_database(side, source, clean=False)
        except BaseException as exc:
            with contextlib.suppress(DtrguardError):
                self._psql(f"drop database if exists {_ident(side)}", "template1").check(f"drop database {side}")
            if isinstance(exc, CommandError) and exc.hint is None:
                exc.hint = (
                    f"database {database} was not changed; the restore fills a second copy of it beside"
                    f" the live one, so Postgres's data directory needs room for both"
                )
            raise
        return side

    def swap_in(self, databases: list[str]) -> dict[str, str]:
        """Rename each database's restored side database into its place, all in one transaction.

        The databases they replace are renamed aside in the same transaction and dropped after it.
        Sessions still connected to either are ended first: DTR is stopped by then, so they are
        leftovers, and a rename waits for none. Returns the replaced databases that could not be
        dropped, with the error: the restored data is in place by then, and the next restore drops them.
        """
        existing = {row[0] for row in self.query("select datname from pg_database")}
        statements = []
        for database in databases:
            if database in existing:
                statements.append(f"alter database {_ident(database)} rename to {_ident(side_name(database, 'old'))};")
            statements.append(f"alter database {_ident(side_name(database, 'new'))} rename to {_ident(database)};")
        self._terminate([*databases, *(side_name(d, "new") for d in databases)])
        sql = "\n".join(statements).encode()
        command = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-U", self.settings.user]
        _run_input(self.exec, self.container, [*command, "-d", "template1"], io.BytesIO(sql), "swap of databases")
        not_dropped = {}
        for database in databases:
            if database in existing:
                old = side_name(database, "old")
                try:
                    self._psql(f"drop database if exists {_ident(old)}", "template1").check(f"drop database {old}")
                except DtrguardError as exc:
                    not_dropped[old] = str(exc)
        return not_dropped

    def _terminate(self, databases: list[str]) -> None:
        names = ", ".join(_literal(name) for name in databases)
        sql = f"select pg_terminate_backend(pid) from pg_stat_activity where datname in ({names})"
        self.query(f"{sql} and pid <> pg_backend_pid()", "template1")

    def ensure_database(self, database: str, owner: str) -> None:
        """Create the database if it is missing, and give it its recorded owner."""
        if not self.query(f"select 1 from pg_database where datname = {_literal(database)}"):
            self._psql(f"create database {_ident(database)} template template0").check(f"create database {database}")
        self._psql(f"alter database {_ident(database)} owner to {_ident(owner)}").check(f"alter owner of {database}")

    def restore_database(self, database: str, source: IO[bytes], clean: bool = True) -> None:
        """Restore a custom-format dump into database, all or nothing.

        With clean, objects that exist are dropped first; an empty new database needs no clean.
        """
        command = [
            "pg_restore", *(["--clean", "--if-exists"] if clean else []), "--single-transaction", "--exit-on-error",
            "-U", self.settings.user, "-d", database,
        ]  # fmt: skip
        what = f"pg_restore of database {database}"
        shared = self.shared_dir()
        with contextlib.ExitStack() as stack:
            host, inside = stack.enter_context(fifo.fifo_in(shared)) if shared else (None, None)
            if shared is not None and host is not None:
                # Given a file name, pg_restore opens the file twice; as its stdin, the FIFO is opened once.
                through_stdin = ["sh", "-c", 'exec "$@" < "$0"', str(inside), *command]
                result = fifo.write_through(self.exec, self.container, through_stdin, str(shared.uid), host, source)
                _check_input(result, self.container, what)
                return
        _run_input(self.exec, self.container, command, source, what)


class _DumpCheck:
    """Passes a custom-format dump to sink and checks that it has pg_dump's header."""

    def __init__(self, sink: Callable[[bytes], Any], what: str):
        self.sink = sink
        self.what = what
        self.head = b""
        self.size = 0

    def __call__(self, chunk: bytes) -> None:
        if len(self.head) < 5:
            self.head += chunk[: 5 - len(self.head)]
            if len(self.head) == 5 and self.head != b"PGDMP":
                raise IntegrityError(f"{self.what} wrote {self.head!r} where a custom-format dump starts with PGDMP")
        self.size += len(chunk)
        self.sink(chunk)

    def finish(self) -> None:
        if self.head != b"PGDMP":
            raise IntegrityError(f"{self.what} ended after {self.size} bytes, before a custom-format dump's header")


def _major(version: str) -> int:
    """Return the major version in `pg_dump (PostgreSQL) 15.18 (Debian ...)` or `... 9.4.1` (9 for 9.x)."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", version)
    return int(match.group(1)) if match else 0


def _run_input(runner: Exec, container: str, command: list[str], source: IO[bytes], what: str) -> None:
    _check_input(runner.stream_in(container, command, source), container, what)


def _check_input(result: Result, container: str, what: str) -> None:
    if result.exit_code != 0:
        raise CommandError(
            f"{what} in {container} failed with exit code {result.exit_code}; the transaction was rolled back",
            detail=result.stderr.decode(errors="replace").strip()[-2000:] or None,
        )


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
