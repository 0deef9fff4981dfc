"""Backup sets in S3, against moto's server over HTTP: streaming uploads, manifests, verified reads."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
import tracemalloc
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from dtrguard.config import S3Settings
from dtrguard.errors import Aborted, IntegrityError, RepositoryUnavailable
from dtrguard.manifest import Artifact, Manifest, Segment, format_of, new_set_id, parse, utc_now
from dtrguard.repository import Repository

MiB = 1024 * 1024


def make_repository(url: str, bucket: str, part_size: int = 5 * MiB, download_streams: int = 1) -> Repository:
    settings = S3Settings(
        bucket=bucket,
        prefix="test",
        endpoint_url=url,
        part_size=part_size,
        max_attempts=1,
        download_streams=download_streams,
    )
    return Repository(settings)


def upload(repository: Repository, set_id: str, name: str, data: bytes, chunk: int = MiB) -> Artifact:
    writer = repository.upload(set_id, name, threading.Event())
    view = memoryview(data)
    for offset in range(0, len(data), chunk):
        writer.write(view[offset : offset + chunk])
    size, sha256, raw_size = writer.finish()
    return Artifact(name, "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments)


def manifest_for(set_id: str, artifacts: list[Artifact], finished_at: str | None = None) -> Manifest:
    now = utc_now().isoformat()
    return Manifest(
        set_id=set_id,
        started_at=now,
        finished_at=finished_at or now,
        instance_id="i-test",
        dtrguard_version="0",
        artifacts=tuple(artifacts),
        containers=(),
        dtr_version="1.4.3",
        postgres_server_version="15.18",
        postgres_server_version_num=150018,
        dump_tool_version="pg_dump (PostgreSQL) 15.18",
        row_counts={"dtr": {"public.tags": 3}},
    )


def read_all(repository: Repository, artifact: Artifact) -> bytes:
    with repository.open(artifact) as stream:
        return stream.read()


def test_large_artifact_one_object_per_part(moto_server: Any, bucket: str, s3: Any) -> None:
    """Ten parts, ten objects: the first at the artifact's key, then key.1 to key.9, read back in order."""
    repository = make_repository(moto_server.url, bucket)
    data = os.urandom(48 * MiB)  # random data does not compress, so it spans ten 5 MiB parts
    set_id = new_set_id(utc_now())
    writer = repository.upload(set_id, "big.tar.zst", threading.Event())
    tracemalloc.start()
    for offset in range(0, len(data), MiB):
        writer.write(data[offset : offset + MiB])
    size, sha256, raw_size = writer.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert raw_size == len(data)
    # Two part buffers, one filling and one in flight, plus the 1 MiB written and its compressed
    # copy: 13.2 MiB traced. Joining each part from the compressor's pieces and sending it as bytes,
    # which botocore copies once more, took about four parts.
    assert peak < 3 * 5 * MiB
    keys = [writer.key] + [f"{writer.key}.{n}" for n in range(1, 10)]
    assert [segment.key for segment in writer.segments] == keys
    assert [segment.size for segment in writer.segments] == [5 * MiB] * 9 + [size - 45 * MiB]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"test/sets/{set_id}/")["Contents"]
    assert sorted((item["Key"], item["Size"]) for item in listed) == sorted((s.key, s.size) for s in writer.segments)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert writer.stored_keys() == keys
    artifact = Artifact("big.tar.zst", "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments)
    assert read_all(repository, artifact) == data


def test_part_size_doubles(moto_server: Any, bucket: str) -> None:
    """The part size doubles after every parts_per_size parts, and the objects read back whole."""
    repository = make_repository(moto_server.url, bucket)
    data = os.urandom(48 * MiB)
    writer = repository.upload(new_set_id(utc_now()), "growing.tar.zst", threading.Event())
    writer.parts_per_size = 2
    for offset in range(0, len(data), MiB):
        writer.write(data[offset : offset + MiB])
    size, sha256, raw_size = writer.finish()
    sizes = [segment.size for segment in writer.segments]
    assert sizes[:-1] == [5 * MiB, 5 * MiB, 10 * MiB, 10 * MiB]  # the last part contains what remained
    assert sum(sizes) == size
    artifact = Artifact(
        "growing.tar.zst", "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments
    )
    assert read_all(repository, artifact) == data


def test_ranged_download_reads_in_order(moto_server: Any, bucket: str, s3: Any) -> None:
    """download_streams > 1 reads by ranges in parallel, with the same bytes and the same checks."""
    repository = make_repository(moto_server.url, bucket, part_size=32 * MiB, download_streams=3)
    data = os.urandom(29 * MiB)  # one object, four 8 MiB ranges, the last one short
    artifact = upload(repository, new_set_id(utc_now()), "ranged.tar.zst", data)
    got = []
    with repository.open(artifact, on_bytes=got.append) as stream:
        assert stream.read() == data
    assert got == [8 * MiB, 8 * MiB, 8 * MiB, artifact.size - 24 * MiB]  # one chunk per range, in order

    stored = s3.get_object(Bucket=bucket, Key=artifact.key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=artifact.key, Body=stored + b"appended")
    with pytest.raises(IntegrityError, match="expected .* from its manifest"):
        read_all(repository, artifact)
    changed = bytearray(stored)
    changed[-100] ^= 1
    s3.put_object(Bucket=bucket, Key=artifact.key, Body=bytes(changed))
    with pytest.raises(IntegrityError, match="sha256"):
        read_all(repository, artifact)


def test_upload_small_artifact_single_put(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    artifact = upload(repository, new_set_id(utc_now()), "small", b"hello " * 100)
    assert artifact.segments == ()
    assert read_all(repository, artifact) == b"hello " * 100


def test_upload_cancel_names_stored_objects(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    cancel = threading.Event()
    writer = repository.upload(new_set_id(utc_now()), "cancelled", cancel)
    writer.write(os.urandom(11 * MiB))  # two parts sent
    cancel.set()
    with pytest.raises(Aborted):
        writer.write(b"more")
    writer.stop()
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(listed) == [writer.key, writer.key + ".1"]
    assert sorted(writer.stored_keys()) == sorted(listed)


@pytest.mark.parametrize(("size", "lost"), [(1000, 1), (12 * MiB, 1), (12 * MiB, 2)])
def test_lost_response_names_object_maybe_stored(moto_server: Any, bucket: str, s3: Any, size: int, lost: int) -> None:
    """S3 stored a part but its response was lost: the upload fails and names that part's key among its objects."""
    repository = make_repository(moto_server.url, bucket)
    calls: list[str] = []

    def lose_response(**kwargs: Any) -> None:
        calls.append(kwargs["model"].name)
        if len(calls) == lost:
            raise ConnectionClosedError(endpoint_url=moto_server.url)

    repository.client.meta.events.register("after-call.s3.PutObject", lose_response)
    writer = repository.upload(new_set_id(utc_now()), "lost", threading.Event())
    with pytest.raises(RepositoryUnavailable):
        for offset in range(0, size, MiB):
            writer.write(os.urandom(min(MiB, size - offset)))
        writer.finish()
    with contextlib.suppress(RepositoryUnavailable):
        writer.stop()
    lost_key = writer.key if lost == 1 else writer.key + ".1"
    assert s3.head_object(Bucket=bucket, Key=lost_key)["ContentLength"] > 0
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert lost_key in listed
    assert set(listed) <= set(writer.stored_keys())


def test_manifest_never_overwritten(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    set_id = new_set_id(utc_now())
    artifact = upload(repository, set_id, "a", b"data")
    repository.put_manifest(manifest_for(set_id, [artifact]))
    with pytest.raises(IntegrityError, match="already exists"):
        repository.put_manifest(manifest_for(set_id, [artifact]))


def test_latest_uses_manifest_timestamp(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    # The set id that sorts last has the older manifest timestamp.
    older, newer = "20991231T000000Z-ffffffff", "20000101T000000Z-00000000"
    for set_id, finished in ((older, "2026-01-01T00:00:00+00:00"), (newer, "2026-06-01T00:00:00+00:00")):
        repository.put_manifest(manifest_for(set_id, [upload(repository, set_id, "a", b"x")], finished))
    latest = repository.find("latest")
    assert latest is not None
    assert latest.set_id == newer


def test_set_without_manifest_is_invisible(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    upload(repository, new_set_id(utc_now()), "orphan", b"no manifest")
    assert repository.manifests() == []
    assert repository.find("latest") is None


def test_invalid_manifest_skipped_others_kept(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    set_id = new_set_id(utc_now())
    repository.put_manifest(manifest_for(set_id, [upload(repository, set_id, "a", b"x")]))
    s3.put_object(Bucket=bucket, Key=repository.manifest_key("20260101T000000Z-deadbeef"), Body=b"{not json")
    assert [m.set_id for m in repository.manifests()] == [set_id]


def test_changed_byte_fails_verify(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    artifact = upload(repository, new_set_id(utc_now()), "etc.tar.zst", os.urandom(300_000))
    body = bytearray(s3.get_object(Bucket=bucket, Key=artifact.key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=artifact.key, Body=bytes(body))
    with pytest.raises(IntegrityError, match="etc.tar.zst") as raised:
        repository.verify(artifact)
    assert "sha256" in str(raised.value)


def test_truncated_object_fails_verify(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    artifact = upload(repository, new_set_id(utc_now()), "db.dump.zst", os.urandom(300_000))
    body = s3.get_object(Bucket=bucket, Key=artifact.key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=artifact.key, Body=body[:-10])
    with pytest.raises(IntegrityError, match="from its manifest"):
        repository.verify(artifact)


def test_failed_check_withholds_stream_end(moto_server: Any, bucket: str, s3: Any) -> None:
    """A reader of a corrupted artifact never receives its last chunk, so it cannot act on a whole stream."""
    repository = make_repository(moto_server.url, bucket)
    data = os.urandom(3 * MiB)
    artifact = upload(repository, new_set_id(utc_now()), "held", data)
    body = bytearray(s3.get_object(Bucket=bucket, Key=artifact.key)["Body"].read())
    body[-100] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=artifact.key, Body=bytes(body))
    received = io.BytesIO()
    with pytest.raises(IntegrityError), repository.open(artifact) as stream:
        while chunk := stream.read(64 * 1024):
            received.write(chunk)
    assert len(received.getvalue()) < len(data)


def test_listing_unreachable_endpoint_raises(bucket: str) -> None:
    repository = make_repository("http://127.0.0.1:9", bucket)
    with pytest.raises(RepositoryUnavailable):
        repository.manifest_keys()


def test_manifest_parse_rejects_bad_fields() -> None:
    good = manifest_for("20260101T000000Z-00000000", [Artifact("a", "directory", "k", 1, "0" * 64, 1, "/x")])
    assert parse(good.to_json(), "k").set_id == good.set_id
    for broken in (b"[]", b"{}", good.to_json().replace(b'"directory"', b'"tape"')):
        with pytest.raises(IntegrityError, match="manifest k"):
            parse(broken, "k")


def segmented(artifact: Artifact, *segments: tuple[str, int], manifest_format: int = 2) -> Manifest:
    changed = dataclasses.replace(artifact, segments=tuple(Segment(key, size) for key, size in segments))
    return dataclasses.replace(manifest_for("20260101T000000Z-00000000", [changed]), format=manifest_format)


def test_manifest_round_trips_segments() -> None:
    artifact = Artifact("a", "directory", "k", 10, "0" * 64, 30, "/x")
    manifest = segmented(artifact, ("k", 6), ("k.1", 4))
    assert format_of(manifest.artifacts) == 2
    assert format_of((artifact,)) == 1
    assert parse(manifest.to_json(), "m") == manifest
    assert parse(manifest.to_json(), "m").artifacts[0].objects() == (Segment("k", 6), Segment("k.1", 4))
    assert artifact.objects() == (Segment("k", 10),)


@pytest.mark.parametrize(
    ("segments", "manifest_format", "message"),
    [
        ((("k", 6), ("k.1", 4)), 1, "segments in a format 1 manifest"),
        ((("other", 6), ("k.1", 4)), 2, "first segment that is not at its key"),
        ((("k", 6), ("elsewhere", 4)), 2, "segment 'elsewhere' outside"),
        ((("k", 6), ("k.1", 5)), 2, "do not add up to its size 10"),
        ((("k", 6), ("k.1", -4)), 2, "invalid size -4"),
        ((("k", 10), ("", 0)), 2, "invalid key ''"),
    ],
)
def test_manifest_rejects_bad_segments(segments: Any, manifest_format: int, message: str) -> None:
    artifact = Artifact("a", "directory", "k", 10, "0" * 64, 30, "/x")
    with pytest.raises(IntegrityError, match=re.escape(message)):
        parse(segmented(artifact, *segments, manifest_format=manifest_format).to_json(), "m")


def test_manifest_of_newer_format_rejected() -> None:
    manifest = dataclasses.replace(manifest_for("20260101T000000Z-00000000", []), format=3)
    with pytest.raises(IntegrityError, match=re.escape("format 3 (this dtrguard reads formats 1 and 2)")):
        parse(manifest.to_json(), "m")


@pytest.mark.parametrize("streams", [1, 3])
def test_segmented_artifact_reads_back(moto_server: Any, bucket: str, s3: Any, streams: int) -> None:
    """29 MiB of random data in 10 MiB parts goes up as three objects and reads back in order."""
    repository = make_repository(moto_server.url, bucket, part_size=10 * MiB, download_streams=streams)
    data = os.urandom(29 * MiB)
    artifact = upload(repository, new_set_id(utc_now()), "segmented.tar.zst", data)
    size = artifact.size
    keys = [artifact.key, artifact.key + ".1", artifact.key + ".2"]
    assert [segment.key for segment in artifact.segments] == keys
    assert [segment.size for segment in artifact.segments] == [10 * MiB, 10 * MiB, size - 20 * MiB]
    got: list[int] = []
    with repository.open(artifact, on_bytes=got.append) as stream:
        assert stream.read() == data
    if streams > 1:  # ranges do not cross from one object into the next
        assert got == [8 * MiB, 2 * MiB, 8 * MiB, 2 * MiB, 8 * MiB, size - 28 * MiB]

    stored = s3.get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    s3.put_object(Bucket=bucket, Key=keys[1], Body=stored[:-1])
    with pytest.raises(IntegrityError, match=re.escape(f"artifact {keys[1]} has {10 * MiB - 1} bytes, expected")):
        read_all(repository, artifact)
    s3.put_object(Bucket=bucket, Key=keys[1], Body=stored[:-1] + bytes([stored[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="sha256"):
        read_all(repository, artifact)


def test_failed_part_in_background_cleaned_up(moto_server: Any, bucket: str, s3: Any) -> None:
    """The second part's PUT, sent in the background, fails: the writer raises it and its objects can be deleted."""
    repository = make_repository(moto_server.url, bucket)
    calls: list[str] = []

    def fail_second(**kwargs: Any) -> None:
        calls.append(kwargs["params"]["url_path"])
        if len(calls) == 2:
            raise ConnectionClosedError(endpoint_url=moto_server.url)

    repository.client.meta.events.register("before-call.s3.PutObject", fail_second)
    writer = repository.upload(new_set_id(utc_now()), "segmented.tar.zst", threading.Event())
    data = os.urandom(24 * MiB)
    with pytest.raises(RepositoryUnavailable, match=re.escape(f"upload of {writer.key}.1")):
        for offset in range(0, len(data), MiB):
            writer.write(data[offset : offset + MiB])
        writer.finish()
    writer.stop()
    assert writer.stored_keys() == [writer.key, writer.key + ".1"]
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1
    for key in writer.stored_keys():
        s3.delete_object(Bucket=bucket, Key=key)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_bucket_warnings_name_missing_versioning(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    warnings = repository.bucket_warnings()
    assert warnings == [f"bucket {bucket} has no versioning, so a deleted or overwritten set is lost"]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    assert repository.bucket_warnings() == []


def test_marker_written_with_first_set(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    assert repository.has_marker() is False
    for _ in range(2):  # the second manifest leaves the existing marker as it is
        set_id = new_set_id(utc_now())
        repository.put_manifest(manifest_for(set_id, [upload(repository, set_id, "a", b"x")]))
    assert repository.has_marker() is True
