"""Directory to tar stream and back, keeping numeric owners, modes, symlinks, mtimes and user xattrs.

Extraction trusts nothing in the archive. Absolute names, `..`, device files, repeated names and
links that resolve outside the target raise UnsafeArchive. Members are written only into a
staging directory, which replaces the live contents once the whole archive was read and checked.

Extended attributes of files and directories are kept in the `user.` namespace only. Each is
stored as a PAX record `SCHILY.xattr.<name>` with the value's raw bytes, the form GNU tar reads
and writes with --xattrs. The other namespaces are left out on purpose:

- `security.` contains SELinux labels, IMA hashes and file capabilities. They belong to the
  host's policy, and an archive that could set them could grant privileges.
- `trusted.` contains metadata of kernel users such as overlayfs, which means nothing outside
  the mount it was made for.
- `system.` contains ACLs, which are not archived.

A restore sets only `user.` records, whatever the archive contains.

Trouble with single files never logs one event per file. A backup names the files that changed
while they were read in one `archive.changed` warning. A restore names the entries whose owner,
mode, mtime or xattrs the target file system rejected in one warning per kind. Each of these
events has the count and at most EXAMPLES paths.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import json
import os
import shutil
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from dtrguard import log
from dtrguard.errors import DtrguardError, IntegrityError

_log = log.get("archive")
# Every member is checked before extraction, so tarfile's own filter must not alter owners or
# modes. The filter argument exists from Python 3.11.4 (Debian 12 ships 3.11.2, without it), and
# from 3.14 on the default filter would drop setgid bits and owners.
_TRUSTED: dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
WORK_DIR = ".dtrguard-restore"
XATTR_RECORD = "SCHILY.xattr."
KEPT_XATTRS = ("user.",)  # see the module docstring for why only these
EXAMPLES = 20  # paths named in one summary event
_NOT_OURS = "the archive is not from dtrguard"
# Both names exist in errno, and Linux gives them the same number.
_UNSUPPORTED = {errno.ENOTSUP, errno.EOPNOTSUPP}


class Writable(Protocol):
    """Anything with a write method, such as an open file or an ArtifactUpload."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


@dataclass
class ArchiveStats:
    """Counts of the files and bytes written to or read from one archive, and the paths to report.

    Writing fills four lists. skipped: entries that vanished, sockets, device files, and paths that
    stopped being a regular file. shrank: padded with zeros to the size recorded in the archive. grew:
    cut at that size. modified: the same size, but written while it was read. Extracting fills
    attributes_failed and xattrs_failed with (path, reason) pairs.
    """

    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    shrank: list[str] = field(default_factory=list)
    grew: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    attributes_failed: list[tuple[str, str]] = field(default_factory=list)
    xattrs_failed: list[tuple[str, str]] = field(default_factory=list)


class Excluder:
    """Matches paths relative to a directory against exclude patterns (fnmatch, / separated).

    A pattern that matches a directory excludes everything below it.
    """

    def __init__(self, patterns: Sequence[str]):
        self.patterns = tuple(p.strip("/") for p in patterns if p.strip("/")) + (WORK_DIR,)

    def __call__(self, relative: str) -> bool:
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.patterns)


def walk(root: Path, excluded: Excluder) -> Iterator[tuple[str, str]]:
    """Yield (relative name, path) for root and everything below it that is not excluded."""
    yield ".", str(root)
    stack = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):  # removed, or replaced by a file, since it was listed
            continue
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if excluded(relative):
                continue
            yield relative, entry.path
            if entry.is_dir(follow_symlinks=False):
                stack.append((entry.path, f"{relative}/"))


