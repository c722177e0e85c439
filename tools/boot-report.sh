#!/usr/bin/env bash
# Boot report: for each test guest, the cache's effect on real boots under qemu-system-x86_64
# (TCG). The base is always reached through nbdkit, whose log filter counts the bytes read
# from it (a witness that is not vmicache's code).
#
#   tools/boot-report.sh [GUEST...]          (default: minimal systemd)
#
# Columns: base virtual size and allocated data; the boot working set (cache data after the
# recorded boot); base bytes read by boot 1 (recorded, cold) and boot 2 (warm, new instance
# on the sealed cache); boot times to the guest's success marker for: cold via vmicache,
# warm via vmicache, QEMU's native chain (instance -> sealed cache -> base), and a plain
# qcow2 overlay on the local base; then the same with a slow base (nbdkit delay-read=10ms):
# uncached (plain overlay over the slow base), cold and warm via vmicache.
# A second table: the sealed cache's file size, compacted with zstd and zlib (`seal
# --compact`), boot times from the plain and the zstd-compacted cache (served and QEMU's
# native chain, same run), and the base bytes read by `chain` and by serve + boot on the
# sealed cache, and by the boots from the compacted one (all must be 0 B).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
guests=("$@")
[ ${#guests[@]} -gt 0 ] || guests=(minimal systemd)
tools/deps.sh --boot
cargo build --release --quiet
V=$repo/target/release/vmicache
work=$repo/target/boot-report
# Caches here name the guests' bases in their own directories: allow them.
export VMICACHE_ALLOW_BACKING=${VMICACHE_IMAGES:-$repo/target/images}/minimal:${VMICACHE_IMAGES:-$repo/target/images}/systemd
rm -rf "$work"
mkdir -p "$work"

human() { python3 -c "import sys; n=float(sys.argv[1]); u=['B','KiB','MiB','GiB']; i=0
while n>=1024 and i<3: n/=1024; i+=1
print(f'{n:.1f} {u[i]}' if i else f'{int(n)} B')" "$1"; }
log_bytes() { python3 -c "import re,sys; print(sum(int(m,16) for m in re.findall(r' Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)', open(sys.argv[1]).read())))" "$1"; }

kit_pid=""
start_kit() { # SOCK LOG BASE [delay]
  rm -f "$1"
  local filters=(--filter=log)
  local params=("logfile=$2")
  if [ "${4:-}" = delay ]; then filters+=(--filter=delay); params+=(delay-read=10ms); fi
  nbdkit -r -f -U "$1" "${filters[@]}" file "$3" "${params[@]}" & kit_pid=$!
  while [ ! -S "$1" ]; do sleep 0.05; done
}
stop_kit() { kill "$kit_pid" 2>/dev/null || true; wait "$kit_pid" 2>/dev/null || true; }
srv_pid=""
start_srv() { # INSTANCE SOCK
  rm -f "$2"
  "$V" serve "$1" --socket "$2" -q & srv_pid=$!
  while [ ! -S "$2" ]; do sleep 0.05; done
}
stop_srv() { kill "$srv_pid" 2>/dev/null || true; wait "$srv_pid" 2>/dev/null || true; }
trap 'stop_srv; stop_kit' EXIT
# boot GUEST DISK FORMAT -> prints seconds to the marker
boot() {
  local err
  err=$(images/boot.sh "$1" "$2" "$3" 2>&1 >/dev/null) || { echo "boot of $1 from $2 failed: $err" >&2; exit 1; }
  sed -n 's/.*marker after \([0-9.]*\) s.*/\1/p' <<<"$err"
}
# served_boot INSTANCE NAME: boots guest $g through `vmicache serve INSTANCE`; sets $t
served_boot() {
  start_srv "$1" "$d/vm.sock"
  t=$(boot "$g" "nbd+unix:///$2?socket=$d/vm.sock" raw)
  stop_srv
}
# cold_boot CACHE NAME: stands CACHE on the nbdkit base, boots a new instance NAME on it
# through vmicache serve (the recorded first boot), seals CACHE; sets $t
cold_boot() {
  qemu-img rebase -u -b "$uri" -F raw "$1"
  qemu-img create -q -f qcow2 -o cluster_size=4k -b "$1" -F qcow2 "$d/$2.qcow2"
  served_boot "$d/$2.qcow2" "$2"
  "$V" seal "$1" -q
}

rows=()
crows=()
for g in "${guests[@]}"; do
  images/build.sh "$g" >/dev/null
  base=${VMICACHE_IMAGES:-$repo/target/images}/$g/base.raw
  d=$work/$g
  mkdir -p "$d"
  vsize=$(stat -c %s "$base")
  alloc=$(( $(stat -c %b "$base") * 512 ))
  bsock=$d/base.sock
  uri="nbd+unix:///?socket=$bsock"

  # Plain qcow2 overlay on the local base (no vmicache, no NBD).
  qemu-img create -q -f qcow2 -b "$base" -F raw "$d/plain.qcow2"
  t_plain=$(boot "$g" "$d/plain.qcow2" qcow2)

  # Boot 1: recorded first boot through vmicache, base through nbdkit.
  "$V" build "$base" -o "$d/cache.qcow2" -q
  "$V" chain "$d/cache.qcow2" -o "$d/warm.qcow2" -q
  "$V" chain "$d/cache.qcow2" -o "$d/native.qcow2" -q
  start_kit "$bsock" "$d/kit1.log" "$base"
  cold_boot "$d/cache.qcow2" cold
  t_cold=$t
  read1=$(log_bytes "$d/kit1.log")
  ws=$("$V" inspect --json "$d/cache.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["allocated-bytes"])')
  stop_kit

  # Boot 2: warm, new instance on the sealed cache.
  start_kit "$bsock" "$d/kit2.log" "$base"
  # A new instance on the sealed cache: chain reads nothing of the base.
  "$V" chain "$d/cache.qcow2" -o "$d/chained.qcow2" -q
  read_chain=$(log_bytes "$d/kit2.log")
  served_boot "$d/warm.qcow2" warm
  t_warm=$t
  read2=$(( $(log_bytes "$d/kit2.log") - read_chain ))
  # QEMU's native chain on the same sealed cache.
  t_native=$(boot "$g" "$d/native.qcow2" qcow2)

  # Compacted copies of the sealed cache (shared and compressed clusters, plain qcow2):
  # served and as QEMU's native chain, in the same run as the plain cache above.
  plain_size=$(stat -c %s "$d/cache.qcow2")
  for c in zstd zlib; do
    cp "$d/cache.qcow2" "$d/$c.qcow2"
    "$V" seal --compact --compress "$c" "$d/$c.qcow2" -q
  done
  zstd_size=$(stat -c %s "$d/zstd.qcow2")
  zlib_size=$(stat -c %s "$d/zlib.qcow2")
  "$V" chain "$d/zstd.qcow2" -o "$d/zstd-warm.qcow2" -q
  qemu-img create -q -f qcow2 -o cluster_size=4k -b "$d/zstd.qcow2" -F qcow2 "$d/zstd-native.qcow2"
  before=$(log_bytes "$d/kit2.log")
  served_boot "$d/zstd-warm.qcow2" zstd-warm
  t_zstd_warm=$t
  t_zstd_native=$(boot "$g" "$d/zstd-native.qcow2" qcow2)
  read_zstd=$(( $(log_bytes "$d/kit2.log") - before ))
  stop_kit

  # Slow base: 10 ms per read.
  start_kit "$bsock" "$d/kit3.log" "$base" delay
  qemu-img create -q -f qcow2 -b "$uri" -F raw "$d/slow-plain.qcow2"
  t_slow_plain=$(boot "$g" "$d/slow-plain.qcow2" qcow2)
  "$V" build "$base" -o "$d/slow-cache.qcow2" -q
  "$V" chain "$d/slow-cache.qcow2" -o "$d/slow-warm.qcow2" -q
  cold_boot "$d/slow-cache.qcow2" slow-cold
  t_slow_cold=$t
  served_boot "$d/slow-warm.qcow2" slow-warm
  t_slow_warm=$t
  stop_kit

  pct=$(python3 -c "print(f'{100*$ws/$vsize:.1f}%')")
  rows+=("| $g | $(human "$vsize") / $(human "$alloc") | $(human "$ws") ($pct) | $(human "$read1") | $(human "$read2") | $t_cold | $t_warm | $t_native | $t_plain | $t_slow_plain | $t_slow_cold | $t_slow_warm |")
  crows+=("| $g | $(human "$plain_size") | $(human "$zstd_size") ($(python3 -c "print(f'{$zstd_size/$plain_size:.2f}')")x) | $(human "$zlib_size") ($(python3 -c "print(f'{$zlib_size/$plain_size:.2f}')")x) | $t_warm / $t_zstd_warm | $t_native / $t_zstd_native | $(human "$read_chain") | $(human "$read2") | $(human "$read_zstd") |")
done

echo "| guest | base virtual / data | boot working set (cache) | base read, boot 1 | base read, boot 2 | cold via vmicache (s) | warm via vmicache (s) | native chain (s) | plain local qcow2 (s) | slow base: uncached (s) | slow base: cold (s) | slow base: warm (s) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "| guest | sealed cache file | compacted, zstd | compacted, zlib | served boot: plain / zstd (s) | native chain: plain / zstd (s) | base read by chain (sealed) | base read by serve + boot (sealed) | base read, compacted boots |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${crows[@]}"

