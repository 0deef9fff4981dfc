#!/usr/bin/env bash
# Run the dtrguard benchmark: bash bench/run.sh --size 1G --rounds 3
# Installs what it needs (Debian's restic, zstd and postgresql-client-15; awscli and barman-cloud in
# virtual environments under the cache directory), then runs bench/bench.py with the arguments given.
# bench.py starts and removes its own moto server and Postgres containers.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${BENCH_CACHE:-/var/cache/dtrguard-bench}"

[ "$(id -u)" = 0 ] || { echo "bench: run as root" >&2; exit 1; }
[ -x .venv/bin/python ] || bash scripts/setup.sh

need=()
command -v restic >/dev/null || need+=(restic)
command -v zstd >/dev/null || need+=(zstd)
[ -x /usr/lib/postgresql/15/bin/pg_dump ] || need+=(postgresql-client-15)
if [ ${#need[@]} -gt 0 ]; then
    echo "bench: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$cache"
if [ ! -x "$cache/venv-awscli/bin/aws" ]; then
    python3 -m venv "$cache/venv-awscli"
    "$cache/venv-awscli/bin/pip" install -q awscli
fi
# barman-cloud gets a virtual environment of its own: awscli pins botocore, barman needs boto3.
if [ ! -x "$cache/venv-barman/bin/barman-cloud-backup" ]; then
    python3 -m venv "$cache/venv-barman"
    "$cache/venv-barman/bin/pip" install -q 'barman[cloud]'
fi

export BENCH_CACHE="$cache"
export PATH="/usr/lib/postgresql/15/bin:$PATH"
exec .venv/bin/python bench/bench.py "$@"
