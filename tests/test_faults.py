"""Faults from the failure matrix, each against real S3 (moto), Postgres and Docker.

S3 stops during an upload, S3 accepts connections and never responds, the metadata service drops
its first connections, and role credentials expire within minutes. Each fault must end with the
right behaviour, nothing lost, and one clear log event.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dtrguard import config
from dtrguard.errors import ConfigError

from dtrnode import DtrNode, backup_once, manifest_keys, node_with_data, set_objects, sql, table_contents
from servers import MetadataStub, MotoServer, Relay

pytestmark = pytest.mark.docker

PART = "part_size_mb = 5\n"
# Environment variables through which botocore could find credentials other than the instance role's.
OTHER_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)  # fmt: skip


def fill_database(rows: int) -> None:
    """Add rows of random text (1 KiB each) to the dtr database, so its dump spans several 5 MiB parts."""
    sql(None, "create table layers (id serial primary key, body text)", database="dtr")
    sql(
        None,
        "insert into layers (body) select (select string_agg(md5(random()::text || g || i), '')"
        f" from generate_series(1, 32) i) from generate_series(1, {rows}) g",
        database="dtr",
    )


def open_uploads(s3: Any, bucket: str) -> list[tuple[str, str]]:
    return [(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def wait_for_upload(s3: Any, bucket: str, artifact: str, daemon: Any, timeout: float = 120) -> str:
    """Wait until the daemon's first run has stored the first object of artifact, and return its key."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = daemon.named("backup.start")
        if started:
            for key in set_objects(s3, bucket, started[0]["set_id"]):
                if key.endswith("/" + artifact):
                    return key
        assert not daemon.named("backup.end"), daemon.dump()
        assert not daemon.named("backup.failed"), daemon.dump()
        time.sleep(0.02)
    raise AssertionError(f"no object of {artifact} within {timeout} s:\n{daemon.dump()}")


def moto_relay(moto_server: MotoServer, record: bool = False) -> Relay:
    relay = Relay(int(moto_server.url.rsplit(":", 1)[1]), record=record)
    relay.up()
    return relay


def at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["timestamp"])


def run_events(daemon: Any, set_id: str) -> list[dict[str, Any]]:
    """Return the events from the backup.start of set_id up to the next backup.end or backup.failed."""
    events = list(daemon.events)
    first = next(i for i, e in enumerate(events) if e.get("event") == "backup.start" and e["set_id"] == set_id)
    last = next(i for i, e in enumerate(events[first:], first) if e.get("event") in ("backup.end", "backup.failed"))
    return events[first : last + 1]


def leftovers(node: DtrNode) -> dict[str, Any]:
    recorded: dict[str, Any] = json.loads((node.state_dir / "state.json").read_text())["leftovers"]
    return recorded


def test_backup_timeout_above_request_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "dtrguard.toml"
    path.write_text('[s3]\nbucket = "dtr-backups"\nread_timeout = "30s"\nmax_attempts = 4\n'
                    '[schedule]\nbackup_timeout = "2m"\n')  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert "schedule.backup_timeout (120 s)" in message
    assert "(30 s x 4 = 120 s)" in message
    assert "raise schedule.backup_timeout" in message
    path.write_text(path.read_text().replace('"2m"', '"121s"'))
    assert config.load(path).schedule.backup_timeout == 121


