"""Checks that the images built by tests/images.py run as the tests expect."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import docker
import pytest
from docker.errors import NotFound

from images import ensure_app_image, ensure_postgres_image

PG_CONTAINER = "dtrguard-test-images-pg"
APP_CONTAINER = "dtrguard-test-images-app"


@pytest.fixture
def client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


def _remove(client: docker.DockerClient, name: str) -> None:
    with contextlib.suppress(NotFound):
        client.api.remove_container(name, force=True)


def _exec(client: docker.DockerClient, cmd: list[str]) -> tuple[int, str]:
    exec_id = client.api.exec_create(PG_CONTAINER, cmd)["Id"]
    output = client.api.exec_start(exec_id).decode()
    return client.api.exec_inspect(exec_id)["ExitCode"], output


def _wait_ready(client: docker.DockerClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code, output = _exec(client, ["pg_isready", "-q"])
        if code == 0:
            return
        assert time.monotonic() < deadline, f"pg_isready failed: {output}"
        time.sleep(0.2)


@pytest.mark.docker
def test_postgres_image_runs_sql_query(client: docker.DockerClient) -> None:
    image = ensure_postgres_image()
    _remove(client, PG_CONTAINER)
    try:
        client.api.start(client.api.create_container(image, name=PG_CONTAINER))
        _wait_ready(client)
        code, output = _exec(client, ["psql", "-U", "postgres", "-Atc", "select 6 * 7"])
        assert code == 0, output
        assert output.strip() == "42"
    finally:
        _remove(client, PG_CONTAINER)


@pytest.mark.docker
def test_app_image_stops_on_sigterm(client: docker.DockerClient) -> None:
    image = ensure_app_image("admin_server")
    _remove(client, APP_CONTAINER)
    try:
        client.api.start(client.api.create_container(image, name=APP_CONTAINER))
        started = time.monotonic()
        client.api.stop(APP_CONTAINER)  # No timeout: the daemon waits 10 s before SIGKILL.
        assert time.monotonic() - started < 5
        assert client.api.inspect_container(APP_CONTAINER)["State"]["ExitCode"] == 0
    finally:
        _remove(client, APP_CONTAINER)
