"""Failure cases end to end: a killed restore, a full disk, roles a fresh server lacks, an emptied database.

Each test runs dtrguard against moto's S3 server, the test Postgres container and the Docker Engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import APIError, NotFound

import dtrnode
from dtrnode import (
    CONTAINERS,
    RUNNING,
    Daemon,
    DtrNode,
    backup_once,
    client,
    events_of,
    node_with_data,
    remove_containers,
    set_objects,
    sql,
    table_contents,
    tree,
)

pytestmark = pytest.mark.docker

POSTGRES = "docker_trusted_registry_postgres"
WORK_DIR = ".dtrguard-restore"
NODE_A = "i-0aaaaaaaaaaaaaaaa"
NODE_B = "i-0bbbbbbbbbbbbbbbb"


# Helpers


def manifest_ids(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="dtr/test/manifests/")
    return sorted(item["Key"].rsplit("/", 1)[1].removesuffix(".json") for item in listing.get("Contents", []))


def read_manifest(s3: Any, bucket: str, set_id: str) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=f"dtr/test/manifests/{set_id}.json")["Body"].read()
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def errors_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if event.get("level") == "error"]


def status_of(node: DtrNode) -> dict[str, Any]:
    result = node.command("status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def journal_phase(directory: Path) -> str | None:
    """Return the phase in a directory's restore journal, or None while there is no journal."""
    try:
        phase = json.loads((directory / WORK_DIR / "journal.json").read_text()).get("phase")
    except (FileNotFoundError, ValueError):  # absent, or replaced between open and read
        return None
    return str(phase)


def running_commands(container: str) -> list[str]:
    """Return the command lines of the processes in a container; empty when it does not run."""
    try:
        top = client().containers.get(container).top()
    except (NotFound, APIError):
        return []
    return [" ".join(process) for process in top.get("Processes") or []]


