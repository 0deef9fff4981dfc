"""The replacement drill under systemd, with dtrguard installed from its .deb.

Each node is a container of the node image (tests/nodeimage.py) that boots systemd as PID 1. It uses
the host's network, so it reaches moto's S3 server and the metadata stub on 127.0.0.1, and the host's
Docker Engine through the mounted socket, so DTR's containers are its siblings on the host.

DTR's directories are host paths mounted at the same path in the node, and the node's config lists
them as its [[directories]]. DTR's containers mount them from the host, so dtrguard and the Postgres
container see the same path, and dtrguard excludes the Postgres data directory as it does on a real
node. The paths are not under pytest's tmp_path: dtrguard.service has PrivateTmp=yes, which hides
/tmp from the service. A drop-in adds them to ReadWritePaths, as the README instructs operators to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dtr_install import APP_ROLES, PREFIX
from dtrnode import CONTAINERS, DtrNode, client, remove_containers, table_contents, table_owners, tree
from images import APP_VERSION, ensure_app_image, ensure_postgres_image
from nodeimage import STANDIN_DIR, docker_cli, ensure_node_base_image, ensure_node_image
from servers import MetadataStub, MotoServer

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parent.parent
DRILL_ROOT = Path("/srv/dtrguard-drill")
INTERVAL_SECONDS = 5
# Files that go into the .deb: when one is newer than dist/'s .deb, the test builds it again.
DEB_INPUTS = ("dtrguard", "pyproject.toml", "README.md", "systemd", "packaging/dtrguard.toml",
              "packaging/debian", "packaging/build-deb.sh")  # fmt: skip


# The package


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def newest_input_mtime() -> float:
    newest = 0.0
    for name in DEB_INPUTS:
        path = REPO / name
        files = [path]
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        newest = max([newest, *(f.stat().st_mtime for f in files)])
    return newest


@pytest.fixture(scope="session")
def deb_path() -> Path:
    """Return dist/'s .deb for the current version, built by packaging/build-deb.sh if missing or stale.

    DTRGUARD_DEB names another .deb to test instead, such as a release candidate.
    """
    if os.environ.get("DTRGUARD_DEB"):
        deb = Path(os.environ["DTRGUARD_DEB"]).resolve()
        assert deb.is_file(), f"DTRGUARD_DEB={deb} is not a file"
        return deb
    deb = REPO / "dist" / f"dtrguard_{project_version()}_amd64.deb"
    if deb.exists() and deb.stat().st_mtime >= newest_input_mtime():
        return deb
    result = subprocess.run(
        ["bash", str(REPO / "packaging" / "build-deb.sh")], capture_output=True, text=True, timeout=1800, check=False
    )
    assert result.returncode == 0, f"packaging/build-deb.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(result.stdout)
    assert deb.exists(), f"packaging/build-deb.sh did not write {deb}"
    return deb


@pytest.fixture(scope="session")
def node_image(deb_path: Path) -> str:
    """Return the node image's tag, with the images DTR's stand-in installer uses already on the host."""
    ensure_postgres_image()
    for role in APP_ROLES:
        ensure_app_image(role, APP_VERSION)
    started = time.monotonic()
    tag = ensure_node_image(deb_path)
    print(f"node image {tag} ready in {time.monotonic() - started:.1f} s")
    return tag


LIFECYCLE_SCRIPT = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive
deb=/debs/$DEB_NAME
config=/etc/dtrguard/dtrguard.toml
state=/var/lib/dtrguard/state.json
step() { echo "== $*"; }

step "install: apt-get without network; Debian's python3 is already in the image"
apt-get install -y -q --no-install-recommends "$deb"
dtrguard --version
dtrguard --help >/dev/null
test "$(readlink /usr/bin/dtrguard)" = /opt/dtrguard/bin/dtrguard
test "$(stat -c %a $config)" = 600
test "$(stat -c %a /var/lib/dtrguard)" = 700
test -f /opt/dtrguard/README.md
test -f /lib/systemd/system/dtrguard.service
test ! -e /etc/systemd/system/multi-user.target.wants/dtrguard.service
grep -qx /etc/dtrguard/dtrguard.toml /var/lib/dpkg/info/dtrguard.conffiles

step "an edited config and a state file"
sed -i 's/^bucket = .*/bucket = "edited-by-operator"/' $config
echo '{"instance_id": "i-0lifecycle", "established": true}' > $state

step "reinstall the same version"
apt-get install -y -q --no-install-recommends --reinstall "$deb"
grep -q edited-by-operator $config
grep -q i-0lifecycle $state

step "upgrade to a bumped version"
mkdir /tmp/bumped
dpkg-deb -R "$deb" /tmp/bumped/tree
sed -i "s/^Version: .*/Version: $BUMPED_VERSION/" /tmp/bumped/tree/DEBIAN/control
dpkg-deb --build --root-owner-group /tmp/bumped/tree /tmp/bumped/dtrguard_bumped.deb >/dev/null
apt-get install -y -q --no-install-recommends /tmp/bumped/dtrguard_bumped.deb
test "$(dpkg-query -W -f '${Version}' dtrguard)" = "$BUMPED_VERSION"
grep -q edited-by-operator $config
test "$(stat -c %a $config)" = 600
grep -q i-0lifecycle $state
dtrguard --version

step "remove"
dpkg -r dtrguard
test ! -e /opt/dtrguard
test ! -e /usr/bin/dtrguard
test ! -e /lib/systemd/system/dtrguard.service
grep -q edited-by-operator $config
grep -q i-0lifecycle $state
test "$(dpkg-query -W -f '${db:Status-Status}' dtrguard)" = config-files

step "install again after remove"
apt-get install -y -q --no-install-recommends "$deb"
grep -q edited-by-operator $config
grep -q i-0lifecycle $state

step "purge"
dpkg -P dtrguard
test ! -e /etc/dtrguard
grep -q i-0lifecycle $state
echo "lifecycle: ok"
"""


