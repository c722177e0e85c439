#!/usr/bin/env bash
# The hoard's benchmark (issue #12): storage against Squirrel's baselines, ingest and
# checkout speed, index size, serving speed against qemu-nbd, and warm boots from a hoarded
# cache against the same boots from the plain cache. One run, figures printed; not a test.
#
#   tools/bench-hoard.sh [--runs N] [--no-boot] [--sets "derived independent"]
#
# Data: the guest sets of tools/hoard-guests.sh (built and their caches recorded by real
# boots when missing; cached under target/images/hoard): "derived" guests made from one base
# image by installing packages, "independent" guests built from scratch.
#  1. per set, a fresh hoard: `hoard add` of every cache (MiB/s of cache data, the caches in
#     the page cache), then
#     `analyze` on the same caches: the hoard's bytes on disk against "ZFS-style" (64 KiB
#     blocks, dedup, gzip-6 per block) and "4 KiB fixed + gzip-6"; after the fast path
#     (zstd-4, 32-chunk frames) and after the repack off the hot path (`hoard gc
#     --recompress 9 --frame-chunks 64 --keep-days 0`: as it stands once the GC window has
#     passed); the same analysis over the bases; index bytes per unique chunk on disk and
#     in a server's memory; `hoard checkout` MiB/s (median of N rounds), on the add-path
#     hoard and on the repacked one
#  2. a sequential read (nbdcopy -C 1) of an instance over the hoarded cache (vmicache serve;
#     add-path and repacked hoard)
#     against qemu-nbd -r over the same cache as a plain qcow2 (median of 3N; ratio = qemu
#     time / ours: above 1 = vmicache faster), every run's time, and each server's CPU time
#  3. warm boots of the systemd guest (TCG) served from the hoarded cache and from the plain
#     cache, interleaved, 2N each (single boots spread up to 2x here), medians; base reads
#     counted by nbdkit's log filter (0 B)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
runs=3
boots=1
sets="derived independent"
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --no-boot) boots=0; shift ;;
    --sets) sets=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--no-boot] [--sets \"derived independent\"]" >&2; exit 2 ;;
  esac
done
tools/deps.sh --boot >/dev/null
cargo build --release --quiet
V=$repo/target/release/vmicache
export VMICACHE=$V VMICACHE_CONFIG=/nonexistent
images=${VMICACHE_IMAGES:-$repo/target/images}
G=$images/hoard
for s in $sets; do tools/hoard-guests.sh --set "$s" "$G" >/dev/null; done
work=$repo/target/bench/hoard
rm -rf "$work"
mkdir -p "$work"
export VMICACHE_ALLOW_BACKING=$G:$images/systemd:$work

# The median (of an even count, the mean of the two middle values).
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {m=int((NR+1)/2); print (NR%2 ? a[m] : (a[m]+a[m+1])/2)}'; }
now() { date +%s.%N; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1])/1048576:.1f} MiB')" "$1"; }
j() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }

# checkout_all SET HOARD LABEL: every cache checked out (MiB/s), each compared with its source
# (first round); $runs rounds, the median of their times.
checkout_all() {
  local data secs c name round all=()
  for round in $(seq "$runs"); do
    data=0 secs=0
    for c in "${caches[@]}"; do
      name=$(basename "$(dirname "$c")")
      rm -f "$work/co.qcow2" "$work/co.qcow2.trace"
      "$V" hoard checkout "$name" -o "$work/co.qcow2" --hoard "$2" --json >"$work/co.json"
      data=$((data + $(j "$work/co.json" "d['data_bytes']")))
      secs=$(python3 -c "print($secs + $(j "$work/co.json" "d['seconds']"))")
      if [ "$round" = 1 ]; then
        qemu-img compare -q -U "$c" "$work/co.qcow2" || { echo "checkout of $name differs" >&2; exit 1; }
      fi
    done
    all+=("$secs")
  done
  secs=$(med "${all[@]}")
  echo "   hoard checkout ($3, median of $runs rounds: ${all[*]} s): $(mib "$data") in ${secs} s = $(python3 -c "print(f'{$data/1048576/$secs:.0f}')") MiB/s (target >= 500); all equal (qemu-img compare)"
}

# cpu PID: seconds of CPU the process has used (user + system).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }

# seq_read HOARD LABEL: nbdcopy -C 1 of the largest cache's instance, vmicache over the hoard
# vs qemu-nbd -r over the plain cache, interleaved, median of 3 x $runs (a read takes about
# 0.3 s and this machine's noise is large; ratio = qemu time / ours).
seq_read() {
  local big name sock o t a b pid
  big=$(for c in "${caches[@]}"; do echo "$(stat -c %s "$c") $c"; done | sort -n | tail -1 | cut -d' ' -f2)
  name=$(basename "$(dirname "$big")")
  rm -f "$work/hi.qcow2"
  VMICACHE_HOARD=$1 "$V" chain "hoard:$name" -o "$work/hi.qcow2" -q
  sock=$work/s.sock
  local ours=() theirs=() ocpu=() tcpu=()
  local n=$((3 * runs))
  for _ in $(seq "$n"); do
    rm -f "$sock"; "$V" serve "$work/hi.qcow2" --socket "$sock" -q & pid=$!
    while [ ! -S "$sock" ]; do sleep 0.02; done
    a=$(now); nbdcopy -C 1 "nbd+unix:///hi?socket=$sock" null:; b=$(now)
    ocpu+=("$(cpu "$pid")")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    ours+=("$(python3 -c "print($b - $a)")")
    rm -f "$sock"; qemu-nbd -t -r -k "$sock" -f qcow2 "$big" & pid=$!
    while [ ! -S "$sock" ]; do sleep 0.02; done
    a=$(now); nbdcopy -C 1 "nbd+unix:///?socket=$sock" null:; b=$(now)
    tcpu+=("$(cpu "$pid")")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    theirs+=("$(python3 -c "print($b - $a)")")
  done
  o=$(med "${ours[@]}"); t=$(med "${theirs[@]}")
  echo "   sequential read of $name's instance (nbdcopy -C 1, median of $n): vmicache over the $2 ${o} s, qemu-nbd -r over the cache ${t} s: $(python3 -c "print(f'{$t/$o:.2f}')")x (target >= 1.0)"
  echo "     all runs: vmicache ${ours[*]}; qemu-nbd ${theirs[*]}"
  echo "     server CPU (user + system, median): vmicache $(med "${ocpu[@]}") s, qemu-nbd $(med "${tcpu[@]}") s (decompressing and checking frames costs CPU; qemu-nbd copies from the page cache)"
}

