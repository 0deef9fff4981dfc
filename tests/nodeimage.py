"""Build the image of a DTR node that boots systemd and runs dtrguard from its .deb.

Two images, each built once and then reused by tag:

- dtrguard-test/node-base:1, a debootstrap rootfs of Debian 12 (minbase) with systemd, systemd-sysv,
  dbus and python3, from the Debian mirror;
- dtrguard-test/node:<hash>, that base with the .deb installed as packaging/packer/provision.sh
  installs it (`apt-get install` of the .deb, `systemctl enable dtrguard`, `dtrguard prepare-image --yes`).
  The hash covers the .deb and every other file put into the image.

The node image differs from the AMI in two ways. It has no Docker Engine: a node container uses the
host's engine through a bind-mounted /var/run/docker.sock, and a stand-in docker.service waits for
that socket, because dtrguard.service requires docker.service. It also carries the stand-in DTR
installer (tests/dtr_install.py and tests/images.py) in /usr/local/lib/dtr-standin, which
/opt/dtrguard/bin/python runs with the docker SDK of dtrguard's virtual environment. The installer only
uses image tags that exist already, so images.ensure_postgres_image() and images.ensure_app_image() must
run on the host before a node installs DTR.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BASE_IMAGE = "dtrguard-test/node-base:1"
NODE_IMAGE_REPO = "dtrguard-test/node"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3")
STANDIN_DIR = "/usr/local/lib/dtr-standin"
STANDIN_FILES = ("dtr_install.py", "images.py")
# Bump when the recipe below changes in a way the hashed files do not show.
RECIPE_VERSION = "1"
_LOCK_FILE = Path(tempfile.gettempdir()) / "dtrguard-node-image.lock"

# Stands in for the Docker Engine's unit: the engine is the host's, reached through the mounted socket.
DOCKER_SERVICE_STANDIN = """\
[Unit]
Description=Docker Engine (stand-in: the host's engine, through the bind-mounted /var/run/docker.sock)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for i in $(seq 1 300); do [ -S /var/run/docker.sock ] && exit 0; sleep 0.1; done; exit 1'

[Install]
WantedBy=multi-user.target
"""

# dtrguard prepare-image needs a config and the Docker Engine. This config names a Postgres container
# and a DTR name prefix that no container has, so DTR containers of other test runs on the shared
# engine do not count as data in the image.
PREPARE_CONFIG = """\
[s3]
bucket = "image-build"
[postgres]
container = "dtrguard-image-build-no-postgres"
[dtr]
container_prefix = "dtrguard-image-build-no-dtr-"
"""

# Run in a container of the base image without network: everything the install needs is in the image.
RECIPE = f"""\
set -eu
export DEBIAN_FRONTEND=noninteractive
# Recommends would pull docker.io, whose engine must not run inside a node container.
apt-get install -y -q --no-install-recommends /build/dtrguard.deb
install -m 0644 /build/docker.service /etc/systemd/system/docker.service
systemctl enable docker.service dtrguard.service
install -d -m 0755 {STANDIN_DIR}
install -m 0644 {" ".join("/build/" + name for name in STANDIN_FILES)} {STANDIN_DIR}/
dtrguard --config /build/prepare.toml prepare-image --yes
# prepare-image holds the node's lock while it runs and leaves the lock file (its pid, no state) behind.
# Any other file is state that a booted copy must not see.
if [ -n "$(ls -A /var/lib/dtrguard | grep -vx lock)" ]; then
    echo "nodeimage: /var/lib/dtrguard has state after prepare-image:" >&2
    ls -la /var/lib/dtrguard >&2
    exit 1
fi
apt-get clean
rm -rf /var/lib/apt/lists/*
# An empty machine id makes systemd generate one on each node's first boot, as on a fresh AMI.
: > /etc/machine-id
"""

# docker commit takes no STOPSIGNAL, so a node container needs `--stop-signal SIGRTMIN+3`, which makes
# systemd shut down in order.
_COMMIT_CHANGES = ('CMD ["/sbin/init"]', "ENV container=docker")


def docker_cli(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI and return its result; raise with its output when it fails and check is set."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def image_exists(tag: str) -> bool:
    return docker_cli("image", "inspect", tag, check=False).returncode == 0


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Serialize image builds across processes on this host."""
    with open(_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def ensure_node_base_image() -> str:
    """Build the systemd base image with debootstrap unless its tag exists, and return the tag."""
    with _build_lock():
        if image_exists(BASE_IMAGE):
            return BASE_IMAGE
        if shutil.which("debootstrap") is None:
            raise RuntimeError("nodeimage: debootstrap is not installed; run scripts/setup.sh")
        # Not under /tmp: debootstrap needs a filesystem mounted without nodev and noexec.
        rootfs = Path(tempfile.mkdtemp(prefix="dtrguard-node-rootfs.", dir="/var/tmp"))
        try:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                 "bookworm", str(rootfs), DEBIAN_MIRROR],
                capture_output=True, text=True, timeout=1800, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                output = (result.stdout + result.stderr)[-3000:]
                raise RuntimeError(f"nodeimage: debootstrap failed ({result.returncode}):\n{output}")
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            imported = subprocess.run(
                ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True, check=False
            )
            tar.stdout.close()
            if tar.wait() != 0 or imported.returncode != 0:
                raise RuntimeError(f"nodeimage: importing {BASE_IMAGE} failed: {imported.stderr.strip()}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_IMAGE


def node_image_tag(deb_path: Path) -> str:
    """Return the node image's tag: a hash of the .deb, the stand-in files and the recipe."""
    digest = hashlib.sha256()
    digest.update(deb_path.read_bytes())
    for name in STANDIN_FILES:
        digest.update((TESTS / name).read_bytes())
    for text in (DOCKER_SERVICE_STANDIN, PREPARE_CONFIG, RECIPE, RECIPE_VERSION, *_COMMIT_CHANGES):
        digest.update(text.encode())
    return f"{NODE_IMAGE_REPO}:{digest.hexdigest()[:16]}"


def ensure_node_image(deb_path: str | Path) -> str:
    """Build the node image for a .deb unless its tag exists, and return the tag."""
    deb_path = Path(deb_path).resolve()
    tag = node_image_tag(deb_path)
    base = ensure_node_base_image()
    with _build_lock():
        if image_exists(tag):
            return tag
        with tempfile.TemporaryDirectory(prefix="dtrguard-node-build.") as build_dir:
            build = Path(build_dir)
            shutil.copy(deb_path, build / "dtrguard.deb")
            for name in STANDIN_FILES:
                shutil.copy(TESTS / name, build / name)
            (build / "docker.service").write_text(DOCKER_SERVICE_STANDIN)
            (build / "prepare.toml").write_text(PREPARE_CONFIG)
            container = f"dtrguard-node-build-{uuid.uuid4().hex[:12]}"
            try:
                result = docker_cli(
                    "run", "--pull", "never", "--name", container, "--network", "none",
                    "-v", f"{build}:/build:ro", "-v", "/var/run/docker.sock:/var/run/docker.sock",
                    # prepare-image builds an S3 client, whose credential chain must not reach EC2's metadata address.
                    "-e", "AWS_EC2_METADATA_DISABLED=true", "-e", "AWS_ACCESS_KEY_ID=image-build",
                    "-e", "AWS_SECRET_ACCESS_KEY=image-build",
                    base, "sh", "-c", RECIPE,
                    check=False,
                )  # fmt: skip
                if result.returncode != 0:
                    raise RuntimeError(
                        f"nodeimage: installing {deb_path.name} into {base} failed ({result.returncode}):\n"
                        f"{(result.stdout + result.stderr)[-3000:]}"
                    )
                changes = [arg for change in _COMMIT_CHANGES for arg in ("--change", change)]
                docker_cli("commit", *changes, container, tag)
            finally:
                docker_cli("rm", "-f", container, check=False)
    # NOTE: node images of earlier .debs stay cached; another checkout's test run may still use them.
    return tag