def test_s3_stops_during_upload(make_node: Any, moto_server: MotoServer, s3: Any, bucket: str) -> None:
    relay = moto_relay(moto_server)
    node = node_with_data(make_node, s3_url=relay.url, s3_config=PART, interval="10s")
    fill_database(60000)
    good = backup_once(node)
    manifests_before = manifest_keys(s3, bucket)
    listing_before = json.loads(node.command("list", "--json").stdout)

    daemon = node.start()
    try:
        key = wait_for_upload(s3, bucket, "db-dtr.dump.zst", daemon)
        relay.down()
        failure = daemon.wait_for("backup.failed")[0]
        failed_set = daemon.named("backup.start")[0]["set_id"]
        # While S3 is away: no manifest, and what S3 did not let the run remove is recorded.
        assert manifest_keys(s3, bucket) == manifests_before
        recorded = leftovers(node)
        assert recorded["uploads"] == []
        # Every object of the set is recorded, a part whose request got no response too, because
        # S3 may have stored it.
        stored = set_objects(s3, bucket, failed_set)
        assert key in stored
        assert set(stored) <= set(recorded["keys"])
        relay.up()
        daemon.wait_for("backup.end")
        removed = daemon.named("leftovers.removed")
    finally:
        daemon.stop()
        relay.down()

    failed_run = run_events(daemon, failed_set)
    assert [e for e in failed_run if e["level"] == "error"] == [failure]
    # The dump in flight, or an artifact the other thread had started meanwhile.
    prefix = key.split("/sets/")[0]
    assert f"S3 upload of {prefix}/sets/{failed_set}/" in failure["error"]
    assert failure["leftovers"] == len(recorded["keys"])
    assert len(removed) == 1
    assert removed[0]["artifacts_deleted"] == len(recorded["keys"])
    assert daemon.named("leftovers.kept") == []
    # S3 is back and the next run has run: nothing of the failed set is left, and the next set is complete.
    assert open_uploads(s3, bucket) == []
    assert set_objects(s3, bucket, failed_set) == []
    assert f"dtr/test/manifests/{failed_set}.json" not in manifest_keys(s3, bucket)
    assert leftovers(node) == {"uploads": [], "keys": []}
    relay.up()
    listing = json.loads(node.command("list", "--json").stdout)
    next_set = daemon.named("backup.end")[0]["set_id"]
    assert [row["set_id"] for row in listing] == [row["set_id"] for row in listing_before] + [next_set]
    assert listing_before[-1]["set_id"] == good
    assert node.command("verify", next_set).returncode == 0
    relay.down()


def test_s3_blackhole_run_stopped_at_deadline(make_node: Any, moto_server: MotoServer, s3: Any, bucket: str) -> None:
    timeout, connect_timeout, read_timeout, attempts = 5, 1, 1, 2
    relay = moto_relay(moto_server)
    node = node_with_data(
        make_node,
        s3_url=relay.url,
        s3_config=f'{PART}connect_timeout = "{connect_timeout}s"\nread_timeout = "{read_timeout}s"\n'
        f"max_attempts = {attempts}\n",
        schedule_config=f'backup_timeout = "{timeout}s"',
        interval="12s",  # longer than a run can last, so each scheduled run starts on time
    )
    fill_database(60000)
    backup_once(node)

    daemon = node.start()
    try:
        wait_for_upload(s3, bucket, "db-dtr.dump.zst", daemon)
        relay.blackhole()
        switched = datetime.now().astimezone()
        failure = daemon.wait_for("backup.failed")[0]
        relay.up()
        daemon.wait_for("backup.end")
    finally:
        daemon.stop()
        relay.down()

    starts = daemon.named("backup.start")
    assert len(starts) == 2  # the next scheduled run started
    assert daemon.named("backup.skipped") == []  # and none was dropped because a run was still going
    assert (switched - at(starts[0])).total_seconds() < timeout, "S3 stopped answering only after the deadline"
    # A request already waiting on S3 ends by its own timeouts; every later one fails at once.
    bound = timeout + (connect_timeout + read_timeout) * attempts
    assert (at(failure) - at(starts[0])).total_seconds() <= bound + 3, daemon.dump()
    assert f"schedule.backup_timeout ({timeout} s)" in failure["error"]
    assert [e for e in run_events(daemon, starts[0]["set_id"]) if e["level"] == "error"] == [failure]
    assert failure["leftovers"] >= 1  # what the stopped run could not remove waits for the next run
    assert daemon.named("leftovers.removed")
    assert open_uploads(s3, bucket) == []
    assert set_objects(s3, bucket, starts[0]["set_id"]) == []
    assert f"dtr/test/manifests/{starts[0]['set_id']}.json" not in manifest_keys(s3, bucket)


