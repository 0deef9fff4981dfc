"""Pruning: which sets to keep (grandfather-father-son), and the guards that keep good history.

Three rules protect the last good backup, whatever the windows select:
- the newest `keep_last` complete sets are never deleted;
- when the newest set's rows or directory bytes fell by more than `max_drop` against the set
  before it, nothing is pruned, because an emptied node must not push the good history out;
- a set's manifest is deleted before its artifacts, so an interrupted prune never leaves a
  manifest that points at missing objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from botocore.exceptions import BotoCoreError, ClientError

from dtrguard import log
from dtrguard.config import RetentionSettings
from dtrguard.manifest import Manifest
from dtrguard.repository import Repository, unavailable

_log = log.get("retention")


@dataclass
class PrunePlan:
    """The outcome of applying the policy: what stays, what goes, and why pruning may be skipped."""

    keep: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # set ids with artifacts but no manifest
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (key, upload id) of open multipart uploads
    skipped_reason: str | None = None


def select(manifests: list[Manifest], policy: RetentionSettings, now: datetime) -> set[str]:
    """Return the set ids to keep. manifests must be sorted oldest first."""
    keep = {m.set_id for m in manifests[-policy.keep_last :]}
    windows = (
        (policy.weekly_within, lambda t: t.isocalendar()[:2]),
        (policy.daily_within, lambda t: t.date()),
        (policy.hourly_within, lambda t: (t.date(), t.hour)),
    )
    for within, bucket in windows:
        newest_per_bucket: dict[object, str] = {}
        for manifest in manifests:  # oldest first, so the newest of each bucket wins
            if now - manifest.finished <= timedelta(seconds=within):
                newest_per_bucket[bucket(manifest.finished)] = manifest.set_id
        keep.update(newest_per_bucket.values())
    keep.update(m.set_id for m in manifests if now - m.finished <= timedelta(seconds=policy.keep_all_within))
    return keep


def anomaly(manifests: list[Manifest], policy: RetentionSettings) -> str | None:
    """Describe a fall in rows or directory bytes from the previous set to the newest, if too large."""
    if len(manifests) < 2:
        return None
    previous, newest = manifests[-2], manifests[-1]
    checks = (
        ("rows", previous.total_rows(), newest.total_rows()),
        ("directory bytes", _directory_bytes(previous), _directory_bytes(newest)),
    )
    for what, before, after in checks:
        if before > 0 and (before - after) / before > policy.max_drop:
            return (
                f"{what} fell from {before} in set {previous.set_id} to {after} in set {newest.set_id},"
                f" more than the allowed {policy.max_drop:.0%}"
            )
    return None


def _directory_bytes(manifest: Manifest) -> int:
    return sum(a.raw_size for a in manifest.artifacts if a.kind == "directory")


def plan(repository: Repository, policy: RetentionSettings, now: datetime) -> PrunePlan:
    """Work out what a prune would delete, reading S3 but changing nothing."""
    manifests = repository.manifests()
    result = PrunePlan()
    keep = select(manifests, policy, now)
    result.keep = [m.set_id for m in manifests if m.set_id in keep]
    result.skipped_reason = anomaly(manifests, policy)
    if result.skipped_reason is None:
        result.delete = [m.set_id for m in manifests if m.set_id not in keep]
    complete = {m.set_id for m in manifests}
    cutoff = now - timedelta(seconds=policy.orphan_grace)
    result.orphans = [s for s in _artifact_set_ids(repository) if s not in complete and _started(s) < cutoff]
    result.uploads = [(key, upload_id) for key, upload_id, started in _open_uploads(repository) if started < cutoff]
    return result


def apply(repository: Repository, pruning: PrunePlan) -> None:
    """Delete what the plan lists: old sets (manifest first), orphaned artifacts, stale uploads."""
    if pruning.skipped_reason:
        _log.error("prune.skipped", reason=pruning.skipped_reason, kept=len(pruning.keep))
    for set_id in pruning.delete:
        _delete_keys(repository, [repository.manifest_key(set_id)])
        _delete_keys(repository, _set_keys(repository, set_id))
        _log.info("prune.deleted", set_id=set_id)
    for set_id in pruning.orphans:
        _delete_keys(repository, _set_keys(repository, set_id))
        _log.info("prune.orphan_deleted", set_id=set_id)
    for key, upload_id in pruning.uploads:
        repository.abort_upload(key, upload_id)
        _log.info("prune.upload_aborted", key=key)


def _started(set_id: str) -> datetime:
    """Return the UTC time a set id starts with (20261204T170102Z-...); the epoch for other forms."""
    try:
        return datetime.strptime(set_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def _artifact_set_ids(repository: Repository) -> list[str]:
    prefix = f"{repository.prefix}/sets/"
    found: list[str] = []
    try:
        paginator = repository.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=repository.bucket, Prefix=prefix, Delimiter="/"):
            found.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    except (ClientError, BotoCoreError) as exc:
        raise unavailable(f"listing of s3://{repository.bucket}/{prefix}", exc) from None
    return found


def _set_keys(repository: Repository, set_id: str) -> list[str]:
    prefix = f"{repository.prefix}/sets/{set_id}/"
    keys: list[str] = []
    try:
        paginator = repository.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=repository.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
    except (ClientError, BotoCoreError) as exc:
        raise unavailable(f"listing of s3://{repository.bucket}/{prefix}", exc) from None
    return keys


def _open_uploads(repository: Repository) -> list[tuple[str, str, datetime]]:
    uploads: list[tuple[str, str, datetime]] = []
    try:
        paginator = repository.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=repository.bucket, Prefix=f"{repository.prefix}/"):
            uploads.extend((u["Key"], u["UploadId"], u["Initiated"]) for u in page.get("Uploads", []))
    except (ClientError, BotoCoreError) as exc:
        raise unavailable(f"listing of multipart uploads in s3://{repository.bucket}", exc) from None
    return uploads


def _delete_keys(repository: Repository, keys: Iterable[str]) -> None:
    batch = [{"Key": key} for key in keys]
    for start in range(0, len(batch), 1000):  # DeleteObjects takes at most 1,000 keys
        try:
            response = repository.client.delete_objects(
                Bucket=repository.bucket, Delete={"Objects": batch[start : start + 1000], "Quiet": True}
            )
        except (ClientError, BotoCoreError) as exc:
            raise unavailable(f"deletion in s3://{repository.bucket}", exc) from None
        for error in response.get("Errors", []):
            _log.error("prune.delete_failed", key=error.get("Key"), error=error.get("Message"))
