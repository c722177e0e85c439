#!/bin/bash
# images/boot.sh GUEST DISK [FORMAT] -- boot a test guest built by images/build.sh, under TCG.
#
# DISK is a file (qcow2 or raw; FORMAT defaults to what qemu-img detects) or an NBD URI such
# as nbd+unix:///name?socket=/path or nbd://host:port/name (FORMAT defaults to raw).
# Kernel, initrd and command line come from the guest's build dir
# (${VMICACHE_IMAGES:-<repo>/target/images}/GUEST, or $VMICACHE_GUEST_DIR).
#
# The serial console goes to stdout (and to $BOOT_LOG if set). Exits 0 iff the guest printed
# its success marker (boot.env's BOOT_MARKER) within $BOOT_TIMEOUT seconds (default 120),
# and prints the time to the marker and to the VM's exit on stderr:
#   boot.sh: GUEST: marker after 7.41 s, VM exited after 7.93 s
# Environment: BOOT_TIMEOUT, BOOT_LOG, BOOT_MEM (MiB, 512), BOOT_CACHE (writeback),
# BOOT_DRIVE_OPTS (appended to -drive, e.g. copy-on-read=on), QEMU (qemu-system-x86_64),
# BOOT_QEMU_ARGS (extra arguments, word-split).
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
say() { echo "boot.sh: $*" >&2; }
die() {
	say "error: $*"
	exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || {
	echo "usage: images/boot.sh GUEST DISK_URI_OR_FILE [FORMAT]" >&2
	exit 2
}
guest=$1 disk=$2 format=${3:-}
dir=${VMICACHE_GUEST_DIR:-${VMICACHE_IMAGES:-$repo/target/images}/$guest}
[[ -f $dir/boot.env ]] || die "no $dir/boot.env: run images/build.sh $guest first"
# shellcheck source=/dev/null
. "$dir/boot.env"
[[ -n ${KERNEL_CMDLINE:-} && -n ${BOOT_MARKER:-} ]] || die "$dir/boot.env lacks KERNEL_CMDLINE or BOOT_MARKER"

qemu=${QEMU:-qemu-system-x86_64}
if ! command -v "$qemu" >/dev/null || ! command -v qemu-img >/dev/null; then
	[[ $EUID -eq 0 ]] || die "$qemu or qemu-img missing (apt-get install qemu-system-x86 qemu-utils)"
	say "installing qemu-system-x86 qemu-utils"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 qemu-utils >/dev/null
fi

case $disk in
nbd:* | nbd+*:*) : "${format:=raw}" ;;
*)
	[[ -e $disk ]] || die "no such disk: $disk"
	if [[ -z $format ]]; then
		format=$(qemu-img info -U "$disk" | sed -n 's/^file format: //p' | head -n1)
		[[ -n $format ]] || die "cannot tell the format of $disk"
	fi
	;;
esac

timeout=${BOOT_TIMEOUT:-120}
log=${BOOT_LOG:-}
tmplog=$(mktemp)
trap 'rm -f "$tmplog"' EXIT

# -drive splits on commas: a comma inside the file name is written twice.
drive="file=${disk//,/,,},format=$format,if=virtio,cache=${BOOT_CACHE:-writeback}${BOOT_DRIVE_OPTS:+,$BOOT_DRIVE_OPTS}"
# shellcheck disable=SC2206
cmd=("$qemu" -accel tcg -m "${BOOT_MEM:-512}" -nographic -no-reboot -nodefaults -serial stdio
	-kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" -append "$KERNEL_CMDLINE"
	-drive "$drive" -nic none ${BOOT_QEMU_ARGS:-})

start=$(date +%s.%N)
# Each console line is copied to stdout as it comes; the time of the marker line is noted.
shopt -s lastpipe
set +e
timeout --foreground -k 5 "$timeout" "${cmd[@]}" </dev/null 2>&1 |
	while IFS= read -r line || [[ -n $line ]]; do
		printf '%s\n' "$line"
		[[ -n $log ]] && printf '%s\n' "$line" >>"$log"
		if [[ ! -s $tmplog && $line == *"$BOOT_MARKER"* ]]; then
			date +%s.%N >"$tmplog"
		fi
	done
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s.%N)
marker_at=$(cat "$tmplog")

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
if [[ -n $marker_at ]]; then
	say "$guest: marker after $(elapsed "$start" "$marker_at") s, VM exited after $(elapsed "$start" "$end") s (qemu status ${rc:-?})"
	exit 0
fi
if [[ $rc == 124 || $rc == 137 ]]; then
	say "$guest: FAILED: no marker within ${timeout} s (timeout)"
else
	say "$guest: FAILED: no marker; VM exited after $(elapsed "$start" "$end") s (qemu status ${rc:-?})"
fi
exit 1
