# Bake shipper into an image: add these blocks to your Packer template's build.
# The .deb comes from `packaging/build-deb.sh` (built on the same Debian/Ubuntu release).
# The service is enabled, not started: it starts on each instance's first boot, with the
# bucket and labels cloud-init writes (packaging/cloud-init/user-data.yaml).

variable "shipper_deb" {
  type    = string
  default = "dist/shipper_0.1.0_amd64.deb"
}

build {
  sources = ["source.amazon-ebs.base"]

  provisioner "file" {
    source      = var.shipper_deb
    destination = "/tmp/shipper.deb"
  }

  provisioner "shell" {
    inline = [
      "sudo apt-get install -y /tmp/shipper.deb",
      "rm /tmp/shipper.deb",
      # Fail the image build on a broken configuration, not the first boot. The bucket comes at boot
      # (cloud-init); --strict also fails on warnings, such as an input whose records reach no output.
      "SHIPPER_BUCKET=image-build-check shipper check --strict --config /etc/shipper/shipper.toml",
      "systemctl is-enabled shipper",
    ]
  }
}
