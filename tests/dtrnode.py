"""A DTR-like node for the tests: its directories, its containers, its data, and dtrguard running on it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import NotFound

from dtr_install import APP_ROLES, PREFIX, install
from images import APP_VERSION
from servers import SERVED_SECRETS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CONTAINERS = [PREFIX + "postgres", *(PREFIX + role for role in APP_ROLES)]
# Test runs, the demo and the systemd drill all create containers with DTR's fixed names, so they take turns.
DTR_NAMES_LOCK = "/tmp/dtrguard-dtr-names.lock"
RUNNING: list[Daemon] = []  # every daemon started, so a failed test cannot leave one behind
# The secret key every dtrguard process in the tests gets; no output line may contain it.
SECRET = "dtrguard-test-secret-0b6e3c1f9a"


def assert_no_secret(output: str, source: str) -> None:
    assert SECRET not in output, f"{source} printed the AWS secret access key"
    for served in list(SERVED_SECRETS):  # keys and session tokens a MetadataStub served as role credentials
        assert served not in output, f"{source} printed a secret key or session token from the metadata service"


@dataclass
class DtrNode:
    """One node: DTR's two directories under root, a state directory and an instance id file."""

    root: Path
    s3_url: str
    bucket: str
    instance_id: str
    interval: str = "2s"
    extra_config: str = ""  # appended after the [dtr] table
    schedule_config: str = ""  # appended inside the [schedule] table
    node_config: str = ""  # appended inside the [node] table
    imds_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # added to the environment of every dtrguard process
    s3_config: str = ""  # appended inside the [s3] table; a key set here replaces the harness's value
    unset_env: tuple[str, ...] = ()  # removed from the environment of every dtrguard process

    @property
    def etc(self) -> Path:
        return self.root / "usr-local-etc-dtr"

    @property
    def var(self) -> Path:
        return self.root / "var-local-dtr"

    @property
    def pg_data(self) -> Path:
        return self.var / "postgres-data"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "dtrguard.toml"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        id_file = self.root / "instance-id"
        id_file.write_text(self.instance_id + "\n")
        install_command = [
            sys.executable, str(TESTS / "dtr_install.py"), "--version", "{version}",
            "--etc", str(self.etc), "--var", str(self.var), "--pg-data", str(self.pg_data),
        ]  # fmt: skip
        id_source = None if self.imds_url else id_file
        self.config_path.write_text(self.config_text(install_command, id_file=id_source, state_dir=self.state_dir))
        return self.config_path

    def config_text(
        self,
        install_command: list[str],
        prefix: str = "dtr/test",
        id_file: Path | None = None,
        state_dir: Path | None = None,
    ) -> str:
        """Return a dtrguard config for this node. Without id_file the instance id comes from imds_url;
        without state_dir, dtrguard's default state directory is used."""
        source = f"file:{id_file}" if id_file is not None else "imds"
        s3_defaults = {"connect_timeout": '"2s"', "read_timeout": '"20s"', "max_attempts": "2"}
        s3_keys = tomllib.loads(self.s3_config)
        s3_lines = "\n".join(f"{k} = {v}" for k, v in s3_defaults.items() if k not in s3_keys)
        state_line = f'state_dir = "{state_dir}"' if state_dir is not None else ""
        return f"""
[s3]
bucket = "{self.bucket}"
prefix = "{prefix}"
endpoint_url = "{self.s3_url}"
{s3_lines}
{self.s3_config}

[node]
instance_id_source = "{source}"
imds_endpoint = "{self.imds_url or "http://127.0.0.1:9"}"
{state_line}
{self.node_config}

[schedule]
interval = "{self.interval}"
misfire_grace = "30s"
retry_initial_delay = "0.5s"
retry_max_delay = "2s"
{self.schedule_config}

[[directories]]
path = "{self.etc}"
name = "etc-dtr"

[[directories]]
path = "{self.var}"
name = "var-dtr"
exclude = ["logs"]

[dtr]
install_command = {json.dumps(install_command)}
start_timeout = "60s"
stop_timeout = "5s"
{self.extra_config}
"""

    # Containers and data

    def install(self, version: str = APP_VERSION) -> None:
        install(version, self.etc, self.var, self.pg_data)
        wait_for_sql(self)

    def seed(self, rows: int = 200) -> None:
        """Fill both directories and the database with DTR-like data."""
        write_files(self.etc, self.var)
        sql(self, "create role dtr_app login")
        sql(self, "create database dtr owner dtr_app")
        statements = [
            "create table repositories (id serial primary key, namespace text not null, name text not null)",
            "create table tags (id serial primary key, repository_id int references repositories(id),"
            " name text, manifest jsonb, pushed_at timestamptz)",
            f"insert into repositories (namespace, name) select 'team' || (i % 7), 'repo-' || i"
            f" from generate_series(1, {rows}) i",
            "insert into tags (repository_id, name, manifest, pushed_at) select r.id, 'v' || g,"
            " jsonb_build_object('digest', md5(r.id::text || g::text), 'layers', g), now() - g * interval '1 hour'"
            " from repositories r, generate_series(1, 3) g",
            "alter table repositories owner to dtr_app",
            "alter table tags owner to dtr_app",
        ]
        for statement in statements:
            sql(self, statement, database="dtr")
        sql(self, "create table settings (key text primary key, value text)")
        sql(self, "insert into settings values ('hub.url', 'https://dtr.example.com'), ('auth', 'managed')")

    def destroy(self) -> None:
        """Remove this node's containers and wipe its directories and state, as a terminated instance."""
        remove_containers()
        shutil.rmtree(self.root, ignore_errors=True)

    # dtrguard

    def command(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "dtrguard", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=test_env({**self.env, **(env or {})}, self.unset_env),
            cwd=REPO,
        )
        assert_no_secret(result.stdout + result.stderr, f"dtrguard {' '.join(args)}")
        return result

    def start(self) -> Daemon:
        daemon = Daemon(
            [sys.executable, "-m", "dtrguard", "--config", str(self.config_path), "run"],
            test_env(self.env, self.unset_env),
        )
        RUNNING.append(daemon)
        return daemon


