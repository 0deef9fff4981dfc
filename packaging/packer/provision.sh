#!/bin/sh
# Provisions the dtrguard AMI on Packer's Debian 12 build instance, run as root by the shell
# provisioner in dtrguard.pkr.hcl. It reads from the environment:
#   DEB          path of the uploaded dtrguard_<version>_amd64.deb
#   DTR_VERSION  DTR version whose installer image, docker/trusted-registry:<version>, must be pulled
#   DTR_IMAGES   image references to pull, separated by spaces
set -eu

: "${DEB:?DEB must name the uploaded .deb}"
: "${DTR_VERSION:?DTR_VERSION must be set}"
: "${DTR_IMAGES:?DTR_IMAGES must list the images to pull}"

# The build instance's own first boot may still be running apt through cloud-init. Errors that
# cloud-init reports for the build instance do not affect the image, so they do not stop the build.
if ! cloud-init status --wait >/dev/null; then
    echo "provision: cloud-init reported errors on the build instance. Details are in /var/log/cloud-init.log." >&2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
# NOTE: Debian 12's docker.io is Docker 20.10. DTR 1.4 predates it by years, and whether DTR 1.4's
# containers run on it is not checked here.
apt-get install -y docker.io "$DEB"
rm -f "$DEB"
systemctl enable --now docker.service

for image in $DTR_IMAGES; do
    docker pull "$image"
done
if ! docker image inspect "docker/trusted-registry:$DTR_VERSION" >/dev/null 2>&1; then
    echo "provision: image docker/trusted-registry:$DTR_VERSION not found after the pulls." \
        "Add it to dtr_images or change dtr_version." >&2
    exit 1
fi

# cloud-init writes /etc/dtrguard/dtrguard.toml from the instance's user data (a write_files entry)
# on first boot. Debian 12's cloud-init.service already runs before sysinit.target, and this
# drop-in makes the order explicit for dtrguard.
install -d -m 0755 /etc/systemd/system/dtrguard.service.d
cat >/etc/systemd/system/dtrguard.service.d/after-cloud-init.conf <<'EOF'
[Unit]
After=cloud-init.service
EOF
systemctl daemon-reload
systemctl enable dtrguard.service

# Removes dtrguard's state file, which records the instance id, so every instance launched from
# the AMI starts as a new node. It exits non-zero, failing the build, when the instance has DTR data.
# It reads no S3 settings, so the package's example config with its placeholder bucket is enough.
dtrguard prepare-image --yes

apt-get clean
# Every instance launched from the AMI runs cloud-init's per-instance modules (write_files too)
# on its first boot.
cloud-init clean --logs
