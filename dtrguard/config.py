"""Load the TOML config file into typed, validated settings.

Every problem raises ConfigError naming the key, the value and the fix, so a bad file
stops the service at start rather than at the first backup.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dtrguard.errors import ConfigError

DEFAULT_PATH = "/etc/dtrguard/dtrguard.toml"
ENV_PATH = "DTRGUARD_CONFIG"

# The order DTR 1.4 brings its containers up in: database first, load balancer last.
DTR_START_ORDER = (
    "postgres",
    "log_aggregator",
    "auth_server",
    "admin_server",
    "image_storage_0",
    "image_storage_1",
    "registry_index",
    "load_balancer",
)
# DTR 1.x's installer image prints the shell command that performs the install, so its output is
# run by bash, as DTR's install guide of that era shows.
DTR_INSTALL_COMMAND = ("bash", "-c", "$(docker run --rm docker/trusted-registry:{version} install)")


@dataclass(frozen=True)
class S3Settings:
    """S3 location of the backup sets and the client settings for reaching it."""

    bucket: str
    prefix: str = "dtrguard"
    region: str = "us-east-1"
    endpoint_url: str | None = None
    kms_key_id: str | None = None  # SSE-KMS: S3 encrypts each object with this key
    envelope_kms_key_id: str | None = None  # client-side: each set's data key is wrapped by this key
    kms_endpoint_url: str | None = None
    part_size: int = 8 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    download_streams: int = 1  # ranged GETs in flight per artifact a restore reads, or 1 for one GET


@dataclass(frozen=True)
class DirectorySettings:
    """One directory to archive, its artifact name and the paths left out of it."""

    path: Path
    name: str
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeSettings:
    """Source of the instance id and location of the local state."""

    instance_id_source: str = "imds"
    imds_endpoint: str = "http://169.254.169.254"
    imds_timeout: float = 2.0
    imds_attempts: int = 5
    state_dir: Path = Path("/var/lib/dtrguard")
    # At first boot, when the newest set fails its checks: "stop" for an operator, or "restore_older",
    # which restores the newest older set that passes (losing the changes between the two sets).
    on_bad_set: str = "stop"


@dataclass(frozen=True)
class ScheduleSettings:
    """How often backups run and how retries back off, in seconds."""

    interval: float = 900.0
    misfire_grace: float = 300.0
    backup_timeout: float = 3600.0
    retry_initial_delay: float = 5.0
    retry_max_delay: float = 300.0


@dataclass(frozen=True)
class PostgresSettings:
    """The container running DTR's database and the role dtrguard connects as."""

    container: str = "docker_trusted_registry_postgres"
    user: str = "postgres"
    ready_timeout: float = 120.0


@dataclass(frozen=True)
class DtrSettings:
    """How to find, install, start and stop DTR's containers."""

    container_prefix: str = "docker_trusted_registry_"
    start_order: tuple[str, ...] = DTR_START_ORDER
    version_container: str = "admin_server"
    install_command: tuple[str, ...] = DTR_INSTALL_COMMAND
    start_timeout: float = 120.0
    stop_timeout: int = 30


