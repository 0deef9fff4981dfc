#!/usr/bin/env bash
# Build dist/dtrguard_<version>_amd64.deb: a virtual environment in /opt/dtrguard made with
# Debian 12's own python3, so the target needs neither a compiler nor network access.
#
# 1. Base image dtrguard-build/bookworm:1 (debootstrap minbase + python3, python3-venv), built
#    once and then reused by tag.
# 2. Wheelhouse on this host: dtrguard's wheel and every dependency as a cp311 manylinux x86_64 wheel.
# 3. In a container of the base image, without network: python3 -m venv + pip install --no-index.
# 4. Package tree, maintainer scripts from packaging/debian, dpkg-deb --build --root-owner-group.
#
# Environment: PYTHON (host interpreter with pip, default .venv/bin/python or python3),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), DEB_MAINTAINER.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

BASE_IMAGE=dtrguard-build/bookworm:1
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MAINTAINER=${DEB_MAINTAINER:-dtrguard maintainers <dtrguard@localhost>}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Linux wheel tags that Debian 12 (glibc 2.36) can load. pip download expands manylinux2014 to
# manylinux2010 and manylinux1 but matches manylinux_2_<minor> tags exactly, so each minor is listed.
PLATFORMS=(manylinux2014_x86_64)
for minor in $(seq 36 -1 17); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done

for tool in docker debootstrap dpkg-deb flock; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool not found; run scripts/setup.sh" >&2; exit 1; }
done
# Builds share build/deb and dist/, so a second build on this checkout waits for the first.
mkdir -p build
exec 8>build/.build-deb.lock
flock 8
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
deb=dist/dtrguard_${version}_amd64.deb
work=build/deb
started=$SECONDS
rootfs=""
trap '[ -z "$rootfs" ] || rm -rf "$rootfs" "$rootfs.log"' EXIT

log() { echo "build-deb: $*"; }

# 1. The base image. The lock keeps two builds on this host from running debootstrap at once.
ensure_base_image() {
    exec 9>/tmp/dtrguard-build-image.lock
    flock 9
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE exists"
        exec 9>&-
        return
    fi
    log "building $BASE_IMAGE with debootstrap from $MIRROR; later builds reuse it"
    rootfs=$(mktemp -d /var/tmp/dtrguard-bookworm.XXXXXX)
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" \
        >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -c . | docker import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    rootfs=""
    exec 9>&-
    log "base image $BASE_IMAGE built"
}
ensure_base_image

# 2. The wheelhouse. dtrguard is built from a copy of its sources, so stale files in a
#    setuptools build/ directory cannot end up in the wheel.
rm -rf "$work"
mkdir -p "$work/src" "$work/wheels" "$work/venv" dist
cp pyproject.toml README.md "$work/src/"
cp -r dtrguard "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
log "building the dtrguard $version wheel"
"$PYTHON" -m pip wheel -q --no-deps --disable-pip-version-check -w "$work/wheels" "$work/src"
platform_args=()
for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
log "downloading dependency wheels for cp311 manylinux x86_64"
"$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: "${platform_args[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 -d "$work/wheels" "$work"/wheels/dtrguard-*.whl

# 3. The virtual environment, made by Debian's interpreter at the path it will have on the target.
log "installing into /opt/dtrguard inside $BASE_IMAGE (no network)"
docker run --rm --pull never --network none \
    -v "$repo/$work/wheels:/wheels:ro" -v "$repo/$work/venv:/out" \
    "$BASE_IMAGE" sh -euc '
        python3 -m venv /opt/dtrguard
        /opt/dtrguard/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check \
            --find-links /wheels dtrguard
        /opt/dtrguard/bin/dtrguard --version
        cp -a /opt/dtrguard /out/'

# 4. The package tree. Modes are set explicitly, so the build does not depend on this umask.
root=$work/root
mkdir -p "$root/DEBIAN" "$root/opt" "$root/lib/systemd/system" "$root/etc/dtrguard" "$root/usr/bin" \
    "$root/var/lib/dtrguard"
mv "$work/venv/dtrguard" "$root/opt/dtrguard"
install -m 0644 README.md "$root/opt/dtrguard/README.md"
install -m 0644 systemd/dtrguard.service "$root/lib/systemd/system/dtrguard.service"
install -m 0600 packaging/dtrguard.toml "$root/etc/dtrguard/dtrguard.toml"
ln -s /opt/dtrguard/bin/dtrguard "$root/usr/bin/dtrguard"
chmod 0755 "$root/etc/dtrguard"
chmod 0700 "$root/var/lib/dtrguard"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@MAINTAINER@|$MAINTAINER|" \
    packaging/debian/control.in >"$root/DEBIAN/control"
chmod 0644 "$root/DEBIAN/control"

dpkg-deb --build --root-owner-group "$root" "$deb" >/dev/null
rm -rf "$work"
log "built $deb ($(du -h "$deb" | cut -f1), $(stat -c %s "$deb") bytes) in $((SECONDS - started)) s"
echo "$repo/$deb"
