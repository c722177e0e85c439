#!/bin/bash
# images/derive.sh NAME [OUTDIR] -- make a derived test guest: a copy of a built guest's disk
# (images/derived/NAME.conf's BASE, default systemd) with Debian packages installed in place,
# as cloud images are made from one base image. No mounts: the base's files are dumped with
# debugfs, the packages are installed into that tree in a chroot (apt, maintainer scripts and
# all), and what changed is written into the copied ext4 image with `debugfs -w`
# (images/ext4-sync.py makes the commands). Files the install did not touch keep their
# inodes and blocks; new files land in the base's free space.
#
# Output in OUTDIR (default ${VMICACHE_IMAGES:-<repo>/target/images}/derived/NAME), as
# images/build.sh's: vmlinuz initrd.img (the base's), base.raw, boot.env, packages.txt,
# recipe.sha256; plus added.txt (the packages installed over the base), debugfs.cmds (what was
# written into the image) and sync.json (counts of it). The build is skipped while recipe.sha256 matches (the recipe:
# this script, ext4-sync.py, common/*, derived/NAME.conf, the base's recipe hash and its
# base.raw's size, inode and mtime); VMICACHE_IMAGES_FORCE=1 rebuilds the derived guest but
# not its base. The base is built first with images/build.sh (a no-op when up to date), in
# ${VMICACHE_BASE_DIR:-${VMICACHE_IMAGES:-<repo>/target/images}/BASE}.
# shellcheck disable=SC2012  # ls over names we made or Debian's (no odd characters)
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

