"""Benchmark dtrguard against the tools an operator would use instead, on the same data in the same run.

Each tool backs up both directories and the database to moto's S3 server, then restores them into
a fresh Postgres container and empty directories; each restore is checked against the source. Tools
take turns within each round, in a rotated order. Run through bench/run.sh, which installs the tools.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

import boto3  # noqa: E402
import report  # noqa: E402
from dataset import GENERATOR_VERSION, SIZES, TABLES, Dataset, describe_files, row_counts  # noqa: E402
from infra import PG_UID, Container, Moto, log, measure, run, table_checksums  # noqa: E402

from images import ensure_postgres_image  # noqa: E402

BUCKET = "bench"
RANGED_STREAMS = 4
SRC = "dtrguard-bench-src-postgres"
DST = "dtrguard-bench-dst-postgres"
GEN = "dtrguard-bench-gen-postgres"
TOOLS = ["dtrguard", "shell", "restic", "barman", "limits"]
BASE_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RESTIC_PASSWORD": "bench",
}


class Interrupted(BaseException):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class Result:
    tool: str
    phase: str
    round: int
    seconds: float
    cpu_tool: float
    cpu_container: float
    cpu_engine: float
    cpu_moto: float
    rss_tool: int
    rss_container: int
    requests: dict[str, int]
    stored_bytes: int | None = None
    stored_objects: int | None = None
    verified: str = ""
    command: str = ""
    error: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    cache: Path
    image: str = ""
    moto: Moto | None = None
    src: Container | None = None
    dst: Container | None = None
    env: dict[str, str] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    truth: dict[str, Any] = field(default_factory=dict)
    dataset: Dataset | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # Paths
    @property
    def node(self) -> Path:
        return self.work / "node"

    @property
    def wal(self) -> Path:
        return self.work / "wal"

    @property
    def sock(self) -> Path:
        return self.work / "sock"

    @property
    def shared(self) -> Path:
        return self.work / "shared"

    @property
    def dst_root(self) -> Path:
        return self.work / "dst"

    @property
    def aws(self) -> str:
        return str(self.cache / "venv-awscli" / "bin" / "aws")

    @property
    def barman_bin(self) -> Path:
        return self.cache / "venv-barman" / "bin"

    # Set-up

    def setup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        for path in (self.work, self.shared, self.wal, self.sock, self.work / "logs"):
            path.mkdir(parents=True, exist_ok=True)
        for path in (self.shared, self.wal, self.sock):
            os.chown(path, PG_UID, PG_UID)
        # dtrguard runs from a copy of the committed tree, so edits in progress in the work tree are not measured.
        source = self.work / "dtrguard-src"
        source.mkdir()
        run(f"git -C {REPO} archive {self.args.dtrguard_ref} dtrguard | tar -x -C {source}")
        self.info["dtrguard_commit"] = run(f"git -C {REPO} rev-parse {self.args.dtrguard_ref}").stdout.strip()
        os.chdir(self.work)  # `python -m` puts the working directory first on sys.path
        self.env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(source)}
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            self.env.pop(name, None)
        self.image = ensure_postgres_image()
        self.dataset = Dataset(self.args.size, self.cache)
        self.info["generation_seconds"] = self.dataset.ensure(self.image, GEN)
        # Every tool reads the same copy of the cached files. Hard links would give every file a second
        # name, which tar, restic and dtrguard each remember, for a link that a DTR node does not have.
        run(f"cp -a {self.dataset.files_root}/etc {self.dataset.files_root}/var --target-directory {self.work}/")
        self.node.mkdir()
        (self.work / "etc").rename(self.node / "etc")
        (self.work / "var").rename(self.node / "var")
        self.moto = Moto(str(REPO / ".venv" / "bin" / "python"), self.work / "logs" / "moto.log")
        self.moto.start()
        self.s3().create_bucket(Bucket=BUCKET)
        self.src = Container(SRC, self.image, self.dataset.pgdata, mounts=[self.dataset.pg_root, self.wal, self.shared])
        # The WAL archive is for barman-cloud; the socket directory is shared with the host for pg_dump.
        self.src.start(
            ["-c", "archive_mode=on", "-c", f"archive_command=cat %p > {self.wal}/%f"],
            extra_mounts={self.sock: "/var/run/postgresql"},
        )
        self.src.wait_ready()
        log(f"setup: moto on {self.moto.url}, source Postgres {SRC} on 127.0.0.1:{self.src.port}")
        self.truth = {
            "tables": table_checksums(self.src, TABLES),
            "etc": tree(self.node / "etc"),
            "var": tree(self.node / "var"),
        }
        self.describe_dataset()
        # The copy of the directories and the dump measured above reach the disk within about 30 s.
        # Flush them now, so the first tool measured does not pay for that writeback.
        run("sync")

    def describe_dataset(self) -> None:
        assert self.src is not None
        dump = self.shared / "dtr.dump"
        run(f"docker exec {SRC} pg_dump -Fc -Z0 -U postgres dtr > {dump}")
        zstd = int(run(f"zstd -3 -T1 -c {dump} | wc -c", capture=True).stdout)
        tar_bytes = int(run(f"tar -cf - -C {self.node} etc var | wc -c", capture=True).stdout)
        rows = {t: int(v.split(":")[0]) for t, v in self.truth["tables"].items()}
        database_bytes = int(self.src.query("select pg_database_size('dtr')")[0][0])
        self.info["dataset"] = {
            "size": self.args.size,
            "generator_version": GENERATOR_VERSION,
            "database_bytes": database_bytes,
            "dump_bytes": dump.stat().st_size,
            "dump_zstd3_bytes": zstd,
            "rows": rows,
            "etc": describe_files(self.node / "etc"),
            "var": describe_files(self.node / "var"),
            "tar_bytes": tar_bytes,
        }
        self.raw_bytes = dump.stat().st_size + tar_bytes

    def s3(self) -> Any:
        assert self.moto is not None
        return boto3.client(
            "s3", endpoint_url=self.moto.url, region_name="us-east-1",
            aws_access_key_id=BASE_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=BASE_ENV["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def stored(self, prefix: str) -> tuple[int, int]:
        total = count = 0
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                total += item["Size"]
                count += 1
        return total, count

    def delete_prefix(self, prefix: str) -> None:
        client = self.s3()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})

    def fresh_dst(self, start: bool = True, args: list[str] | None = None) -> Container:
        """Remove the previous restore target and give an empty one, started unless start is False."""
        self.remove_dst()
        shutil.rmtree(self.dst_root, ignore_errors=True)
        self.dst_root.mkdir()
        os.chown(self.dst_root, PG_UID, PG_UID)
        self.dst = Container(DST, self.image, self.dst_root / "data", mounts=[self.dst_root, self.shared])
        if start:
            self.dst.start(args)
            self.dst.wait_ready()
        return self.dst

    def remove_dst(self) -> None:
        if self.dst is not None:
            self.dst.remove()
            self.dst = None
        # A container of this exact name left by a bash phase of this run (barman's restore starts it).
        if self.dst_started_by_phase:
            run(f"docker rm -f {DST}", check=False)
            self.dst_started_by_phase = False

    dst_started_by_phase: bool = False

    # Measuring

    def phase(self, tool: str, name: str, rnd: int, command: str, containers: list[Container],
              env: dict[str, str] | None = None, prefix: str | None = None,
              check: Callable[[], str] | None = None) -> Result:  # fmt: skip
        assert self.moto is not None
        log(f"round {rnd}: {tool} {name}")
        ids = [c.container_id() for c in containers]
        m = measure(command, env or self.env, self.moto, ids, self.work / "logs" / f"{tool}.log")
        result = Result(tool=tool, phase=name, round=rnd, command=command, **{
            k: v for k, v in asdict(m).items() if k not in ("exit_code", "output_tail")})  # fmt: skip
        if m.exit_code != 0:
            result.error = f"exit code {m.exit_code}: {m.output_tail[-600:]}"
            log(f"  FAILED: {result.error}")
        elif check is not None:
            result.verified = check()
            log(f"  {m.seconds:.1f} s, verified: {result.verified}")
        else:
            log(f"  {m.seconds:.1f} s")
        if prefix is not None:
            result.stored_bytes, result.stored_objects = self.stored(prefix)
        self.results.append(result)
        return result

    def check_restore(self, etc: Path | None, var: Path | None, db: bool = True) -> str:
        problems = []
        if etc is not None and tree(etc) != self.truth["etc"]:
            problems.append("etc differs: " + diff(self.truth["etc"], tree(etc)))
        if var is not None and tree(var) != self.truth["var"]:
            problems.append("var differs: " + diff(self.truth["var"], tree(var)))
        if db:
            assert self.dst is not None
            try:
                tables = table_checksums(self.dst, TABLES)
            except RuntimeError as exc:
                tables = {"error": str(exc)[:200]}
            if tables != self.truth["tables"]:
                problems.append(f"tables differ: {diff(self.truth['tables'], tables)}")
        return "; ".join(problems) if problems else "equal"

    def prepare_dst_roles(self) -> None:
        assert self.dst is not None
        self.dst.psql_script("create role dtr_app login;\ncreate database dtr owner dtr_app;\n")

    # Tools

    def run_dtrguard(self, rnd: int) -> None:
        prefix = f"dtrguard/r{rnd}"
        python = REPO / ".venv" / "bin" / "python"
        (self.work / "instance-id").write_text("i-0bench\n")
        backup_cfg = self.dtrguard_config("backup", prefix, SRC)
        assert self.src is not None
        self.phase("dtrguard", "backup", rnd, f"{python} -m dtrguard --config {backup_cfg} backup",
                   [self.src], prefix=prefix + "/")  # fmt: skip
        if self.args.backups_only:
            self.delete_prefix(prefix + "/")
            return
        # One GET per artifact (the default), then ranged GETs, 4 in flight (s3.download_streams).
        for phase, streams in (("restore", 1), (f"restore (ranged GETs, {RANGED_STREAMS} streams)", RANGED_STREAMS)):
            restore_cfg = self.dtrguard_config("restore", prefix, DST, f"download_streams = {streams}\n")
            dst = self.fresh_dst()
            keep = self.work / "node.keep"
            self.node.rename(keep)
            (self.node / "etc").mkdir(parents=True)
            (self.node / "var").mkdir()
            try:
                self.phase("dtrguard", phase, rnd, f"{python} -m dtrguard --config {restore_cfg} restore latest --force",
                           [dst], check=lambda: self.check_restore(self.node / "etc", self.node / "var"))  # fmt: skip
            finally:
                shutil.rmtree(self.node)
                keep.rename(self.node)
                shutil.rmtree(self.work / "dtrguard-state-restore", ignore_errors=True)
        self.delete_prefix(prefix + "/")

    def dtrguard_config(self, kind: str, prefix: str, container: str, s3_extra: str = "") -> Path:
        assert self.moto is not None
        path = self.work / f"dtrguard-{kind}.toml"
        container_prefix = container.removesuffix("postgres")
        path.write_text(f"""
