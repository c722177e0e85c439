#!/usr/bin/env bash
# tools/hoard-guests.sh [--set derived|independent|all] [OUTDIR] -- test guests for the hoard
# (issue #12): two sets of guests, each with a boot cache recorded by a real boot.
#
#   derived      images/derived/NAME.conf: one base (the "systemd" guest) with different
#                packages installed in place (images/derive.sh), as cloud images are made:
#                the base's files keep their blocks in every guest
#   independent  images/independent/NAME/guest.conf: the same package sets, each guest built
#                from scratch (images/build.sh: its own debootstrap, mkfs, initramfs), so the
#                block layouts differ even where the files are the same
#
# For each guest, OUTDIR/SET/NAME/ holds the guest's build (base.raw, vmlinuz, initrd.img,
# boot.env, ...; rebuilt only when its recipe changed) and:
#   cache.qcow2          `vmicache build base.raw`, filled and sealed by
#                        `vmicache warm cache.qcow2 --boot -- images/boot.sh NAME {nbd}`
#   cache.qcow2.trace    the recorded boot's trace
#   cache.qcow2.log      that boot's console and vmicache's summary
#   cache.qcow2.recipe   the recipe hash, base.raw's size/inode/mtime and the cluster size the
#                        cache was recorded for: a cache is recorded again only when one of
#                        them changes (or the cache is not sealed)
# and OUTDIR/SET/summary.tsv the table printed at the end: guest, base.raw's virtual and
# allocated bytes, the base's data as vmicache counts it (inspect's base-data-bytes: the
# file's data extents, where preallocated unwritten extents count as holes; comparable across
# sets, unlike allocated bytes, which include ~87 MiB of journal and inode tables that mkfs
# zeroed as unwritten extents in build.sh's files, but not in derive.sh's sparse copies), the
# cache's data bytes and clusters, the recorded boot's seconds to the marker (images/boot.sh's
# figure; "-" if unknown) and this run's build seconds (about 0 when the guest was up to
# date). The derived guests' common base is built first, once, by
# images/build.sh in ${VMICACHE_IMAGES:-<repo>/target/images}/systemd. VMICACHE_IMAGES_FORCE=1
# rebuilds every guest of the chosen sets (and that base), and so records every cache again.
#
# OUTDIR defaults to ${VMICACHE_IMAGES:-<repo>/target/images}/hoard; the vmicache binary is
# $VMICACHE (default <repo>/target/release/vmicache; this script never builds it).
# HOARD_CLUSTER_SIZE sets the caches' cluster size (vmicache build --cluster-size; default
# vmicache's, 64 KiB). Boots run one at a time (QEMU TCG; images/boot.sh). Runs as root.
set -euo pipefail
export LC_ALL=C
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
	echo "usage: tools/hoard-guests.sh [--set derived|independent|all] [OUTDIR]" >&2
	exit 2
}
set_arg=all
outdir=
while (($#)); do
	case $1 in
	--set)
		[[ $# -ge 2 ]] || usage
		set_arg=$2
		shift 2
		;;
	--set=*)
		set_arg=${1#--set=}
		shift
		;;
	-h | --help) usage ;;
	-*) usage ;;
	*)
		[[ -z $outdir ]] || usage
		outdir=$1
		shift
		;;
	esac
done
case $set_arg in
derived | independent) sets=("$set_arg") ;;
all) sets=(derived independent) ;;
*) usage ;;
esac
images=${VMICACHE_IMAGES:-$repo/target/images}
out=$(realpath -m "${outdir:-$images/hoard}")
V=${VMICACHE:-$repo/target/release/vmicache}
[[ -x $V ]] || {
	echo "hoard-guests.sh: no vmicache binary at $V (set VMICACHE or build it)" >&2
	exit 1
}
say() { echo "hoard-guests.sh: $*" >&2; }

guests_of() { # SET -> names, one a line
	case $1 in
	derived) (cd "$repo/images/derived" && for f in *.conf; do echo "${f%.conf}"; done) ;;
	independent) (cd "$repo/images/independent" && for f in */guest.conf; do echo "${f%/guest.conf}"; done) ;;
	esac
}

mkdir -p "$out"
exec 9>"$out/.lock"
flock -n 9 || {
	say "another hoard-guests.sh is running on $out"
	exit 1
}

human() { awk -v n="$1" 'BEGIN { split("B KiB MiB GiB", u); i = 1; while (n >= 1024 && i < 4) { n /= 1024; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), n, u[i] }'; }

