"""The first-boot decision and the scheduled backups, each case against real S3, Postgres and Docker."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from dtrguard import lease
from dtrguard.config import S3Settings
from dtrguard.errors import EXIT_REFUSED
from dtrguard.manifest import parse
from dtrguard.repository import Repository

from dtrnode import (
    DtrNode,
    backup_once,
    container_exec,
    events_of,
    manifest_keys,
    node_with_data,
    set_objects,
    sql,
    table_contents,
    tree,
)
from servers import Relay

pytestmark = pytest.mark.docker

PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"
GO = "/tmp/dtrguard-test-dump-go"


def test_restart_does_not_restore(make_node: Any) -> None:
    node = node_with_data(make_node)
    daemon = node.start()
    daemon.wait_for("backup.end")
    assert daemon.stop() == 0
    sql(None, "insert into settings values ('after-first-backup', 'kept')")

    daemon = node.start()
    daemon.wait_for("node.running")
    daemon.wait_for("backup.end")
    assert daemon.stop() == 0
    assert daemon.named("restore.start") == []
    assert daemon.named("node.first") == []
    assert sql(None, "select value from settings where key = 'after-first-backup'") == "kept"


def test_foreign_state_file_restores(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    set_id = backup_once(node_a)
    baked_state = (node_a.state_dir / "state.json").read_text()
    tables = table_contents()
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    node_b.state_dir.mkdir(parents=True)
    (node_b.state_dir / "state.json").write_text(baked_state)  # baked into the image by mistake
    daemon = node_b.start()
    restore = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert daemon.named("state.foreign")[0]["recorded_instance_id"] == "i-0aaaaaaaaaaaaaaaa"
    assert restore["set_id"] == set_id
    assert table_contents() == tables


def test_node_with_data_refused(make_node: Any, s3: Any, bucket: str) -> None:
    node_a = node_with_data(make_node)
    backup_once(node_a)
    # The same node, booted as a new instance with its data still in place: dtrguard must not choose.
    shutil.rmtree(node_a.state_dir)
    sql(None, "insert into settings values ('live', 'data')")
    etc_before, var_before, tables_before = tree(node_a.etc), tree(node_a.var), table_contents()
    keys_before = manifest_keys(s3, bucket)
    (node_a.root / "instance-id").write_text("i-0ccccccccccccccccc\n")

    daemon = node_a.start()
    code = daemon.wait_exit()
    assert code == EXIT_REFUSED
    failure = daemon.named("command.failed")[0]
    assert failure["level"] == "error"
    assert "--force" in failure["hint"]
    assert daemon.named("restore.start") == []
    assert daemon.named("backup.start") == []
    assert tree(node_a.etc) == etc_before
    assert tree(node_a.var) == var_before
    assert table_contents() == tables_before
    assert manifest_keys(s3, bucket) == keys_before


def test_dump_failure_leaves_no_set(make_node: Any, s3: Any, bucket: str) -> None:
    node = node_with_data(make_node)
    good = backup_once(node)
    # pg_dump --version still works, so the backup gets past its version checks. Any other call
    # waits for GO, which the test creates once both directories are uploaded, and then fails.
    # The databases are dumped beside the directories, so without the wait the failure could stop
    # the directories before any artifact exists to clean up.
    script = (
        f'[ "$1" = --version ] && exec {PG_DUMP}.real --version; '
        f"while [ ! -e {GO} ]; do sleep 0.1; done; "
        'printf "partial dump bytes"; echo "pg_dump: error: simulated failure" >&2; exit 1'
    )
    # The image has no mv or cp, so cat keeps a copy of the real binary.
    replace = (
        f"cat {PG_DUMP} > {PG_DUMP}.real && chmod 755 {PG_DUMP}.real && printf '#!/bin/sh\\n{script}\\n' > {PG_DUMP}"
    )
    code, output = container_exec("docker_trusted_registry_postgres", ["sh", "-c", replace], user="root")
    assert code == 0, output

    daemon = node.start()
    daemon.wait_for("artifact.end", count=2)
    code, output = container_exec("docker_trusted_registry_postgres", ["sh", "-c", f": > {GO}"], user="root")
    assert code == 0, output
    failure = daemon.wait_for("backup.failed")[0]
    failed_set = daemon.named("backup.start")[-1]["set_id"]
    code, output = container_exec(
        "docker_trusted_registry_postgres", ["sh", "-c", f"cat {PG_DUMP}.real > {PG_DUMP}; rm -f {GO}"], user="root"
    )
    assert code == 0, output
    daemon.wait_for("backup.end")  # the next scheduled run succeeds
    assert daemon.stop() == 0

    assert "simulated failure" in failure["error"]
    uploaded = [e["artifact"] for e in daemon.named("artifact.end") if e["set_id"] == failed_set]
    assert uploaded == ["etc-dtr.tar.zst", "var-dtr.tar.zst"], "the failed set's clean-up went untested"
    assert failure["level"] == "error"
    keys = manifest_keys(s3, bucket)
    assert f"dtr/test/manifests/{failed_set}.json" not in keys
    assert f"dtr/test/manifests/{good}.json" in keys
    assert set_objects(s3, bucket, failed_set) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert node.command("verify", good).returncode == 0


def test_missing_manifest_set_skipped(make_node: Any, s3: Any, bucket: str) -> None:
    node_a = node_with_data(make_node)
    backup_once(node_a)
    second = backup_once(node_a)
    sql(None, "insert into settings values ('only-in-third', 'x')")
    third = backup_once(node_a)
    s3.delete_object(Bucket=bucket, Key=f"dtr/test/manifests/{third}.json")
    assert set_objects(s3, bucket, third) != []
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    daemon = node_b.start()
    restore = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert restore["set_id"] == second
    assert sql(None, "select count(*) from settings where key = 'only-in-third'") == "0"


def poisoned_tar(outside: Path) -> bytes:
    """Build an archive whose second member writes through a symlink to /."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("escape")
        link.type = tarfile.SYMTYPE
        link.linkname = "/"
        tar.addfile(link)
        payload = b"overwritten by a poisoned archive\n"
        member = tarfile.TarInfo("escape/" + str(outside).lstrip("/"))
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["symlink", "dotdot"])
def test_poisoned_set_rejected(
    make_node: Any, moto_server: Any, s3: Any, bucket: str, tmp_path: Path, kind: str
) -> None:
    node_a = node_with_data(make_node)
    good = backup_once(node_a)
    node_a.destroy()
    canary = tmp_path / "canary.txt"
    canary.write_text("original\n")
    before = canary.stat()

    # A set identical to the good one but for a poisoned etc archive, with a matching sha256.
    repository = Repository(S3Settings(bucket=bucket, prefix="dtr/test", endpoint_url=moto_server.url))
    manifest = parse(s3.get_object(Bucket=bucket, Key=f"dtr/test/manifests/{good}.json")["Body"].read(), "m")
    poisoned_set = "29990101T000000Z-0badc0de"
    if kind == "symlink":
        data = poisoned_tar(canary)
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo("../canary.txt")
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
        data = buffer.getvalue()
    writer = repository.upload(poisoned_set, "etc-dtr.tar.zst", threading.Event())
    writer.write(data)
    size, sha256, raw_size = writer.finish()
    poisoned = {"key": writer.key, "size": size, "sha256": sha256, "raw_size": raw_size}
    artifacts = tuple(
        dataclasses.replace(a, **poisoned) if a.name == "etc-dtr.tar.zst" else a for a in manifest.artifacts
    )
    repository.put_manifest(dataclasses.replace(manifest, set_id=poisoned_set, artifacts=artifacts))

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    result = node_b.command("restore", poisoned_set)
    assert result.returncode == 1
    assert "archive member" in result.stderr
    assert canary.read_text() == "original\n"
    assert canary.stat().st_mtime_ns == before.st_mtime_ns
    assert not (node_b.etc.parent / "canary.txt").exists()


