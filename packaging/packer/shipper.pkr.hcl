# Bake shipper into an image: add one of these builds' blocks to your Packer template.
# The packages come from `make packages` (dist/): one .deb and one .rpm per CPU architecture, each
# working with the distribution's Python 3.11, 3.12 or 3.13 (the package builds /opt/shipper with the
# newest present). Pick the architecture of the source AMI: amd64/x86_64, or arm64/aarch64 for Graviton.
# The service is enabled, not started: it starts on each instance's first boot, with the bucket and
# labels cloud-init writes (packaging/cloud-init/user-data.yaml).

variable "shipper_deb" {
  type    = string
  default = "dist/shipper_0.1.0_amd64.deb"   # or dist/shipper_0.1.0_arm64.deb
}

variable "shipper_rpm" {
  type    = string
  default = "dist/shipper-0.1.0-1.x86_64.rpm"  # or dist/shipper-0.1.0-1.aarch64.rpm
}

# Debian 12/13, Ubuntu 24.04: apt brings python3.11 (or 3.12, 3.13) for the Depends.
build {
  name    = "debian"
  sources = ["source.amazon-ebs.debian"]

  provisioner "file" {
    source      = var.shipper_deb
    destination = "/tmp/shipper.deb"
  }

  provisioner "shell" {
    inline = [
      "sudo apt-get update",
      "sudo apt-get install -y /tmp/shipper.deb",
      "rm /tmp/shipper.deb",
      # Fail the image build on a broken configuration, not the first boot. The bucket comes at boot
      # (cloud-init); --strict also fails on warnings, such as an input whose records reach no output.
      "SHIPPER_BUCKET=image-build-check shipper check --strict --config /etc/shipper/shipper.toml",
      "systemctl is-enabled shipper",
    ]
  }
}

# Amazon Linux 2023 (and RHEL 9): its python3 is 3.9, so dnf brings python3.11 or 3.12 for the Requires.
build {
  name    = "amazon-linux-2023"
  sources = ["source.amazon-ebs.al2023"]

  provisioner "file" {
    source      = var.shipper_rpm
    destination = "/tmp/shipper.rpm"
  }

  provisioner "shell" {
    inline = [
      "sudo dnf install -y /tmp/shipper.rpm",
      "rm /tmp/shipper.rpm",
      "SHIPPER_BUCKET=image-build-check shipper check --strict --config /etc/shipper/shipper.toml",
      "systemctl is-enabled shipper",
    ]
  }
}