# record SET NAME DIR: (re)records DIR/cache.qcow2 by a boot unless it is current.
# Sets boot_s (seconds to the marker; "-" when the cache was already current).
record() {
	local set=$1 name=$2 dir=$3 guest want state
	guest=$name
	[[ $set == independent ]] && guest=independent/$name
	# The recipe, the base file itself (a forced rebuild keeps the recipe hash) and the cluster size.
	want="$(cat "$dir/recipe.sha256") base=$(stat -c '%s:%i:%Y' "$dir/base.raw") cluster=${HOARD_CLUSTER_SIZE:-default}"
	boot_s=-
	if [[ -f $dir/cache.qcow2 && -f $dir/cache.qcow2.recipe && $(cat "$dir/cache.qcow2.recipe") == "$want" ]]; then
		state=$("$V" inspect --json "$dir/cache.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cache"]["state"])')
		if [[ $state == sealed ]]; then
			boot_s=$(sed -n 's/.*: marker after \([0-9.]*\) s.*/\1/p' "$dir/cache.qcow2.log" | tail -n1)
			say "$set/$name: cache up to date (recorded boot: ${boot_s:-?} s)"
			return
		fi
	fi
	rm -f "$dir/cache.qcow2" "$dir/cache.qcow2.trace" "$dir/cache.qcow2.recipe" "$dir/cache.qcow2.log"
	"$V" build "$dir/base.raw" -o "$dir/cache.qcow2" -q ${HOARD_CLUSTER_SIZE:+--cluster-size "$HOARD_CLUSTER_SIZE"}
	say "$set/$name: recording the first boot"
	if ! VMICACHE_GUEST_DIR=$dir "$V" warm "$dir/cache.qcow2" --boot -- \
		"$repo/images/boot.sh" "$guest" '{nbd}' >"$dir/cache.qcow2.log" 2>&1; then
		tail -n 20 "$dir/cache.qcow2.log" >&2
		say "$set/$name: the recorded boot failed (log: $dir/cache.qcow2.log)"
		exit 1
	fi
	boot_s=$(sed -n 's/.*: marker after \([0-9.]*\) s.*/\1/p' "$dir/cache.qcow2.log" | tail -n1)
	echo "$want" >"$dir/cache.qcow2.recipe"
}

for set in "${sets[@]}"; do
	t_set=$SECONDS
	mkdir -p "$out/$set"
	rows=()
	tsv=$'guest\tbase_virtual_bytes\tbase_allocated_bytes\tbase_data_bytes\tcache_data_bytes\tcache_clusters\tcluster_size\tboot_seconds\tbuild_seconds'
	mapfile -t names < <(guests_of "$set")
	if [[ $set == derived ]]; then
		# The common base(s), once (VMICACHE_IMAGES_FORCE applies here; derive.sh never
		# forces a base, so that all derived guests come from one build of it).
		for b in $(for n in "${names[@]}"; do (
			BASE=systemd
			# shellcheck source=/dev/null
			. "$repo/images/derived/$n.conf"
			echo "$BASE"
		); done | sort -u); do
			"$repo/images/build.sh" "$b"
		done
	fi
	for name in "${names[@]}"; do
		dir=$out/$set/$name
		t0=$SECONDS
		if [[ $set == derived ]]; then
			"$repo/images/derive.sh" "$name" "$dir"
		else
			"$repo/images/build.sh" "independent/$name" "$dir"
		fi
		build_s=$((SECONDS - t0))
		record "$set" "$name" "$dir"
		vsize=$(stat -c %s "$dir/base.raw")
		alloc=$(($(stat -c %b "$dir/base.raw") * 512))
		read -r data clusters csize bdata < <("$V" inspect --json "$dir/cache.qcow2" | python3 -c '
import json, sys
j = json.load(sys.stdin)
l = j["layers"][0]
print(l["allocated-bytes"], l["data-clusters"], l["cluster-size"], j["cache"].get("base-data-bytes", "-"))')
		rows+=("$(printf '| %s | %s | %s | %s (%d clusters of %s) | %s | %s |' "$name" "$(human "$alloc")" "$(human "$bdata")" "$(human "$data")" "$clusters" "$(human "$csize")" "$boot_s" "$build_s")")
		tsv+=$'\n'"$name"$'\t'"$vsize"$'\t'"$alloc"$'\t'"$bdata"$'\t'"$data"$'\t'"$clusters"$'\t'"$csize"$'\t'"$boot_s"$'\t'"$build_s"
	done
	printf '%s\n' "$tsv" >"$out/$set/summary.tsv"
	echo
	echo "$set: ${#names[@]} guests in $out/$set ($((SECONDS - t_set)) s)"
	echo "| guest | base allocated | base data | cache data | boot (s) | build (s) |"
	echo "|---|---|---|---|---|---|"
	printf '%s\n' "${rows[@]}"
done