def test_deb_install_upgrade_remove(deb_path: Path) -> None:
    """Install offline, reinstall, upgrade, remove and purge. The edited config and the state file survive."""
    version = project_version()
    # A throwaway container of Debian 12 with python3, without systemd running.
    image = ensure_node_base_image()
    result = subprocess.run(
        ["docker", "run", "--rm", "--pull", "never", "--network", "none", "-v", f"{deb_path.parent}:/debs:ro",
         "-e", f"DEB_NAME={deb_path.name}", "-e", f"BUMPED_VERSION={version}+bump1",
         image, "sh", "-c", LIFECYCLE_SCRIPT],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, f"package lifecycle failed:\n{output[-6000:]}"
    assert f"dtrguard {version}" in result.stdout
    assert "kept /var/lib/dtrguard" in result.stdout, "purge does not say that it kept the state directory"
    assert "lifecycle: ok" in result.stdout


# Node containers


class SystemdNode:
    """A node container booting systemd, with dtrguard's config and a drop-in put in before it starts."""

    def __init__(self, name: str, image: str, host_root: Path):
        self.name = name
        self.image = image
        self.host_root = host_root

    def create(self, files: dict[str, tuple[str, int]]) -> None:
        """Create the container, not yet started, and put files (path -> text, mode) into it."""
        docker_cli(
            "create", "--pull", "never", "--name", self.name, "--network", "host", "--stop-signal", "SIGRTMIN+3",
            "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined", "-e", "container=docker",
            # Read-only works on this host's cgroup v1 hierarchy; systemd still gets its own cgroup.
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "-v", f"{self.host_root}:{self.host_root}",
            self.image,
        )  # fmt: skip
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for path, (text, mode) in files.items():
                data = text.encode()
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = len(data)
                info.mode = mode
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
        assert client().containers.get(self.name).put_archive("/", archive.getvalue())

    def start(self) -> None:
        """Start the container and wait until systemctl can connect to systemd in it."""
        docker_cli("start", self.name)
        deadline = time.monotonic() + 60
        while docker_cli("exec", self.name, "systemctl", "list-jobs", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"systemd in {self.name} did not start within 60 s"
            time.sleep(0.2)

    def exec(self, *command: str, check: bool = True, timeout: float = 60) -> str:
        result = docker_cli("exec", self.name, *command, check=False, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(command)} in {self.name} failed:\n{result.stdout}{result.stderr}"
        return result.stdout + result.stderr

    def events(self) -> list[dict[str, Any]]:
        """Return dtrguard's JSON events from this boot's journal."""
        output = docker_cli("exec", self.name, "journalctl", "-u", "dtrguard", "-o", "cat", "--no-pager",
                            check=False).stdout  # fmt: skip
        events = []
        for line in output.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def journal(self) -> str:
        return self.exec("journalctl", "-u", "dtrguard", "-o", "short-monotonic", "--no-pager", check=False)

    def wait_for(
        self, condition: Callable[[list[dict[str, Any]]], bool], description: str, timeout: float = 120
    ) -> None:
        """Poll the journal until condition holds for dtrguard's events, and fail with the journal if it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.events()
            if condition(events):
                return
            failed = [e for e in events if e.get("level") == "error"]
            assert not failed, f"dtrguard logged an error while waiting for {description}:\n{self.journal()}"
            # Result leaves "success" as soon as the main process fails, before systemd restarts it.
            unit = self.unit_properties("Result", "NRestarts")
            assert unit == {"Result": "success", "NRestarts": "0"}, (
                f"dtrguard failed ({unit}) while waiting for {description}:\n{self.journal()}"
            )
            time.sleep(0.5)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {description} in {self.name}:\n{self.journal()}"
        )

    def unit_properties(self, *names: str) -> dict[str, str]:
        output = self.exec("systemctl", "show", "dtrguard.service", *(f"--property={n}" for n in names))
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def remove(self) -> None:
        """Stop systemd in order, then remove the container. A container that does not exist is ignored."""
        docker_cli("stop", "--time", "60", self.name, check=False, timeout=120)
        docker_cli("rm", "-f", self.name, check=False)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def after(events: list[dict[str, Any]], first: str, then: str, occurrence: int = 1) -> list[dict[str, Any]]:
    """Return the events called then that come after the given occurrence (1 for the first) of the event first."""
    seen = 0
    for index, event in enumerate(events):
        if event.get("event") == first:
            seen += 1
            if seen == occurrence:
                return named(events[index + 1 :], then)
    return []


def node_files(node: DtrNode, imds_url: str, moto_url: str) -> dict[str, tuple[str, int]]:
    """Return dtrguard's config and the drill's drop-in, as a node's user data would write them."""
    install_command = [
        "/opt/dtrguard/bin/python", f"{STANDIN_DIR}/dtr_install.py", "--version", "{version}",
        "--etc", str(node.etc), "--var", str(node.var), "--pg-data", str(node.pg_data),
    ]  # fmt: skip
    drill = dataclasses.replace(node, s3_url=moto_url, imds_url=imds_url, interval=f"{INTERVAL_SECONDS}s")
    config = drill.config_text(install_command, prefix="dtr/systemd-drill")
    drop_in = f"""\
[Service]
# The drill's DTR directories: host paths, mounted at the same path in the node.
ReadWritePaths={node.root}
# moto accepts any credentials. botocore must not look for them at EC2's metadata address.
Environment=AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_EC2_METADATA_DISABLED=true
"""
    return {
        "/etc/dtrguard/dtrguard.toml": (config, 0o600),
        "/etc/systemd/system/dtrguard.service.d/drill.conf": (drop_in, 0o644),
    }


@pytest.fixture
def drill_root(dtr_containers: None) -> Iterator[Path]:
    """Return a new host directory for DTR's directories. Teardown removes DTR's containers, then the directory."""
    root = DRILL_ROOT / uuid.uuid4().hex[:12]
    root.mkdir(parents=True)
    try:
        yield root
    finally:
        remove_containers()  # Postgres writes into the directory until its container is gone
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            DRILL_ROOT.rmdir()  # only when no other drill uses it


@pytest.fixture
def systemd_nodes() -> Iterator[Callable[[str, str, Path], SystemdNode]]:
    """Return a factory of node containers. Teardown removes each by its exact name, whether the test passed or not."""
    created: list[SystemdNode] = []

    def factory(name: str, image: str, host_root: Path) -> SystemdNode:
        node = SystemdNode(f"dtrguard-drill-{name}-{uuid.uuid4().hex[:8]}", image, host_root)
        created.append(node)
        return node

    yield factory
    for node in created:
        node.remove()


def check_upgrade_and_remove(node: SystemdNode, deb_path: Path) -> None:
    """Reinstall the .deb on a running node, then remove it: the maintainer scripts under systemd.

    postinst restarts the running service, which resumes scheduled backups from its state file.
    prerm stops it on removal, and the config and state file stay.
    """
    main_pid = node.unit_properties("MainPID")["MainPID"]
    docker_cli("cp", str(deb_path), f"{node.name}:/tmp/dtrguard.deb")
    node.exec("apt-get", "install", "-y", "-q", "--no-install-recommends", "--reinstall", "/tmp/dtrguard.deb",
              timeout=300)  # fmt: skip
    node.wait_for(
        lambda events: bool(after(events, "service.start", "node.running", occurrence=2)), "node.running after upgrade"
    )
    node.wait_for(
        lambda events: bool(after(events, "node.running", "backup.end")), "a backup after the upgrade restart"
    )
    upgraded = node.unit_properties("MainPID", "ActiveState", "NRestarts")
    assert upgraded["MainPID"] != main_pid, "postinst did not restart the running service on upgrade"
    assert upgraded["ActiveState"] == "active"
    assert named(node.events(), "restore.start")[1:] == [], "the restarted service restored again"

    node.exec("dpkg", "-r", "dtrguard", timeout=300)
    removed = node.unit_properties("ActiveState", "LoadState")
    assert removed["ActiveState"] == "inactive", f"prerm did not stop dtrguard: {removed}"
    assert removed["LoadState"] == "not-found", f"the unit is still loaded after dpkg -r: {removed}"
    node.exec("test", "-f", "/etc/dtrguard/dtrguard.toml")
    node.exec("test", "-f", "/var/lib/dtrguard/state.json")


def test_systemd_drill(  # type: ignore[no-untyped-def]
    node_image: str,
    deb_path: Path,
    moto_server: MotoServer,
    bucket: str,
    dtr_containers: None,
    drill_root: Path,
    systemd_nodes,
) -> None:
    """Node A backs up under systemd and dies. Node B boots from the same image and restores by itself."""
    dtr = DtrNode(root=drill_root, s3_url=moto_server.url, bucket=bucket, instance_id="i-0aaaaaaaaaaaaaaaa")

    # Node A: a DTR node with data, whose image has dtrguard enabled, as the AMI does.
    dtr.install()
    dtr.seed()
    node_a: SystemdNode = systemd_nodes("node-a", node_image, drill_root)
    with MetadataStub("i-0aaaaaaaaaaaaaaaa").running() as imds_a:
        node_a.create(node_files(dtr, imds_a.url, moto_server.url))
        node_a.start()
        assert node_a.exec("systemctl", "is-enabled", "dtrguard").strip() == "enabled"
        node_a.wait_for(lambda events: bool(named(events, "node.first")), "node.first")
        # The first backup, then two scheduled ones.
        node_a.wait_for(lambda events: len(named(events, "backup.end")) >= 3, "three backup.end events")
        assert imds_a.requests >= 2, "node A did not read its instance id from the metadata stub"

        # The sandbox: DTR's default directories and the drill's are writable for dtrguard, /usr is not.
        main_pid = node_a.unit_properties("MainPID")["MainPID"]
        for path, expected in (("/usr/local/etc/dtr", "rw"), ("/var/local/dtr", "rw"), (str(drill_root), "rw"),
                               ("/usr", "ro"), ("/etc", "ro")):  # fmt: skip
            options = node_a.exec("nsenter", "--target", main_pid, "--mount", "findmnt", "--noheadings",
                                  "--output", "OPTIONS", "--target", path).strip()  # fmt: skip
            assert options.split(",")[0] == expected, f"{path} is mounted {options} for dtrguard, expected {expected}"

        verify = node_a.exec("systemd-analyze", "verify", "/lib/systemd/system/dtrguard.service", check=False)
        assert verify.strip() == "", f"systemd-analyze verify printed:\n{verify}"
        security = node_a.exec("systemd-analyze", "security", "--offline=yes", "dtrguard.service", check=False)
        print("systemd-analyze security --offline=yes dtrguard.service (node A):\n" + security)

        node_a.exec("systemctl", "stop", "dtrguard")
        stopped = node_a.unit_properties("Result", "ExecMainStatus")
        assert stopped == {"Result": "success", "ExecMainStatus": "0"}, f"dtrguard stopped badly: {stopped}"
        events_a = node_a.events()
        errors_a = node_a.exec("journalctl", "-p", "err", "-u", "dtrguard", "-o", "cat", "--no-pager")
    assert named(events_a, "restore.start") == []
    assert errors_a.strip() in ("", "-- No entries --"), f"errors on node A:\n{errors_a}"
    last_set = named(events_a, "backup.end")[-1]["set_id"]
    etc_before, var_before = tree(dtr.etc), tree(dtr.var)
    tables_before, owners_before = table_contents(), table_owners()
    assert tables_before, "node A has no tables"

    # Destroy node A: its container, DTR's containers and DTR's directories.
    node_a.remove()
    remove_containers()
    shutil.rmtree(dtr.etc)
    shutil.rmtree(dtr.var)
    assert client().containers.list(all=True, filters={"name": PREFIX}) == []

    # Node B: the same image and a new instance id. No command is run on it by hand.
    node_b: SystemdNode = systemd_nodes("node-b", node_image, drill_root)
    with MetadataStub("i-0bbbbbbbbbbbbbbbb").running() as imds_b:
        node_b.create(node_files(dtr, imds_b.url, moto_server.url))
        node_b.start()
        node_b.wait_for(lambda events: bool(named(events, "restore.end")), "restore.end", timeout=150)
        node_b.wait_for(lambda events: bool(after(events, "restore.end", "backup.end")), "a backup after the restore")
        unit = node_b.unit_properties(
            "ActiveState", "SubState", "StatusText", "InactiveExitTimestampMonotonic",
            "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
        )  # fmt: skip
        status = node_b.exec("systemctl", "status", "--no-pager", "dtrguard", check=False)
        events_b = node_b.events()
        errors_b = node_b.exec("journalctl", "-p", "err", "-u", "dtrguard", "-o", "cat", "--no-pager")
        state = json.loads(node_b.exec("cat", "/var/lib/dtrguard/state.json"))
        check_upgrade_and_remove(node_b, deb_path)

    print("systemctl status dtrguard (node B):\n" + status)
    started = int(unit["ExecMainStartTimestampMonotonic"])
    ready = int(unit["ActiveEnterTimestampMonotonic"])
    print(f"node B: dtrguard start to READY {(ready - started) / 1e6:.2f} s"
          f" (from ExecStartPre: {(ready - int(unit['InactiveExitTimestampMonotonic'])) / 1e6:.2f} s)")  # fmt: skip
    for event in events_b:
        if event.get("event") in ("dtr.install.end", "database.end", "restore.end", "backup.end"):
            print(f"node B: {event['event']} after {event.get('seconds')} s")
    assert unit["ActiveState"] == "active"
    assert unit["SubState"] == "running"
    assert unit["StatusText"].startswith("idle; last backup "), unit["StatusText"]
    assert 'Status: "idle; last backup' in status
    assert ready > started > 0
    assert errors_b.strip() in ("", "-- No entries --"), f"errors on node B:\n{errors_b}"

    restore = named(events_b, "restore.end")[0]
    assert restore["set_id"] == last_set
    assert named(events_b, "node.replacement"), "node B did not decide that it is a replacement"
    assert named(events_b, "dtr.install.end"), "the install command did not run on node B"
    running = {c.name for c in client().containers.list(filters={"name": PREFIX})}
    assert running == set(CONTAINERS), running
    assert tree(dtr.etc) == etc_before
    assert tree(dtr.var) == var_before
    assert table_contents() == tables_before
    assert table_owners() == owners_before
    assert state["instance_id"] == "i-0bbbbbbbbbbbbbbbb"
    assert state["restored_set"] == last_set
    assert state["last_backup"]["result"] == "ok"
    assert imds_b.requests >= 2, "node B did not read its instance id from the metadata stub"
