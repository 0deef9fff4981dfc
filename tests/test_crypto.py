"""Client-side envelope encryption, against the KMS and S3 APIs of moto's server over HTTP."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import threading
from typing import Any

import boto3
import pytest

from dtrguard.config import S3Settings
from dtrguard.crypto import FRAME, MAGIC, TAG, DataKey, Envelope, FrameDecryptor
from dtrguard.errors import IntegrityError, RepositoryUnavailable
from dtrguard.manifest import Artifact, new_set_id, parse, utc_now
from dtrguard.repository import Repository

from test_repository import manifest_for

MiB = 1024 * 1024
# Text that a directory archive of a DTR node contains and that must never be readable in the bucket.
SECRET_TEXT = b"-----BEGIN RSA PRIVATE KEY----- license key_id k-8f3e2a"


@pytest.fixture
def kms_key(moto_server: Any) -> str:
    kms = boto3.client("kms", endpoint_url=moto_server.url, region_name="us-east-1")
    return str(kms.create_key(Description="dtrguard test")["KeyMetadata"]["KeyId"])


def encrypted_repository(url: str, bucket: str, key_id: str, download_streams: int = 1) -> Repository:
    settings = S3Settings(
        bucket=bucket,
        prefix="test",
        endpoint_url=url,
        part_size=5 * MiB,
        max_attempts=1,
        envelope_kms_key_id=key_id,
        kms_endpoint_url=url,
        download_streams=download_streams,
    )
    return Repository(settings)


def sample(size: int) -> bytes:
    """Half random, half repeated text with the secret in it, so zstd has work and the secret recurs."""
    return (os.urandom(size // 2) + SECRET_TEXT * (size // 2 // len(SECRET_TEXT) + 1))[:size]


def put(repository: Repository, key: DataKey, name: str, data: bytes) -> Artifact:
    writer = repository.upload(key.set_id, name, threading.Event(), key)
    for offset in range(0, len(data), MiB):
        writer.write(data[offset : offset + MiB])
    size, sha256, raw_size = writer.finish()
    return Artifact(name, "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments)


def stored(s3: Any, bucket: str, artifact: Artifact) -> bytes:
    return bytes(s3.get_object(Bucket=bucket, Key=artifact.key)["Body"].read())


def rewrite(s3: Any, bucket: str, artifact: Artifact, data: bytes) -> Artifact:
    """Replace an object and make the manifest's size and sha256 match, as someone with write access could."""
    import hashlib

    s3.put_object(Bucket=bucket, Key=artifact.key, Body=data)
    return dataclasses.replace(artifact, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def decrypt_all(repository: Repository, artifact: Artifact, key: DataKey) -> bytes:
    with repository.open(artifact, data_key=key) as stream:
        return stream.read()


@pytest.mark.parametrize("size", [0, 1000, FRAME, 3 * MiB + 17])
def test_round_trip_hides_plaintext(moto_server: Any, bucket: str, s3: Any, kms_key: str, size: int) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    set_id = new_set_id(utc_now())
    key = repository.new_data_key(set_id)
    assert key is not None
    data = sample(size)
    artifact = put(repository, key, "etc-dtr.tar.zst", data)

    body = stored(s3, bucket, artifact)
    assert body.startswith(MAGIC)
    assert SECRET_TEXT[:24] not in body
    assert decrypt_all(repository, artifact, key) == data
    # A second reader unwraps the key from the manifest through KMS, as a replacement node does.
    manifest = parse(manifest_for(set_id, [artifact]).to_json(), "m")
    manifest = dataclasses.replace(manifest, encryption=key.envelope)
    reread = parse(manifest.to_json(), "m")
    fresh = encrypted_repository(moto_server.url, bucket, kms_key)
    assert decrypt_all(fresh, artifact, fresh.data_key(reread)) == data  # type: ignore[arg-type]


def test_ranged_read_decrypts(moto_server: Any, bucket: str, kms_key: str) -> None:
    """Ranges of 8 MiB cut across the 1 MiB frames; the frames still decrypt and check in order."""
    writer = encrypted_repository(moto_server.url, bucket, kms_key)
    key = writer.new_data_key(new_set_id(utc_now()))
    assert key is not None
    data = os.urandom(19 * MiB + 5)
    artifact = put(writer, key, "var-dtr.tar.zst", data)
    reader = encrypted_repository(moto_server.url, bucket, kms_key, download_streams=3)
    assert decrypt_all(reader, artifact, key) == data


def test_data_key_is_never_printed(moto_server: Any, bucket: str, kms_key: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    key = repository.new_data_key("20261204T000000Z-00000001")
    assert key is not None
    plaintext = key._plaintext
    for text in (repr(key), str(key), repr(key.envelope)):
        assert plaintext.hex() not in text
        assert base64.b64encode(plaintext).decode() not in text


def frames_of(body: bytes) -> list[bytes]:
    """Split a stored object into its frames (flag byte included)."""
    frames, offset = [], len(MAGIC)
    while offset < len(body):
        length = 1 + (FRAME + TAG if body[offset] == 0 else len(body) - offset - 1)
        frames.append(body[offset : offset + length])
        offset += length
    return frames


@pytest.mark.parametrize("change", ["flip", "drop_last", "swap", "reflag", "header"])
def test_tampered_object_refused(moto_server: Any, bucket: str, s3: Any, kms_key: str, change: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    key = repository.new_data_key(new_set_id(utc_now()))
    assert key is not None
    artifact = put(repository, key, "db-dtr.dump.zst", os.urandom(3 * FRAME + 100))
    body = stored(s3, bucket, artifact)
    frames = frames_of(body)
    assert len(frames) == 4
    if change == "flip":
        changed = bytearray(body)
        changed[len(MAGIC) + FRAME // 2] ^= 0x01
        data = bytes(changed)
    elif change == "drop_last":
        data = MAGIC + b"".join(frames[:-1])
    elif change == "swap":
        data = MAGIC + frames[1] + frames[0] + b"".join(frames[2:])
    elif change == "reflag":  # the third frame claims to be the last, cutting the stream there
        data = MAGIC + frames[0] + frames[1] + b"\x01" + frames[2][1:]
    else:
        data = b"X" + body[1:]
    # The manifest is made to match, so only the encryption can tell.
    forged = rewrite(s3, bucket, artifact, data)
    with pytest.raises(IntegrityError) as failure:
        decrypt_all(repository, forged, key)
    assert forged.key in failure.value.message


def test_artifact_moved_to_other_name_refused(moto_server: Any, bucket: str, s3: Any, kms_key: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    key = repository.new_data_key(new_set_id(utc_now()))
    assert key is not None
    source = put(repository, key, "etc-dtr.tar.zst", b"certificate bytes")
    target = put(repository, key, "var-dtr.tar.zst", b"blob bytes")
    moved = rewrite(s3, bucket, target, stored(s3, bucket, source))
    with pytest.raises(IntegrityError, match="authentication check at frame 0"):
        decrypt_all(repository, moved, key)


def test_wrapped_key_of_other_set_refused(moto_server: Any, bucket: str, kms_key: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    key_a = repository.new_data_key("20261204T000000Z-0000000a")
    assert key_a is not None
    artifact = put(repository, key_a, "etc-dtr.tar.zst", b"x" * 100)
    # Set b's manifest carries set a's wrapped key: KMS's encryption context ties the key to set a.
    manifest = dataclasses.replace(manifest_for("20261204T000000Z-0000000b", [artifact]), encryption=key_a.envelope)
    with pytest.raises(IntegrityError, match="KMS rejected the wrapped data key of set 20261204T000000Z-0000000b"):
        encrypted_repository(moto_server.url, bucket, kms_key).data_key(manifest)


def test_unencrypted_set_needs_no_key(moto_server: Any, bucket: str, kms_key: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, kms_key)
    assert repository.data_key(manifest_for("20261204T000000Z-0000000c", [])) is None


def test_missing_kms_key_named(moto_server: Any, bucket: str) -> None:
    repository = encrypted_repository(moto_server.url, bucket, "alias/dtrguard-missing")
    with pytest.raises(RepositoryUnavailable) as failure:
        repository.new_data_key("20261204T000000Z-0000000d")
    assert "key alias/dtrguard-missing" in str(failure.value)
    assert "NotFoundException" in str(failure.value)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("scheme", "rot13", "scheme"), ("wrapped_key", "not base64!", "wrapped_key"), ("kms_key_id", "", "kms_key_id")],
)
def test_manifest_with_bad_envelope_rejected(field: str, value: str, named: str) -> None:
    envelope = Envelope("kms-aes-256-gcm-frames-1", "key-1", base64.b64encode(b"blob").decode())
    manifest = dataclasses.replace(
        manifest_for("20261204T000000Z-0000000e", [Artifact("a", "directory", "k", 1, "0" * 64, 1, "/x")]),
        encryption=dataclasses.replace(envelope, **{field: value}),
    )
    with pytest.raises(IntegrityError, match=named):
        parse(manifest.to_json(), "manifests/x.json")


def test_decryptor_rejects_trailing_bytes() -> None:
    key = DataKey("20261204T000000Z-0000000f", bytes(32), Envelope("s", "k", "YQ=="))
    data = key.encryptor("a").finish() + b"extra"
    reader = FrameDecryptor(io.BytesIO(data), key, "a", "sets/x/a")  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="sets/x/a"):
        reader.read()


def test_sse_kms_requested_for_every_object(moto_server: Any, bucket: str, s3: Any, kms_key: str) -> None:
    settings = S3Settings(
        bucket=bucket,
        prefix="test",
        endpoint_url=moto_server.url,
        max_attempts=1,
        kms_key_id=kms_key,
        part_size=5 * MiB,
    )
    repository = Repository(settings)
    set_id = new_set_id(utc_now())
    small = put_plain(repository, set_id, "small", b"x" * 100)
    large = put_plain(repository, set_id, "large", os.urandom(6 * MiB))
    repository.put_manifest(manifest_for(set_id, [small, large]))
    keys = [small.key, large.key, repository.manifest_key(set_id), repository.marker_key()]
    for key in keys:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"].endswith(kms_key), key


def put_plain(repository: Repository, set_id: str, name: str, data: bytes) -> Artifact:
    writer = repository.upload(set_id, name, threading.Event())
    writer.write(data)
    size, sha256, raw_size = writer.finish()
    return Artifact(name, "directory", writer.key, size, sha256, raw_size, "/x", segments=writer.segments)


def with_kms(node: Any, url: str, key_id: str | None) -> None:
    """Add client-side encryption keys to a test node's [s3] table."""
    lines = f'kms_endpoint_url = "{url}"\n' + (f'envelope_kms_key_id = "{key_id}"\n' if key_id else "")
    text = node.config_path.read_text()
    assert "max_attempts = 2\n" in text
    node.config_path.write_text(text.replace("max_attempts = 2\n", "max_attempts = 2\n" + lines, 1))


@pytest.mark.docker
def test_encrypted_set_restores_on_replacement(
    make_node: Any, moto_server: Any, s3: Any, bucket: str, kms_key: str
) -> None:
    from dtrnode import table_contents, tree

    node_a = make_node("i-0aaaaaaaaaaaaaaaa")
    with_kms(node_a, moto_server.url, kms_key)
    node_a.install()
    node_a.seed()
    result = node_a.command("backup")
    assert result.returncode == 0, result.stderr
    set_id = result.stdout.strip()
    manifest = parse(s3.get_object(Bucket=bucket, Key=f"dtr/test/manifests/{set_id}.json")["Body"].read(), "m")
    assert manifest.encryption is not None and manifest.encryption.kms_key_id == kms_key
    for artifact in manifest.artifacts:
        body = stored(s3, bucket, artifact)
        assert body.startswith(MAGIC), artifact.name
        for text in (b"BEGIN CERTIFICATE", b"k-123", b"dtr.example.com", b"dtr_app"):
            assert text not in body, (artifact.name, text)
    etc_before, var_before, tables_before = tree(node_a.etc), tree(node_a.var), table_contents()
    node_a.destroy()

    # Node B's config names no envelope key: the set's manifest records how to decrypt it.
    node_b = make_node("i-0bbbbbbbbbbbbbbbb")
    with_kms(node_b, moto_server.url, None)
    daemon = node_b.start()
    restored = daemon.wait_for("restore.end")[0]
    assert daemon.stop() == 0
    assert restored["set_id"] == set_id
    assert tree(node_b.etc) == etc_before
    assert tree(node_b.var) == var_before
    assert table_contents() == tables_before
    # The data key itself never appears in what dtrguard printed.
    kms = boto3.client("kms", endpoint_url=moto_server.url, region_name="us-east-1")
    assert manifest.encryption is not None
    plaintext = kms.decrypt(CiphertextBlob=manifest.encryption.blob(), EncryptionContext={"dtrguard:set": set_id})[
        "Plaintext"
    ]
    output = result.stdout + result.stderr + daemon.dump()
    assert plaintext.hex() not in output
    assert base64.b64encode(plaintext).decode() not in output