for set in $sets; do
  mapfile -t caches < <(ls "$G/$set"/*/cache.qcow2)
  H=$work/$set
  "$V" hoard init "$H" -q
  echo "== $set: ${#caches[@]} caches"
  # Timed with the caches in the page cache (reading them is not the hoard's work; the
  # packs written are synced as always).
  cat "${caches[@]}" >/dev/null
  data=0; secs=0
  for c in "${caches[@]}"; do
    name=$(basename "$(dirname "$c")")
    "$V" hoard add "$c" --name "$name" --hoard "$H" --json >"$work/add.json"
    data=$((data + $(j "$work/add.json" "d['data_bytes']")))
    secs=$(python3 -c "print($secs + $(j "$work/add.json" "d['seconds']"))")
  done
  "$V" hoard stats --hoard "$H" --json >"$work/$set.stats.json"
  echo "   hoard add: $(mib "$data") of cache data in ${secs} s = $(python3 -c "print(f'{$data/1048576/$secs:.0f}')") MiB/s (target >= 300)"
  "$V" analyze "${caches[@]}" --hoard "$H" --json >"$work/$set.analyze.json"
  "$V" analyze "${caches[@]}" --hoard "$H"
  fast=$(j "$work/$set.analyze.json" "d['hoard']['bytes']")
  zfs=$(j "$work/$set.analyze.json" "d['baselines']['zfs_style_64k_gzip6']")
  f4k=$(j "$work/$set.analyze.json" "d['baselines']['fixed_4k_gzip6']")
  echo "   the bases beneath the caches:"
  "$V" analyze "${caches[@]}" --bases --block-sizes 4K,64K | sed 's/^/     /'
  checkout_all "$set" "$H" "the add-path hoard"
  # 2. sequential read: instance over the hoarded cache vs qemu-nbd -r over the plain cache
  seq_read "$H" "add-path hoard"
  t0=$(now)
  # --keep-days 0: the steady state once the GC window has passed (within it, the packs of
  # the generation before the repack are kept too).
  "$V" hoard gc --recompress 9 --frame-chunks 64 --keep-days 0 --hoard "$H" -q
  t1=$(now)
  "$V" hoard stats --hoard "$H" --json >"$work/$set.repacked.json"
  rep=$(j "$work/$set.repacked.json" "d['pack_bytes'] + d['index_bytes']")
  python3 - "$fast" "$rep" "$zfs" "$f4k" "$(python3 -c "print($t1 - $t0)")" <<'PY'
import sys
fast, rep, zfs, f4k, t = map(float, sys.argv[1:])
m = lambda b: f"{b / 1048576:.1f} MiB"
print(f"   hoard on disk: fast path {m(fast)} = {fast / zfs:.3f}x ZFS-style, {fast / f4k:.3f}x 4K+gzip-6;"
      f" repacked (gc --recompress 9, 64-chunk frames, --keep-days 0, {t:.1f} s) {m(rep)} = {rep / zfs:.3f}x ZFS-style,"
      f" {rep / f4k:.3f}x 4K+gzip-6")
PY
  echo "   index: $(j "$work/$set.repacked.json" "round(d['metadata_per_chunk'], 1)") B per unique chunk on disk, $(j "$work/$set.repacked.json" "round(d['memory_per_chunk'], 1)") B in a server's memory (target <= 32)"
  checkout_all "$set" "$H" "the repacked hoard"
  seq_read "$H" "repacked hoard"
done

# 3. warm boots of the systemd guest: hoarded cache vs plain cache, base behind nbdkit's log
if [ "$boots" = 1 ]; then
  images/build.sh systemd >/dev/null
  S=$images/systemd
  cd "$work"
  log=$work/nbdkit.log; bsock=$work/base.sock
  nbdkit -r -f -U "$bsock" --filter=log file "$S/base.raw" logfile="$log" & kit=$!
  while [ ! -S "$bsock" ]; do sleep 0.02; done
  base="nbd+unix:///?socket=$bsock"
  "$V" build "$S/base.raw" -o sd.qcow2 -q
  qemu-img rebase -u -b "$base" -F raw sd.qcow2
  "$V" warm sd.qcow2 --boot --timeout 600 -q -- "$repo/images/boot.sh" systemd '{nbd}' raw >/dev/null 2>&1
  "$V" hoard init "$work/sdh" -q
  "$V" hoard add sd.qcow2 --name systemd --hoard "$work/sdh" -q
  reads() { grep -c ' Read ' "$log" || true; }
  boot_from() { # INSTANCE -> seconds to the marker
    local s=$work/vm.sock
    rm -f "$s"; "$V" serve "$1" --socket "$s" -q & local p=$!
    while [ ! -S "$s" ]; do sleep 0.02; done
    local n; n=$(basename "$1" .qcow2)
    "$repo/images/boot.sh" systemd "nbd+unix:///$n?socket=$s" raw 2>&1 >/dev/null | sed -n 's/.*marker after \([0-9.]*\) s.*/\1/p'
    kill "$p"; wait "$p" 2>/dev/null || true
  }
  before=$(reads)
  plain=(); hoarded=()
  nb=$((2 * runs))
  for i in $(seq "$nb"); do
    rm -f pi.qcow2 hi.qcow2
    "$V" chain sd.qcow2 -o pi.qcow2 -q
    VMICACHE_HOARD=$work/sdh "$V" chain hoard:systemd -o hi.qcow2 -q
    plain+=("$(boot_from "$work/pi.qcow2")")
    hoarded+=("$(boot_from "$work/hi.qcow2")")
  done
  kill "$kit"; wait "$kit" 2>/dev/null || true
  for x in "${plain[@]}" "${hoarded[@]}"; do
    [ -n "$x" ] || { echo "a warm boot printed no marker" >&2; exit 1; }
  done
  p=$(med "${plain[@]}"); h=$(med "${hoarded[@]}")
  echo "== warm boots of the systemd guest (median of $nb; plain: ${plain[*]}; hoard: ${hoarded[*]})"
  echo "   from the plain cache ${p} s, from the hoarded cache ${h} s: $(python3 -c "print(f'{($h/$p - 1)*100:+.1f}')")% (target within 5%); base reads during the warm boots: $(( $(reads) - before ))"
fi
