"""Retention: the grandfather-father-son windows, the floors that keep good history, and pruning in S3."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from dtrguard.config import RetentionSettings
from dtrguard.manifest import Artifact, Manifest
from dtrguard.repository import Repository
from dtrguard.retention import anomaly, apply, plan, select

from test_repository import make_repository, manifest_for, upload

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
POLICY = RetentionSettings()


def at(age: timedelta, rows: int = 100, directory_bytes: int = 1000) -> Manifest:
    finished = NOW - age
    set_id = finished.strftime("%Y%m%dT%H%M%SZ") + "-00000000"
    artifact = Artifact("etc.tar.zst", "directory", f"k/{set_id}", 10, "0" * 64, directory_bytes, "/etc/x")
    manifest = manifest_for(set_id, [artifact], finished.isoformat())
    return dataclasses.replace(manifest, row_counts={"dtr": {"public.tags": rows}})


def every(step: timedelta, count: int) -> list[Manifest]:
    return sorted((at(step * i) for i in range(count)), key=lambda m: m.finished)


def test_keeps_everything_from_last_day() -> None:
    manifests = every(timedelta(minutes=15), 96)  # one day at the default interval
    assert select(manifests, POLICY, NOW) == {m.set_id for m in manifests}


def test_one_per_hour_for_a_week() -> None:
    manifests = every(timedelta(minutes=15), 4 * 24 * 7)
    kept = [m for m in manifests if m.set_id in select(manifests, POLICY, NOW)]
    older_than_a_day = [m for m in kept if NOW - m.finished > timedelta(days=1)]
    hours = {(m.finished.date(), m.finished.hour) for m in older_than_a_day}
    assert len(hours) == len(older_than_a_day)  # one set per hour
    assert len(older_than_a_day) >= 24 * 6 - 1


def test_weekly_window_ends_at_twelve_weeks() -> None:
    manifests = every(timedelta(days=1), 120)
    kept = select(manifests, POLICY, NOW)
    oldest_kept = min(m.finished for m in manifests if m.set_id in kept)
    assert NOW - oldest_kept <= timedelta(weeks=12)
    assert NOW - oldest_kept > timedelta(weeks=11)


def test_newest_sets_kept_whatever_age() -> None:
    manifests = every(timedelta(days=400), 5)  # all far outside every window
    kept = select(manifests, POLICY, NOW)
    assert kept == {m.set_id for m in manifests[-3:]}


def test_row_drop_is_anomaly() -> None:
    manifests = [at(timedelta(hours=2), rows=1000), at(timedelta(hours=1), rows=0)]
    reason = anomaly(manifests, POLICY)
    assert reason is not None
    assert manifests[0].set_id in reason
    assert manifests[1].set_id in reason


def test_directory_drop_is_anomaly() -> None:
    manifests = [at(timedelta(hours=2), directory_bytes=10**9), at(timedelta(hours=1), directory_bytes=10**6)]
    assert anomaly(manifests, POLICY) is not None


def test_small_change_is_not_anomaly() -> None:
    manifests = [at(timedelta(hours=2), rows=1000), at(timedelta(hours=1), rows=900)]
    assert anomaly(manifests, POLICY) is None


def put_set(repository: Repository, manifest: Manifest) -> None:
    artifact = upload(repository, manifest.set_id, "etc.tar.zst", b"x" * 100)
    artifact = dataclasses.replace(artifact, raw_size=manifest.artifacts[0].raw_size)
    repository.put_manifest(dataclasses.replace(manifest, artifacts=(artifact,)))


def keys(s3: Any, bucket: str) -> set[str]:
    return {item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_prune_deletes_old_sets(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    old = [at(timedelta(days=200 + i)) for i in range(3)]
    recent = [at(timedelta(hours=i)) for i in range(4)]
    for manifest in old + recent:
        put_set(repository, manifest)
    pruning = plan(repository, POLICY, NOW)
    assert sorted(pruning.delete) == sorted(m.set_id for m in old)
    apply(repository, pruning)
    remaining = keys(s3, bucket)
    for manifest in old:
        assert repository.manifest_key(manifest.set_id) not in remaining
        assert not any(f"/sets/{manifest.set_id}/" in key for key in remaining)
    assert [m.set_id for m in repository.manifests()] == [m.set_id for m in sorted(recent, key=lambda m: m.finished)]


def test_prune_skipped_after_emptied_node(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    old = [at(timedelta(days=200 + i)) for i in range(3)]
    good = at(timedelta(hours=2), rows=5000)
    empty = at(timedelta(hours=1), rows=0, directory_bytes=0)
    for manifest in [*old, good, empty]:
        put_set(repository, manifest)
    pruning = plan(repository, POLICY, NOW)
    assert pruning.skipped_reason is not None
    assert pruning.delete == []
    apply(repository, pruning)
    assert len(repository.manifests()) == 5


def test_prune_removes_orphans_after_grace(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    put_set(repository, at(timedelta(hours=1)))
    stale = (NOW - timedelta(days=2)).strftime("%Y%m%dT%H%M%SZ") + "-0bad0bad"
    fresh = (NOW - timedelta(minutes=5)).strftime("%Y%m%dT%H%M%SZ") + "-00f00f00"
    upload(repository, stale, "etc.tar.zst", b"orphan")
    upload(repository, fresh, "etc.tar.zst", b"maybe still uploading")
    pruning = plan(repository, POLICY, NOW)
    assert pruning.orphans == [stale]
    apply(repository, pruning)
    remaining = keys(s3, bucket)
    assert repository.artifact_key(stale, "etc.tar.zst") not in remaining
    assert repository.artifact_key(fresh, "etc.tar.zst") in remaining


def test_prune_aborts_stale_uploads(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    # dtrguard starts no multipart uploads, but another writer under the prefix may leave one.
    key = repository.artifact_key("20261201T000000Z-0000aaaa", "big")
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(5 * 1024 * 1024))
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    later = datetime.now(UTC) + timedelta(days=2)
    apply(repository, plan(repository, POLICY, later))
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_guard_holds_while_node_stays_empty(moto_server: Any, bucket: str) -> None:
    """Two empty sets in a row: the newest matches the one before it, but not the good sets due to go."""
    repository = make_repository(moto_server.url, bucket)
    good = [at(timedelta(days=200 + i), rows=5000) for i in range(3)]
    empty = [at(timedelta(hours=2), rows=0, directory_bytes=0), at(timedelta(hours=1), rows=0, directory_bytes=0)]
    for manifest in [*good, *empty]:
        put_set(repository, manifest)
    pruning = plan(repository, POLICY, NOW)
    assert pruning.delete == []
    assert pruning.skipped_reason is not None
    assert "rows fell from 5000" in pruning.skipped_reason
    assert "--accept-drop" in pruning.skipped_reason
    assert any(m.set_id in pruning.skipped_reason for m in good)


def test_accepted_drop_lets_pruning_resume(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    good = [at(timedelta(days=200 + i), rows=5000) for i in range(3)]
    small = [at(timedelta(hours=3), rows=1000), at(timedelta(hours=2), rows=1000)]
    for manifest in [*good, *small]:
        put_set(repository, manifest)
    assert plan(repository, POLICY, NOW).skipped_reason is not None

    dry = plan(repository, POLICY, NOW, accept_drop=True)
    assert dry.accept == small[-1].set_id
    assert sorted(dry.delete) == sorted(m.set_id for m in good[1:])  # good[0] is among the newest three
    assert "test/accepted-drop.json" not in keys(s3, bucket)  # a plan alone changes nothing
    apply(repository, dry)
    assert "test/accepted-drop.json" in keys(s3, bucket)

    # Later sets are compared with the accepted one and those after it: a new drop stops pruning again.
    put_set(repository, at(timedelta(hours=1), rows=0, directory_bytes=0))
    later = plan(repository, POLICY, NOW)
    assert later.skipped_reason is not None and "rows fell from 1000" in later.skipped_reason
