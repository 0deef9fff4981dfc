"""Backup sets in S3: layout, streaming uploads, verified downloads and listing.

Layout under the configured prefix:
    sets/<set id>/<artifact>       artifacts, each a zstd stream
    manifests/<set id>.json        written last with If-None-Match: *, so it is never replaced

A set exists only once its manifest does: listing reads manifests/ alone.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, cast

import boto3
import zstandard
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dtrguard import log
from dtrguard.config import S3Settings
from dtrguard.crypto import DataKey, FrameDecryptor, FrameEncryptor, KeyService
from dtrguard.errors import Aborted, IntegrityError, RepositoryUnavailable
from dtrguard.manifest import Artifact, Manifest, Segment, parse

_log = log.get("repository")


DOWNLOAD_CHUNK = 1024 * 1024
RANGE_SIZE = 8 * 1024 * 1024  # bytes per ranged GET when s3.download_streams is above 1
# On a 966 MB dump of the benchmark's DTR-like database, zstd level 2 gave 3.87:1 in 2.7 s of CPU.
# Level 3 gave 3.81:1 in 4.0 s, and level 1 3.61:1 in 2.1 s.
ZSTD_LEVEL = 2
# Each part of an artifact is an object of its own (see ArtifactUpload). The part size doubles after
# every PARTS_PER_SIZE parts, so memory stays at a few parts of the configured size for all but huge
# artifacts, and an artifact of 1 TiB is about 7,000 objects (at 8 MiB parts). S3 takes 5 GiB at most
# in one PutObject.
PARTS_PER_SIZE = 1000
MAX_PART = 5 * 1024**3


def make_client(settings: S3Settings) -> Any:
    """Build an S3 client with botocore's standard retries and the configured timeouts."""
    config = Config(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        max_pool_connections=max(10, settings.download_streams + 4),
        s3={"addressing_style": "path"} if settings.endpoint_url else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def unavailable(action: str, exc: Exception) -> RepositoryUnavailable:
    """Wrap a botocore error in RepositoryUnavailable with the error code and a hint."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "unknown")
        detail = f"S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}".strip()
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return RepositoryUnavailable(
        f"S3 {action} failed",
        detail=detail,
        hint="check the endpoint, the bucket name and the instance's credentials (the service retries by itself)",
    )


class Repository:
    """The backup sets under one bucket and prefix."""

    def __init__(self, settings: S3Settings, client: Any | None = None):
        self.settings = settings
        self.client = client or make_client(settings)
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self._keys: dict[str, DataKey] = {}
        # Manifests are never replaced (If-None-Match), so one read once stays valid. Keeping them
        # makes a run's requests independent of how many sets the repository holds, but for the listing.
        self._manifests: dict[str, Manifest] = {}
        self._key_service: KeyService | None = None

    def artifact_key(self, set_id: str, name: str) -> str:
        return f"{self.prefix}/sets/{set_id}/{name}"

    def manifest_key(self, set_id: str) -> str:
        return f"{self.prefix}/manifests/{set_id}.json"

    def _encryption(self) -> dict[str, str]:
        if not self.settings.kms_key_id:
            return {}
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.settings.kms_key_id}

    def upload(
        self, set_id: str, name: str, cancel: threading.Event, data_key: DataKey | None = None
    ) -> ArtifactUpload:
        """Start a streaming upload of one artifact; write raw bytes, then call finish().

        With data_key, the compressed stream is encrypted with it (see dtrguard.crypto).
        """
        encryptor = data_key.encryptor(name) if data_key is not None else None
        return ArtifactUpload(self, self.artifact_key(set_id, name), cancel, encryptor)

    def keys(self) -> KeyService:
        if self._key_service is None:
            self._key_service = KeyService(self.settings)
        return self._key_service

    def new_data_key(self, set_id: str) -> DataKey | None:
        """Return a fresh data key for a set when client-side encryption is configured, else None."""
        if not self.settings.envelope_kms_key_id:
            return None
        return self.keys().new_data_key(self.settings.envelope_kms_key_id, set_id)

    def data_key(self, manifest: Manifest) -> DataKey | None:
        """Return the data key that decrypts a set's artifacts, or None for a set stored unencrypted."""
        if manifest.encryption is None:
            return None
        if manifest.set_id not in self._keys:
            self._keys[manifest.set_id] = self.keys().unwrap(manifest.set_id, manifest.encryption)
        return self._keys[manifest.set_id]

    def marker_key(self) -> str:
        return f"{self.prefix}/repository.json"

    def exists(self, key: str) -> bool:
        """Report whether an object exists; raise RepositoryUnavailable when S3 cannot tell."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise unavailable(f"read of {key}", exc) from None
        except BotoCoreError as exc:
            raise unavailable(f"read of {key}", exc) from None
        return True

    def has_marker(self) -> bool:
        """Report whether a set was ever completed here."""
        return self.exists(self.marker_key())

    def put_marker(self, manifest: Manifest) -> None:
        """Record, once, that this repository has held a complete set (never replaced)."""
        body = json.dumps({"format": 1, "first_set": manifest.set_id, "instance_id": manifest.instance_id}).encode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.marker_key(), Body=body, IfNoneMatch="*", **self._encryption()
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise unavailable(f"write of {self.marker_key()}", exc) from None
        except BotoCoreError as exc:
            raise unavailable(f"write of {self.marker_key()}", exc) from None

    def put_manifest(self, manifest: Manifest) -> None:
        """Write the manifest, then the repository marker; fail if a manifest exists for the set id."""
        key = self.manifest_key(manifest.set_id)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=manifest.to_json(),
                ContentType="application/json",
                IfNoneMatch="*",
                **self._encryption(),
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise IntegrityError(f"manifest {key} already exists; it was not replaced") from None
            raise unavailable(f"write of {key}", exc) from None
        except BotoCoreError as exc:
            raise unavailable(f"write of {key}", exc) from None
        self._manifests[key] = manifest
        self.put_marker(manifest)

    def manifest_keys(self) -> list[str]:
        """List manifest keys; raise RepositoryUnavailable, never return [] on failure."""
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/manifests/"):
                keys.extend(item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(".json"))
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(f"listing of s3://{self.bucket}/{self.prefix}/manifests/", exc) from None
        return keys

    def read_manifest(self, key: str) -> Manifest:
        if key in self._manifests:
            return self._manifests[key]
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(f"read of {key}", exc) from None
        manifest = parse(body, key)
        if self.manifest_key(manifest.set_id) != key:
            raise IntegrityError(f"manifest {key} names set {manifest.set_id!r}", hint="delete or repair the object")
        self._manifests[key] = manifest
        return manifest

    def manifests(self) -> list[Manifest]:
        """Return every readable manifest, oldest first: by writer-lease epoch, then by the manifest's finish time.

        A manifest that fails validation is logged and left out, so one damaged set never
        hides the others.
        """
        found = []
        for key in self.manifest_keys():
            try:
                found.append(self.read_manifest(key))
            except IntegrityError as exc:
                _log.error("manifest.invalid", key=key, error=str(exc))
        return sorted(found, key=lambda m: (m.lease_epoch, m.finished, m.set_id))

    def find(self, set_ref: str) -> Manifest | None:
        """Return the manifest named by set_ref ("latest" or a set id), or None."""
        if set_ref == "latest":
            manifests = self.manifests()
            return manifests[-1] if manifests else None
        key = self.manifest_key(set_ref)
        return self.read_manifest(key) if self.exists(key) else None

    def open(
        self,
        artifact: Artifact,
        on_bytes: Callable[[int], None] | None = None,
        data_key: DataKey | None = None,
    ) -> io.BufferedReader:
        """Open an artifact for reading: decompressed bytes, checked against the manifest.

        on_bytes, if given, is called with the size of each stored chunk as it arrives. An
        encrypted set's artifacts need its data_key (see data_key()).
        """
        chunks: Iterator[bytes]
        if self.settings.download_streams > 1 and artifact.size > RANGE_SIZE:
            chunks = self._ranged_chunks(artifact)
        else:
            chunks = self._whole_chunks(artifact)
        source: io.RawIOBase = VerifiedStream(chunks, artifact, on_bytes)
        if data_key is not None:
            source = FrameDecryptor(source, data_key, artifact.name, artifact.key)
        reader = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], source), read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=DOWNLOAD_CHUNK)

    def _whole_chunks(self, artifact: Artifact) -> Iterator[bytes]:
        """Yield an artifact's bytes in order, one GET for each of its objects.

        The GET of the next object is sent while the current one's body is read, so a segmented
        artifact does not wait for the first byte of every object in turn. An object whose size
        differs from the manifest's fails before any of its bytes are passed on.
        """

        def get(segment: Segment) -> Any:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=segment.key)
            except (ClientError, BotoCoreError) as exc:
                raise unavailable(f"read of {segment.key}", exc) from None
            if response.get("ContentLength", segment.size) != segment.size:
                response["Body"].close()
                raise _wrong_size(segment, response["ContentLength"])
            return response["Body"]

        segments = artifact.objects()
        if len(segments) == 1:
            yield from get(segments[0]).iter_chunks(DOWNLOAD_CHUNK)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="download")
        following: Future[Any] | None = pool.submit(get, segments[0])
        try:
            for upcoming in [*segments[1:], None]:
                assert following is not None
                body = following.result()
                following = pool.submit(get, upcoming) if upcoming is not None else None
                try:
                    yield from body.iter_chunks(DOWNLOAD_CHUNK)
                finally:
                    body.close()
        finally:
            if following is not None:
                with contextlib.suppress(Exception):  # the reader stopped early or failed: drop the GET sent ahead
                    following.result().close()
            pool.shutdown(wait=True)

    def _ranged_chunks(self, artifact: Artifact) -> Iterator[bytes]:
        """Yield an artifact's bytes in order, fetched by download_streams ranged GETs at a time.

        Memory is about download_streams x RANGE_SIZE. An object whose size differs from the
        manifest's fails on its first range, before any of its bytes are passed on.
        """

        def fetch(segment: Segment, start: int) -> bytes:
            end = min(start + RANGE_SIZE, segment.size) - 1
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=segment.key, Range=f"bytes={start}-{end}")
                data: bytes = response["Body"].read()
            except (ClientError, BotoCoreError) as exc:
                raise unavailable(f"read of {segment.key}", exc) from None
            total = re.search(r"/(\d+)$", response.get("ContentRange") or "")
            if total is not None and int(total.group(1)) != segment.size:
                raise _wrong_size(segment, int(total.group(1)))
            return data

        starts = ((segment, start) for segment in artifact.objects() for start in range(0, segment.size, RANGE_SIZE))
        pool = ThreadPoolExecutor(max_workers=self.settings.download_streams, thread_name_prefix="download")
        in_flight: collections.deque[Future[bytes]] = collections.deque()
        try:
            for segment, start in starts:
                in_flight.append(pool.submit(fetch, segment, start))
                if len(in_flight) == self.settings.download_streams:
                    break
            while in_flight:
                data = in_flight.popleft().result()
                following = next(starts, None)
                if following is not None:
                    in_flight.append(pool.submit(fetch, *following))
                yield data
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)

    def verify(
        self,
        artifact: Artifact,
        cancel: threading.Event | None = None,
        on_bytes: Callable[[int], None] | None = None,
        data_key: DataKey | None = None,
    ) -> None:
        """Download an artifact whole and check its size, sha256, encryption frames and zstd framing."""
        with self.open(artifact, on_bytes, data_key) as reader:
            while reader.read(DOWNLOAD_CHUNK):
                if cancel is not None and cancel.is_set():
                    raise Aborted(f"verification of {artifact.key} stopped on request")

    def bucket_warnings(self) -> list[str]:
        """List what the bucket lacks that protects backups: versioning."""
        warnings = []
        try:
            versioning = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
            if versioning != "Enabled":
                warnings.append(f"bucket {self.bucket} has no versioning, so a deleted or overwritten set is lost")
        except (ClientError, BotoCoreError) as exc:
            warnings.append(
                f"the settings of bucket {self.bucket} could not be read: {unavailable('read', exc).detail}"
            )
        return warnings

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort a multipart upload; return False, after a warning, when S3 did not confirm it."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            _log.warning("upload.abort_failed", key=key, error=str(exc))
            return False
        return True


class ArtifactUpload:
    """A zstd-compressing, optionally encrypting, hashing upload fed by write(), one object per part.

    The stored stream is cut into parts of S3Settings.part_size bytes (doubled after every
    PARTS_PER_SIZE parts), and each part is an object of its own, put with one PutObject: the first
    at key, the next at key.1, key.2 and so on. These are the artifact's segments. One part goes up
    in a background thread while the next one fills, so compression and the upload overlap. The
    parts are two buffers, filled and sent in turn, so memory stays at two parts and is not
    allocated again for every part.

    Plain PUTs rather than a multipart upload: an interrupted upload leaves only objects that a
    listing shows, never parts that S3 keeps out of sight, and no server has to join the parts into
    one object. moto does that by copying every byte again. After a failure, or cancel being set,
    stored_keys() names every object that may exist, for the caller to delete.
    """

    def __init__(
        self, repository: Repository, key: str, cancel: threading.Event, encryptor: FrameEncryptor | None = None
    ):
        self.repository = repository
        self.client = repository.client
        self.key = key
        self.cancel = cancel
        self.part_size = repository.settings.part_size
        self.parts_per_size = PARTS_PER_SIZE
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self.encryptor = encryptor
        self.sha256 = hashlib.sha256()
        self.buffer: bytearray | None = None  # the part being filled, up to filled
        self.filled = 0
        self.spare: bytearray | None = None  # the buffer of the part sent last, to fill again
        self._sending: bytearray | None = None
        self.raw_size = 0
        self.size = 0
        self.sent: list[Segment] = []  # every part sent or being sent, as the object it goes to
        self.segments: tuple[Segment, ...] = ()  # set by finish() when there are two or more
        self._sender: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.cancel.is_set():
            raise Aborted(f"upload of {self.key} stopped on request")
        self.raw_size += len(data)
        self._push(self.compressor.compress(data))
        return len(data)

    def _push(self, compressed: bytes, last: bool = False) -> None:
        stored = compressed
        if self.encryptor is not None:
            stored = self.encryptor.update(compressed) + (self.encryptor.finish() if last else b"")
        if not stored:
            return
        self.sha256.update(stored)
        self.size += len(stored)
        view = memoryview(stored)
        while view:
            if self.buffer is None:
                self.buffer = self._empty_buffer()
            count = min(len(self.buffer) - self.filled, len(view))
            self.buffer[self.filled : self.filled + count] = view[:count]
            self.filled += count
            view = view[count:]
            if self.filled == len(self.buffer):
                part, self.buffer, self.filled = self.buffer, None, 0
                self._upload_part(part)

    def _empty_buffer(self) -> bytearray:
        """Return the spare buffer if it has the current part size, or a new one."""
        spare, self.spare = self.spare, None
        return spare if spare is not None and len(spare) == self.part_size else bytearray(self.part_size)

    def _upload_part(self, part: bytearray) -> None:
        """Wait for the part in flight, then send this one in the background as the next object."""
        self._wait_in_flight()
        key = f"{self.key}.{len(self.sent)}" if self.sent else self.key
        self.sent.append(Segment(key, len(part)))
        if len(self.sent) % self.parts_per_size == 0:
            self.part_size = min(self.part_size * 2, MAX_PART)
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._in_flight = self._sender.submit(self._put, key, part)
        self._sending = part

    def _put(self, key: str, part: bytearray) -> None:
        # A bytearray body is sent as it is, where botocore would first join a bytes body to the headers.
        try:
            self.client.put_object(Bucket=self.repository.bucket, Key=key, Body=part, **self.repository._encryption())
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(f"upload of {key}", exc) from None
        _log.debug("upload.part", key=key, bytes=len(part))

    def _wait_in_flight(self) -> None:
        """Raise the error of the part in flight, if it failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()
            self.spare, self._sending = self._sending, None

    def stored_keys(self) -> list[str]:
        """Return the keys that may hold an object of this artifact: to delete if its set fails.

        A part whose request failed is among them: S3 may have stored it and lost the response.
        """
        return [segment.key for segment in self.sent]

    def finish(self) -> tuple[int, str, int]:
        """Flush, send the last part and return (size, sha256, raw size)."""
        if self.cancel.is_set():
            raise Aborted(f"upload of {self.key} stopped on request")
        self._push(self.compressor.flush(), last=True)
        if self.filled or not self.sent:
            rest = self.buffer[: self.filled] if self.buffer is not None else bytearray()
            self.buffer, self.filled = None, 0
            self._upload_part(rest)
        self.stop()
        if len(self.sent) > 1:
            self.segments = tuple(self.sent)
        return self.size, self.sha256.hexdigest(), self.raw_size

    def stop(self) -> None:
        """Wait for the part in flight and raise its error, if it failed."""
        try:
            self._wait_in_flight()
        finally:
            if self._sender is not None:
                self._sender.shutdown(wait=True)
                self._sender = None


def _wrong_size(segment: Segment, size: int) -> IntegrityError:
    return IntegrityError(
        f"artifact {segment.key} has {size} bytes, expected {segment.size} from its manifest",
        hint="the object was changed after the backup; restore another set",
    )


class VerifiedStream(io.RawIOBase):
    """Raw bytes of an object, checked against the manifest's size and sha256.

    The newest chunk is held back until the next one arrives, and the last chunk is released
    only after the whole object matched. A reader such as pg_restore therefore never receives the
    end of a stream that failed its check, and fails on the truncated input instead.
    """

    def __init__(self, chunks: Iterator[bytes], artifact: Artifact, on_bytes: Callable[[int], None] | None = None):
        self.chunks = chunks
        self.artifact = artifact
        self.on_bytes = on_bytes
        self.sha256 = hashlib.sha256()
        self.received = 0
        self.held = b""
        self.ready = memoryview(b"")
        self.done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.ready and not self.done:
            self._advance()
        count = min(len(buffer), len(self.ready))
        buffer[:count] = self.ready[:count]
        self.ready = self.ready[count:]
        return count

    def _advance(self) -> None:
        try:
            chunk = next(self.chunks, None)
        except (BotoCoreError, OSError) as exc:
            raise unavailable(f"read of {self.artifact.key}", exc) from None
        if chunk is None:
            self._check_complete()
            self.ready, self.held, self.done = memoryview(self.held), b"", True
            return
        self.sha256.update(chunk)
        self.received += len(chunk)
        if self.on_bytes is not None:
            self.on_bytes(len(chunk))
        if self.received > self.artifact.size:
            raise IntegrityError(
                f"artifact {self.artifact.key} is larger than the {self.artifact.size} bytes its manifest records",
                hint="the object was changed after the backup; restore another set",
            )
        self.ready, self.held = memoryview(self.held), chunk

    def _check_complete(self) -> None:
        if self.received != self.artifact.size:
            raise IntegrityError(
                f"artifact {self.artifact.key} has {self.received} bytes,"
                f" expected {self.artifact.size} from its manifest",
                hint="the object was changed or truncated after the backup; restore another set",
            )
        if self.sha256.hexdigest() != self.artifact.sha256:
            raise IntegrityError(
                f"artifact {self.artifact.key} fails its sha256 check",
                detail=f"expected {self.artifact.sha256}, got {self.sha256.hexdigest()}",
                hint="the object was changed after the backup; restore another set",
            )
