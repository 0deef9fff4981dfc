"""Config parsing: defaults, durations, every error case, and how the command line reports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dtrguard import config
from dtrguard.errors import EXIT_CONFIG, ConfigError

REPO = Path(__file__).resolve().parent.parent
MINIMAL = '[s3]\nbucket = "dtr-backups"\n'


def load_text(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "dtrguard.toml"
    path.write_text(text)
    return config.load(path)


def config_error(tmp_path: Path, text: str) -> str:
    """Load text as a config file and return the ConfigError's text, hint included."""
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return str(caught.value)


# Valid files


def test_minimal_config_uses_defaults(tmp_path: Path) -> None:
    settings = load_text(tmp_path, MINIMAL)

    assert settings.s3.bucket == "dtr-backups"
    assert settings.s3.prefix == "dtrguard"
    assert settings.schedule.interval == 900.0
    assert settings.node.instance_id_source == "imds"
    assert settings.source == tmp_path / "dtrguard.toml"


def test_minimal_config_default_directories(tmp_path: Path) -> None:
    settings = load_text(tmp_path, MINIMAL)

    etc, var = settings.directories
    assert etc.path == Path("/usr/local/etc/dtr")
    assert etc.name == "usr-local-etc-dtr"
    assert etc.exclude == ()
    assert var.path == Path("/var/local/dtr")
    assert var.name == "var-local-dtr"
    assert var.exclude == ("logs",)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [('"15m"', 900.0), ('"90s"', 90.0), ('"1h"', 3600.0), ('"2d"', 172800.0), ('"500ms"', 0.5), ("120", 120.0),
     ("1.5", 1.5), ('" 30 "', 30.0), ('"365d"', 365 * 86400.0)],
)  # fmt: skip
def test_interval_duration_forms(written: str, seconds: float, tmp_path: Path) -> None:
    settings = load_text(tmp_path, f"{MINIMAL}[schedule]\ninterval = {written}\n")

    assert settings.schedule.interval == seconds


def test_directories_table_replaces_defaults(tmp_path: Path) -> None:
    text = f'{MINIMAL}[[directories]]\npath = "/srv/dtr/"\nexclude = ["logs/", "*.tmp"]\n'

    (directory,) = load_text(tmp_path, text).directories

    assert directory.path == Path("/srv/dtr")
    assert directory.name == "srv-dtr"
    assert directory.exclude == ("logs/", "*.tmp")


def test_prefix_slashes_stripped(tmp_path: Path) -> None:
    settings = load_text(tmp_path, '[s3]\nbucket = "dtr-backups"\nprefix = "/dtr/prod/"\n')

    assert settings.s3.prefix == "dtr/prod"


# Invalid files: each error names the key and, where there is one, the value.

