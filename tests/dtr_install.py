"""A stand-in for DTR 1.4's installer (`docker/trusted-registry install`), which cannot run here.

It creates and starts containers named as DTR 1.4 names them, from the locally built test images:
the database with its data directory bind-mounted under /var/local/dtr's stand-in, and the
application containers with both DTR directories mounted, as DTR mounts them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import PG_UID, PGDATA, ensure_app_image, ensure_postgres_image  # noqa: E402

PREFIX = "docker_trusted_registry_"
APP_ROLES = ("log_aggregator", "auth_server", "admin_server", "image_storage_0", "load_balancer")


def install(version: str, etc: Path, var: Path, pg_data: Path) -> None:
    client = docker.from_env()
    etc.mkdir(parents=True, exist_ok=True)
    var.mkdir(parents=True, exist_ok=True)
    pg_data.mkdir(parents=True, exist_ok=True)
    os.chown(pg_data, PG_UID, PG_UID)
    os.chmod(pg_data, 0o700)
    client.containers.run(
        ensure_postgres_image(),
        name=PREFIX + "postgres",
        detach=True,
        volumes={str(pg_data): {"bind": PGDATA, "mode": "rw"}},
    )
    mounts = {
        str(etc): {"bind": "/usr/local/etc/dtr", "mode": "rw"},
        str(var): {"bind": "/var/local/dtr", "mode": "rw"},
    }
    for role in APP_ROLES:
        client.containers.run(ensure_app_image(role, version), name=PREFIX + role, detach=True, volumes=mounts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", required=True)
    parser.add_argument("--etc", type=Path, required=True)
    parser.add_argument("--var", type=Path, required=True)
    parser.add_argument("--pg-data", type=Path, required=True)
    args = parser.parse_args()
    install(args.version, args.etc, args.var, args.pg_data)


if __name__ == "__main__":
    main()
