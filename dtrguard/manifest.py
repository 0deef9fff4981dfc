"""The manifest: the record that makes a backup set exist.

It is written last, after every artifact is uploaded, and lists each artifact's key, size and
sha256 so that a restore can prove it got the bytes the backup wrote. An artifact larger than one
upload part is stored as several objects, its segments (one a part), which are read one after the
other. A manifest that lists segments has format 2, so dtrguard versions that know only format 1
refuse it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from dtrguard.crypto import Envelope
from dtrguard.errors import IntegrityError

FORMAT = 1
SEGMENTED_FORMAT = 2  # some artifact lists segments
KINDS = ("directory", "globals", "database")


def new_set_id(now: datetime) -> str:
    """Return a set id that sorts by time: 20261204T170102Z-3f9a1c2e."""
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Segment:
    """One object holding a stretch of a segmented artifact's stored bytes."""

    key: str
    size: int


@dataclass(frozen=True)
class Artifact:
    """One artifact of a set: a directory archive, the roles, or one database dump.

    Its stored bytes are the object at key, or, when segments is not empty, the segments in
    order, the first of them at key. size and sha256 cover all of the stored bytes.
    """

    name: str
    kind: str
    key: str
    size: int
    sha256: str
    raw_size: int
    source: str  # the directory path, or the database name; empty for globals
    owner: str = ""  # the database's owner role; empty for other kinds
    compression: str = "zstd"
    segments: tuple[Segment, ...] = ()

    def objects(self) -> tuple[Segment, ...]:
        """Return the objects that hold the stored bytes, in order."""
        return self.segments or (Segment(self.key, self.size),)


@dataclass(frozen=True)
class Container:
    """A DTR container as it ran when the set was taken."""

    name: str
    image: str
    version: str


@dataclass(frozen=True)
class Manifest:
    """Everything needed to trust and restore one backup set."""

    set_id: str
    started_at: str
    finished_at: str
    instance_id: str
    dtrguard_version: str
    artifacts: tuple[Artifact, ...]
    containers: tuple[Container, ...]
    dtr_version: str | None
    postgres_server_version: str
    postgres_server_version_num: int
    dump_tool_version: str
    row_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    lease_epoch: int = 0  # the writer lease's epoch when the set was committed; orders sets before time
    encryption: Envelope | None = None  # set when the artifacts are encrypted client-side
    format: int = FORMAT

    @property
    def finished(self) -> datetime:
        return datetime.fromisoformat(self.finished_at)

    @property
    def postgres_major(self) -> int:
        return major_key(self.postgres_server_version_num)

    def total_rows(self) -> int:
        return sum(sum(tables.values()) for tables in self.row_counts.values())

    def total_size(self) -> int:
        return sum(artifact.size for artifact in self.artifacts)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()


def major_key(version_num: int) -> int:
    """Return a number that orders Postgres majors: 90401 (9.4) gives 904, 150018 (15) gives 1500."""
    return version_num // 10000 * 100 if version_num >= 100000 else version_num // 100


def parse(data: bytes, key: str) -> Manifest:
    """Parse and validate a manifest read from key; raise IntegrityError naming the bad field."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"manifest {key} is not valid JSON: {exc}", hint="delete or repair the object") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"manifest {key} is not a JSON object", hint="delete or repair the object")
    try:
        if doc.get("format") not in (FORMAT, SEGMENTED_FORMAT):
            raise ValueError(
                f"format {doc.get('format')!r} (this dtrguard reads formats {FORMAT} and {SEGMENTED_FORMAT})"
            )
        artifacts = tuple(_artifact(item) for item in doc["artifacts"])
        if doc["format"] == FORMAT and any(artifact.segments for artifact in artifacts):
            raise ValueError(f"segments in a format {FORMAT} manifest")
        containers = tuple(Container(**_fields(item, Container)) for item in doc["containers"])
        manifest = Manifest(
            **{k: doc[k] for k in _SCALARS},
            dtr_version=doc.get("dtr_version"),
            artifacts=artifacts,
            containers=containers,
            row_counts=_row_counts(doc["row_counts"]),
            lease_epoch=int(doc.get("lease_epoch", 0)),
            encryption=_envelope(doc.get("encryption")),
            format=doc["format"],
        )
        manifest.finished  # noqa: B018 - validates the timestamp
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(
            f"manifest {key} is invalid: {exc!r}", hint="delete or repair the object; other sets stay usable"
        ) from None
    if not artifacts:
        raise IntegrityError(f"manifest {key} lists no artifacts", hint="delete the object")
    return manifest


_SCALARS = (
    "set_id", "started_at", "finished_at", "instance_id", "dtrguard_version",
    "postgres_server_version", "postgres_server_version_num", "dump_tool_version",
)  # fmt: skip


def _fields(item: Any, cls: type) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise TypeError(f"{cls.__name__} entry is not an object: {item!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in item.items() if k in names}


def format_of(artifacts: tuple[Artifact, ...]) -> int:
    """Return the manifest format that artifacts need: the first one unless some are segmented."""
    return SEGMENTED_FORMAT if any(artifact.segments for artifact in artifacts) else FORMAT


def _artifact(item: Any) -> Artifact:
    fields = _fields(item, Artifact)
    fields["segments"] = tuple(_segment(value) for value in fields.get("segments") or ())
    artifact = Artifact(**fields)
    if artifact.kind not in KINDS:
        raise ValueError(f"artifact {artifact.name!r} has unknown kind {artifact.kind!r}")
    if not isinstance(artifact.size, int) or artifact.size < 0:
        raise ValueError(f"artifact {artifact.name!r} has invalid size {artifact.size!r}")
    if not isinstance(artifact.sha256, str) or len(artifact.sha256) != 64:
        raise ValueError(f"artifact {artifact.name!r} has invalid sha256 {artifact.sha256!r}")
    if artifact.segments:
        if artifact.segments[0].key != artifact.key:
            raise ValueError(f"artifact {artifact.name!r} has a first segment that is not at its key {artifact.key!r}")
        # Segments stay beside the artifact's key, under the set's prefix, so pruning the set removes them.
        outside = [s.key for s in artifact.segments[1:] if not s.key.startswith(artifact.key + ".")]
        if outside:
            raise ValueError(f"artifact {artifact.name!r} has a segment {outside[0]!r} outside {artifact.key!r}.*")
        if sum(s.size for s in artifact.segments) != artifact.size:
            raise ValueError(f"artifact {artifact.name!r} has segments that do not add up to its size {artifact.size}")
    return artifact


def _segment(value: Any) -> Segment:
    segment = Segment(**_fields(value, Segment))
    if not isinstance(segment.key, str) or not segment.key:
        raise ValueError(f"segment has invalid key {segment.key!r}")
    if not isinstance(segment.size, int) or segment.size < 0:
        raise ValueError(f"segment {segment.key!r} has invalid size {segment.size!r}")
    return segment


def _envelope(value: Any) -> Envelope | None:
    if value is None:
        return None
    envelope = Envelope(**_fields(value, Envelope))
    envelope.validate()
    return envelope


def _row_counts(value: Any) -> dict[str, dict[str, int]]:
    if not isinstance(value, dict):
        raise TypeError("row_counts is not an object")
    return {str(db): {str(t): int(n) for t, n in tables.items()} for db, tables in value.items()}
