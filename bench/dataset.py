"""The benchmark's DTR-like data set: a metadata database and the node's two directories.

Both are generated once per size and generator version and kept under the cache directory:

    <cache>/pg-<size>-g<version>/data     a PGDATA directory, bind-mounted at the same path
    <cache>/files-<size>-g<version>/etc   the config directory (a few dozen small files)
    <cache>/files-<size>-g<version>/var   the registry's storage: blobs, configs, tag links

A `complete` file in each marks a finished generation; a directory without it is generated again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from infra import PG_UID, Container, log

GENERATOR_VERSION = 1
SIZES = {"100M": 100, "1G": 1000, "5G": 5000}  # megabytes of database on disk

# Rows per 100 MB of database. Manifests (about 1.5 KB of JSON each) take most of the space.
ROWS_PER_100M = {
    "accounts": 2_000,
    "teams": 300,
    "team_members": 6_000,
    "repositories": 4_000,
    "manifests": 38_000,
    "tags": 57_000,
    "events": 76_000,
}

# 32 syllables; a word is 2 or 3 of them chosen by a number below 4096, drawn with a skew so that
# some words are common and most are rare, as in real text.
_SYLLABLES = [
    "ba",
    "ko",
    "ri",
    "ne",
    "tu",
    "sa",
    "mi",
    "lo",
    "de",
    "va",
    "gu",
    "pe",
    "zo",
    "fi",
    "ha",
    "ju",
    "ca",
    "xe",
    "wo",
    "ly",
    "qua",
    "tre",
    "sno",
    "pla",
    "gri",
    "ste",
    "bro",
    "cla",
    "dri",
    "fle",
    "mor",
    "vin",
]

_SCHEMA_SQL = """
\\set ON_ERROR_STOP 1
create role dtr_app login;
create database dtr owner dtr_app;
\\c dtr
select setseed(0.42);
create function bench_word(k int) returns text immutable language sql as $$
  select (array[{syllables}])[1 + k % 32] || (array[{syllables}])[1 + (k / 32) % 32]
         || case when k >= 1024 then (array[{syllables}])[1 + (k / 1024) % 32] else '' end
$$;
create function bench_words(n int) returns text volatile language sql as $$
  select string_agg(bench_word(floor(4096 * power(random(), 1.4))::int), ' ') from generate_series(1, n)
$$;
create function bench_digest() returns text volatile language sql as $$
  select 'sha256:' || md5(random()::text) || md5(random()::text)
$$;
create table accounts (
  id bigint primary key, name text not null unique, full_name text, email text, is_org boolean not null,
  is_admin boolean not null, password_hash text, created_at timestamptz not null);
create table teams (
  id bigint primary key, org_id bigint not null references accounts(id), name text not null,
  description text);
create table team_members (
  id bigint primary key, team_id bigint not null references teams(id),
  account_id bigint not null references accounts(id), role text not null);
create table repositories (
  id bigint primary key, namespace_id bigint not null references accounts(id), name text not null,
  description text, visibility text not null, created_at timestamptz not null);
create table manifests (
  id bigint primary key, repository_id bigint not null references repositories(id), digest text not null,
  media_type text not null, size bigint not null, payload jsonb not null, created_at timestamptz not null);
create table tags (
  id bigint primary key, repository_id bigint not null references repositories(id), name text not null,
  manifest_id bigint not null references manifests(id), pusher_id bigint references accounts(id),
  pushed_at timestamptz not null);
create table events (
  id bigint primary key, occurred_at timestamptz not null, actor_id bigint references accounts(id),
  action text not null, repository_id bigint references repositories(id), detail jsonb not null);
"""

_DATA_SQL = """
\\set ON_ERROR_STOP 1
\\c dtr
select setseed(0.42);
insert into accounts
select g, bench_word(g % 4096) || '-' || g, initcap(bench_words(2)), bench_word(g % 4096) || g || '@example.com',
       g % 10 = 0, g % 97 = 0, '$2a$10$' || substr(md5(random()::text) || md5(random()::text), 1, 53),
       timestamptz '2015-01-01' + g * interval '37 minutes'
from generate_series(1, {accounts}) g;
insert into teams
select g, 10 * (1 + (g * 7) % greatest({accounts} / 10, 1)), bench_words(1 + g % 2), bench_words(5 + g % 11)
from generate_series(1, {teams}) g;
insert into team_members
select g, 1 + (g * 13) % {teams}, 1 + (g * 31) % {accounts}, (array['member', 'admin', 'owner'])[1 + g % 3]
from generate_series(1, {team_members}) g;
insert into repositories
select g, 1 + (g * 17) % {accounts}, bench_word(g % 4096) || '-' || bench_word((g * 7) % 4096) || '-' || g,
       bench_words(10 + g % 31), (array['public', 'private'])[1 + g % 2],
       timestamptz '2015-06-01' + g * interval '11 minutes'