def write_archive(root: Path, excludes: Sequence[str], out: Writable) -> ArchiveStats:
    """Write root as a PAX tar stream to out; the archive stays readable however the tree changes meanwhile.

    An entry that vanishes before it is read is skipped and returned in stats.skipped, for the
    caller to log. A regular file is archived with the size it has when it is opened. A file that
    ends sooner is padded with zeros to that size, and a file that grew is cut at it. Those files,
    and files written to while they were read, are named in one `archive.changed` warning.
    """
    if not root.is_dir():
        raise DtrguardError(
            f"directory {root} not found",
            hint="create it, or remove it from [[directories]] in the config",
        )
    stats = ArchiveStats()
    writer = _TarWriter(out)
    for relative, path in walk(root, Excluder(excludes)):
        _add(writer, relative, path, stats)
    writer.close()
    changed = len(stats.shrank) + len(stats.grew) + len(stats.modified)
    if changed:
        _log.warning(
            "archive.changed",
            directory=str(root),
            count=changed,
            counts={"shrank": len(stats.shrank), "grew": len(stats.grew), "modified": len(stats.modified)},
            shrank=stats.shrank[:EXAMPLES],
            grew=stats.grew[:EXAMPLES],
            modified=stats.modified[:EXAMPLES],
            detail="these files changed while they were archived: files that shrank are padded with zeros"
            " to the size they had when opened, files that grew are cut at it",
        )
    return stats


def _forget_members(tar: tarfile.TarFile) -> None:
    """Drop the members tarfile keeps in its list, so memory does not grow with the number of files.

    A stream is read once from start to end, so the list is never used again.
    """
    members = getattr(tar, "members", None)
    if isinstance(members, list):
        members.clear()


class _TarWriter:
    """Writes a PAX tar stream: each member's header blocks, then its data padded to a block.

    The headers are built here (see _header), with numeric owners only, and hard links are
    recorded only for files with more than one name. tarfile's writer would look up a user and a
    group name for every member and keep every member in a list.
    """

    COPY = 1 << 20  # bytes of file data read at a time

    def __init__(self, out: Writable):
        self.out = out
        self.offset = 0
        self.names: dict[tuple[int, int], str] = {}  # (inode, device) of files with several names

    def add(self, header: bytes, size: int = 0, data: _Padded | None = None) -> None:
        self._write(header)
        if data is None:
            return
        while chunk := data.read(self.COPY):
            self._write(chunk)
        remainder = size % BLOCK
        if remainder:
            self._write(bytes(BLOCK - remainder))

    def link_name(self, relative: str, status: os.stat_result) -> str | None:
        """Return the name an earlier member gave this file, or None after recording relative as its name."""
        if status.st_nlink < 2:
            return None
        inode = (status.st_ino, status.st_dev)
        earlier = self.names.get(inode)
        if earlier is None:
            self.names[inode] = relative
        return earlier

    def close(self) -> None:
        """End the archive with two zero blocks and pad it to a whole record, as tar does."""
        self._write(bytes(2 * BLOCK))
        remainder = self.offset % tarfile.RECORDSIZE
        if remainder:
            self._write(bytes(tarfile.RECORDSIZE - remainder))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)


