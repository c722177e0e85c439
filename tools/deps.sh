#!/usr/bin/env bash
# Install what vmicache's tests, demo and benchmarks use, on Debian 12 (bookworm), as root.
#
# QEMU comes from bookworm-backports (10.x): bookworm's own qemu-system-x86 (7.2) would replace
# the qemu-utils 10 these machines ship with, and the tests compare against QEMU 10's output.
#   tools/deps.sh            # test peers: qemu-utils, libnbd-bin, python3-libnbd
#   tools/deps.sh --boot     # also qemu-system-x86, nbdkit and what images/ needs
set -euo pipefail
boot=0
[ "${1:-}" = "--boot" ] && boot=1

have_qemu10() { command -v "$1" >/dev/null && "$1" --version | head -1 | grep -qE 'version (1[0-9]|[2-9][0-9])\.'; }

need_bpo=()
have_qemu10 qemu-img || need_bpo+=(qemu-utils)
command -v qemu-io >/dev/null || need_bpo+=(qemu-utils)
if [ $boot = 1 ]; then
  have_qemu10 qemu-system-x86_64 || need_bpo+=(qemu-system-x86)
fi
need=()
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
# The hoard's registry tests: the CNCF distribution registry, run by the tests themselves.
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)   # its users, for the auth test
if [ $boot = 1 ]; then
  command -v nbdkit >/dev/null || need+=(nbdkit)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -x /bin/busybox ] || need+=(busybox-static)
  command -v cpio >/dev/null || need+=(cpio)
  command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
fi
if [ ${#need_bpo[@]} -eq 0 ] && [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "tools/deps.sh: missing: ${need_bpo[*]} ${need[*]} (run as root to install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ ${#need_bpo[@]} -gt 0 ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/vmicache-backports.list
fi
apt-get update -qq
if [ ${#need_bpo[@]} -gt 0 ]; then
  apt-get install -y -qq -t bookworm-backports "${need_bpo[@]}" >/dev/null
fi
if [ ${#need[@]} -gt 0 ]; then
  # Packages' own services (docker-registry's on :5000) are not started: the tests start
  # what they use, on ports of their own.
  policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy=1
  fi
  apt-get install -y -qq "${need[@]}" >/dev/null
  if [ $policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