from generate_series(1, {repositories}) g;
insert into manifests
select g, 1 + (g * 7) % {repositories}, bench_digest(),
       'application/vnd.docker.distribution.manifest.v2+json', 1000 + (random() * 9000)::int,
       jsonb_build_object(
         'schemaVersion', 2,
         'mediaType', 'application/vnd.docker.distribution.manifest.v2+json',
         'config', jsonb_build_object('mediaType', 'application/vnd.docker.container.image.v1+json',
                                      'size', 1000 + (random() * 8000)::int, 'digest', bench_digest()),
         'layers', (select jsonb_agg(jsonb_build_object(
                        'mediaType', 'application/vnd.docker.image.rootfs.diff.tar.gzip',
                        'size', (random() * 50000000)::int, 'digest', bench_digest()))
                    from generate_series(1, 2 + g % 5) l),
         'history', (select jsonb_agg(jsonb_build_object(
                        'created', to_char(timestamptz '2016-01-01' + (g + h) * interval '3 minutes',
                                           'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                        'created_by', '/bin/sh -c ' || bench_words(4 + (g + h) % 13)))
                     from generate_series(1, 3 + (g + 3) % 6) h),
         'labels', jsonb_build_object('maintainer', bench_words(2), 'description', bench_words(6 + g % 9))),
       timestamptz '2016-01-01' + g * interval '3 minutes'
from generate_series(1, {manifests}) g;
insert into tags
select g, 1 + (g * 7) % {repositories}, (array['latest', 'v', 'release-', 'build-'])[1 + g % 4] || (g % 500),
       1 + (g * 11) % {manifests}, 1 + (g * 19) % {accounts}, timestamptz '2016-01-01' + g * interval '2 minutes'
from generate_series(1, {tags}) g;
insert into events
select g, timestamptz '2016-01-01' + g * interval '90 seconds', 1 + (g * 23) % {accounts},
       (array['push', 'pull', 'pull', 'pull', 'delete', 'login', 'team.add', 'repo.create'])[1 + g % 8],
       1 + (g * 29) % {repositories},
       jsonb_build_object('tag', bench_word(g % 4096), 'client', 'docker/1.' || (g % 13) || '.' || (g % 3),
                          'remote', '10.' || (g % 250) || '.' || ((g / 250) % 250) || '.' || (g % 7),
                          'note', bench_words(3 + g % 14))
from generate_series(1, {events}) g;
drop function bench_words(int);
drop function bench_word(int);
drop function bench_digest();
"""
_OWNER_SQL = """
\\set ON_ERROR_STOP 1
\\c dtr
{statements}
vacuum analyze;
\\c postgres
create table settings (key text primary key, value text);
insert into settings values ('hub.url', 'https://dtr.example.com'), ('auth', 'managed');
checkpoint;
"""
TABLES = list(ROWS_PER_100M)


def row_counts(size: str) -> dict[str, int]:
    factor = SIZES[size] / 100
    return {table: max(1, round(rows * factor)) for table, rows in ROWS_PER_100M.items()}


@dataclass
class Dataset:
    size: str
    cache: Path

    @property
    def pg_root(self) -> Path:
        return self.cache / f"pg-{self.size}-g{GENERATOR_VERSION}"

    @property
    def pgdata(self) -> Path:
        return self.pg_root / "data"

    @property
    def files_root(self) -> Path:
        return self.cache / f"files-{self.size}-g{GENERATOR_VERSION}"

    def ensure(self, image: str, container_name: str) -> dict[str, float]:
        """Generate what is missing; return the seconds each generation took (0 when cached)."""
        took = {"database": 0.0, "files": 0.0}
        if not (self.pg_root / "complete").exists():
            clock = time.monotonic()
            self._generate_database(image, container_name)
            took["database"] = round(time.monotonic() - clock, 1)
        if not (self.files_root / "complete").exists():
            clock = time.monotonic()
            self._generate_files()
            took["files"] = round(time.monotonic() - clock, 1)
        return took

    def _generate_database(self, image: str, container_name: str) -> None:
        log(f"dataset: generating the {self.size} database in {self.pgdata} (cached for later runs)")
        shutil.rmtree(self.pg_root, ignore_errors=True)
        self.pg_root.mkdir(parents=True)
        os.chown(self.pg_root, PG_UID, PG_UID)
        # Durability settings are off only while generating; the clean shutdown below writes everything.
        container = Container(container_name, image, pgdata=self.pgdata, mounts=[self.pg_root])
        container.start(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
                         "-c", "max_wal_size=8GB", "-c", "checkpoint_timeout=1h"])  # fmt: skip
        try:
            container.wait_ready()
            counts = row_counts(self.size)
            syllables = ", ".join(f"'{s}'" for s in _SYLLABLES)
            container.psql_script(_SCHEMA_SQL.replace("{syllables}", syllables))
            container.psql_script(_DATA_SQL.format(**counts))
            owners = "\n".join(f"alter table {t} owner to dtr_app;" for t in TABLES)
            container.psql_script(_OWNER_SQL.format(statements=owners))
            container.stop()
        finally:
            container.remove()
        # The published port is bound to 127.0.0.1 only; host tools (pg_dump over TCP, barman) connect through it.
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        (self.pg_root / "complete").write_text(json.dumps({"rows": row_counts(self.size)}) + "\n")

    def _generate_files(self) -> None:
        log(f"dataset: generating the {self.size} directories in {self.files_root} (cached for later runs)")
        shutil.rmtree(self.files_root, ignore_errors=True)
        write_directories(self.files_root / "etc", self.files_root / "var", SIZES[self.size] / 1000)
        (self.files_root / "complete").write_text("ok\n")


def write_directories(etc: Path, var: Path, scale: float) -> None:
    """Write DTR-like directories: about 200 MB in 10,000 files per unit of scale."""
    rng = random.Random(42)
    mtime = 1_600_000_000
    (etc / "ssl").mkdir(parents=True)
    (etc / "generatedConfigs").mkdir()
    (etc / "hub.yml").write_text(
        "load_balancer_http_port: 80\nload_balancer_https_port: 443\ndomain_name: dtr.example.com\n"
    )
    (etc / "storage.yml").write_text("version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /storage\n")
    (etc / "license.json").write_text(json.dumps({"key_id": "k-123", "expiration": "2027-01-01", "tier": "Trial"}))
    (etc / "ssl" / "server.pem").write_text(
        "-----BEGIN CERTIFICATE-----\n" + rng.randbytes(900).hex() + "\n-----END CERTIFICATE-----\n"
    )
    (etc / "ssl" / "server.key").write_text(
        "-----BEGIN PRIVATE KEY-----\n" + rng.randbytes(1200).hex() + "\n-----END PRIVATE KEY-----\n"
    )
    os.chmod(etc / "ssl" / "server.key", 0o600)
    for index in range(24):
        lines = [f"server_{index}_{n} {{ listen {8000 + n}; proxy_pass http://backend_{n}; }}" for n in range(40)]
        (etc / "generatedConfigs" / f"service-{index:02}.conf").write_text("\n".join(lines) + "\n")
    os.symlink("../hub.yml", etc / "generatedConfigs" / "hub.yml")

    total_files = max(100, round(10_000 * scale))
    total_bytes = 200_000_000 * scale
    links = total_files // 4
    configs = total_files // 5
    layers = total_files - links - configs
    storage = var / "image-storage" / "local" / "docker" / "registry" / "v2"
    blobs = storage / "blobs" / "sha256"
    config_sizes = [rng.randint(1_000, 8_000) for _ in range(configs)]
    weights = [rng.lognormvariate(0, 1.3) for _ in range(layers)]
    layer_budget = total_bytes - sum(config_sizes) - 71 * links
    layer_sizes = [max(512, int(layer_budget * w / sum(weights))) for w in weights]

    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(2048)]
    digests = []
    for size in config_sizes:
        body = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", f"{rng.choice(words).upper()}=1"],
                       "Cmd": [rng.choice(words) for _ in range(3)]},
            "history": [],
        }  # fmt: skip
        while len(json.dumps(body)) < size:
            body["history"].append({"created_by": "/bin/sh -c " + " ".join(rng.choices(words, k=12))})
        digests.append(_write_blob(blobs, json.dumps(body).encode(), rng))
    for size in layer_sizes:
        digests.append(_write_blob(blobs, rng.randbytes(size), rng))
    repositories = storage / "repositories"
    for index in range(links):
        link = (
            repositories / f"team{index % 17}" / f"repo-{index % 113}" / "_manifests" / "tags" / f"v{index}" / "current"
        )
        link.mkdir(parents=True)
        (link / "link").write_text("sha256:" + digests[index % len(digests)])
    (var / "logs").mkdir()
    (var / "logs" / "admin.log").write_text("log lines are excluded from backups\n")
    for directory, dirs, files in os.walk(var / "image-storage"):
        for name in dirs + files:
            path = Path(directory, name)
            os.lchown(path, 1000, 1000)
            if not path.is_symlink():
                os.utime(path, (mtime, mtime))
    for directory, _dirs, files in os.walk(etc):
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                os.utime(path, (mtime, mtime))


def _write_blob(blobs: Path, data: bytes, rng: random.Random) -> str:
    digest = rng.randbytes(32).hex()
    folder = blobs / digest[:2] / digest
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").write_bytes(data)
    return digest


def describe_files(root: Path) -> dict[str, int]:
    files = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                files += 1
                size += path.stat().st_size
    return {"files": files, "bytes": size}
