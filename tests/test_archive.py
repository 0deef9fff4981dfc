"""Archive round trips, poisoned archives and interrupted swaps, all on trees under tmp_path."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from dtrguard import archive
from dtrguard.archive import (
    WORK_DIR,
    SwapJournal,
    UnsafeArchive,
    excluded_paths,
    extract_archive,
    root_attributes,
    write_archive,
)

EXCLUDES = ["logs", "*.tmp"]
STAGING = f"{WORK_DIR}/new"
# Whole seconds plus a quarter, so a lost sub-second part shows up as a different mtime.
MTIME_NS = 1_600_000_000_250_000_000
SECOND_NS = 1_000_000_000


def describe(path: Path) -> tuple[Any, ...]:
    """Return the type, mode, owner and content (or link target) of path, and its mtime unless a symlink."""
    info = path.lstat()
    kind = stat.S_IFMT(info.st_mode)
    owner = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    if stat.S_ISLNK(info.st_mode):
        return (kind, info.st_uid, info.st_gid, os.readlink(path))
    if stat.S_ISREG(info.st_mode):
        return (kind, *owner, info.st_nlink, info.st_mtime_ns, path.read_bytes())
    return (kind, *owner, info.st_mtime_ns)


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Describe root and every entry below it, by relative path, leaving out the paths in skip and their subtrees."""
    result = {".": describe(root)}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        for entry in os.scandir(directory):
            relative = prefix + entry.name
            if relative in skip:
                continue
            result[relative] = describe(Path(entry.path))
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), relative + "/"))
    return result


def set_mtimes(root: Path) -> None:
    """Give every file and directory under root, root included, the mtime MTIME_NS; children first."""
    times = (MTIME_NS, MTIME_NS)
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(Path(directory) / name, ns=times, follow_symlinks=False)
    os.utime(root, ns=times)


def build_source(root: Path) -> None:
    """Build a tree with owners, setgid, links, an empty dir and paths that EXCLUDES matches."""
    root.mkdir()
    os.chmod(root, 0o750)
    conf = root / "conf"
    conf.mkdir()
    os.chown(conf, 1000, 1000)
    os.chmod(conf, 0o2770)
    settings = conf / "settings.yml"
    settings.write_text("storage: filesystem\n")
    os.chown(settings, 1000, 1000)
    os.chmod(settings, 0o640)
    secret = root / "secret.key"
    secret.write_bytes(b"\x00key\xff")
    os.chmod(secret, 0o600)
    (conf / "current.yml").symlink_to("settings.yml")
    (root / "link-to-conf").symlink_to("conf")
    data = root / "data"
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(4096))
    os.link(data / "blob", data / "blob-link")
    (data / "cache.tmp").write_text("excluded by glob")
    (root / "empty").mkdir()
    logs = root / "logs"
    logs.mkdir()
    (logs / "access.log").write_text("excluded directory")
    set_mtimes(root)
    os.utime(secret, ns=(MTIME_NS + 7 * SECOND_NS, MTIME_NS + 7 * SECOND_NS))


def build_old_target(root: Path) -> None:
    """Build a live tree that shares no content with build_source's tree."""
    root.mkdir()
    os.chmod(root, 0o700)
    (root / "conf").write_text("a file where the archive has a directory\n")
    (root / "old.txt").write_text("old")
    (root / "stale" / "nested").mkdir(parents=True)
    (root / "stale" / "nested" / "file").write_text("stale")


def archive_bytes(source: Path, excludes: list[str]) -> bytes:
    buffer = io.BytesIO()
    write_archive(source, excludes, buffer)
    return buffer.getvalue()


def restore(data: bytes, target: Path, excludes: list[str]) -> None:
    """Run the restore steps in the order dtrguard.restore runs them."""
    journal = SwapJournal(target)
    keep = excluded_paths(target, excludes)
    journal.begin("set-1")
    _, root = extract_archive(io.BytesIO(data), journal.staging, target)
    journal.swap("set-1", root_attributes(root), keep)


def expected_tree(source: Path) -> dict[str, tuple[Any, ...]]:
    """The source tree as a restore should reproduce it: without what EXCLUDES matches."""
    return tree(source, skip=("logs", "data/cache.tmp"))


# Round trip


