#!/usr/bin/env bash
# Installs the Debian packages hypersdk needs to build, test and demo.
# Idempotent; needs root. Used by `make venv` and `.ci/run`.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=(
  # build of libvirt-python, and the venv
  python3 python3-venv python3-dev python3-pip pkg-config libvirt-dev gcc
  # dbus-python (under python-dbusmock) builds against these
  libdbus-1-dev libglib2.0-dev
  # disk formats and libvirt tooling
  qemu-utils libvirt-clients libxml2-utils
  # a real libvirt daemon that can boot a migrated VM under TCG
  libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 ovmf
  # guest conversion (virt-v2v-in-place); libguestfs' appliance boots Debian's kernel
  virt-v2v nbdkit linux-image-amd64
  # the test guest: a Debian system from mmdebstrap, laid on a disk with guestfish
  mmdebstrap guestfish
  # D-Bus and polkit (private system bus in tests)
  dbus dbus-daemon polkitd pkexec
  # the govmomi vSphere simulator, built from Debian's sources
  golang-go golang-github-vmware-govmomi-dev
  # a real PostgreSQL server for the shared job store (service/pgstore.py), libpq for psycopg
  postgresql libpq5
  # targets (service/kvm/targets.py): libvirt reached over qemu+ssh:// through a real sshd,
  # a logical (LVM) storage pool on a loop device, and a netfs pool mounting a GlusterFS
  # volume served on this machine (FUSE: this kernel has no NFS)
  openssh-server lvm2 glusterfs-server glusterfs-client
  # tools the tests drive as users do
  curl jq tmux
  # a real browser runs the spec's WebSocket snippet (tests/bridge/test_browser.py)
  chromium
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# libvirt's qemu driver runs guests as libvirt-qemu
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent group kvm >/dev/null || groupadd --system kvm
id libvirt-qemu >/dev/null 2>&1 || useradd --system -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /run/libvirt
# What udev does on a normal host: group kvm (libvirt-qemu is in it) may use /dev/kvm.
# Without it libvirtd sees KVM "vanish" for the qemu user and re-probes QEMU (~50 s)
# on every define.
if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi

# The tests' Unix users (tests/support/system.py), made here once rather than by a test
# run: the service account hypersdk (as data/sysusers.d/hypersdk.conf makes it), a member
# of group hypersdk, a user outside it, and a member of hypersdk-admin too.
getent group hypersdk >/dev/null || groupadd --system hypersdk
getent group hypersdk-admin >/dev/null || groupadd --system hypersdk-admin
id hypersdk >/dev/null 2>&1 || useradd --system -g hypersdk -d / -s /usr/sbin/nologin hypersdk
for entry in hsdk-member:hypersdk hsdk-outsider: hsdk-admin:hypersdk,hypersdk-admin; do
  user="${entry%%:*}" groups="${entry#*:}"
  id "$user" >/dev/null 2>&1 || useradd --no-create-home -s /usr/sbin/nologin "$user"
  usermod -G "$groups" "$user"
done

# Azurite (the Azure Blob emulator) for the Azure provider tests, kept outside the git tree
AZURITE_DIR="${HYPERSDK_AZURITE_DIR:-/var/tmp/hypersdk-azurite}"
if command -v npm >/dev/null && [ ! -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ]; then
  mkdir -p "$AZURITE_DIR"
  (cd "$AZURITE_DIR" && npm install --no-audit --no-fund --silent azurite@3)
fi

# hyper2kvm 0.2.1 in a venv of its own, as data/systemd/hyper2kvm@.service runs it: the
# daemon-mode tests start its daemon (tests/support/hyper2kvm_daemon.py). Outside the git tree.
HYPER2KVM_VENV="${HYPERSDK_HYPER2KVM_VENV:-/var/tmp/hypersdk-hyper2kvm-0.2.1}"
if [ ! -x "$HYPER2KVM_VENV/bin/hyper2kvm" ]; then
  /usr/bin/python3 -m venv "$HYPER2KVM_VENV"
  "$HYPER2KVM_VENV/bin/pip" install -q 'hyper2kvm[daemon]==0.2.1' rich requests
fi
