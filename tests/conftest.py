"""Shared fixtures: moto's S3 server, a bucket per test, and a clean set of DTR containers."""

from __future__ import annotations

import fcntl
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dtrnode import DTR_NAMES_LOCK, RUNNING, DtrNode, assert_no_secret, remove_containers  # noqa: E402
from servers import MotoServer  # noqa: E402

# No test may reach the EC2 metadata address or real AWS credentials.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_EC2_METADATA_DISABLED="true",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_SESSION_TOKEN", None)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server: MotoServer) -> object:
    return boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")


@pytest.fixture
def bucket(s3: object) -> str:
    name = f"dtrguard-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def dtr_containers() -> Iterator[None]:
    """Start and end with no DTR-named containers, holding a lock so that two runs never share the names."""
    with open(DTR_NAMES_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_containers()
        yield
        remove_containers()


@pytest.fixture
def make_node(tmp_path: Path, moto_server: MotoServer, bucket: str, dtr_containers: None) -> Iterator[object]:
    """Return a factory for nodes that share one bucket and DTR's directory paths."""
    created: list[DtrNode] = []

    def factory(instance_id: str, **options: object) -> DtrNode:
        node = DtrNode(
            root=tmp_path / "node",
            s3_url=options.pop("s3_url", moto_server.url),
            bucket=bucket,  # type: ignore[arg-type]
            instance_id=instance_id,
            **options,
        )  # type: ignore[arg-type]
        node.write_config()
        created.append(node)
        return node

    yield factory
    while RUNNING:
        daemon = RUNNING.pop()
        daemon.kill()
        assert_no_secret(daemon.dump(), "dtrguard run")
    for node in created:
        node.destroy()
