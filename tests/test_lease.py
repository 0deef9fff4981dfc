"""The writer lease in S3: taken with conditional writes, renewed by its holder, refused to others."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dtrguard import lease
from dtrguard.errors import RefusedError
from dtrguard.manifest import new_set_id, utc_now

from test_repository import make_repository, manifest_for, upload


def test_first_take_starts_epoch_one(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    held = lease.take(repository, "i-a")
    assert held.epoch == 1
    assert lease.read(repository).instance_id == "i-a"


def test_takeover_raises_epoch(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    lease.take(repository, "i-a")
    held = lease.take(repository, "i-b")
    assert held.epoch == 2
    assert lease.renew(repository, "i-b").epoch == 2


def test_replaced_holder_cannot_renew(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    lease.take(repository, "i-a")
    lease.take(repository, "i-b")
    with pytest.raises(RefusedError, match="i-b holds the writer lease"):
        lease.renew(repository, "i-a")


def test_stale_etag_write_rejected(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    lease.take(repository, "i-a")
    stale = lease.read(repository)
    lease.take(repository, "i-b")  # changes the object, so the ETag read above no longer matches
    with pytest.raises(RefusedError, match="changed while"):
        lease._write(repository, "i-a", stale.epoch + 1, stale)


def test_newer_epoch_outranks_later_time(moto_server: Any, bucket: str) -> None:
    repository = make_repository(moto_server.url, bucket)
    newer_epoch = new_set_id(utc_now())
    late_old_epoch = new_set_id(utc_now())
    manifest = manifest_for(newer_epoch, [upload(repository, newer_epoch, "a", b"x")], "2026-01-01T00:00:00+00:00")
    repository.put_manifest(dataclasses.replace(manifest, lease_epoch=2))
    # A replaced node (epoch 1) commits a set after the takeover: it must not become latest.
    manifest = manifest_for(
        late_old_epoch, [upload(repository, late_old_epoch, "a", b"x")], "2026-06-01T00:00:00+00:00"
    )
    repository.put_manifest(dataclasses.replace(manifest, lease_epoch=1))
    latest = repository.find("latest")
    assert latest is not None
    assert latest.set_id == newer_epoch
