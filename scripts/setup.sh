#!/usr/bin/env bash
# Prepare this machine for the tests and the demo: Debian packages, a running Docker Engine,
# and a virtual environment in .venv with dtrguard and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v dockerd >/dev/null || need_packages+=(docker.io)
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_packages+=(postgresql-15)
command -v ldd >/dev/null || need_packages+=(libc-bin)
# packaging/build-deb.sh and tests/nodeimage.py build Debian 12 root filesystems with debootstrap.
command -v debootstrap >/dev/null || need_packages+=(debootstrap)
# tests/test_templates.py validates the Packer template with Debian's packer.
command -v packer >/dev/null || need_packages+=(packer)
if [ ${#need_packages[@]} -gt 0 ]; then
    echo "setup: installing ${need_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    echo "setup: starting dockerd (log in /var/log/dtrguard-dockerd.log)"
    nohup dockerd >/var/log/dtrguard-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/dtrguard-dockerd.log" >&2; exit 1; }
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready ($(.venv/bin/python --version), $(docker version --format 'Docker Engine {{.Server.Version}}'))"