def kill_when(daemon: Daemon, condition: Callable[[], bool], what: str, period: float, timeout: float = 240) -> None:
    """SIGKILL the daemon as soon as condition() holds; fail if the restore ends or exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if daemon.process.poll() is not None or daemon.named("restore.end"):
            raise AssertionError(f"the restore ended before {what}:\n{daemon.dump()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{daemon.dump()}")
        time.sleep(period)
    daemon.kill()
    assert daemon.process.returncode == -signal.SIGKILL


def kill_during_pg_restore(daemon: Daemon, target: str, what: str) -> None:
    """SIGKILL the daemon while pg_restore runs with target (such as "-d dtr") in its command line.

    Returns once pg_restore has ended too: its input closes with the killed daemon, so it reads a
    truncated dump and rolls back.
    """

    def restoring() -> bool:
        return any("pg_restore" in line and target in line for line in running_commands(POSTGRES))

    kill_when(daemon, restoring, what, period=0.02)
    deadline = time.monotonic() + 60
    while any("pg_restore" in line for line in running_commands(POSTGRES)):
        assert time.monotonic() < deadline, "pg_restore still runs 60 s after dtrguard was killed"
        time.sleep(0.2)


# SIGKILL during a restore

TOP_LEVEL_FILES = 6000  # entries extracted and renamed one by one, so staging and the swap last long enough to hit
BULK_TAGS = 300_000  # rows that keep pg_restore of the dtr database running long enough to hit
# Per moment of the kill: (top-level files on node A, rows added on node A, stale top-level files on node B).
# Each moment gets only the bulk that widens its own window.
BULK = {
    "database": (0, BULK_TAGS, 100),
    "staging": (TOP_LEVEL_FILES, 0, 100),
    "swap": (TOP_LEVEL_FILES, 0, TOP_LEVEL_FILES),
}


def add_bulk(node: DtrNode, files: int, rows: int) -> None:
    """Add top-level files to /var/local/dtr and rows to the dtr database."""
    for index in range(files):
        (node.var / f"upload-{index:05}").write_bytes(os.urandom(256))
    sql(
        None,
        "insert into tags (name, manifest) select 'bulk-' || g, to_jsonb(md5(g::text))"
        f" from generate_series(1, {rows}) g",
        database="dtr",
    )


def write_stale_var(var: Path, files: int = TOP_LEVEL_FILES) -> None:
    """Fill /var/local/dtr as a disk reused from an earlier node would be: other files, some under the same names."""
    (var / "image-storage" / "local").mkdir(parents=True)
    (var / "image-storage" / "local" / "blob-001").write_bytes(b"a layer of an earlier node\n")
    (var / "image-storage" / "local" / "blob-stale").write_bytes(b"only in the earlier node\n")
    for index in range(files):
        (var / f"stale-{index:05}").write_bytes(b"old\n")
    (var / "logs").mkdir()
    (var / "logs" / "earlier.log").write_text("excluded, so a restore keeps it\n")


def dtr_tables() -> str:
    return sql(None, "select count(*) from pg_tables where schemaname = 'public'", database="dtr")


@pytest.mark.parametrize("moment", ["database", "staging", "swap"])
def test_kill_during_restore_resumes(make_node: Any, moment: str) -> None:
    files, rows, stale_files = BULK[moment]
    node_a = node_with_data(make_node)
    add_bulk(node_a, files, rows)
    set_id = backup_once(node_a)
    etc_source, var_source, tables_source = tree(node_a.etc), tree(node_a.var), table_contents()
    node_a.destroy()

    node_b: DtrNode = make_node(NODE_B, interval="1h")
    write_stale_var(node_b.var, stale_files)
    var_stale = tree(node_b.var)
    daemon = node_b.start()
    if moment == "database":
        kill_during_pg_restore(daemon, "-d dtr", "pg_restore of the dtr database")
        assert dtr_tables() == "0", "the interrupted pg_restore committed tables"
        assert journal_phase(node_b.var) is None
    elif moment == "staging":

        def extracting_var() -> bool:
            if journal_phase(node_b.var) != "extracting":
                return False
            try:
                return len(os.listdir(node_b.var / WORK_DIR / "new")) > files // 4
            except FileNotFoundError:  # the extraction ended and the work dir was removed
                return False

        kill_when(daemon, extracting_var, "extraction of /var/local/dtr into staging", period=0.005)
        assert journal_phase(node_b.var) == "extracting"
        live = {path: entry for path, entry in tree(node_b.var).items() if not path.startswith(WORK_DIR)}
        assert live == var_stale
    else:

        def swapping_var() -> bool:
            return journal_phase(node_b.var) in ("clearing", "installing")

        kill_when(daemon, swapping_var, "the swap of /var/local/dtr", period=0.001)
        assert journal_phase(node_b.var) in ("clearing", "installing")

    daemon = node_b.start()
    restored = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert restored["set_id"] == set_id
    assert daemon.named("restore.resume")[0]["set_id"] == set_id
    if moment == "swap":
        resumed = daemon.named("directory.resume")
        assert [event["directory"] for event in resumed] == [str(node_b.var)]
    assert errors_of(daemon.events) == []
    assert tree(node_b.etc) == etc_source
    assert tree(node_b.var) == var_source  # neither stale files nor the work dir remain
    assert (node_b.var / "logs" / "earlier.log").exists()
    assert table_contents() == tables_source  # no row twice, none missing
    status = status_of(node_b)
    assert status["restored_set"] == set_id
    assert status["restoring_set"] is None


def side_databases() -> list[str]:
    return sql(None, "select datname from pg_database where datname like 'dtrguard%' order by 1").split()


def test_kill_during_restore_beside_keeps_live_database(make_node: Any) -> None:
    """A restore onto a node with DTR installed fills a new database. Killed there, it leaves the live one untouched."""
    node = node_with_data(make_node)
    add_bulk(node, 0, BULK_TAGS)
    set_id = backup_once(node)
    restored_contents = table_contents()
    sql(None, "insert into repositories (namespace, name) values ('marker', 'live')", database="dtr")
    live_contents = table_contents()

    argv = [sys.executable, "-m", "dtrguard", "--config", str(node.config_path), "restore", set_id, "--force"]
    restore = Daemon(argv, dtrnode.test_env(node.env))
    RUNNING.append(restore)

    kill_during_pg_restore(restore, "-d dtrguard_new_", "pg_restore into the new database")
    assert table_contents() == live_contents  # the live database was never touched
    left = side_databases()
    assert len(left) == 1  # the new database stays until the next restore drops it

    result = node.command("restore", set_id, "--force")
    assert result.returncode == 0, result.stderr
    events = events_of(result.stderr)
    assert [e["databases"] for e in events if e.get("event") == "database.leftover_dropped"] == [left]
    swapped = [e["databases"] for e in events if e.get("event") == "database.swapped"]
    assert len(swapped) == 1
    assert "dtr" in swapped[0]
    assert table_contents() == restored_contents
    assert side_databases() == []


# The restore target fills up

TMPFS_HEADROOM = 24 * 1024 * 1024  # free bytes left on the small file system after node B's own contents
LARGE_LAYER = 48 * 1024 * 1024  # random bytes, so the var archive's raw size is larger than that headroom


@contextlib.contextmanager
def small_filesystem(path: Path) -> Iterator[None]:
    """Mount a tmpfs at path for the duration of the block; shrink it with shrink_to_headroom."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        remove_containers()  # Postgres keeps its data directory on the file system open
        subprocess.run(["umount", str(path)], check=True)


