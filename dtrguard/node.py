"""The node: its collaborators (S3, Docker, Postgres, DTR) and whether it has DTR data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException

from dtrguard.archive import WORK_DIR
from dtrguard.config import DirectorySettings, Settings
from dtrguard.dockerexec import Exec
from dtrguard.dtr import Dtr
from dtrguard.errors import TransientError
from dtrguard.postgres import Postgres
from dtrguard.repository import Repository


class DockerUnavailable(TransientError):
    """The Docker Engine did not respond."""


def directory_has_entries(path: Path) -> bool:
    """Report whether a directory exists and has entries other than dtrguard's restore work directory."""
    try:
        return any(name != WORK_DIR for name in os.listdir(path))
    except FileNotFoundError:
        return False


@dataclass
class Node:
    """Everything one backup or restore works with."""

    settings: Settings
    repository: Repository
    docker: Any
    postgres: Postgres
    dtr: Dtr

    @classmethod
    def connect(cls, settings: Settings, repository: Repository | None = None) -> Node:
        try:
            client = docker.from_env(timeout=120)
            client.ping()
        except DockerException as exc:
            raise DockerUnavailable(
                f"Docker Engine not reachable: {exc}", hint="start docker.service (the service retries by itself)"
            ) from None
        return cls(
            settings=settings,
            repository=repository or Repository(settings.s3),
            docker=client,
            postgres=Postgres(settings.postgres, Exec(client.api)),
            dtr=Dtr(settings.dtr, settings.postgres.container, client),
        )

    def excludes(self, directory: DirectorySettings) -> list[str]:
        """Return the exclude patterns for a directory, plus Postgres data mounts found under it."""
        patterns = list(directory.exclude)
        for source in self.dtr.mount_sources():
            if source.is_relative_to(directory.path) and source != directory.path:
                patterns.append(str(source.relative_to(directory.path)))
        return patterns

    def config_dir_has_data(self) -> bool:
        """Report whether DTR's config directory (the first configured directory) has entries."""
        return directory_has_entries(self.settings.directories[0].path)

    def database_rows(self, start: bool = True) -> int | None:
        """Count rows in all user tables, or return None when no Postgres container exists.

        A stopped container is started first, unless start is False: then None is returned.
        """
        container = self.dtr.postgres()
        if container is None:
            return None
        if container.status != "running":
            if not start:
                return None
            container.start()
        self.postgres.wait_ready()
        return sum(sum(self.postgres.row_counts(db).values()) for db in self.postgres.databases())

    def has_data(self) -> bool:
        """Report whether the node has DTR data that a restore would overwrite."""
        return self.config_dir_has_data() or bool(self.database_rows())
