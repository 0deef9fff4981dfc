# Bakes the AMI of a DTR 1.4 node: Debian 12 with Docker, dtrguard enabled, and DTR's images
# pre-pulled, but no DTR data, so a node launched from it is pristine and dtrguard restores it.
#
# Written for current Packer with the Amazon plugin (github.com/hashicorp/amazon), installed with
# `packer plugins install github.com/hashicorp/amazon`. The file has no required_plugins block
# because Debian 12's packer 1.6.6, which tests/test_templates.py runs, rejects that block.
#
#   packer build -var deb_path=dist/dtrguard_0.1.0_amd64.deb packaging/packer/dtrguard.pkr.hcl

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region to build the AMI in."
}

variable "instance_type" {
  type        = string
  default     = "t3.medium"
  description = "EC2 instance type of the build instance."
}

variable "deb_path" {
  type        = string
  description = "Path of dtrguard_<version>_amd64.deb on the machine that runs Packer."
}

variable "dtr_version" {
  type        = string
  default     = "1.4.3"
  description = "DTR version of the images; docker/trusted-registry:<dtr_version> must be in dtr_images."
}

# NOTE: the component image names follow DTR 1.4's container names. Check them against the DTR
# 1.4 release you license (`docker images` on a node that runs it) before the first build.
variable "dtr_images" {
  type = list(string)
  default = [
    "docker/trusted-registry:1.4.3",
    "docker/trusted-registry-admin-server:1.4.3",
    "docker/trusted-registry-auth-server:1.4.3",
    "docker/trusted-registry-load-balancer:1.4.3",
    "docker/trusted-registry-log-aggregator:1.4.3",
    "docker/trusted-registry-distribution:1.4.3",
    "docker/trusted-registry-index:1.4.3",
    "postgres:9.4.1",
  ]
  description = "Images pulled into the AMI, so a restore starts DTR without reaching Docker Hub."
}

locals {
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "debian12" {
  region          = var.region
  instance_type   = var.instance_type
  ami_name        = "dtrguard-dtr-${var.dtr_version}-${local.build_time}"
  ami_description = "DTR ${var.dtr_version} node with dtrguard on Debian 12"

  # The newest official Debian 12 amd64 AMI, published by Debian's AWS account.
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  # Debian's AMIs log in as "admin".
  ssh_username = "admin"

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name                   = "dtrguard-dtr-${var.dtr_version}"
    "dtrguard:dtr-version" = var.dtr_version
    "dtrguard:base"        = "debian-12-amd64"
  }
}

build {
  sources = ["source.amazon-ebs.debian12"]

  provisioner "file" {
    source      = var.deb_path
    destination = "/tmp/dtrguard_amd64.deb"
  }

  # Installs docker.io and the package, pulls the images, enables the unit, then
  # `dtrguard prepare-image --yes` and `cloud-init clean`: see provision.sh.
  provisioner "shell" {
    script = "${path.root}/provision.sh"
    environment_vars = [
      "DEB=/tmp/dtrguard_amd64.deb",
      "DTR_VERSION=${var.dtr_version}",
      "DTR_IMAGES=${join(" ", var.dtr_images)}",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }
}
