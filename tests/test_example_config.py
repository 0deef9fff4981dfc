"""The commented example config shipped in packaging/ stays valid and shows the real defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtrguard import config
from dtrguard.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "packaging" / "dtrguard.toml"


def test_example_config_matches_defaults(tmp_path: Path) -> None:
    edited = tmp_path / "dtrguard.toml"
    edited.write_text(EXAMPLE.read_text().replace("CHANGE-ME-dtr-backups", "my-dtr-backups"))
    example = config.load(edited)
    defaults = config.parse({"s3": {"bucket": "my-dtr-backups"}}, edited)
    assert example == defaults


def test_example_placeholder_bucket_rejected() -> None:
    with pytest.raises(ConfigError, match=r"s3\.bucket"):
        config.load(EXAMPLE)


def test_example_config_loads_for_local_commands() -> None:
    settings = config.load(EXAMPLE, local_only=True)
    assert settings.s3.bucket == ""
    assert settings.node.state_dir == Path("/var/lib/dtrguard")
