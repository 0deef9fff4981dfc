#!/usr/bin/env bash
# Set this machine up, then run the local demo: dtrguard backs up node A to a local S3 server,
# node A is destroyed, and dtrguard restores node B from the backup. See scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every process started here gets dummy credentials. The demo sends requests only to 127.0.0.1.
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_EC2_METADATA_DISABLED=true AWS_DEFAULT_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py
