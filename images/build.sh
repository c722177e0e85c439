#!/bin/bash
# images/build.sh GUEST [OUTDIR] -- build a small bootable Linux test guest from Debian packages.
#
# Output in OUTDIR (default ${VMICACHE_IMAGES:-<repo>/target/images}/GUEST):
#   vmlinuz       the kernel of linux-image-cloud-amd64
#   initrd.img    busybox initramfs: loads virtio modules, mounts /dev/vda, switch_root
#   base.raw      the root disk (ext4, raw, sparse)
#   boot.env      KERNEL_CMDLINE, BOOT_MARKER and facts about the build (sourceable shell)
#   packages.txt  the Debian packages (name version) the guest was made from (dpkg-query)
#   files.txt     every path of the root: type, mode, uid, gid, size, path (find -printf)
#   recipe.sha256 hash of the recipe files; the build is skipped while it matches
#
# Guests are described by images/GUEST/ (guest.conf and the files it names); see
# images/README.md. Runs as root on Debian 12; installs the tools it needs with apt-get.
# No loop mounts: the root filesystem is made from a directory with `mkfs.ext4 -d`.
# Set VMICACHE_IMAGES_FORCE=1 to rebuild even when the recipe is unchanged.
# shellcheck disable=SC2012  # ls over names we made or Debian's (no odd characters)
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

