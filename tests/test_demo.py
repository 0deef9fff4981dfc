"""The README's demo, run as a user runs it, so a change that breaks it fails the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtrnode import REPO, SECRET, assert_no_secret

pytestmark = pytest.mark.docker


def test_demo_passes() -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": SECRET}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert_no_secret(output, "the demo")
    assert result.returncode == 0, output[-4000:]
    assert "demo passed" in result.stdout
    assert "directory var-local-dtr: same" in result.stdout
    assert "database tables: same" in result.stdout
