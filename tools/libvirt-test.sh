#!/usr/bin/env bash
# End-to-end test with a real libvirt (run by `tools/test.sh --long`, hence by CI; as root).
#
# Installs libvirt (Debian's 9.0) if missing, starts virtlogd/libvirtd by hand (no systemd
# needed), installs vmicache's qemu hook with a configuration in a scratch directory, and
# starts a TCG domain (direct kernel boot of the minimal test guest, NBD disk on a Unix socket)
# whose disk the hook manages, twice:
#   1. the first boot is recorded into a new cache; on release the hook seals it;
#   2. the second boot runs from the sealed cache: success marker, the cache file unchanged,
#      its server started without recording;
#   3. the base is then replaced by zeros of the same size: the hook refuses the next start
#      with a message naming the change, and libvirt reports it.
# Prints "N passed, N failed" and exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
[ "$(id -u)" = 0 ] || { echo "libvirt-test: needs root" >&2; exit 1; }
tools/deps.sh --boot
if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvirt-daemon-system libvirt-clients >/dev/null
fi
images/build.sh minimal >/dev/null
cargo build --release --quiet
guest=${VMICACHE_IMAGES:-$repo/target/images}/minimal
# shellcheck source=/dev/null
. "$guest/boot.env"

P=$(mktemp -d /var/tmp/vmicache-libvirt.XXXXXX)
chmod 755 "$P"
mkdir -p "$P"/{bases,caches,instances,traces,state,sockets,boot}
chmod 755 "$P"/*
cp --sparse=always "$guest/base.raw" "$P/bases/guest.raw"
cp "$guest/vmlinuz" "$guest/initrd.img" "$P/boot/"
cat > "$P/config.yaml" <<YAML
dirs:
  bases: [$P/bases]
  caches: $P/caches
  instances: $P/instances
  traces: $P/traces
  sockets: $P/sockets
  state: $P/state
defaults:
  ephemeral: true
  record: true
socket:
  owner: root
  group: kvm
  mode: "0660"
YAML
VIRSH="virsh -q -c qemu:///system"
dom=vmicache-e2e-$$
hook=/etc/libvirt/hooks/qemu
saved=""
cleanup() {
  $VIRSH destroy "$dom" >/dev/null 2>&1 || true
  $VIRSH undefine "$dom" >/dev/null 2>&1 || true
  if [ -n "$saved" ]; then mv "$saved" "$hook"; else rm -f "$hook"; fi
  pkill -x libvirtd || true
  sleep 1
  libvirtd -d || true
  rm -rf "$P"
}
trap cleanup EXIT
if [ -e "$hook" ]; then saved=$(mktemp); cp "$hook" "$saved"; fi
mkdir -p /etc/libvirt/hooks
cat > "$hook" <<HOOK
#!/bin/sh
VMICACHE_CONFIG=$P/config.yaml exec $repo/target/release/vmicache hook -- "\$@"
HOOK
chmod 755 "$hook"
pgrep -x virtlogd >/dev/null || virtlogd -d
pkill -x libvirtd || true     # libvirt finds hooks when it starts
sleep 1
libvirtd -d
for _ in $(seq 50); do $VIRSH version >/dev/null 2>&1 && break; sleep 0.2; done

cat > "$P/domain.xml" <<XML
<domain type='qemu'>
  <name>$dom</name>
  <metadata>
    <vmicache:disks xmlns:vmicache="https://vmicache.dev/ns/1">
      <vmicache:disk dev="vda" base="$P/bases/guest.raw" mode="nbd"/>
    </vmicache:disks>
  </metadata>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$P/boot/vmlinuz</kernel>
    <initrd>$P/boot/initrd.img</initrd>
    <cmdline>$KERNEL_CMDLINE</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='$dom'>
        <host transport='unix' socket='$P/sockets/$dom.sock'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$P/console.log'/><target port='0'/></serial>
    <console type='file'><source path='$P/console.log'/><target type='serial' port='0'/></console>
  </devices>
</domain>
XML
$VIRSH define "$P/domain.xml" >/dev/null

passed=0
failed=0
check() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $*" >&2; fi; }
boot() {
  : > "$P/console.log"
  local t0=$SECONDS
  $VIRSH start "$dom" >/dev/null
  for _ in $(seq 240); do
    [ "$($VIRSH domstate "$dom" 2>/dev/null)" = "shut off" ] && break
    sleep 1
  done
  echo "libvirt-test: boot $1: $((SECONDS - t0)) s, $(grep -a -o 'VMICACHE-BOOT-[A-Z]*' "$P/console.log" | head -1)"
  grep -aq "$BOOT_MARKER" "$P/console.log"
}
cache_state() {
  VMICACHE_CONFIG=$P/config.yaml "$repo/target/release/vmicache" inspect --json "$P"/caches/*.qcow2 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["cache"]["state"])'
}

check boot 1
check grep -q "sealed cache" "$P/state/hook.log"
check test "$(cache_state)" = sealed
check test -z "$(ls "$P/instances")"            # ephemeral instance removed at release (its owner record, a dot file, stays)
check test ! -e "$P/sockets/$dom.sock"            # server stopped
before=$(sha256sum "$P"/caches/*.qcow2 | cut -d' ' -f1)
check boot 2
check test "$before" = "$(sha256sum "$P"/caches/*.qcow2 | cut -d' ' -f1)"
check test "$(grep -c 'started server' "$P/state/hook.log")" = 2
check sh -c "tail -3 '$P/state/hook.log' | grep 'started server' | grep -vq recording"
# A base that changed under its cache: the start is refused, saying why.
size=$(stat -c %s "$P/bases/guest.raw")
rm "$P/bases/guest.raw"
truncate -s "$size" "$P/bases/guest.raw"
if out=$($VIRSH start "$dom" 2>&1); then
  check false
else
  check grep -q "base no longer matches the cache" <<<"$out"
fi
sed 's/^/libvirt-test: hook.log: /' "$P/state/hook.log"
echo "libvirt: $passed passed, $failed failed"
[ "$failed" = 0 ]