say() { echo "derive.sh: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

[[ $# -ge 1 && $# -le 2 && $1 != -* ]] || {
	echo "usage: images/derive.sh NAME [OUTDIR]   (names: $(cd "$here/derived" && ls -- *.conf | sed 's/\.conf$//' | tr '\n' ' '))" >&2
	exit 2
}
name=$1
conf=$here/derived/$name.conf
[[ -f $conf ]] || die "unknown derived guest '$name' (no images/derived/$name.conf)"
images=${VMICACHE_IMAGES:-$repo/target/images}
out=$(realpath -m "${2:-$images/derived/$name}")

# shellcheck source=/dev/null
. "$conf"
BASE=${BASE:-systemd}
: "${PACKAGES:?$name.conf: PACKAGES}" "${CHECK_PATHS_EXTRA=}" "${MODULES_EXTRA=}"
basedir=$(realpath -m "${VMICACHE_BASE_DIR:-$images/$BASE}")

# The base is built when missing or out of date, never forced from here: a forced base build
# makes a new base.raw (not bit-reproducible), and guests derived from different builds of
# it would not share its blocks. Force it with images/build.sh itself.
VMICACHE_IMAGES_FORCE='' "$here/build.sh" "$BASE" "$basedir"
for f in vmlinuz initrd.img base.raw boot.env recipe.sha256; do
	[[ -s $basedir/$f ]] || die "base $BASE: no $basedir/$f"
done

recipe_hash() {
	{
		(cd "$here" && find derive.sh ext4-sync.py common "derived/$name.conf" -type f -print0 |
			sort -z | xargs -0 sha256sum)
		# The base's recipe and its file (rebuilt with the same recipe, it is another base).
		echo "base $BASE $(cat "$basedir/recipe.sha256") $(stat -c %s:%i:%Y "$basedir/base.raw")"
	} | sha256sum | cut -c1-64
}
hash=$(recipe_hash)
outputs=(vmlinuz initrd.img base.raw boot.env packages.txt added.txt sync.json debugfs.cmds)
up_to_date() {
	[[ -f $out/recipe.sha256 && $(cat "$out/recipe.sha256") == "$hash" ]] || return 1
	local f
	for f in "${outputs[@]}"; do [[ -s $out/$f ]] || return 1; done
}
if [[ -z ${VMICACHE_IMAGES_FORCE:-} ]] && up_to_date; then
	say "$name: up to date in $out (recipe $hash)"
	exit 0
fi
[[ $EUID -eq 0 ]] || die "must run as root (chroot, file ownership)"
command -v debugfs >/dev/null || die "debugfs missing (apt-get install e2fsprogs)"

mkdir -p "$out"
exec 9>"$out/.lock"
flock -n 9 || die "another build of $out is running"
work=$out/.work
rm -rf "$work"
mkdir -p "$work"
root=$work/root
t_start=$SECONDS

# The base's settings (its CHECK_PATHS) and its module list, extended below.
# shellcheck source=/dev/null
CHECK_PATHS=$(. "$here/$BASE/guest.conf" && echo "$CHECK_PATHS")

# --- the base's files ----------------------------------------------------------------------
cp --sparse=always "$basedir/base.raw" "$work/base.raw"
mkdir -p "$root"
debugfs -R "rdump / $root" "$work/base.raw" >"$work/rdump.log" 2>&1 || {
	cat "$work/rdump.log" >&2
	die "debugfs rdump failed"
}
python3 "$here/ext4-sync.py" modes "$work/base.raw" "$root"
python3 "$here/ext4-sync.py" snapshot "$root" "$work/before.json"
# rdump skips device nodes (they stay as they are in the image): what maintainer scripts need.
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9

# --- install ---------------------------------------------------------------------------------
# Resolve on the host, against the guest's dpkg status, preferring plain bookworm (what the
# base was debootstrapped from) over -updates and -security; download on the host (the
# chroot has no network); install in the chroot with apt, which orders and configures.
aptopts=(-o "Dir::State::status=$root/var/lib/dpkg/status" -o APT::Default-Release=bookworm
	-o APT::Install-Recommends=false -o APT::Sandbox::User=root)
resolve() {
	# shellcheck disable=SC2086  # PACKAGES is a list
	apt-get -s "${aptopts[@]}" install $PACKAGES 2>"$work/resolve.err" |
		awk '$1 == "Inst" { v = $3; if (v ~ /^\[/) v = $4; gsub(/[()]/, "", v); print $2 "=" v }'
}
mapfile -t pins < <(resolve) || true
if ((${#pins[@]} == 0)); then
	say "$name: nothing resolved; apt-get update and retry"
	apt-get update -qq
	mapfile -t pins < <(resolve)
fi
((${#pins[@]})) || {
	cat "$work/resolve.err" >&2
	die "cannot resolve $PACKAGES over $BASE"
}
say "$name: installing ${#pins[@]} packages over $BASE: ${pins[*]%%=*}"
mkdir -p "$root/tmp/debs"
(cd "$root/tmp/debs" && apt-get download -q "${aptopts[@]}" "${pins[@]}" >/dev/null) || {
	apt-get update -qq
	(cd "$root/tmp/debs" && apt-get download -q "${aptopts[@]}" "${pins[@]}" >/dev/null)
} || die "apt-get download failed"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
debs=()
for f in "$root"/tmp/debs/*.deb; do debs+=("/tmp/debs/${f##*/}"); done
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	-o Dpkg::Use-Pty=0 "${debs[@]}" >"$work/install.log" 2>&1 || {
	tail -n 30 "$work/install.log" >&2
	die "apt-get install in the chroot failed (log: $work/install.log)"
}
if grep -q " $root/" /proc/mounts; then die "mounts left below $root"; fi
printf '%s\n' "${pins[@]%%=*}" >"$work/added.txt"

# Clean up as images/build.sh does after debootstrap; the policy and the .debs go too. (The
# .debs debootstrap left in /var/cache/apt/archives stay: they are the base's files.)
rm -rf "$root/tmp/debs" "$root/usr/sbin/policy-rc.d" "$root"/var/cache/apt/*.bin \
	"$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
	"$root"/var/log/apt/* "$root/var/cache/debconf"/*-old "$root/var/lib/dpkg"/*-old \
	"$root/etc/resolv.conf"
rm -f "$root"/dev/{null,zero,random,urandom}
# shellcheck disable=SC2016  # dpkg-query's own ${fields}
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$work/packages.txt"
echo "vmicache-$name" >"$root/etc/hostname"

# Bytecode for new python sources only (as build.sh: unchecked-hash, the guest's own python).
# Recompiling everything would rewrite unchanged .pyc files (marshal output is not stable
# between runs) and with them blocks of the base.
pyver=$(cd "$root/usr/lib" && ls -d python3.[0-9]* | sort -V | tail -n1)
chroot "$root" "/usr/bin/$pyver" - "/usr/lib/$pyver" /usr/lib/python3/dist-packages <<'EOF' >"$work/compile.log" 2>&1 || say "$name: some bytecode not compiled (see $work/compile.log)"
import importlib.util, os, py_compile, sys
n = 0
for top in sys.argv[1:]:
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                src = os.path.join(d, f)
                if not os.path.exists(importlib.util.cache_from_source(src)):
                    try:
                        py_compile.compile(src, doraise=True,
                            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                        n += 1
                    except py_compile.PyCompileError as e:
                        print(e)
print("compiled", n)
EOF

# --- the check: modules and manifest, as build.sh makes them ----------------------------------
CHECK_PATHS="$CHECK_PATHS $CHECK_PATHS_EXTRA"
{
	cat "$here/$BASE/modules"
	for m in $MODULES_EXTRA; do echo "$m"; done
} >"$root/usr/local/share/vmicache/modules"
manifest=$root/usr/local/share/vmicache/manifest.sha256
# shellcheck disable=SC2086  # CHECK_PATHS is a list of paths (and globs)
(cd "$root" && find $CHECK_PATHS -type f -print0 | sort -z | xargs -0 sha256sum) >"$manifest"
# shellcheck disable=SC1003
if grep -q '^\\' "$manifest"; then die "a CHECK_PATHS file name needs escaping"; fi
marker_hash=$(sha256sum <"$manifest" | cut -c1-64)
check_files=$(wc -l <"$manifest")
chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 /usr/bin/python3 -B \
	/usr/local/lib/vmicache/vmicache-check.py --no-write >"$work/check.log" 2>&1 || {
	cat "$work/check.log" >&2
	die "the boot check fails on the build host"
}
grep -qx "VMICACHE-BOOT-OK $marker_hash" "$work/check.log" || die "check printed $(tail -n1 "$work/check.log")"
check_bytes=$(sed -n 's/.* files, \([0-9]*\) bytes.*/\1/p' "$work/check.log")
root_bytes=$(du -sb "$root" | cut -f1)

# --- write the difference into the image -----------------------------------------------------
python3 "$here/ext4-sync.py" commands "$root" "$work/before.json" --stats "$work/sync.json" >"$work/debugfs.cmds"
t_write=$SECONDS
debugfs -w -f "$work/debugfs.cmds" "$work/base.raw" >"$work/debugfs.log" 2>"$work/debugfs.err" ||
	die "debugfs -w failed"
# debugfs goes on after a failed command; any message but its banner is an error.
if grep -v '^debugfs [0-9.]* (' "$work/debugfs.err" | grep -q .; then
	grep -v '^debugfs [0-9.]* (' "$work/debugfs.err" | head -n 20 >&2
	die "debugfs reported errors (all in $work/debugfs.err)"
fi
t_write=$((SECONDS - t_write))
e2fsck -fn "$work/base.raw" >"$work/e2fsck.log" 2>&1 || {
	cat "$work/e2fsck.log" >&2
	die "e2fsck reports problems in the derived image"
}
# Verify: dump the written image again; it must equal the tree, entry for entry.
python3 "$here/ext4-sync.py" snapshot "$root" "$work/after.json"
mkdir "$work/verify"
debugfs -R "rdump / $work/verify" "$work/base.raw" >/dev/null 2>&1 || die "debugfs rdump (verify) failed"
python3 "$here/ext4-sync.py" modes "$work/base.raw" "$work/verify"
python3 "$here/ext4-sync.py" commands "$work/verify" "$work/after.json" >"$work/verify.cmds"
if [[ -s $work/verify.cmds ]]; then
	head -n 20 "$work/verify.cmds" >&2
	die "the written image differs from the tree ($(wc -l <"$work/verify.cmds") commands to fix)"
fi
rm -rf "$work/verify"

cp "$basedir/vmlinuz" "$basedir/initrd.img" "$work/"
# shellcheck source=/dev/null
cmdline=$(. "$basedir/boot.env" && echo "$KERNEL_CMDLINE")
# shellcheck source=/dev/null
kpkg=$(. "$basedir/boot.env" && echo "$KERNEL_PACKAGE")
cat >"$work/boot.env" <<EOF
# vmicache derived test guest "$name" (images/derive.sh: $BASE + $PACKAGES); sourceable shell.
GUEST=$name
KERNEL_CMDLINE='$cmdline'
BOOT_MARKER='VMICACHE-BOOT-OK $marker_hash'
KERNEL_PACKAGE=$kpkg
DISK_BYTES=$(stat -c %s "$work/base.raw")
ROOT_BYTES=$root_bytes
CHECK_FILES=$check_files
CHECK_BYTES=$check_bytes
DERIVED_FROM=$BASE
BASE_RECIPE_SHA256=$(cat "$basedir/recipe.sha256")
RECIPE_SHA256=$hash
EOF

rm -f "$out/recipe.sha256"
for f in "${outputs[@]}"; do mv -f "$work/$f" "$out/$f"; done
rm -rf "$work"
echo "$hash" >"$out/recipe.sha256"
say "$name: built in $((SECONDS - t_start)) s (debugfs write $t_write s): root $((root_bytes >> 20)) MiB," \
	"disk $(($(stat -c %s "$out/base.raw") >> 20)) MiB virtual / $(($(du -B1 "$out/base.raw" | cut -f1) >> 20)) MiB allocated," \
	"check reads $check_files files, $((check_bytes >> 20)) MiB; written: $(cat "$out/sync.json")"
say "$name: $out"