ERRORS = {
    "missing-s3": ("[schedule]\ninterval = 60\n", ["missing required key s3"]),
    "missing-bucket": ('[s3]\nprefix = "x"\n', ["missing required key s3.bucket"]),
    "misspelt-bucket-only": ('[s3]\nbuket = "dtr-backups"\n', ["s3.bucket", "s3.buket"]),
    "invalid-bucket": ('[s3]\nbucket = "My_Bucket"\n', ["s3.bucket", "'My_Bucket'"]),
    "bucket-too-short": ('[s3]\nbucket = "ab"\n', ["s3.bucket", "'ab'"]),
    "bucket-not-string": ("[s3]\nbucket = 5\n", ["s3.bucket", "a string", "5"]),
    "unknown-top-key": (f'colour = "blue"\n{MINIMAL}', ["unknown key colour"]),
    "unknown-s3-key": (f'{MINIMAL}buket = "dtr-backups"\n', ["unknown key s3.buket"]),
    "unknown-schedule-key": (f"{MINIMAL}[schedule]\nintervall = 60\n", ["unknown key schedule.intervall"]),
    "unknown-directory-key": (
        f'{MINIMAL}[[directories]]\npath = "/srv/dtr"\nexlude = ["logs"]\n',
        ["unknown key directories[0].exlude"],
    ),
    "s3-not-table": ('s3 = "dtr-backups"\n', ["s3", "'dtr-backups'"]),
    "interval-zero": (f"{MINIMAL}[schedule]\ninterval = 0\n", ["schedule.interval", "0"]),
    "interval-word": (f'{MINIMAL}[schedule]\ninterval = "soon"\n', ["schedule.interval", "'soon'"]),
    "interval-negative-text": (f'{MINIMAL}[schedule]\ninterval = "-5m"\n', ["schedule.interval", "'-5m'"]),
    "interval-negative-number": (f"{MINIMAL}[schedule]\ninterval = -5\n", ["schedule.interval", "-5"]),
    "interval-nan": (f"{MINIMAL}[schedule]\ninterval = nan\n", ["schedule.interval", "nan"]),
    "interval-inf": (f"{MINIMAL}[schedule]\ninterval = inf\n", ["schedule.interval", "inf"]),
    "interval-too-long": (f'{MINIMAL}[schedule]\ninterval = "100000000d"\n', ["schedule.interval", "'100000000d'"]),
    "interval-bool": (f"{MINIMAL}[schedule]\ninterval = true\n", ["schedule.interval", "True"]),
    "timeout-negative": (f'{MINIMAL}read_timeout = "-1s"\n', ["s3.read_timeout", "'-1s'"]),
    "retry-max-below-initial": (
        f'{MINIMAL}[schedule]\nretry_initial_delay = "1m"\nretry_max_delay = "10s"\n',
        ["schedule.retry_max_delay", "10.0"],
    ),
    "relative-directory": (
        f'{MINIMAL}[[directories]]\npath = "var/local/dtr"\n',
        ["directories[0].path", "'var/local/dtr'"],
    ),
    "root-directory": (f'{MINIMAL}[[directories]]\npath = "/"\n', ["directories[0].path", "'/'"]),
    "directory-dotdot": (
        f'{MINIMAL}[[directories]]\npath = "/var/../etc"\n',
        ["directories[0].path", "'/var/../etc'"],
    ),
    "duplicate-directory-names": (
        f'{MINIMAL}[[directories]]\npath = "/a"\nname = "data"\n[[directories]]\npath = "/b"\nname = "data"\n',
        ["[[directories]]", "data, data"],
    ),
    "duplicate-directory-paths": (
        f'{MINIMAL}[[directories]]\npath = "/srv/dtr"\n[[directories]]\npath = "/srv/dtr/"\nname = "other"\n',
        ["[[directories]]", "srv-dtr, other"],
    ),
    "exclude-dotdot": (
        f'{MINIMAL}[[directories]]\npath = "/srv/dtr"\nexclude = ["../etc"]\n',
        ["directories[0].exclude", "'../etc'"],
    ),
    "exclude-absolute": (
        f'{MINIMAL}[[directories]]\npath = "/srv/dtr"\nexclude = ["/etc"]\n',
        ["directories[0].exclude", "'/etc'"],
    ),
    "exclude-not-strings": (
        f'{MINIMAL}[[directories]]\npath = "/srv/dtr"\nexclude = [1]\n',
        ["directories[0].exclude", "[1]"],
    ),
    "directories-not-tables": (f'directories = ["/srv/dtr"]\n{MINIMAL}', ["directories", "[[directories]]"]),
    "instance-id-source": (f'{MINIMAL}[node]\ninstance_id_source = "cloud"\n', ["node.instance_id_source", "'cloud'"]),
    "part-size-too-small": (f"{MINIMAL}part_size_mb = 1\n", ["invalid value 1 for s3.part_size_mb"]),
    "max-drop-too-large": (f"{MINIMAL}[retention]\nmax_drop = 2\n", ["invalid value 2 for retention.max_drop"]),
    "max-attempts-zero": (f"{MINIMAL}max_attempts = 0\n", ["s3.max_attempts", "0"]),
    "download-streams-zero": (f"{MINIMAL}download_streams = 0\n", ["s3.download_streams", "0"]),
    "download-streams-many": (f"{MINIMAL}download_streams = 64\n", ["s3.download_streams", "64", "1 to 32"]),
    "endpoint-not-url": (f'{MINIMAL}endpoint_url = "localhost:5000"\n', ["s3.endpoint_url", "'localhost:5000'"]),
    "container-name": (f'{MINIMAL}[postgres]\ncontainer = "bad name"\n', ["postgres.container", "'bad name'"]),
    "empty-start-order": (f"{MINIMAL}[dtr]\nstart_order = []\n", ["dtr.start_order", "[]"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_invalid_config_names_key(case: str, tmp_path: Path) -> None:
    text, fragments = ERRORS[case]

    message = config_error(tmp_path, text)

    for fragment in fragments:
        assert fragment in message


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        config.load(path)

    assert str(path) in caught.value.message
    assert "not found" in caught.value.message
    assert caught.value.exit_code == EXIT_CONFIG


def test_invalid_toml_names_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[s3]\nbucket = "dtr-backups"\nprefix = \n')

    assert "not valid TOML" in message
    assert "line 3" in message


def test_invalid_utf8_reported(tmp_path: Path) -> None:
    path = tmp_path / "dtrguard.toml"
    path.write_bytes(b'[s3]\nbucket = "dtr-\xff"\n')

    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)


def test_error_message_has_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, f"{MINIMAL}[schedule]\ninterval = 0\n")

    assert caught.value.hint is not None
    assert "15m" in caught.value.hint


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_PATH, "/from/env.toml")

    assert config.config_path("/explicit.toml") == Path("/explicit.toml")
    assert config.config_path(None) == Path("/from/env.toml")
    monkeypatch.delenv(config.ENV_PATH)
    assert config.config_path(None) == Path(config.DEFAULT_PATH)