def test_round_trip_reproduces_tree(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    build_old_target(target)

    restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    assert tree(target) == expected_tree(source)


def test_round_trip_keeps_attributes(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    build_old_target(target)

    restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    conf = (target / "conf").lstat()
    settings = (target / "conf" / "settings.yml").lstat()
    assert stat.S_IMODE(conf.st_mode) == 0o2770
    assert (conf.st_uid, conf.st_gid) == (1000, 1000)
    assert stat.S_IMODE(settings.st_mode) == 0o640
    assert (settings.st_uid, settings.st_gid) == (1000, 1000)
    assert stat.S_IMODE((target / "secret.key").lstat().st_mode) == 0o600
    assert os.readlink(target / "conf" / "current.yml") == "settings.yml"
    assert (target / "data" / "blob").stat().st_ino == (target / "data" / "blob-link").stat().st_ino
    assert (target / "empty").is_dir()
    assert (target / "secret.key").stat().st_mtime_ns == MTIME_NS + 7 * SECOND_NS
    assert (target / "conf").stat().st_mtime_ns == MTIME_NS
    assert target.stat().st_mtime_ns == MTIME_NS
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_round_trip_removes_old_files(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    build_old_target(target)

    restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    assert not (target / "old.txt").exists()
    assert not (target / "stale").exists()
    assert not (target / WORK_DIR).exists()


def test_archive_leaves_out_excluded_paths(tmp_path: Path) -> None:
    source = tmp_path / "source"
    build_source(source)
    (source / WORK_DIR).mkdir()

    with tarfile.open(fileobj=io.BytesIO(archive_bytes(source, EXCLUDES))) as tar:
        names = tar.getnames()

    assert "logs" not in names
    assert [name for name in names if name.startswith("logs/")] == []
    assert "data/cache.tmp" not in names
    assert WORK_DIR not in names
    assert "data/blob-link" in names


def test_archive_records_numeric_owners(tmp_path: Path) -> None:
    source = tmp_path / "source"
    build_source(source)

    with tarfile.open(fileobj=io.BytesIO(archive_bytes(source, EXCLUDES))) as tar:
        conf = tar.getmember("conf")
        link = tar.getmember("data/blob-link")

    assert (conf.uid, conf.gid) == (1000, 1000)
    assert (conf.uname, conf.gname) == ("", "")
    assert stat.S_IMODE(conf.mode) == 0o2770
    assert link.islnk()
    assert link.linkname == "data/blob"


def test_archive_skips_sockets_and_devices(tmp_path: Path) -> None:
    """Extraction rejects device files, so an archive with one could not be restored."""
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    data = source / "data"
    os.mkfifo(data / "pipe")
    os.mknod(data / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(data / "control.sock"))
        for path in (data / "pipe", data):
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
        expected = expected_tree(source)
        del expected["data/null"], expected["data/control.sock"]

        stats = write_archive(source, EXCLUDES, buffer := io.BytesIO())
    restore(buffer.getvalue(), target, EXCLUDES)

    assert sorted(stats.skipped) == ["data/control.sock", "data/null"]
    assert tree(target) == expected
    assert stat.S_ISFIFO((target / "data" / "pipe").lstat().st_mode)


def status(mode: int, uid: int = 1000, gid: int = 1000, mtime: float = 1_733_377_342.123456) -> os.stat_result:
    """Return a stat result with these fields, the others zero."""
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, int(mtime), 0, 0.0, mtime, 0.0))


NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")
# (name, status, type, size, link name, records): every field that can move a value into a pax record.
HEADER_CASES = [
    ("conf/hub.yml", status(0o100644), tarfile.REGTYPE, 120, "", {}),
    ("data", status(0o42755, uid=0, gid=0), tarfile.DIRTYPE, 0, "", {}),
    ("./", status(0o40700), tarfile.DIRTYPE, 0, "", {}),
    ("d/" * 60 + "long-name", status(0o100600), tarfile.REGTYPE, 1, "", {}),
    ("données/été.txt", status(0o100644), tarfile.REGTYPE, 3, "", {}),
    (NOT_UTF8, status(0o100644), tarfile.REGTYPE, 3, "", {}),
    ("link", status(0o120777), tarfile.SYMTYPE, 0, "../" * 40 + "cible-é", {}),
    ("second-name", status(0o100644), tarfile.LNKTYPE, 0, "first-name", {}),
    ("big-owner", status(0o100644, uid=3_000_000, gid=2_097_152), tarfile.REGTYPE, 0, "", {}),
    ("huge", status(0o100644), tarfile.REGTYPE, 9 * 1024**3, "", {}),
    ("whole-second", status(0o100644, mtime=1_700_000_000.0), tarfile.REGTYPE, 0, "", {}),
    ("before-1970", status(0o100644, mtime=-1.5), tarfile.REGTYPE, 0, "", {}),
    ("pipe", status(0o10600), tarfile.FIFOTYPE, 0, "", {}),
    ("tagged", status(0o100644), tarfile.REGTYPE, 0, "", {"SCHILY.xattr.user.a": "b", "SCHILY.xattr.user.c": ""}),
    ("raw-xattr", status(0o100644), tarfile.REGTYPE, 0, "", {"SCHILY.xattr.user.k": NOT_UTF8}),
    # A path record's length field grows from two digits to three, and from three to four.
    *[("é" + "n" * count, status(0o100644), tarfile.REGTYPE, 0, "", {}) for count in range(86, 94)],
    *[("é" + "n" * count, status(0o100644), tarfile.REGTYPE, 0, "", {}) for count in range(985, 993)],
]


@pytest.mark.parametrize(("name", "entry", "kind", "size", "linkname", "records"), HEADER_CASES)
def test_header_same_as_tarfile(
    name: str, entry: os.stat_result, kind: bytes, size: int, linkname: str, records: dict[str, str]
) -> None:
    """dtrguard's headers are tarfile's pax headers with numeric owners, byte for byte."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.pax_headers = kind, size, linkname, dict(records)
    info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(entry.st_mode), entry.st_uid, entry.st_gid, entry.st_mtime
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")
    assert archive._header(name, entry, kind, size, linkname, records) == expected


def test_archive_skips_vanished_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    expected = expected_tree(source)
    real_walk = archive.walk

    def listed_then_removed(root: Path, excluded: Any) -> Iterator[tuple[str, str]]:
        for relative, path in real_walk(root, excluded):
            if relative in ("secret.key", "conf/current.yml"):  # a file and a symlink, removed once listed
                os.unlink(path)
            yield relative, path

    monkeypatch.setattr(archive, "walk", listed_then_removed)

    stats = write_archive(source, EXCLUDES, buffer := io.BytesIO())
    restore(buffer.getvalue(), target, EXCLUDES)

    assert sorted(stats.skipped) == ["conf/current.yml", "secret.key"]
    del expected["secret.key"], expected["conf/current.yml"]
    assert tree(target) == expected


# Files that change while they are archived. Each change runs on the real file when the archiver
# first reads it, after it wrote the file's header, as a writer running beside the backup would.
Change = Callable[[Path], None]


class ChangedOnFirstRead:
    """An open file that runs change on its path just before the first read."""

    def __init__(self, handle: Any, change: Callable[[], None]):
        self.handle = handle
        self.change: Callable[[], None] | None = change
        self.name = handle.name

    def fileno(self) -> int:
        return int(self.handle.fileno())

    def read(self, size: int = -1) -> bytes:
        if self.change is not None:
            self.change()
            self.change = None
        return bytes(self.handle.read(size))

    def __enter__(self) -> ChangedOnFirstRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def archive_while(source: Path, changes: dict[str, Change], monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Archive source with EXCLUDES, applying changes[name] to the file called name while it is read."""
    real_open, real_fdopen = os.open, os.fdopen
    opened: dict[int, Path] = {}

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        descriptor = real_open(path, flags, *args, **kwargs)
        if isinstance(path, str | Path):
            opened[descriptor] = Path(path)
        return descriptor

    def changing_fdopen(descriptor: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(descriptor, *args, **kwargs)
        path = opened.pop(descriptor, None)
        change = changes.get(path.name) if path is not None else None
        if path is None or change is None:
            return handle
        return ChangedOnFirstRead(handle, lambda: change(path))

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fdopen", changing_fdopen)
    try:
        return archive_bytes(source, EXCLUDES)
    finally:
        monkeypatch.setattr(os, "open", real_open)
        monkeypatch.setattr(os, "fdopen", real_fdopen)


def truncate_to(size: int) -> Change:
    return lambda path: os.truncate(path, size)


def append(data: bytes) -> Change:
    def change(path: Path) -> None:
        with open(path, "ab") as handle:
            handle.write(data)

    return change


def rewrite(path: Path) -> None:
    """Write other bytes of the same length, with a new mtime."""
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(MTIME_NS + SECOND_NS, MTIME_NS + SECOND_NS))


def changed_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in logs if event["event"] == "archive.changed"]


