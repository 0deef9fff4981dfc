"""Build the Docker images the tests need from this host's own files.

Each image is a root filesystem of host binaries plus the libraries and loader
that `ldd` reports for them, imported with `docker import`. No registry is used.
Images are cached by tag: when the tag exists, nothing is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

POSTGRES_IMAGE = "dtrguard-test/postgres:15"
APP_IMAGE_REPO = "dtrguard-test/trusted-registry-{role}"
APP_VERSION = "1.4.3"
APP_BASE_IMAGE = "dtrguard-test/app-base:1"

PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
PG_LIB_DIR = Path("/usr/lib/postgresql/15/lib")
PG_SHARE_DIR = Path("/usr/share/postgresql/15")
ZONEINFO_DIR = Path("/usr/share/zoneinfo")
# glibc 2.36 does not build in C.UTF-8, so initdb needs these locale files.
C_UTF8_DIR = Path("/usr/lib/locale/C.utf8")
PG_TOOLS = ("postgres", "initdb", "pg_ctl", "pg_dump", "pg_dumpall", "pg_restore", "psql", "pg_isready")
# initdb runs `locale -a` to import the system collations.
PG_UTILS = ("sh", "sleep", "mkdir", "chmod", "cat", "ls", "rm", "env", "id", "locale")
APP_UTILS = ("sh", "sleep", "cat", "ls", "date", "mkdir", "rm", "touch", "env")
# llvmjit.so needs libLLVM and libz3 (about 130 MB on Debian 12). Without it,
# pg_jit_available() is false and queries run without JIT compilation.
SKIPPED_PG_LIBS = frozenset({"llvmjit.so"})
PG_UID = 999
PGDATA = "/var/lib/postgresql/data"
PG_ENTRYPOINT = "/usr/local/bin/dtrguard-postgres-entrypoint"

_ENTRYPOINT_SCRIPT = """#!/bin/sh
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    initdb -D "$PGDATA" -U postgres --auth=trust --locale=C.UTF-8 --encoding=UTF8
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
"""
# The kernel delivers SIGTERM to PID 1 only if it has a handler, so the loop traps
# it. `wait` returns as soon as a trapped signal arrives.
_APP_LOOP = "trap 'exit 0' TERM INT; while :; do sleep infinity & wait $!; done"
_PG_CHANGES = [
    f"ENV PATH={PG_BIN_DIR}:/usr/local/bin:/usr/bin:/bin",
    f"ENV PGDATA={PGDATA}",
    "ENV LANG=C.UTF-8",
    f"USER {PG_UID}:{PG_UID}",
    "WORKDIR /var/lib/postgresql",
    "EXPOSE 5432",
    f"ENTRYPOINT {json.dumps([PG_ENTRYPOINT])}",
]
_APP_CHANGES = ["ENV PATH=/usr/local/bin:/usr/bin:/bin", f"CMD {json.dumps(['/bin/sh', '-c', _APP_LOOP])}"]
_UTIL_PACKAGES = {"sh": "dash", "locale": "libc-bin", "ldd": "libc-bin"}
_NAME_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LOCK_FILE = Path(tempfile.gettempdir()) / "dtrguard-test-images.lock"
_thread_lock = threading.Lock()


def _require(path: Path, package: str) -> Path:
    """Return `path`, or raise naming the Debian package that ships it."""
    if not path.exists():
        raise RuntimeError(
            f"dtrguard test images: host file {path} is missing; install it with `apt-get install {package}`"
        )
    return path


def _host_util(name: str) -> Path:
    found = shutil.which(name, path="/usr/bin:/bin") or f"/usr/bin/{name}"
    return _require(Path(found), _UTIL_PACKAGES.get(name, "coreutils"))


def _shared_libs(binaries: Iterable[Path]) -> set[Path]:
    """Return the libraries and loader that `ldd` lists for the binaries."""
    ldd = _host_util("ldd")
    paths = [str(b) for b in binaries]
    out = subprocess.run([str(ldd), *paths], capture_output=True, text=True, check=False).stdout
    libs: set[Path] = set()
    owner = paths[0]
    for line in out.splitlines():
        if not line.startswith("\t"):  # With several files, ldd heads each list with a path.
            owner = line.rstrip(":")
        elif "not found" in line:
            raise RuntimeError(
                f"dtrguard test images: shared library {line.split()[0]} needed by "
                f"{owner} is missing on this host; reinstall the package that "
                f"ships it (find it with `dpkg -S {owner}`)"
            )
        else:
            libs.update(Path(w) for w in line.split() if w.startswith("/"))
    return libs


class _RootFs:
    """A root filesystem being assembled under a host directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.owned: dict[str, int] = {}  # Path in the image -> uid, also used as gid.
        for name in ("bin", "lib", "lib64", "sbin"):
            if Path("/", name).is_symlink():  # Keeps the host's merged /usr layout.
                os.symlink(os.readlink(Path("/", name)), root / name)

    def _dest(self, host: Path, name: str | None = None) -> Path:
        real_dir = os.path.realpath(host.parent)
        dest = self.root / real_dir.lstrip("/") / (name or host.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def add_file(self, host: Path, name: str | None = None) -> None:
        shutil.copy2(host, self._dest(host, name))  # Copies the target's content.

    def add_tree(self, host: Path) -> None:
        inside = os.path.realpath(host) + "/"

        def outside(folder: str, names: list[str]) -> list[str]:
            paths = [os.path.join(folder, n) for n in names]
            return [
                os.path.basename(p) for p in paths if os.path.islink(p) and not os.path.realpath(p).startswith(inside)
            ]

        shutil.copytree(host, self._dest(host), symlinks=True, ignore=outside)

    def add_binaries(self, binaries: dict[str, Path]) -> None:
        for name, host in binaries.items():
            self.add_file(host, name)
        for lib in _shared_libs(binaries.values()):
            self.add_file(lib)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        dest = self.root / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(mode)

    def mkdir(self, path: str, mode: int, uid: int = 0) -> None:
        dest = self.root / path.lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        dest.chmod(mode)
        if uid:
            self.owned[path.lstrip("/")] = uid

    def _set_owner(self, info: tarfile.TarInfo) -> tarfile.TarInfo:
        uid = next((u for p, u in self.owned.items() if info.name == p or info.name.startswith(p + "/")), 0)
        info.uid = info.gid = uid
        info.uname = info.gname = ""
        return info

    def tar(self, dest: Path) -> None:
        with tarfile.open(dest, "w") as tar:
            for child in sorted(self.root.iterdir()):
                tar.add(child, arcname=child.name, filter=self._set_owner)


def _base_etc(fs: _RootFs, users: str, groups: str) -> None:
    fs.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n" + users)
    fs.write("/etc/group", "root:x:0:\n" + groups)
    fs.write("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n")
    fs.mkdir("/tmp", 0o1777)
    fs.mkdir("/root", 0o700)


def _populate_postgres(fs: _RootFs) -> None:
    binaries = {t: _require(PG_BIN_DIR / t, "postgresql-15") for t in PG_TOOLS}
    _require(PG_LIB_DIR / "plpgsql.so", "postgresql-15")
    for lib in sorted(PG_LIB_DIR.glob("*.so")):
        if lib.name not in SKIPPED_PG_LIBS:
            binaries[lib.name] = lib
    binaries.update({u: _host_util(u) for u in PG_UTILS})
    fs.add_binaries(binaries)
    fs.add_tree(_require(PG_SHARE_DIR, "postgresql-15"))
    fs.add_tree(_require(ZONEINFO_DIR / "Etc", "tzdata").parent)
    fs.add_tree(_require(C_UTF8_DIR, "libc-bin"))
    _base_etc(fs, f"postgres:x:{PG_UID}:{PG_UID}::/var/lib/postgresql:/bin/sh\n", f"postgres:x:{PG_UID}:\n")
    os.symlink("/usr/share/zoneinfo/Etc/UTC", fs.root / "etc/localtime")
    fs.mkdir("/var/run/postgresql", 0o2775, PG_UID)
    fs.mkdir("/var/lib/postgresql", 0o755, PG_UID)
    fs.mkdir(PGDATA, 0o700, PG_UID)
    fs.write(PG_ENTRYPOINT, _ENTRYPOINT_SCRIPT, 0o755)


def _populate_app(fs: _RootFs) -> None:
    fs.add_binaries({u: _host_util(u) for u in APP_UTILS})
    _base_etc(fs, "", "")


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """Serialize builds across threads and across processes on this host."""
    with _thread_lock, open(_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # Released when the file closes.
        yield


@contextlib.contextmanager
def _docker() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
    except DockerException as exc:
        raise RuntimeError(f"dtrguard test images: cannot reach the Docker daemon ({exc}); start dockerd") from exc
    with contextlib.closing(client):
        yield client


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.api.inspect_image(tag)
    except ImageNotFound:
        return False
    return True


def _build(client: docker.DockerClient, tag: str, populate: Callable[[_RootFs], None], changes: list[str]) -> None:
    """Assemble a root filesystem with `populate` and import it as `tag`."""
    repository, _, version = tag.rpartition(":")
    with tempfile.TemporaryDirectory(prefix="dtrguard-image-") as tmp:
        fs = _RootFs(Path(tmp, "rootfs"))
        populate(fs)
        tar_path = Path(tmp, "rootfs.tar")
        fs.tar(tar_path)
        reply = client.api.import_image(src=str(tar_path), repository=repository, tag=version, changes=changes)
    if '"error' in str(reply) or not _exists(client, tag):
        raise RuntimeError(f"dtrguard test images: importing {tag} failed: {reply}")


def ensure_postgres_image() -> str:
    """Build the PostgreSQL 15 image unless its tag exists, and return the tag.

    NOTE: the cache is keyed by tag only, so an image built before a host
    package upgrade stays in use until someone removes it.
    """
    with _build_lock(), _docker() as client:
        if not _exists(client, POSTGRES_IMAGE):
            _build(client, POSTGRES_IMAGE, _populate_postgres, _PG_CHANGES)
    return POSTGRES_IMAGE


def ensure_app_image(role: str, version: str = APP_VERSION) -> str:
    """Tag the idle app base image for `role` and `version`, and return the tag."""
    if not _NAME_RE.fullmatch(role) or not _TAG_RE.fullmatch(version):
        raise ValueError(f"invalid image role {role!r} or version {version!r}")
    repository = APP_IMAGE_REPO.format(role=role)
    tag = f"{repository}:{version}"
    with _build_lock(), _docker() as client:
        if not _exists(client, tag):
            if not _exists(client, APP_BASE_IMAGE):
                _build(client, APP_BASE_IMAGE, _populate_app, _APP_CHANGES)
            client.api.tag(APP_BASE_IMAGE, repository, version)
    return tag
