"""DTR 1.4's containers: find them, record their versions, stop, install and start them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from docker.errors import APIError, NotFound

from dtrguard import log
from dtrguard.config import DtrSettings
from dtrguard.errors import CommandError, DtrguardError
from dtrguard.manifest import Container

_log = log.get("dtr")


def image_version(image: str) -> str:
    """Return the tag of an image reference: "docker/trusted-registry-x:1.4.3" gives "1.4.3"."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


class Dtr:
    """The containers whose names start with the configured prefix."""

    def __init__(self, settings: DtrSettings, postgres_container: str, client: Any):
        self.settings = settings
        self.postgres_container = postgres_container
        self.client = client

    def _order(self, name: str) -> tuple[int, str]:
        role = name[len(self.settings.container_prefix) :]
        order = self.settings.start_order
        return (order.index(role) if role in order else len(order), name)

    def containers(self) -> list[Any]:
        """Return DTR's containers, running or not, in start order."""
        try:
            found = self.client.containers.list(all=True, filters={"name": self.settings.container_prefix})
        except APIError as exc:
            raise DtrguardError(f"listing containers failed: {exc.explanation or exc}") from None
        ours = [c for c in found if c.name.startswith(self.settings.container_prefix)]
        return sorted(ours, key=lambda c: self._order(c.name))

    def postgres(self) -> Any | None:
        try:
            return self.client.containers.get(self.postgres_container)
        except NotFound:
            return None

    def describe(self) -> tuple[Container, ...]:
        """Record each container's name, image and version for the manifest."""
        result = []
        for container in self.containers():
            image = str(container.attrs.get("Config", {}).get("Image", ""))
            result.append(Container(container.name, image, image_version(image)))
        return tuple(result)

    def version(self, containers: tuple[Container, ...]) -> str | None:
        """Return DTR's version: the image tag of the configured version container."""
        wanted = self.settings.container_prefix + self.settings.version_container
        for container in containers:
            if container.name == wanted and container.version:
                return container.version
        return None

    def mount_sources(self) -> list[Path]:
        """Return the host paths mounted into the Postgres container (its data directory)."""
        container = self.postgres()
        if container is None:
            return []
        return [Path(m["Source"]) for m in container.attrs.get("Mounts", []) if m.get("Source")]

    def stop_all_but_postgres(self) -> None:
        for container in reversed(self.containers()):
            if container.name != self.postgres_container and container.status == "running":
                _log.info("container.stop", container=container.name)
                container.stop(timeout=self.settings.stop_timeout)

    def start_postgres(self) -> None:
        container = self.postgres()
        if container is None:
            raise DtrguardError(
                f"container {self.postgres_container} not found after installing DTR",
                hint="check [dtr].install_command and [postgres].container in the config",
            )
        if container.status != "running":
            container.start()

    def start_all(self) -> None:
        """Start every DTR container in DTR's order and wait until all are running."""
        for container in self.containers():
            container.reload()
            if container.status != "running":
                _log.info("container.start", container=container.name)
                container.start()
        self.wait_running()

    def wait_running(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        while True:
            stopped = [c.name for c in self.containers() if c.status != "running"]
            if not stopped:
                return
            if time.monotonic() > deadline:
                raise DtrguardError(
                    f"DTR containers not running after {self.settings.start_timeout:.0f} s: {', '.join(stopped)}",
                    hint="check `docker logs` for each of them",
                )
            time.sleep(1)

    def check_install(self, version: str | None) -> None:
        """Raise when the install command needs a version and the set records none."""
        if any("{version}" in arg for arg in self.settings.install_command) and not version:
            raise DtrguardError(
                "the backup set records no DTR version, so the install command cannot be pinned",
                hint="set [dtr].install_command to a command with an explicit version",
            )

    def install(self, version: str | None) -> None:
        """Run the configured install command, with {version} replaced by DTR's version."""
        self.check_install(version)
        command = [arg.replace("{version}", version or "") for arg in self.settings.install_command]
        _log.info("dtr.install.start", command=command)
        started = time.monotonic()
        try:
            # A session of its own keeps a terminal's Ctrl-C, meant for dtrguard, away from the installer.
            result = subprocess.run(command, capture_output=True, timeout=1800, check=False, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(f"DTR install command {command[0]} failed: {exc}") from None
        if result.returncode != 0:
            raise CommandError(
                f"DTR install command exited with code {result.returncode}",
                detail=result.stderr.decode(errors="replace").strip()[-2000:] or None,
                hint="run it by hand to see why, then start dtrguard again",
            )
        _log.info("dtr.install.end", seconds=round(time.monotonic() - started, 2))