say() { echo "build.sh: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

[[ $# -ge 1 && $# -le 2 && $1 != -* ]] || {
	echo "usage: images/build.sh GUEST [OUTDIR]   (guests: $(cd "$here" && ls -- */guest.conf */*/guest.conf | sed 's|/guest.conf$||' | tr '\n' ' '))" >&2
	exit 2
}
guest=$1
[[ -f $here/$guest/guest.conf ]] || die "unknown guest '$guest' (no images/$guest/guest.conf)"
out=$(realpath -m "${2:-${VMICACHE_IMAGES:-$repo/target/images}/$guest}")
# A guest may live in a subdirectory (images/independent/ssh): its host name and filesystem
# label take the last part.
short=${guest##*/}

# The recipe: this script, the shared files and the guest's own directory (-L: a guest may
# share a file with another by a symlink, e.g. images/independent/*/vmicache-check.service).
recipe_hash() {
	(cd "$here" && find -L build.sh common "$guest" -type f -print0 | sort -z |
		xargs -0 sha256sum | sha256sum | cut -c1-64)
}
hash=$(recipe_hash)
outputs=(vmlinuz initrd.img base.raw boot.env packages.txt files.txt)
up_to_date() {
	[[ -f $out/recipe.sha256 && $(cat "$out/recipe.sha256") == "$hash" ]] || return 1
	local f
	for f in "${outputs[@]}"; do [[ -s $out/$f ]] || return 1; done
}
if [[ -z ${VMICACHE_IMAGES_FORCE:-} ]] && up_to_date; then
	say "$guest: up to date in $out (recipe $hash)"
	exit 0
fi

[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot, file ownership in the image)"

# shellcheck source=/dev/null
. "$here/$guest/guest.conf"
: "${DISK_SIZE:?guest.conf: DISK_SIZE}" "${ROOT_KIND:?guest.conf: ROOT_KIND}"
: "${CHECK_PATHS:?guest.conf: CHECK_PATHS}" "${CMDLINE_EXTRA=}"
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# --- tools -------------------------------------------------------------------------------
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have busybox || need+=(busybox-static)
have mkfs.ext4 || need+=(e2fsprogs)
have cpio || need+=(cpio)
have gzip || need+=(gzip)
have fallocate || need+=(util-linux)
have apt-get || die "apt-get not found: a Debian system is required"
[[ $ROOT_KIND == debootstrap ]] && ! have debootstrap && need+=(debootstrap)
if ((${#need[@]})); then
	say "installing ${need[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- work dir ------------------------------------------------------------------------------
mkdir -p "$out"
exec 9>"$out/.lock"
flock -n 9 || die "another build of $out is running"
work=$out/.work
rm -rf "$work"
mkdir -p "$work/debs"
root=$work/root
t_start=$SECONDS

# apt-get download into $work/debs (as root: apt's _apt sandbox cannot write there).
download() {
	(cd "$work/debs" && apt-get download -q -o APT::Sandbox::User=root "$@" >/dev/null) ||
		die "apt-get download $*"
}
deb_of() { ls "$work/debs/${1}_"*.deb 2>/dev/null | head -n1; }

# The packages' Depends/Pre-Depends closure: first alternative of each "a | b" group, first
# provider of a virtual package. Prints one name per line.
resolve() {
	local -a queue=("$@")
	local seen=" " p
	while ((${#queue[@]})); do
		p=${queue[0]}
		queue=("${queue[@]:1}")
		[[ $seen == *" $p "* ]] && continue
		seen+="$p "
		echo "$p"
		mapfile -t -O ${#queue[@]} queue < <(
			apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
				--no-replaces --no-enhances "$p" | awk '
			/^ [ |](Pre)?Depends:/ {
				isalt = (substr($0, 2, 1) == "|"); name = $2
				if (!taken) { if (name ~ /^</) pending = 1; else print name; taken = 1 }
				if (!isalt) taken = 0
				next }
			/^    / { if (pending) { print $1; pending = 0 } next }
			{ pending = 0 }')
	done
}

# Make sure the package lists exist (a fresh machine may have none).
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
	apt-get update -qq
fi

# --- kernel and initramfs ------------------------------------------------------------------
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $kpkg ]] || die "cannot resolve linux-image-cloud-amd64"
say "$guest: kernel $kpkg, busybox-static"
download "$kpkg" busybox-static
dpkg-deb -x "$(deb_of "$kpkg")" "$work/kernel"
kver=${kpkg#linux-image-}
kmods=$work/kernel/lib/modules/$kver
[[ -d $kmods ]] || die "$kpkg has no lib/modules/$kver"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
dpkg-deb -x "$(deb_of busybox-static)" "$work/busybox"

# modules.dep is made by depmod at install time, so make it here (busybox's depmod).
"$work/busybox/bin/busybox" depmod -b "$work/kernel" "$kver"
declare -A loaded=()
order=()
load() { # $1 = path relative to lib/modules/KVER, e.g. kernel/drivers/block/virtio_blk.ko
	local m=$1 line d
	[[ -n ${loaded[$m]:-} ]] && return
	line=$(grep -m1 "^$m:" "$kmods/modules.dep") || die "$m not in modules.dep"
	for d in ${line#*:}; do load "$d"; done
	loaded[$m]=1
	order+=("$m")
}
for name in ${INITRAMFS_MODULES:-virtio_pci virtio_blk}; do
	path=$(grep -m1 -E "(^|/)$name\.ko(\.[a-z]+)?:" "$kmods/modules.dep" | cut -d: -f1) ||
		die "module $name not found"
	load "$path"
done

ird=$work/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$work/busybox/bin/busybox" "$ird/bin/busybox"
for m in "${order[@]}"; do
	mkdir -p "$ird/lib/modules/$(dirname "$m")"
	cp "$kmods/$m" "$ird/lib/modules/$m"
done
printf '%s\n' "${order[@]}" >"$ird/modules.load"
install -m 0755 "$here/common/initramfs-init" "$ird/init"
(cd "$ird" && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
	gzip -9n >"$work/initrd.img"
say "$guest: initramfs with ${order[*]##*/}"

# --- root filesystem -----------------------------------------------------------------------
pkglist=$work/packages.txt
case $ROOT_KIND in
debs)
	# Unpacked .debs: no maintainer scripts run, so set up what they would have.
	mapfile -t roots < <(grep -v -e '^#' -e '^$' "$here/$guest/packages")
	mapfile -t pkgs < <(resolve "${roots[@]}" | sort -u)
	say "$guest: ${#pkgs[@]} packages: ${pkgs[*]}"
	download "${pkgs[@]}"
	mkdir -p "$root"
	for p in "${pkgs[@]}"; do
		deb=$(deb_of "$p")
		[[ -n $deb ]] || die "no .deb for $p"
		dpkg-deb -x "$deb" "$root"
		# The status entry dpkg would have written (what an inventory reads).
		{
			echo "Package: $(dpkg-deb -f "$deb" Package)"
			echo "Status: install ok installed"
			dpkg-deb -f "$deb" | grep -v '^Package:'
			echo
		} >>"$work/dpkg-status"
	done
	install -D -m 0644 "$work/dpkg-status" "$root/var/lib/dpkg/status"
	# shellcheck disable=SC2016  # dpkg-query's own ${fields}
	dpkg-query --admindir="$root/var/lib/dpkg" -W -f '${Package} ${Version}\n' >"$pkglist"
	mkdir -p "$root"/{dev,proc,sys,run,tmp,var/tmp,root,etc,sbin,usr/local/bin}
	chmod 1777 "$root/tmp" "$root/var/tmp"
	chmod 0700 "$root/root"
	[[ -e $root/bin/sh ]] || ln -s bash "$root/bin/sh"
	[[ -e $root/usr/bin/python3 ]] || ln -s python3.11 "$root/usr/bin/python3"
	printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	echo "vmicache-$short" >"$root/etc/hostname"
	printf '/dev/vda / ext4 rw 0 0\n' >"$root/etc/fstab"
	chroot "$root" /sbin/ldconfig
	;;
debootstrap)
	say "$guest: debootstrap --variant=minbase --include=$DEBOOTSTRAP_INCLUDE $SUITE $MIRROR"
	debootstrap --variant=minbase --include="$DEBOOTSTRAP_INCLUDE" "$SUITE" "$root" "$MIRROR" \
		>"$work/debootstrap.log" 2>&1 || {
		tail -n 30 "$work/debootstrap.log" >&2
		die "debootstrap failed (log: $work/debootstrap.log)"
	}
	# debootstrap unmounts what it mounted, but be sure nothing is left below $root.
	if grep -q " $root/" /proc/mounts; then die "mounts left below $root"; fi
	# shellcheck disable=SC2016  # dpkg-query's own ${fields}
	chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$pkglist"
	echo "vmicache-$short" >"$root/etc/hostname"
	printf '/dev/vda / ext4 rw 0 0\n' >"$root/etc/fstab"
	# An empty machine-id: each boot gets a transient one, nothing is written for it.
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id" "$root/etc/resolv.conf"
	rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
		"$root/var/cache/debconf"/*-old "$root/var/lib/dpkg"/*-old
	;;
*) die "guest.conf: ROOT_KIND must be debs or debootstrap" ;;
esac

# The guest's own files (init, units, ...), per guest.conf's INSTALL: "SRC DEST MODE" lines.
install -D -m 0755 "$here/common/vmicache-check.py" "$root/usr/local/lib/vmicache/vmicache-check.py"
install -D -m 0644 "$here/$guest/modules" "$root/usr/local/share/vmicache/modules"
while read -r src dest mode; do
	[[ -n $src ]] || continue
	install -D -m "$mode" "$here/$guest/$src" "$root$dest"
done <<<"${INSTALL:-}"
for unit in ${ENABLE_UNITS:-}; do
	chroot "$root" systemctl enable "$unit" >/dev/null 2>&1 || die "systemctl enable $unit"
done

# Bytecode: compile everything now, in the guest's own python, so that boots only read
# .pyc files and never write __pycache__. unchecked-hash .pyc files do not depend on source
# mtimes (nothing for the boot to stat and compare).
pyver=$(cd "$root/usr/lib" && ls -d python3.[0-9]* | sort -V | tail -n1)
chroot "$root" "/usr/bin/$pyver" -m compileall -q -f -j 1 --invalidation-mode unchecked-hash \
	"/usr/lib/$pyver" /usr/local/lib/vmicache >"$work/compileall.log" 2>&1 ||
	say "$guest: compileall reported errors (ignored, see $work/compileall.log): $(grep -c Error "$work/compileall.log" || true)"

# The manifest: sha256 of every regular file under CHECK_PATHS (paths relative to /).
manifest=$root/usr/local/share/vmicache/manifest.sha256
# shellcheck disable=SC2086  # CHECK_PATHS is a list of paths
(cd "$root" && find $CHECK_PATHS -type f -print0 | sort -z | xargs -0 sha256sum) >"$manifest"
# shellcheck disable=SC1003  # a line starting with a backslash: sha256sum escaped the name
if grep -q '^\\' "$manifest"; then die "a CHECK_PATHS file name needs escaping"; fi
marker_hash=$(sha256sum <"$manifest" | cut -c1-64)
check_files=$(wc -l <"$manifest")

# Run the check once here, in the guest's python, so a missing module fails the build and
# not the boot (no writes: --no-write; -B: no bytecode from this run).
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 /usr/bin/python3 -B \
	/usr/local/lib/vmicache/vmicache-check.py --no-write >"$work/check.log" 2>&1 || {
	cat "$work/check.log" >&2
	die "the boot check fails on the build host"
}
grep -qx "VMICACHE-BOOT-OK $marker_hash" "$work/check.log" || die "check printed $(tail -n1 "$work/check.log")"
check_bytes=$(sed -n 's/.* files, \([0-9]*\) bytes.*/\1/p' "$work/check.log")
if find "$root" -name '*.pyc' -newer "$manifest" | grep -q .; then die "the check wrote bytecode"; fi

root_bytes=$(du -sb "$root" | cut -f1)
# Every path of the root as the disk will hold it (type, mode, owner, size, path), for tests
# of `vmicache inventory`.
(cd "$root" && find . -mindepth 1 -printf '%y %m %U %G %s /%P\n' | LC_ALL=C sort -k6) >"$work/files.txt"

# --- disk ------------------------------------------------------------------------------------
# Deterministic filesystem UUID and hash seed from the recipe hash.
uuid=$(echo "$hash" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
mkfs.ext4 -q -F -b 4096 -L "vmicache-$short" -U "$uuid" \
	-E "lazy_itable_init=0,lazy_journal_init=0,hash_seed=$uuid" \
	-d "$root" "$work/base.raw" "$DISK_SIZE" >/dev/null
fallocate --dig-holes "$work/base.raw" # zero blocks mkfs wrote become holes: sparse raw
e2fsck -fn "$work/base.raw" >"$work/e2fsck.log" 2>&1 || {
	cat "$work/e2fsck.log" >&2
	die "e2fsck reports problems in base.raw"
}

cmdline="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 init=${GUEST_INIT:-/sbin/init}${CMDLINE_EXTRA:+ $CMDLINE_EXTRA}"
cat >"$work/boot.env" <<EOF
# vmicache test guest "$guest" (images/build.sh); sourceable shell.
GUEST=$guest
KERNEL_CMDLINE='$cmdline'
BOOT_MARKER='VMICACHE-BOOT-OK $marker_hash'
KERNEL_PACKAGE=$kpkg
DISK_BYTES=$(stat -c %s "$work/base.raw")
ROOT_BYTES=$root_bytes
CHECK_FILES=$check_files
CHECK_BYTES=$check_bytes
RECIPE_SHA256=$hash
EOF

# --- publish -----------------------------------------------------------------------------------
rm -f "$out/recipe.sha256"
for f in "${outputs[@]}"; do mv -f "$work/$f" "$out/$f"; done
rm -rf "$work"
echo "$hash" >"$out/recipe.sha256"
say "$guest: built in $((SECONDS - t_start)) s: root $((root_bytes >> 20)) MiB," \
	"disk $(($(stat -c %s "$out/base.raw") >> 20)) MiB virtual / $(($(du -B1 "$out/base.raw" | cut -f1) >> 20)) MiB allocated," \
	"check reads $check_files files, $((check_bytes >> 20)) MiB"
say "$guest: $out"