def test_env(extra: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        PYTHONPATH=str(REPO),
    )
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env.update(extra or {})
    for name in unset:
        env.pop(name, None)
    return env


@dataclass
class Daemon:
    """`dtrguard run` as a child process, with its JSON events collected as they arrive."""

    argv: list[str]
    env: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=REPO
        )
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.other_lines.append(line.rstrip())
                self.changed.notify_all()

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.changed:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(
        self, name: str, count: int = 1, timeout: float = 180, after: Callable[[], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until `count` events called name arrived; fail with the event log if they do not."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.named(name)) < count:
                if self.process.poll() is not None and not self.changed.wait(0.5):
                    raise AssertionError(
                        f"dtrguard exited ({self.process.returncode}) before {count} {name}:\n{self.dump()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {count} {name} events:\n{self.dump()}")
                self.changed.wait(min(remaining, 1))
            return self.named(name)

    def stop(self, timeout: float = 60) -> int:
        """Send SIGTERM and return the exit code; fail with the event log if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"dtrguard did not exit within {timeout} s of SIGTERM:\n{self.dump()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def wait_exit(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def dump(self) -> str:
        return "\n".join([json.dumps(e) for e in self.events] + self.other_lines)


# Docker helpers


def client() -> docker.DockerClient:
    return docker.from_env()


def remove_containers() -> None:
    """Remove the DTR-named containers the tests create, by exact name."""
    docker_client = client()
    for name in CONTAINERS:
        with contextlib.suppress(NotFound):
            docker_client.containers.get(name).remove(force=True)


def container_exec(container: str, command: list[str], user: str = "") -> tuple[int, str]:
    result = client().containers.get(container).exec_run(command, user=user)
    return result.exit_code, result.output.decode(errors="replace")


def sql(node: DtrNode | None, statement: str, database: str = "postgres") -> str:
    code, output = container_exec(
        PREFIX + "postgres",
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", database, "-c", statement],
    )
    assert code == 0, f"{statement}: {output}"
    return output.strip()


def wait_for_sql(node: DtrNode | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            code, _ = container_exec(PREFIX + "postgres", ["psql", "-U", "postgres", "-c", "select 1"])
            if code == 0:
                return
        except NotFound:
            pass
        time.sleep(0.3)
    raise AssertionError("test Postgres did not start")


# Data and comparisons


def write_files(etc: Path, var: Path) -> None:
    """Write DTR-like files with the owners, modes and links a restore must keep."""
    (etc / "ssl").mkdir(parents=True, exist_ok=True)
    (etc / "generatedConfigs").mkdir(exist_ok=True)
    (etc / "hub.yml").write_text(
        "load_balancer_http_port: 80\nload_balancer_https_port: 443\ndomain_name: dtr.example.com\n"
    )
    (etc / "storage.yml").write_text("version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /storage\n")
    (etc / "license.json").write_text(json.dumps({"key_id": "k-123", "expiration": "2027-01-01"}))
    (etc / "ssl" / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    os.chmod(etc / "ssl" / "server.pem", 0o600)
    (etc / "generatedConfigs" / "nginx.conf").write_text("events {}\n")
    os.symlink("../hub.yml", etc / "generatedConfigs" / "hub.yml")
    shared = var / "image-storage" / "local"
    shared.mkdir(parents=True, exist_ok=True)
    os.chown(var / "image-storage", 1000, 1000)
    os.chmod(var / "image-storage", 0o2770)
    for index in range(30):
        blob = shared / f"blob-{index:03}"
        blob.write_bytes(hashlib.sha256(str(index).encode()).digest() * (index * 40 + 1))
        os.chown(blob, 1000, 1000)
        os.chmod(blob, 0o640)
    os.link(shared / "blob-001", shared / "blob-001.hardlink")
    (var / "logs").mkdir(exist_ok=True)
    (var / "logs" / "admin.log").write_text("log lines are excluded from backups\n")
    os.utime(etc / "hub.yml", (1_600_000_000, 1_600_000_000))


def tree(root: Path, exclude: tuple[str, ...] = ("logs", "postgres-data")) -> dict[str, tuple[Any, ...]]:
    """Describe every entry under root: type, owner, mode, and content hash or link target."""
    result: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(relative_dir, d)) not in exclude]
        for name in [".", *dirs, *files] if relative_dir == "." else [*dirs, *files]:
            path = Path(directory) / name
            relative = os.path.normpath(os.path.join(relative_dir, name))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                detail: Any = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                detail = (hashlib.sha256(path.read_bytes()).hexdigest(), int(info.st_mtime))
            else:
                detail = int(info.st_mtime) if relative != "." else None
            result[relative] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, detail)
    return result


def table_contents() -> dict[str, str]:
    """Return an md5 of every user table's rows, per database and table."""
    result = {}
    databases = sql(None, "select datname from pg_database where not datistemplate order by 1").split()
    for database in databases:
        tables = sql(
            None,
            "select schemaname || '.' || tablename from pg_tables"
            " where schemaname not in ('pg_catalog', 'information_schema') order by 1",
            database,
        ).split()
        for table in tables:
            digest = sql(
                None,
                f"select count(*) || ':' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '')"
                f" from {table} t",
                database,
            )
            result[f"{database}.{table}"] = digest
    return result


def table_owners() -> dict[str, str]:
    return dict(
        line.split("|")
        for line in sql(
            None, "select tablename, tableowner from pg_tables where schemaname = 'public'", "dtr"
        ).splitlines()
    )


# Helpers the end-to-end test files share


def node_with_data(make_node: Any, instance_id: str = "i-0aaaaaaaaaaaaaaaa", **options: Any) -> DtrNode:
    """Create a node with DTR installed and DTR-like data in both directories and the database."""
    node: DtrNode = make_node(instance_id, **options)
    node.install()
    node.seed()
    return node


def backup_once(node: DtrNode) -> str:
    """Run `dtrguard backup` and return the new set id."""
    result = node.command("backup")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def manifest_keys(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="dtr/test/manifests/")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def set_objects(s3: Any, bucket: str, set_id: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"dtr/test/sets/{set_id}/")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def events_of(output: str) -> list[dict[str, Any]]:
    """Parse the JSON event lines of a command's output."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]
