"""Pruning: which sets to keep (grandfather-father-son), and the guards that keep good history.

Three rules protect the last good backup, whatever the windows select:
- the newest `keep_last` complete sets are never deleted;
- when the newest set's rows or directory bytes fell by more than `max_drop` against the set
  before it or against any set about to be deleted, nothing is pruned, because an emptied node
  must not push the good history out. An operator who knows the drop is real runs
  `dtrguard prune --accept-drop`, which records the newest set in `<prefix>/accepted-drop.json`:
  sets older than that one no longer count against later ones;
- a set's manifest is deleted before its artifacts, so an interrupted prune never leaves a
  manifest that points at missing objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
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
    accept: str | None = None  # the set to record as the accepted level before deleting


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


def anomaly(
    manifests: list[Manifest],
    policy: RetentionSettings,
    deleting: Sequence[Manifest] = (),
    accepted: str | None = None,
) -> str | None:
    """Describe a fall in rows or directory bytes to the newest set, if too large.

    The newest set is compared with the set before it and with every set about to be deleted,
    so a node that stays empty keeps pruning stopped at every backup, not only the first one
    after the drop. Sets older than the accepted one (set ids sort by time) are not compared.
    """
    if len(manifests) < 2:
        return None
    newest = manifests[-1]
    worst: tuple[float, str] | None = None
    earlier_sets = [manifests[-2], *(m for m in deleting if m.set_id != newest.set_id)]
    for earlier in (m for m in earlier_sets if accepted is None or m.set_id >= accepted):
        checks = (
            ("rows", earlier.total_rows(), newest.total_rows()),
            ("directory bytes", _directory_bytes(earlier), _directory_bytes(newest)),
        )
        for what, before, after in checks:
            drop = (before - after) / before if before > 0 else 0.0
            if drop > policy.max_drop and (worst is None or drop > worst[0]):
                worst = (
                    drop,
                    f"{what} fell from {before} in set {earlier.set_id} to {after} in set {newest.set_id},"
                    f" more than the allowed {policy.max_drop:.0%}; if the drop is intended,"
                    " run `dtrguard prune --accept-drop`",
                )
    return worst[1] if worst else None


def _directory_bytes(manifest: Manifest) -> int:
    return sum(a.raw_size for a in manifest.artifacts if a.kind == "directory")


def plan(repository: Repository, policy: RetentionSettings, now: datetime, accept_drop: bool = False) -> PrunePlan:
    """Work out what a prune would delete, reading S3 but changing nothing.

    accept_drop takes the newest set's level as intended, so apply() records it and prunes.
    """
    manifests = repository.manifests()
    result = PrunePlan()
    accepted = read_accepted(repository)
    if accept_drop and manifests:
        result.accept = accepted = manifests[-1].set_id
    keep = select(manifests, policy, now)
    result.keep = [m.set_id for m in manifests if m.set_id in keep]
    deleting = [m for m in manifests if m.set_id not in keep]
    result.skipped_reason = anomaly(manifests, policy, deleting, accepted)
    if result.skipped_reason is None:
        result.delete = [m.set_id for m in deleting]
    complete = {m.set_id for m in manifests}
    cutoff = now - timedelta(seconds=policy.orphan_grace)
    result.orphans = [s for s in _artifact_set_ids(repository) if s not in complete and _started(s) < cutoff]
    result.uploads = [(key, upload_id) for key, upload_id, started in _open_uploads(repository) if started < cutoff]
    return result


def apply(repository: Repository, pruning: PrunePlan) -> None:
    """Delete what the plan lists: old sets (manifest first), orphaned artifacts, stale uploads."""
    if pruning.skipped_reason:
        _log.error("prune.skipped", reason=pruning.skipped_reason, kept=len(pruning.keep))
    if pruning.accept:
        _write_accepted(repository, pruning.accept)
        _log.warning("prune.drop_accepted", set_id=pruning.accept)
    for set_id in pruning.delete:
        _delete_keys(repository, [repository.manifest_key(set_id)])
        _delete_keys(repository, _set_keys(repository, set_id))
        _log.info("prune.deleted", set_id=set_id)
    for set_id in pruning.orphans:
        _delete_keys(repository, _set_keys(repository, set_id))
        _log.info("prune.orphan_deleted", set_id=set_id)
    for key, upload_id in pruning.uploads:
        if repository.abort_upload(key, upload_id):
            _log.info("prune.upload_aborted", key=key)


def _accepted_key(repository: Repository) -> str:
    return f"{repository.prefix}/accepted-drop.json"


def read_accepted(repository: Repository) -> str | None:
    """Return the set id an operator accepted as the new level after a drop, or None."""
    key = _accepted_key(repository)
    try:
        body = repository.client.get_object(Bucket=repository.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return None
        raise unavailable(f"read of {key}", exc) from None
    except BotoCoreError as exc:
        raise unavailable(f"read of {key}", exc) from None
    try:
        set_id = json.loads(body)["set_id"]
    except (ValueError, KeyError, TypeError):
        _log.error("prune.accepted_invalid", key=key, error="not a JSON object with a set_id")
        return None  # the guard then compares with every set, the safe side
    return str(set_id)


def _write_accepted(repository: Repository, set_id: str) -> None:
    key = _accepted_key(repository)
    body = json.dumps({"format": 1, "set_id": set_id, "accepted_at": datetime.now(UTC).isoformat()}).encode()
    try:
        repository.client.put_object(Bucket=repository.bucket, Key=key, Body=body, **repository._encryption())
    except (ClientError, BotoCoreError) as exc:
        raise unavailable(f"write of {key}", exc) from None


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