def test_unreachable_s3_retried_then_restores(make_node: Any, moto_server: Any) -> None:
    node_a = node_with_data(make_node)
    set_id = backup_once(node_a)
    node_a.destroy()

    relay = Relay(int(moto_server.url.rsplit(":", 1)[1]))
    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", s3_url=relay.url)
    daemon = node_b.start()
    try:
        retries = daemon.wait_for("retry", count=3)
        assert daemon.named("restore.start") == []
        assert daemon.named("backup.start") == []
        assert all(r["action"] == "first-boot decision" for r in retries)
        assert all(r["level"] == "warning" for r in retries)
        relay.up()
        restore = daemon.wait_for("restore.end")[0]
        daemon.wait_for("backup.end")
    finally:
        assert daemon.stop() == 0
        relay.down()
    assert restore["set_id"] == set_id


def test_sigterm_during_backup_leaves_nothing(make_node: Any, s3: Any, bucket: str) -> None:
    node = node_with_data(make_node, interval="1h")
    with open(node.var / "image-storage" / "local" / "large-layer", "wb") as handle:
        for _ in range(96):
            handle.write(os.urandom(1024 * 1024))
    daemon = node.start()
    daemon.wait_for("artifact.start", count=2)  # the var archive, with the large layer, is uploading
    assert daemon.stop() == 0
    assert daemon.named("backup.end") == []
    assert [e for e in daemon.events if e.get("level") == "error"] == []  # an abort on request is no error
    assert manifest_keys(s3, bucket) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_segmented_set_restores(make_node: Any, s3: Any, bucket: str) -> None:
    """An archive of over 45 MiB in 5 MiB parts is stored as one object a part, and a new node restores it whole."""
    node_a = node_with_data(make_node, s3_config="part_size_mb = 5")
    blobs = node_a.var / "image-storage" / "blobs"
    blobs.mkdir(parents=True)
    for index in range(3):
        (blobs / f"layer-{index}").write_bytes(os.urandom(15 * 1024 * 1024))  # random: stored as it is
    set_id = backup_once(node_a)
    manifest = parse(s3.get_object(Bucket=bucket, Key=f"dtr/test/manifests/{set_id}.json")["Body"].read(), "m")
    var = next(artifact for artifact in manifest.artifacts if artifact.name == "var-dtr.tar.zst")
    assert manifest.format == 2
    part = 5 * 1024 * 1024
    assert len(var.segments) == -(-var.size // part) >= 10
    assert [segment.key for segment in var.segments] == [var.key] + [
        f"{var.key}.{n}" for n in range(1, len(var.segments))
    ]
    assert {segment.key for segment in var.segments} <= set(set_objects(s3, bucket, set_id))
    files, tables = tree(node_a.var), table_contents()
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", s3_config="part_size_mb = 5")
    daemon = node_b.start()
    restore = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert restore["set_id"] == set_id
    assert tree(node_b.var) == files
    assert table_contents() == tables


def test_list_and_verify_commands(make_node: Any) -> None:
    node = node_with_data(make_node)
    first = backup_once(node)
    second = backup_once(node)
    listing = node.command("list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [row["set_id"] for row in rows] == [first, second]
    assert rows[-1]["dtr_version"] == "1.4.3"
    verify = node.command("verify")
    assert verify.returncode == 0, verify.stderr
    assert second in verify.stdout
    verified = [e for e in events_of(verify.stderr) if e["event"] == "artifact.verified"]
    assert len(verified) == 5
    status = node.command("status", "--json")
    assert json.loads(status.stdout)["last_backup"]["set_id"] == second


def copy_set(s3: Any, repository: Repository, set_id: str, new_id: str, change: Any) -> None:
    """Write set new_id as a copy of set_id; change(manifest, artifact, data) may alter each artifact."""
    manifest = parse(s3.get_object(Bucket=repository.bucket, Key=repository.manifest_key(set_id))["Body"].read(), "m")
    artifacts = []
    for artifact in manifest.artifacts:
        data = s3.get_object(Bucket=repository.bucket, Key=artifact.key)["Body"].read()
        data = change(artifact, data)
        key = repository.artifact_key(new_id, artifact.name)
        s3.put_object(Bucket=repository.bucket, Key=key, Body=data)
        artifacts.append(dataclasses.replace(artifact, key=key))
    repository.put_manifest(dataclasses.replace(manifest, set_id=new_id, artifacts=tuple(artifacts)))


def test_newer_postgres_dump_refused(make_node: Any, moto_server: Any, s3: Any, bucket: str) -> None:
    node = node_with_data(make_node)
    good = backup_once(node)
    repository = Repository(S3Settings(bucket=bucket, prefix="dtr/test", endpoint_url=moto_server.url))
    manifest = parse(s3.get_object(Bucket=bucket, Key=repository.manifest_key(good))["Body"].read(), "m")
    newer = dataclasses.replace(
        manifest, set_id="29990101T000000Z-0000000f", postgres_server_version="17.2", postgres_server_version_num=170002
    )
    repository.put_manifest(newer)
    sql(None, "insert into settings values ('live', 'row')")
    tables = table_contents()

    result = node.command("restore", newer.set_id, "--force")
    assert result.returncode == EXIT_REFUSED
    assert "Postgres 17.2" in result.stderr
    assert table_contents() == tables


def test_database_restore_all_or_nothing(make_node: Any, moto_server: Any, s3: Any, bucket: str) -> None:
    node = node_with_data(make_node)
    # Enough rows that the dump spans several download chunks, so pg_restore receives part of it.
    sql(None, "insert into tags (name, manifest) select 'bulk-' || g, to_jsonb(md5(g::text) || md5(random()::text))"
        " from generate_series(1, 150000) g", database="dtr")  # fmt: skip
    good = backup_once(node)
    original = table_contents()
    repository = Repository(S3Settings(bucket=bucket, prefix="dtr/test", endpoint_url=moto_server.url))

    def corrupt_database(artifact: Any, data: bytes) -> bytes:
        if artifact.name != "db-dtr.dump.zst":
            return data
        assert len(data) > 2 * 1024 * 1024, "the dump must span several download chunks"
        changed = bytearray(data)
        changed[-64] ^= 0xFF  # past the first chunks, so pg_restore has started before the check fails
        return bytes(changed)

    copy_set(s3, repository, good, "29990101T000000Z-000000aa", corrupt_database)
    sql(None, "insert into repositories (namespace, name) values ('marker', 'before-restore')", database="dtr")
    with_marker = table_contents()

    result = node.command("restore", "29990101T000000Z-000000aa", "--force")
    assert result.returncode == 1
    assert "db-dtr.dump.zst" in result.stderr
    assert table_contents() == with_marker  # the live database was not touched: the marker row is still there
    assert sql(None, "select count(*) from pg_database where datname like 'dtrguard%'") == "0"

    for _ in range(2):  # a second run gives the same rows, not duplicates
        result = node.command("restore", good, "--force")
        assert result.returncode == 0, result.stderr
        assert "database.swapped" in result.stderr  # restored beside the live database, then renamed
        assert table_contents() == original


def test_undroppable_old_database_only_warns(make_node: Any) -> None:
    """The data is in place once the databases are renamed, so failing to drop the one replaced is a warning."""
    node = node_with_data(make_node)
    good = backup_once(node)
    original = table_contents()
    sql(None, "insert into repositories (namespace, name) values ('marker', 'replaced')", database="dtr")
    sql(None, "alter database dtr is_template true")  # Postgres does not drop a template database

    result = node.command("restore", good, "--force")
    assert result.returncode == 0, result.stderr
    warnings = [e for e in events_of(result.stderr) if e["event"] == "database.old_not_dropped"]
    assert len(warnings) == 1
    old = warnings[0]["database"]
    assert old.startswith("dtrguard_old_")
    assert "template" in warnings[0]["error"]
    assert f"drop database {old}" in warnings[0]["hint"]
    assert table_contents() == original
    assert sql(None, f"select count(*) from pg_database where datname = '{old}'") == "1"

    sql(None, f"alter database {old} is_template false")
    result = node.command("restore", good, "--force")
    assert result.returncode == 0, result.stderr
    assert [e["databases"] for e in events_of(result.stderr) if e["event"] == "database.leftover_dropped"] == [[old]]
    assert sql(None, "select count(*) from pg_database where datname like 'dtrguard%'") == "0"


def test_marker_without_sets_never_empty(make_node: Any, s3: Any, bucket: str) -> None:
    node_a = node_with_data(make_node)
    backup_once(node_a)
    for key in manifest_keys(s3, bucket):  # the sets are gone, as after a wrong prefix or lost permissions
        s3.delete_object(Bucket=bucket, Key=key)
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    daemon = node_b.start()
    retries = daemon.wait_for("retry", count=2)
    assert daemon.stop() == 0
    assert all("no complete set can be read" in r["error"] for r in retries)
    assert daemon.named("node.empty") == []
    assert daemon.named("backup.start") == []
    assert daemon.named("restore.start") == []


def test_replaced_node_backup_refused(make_node: Any, moto_server: Any, s3: Any, bucket: str) -> None:
    node_a = node_with_data(make_node)
    daemon = node_a.start()
    daemon.wait_for("backup.end")
    # A replacement node restored and took the writer lease while node A still runs.
    repository = Repository(S3Settings(bucket=bucket, prefix="dtr/test", endpoint_url=moto_server.url))
    lease.take(repository, "i-0bbbbbbbbbbbbbbbb")
    keys_before = manifest_keys(s3, bucket)
    code = daemon.wait_exit()
    assert code == EXIT_REFUSED
    failure = daemon.named("command.failed")[0]
    assert "i-0bbbbbbbbbbbbbbbb holds the writer lease" in failure["error"]
    assert manifest_keys(s3, bucket) == keys_before
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # The refused set's artifacts were deleted too: every object under sets/ belongs to a manifest.
    complete = {key.rsplit("/", 1)[1].removesuffix(".json") for key in keys_before}
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="dtr/test/sets/").get("Contents", [])
    assert {item["Key"].split("/")[3] for item in listing} <= complete


@pytest.mark.parametrize("on_bad_set", ["stop", "restore_older"])
def test_changed_byte_refuses_set(make_node: Any, s3: Any, bucket: str, on_bad_set: str) -> None:
    node_a = node_with_data(make_node)
    older = backup_once(node_a)
    older_tables = table_contents()
    sql(None, "insert into settings values ('newer', 'set')")
    newer = backup_once(node_a)
    node_a.destroy()
    # One byte of the newer set's var-dtr archive changes in S3; its size stays the same.
    key = f"dtr/test/sets/{newer}/var-dtr.tar.zst"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", node_config=f'on_bad_set = "{on_bad_set}"')
    daemon = node_b.start()
    if on_bad_set == "stop":
        assert daemon.wait_exit() == EXIT_REFUSED
        failure = daemon.named("command.failed")[0]
        assert key in failure["error"]
        assert "sha256" in failure["error"]
        assert older in failure["hint"]
        assert daemon.named("restore.end") == []
        assert not any(node_b.etc.iterdir())
        assert not any(node_b.var.iterdir())
        status = json.loads(node_b.command("status", "--json").stdout)
        assert key in status["last_error"]
        return
    restored = daemon.wait_for("restore.end")[0]
    assert restored["set_id"] == older
    rejected = daemon.named("restore.set_rejected")
    assert [event["set_id"] for event in rejected] == [newer]
    assert key in rejected[0]["error"]
    assert table_contents() == older_tables
    assert daemon.stop() == 0


def test_set_without_dtr_version_refused_before_change(make_node: Any, moto_server: Any, s3: Any, bucket: str) -> None:
    node_a = node_with_data(make_node)
    good = backup_once(node_a)
    repository = Repository(S3Settings(bucket=bucket, prefix="dtr/test", endpoint_url=moto_server.url))
    manifest = parse(s3.get_object(Bucket=bucket, Key=repository.manifest_key(good))["Body"].read(), "m")
    unversioned = dataclasses.replace(manifest, set_id="29990101T000000Z-0000000d", dtr_version=None)
    repository.put_manifest(unversioned)
    node_a.destroy()

    # A node without DTR's containers would have to install DTR, with no version to pin it to.
    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    result = node_b.command("restore", unversioned.set_id)
    assert result.returncode == 1
    assert "records no DTR version" in result.stderr
    assert not node_b.etc.exists() or not any(node_b.etc.iterdir())
    assert not node_b.var.exists() or not any(node_b.var.iterdir())