def test_file_that_shrank_is_padded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    blob = (source / "data" / "blob").read_bytes()
    expected = expected_tree(source)

    with capture_logs() as logs:
        data = archive_while(source, {"blob": truncate_to(1000)}, monkeypatch)
    restore(data, target, EXCLUDES)

    restored = target / "data" / "blob"
    assert restored.read_bytes() == blob[:1000] + bytes(len(blob) - 1000)
    assert restored.stat().st_ino == (target / "data" / "blob-link").stat().st_ino
    assert restored.stat().st_mtime_ns == MTIME_NS  # as the file was when opened
    got = tree(target)
    assert {k: v for k, v in got.items() if not k.startswith("data/blob")} == {
        k: v for k, v in expected.items() if not k.startswith("data/blob")
    }
    [event] = changed_events(logs)
    assert event["log_level"] == "warning"
    assert (event["count"], event["shrank"], event["grew"], event["modified"]) == (1, ["data/blob"], [], [])


def test_file_that_grew_is_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    expected = expected_tree(source)

    with capture_logs() as logs:
        data = archive_while(source, {"secret.key": append(b"appended while archived" * 1000)}, monkeypatch)
    restore(data, target, EXCLUDES)

    assert tree(target) == expected  # content, size and mtime as when the file was opened
    [event] = changed_events(logs)
    assert (event["count"], event["shrank"], event["grew"], event["modified"]) == (1, [], ["secret.key"], [])


def test_file_rewritten_while_read_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)

    with capture_logs() as logs:
        data = archive_while(source, {"settings.yml": rewrite}, monkeypatch)
    restore(data, target, EXCLUDES)

    assert (target / "conf" / "settings.yml").stat().st_size == (source / "conf" / "settings.yml").stat().st_size
    [event] = changed_events(logs)
    assert (event["count"], event["modified"]) == (1, ["conf/settings.yml"])