def shrink_to_headroom(path: Path) -> None:
    """Resize the tmpfs at path to the bytes it contains now plus TMPFS_HEADROOM."""
    stats = os.statvfs(path)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    size = used + TMPFS_HEADROOM
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def container_states() -> dict[str, str]:
    docker = client()
    return {name: docker.containers.get(name).status for name in CONTAINERS}


def shrink_inodes(path: Path, spare: int) -> None:
    """Limit the tmpfs at path to the inodes it uses now plus spare, leaving its byte size alone."""
    stats = os.statvfs(path)
    used = stats.f_files - stats.f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + spare}", str(path)], check=True)


@pytest.mark.parametrize("short_of", ["bytes", "inodes"])
def test_full_disk_keeps_old_contents(make_node: Any, s3: Any, bucket: str, short_of: str) -> None:
    node_a = node_with_data(make_node)
    if short_of == "bytes":
        with open(node_a.var / "image-storage" / "local" / "large-layer", "wb") as handle:
            handle.write(os.urandom(LARGE_LAYER))
    set_id = backup_once(node_a)
    artifacts = read_manifest(s3, bucket, set_id)["artifacts"]
    var_raw_size = next(a["raw_size"] for a in artifacts if a["name"] == "var-dtr.tar.zst")
    node_a.destroy()

    # Node B has DTR installed but no data (an image with DTR baked in), and stale files in /var/local/dtr.
    node_b: DtrNode = make_node(NODE_B, interval="1h")
    with small_filesystem(node_b.var):
        node_b.install()
        write_stale_var(node_b.var, files=100)
        if short_of == "bytes":
            # The archive does not fit: dtrguard finds that out before it stops DTR or downloads anything.
            shrink_to_headroom(node_b.var)
            assert var_raw_size > free_bytes(node_b.var)
        else:
            # The bytes fit but the files do not: the file system fills up part-way through staging,
            # which runs while DTR keeps running.
            shrink_inodes(node_b.var, spare=10)
            assert var_raw_size < free_bytes(node_b.var)
        var_before, etc_before, tables_before = tree(node_b.var), tree(node_b.etc), table_contents()

        daemon = node_b.start()
        code = daemon.wait_exit()
        assert code == 1
        assert daemon.named("restore.start")[0]["set_id"] == set_id
        assert daemon.named("restore.end") == []
        # Either way the restore failed before its first live change, so DTR never stopped.
        assert daemon.named("container.stop") == []
        assert tree(node_b.var) == var_before  # the stale contents, and no work dir left behind
        assert tree(node_b.etc) == etc_before
        assert table_contents() == tables_before
        assert set(container_states().values()) == {"running"}

        # systemd starts the unit again after a failure (Restart=on-failure); that run must change nothing either.
        again = node_b.start()
        assert again.wait_exit() == 1
        assert again.named("restore.end") == []
        assert tree(node_b.var) == var_before
        assert set(container_states().values()) == {"running"}

        errors = errors_of(daemon.events)
        text = json.dumps(errors)
        assert len(errors) == 1, f"expected one error event, got {len(errors)}: {text}"
        message = str(errors[0].get("error", ""))
        assert str(node_b.var) in message, f"the error does not name {node_b.var}: {text}"
        assert "no space" in message, f"the error does not say no space: {text}"
        assert "free at least" in str(errors[0].get("hint")), f"the error gives no fix: {text}"


# Objects owned by a role that a fresh server lacks

ROLE_OBJECTS = [
    "create role registry_owner nologin createdb",
    "grant registry_owner to dtr_app",
    "create database registry owner registry_owner",
]
REGISTRY_OBJECTS = [
    "create sequence layer_ids",
    "create table layers (id bigint primary key default nextval('layer_ids'), digest text not null)",
    "insert into layers (digest) select md5(g::text) from generate_series(1, 500) g",
    "create view recent_layers as select * from layers where id > 400",
    "alter sequence layer_ids owner to registry_owner",
    "alter table layers owner to registry_owner",
    "alter view recent_layers owner to registry_owner",
    "grant select on recent_layers to dtr_app",
]
OWNERS_SQL = (
    "select c.relname || ':' || c.relkind::text || ':' || pg_get_userbyid(c.relowner) from pg_class c"
    " join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public' order by 1"
)
ROLES_SQL = (
    "select rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin from pg_roles"
    " where rolname !~ '^pg_' order by 1"
)
MEMBERS_SQL = (
    "select pg_get_userbyid(roleid) || ' to ' || pg_get_userbyid(member) from pg_auth_members"
    " where pg_get_userbyid(roleid) !~ '^pg_' order by 1"
)