@dataclass(frozen=True)
class Settings:
    """The whole validated config."""

    source: Path
    s3: S3Settings
    directories: tuple[DirectorySettings, ...]
    node: NodeSettings = field(default_factory=NodeSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    dtr: DtrSettings = field(default_factory=DtrSettings)
    retention: RetentionSettings = field(default_factory=lambda: RetentionSettings())


@dataclass(frozen=True)
class RetentionSettings:
    """Retention policy: grandfather-father-son windows, in seconds, and the floors that keep good history."""

    keep_all_within: float = 86400.0  # every set of the last day
    hourly_within: float = 7 * 86400.0  # the newest set of each hour for a week
    daily_within: float = 30 * 86400.0  # the newest set of each day for 30 days
    weekly_within: float = 12 * 604800.0  # the newest set of each week for 12 weeks
    keep_last: int = 3  # the newest complete sets, kept even outside every window
    max_drop: float = 0.5  # a larger fall in rows or directory bytes skips pruning
    orphan_grace: float = 86400.0  # artifacts without a manifest, and open uploads, older than this go


DEFAULT_DIRECTORIES: tuple[dict[str, Any], ...] = (
    {"path": "/usr/local/etc/dtr"},
    {"path": "/var/local/dtr", "exclude": ["logs"]},
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Maximum duration in seconds. Far longer ones overflow the datetime arithmetic that starts the schedule.
MAX_DURATION = 365 * 86400.0
MAX_DOWNLOAD_STREAMS = 32


def config_path(explicit: str | None) -> Path:
    """Return the config path from --config, then DTRGUARD_CONFIG, then the default."""
    return Path(explicit or os.environ.get(ENV_PATH) or DEFAULT_PATH)


def load(path: Path, local_only: bool = False) -> Settings:
    """Read and validate the config file at path.

    local_only is for commands that never reach S3 (prepare-image): an invalid [s3] table, such
    as the packaged file's placeholder bucket, is then accepted and S3 is left unset.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found",
            hint=f"create it (see the config reference in the README) or pass --config or {ENV_PATH}",
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse(document, path, local_only)


def parse(document: dict[str, Any], source: Path, local_only: bool = False) -> Settings:
    """Validate a parsed TOML document and build Settings from it."""
    top = _Table(document, "", source)
    try:
        s3 = _parse_s3(top.table("s3", required=True))
    except ConfigError:
        if not local_only:
            raise
        s3 = S3Settings(bucket="")
    if top.data.get("directories") == []:
        raise top.fail("directories is an empty list", "add at least one [[directories]] table, or remove the key")
    directories = _parse_directories(top.array_of_tables("directories"), source)
    node = _parse_node(top.table("node"))
    schedule = _parse_schedule(top.table("schedule"))
    postgres = _parse_postgres(top.table("postgres"))
    dtr = _parse_dtr(top.table("dtr"))
    retention = _parse_retention(top.table("retention"))
    top.reject_unknown()
    # A backup is stopped at backup_timeout, but a request already waiting on S3 ends only by its
    # own timeouts, so a run can last backup_timeout plus one request's timeouts.
    request = s3.read_timeout * s3.max_attempts
    if not local_only and schedule.backup_timeout <= request:
        raise top.fail(
            f"schedule.backup_timeout ({schedule.backup_timeout:g} s) is not larger than s3.read_timeout"
            f" x s3.max_attempts ({s3.read_timeout:g} s x {s3.max_attempts} = {request:g} s),"
            " so one S3 request that waits out its timeouts would take the whole backup",
            "raise schedule.backup_timeout, or lower s3.read_timeout or s3.max_attempts",
        )
    return Settings(source, s3, directories, node, schedule, postgres, dtr, retention)


def _parse_s3(table: _Table) -> S3Settings:
    bucket = table.string("bucket", required=True)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        table.invalid("bucket", bucket, "use an S3 bucket name: 3-63 lowercase letters, digits, dots, hyphens")
    prefix = table.string("prefix", "dtrguard").strip("/")
    if not prefix or ".." in prefix.split("/"):
        table.invalid("prefix", prefix, 'use a key prefix such as "dtrguard/prod"')
    endpoint = table.string("endpoint_url", "") or None
    if endpoint and not re.match(r"^https?://", endpoint):
        table.invalid("endpoint_url", endpoint, "use a URL starting with http:// or https://")
    kms_endpoint = table.string("kms_endpoint_url", "") or None
    if kms_endpoint and not re.match(r"^https?://", kms_endpoint):
        table.invalid("kms_endpoint_url", kms_endpoint, "use a URL starting with http:// or https://")
    part_mb = table.number("part_size_mb", 8)
    if not 5 <= part_mb <= 512:
        table.invalid("part_size_mb", part_mb, "use 5 to 512 (each part is an S3 object of its own)")
    streams = table.positive_int("download_streams", 1)
    if streams > MAX_DOWNLOAD_STREAMS:
        table.invalid("download_streams", streams, f"use 1 to {MAX_DOWNLOAD_STREAMS}")
    settings = S3Settings(
        bucket=bucket,
        prefix=prefix,
        region=table.string("region", "us-east-1"),
        endpoint_url=endpoint,
        kms_key_id=table.string("kms_key_id", "") or None,
        envelope_kms_key_id=table.string("envelope_kms_key_id", "") or None,
        kms_endpoint_url=kms_endpoint,
        part_size=int(part_mb * 1024 * 1024),
        connect_timeout=table.duration("connect_timeout", 10.0),
        read_timeout=table.duration("read_timeout", 60.0),
        max_attempts=table.positive_int("max_attempts", 5),
        download_streams=streams,
    )
    table.reject_unknown()
    return settings


def _parse_directories(tables: list[_Table], source: Path) -> tuple[DirectorySettings, ...]:
    if not tables:
        tables = [_Table(dict(d), f"directories[{i}]", source) for i, d in enumerate(DEFAULT_DIRECTORIES)]
    result: list[DirectorySettings] = []
    for table in tables:
        path_text = table.string("path", required=True)
        path = PurePosixPath(path_text)
        if not path.is_absolute() or ".." in path.parts or path == PurePosixPath("/"):
            table.invalid("path", path_text, "use an absolute directory path other than /")
        name = table.string("name", "-".join(path.parts[1:]))
        if not _NAME.match(name):
            table.invalid("name", name, "use letters, digits, dots, hyphens and underscores")
        exclude = table.string_list("exclude", [])
        for pattern in exclude:
            if pattern.startswith("/") or ".." in PurePosixPath(pattern).parts:
                table.invalid("exclude", pattern, "use paths relative to the directory, without ..")
        table.reject_unknown()
        result.append(DirectorySettings(Path(path_text), name, tuple(exclude)))
    for outer in result:
        for inner in result:
            if inner.path != outer.path and inner.path.is_relative_to(outer.path):
                raise ConfigError(
                    f"config file {source}: directory {inner.path} lies inside directory {outer.path}",
                    hint=f"list {outer.path} once and use its exclude patterns instead",
                )
    names = [d.name for d in result]
    paths = [d.path for d in result]
    if len(set(names)) != len(names) or len(set(paths)) != len(paths):
        raise ConfigError(
            f"config file {source}: [[directories]] repeat a path or name: {', '.join(names)}",
            hint="give each directory its own path and name",
        )
    return tuple(result)


def _parse_node(table: _Table) -> NodeSettings:
    source = table.string("instance_id_source", "imds")
    if source != "imds" and not source.startswith("file:/"):
        table.invalid("instance_id_source", source, 'use "imds" or "file:/absolute/path"')
    endpoint = table.string("imds_endpoint", "http://169.254.169.254").rstrip("/")
    state_dir = table.string("state_dir", "/var/lib/dtrguard")
    if not state_dir.startswith("/"):
        table.invalid("state_dir", state_dir, "use an absolute path such as /var/lib/dtrguard")
    if not re.match(r"^https?://", endpoint):
        table.invalid("imds_endpoint", endpoint, "use a URL starting with http://")
    settings = NodeSettings(
        instance_id_source=source,
        imds_endpoint=endpoint,
        imds_timeout=table.duration("imds_timeout", 2.0),
        imds_attempts=table.positive_int("imds_attempts", 5),
        state_dir=Path(state_dir),
        on_bad_set=table.string("on_bad_set", "stop"),
    )
    if settings.on_bad_set not in ("stop", "restore_older"):
        table.invalid("on_bad_set", settings.on_bad_set, 'use "stop" or "restore_older"')
    table.reject_unknown()
    return settings


def _parse_schedule(table: _Table) -> ScheduleSettings:
    settings = ScheduleSettings(
        interval=table.duration("interval", 900.0),
        misfire_grace=table.duration("misfire_grace", 300.0),
        backup_timeout=table.duration("backup_timeout", 3600.0),
        retry_initial_delay=table.duration("retry_initial_delay", 5.0),
        retry_max_delay=table.duration("retry_max_delay", 300.0),
    )
    if settings.retry_max_delay < settings.retry_initial_delay:
        table.invalid("retry_max_delay", settings.retry_max_delay, "use a value of at least retry_initial_delay")
    table.reject_unknown()
    return settings


def _parse_postgres(table: _Table) -> PostgresSettings:
    settings = PostgresSettings(
        container=table.container_name("container", "docker_trusted_registry_postgres"),
        user=table.string("user", "postgres"),
        ready_timeout=table.duration("ready_timeout", 120.0),
    )
    table.reject_unknown()
    return settings


def _parse_retention(table: _Table) -> RetentionSettings:
    max_drop = table.number("max_drop", 0.5)
    if not 0 < max_drop <= 1:
        table.invalid("max_drop", max_drop, "use a fraction greater than 0 and at most 1, such as 0.5")
    settings = RetentionSettings(
        keep_all_within=table.duration("keep_all_within", 86400.0),
        hourly_within=table.duration("hourly_within", 7 * 86400.0),
        daily_within=table.duration("daily_within", 30 * 86400.0),
        weekly_within=table.duration("weekly_within", 12 * 604800.0),
        keep_last=table.positive_int("keep_last", 3),
        max_drop=max_drop,
        orphan_grace=table.duration("orphan_grace", 86400.0),
    )
    table.reject_unknown()
    return settings


def _parse_dtr(table: _Table) -> DtrSettings:
    prefix = table.container_name("container_prefix", "docker_trusted_registry_")
    order = table.string_list("start_order", list(DTR_START_ORDER))
    if not order:
        table.invalid("start_order", order, "list DTR's container roles, database first")
    command = table.string_list("install_command", list(DTR_INSTALL_COMMAND))
    if not command:
        table.invalid("install_command", command, "give the command as a list of arguments")
    settings = DtrSettings(
        container_prefix=prefix,
        start_order=tuple(order),
        version_container=table.string("version_container", "admin_server"),
        install_command=tuple(command),
        start_timeout=table.duration("start_timeout", 120.0),
        stop_timeout=max(1, round(table.duration("stop_timeout", 30.0))),
    )
    table.reject_unknown()
    return settings


class _Table:
    """A TOML table that remembers which keys were read, so unknown keys can be reported."""

    def __init__(self, data: dict[str, Any], name: str, source: Path):
        self.data = data
        self.name = name
        self.source = source
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def fail(self, message: str, hint: str) -> ConfigError:
        return ConfigError(f"config file {self.source}: {message}", hint=hint)

    def invalid(self, key: str, value: object, hint: str) -> None:
        raise self.fail(f"invalid value {value!r} for {self.key(key)}", hint)

    def get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.data and required:
            message = f"missing required key {self.key(key)}"
            others = [name for name in self.data if isinstance(name, str)]
            for near in difflib.get_close_matches(key, others, n=1, cutoff=0.8):
                message += f" (found {self.key(near)}, which looks like a misspelling of it)"
            raise self.fail(message, f"add {self.key(key)} to the file")
        return self.data.get(key)

    def typed(self, key: str, kinds: tuple[type, ...], what: str, required: bool = False) -> Any:
        value = self.get(key, required)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise self.fail(f"{self.key(key)} must be {what}, not {value!r}", f"write {self.key(key)} as {what}")
        return value

    def string(self, key: str, default: str = "", required: bool = False) -> str:
        value = self.typed(key, (str,), "a string", required)
        return default if value is None else str(value)

    def number(self, key: str, default: float) -> float:
        """Return the number as written, an int or a float, so that an error shows it unchanged."""
        value = self.typed(key, (int, float), "a number")
        return default if value is None else value

    def positive_int(self, key: str, default: int) -> int:
        value = self.typed(key, (int,), "a whole number")
        if value is not None and value < 1:
            self.invalid(key, value, "use a whole number of 1 or more")
        return default if value is None else int(value)

    def duration(self, key: str, default: float) -> float:
        value = self.typed(key, (str, int, float), 'a duration such as "15m", "30s" or a number of seconds')
        if value is None:
            return default
        seconds = _parse_duration(value)
        # Written as "not in range" so that nan, which TOML allows and which fails every comparison, is rejected.
        if seconds is None or not 0 < seconds <= MAX_DURATION:
            self.invalid(key, value, 'use a positive duration of at most 365d, such as "15m", "90s" or "1h"')
        assert seconds is not None
        return seconds

    def string_list(self, key: str, default: list[str]) -> list[str]:
        value = self.typed(key, (list,), "a list of strings")
        if value is None:
            return default
        if not all(isinstance(item, str) for item in value):
            self.invalid(key, value, "write every item as a quoted string")
        return list(value)

    def container_name(self, key: str, default: str) -> str:
        value = self.string(key, default)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            self.invalid(key, value, "use a Docker container name: letters, digits, _ . -")
        return value

    def table(self, key: str, required: bool = False) -> _Table:
        value = self.typed(key, (dict,), f"a table [{self.key(key)}]", required)
        return _Table(value or {}, self.key(key), self.source)

    def array_of_tables(self, key: str) -> list[_Table]:
        value = self.typed(key, (list,), f"an array of tables [[{self.key(key)}]]")
        tables = []
        for index, item in enumerate(value or []):
            if not isinstance(item, dict):
                raise self.fail(f"{self.key(key)} must be written as [[{key}]] tables", f"see [[{key}]] in the README")
            tables.append(_Table(item, f"{self.key(key)}[{index}]", self.source))
        return tables

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen)) or "none"
            raise self.fail(
                f"unknown key {self.key(unknown[0])}",
                f"remove it or fix its spelling; known keys here: {known}",
            )


def _parse_duration(value: str | int | float) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
