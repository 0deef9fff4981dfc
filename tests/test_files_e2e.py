"""Files end to end against real S3, Postgres and Docker: files changed mid-backup, thousands of files, attributes."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dtrnode
from dtrnode import REPO, DtrNode, assert_no_secret, events_of, node_with_data, tree

pytestmark = pytest.mark.docker

# `dtrguard` with a writer beside the backup, simulated on the real files. Each file named in the
# first argument changes when the archiver first reads it, after it wrote the file's header. With
# the action "remove", the file is removed just before the archiver opens it.
BACKUP_WITH_WRITER = """
import json, os, sys
from pathlib import Path
from dtrguard.cli import main

changes = json.loads(sys.argv[1])
real_open, real_fdopen = os.open, os.fdopen
opened = {}


def change(path):
    action, argument = changes[path.name]
    if action == "truncate":
        os.truncate(path, argument)
    elif action == "append":
        with open(path, "ab") as handle:
            handle.write(argument.encode())


class ChangedOnFirstRead:
    def __init__(self, handle, path):
        self.handle, self.path, self.name = handle, path, handle.name

    def fileno(self):
        return self.handle.fileno()

    def read(self, size=-1):
        if self.path is not None:
            change(self.path)
            self.path = None
        return self.handle.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def recording_open(path, flags, *args, **kwargs):
    name = Path(path).name if isinstance(path, (str, Path)) else None
    if name in changes and changes[name][0] == "remove":
        os.unlink(path)
    descriptor = real_open(path, flags, *args, **kwargs)
    if name in changes:
        opened[descriptor] = Path(path)
    return descriptor


def changing_fdopen(descriptor, *args, **kwargs):
    handle = real_fdopen(descriptor, *args, **kwargs)
    path = opened.pop(descriptor, None)
    return handle if path is None else ChangedOnFirstRead(handle, path)


