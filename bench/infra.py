"""What the benchmark runs on: its Postgres containers, moto's S3 server, and the measurement of one phase.

Every container and process here is started by the benchmark and removed by it, by exact name or id.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import MotoServer  # tests/servers.py; bench.py puts tests/ on sys.path

PG_UID = 999
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:7.1f} s] {message}", flush=True)


def run(command: str, capture: bool = False, check: bool = True, env: dict[str, str] | None = None,
        stdin: Any = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a bash command line; raise with its output when it fails."""
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env, stdin=stdin
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"command failed ({result.returncode}): {command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    return result


@dataclass
class Container:
    """A Postgres container of the benchmark, its PGDATA a host directory mounted at the same path."""

    name: str
    image: str
    pgdata: Path
    mounts: list[Path] = field(default_factory=list)
    port: int = 0
    started_here: bool = False

    def start(self, args: list[str] | None = None, extra_mounts: dict[Path, str] | None = None) -> None:
        volumes = []
        for path in self.mounts:
            volumes += ["-v", f"{path}:{path}"]
        for host, inside in (extra_mounts or {}).items():
            volumes += ["-v", f"{host}:{inside}"]
        command = [
            "docker", "run", "-d", "--name", self.name, "-e", f"PGDATA={self.pgdata}",
            "-p", "127.0.0.1::5432", *volumes, self.image, *(args or []),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        self.started_here = True
        out = run(f"docker port {self.name} 5432/tcp", capture=True).stdout.strip().splitlines()[0]
        self.port = int(out.rsplit(":", 1)[1])

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = run(f"docker exec {self.name} psql -X -U postgres -d postgres -Atc 'select pg_is_in_recovery()'",
                         check=False)  # fmt: skip
            if result.returncode == 0 and result.stdout.strip() == "f":
                return
            state = run(f"docker inspect -f '{{{{.State.Running}}}}' {self.name}", capture=True, check=False)
            if state.stdout.strip() == "false":
                logs = run(f"docker logs --tail 30 {self.name}", check=False)
                raise RuntimeError(f"container {self.name} exited:\n{logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        raise RuntimeError(f"Postgres in {self.name} not ready within {timeout} s")

    def psql_script(self, script: str, database: str = "postgres") -> str:
        result = subprocess.run(
            ["docker", "exec", "-i", self.name, "psql", "-X", "-q", "-U", "postgres", "-d", database, "-f", "-"],
            input=script, capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0 or "ERROR" in result.stderr:
            raise RuntimeError(f"psql script in {self.name} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def query(self, sql: str, database: str = "dtr") -> list[list[str]]:
        result = run(
            f"docker exec {self.name} psql -X -A -t -F '|' -v ON_ERROR_STOP=1 -U postgres -d {database}"
            f" -c {shlex.quote(sql)}",
            capture=True,
        )
        return [line.split("|") for line in result.stdout.splitlines() if line]

    def container_id(self) -> str:
        return run(f"docker inspect -f '{{{{.Id}}}}' {self.name}", capture=True).stdout.strip()

    def stop(self) -> None:
        run(f"docker stop -t 120 {self.name}", check=False)

    def remove(self) -> None:
        if self.started_here:
            run(f"docker rm -f {self.name}", check=False)
            self.started_here = False


def table_checksums(container: Container, tables: list[str]) -> dict[str, str]:
    """Row count and an md5 over every row's md5, in id order, per table of the dtr database."""
    result = {}
    for table in tables:
        rows = container.query(
            f"select count(*) || ':' || coalesce(md5(string_agg(md5(t::text), '' order by id)), '') from {table} t"
        )
        result[table] = rows[0][0]
    return result


class Moto(MotoServer):
    """moto's S3 server on 127.0.0.1; its access log (one line per request) is how requests are counted."""

    def __init__(self, python: str, log_path: Path):
        super().__init__(python, log_path)
        self.log_path = log_path

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    def requests_since(self, offset: int) -> dict[str, int]:
        """Count the requests logged after offset, by method."""
        time.sleep(0.3)  # the server logs a request after answering it
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        counts: dict[str, int] = {}
        for match in _REQUEST_LINE.finditer(text):
            method, target = match.group(1), match.group(2)
            kind = method
            if method == "POST" and "uploads" in target:
                kind = "POST (multipart start)"
            elif method == "POST" and "uploadId" in target:
                kind = "POST (multipart complete)"
            elif method == "PUT" and "partNumber" in target:
                kind = "PUT (part)"
            elif method == "GET" and match.group(3) == "206":
                kind = "GET (ranged)"
            elif method == "GET" and ("list-type" in target or "prefix=" in target or target.count("/") <= 2):
                kind = "GET (list)"
            counts[kind] = counts.get(kind, 0) + 1
            counts["total"] = counts.get("total", 0) + 1
        return counts

    def cpu_seconds(self) -> float:
        return process_cpu(self.process.pid) if self.process else 0.0


# werkzeug's access log line; it colours some lines with ANSI escapes.
_REQUEST_LINE = re.compile(
    r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/1\.[01](?:\x1b\[[0-9;]*m)*" (\d{3})'
)
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_cpu(pid: int) -> float:
    """user+sys seconds of one process (its own threads, not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _children_map() -> dict[int, list[int]]:
    result: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        result.setdefault(ppid, []).append(int(entry))
    return result


def _descendants(root: int, children: dict[int, list[int]]) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def cgroup_cpu_ns(container_id: str) -> int:
    """CPU of every process in a container's cgroup, in ns (cgroup v1 cpuacct, or v2 cpu.stat)."""
    for path in (
        Path(f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage"),
        Path(f"/sys/fs/cgroup/cpu,cpuacct/docker/{container_id}/cpuacct.usage"),
    ):
        if path.exists():
            return int(path.read_text())
    for path in (
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/cpu.stat"),
    ):
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) * 1000
    return 0


def cgroup_procs(container_id: str) -> set[int]:
    for path in (
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}/cgroup.procs"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cgroup.procs"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/cgroup.procs"),
    ):
        if path.exists():
            return {int(p) for p in path.read_text().split()}
    return set()


def engine_pids() -> list[int]:
    """dockerd, containerd and the containerd shims: they carry `docker exec` streams."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                name = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if name in ("dockerd", "containerd") or name.startswith("containerd-shim") or name == "docker-proxy":
                pids.append(int(entry))
    return pids


@dataclass
class Measurement:
    seconds: float
    cpu_tool: float  # user+sys of the command's own process tree, children included
    cpu_container: float  # the Postgres container's cgroup: pg_dump/pg_restore and the server backend
    cpu_engine: float  # dockerd, containerd, shims, docker-proxy (shared with anything else using Docker)
    cpu_moto: float
    rss_tool: int  # peak of the summed RSS of the command's process tree
    rss_container: int  # peak of the summed RSS of processes that appeared in the container during the phase
    requests: dict[str, int]
    exit_code: int
    output_tail: str


def measure(command: str, env: dict[str, str], moto: Moto, containers: list[str], log_path: Path,
            interval: float = 0.05) -> Measurement:  # fmt: skip
    """Run one bash command line and measure it; containers are ids whose cgroup CPU counts as the phase's."""
    engines = engine_pids()
    engine_before = sum(process_cpu(p) for p in engines)
    moto_before = moto.cpu_seconds()
    cg_before = {c: cgroup_cpu_ns(c) for c in containers}
    initial = {c: cgroup_procs(c) for c in containers}
    offset = moto.log_offset()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "ab") as out:
        out.write(f"\n$ {command}\n".encode())
        out.flush()
        clock = time.monotonic()
        process = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], env=env, stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        peak_tool = peak_container = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_tool, peak_container
            while not done.is_set():
                children = _children_map()
                tree = _descendants(process.pid, children)
                peak_tool = max(peak_tool, sum(_rss(p) for p in tree))
                in_container = 0
                for cid in containers:
                    for pid in cgroup_procs(cid) - initial[cid]:
                        in_container += _rss(pid)
                peak_container = max(peak_container, in_container)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        seconds = time.monotonic() - clock
        done.set()
        sampler.join()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_tool = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    cpu_container = sum(cgroup_cpu_ns(c) - cg_before[c] for c in containers) / 1e9
    engine_after = sum(process_cpu(p) for p in engines)
    tail = log_path.read_bytes()[-1500:].decode(errors="replace")
    return Measurement(
        seconds=round(seconds, 3),
        cpu_tool=round(cpu_tool, 3),
        cpu_container=round(cpu_container, 3),
        cpu_engine=round(max(0.0, engine_after - engine_before), 3),  # a shim that exited takes its CPU along
        cpu_moto=round(moto.cpu_seconds() - moto_before, 3),
        rss_tool=peak_tool,
        rss_container=peak_container,
        requests=moto.requests_since(offset),
        exit_code=code,
        output_tail=tail,
    )