def ownership() -> dict[str, str]:
    return {
        "roles": sql(None, ROLES_SQL),
        "members": sql(None, MEMBERS_SQL),
        "databases": sql(
            None, "select datname || ':' || pg_get_userbyid(datdba) from pg_database where not datistemplate order by 1"
        ),
        "registry objects": sql(None, OWNERS_SQL, database="registry"),
        "dtr objects": sql(None, OWNERS_SQL, database="dtr"),
        "registry grants": sql(
            None, "select array_to_string(relacl, ',') from pg_class where relname = 'recent_layers'", "registry"
        ),
    }


def test_missing_role_restored_first(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    for statement in ROLE_OBJECTS:
        sql(None, statement)
    for statement in REGISTRY_OBJECTS:
        sql(None, statement, database="registry")
    sql(None, "create table audit (id serial primary key, line text)", database="dtr")
    sql(None, "insert into audit (line) select 'pushed ' || g from generate_series(1, 50) g", database="dtr")
    sql(None, "alter table audit owner to registry_owner", database="dtr")
    set_id = backup_once(node_a)
    owners_source, tables_source = ownership(), table_contents()
    for owned in ("layer_ids:S:registry_owner", "layers:r:registry_owner", "recent_layers:v:registry_owner"):
        assert owned in owners_source["registry objects"].split()
    node_a.destroy()

    node_b: DtrNode = make_node(NODE_B, interval="1h")
    node_b.install()  # DTR with a fresh server, which has never seen registry_owner, and no data
    assert sql(None, "select count(*) from pg_roles where rolname = 'registry_owner'") == "0"
    daemon = node_b.start()
    restored = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert restored["set_id"] == set_id
    assert errors_of(daemon.events) == []
    owners = ownership()
    for key, source in owners_source.items():
        assert owners[key] == source, key
    assert sql(None, "select tableowner from pg_tables where tablename = 'layers'", "registry") == "registry_owner"
    assert sql(None, "select tableowner from pg_tables where tablename = 'audit'", "dtr") == "registry_owner"
    owner_sql = "select pg_get_userbyid(datdba) from pg_database where datname = 'registry'"
    assert sql(None, owner_sql) == "registry_owner"
    assert sql(None, "select last_value from layer_ids", "registry") == "500"
    assert table_contents() == tables_source


# The database suddenly empty

AGGRESSIVE_RETENTION = """
[retention]
keep_last = 1
keep_all_within = "1s"
hourly_within = "1s"
daily_within = "1s"
weekly_within = "1s"
"""


def test_emptied_database_keeps_good_sets(make_node: Any, s3: Any, bucket: str) -> None:
    node = node_with_data(make_node, interval="2s")
    good = [backup_once(node) for _ in range(3)]
    rows = read_manifest(s3, bucket, good[-1])["row_counts"]
    good_rows = sum(sum(tables.values()) for tables in rows.values())
    assert good_rows > 0

    node.extra_config = AGGRESSIVE_RETENTION
    node.write_config()
    dry_run = node.command("prune", "--dry-run")
    assert dry_run.returncode == 0, dry_run.stderr
    for set_id in good[:-1]:  # the policy alone would delete every good set but the newest
        assert f"would delete set {set_id}" in dry_run.stdout

    sql(None, "drop database dtr")
    sql(None, "create database dtr owner dtr_app")
    sql(None, "truncate settings")
    daemon = node.start()
    emptied = daemon.wait_for("backup.end")[0]
    assert daemon.stop() == 0
    assert emptied["rows"] == 0
    assert manifest_ids(s3, bucket) == sorted([*good, emptied["set_id"]])
    for set_id in good:
        assert set_objects(s3, bucket, set_id) != []
    assert daemon.named("prune.deleted") == []
    errors = errors_of(daemon.events)
    assert [event["event"] for event in errors] == ["prune.skipped"]
    reason = errors[0]["reason"]
    assert good[-1] in reason
    assert emptied["set_id"] in reason
    assert f"rows fell from {good_rows}" in reason

    # The node is still empty at its next backup: the good sets must stay.
    again = node.command("backup")
    assert again.returncode == 0, again.stderr
    events = events_of(again.stderr)
    second = again.stdout.strip()
    assert second not in good
    kept = manifest_ids(s3, bucket)
    assert all(set_id in kept for set_id in good), f"good sets deleted: {sorted(set(good) - set(kept))}"
    skipped = [event for event in events if event["event"] == "prune.skipped"]
    assert len(skipped) == 1, f"the second emptied backup logged no prune.skipped: {json.dumps(events)}"