def test_many_changed_files_named_in_one_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    for index in range(60):
        (source / f"shrinks-{index:02}").write_bytes(os.urandom(3000))
        (source / f"grows-{index:02}").write_bytes(b"g" * 100)
    changes = {f"shrinks-{index:02}": truncate_to(0) for index in range(60)}
    changes |= {f"grows-{index:02}": append(b"more") for index in range(60)}

    with capture_logs() as logs:
        data = archive_while(source, changes, monkeypatch)
    restore(data, target, [])

    [event] = changed_events(logs)
    assert event["count"] == 120
    assert event["counts"] == {"shrank": 60, "grew": 60, "modified": 0}
    assert len(event["shrank"]) == len(event["grew"]) == archive.EXAMPLES
    assert set(event["shrank"]) <= set(changes)
    assert (target / "shrinks-00").read_bytes() == bytes(3000)
    assert (target / "grows-59").read_bytes() == b"g" * 100
    assert len(logs) == 1


def test_file_replaced_by_symlink_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    outside = tmp_path / "outside.txt"
    outside.write_text("must not be archived")
    real_open = os.open

    def replace_then_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if isinstance(path, str) and os.path.basename(path) == "secret.key":  # replaced between listing and reading
            os.unlink(path)
            os.symlink(outside, path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", replace_then_open)
    stats = write_archive(source, EXCLUDES, buffer := io.BytesIO())
    monkeypatch.setattr(os, "open", real_open)
    restore(buffer.getvalue(), target, EXCLUDES)

    assert stats.skipped == ["secret.key"]
    assert not (target / "secret.key").exists()
    assert b"must not be archived" not in buffer.getvalue()


# Extended attributes

BINARY_VALUE = b"\x00\xffnot utf-8\n=\x00"


def set_xattrs(source: Path) -> None:
    """Give build_source's tree user xattrs on a file, a directory and the root, and a trusted one on a file."""
    os.setxattr(source / "conf" / "settings.yml", "user.checksum", b"sha256:abc")
    os.setxattr(source / "conf" / "settings.yml", "user.binary", BINARY_VALUE)
    os.setxattr(source / "conf", "user.role", b"conf directory")
    os.setxattr(source, "user.root", b"r\xc3\xa9pertoire")
    os.setxattr(source / "secret.key", "trusted.origin", b"host-bound")


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)}


