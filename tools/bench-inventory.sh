#!/usr/bin/env bash
# Inventory speed (issue #14), side by side with The Sleuth Kit's `fls -r -p -l` (a recursive
# listing of the same file system with sizes, owners and times) and e2fsprogs' `debugfs`, in
# one run: medians of --runs runs, page cache warm (one run discarded first). Not a test.
#
#   tools/bench-inventory.sh [--runs N] [--guest systemd|minimal]
#
# Data: the guest's base (images/build.sh) and a cache of it recorded by a real boot
# (`warm --boot`, made once under target/bench/inventory). virt-ls (libguestfs) is not run:
# it boots an appliance VM, minutes under TCG on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
runs=5
guest=systemd
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --guest) guest=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--guest systemd|minimal]" >&2; exit 2 ;;
  esac
done
tools/deps.sh --boot >/dev/null
command -v fls >/dev/null || { apt-get update -qq && apt-get install -y -qq sleuthkit >/dev/null; }
images/build.sh "$guest" >/dev/null
cargo build --release --quiet
V=$repo/target/release/vmicache
images=${VMICACHE_IMAGES:-$repo/target/images}
base=$images/$guest/base.raw
work=$repo/target/bench/inventory
mkdir -p "$work"
export VMICACHE_CONFIG=/nonexistent VMICACHE_ALLOW_BACKING=$images/$guest:$work
cache=$work/$guest-cache.qcow2
if [ ! -f "$cache.trace" ] || [ "$cache" -ot "$base" ]; then
  echo "recording a cache of $guest by a real boot (once)..." >&2
  rm -f "$cache" "$cache.trace"
  "$V" -q build "$base" -o "$cache"
  "$V" -q warm "$cache" --boot --timeout 900 -- images/boot.sh "$guest" '{nbd}' raw >/dev/null
fi

# median of the wall times of `runs` runs of a command (one warm-up run first); a command
# that fails stops the script
median() {
  "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }
  local t=()
  for _ in $(seq "$runs"); do
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    e=$(date +%s.%N)
    t+=("$(echo "$e - $s" | bc -l)")
  done
  printf '%s\n' "${t[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}'
}

ours_base=$(median "$V" inventory "$base")
ours_json=$(median "$V" inventory --json "$base")
ours_cache=$(median "$V" inventory "$cache")
ours_trace=$(median "$V" inventory "$cache" --trace "$cache.trace")
ours_pkgs=$(median "$V" inventory --packages "$base")
fls_base=$(median fls -r -p -l "$base")
dbg_root=$(median debugfs -R 'ls -l -p /' "$base")

n_ours=$("$V" inventory --json "$base" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["entries"]))')
n_fls=$(fls -r -p "$base" | grep -vc '\$OrphanFiles' || true)
n_dirs=$("$V" inventory --json "$base" | python3 -c 'import json,sys; print(sum(e["kind"]=="d" for e in json.load(sys.stdin)["entries"])+1)')
held=$("$V" inventory --summary "$cache" | sed -n 's/^  cache holds //p')
ratio() { echo "scale=2; $1 / $2" | bc -l; }

echo "inventory of the $guest guest ($(du -h --apparent-size "$base" | cut -f1) disk, $n_ours entries), median of $runs runs, page cache warm"
printf '  %-46s %8s s\n' "vmicache inventory BASE" "$ours_base"
printf '  %-46s %8s s\n' "vmicache inventory --json BASE" "$ours_json"
printf '  %-46s %8s s\n' "vmicache inventory --packages BASE" "$ours_pkgs"
printf '  %-46s %8s s\n' "vmicache inventory CACHE (held per file)" "$ours_cache"
printf '  %-46s %8s s\n' "vmicache inventory CACHE --trace TRACE" "$ours_trace"
printf '  %-46s %8s s   (%s entries)\n' "fls -r -p -l BASE (sleuthkit)" "$fls_base" "$n_fls"
printf '  %-46s %8s s   (one directory; %s in the image)\n' "debugfs -R 'ls -l -p /' BASE" "$dbg_root" "$n_dirs"
echo "  ratio fls / vmicache (base): $(ratio "$fls_base" "$ours_base")x"
echo "  targets: base <= 2 s ($ours_base s), cache <= 1 s ($ours_cache s)"
echo "  the cache holds $held"
