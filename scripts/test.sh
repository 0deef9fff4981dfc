#!/usr/bin/env bash
# Run every check: lint, types, then the test suite against moto's S3 server, a Postgres
# container and the Docker Engine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check dtrguard tests scripts
.venv/bin/ruff format --check dtrguard tests scripts
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