def test_xattrs_round_trip(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    set_xattrs(source)
    os.utime(source / "conf" / "current.yml", ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    set_mtimes(source)
    build_old_target(target)

    with capture_logs() as logs:
        restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    assert xattrs(target / "conf" / "settings.yml") == {"user.checksum": b"sha256:abc", "user.binary": BINARY_VALUE}
    assert xattrs(target / "conf") == {"user.role": b"conf directory"}
    assert xattrs(target) == {"user.root": b"r\xc3\xa9pertoire"}
    assert xattrs(target / "secret.key") == {}  # trusted.* is not archived
    assert (target / "conf" / "current.yml").lstat().st_mtime_ns == MTIME_NS
    assert tree(target) == expected_tree(source)
    assert logs == []


def test_xattrs_stored_as_gnu_tar_does(tmp_path: Path) -> None:
    gnu_tar = shutil.which("tar")
    if gnu_tar is None:
        pytest.skip("GNU tar is not installed")
    source, by_gnu, gnu_source, target = (tmp_path / name for name in ("source", "by-gnu", "gnu-source", "target"))
    build_source(source)
    set_xattrs(source)
    (tmp_path / "a.tar").write_bytes(archive_bytes(source, EXCLUDES))
    by_gnu.mkdir()

    # GNU tar reads dtrguard's records...
    extract = [gnu_tar, "--xattrs", "--xattrs-include=user.*", "-xpf", str(tmp_path / "a.tar"), "-C", str(by_gnu)]
    subprocess.run(extract, check=True, capture_output=True)
    assert xattrs(by_gnu / "conf" / "settings.yml") == {"user.checksum": b"sha256:abc", "user.binary": BINARY_VALUE}
    # ...and dtrguard reads GNU tar's.
    gnu_source.mkdir()
    (gnu_source / "file").write_text("from GNU tar")
    os.setxattr(gnu_source / "file", "user.binary", BINARY_VALUE)
    create = [gnu_tar, "--xattrs", "--format=posix", "-cf", str(tmp_path / "b.tar"), "-C", str(gnu_source), "."]
    subprocess.run(create, check=True, capture_output=True)
    restore((tmp_path / "b.tar").read_bytes(), target, [])
    assert xattrs(target / "file") == {"user.binary": BINARY_VALUE}


def test_restore_sets_only_user_xattrs(tmp_path: Path) -> None:
    target = tmp_path / "target"
    info, data = regular("capable")
    info.pax_headers = {
        "SCHILY.xattr.user.kept": "yes",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
    }

    restore(tar_of([(info, data)]), target, [])

    assert xattrs(target / "capable") == {"user.kept": b"yes"}


@pytest.fixture
def no_xattrs_fs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mounted for the test: a real file system that rejects every user xattr with EOPNOTSUPP."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    try:
        probe = mount_point / "probe"
        probe.touch()
        with pytest.raises(OSError) as rejected:
            os.setxattr(probe, "user.probe", b"1")
        assert rejected.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
        probe.unlink()
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_xattrs_rejected_logged_once(tmp_path: Path, no_xattrs_fs: Path) -> None:
    source, target = tmp_path / "source", no_xattrs_fs / "target"
    build_source(source)
    set_xattrs(source)
    many = source / "many"
    many.mkdir()
    for index in range(300):
        (many / f"f{index:04}").write_bytes(b"x")
        os.setxattr(many / f"f{index:04}", "user.index", str(index).encode())
    set_mtimes(source)

    with capture_logs() as logs:
        restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    warnings = [event for event in logs if event["event"] == "archive.xattrs_not_restored"]
    # Two events: one for the entries of the archive, one for the target directory itself.
    assert [event["count"] for event in warnings] == [302, 1]
    assert all(event["log_level"] == "warning" for event in warnings)
    assert len(warnings[0]["paths"]) == archive.EXAMPLES
    assert warnings[0]["errors"] == [os.strerror(errno.EOPNOTSUPP)]
    assert warnings[1]["paths"] == ["."]
    assert len(logs) == 2
    assert tree(target) == expected_tree(source)  # owners, modes, links and mtimes are all there


def test_archive_of_tree_without_xattr_support(tmp_path: Path, no_xattrs_fs: Path) -> None:
    source, target = no_xattrs_fs / "source", tmp_path / "target"
    build_source(source)

    restore(archive_bytes(source, EXCLUDES), target, EXCLUDES)

    assert tree(target) == expected_tree(source)


EXTRACT_WITHOUT_CHOWN = """
import io, json, sys
from pathlib import Path
import structlog
from dtrguard import archive, log
log.configure(stream=sys.stdout)
target = Path(sys.argv[2])
journal = archive.SwapJournal(target)
journal.begin("set-1")
_, root = archive.extract_archive(io.BytesIO(Path(sys.argv[1]).read_bytes()), journal.staging, target)
journal.swap("set-1", archive.root_attributes(root), [])
"""


def test_owner_rejection_logged_once(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    build_source(source)
    for index in range(40):
        (source / "conf" / f"extra-{index}").write_text("owned by 1000")
        os.chown(source / "conf" / f"extra-{index}", 1000, 1000)
    set_mtimes(source)
    (tmp_path / "a.tar").write_bytes(archive_bytes(source, EXCLUDES))

    # dtrguard as root but without CAP_CHOWN: every chown to another owner fails with EPERM.
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-chown", "--", sys.executable, "-c", EXTRACT_WITHOUT_CHOWN,
         str(tmp_path / "a.tar"), str(target)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    events = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(events) == 1, result.stdout
    assert '"event": "archive.attributes_not_restored"' in events[0]
    # conf, and the 42 entries in it: group 1000, which the setgid dir gives even the symlink root made there.
    assert '"count": 43' in events[0]
    assert '"errors": ["owner: Operation not permitted"]' in events[0]
    settings = (target / "conf" / "settings.yml").lstat()
    assert (settings.st_uid, stat.S_IMODE(settings.st_mode)) == (0, 0o640)  # the mode is still set
    assert (target / "conf").stat().st_mtime_ns == MTIME_NS


def test_archive_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(archive.DtrguardError, match="not found"):
        write_archive(tmp_path / "absent", [], io.BytesIO())


# Poisoned archives

Member = tuple[tarfile.TarInfo, bytes | None]


def regular(name: str, data: bytes = b"poison") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME_NS // SECOND_NS
    return info, data


def directory(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def link(name: str, linkname: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def device(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info, None


def tar_of(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


# Each case builds its members from the canary's path and the target's path. The staging
# directory is target/.dtrguard-restore/new, so "../../../outside" from staging is the canary's directory.
POISONED: dict[str, Callable[[Path, Path], list[Member]]] = {
    "dotdot-name": lambda canary, target: [regular("fine"), regular("../x")],
    "dotdot-to-canary": lambda canary, target: [regular("../../../outside/canary.txt")],
    "absolute-name": lambda canary, target: [regular(str(canary))],
    "symlink-to-root-then-file": lambda canary, target: [link("evil", "/"), regular("evil" + str(canary))],
    "file-through-inner-symlink": lambda canary, target: [
        directory("sub"),
        link("inner", "sub"),
        regular("inner/x"),
    ],
    "symlink-parent-escape": lambda canary, target: [link("up", "../../outside")],
    "nested-symlink-escape": lambda canary, target: [directory("a"), link("a/up", "../../outside")],
    "symlink-absolute-outside": lambda canary, target: [link("abs", str(canary))],
    "symlink-chain-escape": lambda canary, target: [
        directory("deep"),
        link("deep/up", ".."),
        link("escape", "deep/up/../outside"),
    ],
    "symlink-chain-built-late": lambda canary, target: [
        link("escape", "deep/up/../outside"),
        directory("deep"),
        link("deep/up", ".."),
    ],
    "hardlink-dotdot": lambda canary, target: [regular("x"), link("h", "../x", tarfile.LNKTYPE)],
    "hardlink-absolute": lambda canary, target: [link("h", str(canary), tarfile.LNKTYPE)],
    "hardlink-through-symlink": lambda canary, target: [
        link("live", str(target / "live.txt")),
        link("h", "live", tarfile.LNKTYPE),
    ],
    "file-over-symlink": lambda canary, target: [
        link("live", str(target / "live.txt")),
        regular("live", b"written through the link"),
    ],
    "char-device": lambda canary, target: [device("null", tarfile.CHRTYPE)],
    "block-device": lambda canary, target: [device("disk", tarfile.BLKTYPE)],
    "work-dir-name": lambda canary, target: [directory(WORK_DIR), regular(f"{WORK_DIR}/journal.json", b"{}")],
    "directory-twice": lambda canary, target: [directory("a"), directory("a")],
    "root-twice": lambda canary, target: [directory("."), directory(".")],
    "directory-after-its-contents": lambda canary, target: [regular("a/b"), directory("a")],
}


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "canary.txt"
    path.parent.mkdir()
    path.write_text("canary")
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


@pytest.mark.parametrize("case", sorted(POISONED))
def test_poisoned_archive_rejected(case: str, tmp_path: Path, canary: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "live.txt").write_text("live")
    journal = SwapJournal(target)
    journal.begin("set-1")
    before = tree(tmp_path, skip=(f"target/{STAGING}",))
    data = tar_of(POISONED[case](canary, target))

    with pytest.raises(UnsafeArchive):
        extract_archive(io.BytesIO(data), journal.staging, target)

    assert canary.read_text() == "canary"
    assert canary.stat().st_mtime_ns == MTIME_NS
    assert (target / "live.txt").read_text() == "live"
    assert tree(tmp_path, skip=(f"target/{STAGING}",)) == before


def test_duplicate_member_rejected(tmp_path: Path) -> None:
    target = tmp_path / "target"
    journal = SwapJournal(target)
    journal.begin("set-1")
    data = tar_of([regular("a", b"first"), regular("a", b"second")])

    with pytest.raises(UnsafeArchive, match="more than once"):
        extract_archive(io.BytesIO(data), journal.staging, target)


def test_symlink_planted_in_staging_rejected(tmp_path: Path, canary: Path) -> None:
    """A symlink that another process made in staging is not written through."""
    target = tmp_path / "target"
    journal = SwapJournal(target)
    journal.begin("set-1")
    (journal.staging / "deep").mkdir()
    (journal.staging / "deep" / "planted").symlink_to(canary.parent)
    data = tar_of([regular("deep/planted/new", b"written through the planted link")])

    with pytest.raises(UnsafeArchive, match="resolves outside the target"):
        extract_archive(io.BytesIO(data), journal.staging, target)

    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt"]


def test_real_directories_keep_a_bounded_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive._RealDirectories, "LIMIT", 3)
    for name in ("a/b/c/d", "e"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "e")
    (tmp_path / "a" / "file").write_text("x")
    checked = archive._RealDirectories(str(tmp_path))

    assert checked.check("a/b/c/d")
    assert list(checked.checked) == ["a/b", "a/b/c", "a/b/c/d"]  # "a" was dropped for the fourth
    assert checked.check("a/b")
    assert list(checked.checked) == ["a/b/c", "a/b/c/d", "a/b"]  # the path used last is kept longest
    assert checked.check("a/missing")  # tarfile makes it, inside a checked directory
    assert "a/missing" not in checked.checked
    assert not checked.check("a/link")
    assert not checked.check("a/link/inner")
    assert not checked.check("a/file")
    assert checked.check("e")
    assert len(checked.checked) == 3


def test_symlink_loop_inside_accepted(tmp_path: Path) -> None:
    target = tmp_path / "target"
    journal = SwapJournal(target)
    journal.begin("set-1")
    data = tar_of([link("a", "b"), link("b", "a"), link("absolute", str(target / "a"))])

    stats, _ = extract_archive(io.BytesIO(data), journal.staging, target)

    assert stats.files == 3


class FailingStream(io.BytesIO):
    """A stream that raises ConnectionResetError once more than limit bytes were read."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() > self.limit:
            raise ConnectionResetError("download interrupted")
        return super().read(size)


def test_failed_extraction_keeps_target(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    for index in range(8):
        (source / f"file-{index}").write_bytes(os.urandom(64 * 1024))
    build_old_target(target)
    data = archive_bytes(source, [])
    journal = SwapJournal(target)
    journal.begin("set-1")
    before = tree(target, skip=(WORK_DIR,))

    with pytest.raises(ConnectionResetError):
        extract_archive(FailingStream(data, len(data) // 2), journal.staging, target)

    assert tree(target, skip=(WORK_DIR,)) == before
    assert (journal.read() or {}).get("phase") == "extracting"
    assert any(journal.staging.iterdir())


# Interrupted swaps


def build_swap(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """Build a live target with old entries and a kept logs dir, and an archive of new contents."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    (source / "conf").mkdir()
    (source / "conf" / "new.yml").write_text("new")
    (source / "data").mkdir()
    (source / "data" / "blob").write_bytes(b"new blob")
    (source / "new.txt").write_text("new")
    set_mtimes(source)
    target.mkdir()
    (target / "conf").mkdir()
    (target / "conf" / "old.yml").write_text("old")
    (target / "old-a").write_text("old")
    (target / "old-b").mkdir()
    (target / "logs").mkdir()
    (target / "logs" / "current.log").write_text("kept log")
    return source, target, archive_bytes(source, ["logs"])


# One rename carries logs, three move the other live entries aside, and four install the staged ones.
SWAP_RENAMES = 1 + 3 + 4


@pytest.mark.parametrize("crash_at", range(1, SWAP_RENAMES + 1))
def test_interrupted_swap_finishes_on_retry(crash_at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target, data = build_swap(tmp_path)
    kept_logs = {("logs" if name == "." else f"logs/{name}"): entry for name, entry in tree(target / "logs").items()}
    expected = tree(source) | kept_logs
    log_inode = (target / "logs" / "current.log").stat().st_ino
    journal = SwapJournal(target)
    journal.begin("set-1")
    _, root = extract_archive(io.BytesIO(data), journal.staging, target)
    real_rename = os.rename
    calls = 0

    def crashing_rename(source_path: Any, destination: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise OSError("simulated crash")
        real_rename(source_path, destination)

    monkeypatch.setattr(archive.os, "rename", crashing_rename)
    with pytest.raises(OSError, match="simulated crash"):
        journal.swap("set-1", root_attributes(root), excluded_paths(target, ["logs"]))
    monkeypatch.setattr(archive.os, "rename", real_rename)

    pending = journal.read() or {}
    SwapJournal(target).swap(str(pending.get("set_id")), None, excluded_paths(target, ["logs"]))

    assert pending.get("set_id") == "set-1"
    assert tree(target) == expected
    assert (target / "logs" / "current.log").stat().st_ino == log_inode
    assert not (target / WORK_DIR).exists()


def test_swap_count_matches_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards SWAP_RENAMES, so the crash points above cover every rename of a swap."""
    _, target, data = build_swap(tmp_path)
    journal = SwapJournal(target)
    journal.begin("set-1")
    _, root = extract_archive(io.BytesIO(data), journal.staging, target)
    real_rename = os.rename
    calls: list[str] = []

    def counting_rename(source_path: Any, destination: Any) -> None:
        calls.append(str(source_path))
        real_rename(source_path, destination)

    monkeypatch.setattr(archive.os, "rename", counting_rename)
    journal.swap("set-1", root_attributes(root), excluded_paths(target, ["logs"]))

    assert len(calls) == SWAP_RENAMES


def test_swap_resumes_after_cleanup_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target, data = build_swap(tmp_path)
    journal = SwapJournal(target)
    journal.begin("set-1")
    _, root = extract_archive(io.BytesIO(data), journal.staging, target)
    real_rmtree = shutil.rmtree

    def crashing_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        # A crash part-way through removing the work dir: the staging and old dirs are gone.
        real_rmtree(journal.staging)
        real_rmtree(journal.old)
        raise OSError("simulated crash")

    monkeypatch.setattr(archive.shutil, "rmtree", crashing_rmtree)
    with pytest.raises(OSError, match="simulated crash"):
        journal.swap("set-1", root_attributes(root), excluded_paths(target, ["logs"]))
    monkeypatch.setattr(archive.shutil, "rmtree", real_rmtree)

    SwapJournal(target).swap("set-1", None, excluded_paths(target, ["logs"]))

    assert not (target / WORK_DIR).exists()
    assert (target / "new.txt").read_text() == "new"
    assert (target / "logs" / "current.log").read_text() == "kept log"


# Kept paths


def test_swap_keeps_nested_excluded_file(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    pattern = ["postgres-data/PG_VERSION"]
    (source / "postgres-data").mkdir(parents=True)
    (source / "postgres-data" / "PG_VERSION").write_text("archived copy\n")
    (source / "postgres-data" / "pg_hba.conf").write_text("archived hba\n")
    (target / "postgres-data").mkdir(parents=True)
    pg_version = target / "postgres-data" / "PG_VERSION"
    pg_version.write_text("9.4\n")
    os.chown(pg_version, 999, 999)
    os.chmod(pg_version, 0o600)
    (target / "postgres-data" / "pg_hba.conf").write_text("live hba\n")
    before = pg_version.stat()

    restore(archive_bytes(source, pattern), target, pattern)

    after = pg_version.stat()
    assert pg_version.read_text() == "9.4\n"
    assert after.st_ino == before.st_ino
    assert (after.st_uid, after.st_gid) == (999, 999)
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (target / "postgres-data" / "pg_hba.conf").read_text() == "archived hba\n"


def test_swap_live_copy_beats_archived(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    (source / "postgres-data" / "base").mkdir(parents=True)
    (source / "postgres-data" / "base" / "1").write_text("archived")
    (target / "postgres-data").mkdir(parents=True)
    (target / "postgres-data" / "PG_VERSION").write_text("9.4\n")

    # An archive taken before the exclude pattern was added contains the path the restore keeps.
    restore(archive_bytes(source, []), target, ["postgres-data"])

    assert (target / "postgres-data" / "PG_VERSION").read_text() == "9.4\n"
    assert not (target / "postgres-data" / "base").exists()


def test_excluded_paths_lists_matches_only(tmp_path: Path) -> None:
    (tmp_path / "logs" / "deep").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.tmp").write_text("")
    (tmp_path / "data" / "keep.txt").write_text("")
    (tmp_path / WORK_DIR).mkdir()

    assert excluded_paths(tmp_path, EXCLUDES) == ["data/a.tmp", "logs"]


def test_swap_rejects_kept_path_through_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    (target / "postgres-data").mkdir(parents=True)
    (target / "postgres-data" / "PG_VERSION").write_text("9.4\n")
    (target / "other").mkdir()
    journal = SwapJournal(target)
    journal.begin("set-1")
    data = tar_of([directory("other"), link("postgres-data", str(target / "other"))])
    _, root = extract_archive(io.BytesIO(data), journal.staging, target)
    before = tree(target, skip=(WORK_DIR,))

    with pytest.raises(UnsafeArchive, match="PG_VERSION"):
        journal.swap("set-1", root_attributes(root), ["postgres-data/PG_VERSION"])

    assert tree(target, skip=(WORK_DIR,)) == before


def test_swap_without_staging_raises(tmp_path: Path) -> None:
    _, target, data = build_swap(tmp_path)
    journal = SwapJournal(target)
    journal.begin("set-1")
    journal.write("set-1", "clearing")
    shutil.rmtree(journal.staging)
    before = tree(target, skip=(WORK_DIR,))

    with pytest.raises(archive.IntegrityError, match="missing"):
        journal.swap("set-1", None, [])

    assert tree(target, skip=(WORK_DIR,)) == before


MEMORY_PEAKS = """
import json, os, sys, tracemalloc
from pathlib import Path
from dtrguard.archive import extract_archive, write_archive

class Counting:
    size = 0
    def write(self, data):
        self.size += len(data)
        return len(data)

source, entries, per_directory = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for index in range(entries):
    directory = source / f"d{index // per_directory}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"f{index}").write_bytes(b"x" * 10)
archive_path = source.with_suffix(".tar")
with open(archive_path, "wb") as out:
    write_archive(source, [], out)
tracemalloc.start()
write_archive(source, [], Counting())
write_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
staging = source.with_suffix(".staging")
staging.mkdir()
with open(archive_path, "rb") as stream:
    tracemalloc.start()
    extract_archive(stream, staging, source.with_suffix(".target"))
    extract_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
print(json.dumps([write_peak, extract_peak]))
"""


def _archive_peaks(tmp_path: Path, files: int, per_directory: int) -> tuple[int, int]:
    """Return the traced peaks of archiving files small files, per_directory to a directory, and of extracting them.

    Each measurement runs in a new interpreter, because tracemalloc counts the allocations of every
    thread in the process, including any that earlier tests left running.
    """
    source = tmp_path / f"source-{files}-{per_directory}"
    command = [sys.executable, "-c", MEMORY_PEAKS, str(source), str(files), str(per_directory)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    write_peak, extract_peak = json.loads(done.stdout)
    return write_peak, extract_peak


def test_archive_memory_flat_in_files(tmp_path: Path) -> None:
    """tarfile keeps every member and inode it handles; archiving and extraction drop them as they go."""
    small_write, small_extract = _archive_peaks(tmp_path, 1000, 500)
    large_write, large_extract = _archive_peaks(tmp_path, 5000, 500)
    # Kept, 4,000 more members cost about 1.5 MB when written and 4 MB when extracted.
    assert large_write - small_write < 512 * 1024
    assert large_extract - small_extract < 512 * 1024


def test_extraction_memory_flat_in_directories(tmp_path: Path) -> None:
    """Directory attributes wait on disk until the tree is complete, not in memory."""
    _, small = _archive_peaks(tmp_path, 1000, 1)
    _, large = _archive_peaks(tmp_path, 5000, 1)
    # Kept in memory as tarfile members, 4,000 more directories cost about 3 MB.
    assert large - small < 512 * 1024


def test_directory_attributes_read_back_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records split at every place a block can end still give each directory its own attributes."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    names = [f"d{index}" for index in range(60)] + [os.fsdecode(b"caf\xe9"), "\u00e9t\u00e9"]
    for index, name in enumerate(names):
        nested = source / name / "inner"
        nested.mkdir(parents=True)
        (nested / "file").write_bytes(os.fsencode(name))
        os.chown(source / name, 1000 + index, 2000 + index)
        os.chmod(nested, 0o700 | (index % 8) << 3)
        os.chmod(source / name, 0o2750 if index % 2 else 0o755)
        os.setxattr(source / name, "user.index", str(index).encode())
    set_mtimes(source)
    for index, name in enumerate(names):
        when = MTIME_NS + index * SECOND_NS
        os.utime(source / name / "inner", ns=(when, when))
        os.utime(source / name, ns=(when + SECOND_NS // 2, when + SECOND_NS // 2))
    monkeypatch.setattr(archive._Deferred, "BLOCK", 97)  # most blocks end inside a record

    restore(archive_bytes(source, []), target, [])

    assert tree(target, skip=(WORK_DIR,)) == tree(source)
    assert all(xattrs(target / name) == {"user.index": str(i).encode()} for i, name in enumerate(names))
