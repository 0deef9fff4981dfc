"""Backup sets in S3, against moto's server over HTTP: streaming uploads, manifests, verified reads."""

from __future__ import annotations

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
from dtrguard.repository import SEGMENT_PARTS, Repository

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


def upload(
    repository: Repository, set_id: str, name: str, data: bytes, chunk: int = MiB, segment_parts: int = SEGMENT_PARTS
) -> Artifact:
    writer = repository.upload(set_id, name, threading.Event())
    writer.segment_parts = segment_parts
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


def test_upload_large_artifact_multipart(moto_server: Any, bucket: str, s3: Any) -> None:
    """Ten parts: the object at the key takes the first eight, a second segment the other two."""
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
    assert len(writer.part_sizes) == 10
    assert raw_size == len(data)
    # Two part buffers, one filling and one in flight, plus the 1 MiB written and its compressed
    # copy: 13.2 MiB traced. Joining each part from the compressor's pieces and sending it as bytes,
    # which botocore copies once more, took about four parts.
    assert peak < 3 * 5 * MiB
    assert [segment.key for segment in writer.segments] == [writer.key, writer.key + ".1"]
    assert [segment.size for segment in writer.segments] == [8 * 5 * MiB, size - 8 * 5 * MiB]
    for segment in writer.segments:
        assert s3.head_object(Bucket=bucket, Key=segment.key)["ContentLength"] == segment.size
    artifact = Artifact("big.tar.zst", "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments)
    assert read_all(repository, artifact) == data


def test_part_size_doubles(moto_server: Any, bucket: str) -> None:
    """S3 takes 10,000 parts at most, so the part size grows. The object reads back whole."""
    repository = make_repository(moto_server.url, bucket)
    data = os.urandom(48 * MiB)
    writer = repository.upload(new_set_id(utc_now()), "growing.tar.zst", threading.Event())
    writer.parts_per_size = 2
    for offset in range(0, len(data), MiB):
        writer.write(data[offset : offset + MiB])
    size, sha256, raw_size = writer.finish()
    full = writer.part_sizes[:-1]  # the last part contains what remained
    assert full == [5 * MiB, 5 * MiB, 10 * MiB, 10 * MiB, 20 * MiB][: len(full)]
    assert sum(writer.part_sizes) == size
    artifact = Artifact("growing.tar.zst", "directory", writer.key, size, sha256, raw_size, "/x")
    assert read_all(repository, artifact) == data


def test_ranged_download_reads_in_order(moto_server: Any, bucket: str, s3: Any) -> None:
    """download_streams > 1 reads by ranges in parallel, with the same bytes and the same checks."""
    repository = make_repository(moto_server.url, bucket, download_streams=3)
    data = os.urandom(29 * MiB)  # four 8 MiB ranges, the last one short
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
    assert read_all(repository, artifact) == b"hello " * 100


def test_upload_cancel_aborts_multipart(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    cancel = threading.Event()
    writer = repository.upload(new_set_id(utc_now()), "cancelled", cancel)
    writer.write(os.urandom(6 * MiB))
    assert writer.upload_id is not None
    cancel.set()
    with pytest.raises(Aborted):
        writer.write(b"more")
    writer.abort()
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize(("operation", "size"), [("PutObject", 1000), ("CompleteMultipartUpload", 6 * MiB)])
def test_lost_response_marks_object_maybe_stored(
    moto_server: Any, bucket: str, s3: Any, operation: str, size: int
) -> None:
    """S3 stored the object but its response was lost: the upload fails and reports that the key may exist."""
    repository = make_repository(moto_server.url, bucket)

    def lose_response(**kwargs: Any) -> None:
        raise ConnectionClosedError(endpoint_url=moto_server.url)

    repository.client.meta.events.register(f"after-call.s3.{operation}", lose_response)
    writer = repository.upload(new_set_id(utc_now()), "lost", threading.Event())
    writer.write(os.urandom(size))
    assert not writer.may_exist
    with pytest.raises(RepositoryUnavailable):
        writer.finish()
    assert writer.may_exist
    assert s3.head_object(Bucket=bucket, Key=writer.key)["ContentLength"] > 0


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
    """Two parts a segment: 29 MiB of random data goes up as three objects and reads back in order."""
    repository = make_repository(moto_server.url, bucket, download_streams=streams)
    data = os.urandom(29 * MiB)
    artifact = upload(repository, new_set_id(utc_now()), "segmented.tar.zst", data, segment_parts=2)
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
    s3.put_object(Bucket=bucket, Key=keys[1], Body=stored[:-1] + b"x")
    with pytest.raises(IntegrityError, match="sha256"):
        read_all(repository, artifact)


def test_failed_segment_completion_cleaned_up(moto_server: Any, bucket: str, s3: Any) -> None:
    """The first segment's completion, in the background, fails: the writer raises it and nothing stays in S3."""
    repository = make_repository(moto_server.url, bucket)
    failures = []

    def lose_first(**kwargs: Any) -> None:
        if not failures:
            failures.append(kwargs["params"]["url_path"])
            raise ConnectionClosedError(endpoint_url=moto_server.url)

    repository.client.meta.events.register("before-call.s3.CompleteMultipartUpload", lose_first)
    writer = repository.upload(new_set_id(utc_now()), "segmented.tar.zst", threading.Event())
    writer.segment_parts = 2
    data = os.urandom(24 * MiB)
    with pytest.raises(RepositoryUnavailable, match=re.escape(writer.key)):
        for offset in range(0, len(data), MiB):
            writer.write(data[offset : offset + MiB])
        writer.finish()
    assert len(failures) == 1
    assert writer.abort() == []
    for key in writer.stored_keys():
        s3.delete_object(Bucket=bucket, Key=key)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_bucket_warnings_name_missing_protections(moto_server: Any, bucket: str, s3: Any) -> None:
    repository = make_repository(moto_server.url, bucket)
    warnings = repository.bucket_warnings()
    assert any("no versioning" in w for w in warnings)
    assert any("incomplete multipart uploads" in w for w in warnings)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_lifecycle_configuration(
        Bucket=bucket,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "abort",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
    )
    assert repository.bucket_warnings() == []


def test_marker_written_with_first_set(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    assert repository.has_marker() is False
    for _ in range(2):  # the second manifest leaves the existing marker as it is
        set_id = new_set_id(utc_now())
        repository.put_manifest(manifest_for(set_id, [upload(repository, set_id, "a", b"x")]))
    assert repository.has_marker() is True
