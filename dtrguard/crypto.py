"""Client-side envelope encryption of artifacts: one KMS data key per set, AES-256-GCM frames.

KMS generates each set's data key and returns it twice: in plaintext, which stays in memory,
and wrapped under the configured KMS key, which the manifest records. Only a caller allowed
kms:Decrypt on that key can unwrap it, so a reader of the bucket alone sees no license,
certificate, password hash or row.

An encrypted artifact is MAGIC followed by frames. A frame is one flag byte (0: more frames
follow, 1: the last frame) and the AES-GCM ciphertext of up to FRAME bytes of the zstd stream,
with its 16-byte tag. Every frame but the last holds exactly FRAME bytes. Each artifact gets
its own key, HKDF-SHA256 of the data key with the artifact's name, so the frame number can
serve as the nonce. The additional data binds the set id, the artifact name, the frame number
and the flag: frames cannot be reordered, moved to another artifact or set, or cut off after
any frame without the check failing.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dtrguard.config import S3Settings
from dtrguard.errors import IntegrityError, RepositoryUnavailable

SCHEME = "kms-aes-256-gcm-frames-1"
MAGIC = b"DTRGENC1"
FRAME = 1024 * 1024
TAG = 16
# The encryption context binds a wrapped key to its set: KMS rejects a Decrypt that names another set id.
CONTEXT_KEY = "dtrguard:set"


@dataclass(frozen=True)
class Envelope:
    """The encryption record of a manifest: the scheme, the KMS key and the wrapped data key."""

    scheme: str
    kms_key_id: str
    wrapped_key: str  # base64 of the KMS ciphertext blob

    def blob(self) -> bytes:
        return base64.b64decode(self.wrapped_key, validate=True)

    def validate(self) -> None:
        """Raise ValueError naming the field when the envelope cannot be used."""
        if self.scheme != SCHEME:
            raise ValueError(f"encryption scheme {self.scheme!r} (this dtrguard reads {SCHEME!r})")
        if not isinstance(self.kms_key_id, str) or not self.kms_key_id:
            raise ValueError(f"encryption kms_key_id {self.kms_key_id!r}")
        try:
            if not self.blob():
                raise ValueError("empty")
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"encryption wrapped_key {self.wrapped_key!r:.40} is not base64") from None


class DataKey:
    """A set's plaintext data key. It is never logged, printed or written anywhere."""

    def __init__(self, set_id: str, plaintext: bytes, envelope: Envelope):
        if len(plaintext) != 32:
            raise IntegrityError(f"the data key of set {set_id} has {len(plaintext)} bytes, expected 32")
        self.set_id = set_id
        self._plaintext = plaintext
        self.envelope = envelope

    def __repr__(self) -> str:
        return f"DataKey(set_id={self.set_id!r})"

    def cipher(self, artifact_name: str) -> AESGCM:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"dtrguard artifact " + artifact_name.encode()
        ).derive(self._plaintext)
        return AESGCM(derived)

    def encryptor(self, artifact_name: str) -> FrameEncryptor:
        return FrameEncryptor(self.cipher(artifact_name), self.set_id, artifact_name)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", index)


def _associated(set_id: str, name: str, index: int, last: bool) -> bytes:
    return f"{set_id}/{name}".encode() + struct.pack(">QB", index, int(last))


class FrameEncryptor:
    """Turns the zstd stream of one artifact into MAGIC and frames; update() returns what is ready."""

    def __init__(self, cipher: AESGCM, set_id: str, name: str):
        self.cipher = cipher
        self.set_id = set_id
        self.name = name
        self.buffer = bytearray()
        self.index = 0
        self.header = MAGIC

    def update(self, data: bytes) -> bytes:
        self.buffer += data
        out = bytearray(self._take_header())
        # A full frame is sent only once more bytes follow it, so the last frame is never empty but for an empty stream.
        while len(self.buffer) > FRAME:
            out += self._seal(bytes(self.buffer[:FRAME]), last=False)
            del self.buffer[:FRAME]
        return bytes(out)

    def finish(self) -> bytes:
        out = self._take_header() + self._seal(bytes(self.buffer), last=True)
        self.buffer = bytearray()
        return out

    def _take_header(self) -> bytes:
        header, self.header = self.header, b""
        return header

    def _seal(self, plaintext: bytes, last: bool) -> bytes:
        associated = _associated(self.set_id, self.name, self.index, last)
        sealed = bytes([int(last)]) + self.cipher.encrypt(_nonce(self.index), plaintext, associated)
        self.index += 1
        return sealed