os.open, os.fdopen = recording_open, changing_fdopen
sys.exit(main(sys.argv[2:]))
"""


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == name]


def xattr_tree(root: Path, exclude: tuple[str, ...] = ("logs", "postgres-data")) -> dict[str, dict[str, bytes]]:
    """Map every file and directory under root, root included, to its extended attributes."""
    result = {}
    for directory, dirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(relative_dir, d)) not in exclude]
        for name in [".", *dirs, *files] if relative_dir == "." else [*dirs, *files]:
            path = Path(directory) / name
            if not path.is_symlink():
                relative = os.path.normpath(os.path.join(relative_dir, name))
                result[relative] = {key: os.getxattr(path, key) for key in os.listxattr(path)}
    return result


def non_directories(entries: dict[str, tuple[Any, ...]]) -> int:
    return sum(1 for kind, *_ in entries.values() if kind != stat.S_IFDIR)


@contextlib.contextmanager
def ramfs(path: Path) -> Iterator[Path]:
    """Mount a ramfs at path: a real file system that rejects every user xattr with EOPNOTSUPP."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazily, because DTR's containers still hold bind mounts from it until the fixture removes them.
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_files_changed_during_backup(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    local = node_a.var / "image-storage" / "local"
    shrinks, grows, vanishes = local / "shrinks.db", local / "grows.log", local / "vanishes.tmp"
    original = os.urandom(200_000)
    shrinks.write_bytes(original)
    grows.write_text("line\n" * 100)
    vanishes.write_text("removed before it is read")
    changes = {shrinks.name: ["truncate", 5_000], grows.name: ["append", "written meanwhile\n" * 50]}
    changes[vanishes.name] = ["remove", None]
    grows_before = grows.read_bytes()

    result = subprocess.run(
        [sys.executable, "-c", BACKUP_WITH_WRITER, json.dumps(changes), "--config", str(node_a.config_path), "backup"],
        capture_output=True, text=True, timeout=300, env=dtrnode.test_env(node_a.env), cwd=REPO,
    )  # fmt: skip
    assert_no_secret(result.stdout + result.stderr, "dtrguard backup")
    assert result.returncode == 0, result.stderr
    set_id = result.stdout.strip()
    events = events_of(result.stderr)
    [changed] = named(events, "archive.changed")
    assert changed["level"] == "warning"
    assert changed["directory"] == str(node_a.var)
    assert changed["count"] == 2
    assert changed["shrank"] == ["image-storage/local/shrinks.db"]
    assert changed["grew"] == ["image-storage/local/grows.log"]
    [skipped] = named(events, "archive.skipped")
    assert skipped["paths"] == ["image-storage/local/vanishes.tmp"]
    assert named(events, "backup.end")[0]["set_id"] == set_id
    etc_before, var_before = tree(node_a.etc), tree(node_a.var)
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    restore = node_b.command("restore", set_id)

    assert restore.returncode == 0, restore.stderr
    assert named(events_of(restore.stderr), "restore.end")[0]["set_id"] == set_id
    restored = node_b.var / "image-storage" / "local"
    # Read up to its new end, then zeros up to the size it had when it was opened.
    assert (restored / "shrinks.db").read_bytes() == original[:5_000] + bytes(len(original) - 5_000)
    assert (restored / "grows.log").read_bytes() == grows_before
    assert not (restored / "vanishes.tmp").exists()
    # The directory is archived before its files, so the archive has its mtime from before vanishes.tmp went.
    changed_paths = {"image-storage/local", "image-storage/local/shrinks.db", "image-storage/local/grows.log"}
    var_after = tree(node_b.var)
    assert {k: v for k, v in var_after.items() if k not in changed_paths} == {
        k: v for k, v in var_before.items() if k not in changed_paths
    }
    assert tree(node_b.etc) == etc_before


MANY = 5000


def test_many_files_restore_summarised(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    many = node_a.var / "many"
    for index in range(MANY):
        path = many / f"d{index // 500:02}" / f"f{index:04}"
        if index % 500 == 0:
            path.parent.mkdir(parents=True)
        path.write_text(str(index))
        os.setxattr(path, "user.index", str(index).encode())
    etc_before, var_before = tree(node_a.etc), tree(node_a.var)
    backup = node_a.command("backup")
    assert backup.returncode == 0, backup.stderr
    set_id = backup.stdout.strip()
    assert len(backup.stderr.splitlines()) < 100
    node_a.destroy()

    # The replacement node's var directory rejects user xattrs, so each of the 5000 files fails to get its own.
    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    with ramfs(node_b.var):
        daemon = node_b.start()
        try:
            restore = daemon.wait_for("restore.end")[0]
            daemon.wait_for("backup.end")
        finally:
            assert daemon.stop() == 0
        var_after = tree(node_b.var)

    assert restore["set_id"] == set_id
    assert var_after == var_before
    assert tree(node_b.etc) == etc_before
    assert len(daemon.events) + len(daemon.other_lines) < 100, daemon.dump()
    staged = [e for e in daemon.named("directory.staged") if e["directory"] == str(node_b.var)]
    assert [e["files"] for e in staged] == [non_directories(var_before)]
    assert non_directories(var_before) > MANY
    [rejected] = daemon.named("archive.xattrs_not_restored")
    assert rejected["level"] == "warning"
    assert rejected["count"] == MANY
    assert len(rejected["paths"]) == 20
    assert all(path.startswith("many/") for path in rejected["paths"])


def test_attributes_and_xattrs_restored(make_node: Any) -> None:
    node_a = node_with_data(make_node)
    shared = node_a.var / "image-storage"
    blob = shared / "local" / "blob-007"
    os.setxattr(blob, "user.digest", b"sha256:" + bytes(range(256)))  # not UTF-8, and with a NUL
    os.setxattr(shared, "user.role", b"image storage")
    os.setxattr(node_a.etc / "hub.yml", "user.managed-by", b"dtr")
    os.setxattr(node_a.var, "user.volume", b"var")
    etc_before, var_before = tree(node_a.etc), tree(node_a.var)
    xattrs_before = xattr_tree(node_a.etc), xattr_tree(node_a.var)
    backup = node_a.command("backup")
    assert backup.returncode == 0, backup.stderr
    set_id = backup.stdout.strip()
    node_a.destroy()

    node_b: DtrNode = make_node("i-0bbbbbbbbbbbbbbbb")
    daemon = node_b.start()
    try:
        restore = daemon.wait_for("restore.end")[0]
    finally:
        assert daemon.stop() == 0

    assert restore["set_id"] == set_id
    assert tree(node_b.etc) == etc_before
    assert tree(node_b.var) == var_before
    assert (xattr_tree(node_b.etc), xattr_tree(node_b.var)) == xattrs_before
    # Node B has node A's paths. The tree comparisons above cover these checks too, which name each case.
    directory = shared.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o2770
    assert (directory.st_uid, directory.st_gid) == (1000, 1000)
    assert stat.S_IMODE(blob.stat().st_mode) == 0o640
    assert (blob.stat().st_uid, blob.stat().st_gid) == (1000, 1000)
    assert os.getxattr(blob, "user.digest") == b"sha256:" + bytes(range(256))
    assert os.getxattr(node_b.var, "user.volume") == b"var"
    assert os.readlink(node_b.etc / "generatedConfigs" / "hub.yml") == "../hub.yml"
    assert [e for e in daemon.events if e["event"].startswith("archive.")] == []
    assert [e for e in daemon.events if e.get("level") == "error"] == []