[s3]
bucket = "{BUCKET}"
prefix = "{prefix}"
endpoint_url = "{self.moto.url}"
{s3_extra}
[node]
instance_id_source = "file:{self.work}/instance-id"
state_dir = "{self.work}/dtrguard-state-{kind}"

[[directories]]
path = "{self.node}/etc"
name = "etc"

[[directories]]
path = "{self.node}/var"
name = "var"

[postgres]
container = "{container}"

[dtr]
container_prefix = "{container_prefix}"
start_order = ["postgres"]
version_container = "postgres"
install_command = ["false"]
""")
        return path

    def run_shell(self, rnd: int) -> None:
        assert self.moto is not None and self.src is not None
        url = f"s3://{BUCKET}/shell/r{rnd}"
        aws = f"{self.aws} --endpoint-url {self.moto.url} s3 cp --only-show-errors"
        backup = (
            f"docker exec {SRC} pg_dumpall --globals-only -U postgres | {aws} - {url}/globals.sql"
            f" && docker exec {SRC} pg_dump -Ft -U postgres dtr | {aws} - {url}/dtr.tar"
            f" && tar -czf - -C {self.node} etc var | {aws} - {url}/dirs.tar.gz"
        )
        self.phase("shell", "backup", rnd, backup, [self.src], prefix=f"shell/r{rnd}/")
        if self.args.backups_only:
            self.delete_prefix(f"shell/r{rnd}/")
            return
        one_stream = self.work / "aws-one-stream.cfg"
        one_stream.write_text("[default]\ns3 =\n    multipart_threshold = 64GB\n")
        for name, env in (("restore", {**self.env, "AWS_CONFIG_FILE": str(one_stream)}),
                          ("restore (ranged GETs)", self.env)):  # fmt: skip
            dst = self.fresh_dst()
            target = self.work / "restore-shell"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            restore = (
                f"{aws} {url}/globals.sql - | docker exec -i {DST} psql -X -q -U postgres -d postgres 2>/dev/null"
                f" && docker exec {DST} psql -X -q -U postgres -c 'create database dtr owner dtr_app'"
                f" && {aws} {url}/dtr.tar - | docker exec -i {DST} pg_restore -U postgres -d dtr --exit-on-error"
                f" && {aws} {url}/dirs.tar.gz - | tar -xzf - -C {target}"
            )
            self.phase("shell", name, rnd, restore, [dst], env=env,
                       check=lambda t=target: self.check_restore(t / "etc", t / "var"))  # fmt: skip
            shutil.rmtree(target)
        self.delete_prefix(f"shell/r{rnd}/")

    def run_restic(self, rnd: int) -> None:
        assert self.moto is not None and self.src is not None
        env = {
            **self.env,
            "RESTIC_REPOSITORY": f"s3:{self.moto.url}/{BUCKET}/restic/r{rnd}",
            "RESTIC_CACHE_DIR": str(self.work / "restic-cache"),
        }
        run("restic -q init", env=env)
        backup = (
            f"restic -q backup --host bench --tag dirs {self.node}/etc {self.node}/var"
            f" && docker exec {SRC} pg_dumpall --globals-only -U postgres"
            f" | restic -q backup --host bench --tag globals --stdin --stdin-filename globals.sql"
            f" && docker exec {SRC} pg_dump -Fc -Z0 -U postgres dtr"
            f" | restic -q backup --host bench --tag db --stdin --stdin-filename dtr.dump"
        )
        self.phase("restic", "backup", rnd, backup, [self.src], env=env, prefix=f"restic/r{rnd}/")
        if self.args.backups_only:
            self.delete_prefix(f"restic/r{rnd}/")
            return
        shutil.rmtree(self.work / "restic-cache", ignore_errors=True)  # a new node has no cache
        dst = self.fresh_dst()
        target = self.work / "restore-restic"
        shutil.rmtree(target, ignore_errors=True)
        restore = (
            f"restic -q --no-cache restore latest --tag dirs --target {target}"
            f" && restic --no-cache dump latest --tag globals /globals.sql"
            f" | docker exec -i {DST} psql -X -q -U postgres -d postgres 2>/dev/null"
            f" && docker exec {DST} psql -X -q -U postgres -c 'create database dtr owner dtr_app'"
            f" && restic --no-cache dump latest --tag db /dtr.dump"
            f" | docker exec -i {DST} pg_restore -U postgres -d dtr --exit-on-error"
        )
        inner = Path(str(target) + str(self.node))
        self.phase("restic", "restore", rnd, restore, [dst], env=env,
                   check=lambda: self.check_restore(inner / "etc", inner / "var"))  # fmt: skip
        shutil.rmtree(target, ignore_errors=True)
        self.delete_prefix(f"restic/r{rnd}/")

    def run_barman(self, rnd: int) -> None:
        assert self.moto is not None and self.src is not None
        bindir = self.barman_bin
        url = f"s3://{BUCKET}/barman/r{rnd}"
        endpoint = f"--endpoint-url {self.moto.url}"
        for name in os.listdir(self.wal):
            (self.wal / name).unlink()
        backup = (
            f"{bindir}/barman-cloud-backup -z --immediate-checkpoint {endpoint} -h 127.0.0.1 -p {self.src.port}"
            f" -U postgres -d postgres {url} pg"
            f' && for f in {self.wal}/*; do {bindir}/barman-cloud-wal-archive -z {endpoint} {url} pg "$f" || exit 1; done'
        )
        self.phase("barman", "backup (database only)", rnd, backup, [self.src], prefix=f"barman/r{rnd}/")
        if self.args.backups_only:
            self.delete_prefix(f"barman/r{rnd}/")
            return
        self.fresh_dst(start=False)
        data = self.dst_root / "data"
        walcopy = self.shared / "barman-wal"
        shutil.rmtree(walcopy, ignore_errors=True)
        walcopy.mkdir()
        settings = (
            f"-c 'restore_command=cat {walcopy}/%f > %p' -c recovery_target=immediate"
            " -c recovery_target_action=promote -c archive_mode=off"
        )
        restore = (
            f"{bindir}/barman-cloud-restore {endpoint} {url} pg latest {data}"
            f" && {bindir}/barman-cloud-backup-show --format json {endpoint} {url} pg latest"
            f" | {sys.executable} {BENCH}/barman_wal.py"
            f" | while read -r segment; do {bindir}/barman-cloud-wal-restore {endpoint} {url} pg"
            f' "$segment" {walcopy}/"$segment" || exit 1; done'
            f" && mkdir -p {data}/pg_wal && touch {data}/recovery.signal"
            f" && chown -R {PG_UID}:{PG_UID} {self.dst_root} {walcopy} && chmod 700 {data}"
            f" && docker run -d --name {DST} -e PGDATA={data} -v {self.dst_root}:{self.dst_root}"
            f" -v {self.shared}:{self.shared} {self.image} {settings} >/dev/null"
            f" && until docker exec {DST} psql -X -At -U postgres -c 'select pg_is_in_recovery()' 2>/dev/null"
            f" | grep -qx f; do sleep 0.2; done"
        )
        self.dst_started_by_phase = True
        assert self.dst is not None

        def check() -> str:
            assert self.dst is not None
            self.dst.started_here = True
            return self.check_restore(None, None)

        self.phase("barman", "restore (database only)", rnd, restore, [], check=check)
        self.delete_prefix(f"barman/r{rnd}/")

    def run_limits(self, rnd: int) -> None:
        assert self.moto is not None and self.src is not None
        self.phase("limits", "pg_dump > /dev/null (docker exec)", rnd,
                   f"docker exec {SRC} pg_dump -Fc -Z0 -U postgres dtr > /dev/null", [self.src])  # fmt: skip
        self.phase("limits", "pg_dump > /dev/null (host, TCP 127.0.0.1)", rnd,
                   f"pg_dump -Fc -Z0 -h 127.0.0.1 -p {self.src.port} -U postgres dtr > /dev/null", [self.src])  # fmt: skip
        self.phase("limits", "pg_dump > /dev/null (host, unix socket)", rnd,
                   f"pg_dump -Fc -Z0 -h {self.sock} -U postgres dtr > /dev/null", [self.src])  # fmt: skip
        self.phase("limits", "tar -cf - dirs | cat > /dev/null", rnd,
                   f"tar -cf - -C {self.node} etc var | cat > /dev/null", [])  # fmt: skip
        tar_file, extracted = self.work / "dirs.tar", self.work / "extracted"
        run(f"tar -cf {tar_file} -C {self.node} etc var")
        shutil.rmtree(extracted, ignore_errors=True)
        extracted.mkdir()
        try:
            self.phase("limits", "tar -xf dirs from a local file", rnd, f"tar -xf {tar_file} -C {extracted}", [])
        finally:
            shutil.rmtree(extracted, ignore_errors=True)
            tar_file.unlink()
        key = f"limits/r{rnd}/raw"
        raw = f"{REPO}/.venv/bin/python {BENCH}/raw_s3.py --url {self.moto.url} --bucket {BUCKET} --key {key}"
        self.phase("limits", f"raw multipart upload ({self.raw_bytes} bytes, boto3)", rnd,
                   f"{raw} upload --bytes {self.raw_bytes}", [], prefix=f"limits/r{rnd}/")  # fmt: skip
        self.phase("limits", "raw download, one GET (boto3)", rnd, f"{raw} download", [])
        self.delete_prefix(f"limits/r{rnd}/")
        dst = self.fresh_dst()
        self.prepare_dst_roles()
        self.phase("limits", "pg_restore from a local file", rnd,
                   f"docker exec {DST} pg_restore -U postgres -d dtr --exit-on-error {self.shared}/dtr.dump",
                   [dst], check=lambda: self.check_restore(None, None))  # fmt: skip

    # Whole run

    def run(self) -> None:
        self.setup()
        tools = [t for t in TOOLS if t in self.args.tools]
        runners = {"dtrguard": self.run_dtrguard, "shell": self.run_shell, "restic": self.run_restic,
                   "barman": self.run_barman, "limits": self.run_limits}  # fmt: skip
        for rnd in range(1, self.args.rounds + 1):
            order = tools[(rnd - 1) % len(tools) :] + tools[: (rnd - 1) % len(tools)]
            for tool in order:
                try:
                    runners[tool](rnd)
                except Exception as exc:  # one tool's failure is recorded, the others still run
                    log(f"round {rnd}: {tool} failed: {exc}")
                    self.results.append(Result(tool, "(setup)", rnd, 0, 0, 0, 0, 0, 0, 0, {}, error=str(exc)[:2000]))
                finally:
                    self.remove_dst()

    def cleanup(self) -> None:
        self.remove_dst()
        if self.src is not None:
            self.src.remove()
        if self.moto is not None:
            self.moto.stop()
        for path in ("node", "dst", "restore-shell", "restore-restic", "shared", "node.keep"):
            shutil.rmtree(self.work / path, ignore_errors=True)


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root: type, mode, owner, and content hash with mtime, or link target."""
    result: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in [*dirs, *files]:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                detail: Any = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                detail = (hashlib.sha256(path.read_bytes()).hexdigest(), int(info.st_mtime))
            else:
                detail = None
            result[relative] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, detail)
    return result


def diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    sample = ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys[:3])
    return f"{len(keys)} of {len(before | after)} entries ({sample})"


def machine(cache: Path, work: Path) -> dict[str, Any]:
    def out(command: str) -> str:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        return (result.stdout or result.stderr).strip().splitlines()[0] if (result.stdout or result.stderr) else ""

    memory = out("awk '/MemTotal/ {print $2}' /proc/meminfo")
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024 / 1024, 1) if memory else None,
        "kernel": platform.release(),
        "cpu": out("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "versions": {
            "dtrguard": out(f"PYTHONPATH={work}/dtrguard-src {REPO}/.venv/bin/python -m dtrguard --version"),
            "python": platform.python_version(),
            "docker": out("docker version --format '{{.Server.Version}}'"),
            "postgres (container)": out(f"docker exec {SRC} postgres --version"),
            "pg_dump (host)": out("pg_dump --version"),
            "moto": out(f"{REPO}/.venv/bin/python -c 'import moto; print(moto.__version__)'"),
            "awscli": out(f"{cache}/venv-awscli/bin/aws --version"),
            "restic": out("restic version"),
            "barman-cloud": out(f"{cache}/venv-barman/bin/barman-cloud-backup --version"),
            "tar": out("tar --version"),
            "gzip": out("gzip --version"),
        },
    }


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.tool, result.phase), []).append(result)
    rows = []
    for (tool, phase), items in groups.items():
        good = [r for r in items if not r.error]

        def stats(values: list[float]) -> dict[str, float] | None:
            return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

        rows.append({
            "tool": tool, "phase": phase, "runs": len(items), "failures": len(items) - len(good),
            "seconds": stats([r.seconds for r in good]),
            "cpu_tool": stats([r.cpu_tool for r in good]),
            "cpu_container": stats([r.cpu_container for r in good]),
            "cpu_engine": stats([r.cpu_engine for r in good]),
            "cpu_moto": stats([r.cpu_moto for r in good]),
            "rss_tool": stats([r.rss_tool for r in good]),
            "rss_container": stats([r.rss_container for r in good]),
            "stored_bytes": stats([r.stored_bytes for r in good if r.stored_bytes is not None]),
            "stored_objects": stats([r.stored_objects for r in good if r.stored_objects is not None]),
            "requests": stats([r.requests.get("total", 0) for r in good]),
            "requests_by_kind": good[-1].requests if good else {},
            "verified": sorted({r.verified for r in good if r.verified}),
            "errors": [r.error for r in items if r.error][:3],
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default="100M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("BENCH_CACHE", "/var/cache/dtrguard-bench")))
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: <cache>/run)")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="write the results section of this file ('' to skip)")  # fmt: skip
    parser.add_argument("--dtrguard-ref", default="HEAD", help="the git commit of dtrguard to measure")
    parser.add_argument("--backups-only", action="store_true", help="leave out every tool's restore phases")
    parser.add_argument("--label", default="", help="a note printed above the results, e.g. 'development run'")
    args = parser.parse_args()
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if os.geteuid() != 0:
        print("bench: run as root (restores chown files and read Postgres' files)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    bench = Bench(args, args.work or args.cache / "run", args.cache)
    started = datetime.now(UTC)
    clock = time.monotonic()
    code = 0
    try:
        bench.run()
        info = machine(args.cache, bench.work)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc}); cleaning up")
        code = 130
        info = {}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
    if code:
        return code
    document = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - clock, 1),
        "label": args.label,
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "machine": info,
        **bench.info,
        "expected_rows": row_counts(args.size),
        "summary": summarize(bench.results),
        "results": [asdict(r) for r in bench.results],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.size}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(document, indent=1) + "\n")
    log(f"results: {out}")
    if args.docs != Path(""):
        report.write_section(args.docs, document, out.relative_to(REPO) if out.is_relative_to(REPO) else out)
        log(f"results table written into {args.docs}")
    print(report.table(document))
    failed = [r for r in bench.results if r.error or (r.verified and r.verified != "equal")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