# The command line: a bad config exits 2 before anything is created.

CLI_CASES = {
    "missing-bucket": ('[s3]\nprefix = "dtr"\n', "s3.bucket"),
    "interval-zero": (f"{MINIMAL}[schedule]\ninterval = 0\n", "schedule.interval"),
    "unknown-key": (f"{MINIMAL}[schedule]\nintervall = 60\n", "schedule.intervall"),
}


def run_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("AWS_") and key != "JOURNAL_STREAM"
    }
    environment.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        DTRGUARD_CONFIG="/nonexistent/must-not-be-read.toml",
    )
    return subprocess.run(
        [sys.executable, "-m", "dtrguard", "--config", str(config_path), "run"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_config_exits_2(case: str, tmp_path: Path) -> None:
    text, key = CLI_CASES[case]
    state_dir = tmp_path / "state"
    path = tmp_path / "dtrguard.toml"
    # The [node] table sits last so that the broken key above it stops parsing first.
    path.write_text(f'{text}\n[node]\ninstance_id_source = "file:{tmp_path}/id"\nstate_dir = "{state_dir}"\n')

    result = run_cli(path)

    assert result.returncode == EXIT_CONFIG
    assert key in result.stdout
    event = json.loads(result.stdout.strip().splitlines()[-1])
    assert event["event"] == "command.failed"
    assert key in event["error"]
    assert not state_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dtrguard.toml"]


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "absent.toml")

    assert result.returncode == EXIT_CONFIG
    assert "absent.toml" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_empty_directories_list_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directories is an empty list"):
        config.parse({"s3": {"bucket": "my-bucket"}, "directories": []}, tmp_path / "c.toml")


def test_nested_directories_rejected(tmp_path: Path) -> None:
    document = {"s3": {"bucket": "my-bucket"}, "directories": [{"path": "/srv/a"}, {"path": "/srv/a/b"}]}
    with pytest.raises(ConfigError, match="/srv/a/b lies inside directory /srv/a"):
        config.parse(document, tmp_path / "c.toml")


def test_relative_state_dir_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="node.state_dir"):
        config.parse({"s3": {"bucket": "my-bucket"}, "node": {"state_dir": "state"}}, tmp_path / "c.toml")


def test_stop_timeout_at_least_one_second(tmp_path: Path) -> None:
    settings = config.parse({"s3": {"bucket": "my-bucket"}, "dtr": {"stop_timeout": "500ms"}}, tmp_path / "c.toml")
    assert settings.dtr.stop_timeout == 1