def test_metadata_drops_first_connections(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    good = backup_once(node_a)
    tables = table_contents()
    node_a.destroy()

    with MetadataStub("i-0bbbbbbbbbbbbbbbb", drop_first=5).running() as imds:
        node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb", imds_url=imds.url, node_config="imds_attempts = 2")
        daemon = node_b.start()
        restore = daemon.wait_for("restore.end")[0]
        assert daemon.stop() == 0

    assert imds.dropped == 5
    drops = daemon.named("imds.retry")
    assert len(drops) == 5
    assert all(e["level"] == "warning" for e in drops)
    # Two attempts per read, so the service read the instance id three times, and the third read succeeded.
    rounds = [e for e in daemon.named("retry") if e["action"] == "read instance id"]
    assert len(rounds) == 2
    names = [e["event"] for e in daemon.events]
    last_drop = max(i for i, name in enumerate(names) if name in ("imds.retry", "retry"))
    assert last_drop < names.index("node.replacement")
    for never in ("node.empty", "node.first", "decision.failed", "command.failed"):
        assert daemon.named(never) == [], never
    assert [e for e in daemon.events if e["level"] == "error"] == []
    assert restore["set_id"] == good
    assert table_contents() == tables
    assert json.loads((node_b.state_dir / "state.json").read_text())["instance_id"] == "i-0bbbbbbbbbbbbbbbb"


def test_expiring_role_credentials_refreshed(
    make_node: Any, moto_server: MotoServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    relay = moto_relay(moto_server, record=True)
    with MetadataStub("i-0aaaaaaaaaaaaaaaa", credentials_ttl=300).running() as imds:
        env = {
            "AWS_EC2_METADATA_DISABLED": "false",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        }
        node = node_with_data(
            make_node, imds_url=imds.url, s3_url=relay.url, s3_config=PART, env=env, unset_env=OTHER_CREDENTIALS,
            interval="1h",
        )  # fmt: skip
        with open(node.var / "image-storage" / "local" / "large-layer", "wb") as handle:
            handle.write(os.urandom(16 * 1024 * 1024))  # incompressible: the var archive spans four parts
        daemon = node.start()  # a first node: it backs up at once
        end = daemon.wait_for("backup.end")[0]
        environ = (Path("/proc") / str(daemon.process.pid) / "environ").read_bytes().decode().split("\0")
        assert daemon.stop() == 0
        verify = node.command("verify", end["set_id"])
    relay.down()

    variables = dict(item.split("=", 1) for item in environ if "=" in item)
    assert not set(OTHER_CREDENTIALS) & set(variables)
    assert variables["AWS_EC2_METADATA_DISABLED"] == "false"
    assert variables["AWS_EC2_METADATA_SERVICE_ENDPOINT"].startswith("http://127.0.0.1:")
    assert verify.returncode == 0, verify.stderr

    signed = [r for r in relay.requests if r.access_key_id is not None]
    assert signed
    assert len(signed) == len(relay.requests)  # every S3 request was signed
    assert {r.access_key_id for r in signed} <= set(imds.fetched_keys)  # with keys from the metadata service
    # Each part is an object of its own: var-dtr.tar.zst, then var-dtr.tar.zst.1 and so on.
    parts = [
        r for r in relay.requests if r.method == "PUT" and re.search(r"/var-dtr\.tar\.zst(\.\d+)?(\?|$)", r.target)
    ]
    assert len(parts) >= 3
    # The credentials changed between parts of one artifact, and its upload went on to the end.
    assert len({r.access_key_id for r in parts}) > 1
    assert len(imds.fetched_keys) > 1
    assert [e for e in daemon.events if e["level"] in ("warning", "error")] == daemon.named("bucket.unprotected")
