"""The writer lease: which instance may add backup sets, and in which epoch.

One object, `<prefix>/lease.json`, names the instance that may write and a number (the epoch)
that grows each time another instance takes over. Every change is a conditional write (ETag
If-Match, or If-None-Match: * for the first), so two nodes can never both believe they took it.
A node that restored, or that takes the very first backup, takes the lease. Each manifest records
its epoch, and sets are ordered by epoch before time, so a replaced node that still runs can
never write a set that becomes "latest", even in the moment before it learns it lost the lease.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from dtrguard import log
from dtrguard.errors import RefusedError
from dtrguard.manifest import utc_now
from dtrguard.repository import Repository, unavailable

_log = log.get("lease")


@dataclass(frozen=True)
class Lease:
    """The lease as read from S3, with the ETag a conditional write must match."""

    instance_id: str
    epoch: int
    etag: str | None  # None when no lease exists yet


def key(repository: Repository) -> str:
    return f"{repository.prefix}/lease.json"


def read(repository: Repository) -> Lease:
    """Read the lease; an absent lease reads as epoch 0 with no holder."""
    try:
        response = repository.client.get_object(Bucket=repository.bucket, Key=key(repository))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return Lease("", 0, None)
        raise unavailable(f"read of {key(repository)}", exc) from None
    except BotoCoreError as exc:
        raise unavailable(f"read of {key(repository)}", exc) from None
    try:
        document = json.loads(response["Body"].read())
        return Lease(str(document["instance_id"]), int(document["epoch"]), response["ETag"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RefusedError(
            f"lease {key(repository)} is invalid: {exc!r}",
            hint="delete the object; the next restore or backup on the right node writes a new one",
        ) from None


def _write(repository: Repository, instance_id: str, epoch: int, current: Lease) -> Lease:
    body = json.dumps({"instance_id": instance_id, "epoch": epoch, "renewed_at": utc_now().isoformat()}).encode()
    condition = {"IfMatch": current.etag} if current.etag else {"IfNoneMatch": "*"}
    try:
        response = repository.client.put_object(
            Bucket=repository.bucket, Key=key(repository), Body=body, **condition, **repository._encryption()
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise RefusedError(
                f"lease {key(repository)} changed while instance {instance_id} was writing it",
                hint="another node took over; this node must not back up. Check which node is current",
            ) from None
        raise unavailable(f"write of {key(repository)}", exc) from None
    except BotoCoreError as exc:
        raise unavailable(f"write of {key(repository)}", exc) from None
    return Lease(instance_id, epoch, response.get("ETag"))


def take(repository: Repository, instance_id: str) -> Lease:
    """Take the lease for this instance, in a new epoch unless it holds it already."""
    current = read(repository)
    if current.instance_id == instance_id:
        return _write(repository, instance_id, current.epoch, current)
    lease = _write(repository, instance_id, current.epoch + 1, current)
    _log.info("lease.taken", instance_id=instance_id, epoch=lease.epoch, previous=current.instance_id or None)
    return lease


def renew(repository: Repository, instance_id: str) -> Lease:
    """Renew the lease before a set is committed; raise RefusedError if another instance holds it."""
    current = read(repository)
    if current.etag is None:
        return take(repository, instance_id)
    if current.instance_id != instance_id:
        raise RefusedError(
            f"instance {current.instance_id} holds the writer lease (epoch {current.epoch}),"
            f" so this node ({instance_id}) no longer backs up",
            hint="this node was replaced; stop and terminate it. If it should be the writer, restore it"
            " with `dtrguard restore latest --force`, which takes the lease",
        )
    return _write(repository, instance_id, current.epoch, current)