BLOCK = 512
# A ustar header: name, mode, uid, gid, size, mtime, checksum, type, link name, magic and version,
# user and group names, device numbers, name prefix, padding (POSIX.1-2001, pax format).
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")
_MAGIC = b"ustar\x0000"
_CHECKSUM = slice(148, 156)
_NO_CHECKSUM = b" " * 8  # the checksum is computed with its own field as spaces
# The numeric fields and their widths in bytes: octal digits, then a NUL. A value too large for its
# field, or with a fraction, goes into a pax record.
_NUMBERS = (("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12))


def _header(
    relative: str,
    status: os.stat_result,
    kind: bytes,
    size: int = 0,
    linkname: str = "",
    records: dict[str, str] | None = None,
) -> bytes:
    """Return the header blocks of a member: a pax extended header when needed, then the ustar block.

    The extended header carries what the ustar block cannot: the exact mtime (always, since it has
    fractions of a second), xattrs, names that are long or not ASCII, and numbers too large for
    their field. The output is the same as that of tarfile's TarInfo.tobuf in pax format with
    numeric owners, which tests/test_archive.py checks.
    """
    name = relative + "/" if kind == tarfile.DIRTYPE and not relative.endswith("/") else relative
    pax = dict(records or {})
    for key, text in (("path", name), ("linkpath", linkname)):
        if not text.isascii() or len(text) > 100:
            pax.setdefault(key, text)
    values = {"uid": status.st_uid, "gid": status.st_gid, "size": size, "mtime": status.st_mtime}
    fields = {}
    for key, digits in _NUMBERS:
        value = values[key]
        whole = round(value)
        if 0 <= whole < 8 ** (digits - 1):
            fields[key] = whole
            if isinstance(value, float):
                pax.setdefault(key, str(value))
        else:
            fields[key] = 0
            pax.setdefault(key, str(value))
    block = _ustar(
        name.encode("ascii", "replace"),
        stat.S_IMODE(status.st_mode),
        fields["uid"],
        fields["gid"],
        fields["size"],
        fields["mtime"],
        kind,
        linkname.encode("ascii", "replace"),
    )
    return _pax_header(pax) + block if pax else block


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, linkname: bytes) -> bytes:
    """Return one ustar header block, its checksum filled in. Names longer than their field are cut."""
    block = _USTAR.pack(
        name, b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid, b"%011o\0" % size, b"%011o\0" % mtime,
        _NO_CHECKSUM, kind, linkname, _MAGIC, b"", b"", b"", b"", b"",
    )  # fmt: skip
    return block[: _CHECKSUM.start] + b"%06o\0 " % sum(block) + block[_CHECKSUM.stop :]


def _pax_header(pax: dict[str, str]) -> bytes:
    """Return an extended header block and its records, padded to a block.

    Each record is "<length> <keyword>=<value>\\n", its length counting its own digits. Values
    that contain bytes that are not UTF-8 (kept as surrogates) are written as their raw bytes, after
    a first record hdrcharset=BINARY.
    """
    binary = not all(_is_utf8(value) for value in pax.values())
    records = [b"21 hdrcharset=BINARY\n"] if binary else []
    for key, value in pax.items():
        line = b" " + key.encode() + b"=" + value.encode("utf-8", "surrogateescape" if binary else "strict") + b"\n"
        digits = len(str(len(line)))
        if len(str(len(line) + digits)) > digits:
            digits += 1
        records.append(str(len(line) + digits).encode() + line)
    body = b"".join(records)
    block = _ustar(b"././@PaxHeader", 0, 0, 0, len(body), 0, tarfile.XHDTYPE, b"")
    return block + body + bytes(-len(body) % BLOCK)


def _add(writer: _TarWriter, relative: str, path: str, stats: ArchiveStats) -> None:
    """Archive one entry. Sockets and device files are skipped: a restore creates neither."""
    try:
        status = os.lstat(path)
        if stat.S_ISREG(status.st_mode):
            _add_file(writer, relative, path, stats)
            return
        if stat.S_ISDIR(status.st_mode):
            header = _header(relative, status, tarfile.DIRTYPE, records=_xattr_records(path))
        elif stat.S_ISLNK(status.st_mode):
            header = _header(relative, status, tarfile.SYMTYPE, linkname=os.readlink(path))
        elif stat.S_ISFIFO(status.st_mode):
            header = _header(relative, status, tarfile.FIFOTYPE)
        else:
            stats.skipped.append(relative)
            return
    except OSError as exc:
        if not _replaced(exc):
            raise
        stats.skipped.append(relative)
        return
    writer.add(header)


def _add_file(writer: _TarWriter, relative: str, path: str, stats: ArchiveStats) -> None:
    """Archive a regular file as it is once open: its header comes from the open file, then its data.

    The open does not follow a symlink or block on a FIFO, in case the path was replaced since it
    was listed. Hard links are recorded by the inode that was opened, so a link always names data
    that is in the archive.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            stats.skipped.append(relative)
            return
        earlier = writer.link_name(relative, before)
        if earlier is not None:  # another name of a file already in the archive
            writer.add(_header(relative, before, tarfile.LNKTYPE, linkname=earlier))
            return
        size = before.st_size
        reader = _Padded(handle, size)
        writer.add(_header(relative, before, tarfile.REGTYPE, size, records=_xattr_records(descriptor)), size, reader)
        if reader.padded:
            stats.shrank.append(relative)
        elif handle.read(1):
            stats.grew.append(relative)
        else:
            after = os.fstat(descriptor)
            if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
                stats.modified.append(relative)
    stats.files += 1
    stats.bytes += size


def _replaced(exc: OSError) -> bool:
    """Report whether an error means the path was removed or replaced since its directory was listed.

    ELOOP means a file became a symlink before the open, which does not follow one. EINVAL means
    a symlink stopped being one before readlink.
    """
    return isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.errno in (errno.ELOOP, errno.EINVAL)


class _Padded:
    """A reader of exactly size bytes of a file, with zeros in place of what a file that shrank no longer has."""

    def __init__(self, handle: IO[bytes], size: int):
        self.handle = handle
        self.remaining = size
        self.padded = 0

    def read(self, count: int = -1, /) -> bytes:
        count = self.remaining if count < 0 else min(count, self.remaining)
        self.remaining -= count
        data = b"" if self.padded else self.handle.read(count)
        if len(data) < count:  # a buffered read returns less only at the end of the file
            self.padded += count - len(data)
            data += bytes(count - len(data))
        return data


def _xattr_records(target: str | int) -> dict[str, str]:
    """Return the kept extended attributes of a directory path or an open file, as PAX records.

    A value's bytes are stored as they are: bytes that are not UTF-8 make the header say
    hdrcharset=BINARY and are written back unchanged (surrogateescape).
    """
    nofollow = {"follow_symlinks": False} if isinstance(target, str) else {}  # an fd takes no follow_symlinks
    try:
        names = os.listxattr(target, **nofollow)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED or isinstance(exc, FileNotFoundError):
            return {}
        raise
    records = {}
    for name in sorted(names):
        # NOTE: a name with "=" or bytes that are not UTF-8 cannot be a PAX keyword, so it is not archived.
        if not name.startswith(KEPT_XATTRS) or "=" in name or not _is_utf8(name):
            continue
        try:
            value = os.getxattr(target, name, **nofollow)
        except OSError as exc:
            if exc.errno == errno.ENODATA or isinstance(exc, FileNotFoundError):  # removed since it was listed
                continue
            raise
        records[XATTR_RECORD + name] = value.decode("utf-8", "surrogateescape")
    return records


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def xattrs_of(member: tarfile.TarInfo) -> dict[str, bytes]:
    """Return the extended attributes an archive member carries in the kept namespaces."""
    result = {}
    for key, value in member.pax_headers.items():
        name = key[len(XATTR_RECORD) :]
        if key.startswith(XATTR_RECORD) and name.startswith(KEPT_XATTRS):
            result[name] = value.encode("utf-8", "surrogateescape")
    return result


def excluded_paths(root: Path, excludes: Sequence[str]) -> list[str]:
    """List the relative paths under root that the exclude patterns match (not their contents)."""
    excluded = Excluder(excludes)
    found = []
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if relative == WORK_DIR:
                continue
            if excluded(relative):
                found.append(relative)
            elif entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), f"{relative}/"))
    return sorted(found)


class UnsafeArchive(IntegrityError):
    """An archive member would write outside the target or create a device file."""


def _check_member(member: tarfile.TarInfo, target: Path, links: set[str]) -> str:
    """Return the member's normalised relative name, or raise UnsafeArchive.

    Names are split as strings, not as pathlib paths: pathlib interns every name part, which
    grows the interpreter's table of interned strings with the number of distinct names.
    """
    name = member.name
    if name.startswith("/"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute name", hint=_NOT_OURS)
    parts = [part for part in name.split("/") if part and part != "."]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {name!r} contains ..", hint=_NOT_OURS)
    relative = "/".join(parts) or "."
    if parts and parts[0] == WORK_DIR:
        raise UnsafeArchive(
            f"archive member {name!r} is inside the restore work dir {WORK_DIR}",
            hint=_NOT_OURS,
        )
    if member.ischr() or member.isblk():
        raise UnsafeArchive(f"archive member {name!r} is a device file", hint=_NOT_OURS)
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
        raise UnsafeArchive(f"archive member {name!r} has unsupported type {member.type!r}")
    for count in range(len(parts) - 1, 0, -1):
        parent = "/".join(parts[:count])
        if parent in links:
            raise UnsafeArchive(f"archive member {name!r} is written through the symlink {parent!r}")
    if member.issym():
        resolved = os.path.normpath(os.path.join(str(target), *parts[:-1], member.linkname))
        if not _within(resolved, str(target)):
            raise UnsafeArchive(
                f"archive member {name!r} is a symlink to {member.linkname!r}, outside {target}",
                hint=_NOT_OURS,
            )
        links.add(relative)
    if member.islnk():
        link = member.linkname
        if link.startswith("/") or ".." in link.split("/"):
            raise UnsafeArchive(f"archive member {name!r} is a hard link to {member.linkname!r}, outside the archive")
    return relative


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# Linux's limit on the symlinks followed in one path lookup (MAXSYMLINKS in the kernel).
_MAX_SYMLINKS = 40


def _link_stays_inside(staging: Path, target: Path, relative: str) -> bool:
    """Return whether the staged symlink at relative will resolve inside target once staging has moved there.

    Each staged symlink met on the way is followed, as the kernel will follow it, so a chain such
    as a -> b/c/.. with b/c -> .. is caught although every link text on its own stays inside.
    """
    target_parts = PurePosixPath(target).parts
    pending = list(PurePosixPath(relative).parts)
    resolved: list[str] = []
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not resolved:
                return False
            resolved.pop()
            continue
        resolved.append(part)
        path = staging.joinpath(*resolved)
        if not path.is_symlink():
            continue
        followed += 1
        if followed > _MAX_SYMLINKS:
            return True  # a symlink loop: the lookup fails with ELOOP, so it reaches nothing
        link = PurePosixPath(os.readlink(path))
        resolved.pop()
        if link.is_absolute():
            if link.parts[: len(target_parts)] != target_parts:
                return False
            resolved = []
            link = PurePosixPath(*link.parts[len(target_parts) :])
        pending[:0] = link.parts
    return True


def _check_hardlink(member: tarfile.TarInfo, staging: Path) -> None:
    """Raise UnsafeArchive unless the hard link's source is a regular file already extracted into staging.

    os.link follows symlinks, so a source that is a staged symlink could link a file outside staging.
    dtrguard's archives only hold hard links to regular files that come earlier in the archive.
    """
    source = staging / PurePosixPath(member.linkname)
    try:
        source_is_file = stat.S_ISREG(os.lstat(source).st_mode)
    except FileNotFoundError:
        source_is_file = False
    if not source_is_file or not _within(os.path.realpath(source.parent), os.path.realpath(staging)):
        raise UnsafeArchive(
            f"archive member {member.name!r} is a hard link to {member.linkname!r},"
            " which is not a regular file earlier in the archive",
            hint=_NOT_OURS,
        )


def extract_archive(stream: IO[bytes], staging: Path, target: Path) -> tuple[ArchiveStats, tarfile.TarInfo | None]:
    """Extract a tar stream into the empty directory staging, checking every member.

    Links are checked against target, where the files will finally live. Returns the stats and
    the archive's root entry ("."), whose owner, mode and mtime belong to target itself.

    A directory's attributes are set once the whole tree is in place, because each entry made in
    it changes its mtime. Until then they wait in an unnamed file beside staging, so memory does
    not grow with the number of directories.

    Owners, modes, mtimes and kept xattrs that the file system rejects do not stop the extraction.
    Each kind is logged once, as a warning with the count and at most EXAMPLES paths.
    """
    stats = ArchiveStats()
    links: set[str] = set()
    real_directories = _RealDirectories(str(staging))
    root_info = None
    with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8") as tar, _Deferred(staging.parent) as directories:
        for member in tar:
            _forget_members(tar)
            relative = _check_member(member, target, links)
            if relative == ".":
                if root_info is not None:
                    raise UnsafeArchive("archive member '.' appears more than once", hint=_NOT_OURS)
                root_info = member
                continue
            destination = os.path.join(staging, relative)  # a str: pathlib would intern every name part
            if not real_directories.check(relative.rpartition("/")[0]):
                raise UnsafeArchive(f"archive member {member.name!r} resolves outside the target")
            # An entry already there is a repeated name, which could replace a checked symlink or
            # write through it, or a directory that tarfile made for an earlier member inside it.
            # dtrguard writes each directory before its contents, so neither is in its archives.
            if os.path.lexists(destination):
                raise UnsafeArchive(
                    f"archive member {member.name!r} appears more than once, or after a member inside it",
                    hint=_NOT_OURS,
                )
            member.name = relative
            if member.isdir():
                os.mkdir(destination, 0o700)
                directories.add(relative, _Attributes.of(member))
                continue
            if member.islnk():
                _check_hardlink(member, staging)
            tar.extract(member, staging, set_attrs=False, numeric_owner=True, **_TRUSTED)
            if not member.islnk():  # a hard link shares its source's inode, whose attributes are set
                set_attributes(destination, relative, _Attributes.of(member), stats)
            stats.files += 1
            stats.bytes += member.size if member.isreg() else 0
        # Checked once the tree is complete, because a later member can change where an earlier symlink leads.
        for relative in sorted(links):
            if not _link_stays_inside(staging, target, relative):
                raise UnsafeArchive(
                    f"archive member {relative!r} is a symlink to {os.readlink(staging / relative)!r},"
                    f" which resolves outside {target} through other symlinks in the archive",
                    hint=_NOT_OURS,
                )
        for relative, attributes in directories.newest_first():
            set_attributes(os.path.join(staging, relative), relative, attributes, stats)
    _warn_not_restored("archive.attributes_not_restored", target, stats.attributes_failed)
    _warn_not_restored("archive.xattrs_not_restored", target, stats.xattrs_failed)
    return stats, root_info


class _RealDirectories:
    """Paths under staging checked to be directories, and not symlinks, at every level.

    A member written into such a directory cannot land outside staging. This takes about one lstat
    per directory, where os.path.realpath took one for every level of every member's path. Since
    the extraction never replaces an entry, a directory checked once stays one. The LIMIT paths
    used last are kept, so memory does not grow with the tree. A path dropped is checked again
    when it is next used.
    """

    LIMIT = 256

    def __init__(self, staging: str):
        self.staging = staging
        self.checked: collections.OrderedDict[str, None] = collections.OrderedDict()

    def check(self, relative: str) -> bool:
        """Return whether relative ("" for staging) and each directory above it is a directory or missing.

        A missing directory is not kept: tarfile makes it when it extracts the member, and it can
        only be made inside a checked one.
        """
        if not relative:
            return True
        if relative in self.checked:
            self.checked.move_to_end(relative)
            return True
        if not self.check(relative.rpartition("/")[0]):
            return False
        try:
            mode = os.lstat(os.path.join(self.staging, relative)).st_mode
        except FileNotFoundError:
            return True
        if not stat.S_ISDIR(mode):
            return False
        if len(self.checked) >= self.LIMIT:
            self.checked.popitem(last=False)
        self.checked[relative] = None
        return True


@dataclass(frozen=True, slots=True)
class _Attributes:
    """The owner, mode, mtime and kept xattrs that extraction sets on an entry. The mode is None for a symlink."""

    uid: int
    gid: int
    mode: int | None
    mtime: float
    xattrs: dict[str, bytes]

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> _Attributes:
        mode = None if member.issym() else stat.S_IMODE(member.mode)
        return cls(member.uid, member.gid, mode, member.mtime, xattrs_of(member))


class _Deferred:
    """Directory attributes written to an unnamed temporary file and read back newest first.

    Each record is one line of JSON. Reading back goes from the end of the file in blocks, so a
    directory's attributes are set after those of every directory extracted after it, children
    included, as the list this replaces did.
    """

    BLOCK = 1 << 16

    def __init__(self, where: Path):
        self.where = where

    def __enter__(self) -> _Deferred:
        self.file = tempfile.TemporaryFile(dir=self.where)
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def add(self, relative: str, attributes: _Attributes) -> None:
        xattrs = {name: value.hex() for name, value in attributes.xattrs.items()}
        record = [relative, attributes.uid, attributes.gid, attributes.mode, attributes.mtime, xattrs]
        self.file.write(json.dumps(record).encode("ascii") + b"\n")  # names escaped, even undecodable ones

    def newest_first(self) -> Iterator[tuple[str, _Attributes]]:
        end = self.file.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - self.BLOCK)
            self.file.seek(start)
            lines = (self.file.read(end - start) + tail).split(b"\n")
            end = start
            tail = lines.pop(0) if start > 0 else b""  # the block may begin mid-record
            for line in reversed(lines):
                if line:
                    yield self._parse(line)
        if tail:
            yield self._parse(tail)

    @staticmethod
    def _parse(line: bytes) -> tuple[str, _Attributes]:
        relative, uid, gid, mode, mtime, xattrs = json.loads(line)
        values = {name: bytes.fromhex(value) for name, value in xattrs.items()}
        return relative, _Attributes(uid, gid, mode, mtime, values)


def set_attributes(path: str | Path, relative: str, attributes: _Attributes, stats: ArchiveStats) -> None:
    """Set owner, then mode (setgid included, which chown would clear), then kept xattrs, then mtime.

    Each rejection is added to stats, once per path and kind, and the next attribute is still set.
    A symlink gets only its owner and mtime, because Linux gives symlinks no mode and no user xattrs.
    """
    failures = []
    try:
        os.lchown(path, attributes.uid, attributes.gid)
    except OSError as exc:
        failures.append(f"owner: {exc.strerror}")
    if attributes.mode is not None:
        try:
            os.chmod(path, attributes.mode)
        except OSError as exc:
            failures.append(f"mode: {exc.strerror}")
        for name, value in attributes.xattrs.items():
            try:
                os.setxattr(path, name, value)
            except OSError as exc:
                stats.xattrs_failed.append((relative, str(exc.strerror)))
                break
    try:
        os.utime(path, (attributes.mtime, attributes.mtime), follow_symlinks=False)
    except OSError as exc:
        failures.append(f"mtime: {exc.strerror}")
    if failures:
        stats.attributes_failed.append((relative, ", ".join(failures)))


def _warn_not_restored(event: str, directory: Path, failures: Sequence[tuple[str, str]]) -> None:
    if failures:
        _log.warning(
            event,
            directory=str(directory),
            count=len(failures),
            paths=[path for path, _ in failures[:EXAMPLES]],
            errors=sorted({reason for _, reason in failures}),
        )


class SwapJournal:
    """A small state file that lets an interrupted swap of directory contents be finished.

    Phases: "extracting" (staging may be partial, so it is rebuilt), "carrying" (excluded
    paths move from the live directory into staging), "clearing" (live entries move aside),
    "installing" (staged entries move in). Each step is a rename on one file system and
    each phase can be run again, so a restart always ends with the new contents, never a mix.
    """

    def __init__(self, target: Path):
        self.target = target
        self.work = target / WORK_DIR
        self.staging = self.work / "new"
        self.old = self.work / "old"
        self.path = self.work / "journal.json"

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise IntegrityError(
                f"restore journal {self.path} is unreadable: {exc}",
                hint=f"inspect {self.work}, then remove it and run the restore again",
            ) from None
        return data if isinstance(data, dict) else None

    def write(self, set_id: str, phase: str, root: dict[str, Any] | None = None) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"set_id": set_id, "phase": phase, "root": root}))
        os.replace(temporary, self.path)
        _fsync_directory(self.work)

    def begin(self, set_id: str) -> None:
        """Start over with an empty staging directory."""
        self.target.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(mode=0o700, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.old, ignore_errors=True)
        self.staging.mkdir(mode=0o700)
        self.write(set_id, "extracting")

    def discard(self) -> None:
        """Remove a staging that was never swapped in: the work dir, while the journal records "extracting"."""
        journal = self.read()
        if journal is None or journal.get("phase") == "extracting":
            shutil.rmtree(self.work, ignore_errors=True)

    def swap(self, set_id: str, root: dict[str, Any] | None, keep: Sequence[str]) -> None:
        """Replace the live contents with staging, carrying the paths in keep across unchanged."""
        journal = self.read() or {}
        phase = journal.get("phase", "carrying")
        root = root if root is not None else journal.get("root")
        if phase in ("extracting", "carrying", "clearing") and not self.staging.is_dir():
            # Clearing without the staged contents would leave the target empty.
            raise IntegrityError(
                f"restore staging dir {self.staging} is missing in phase {phase!r}",
                hint=f"inspect {self.work}, then remove it and run the restore again",
            )
        if phase in ("extracting", "carrying"):
            self.write(set_id, "carrying", root)
            for relative in keep:  # all checked before any moves, so a rejected swap leaves the target as it was
                self._check_carry(relative)
            for relative in keep:
                self._carry(relative)
            phase = "clearing"
        if phase == "clearing":
            self.write(set_id, "clearing", root)
            self.old.mkdir(mode=0o700, exist_ok=True)
            for entry in os.listdir(self.target):
                if entry != WORK_DIR:
                    os.rename(self.target / entry, self.old / entry)
            phase = "installing"
        if phase == "installing":
            self.write(set_id, "installing", root)
            # Staging is missing only when a crash cut short the clean-up below, after every entry moved in.
            staged = os.listdir(self.staging) if self.staging.exists() else []
            for entry in staged:
                os.rename(self.staging / entry, self.target / entry)
        if root:
            os.lchown(self.target, int(root["uid"]), int(root["gid"]))
            os.chmod(self.target, int(root["mode"]))
            self._set_root_xattrs(root.get("xattrs") or {})
        self._clean_up()
        if root:  # set last, because removing the work dir changes the target's mtime
            os.utime(self.target, (root["mtime"], root["mtime"]))
        _fsync_directory(self.target)

    def _set_root_xattrs(self, xattrs: dict[str, str]) -> None:
        """Set the kept xattrs that the archive gives the target directory itself, logging a rejection."""
        for name, value in xattrs.items():
            if not name.startswith(KEPT_XATTRS):
                continue
            try:
                os.setxattr(self.target, name, bytes.fromhex(value))
            except OSError as exc:
                _warn_not_restored("archive.xattrs_not_restored", self.target, [(".", str(exc.strerror))])
                return

    def _clean_up(self) -> None:
        """Remove the work dir, the journal last, so a crash part-way leaves a journal that finishes the swap."""
        for directory in (self.staging, self.old):
            if directory.exists():
                shutil.rmtree(directory)
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.work)

    def _check_carry(self, relative: str) -> None:
        """Raise UnsafeArchive if a staged symlink would take the kept path out of staging."""
        parent = (self.staging / relative).parent
        if not _within(os.path.realpath(parent), os.path.realpath(self.staging)):
            raise UnsafeArchive(
                f"kept path {relative!r} would move through a symlink in the archive to {os.path.realpath(parent)}",
                hint="the archive is not from dtrguard, or the exclude patterns changed since the backup",
            )

    def _carry(self, relative: str) -> None:
        source = self.target / relative
        destination = self.staging / relative
        if not os.path.lexists(source):
            return
        if os.path.lexists(destination):  # the live copy of an excluded path wins over an archived one
            shutil.rmtree(
                destination
            ) if destination.is_dir() and not destination.is_symlink() else destination.unlink()
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, destination)


def root_attributes(member: tarfile.TarInfo | None) -> dict[str, Any] | None:
    """Return the owner, mode, mtime and kept xattrs that the archive's root entry gives the target directory.

    The mtime stays a float, as tarfile gives it to every other entry, so sub-second parts survive.
    Xattr values are hex, because the result is stored in the JSON journal.
    """
    if member is None:
        return None
    root: dict[str, Any] = {"uid": member.uid, "gid": member.gid, "mode": stat.S_IMODE(member.mode)}
    root["mtime"] = member.mtime
    xattrs = xattrs_of(member)
    if xattrs:
        root["xattrs"] = {name: value.hex() for name, value in xattrs.items()}
    return root


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