class FrameDecryptor(io.RawIOBase):
    """Reads MAGIC and frames from source and returns the zstd stream, each frame checked before use."""

    def __init__(self, source: io.RawIOBase, key: DataKey, name: str, object_key: str):
        self.source = source
        self.cipher = key.cipher(name)
        self.set_id = key.set_id
        self.name = name
        self.object_key = object_key
        self.index = 0
        self.ready = memoryview(b"")
        self.done = False
        self.started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.ready and not self.done:
            self._next_frame()
        count = min(len(buffer), len(self.ready))
        buffer[:count] = self.ready[:count]
        self.ready = self.ready[count:]
        return count

    def _fail(self, problem: str) -> IntegrityError:
        return IntegrityError(
            f"encrypted artifact {self.object_key} {problem}",
            hint="the object was changed or truncated after the backup; restore another set",
        )

    def _read(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            data = self.source.read(count - len(chunks))
            if not data:
                break
            chunks += data
        return bytes(chunks)

    def _next_frame(self) -> None:
        if not self.started:
            if self._read(len(MAGIC)) != MAGIC:
                raise self._fail("does not start with dtrguard's encryption header")
            self.started = True
        flag = self._read(1)
        if not flag:
            raise self._fail(f"ends after frame {self.index} without its last frame")
        if flag[0] not in (0, 1):
            raise self._fail(f"has an invalid flag {flag[0]} at frame {self.index}")
        last = flag[0] == 1
        sealed = self._read(FRAME + TAG + (1 if last else 0))
        if (not last and len(sealed) != FRAME + TAG) or (last and not TAG <= len(sealed) <= FRAME + TAG):
            raise self._fail(f"has a frame {self.index} of {len(sealed)} bytes")
        associated = _associated(self.set_id, self.name, self.index, last)
        try:
            plaintext = self.cipher.decrypt(_nonce(self.index), sealed, associated)
        except InvalidTag:
            raise self._fail(f"fails its authentication check at frame {self.index}") from None
        self.index += 1
        self.ready = memoryview(plaintext)
        self.done = last


class KeyService:
    """Creates and unwraps data keys through KMS."""

    def __init__(self, settings: S3Settings):
        config = Config(
            region_name=settings.region,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
        )
        self.client = boto3.session.Session().client("kms", endpoint_url=settings.kms_endpoint_url, config=config)

    def new_data_key(self, kms_key_id: str, set_id: str) -> DataKey:
        try:
            response = self.client.generate_data_key(
                KeyId=kms_key_id, KeySpec="AES_256", EncryptionContext={CONTEXT_KEY: set_id}
            )
        except (ClientError, BotoCoreError) as exc:
            raise _kms_error(f"KMS GenerateDataKey with key {kms_key_id}", exc, kms_key_id) from None
        wrapped = base64.b64encode(response["CiphertextBlob"]).decode()
        return DataKey(set_id, response["Plaintext"], Envelope(SCHEME, kms_key_id, wrapped))

    def unwrap(self, set_id: str, envelope: Envelope) -> DataKey:
        try:
            response = self.client.decrypt(
                CiphertextBlob=envelope.blob(), KeyId=envelope.kms_key_id, EncryptionContext={CONTEXT_KEY: set_id}
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise IntegrityError(
                    f"KMS rejected the wrapped data key of set {set_id} ({code})",
                    hint="the manifest's encryption block was changed, or belongs to another set; restore another set",
                ) from None
            raise _kms_error(f"KMS Decrypt of the data key of set {set_id}", exc, envelope.kms_key_id) from None
        except BotoCoreError as exc:
            raise _kms_error(f"KMS Decrypt of the data key of set {set_id}", exc, envelope.kms_key_id) from None
        return DataKey(set_id, response["Plaintext"], envelope)


def _kms_error(action: str, exc: Exception, kms_key_id: str) -> RepositoryUnavailable:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        detail = f"KMS error {error.get('Code', 'unknown')}: {error.get('Message', '')}".strip()
    else:
        detail = f"{type(exc).__name__}: {exc}"
    return RepositoryUnavailable(
        f"{action} failed",
        detail=detail,
        hint=f"check that key {kms_key_id} exists and is enabled, that the instance may use it"
        " (kms:GenerateDataKey and kms:Decrypt), and [s3] kms_endpoint_url (the service retries by itself)",
    )
