#!/usr/bin/env bash
# The hoard's propagation figures (issue #13): what travels per registration, as a stream
# (`hoard send --from`) and through a real OCI registry (Debian's docker-registry on
# 127.0.0.1: bytes uploaded by `hoard push`, bytes a node downloads with `hoard pull`), next to
# the registered cache's size; and how long a node that missed k registrations takes to catch
# up (`hoard sync`). One run, figures printed, per-registration figures written as JSON for
# tools/hoard-sim.py; not a test.
#
#   tools/bench-hoard-sync.sh [--set derived|independent] [--json FILE]
#
# Data: a guest set of tools/hoard-guests.sh (built, and its caches recorded by real boots,
# when missing; cached under target/images/hoard), registered in the order ssh, web, python,
# db, devel, server.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
set=derived
out=
while [ $# -gt 0 ]; do
  case $1 in
    --set) set=$2; shift 2 ;;
    --json) out=$2; shift 2 ;;
    *) echo "usage: $0 [--set derived|independent] [--json FILE]" >&2; exit 2 ;;
  esac
done
tools/deps.sh --boot >/dev/null
cargo build --release --quiet
V=$repo/target/release/vmicache
images=${VMICACHE_IMAGES:-$repo/target/images}
G=$images/hoard
tools/hoard-guests.sh --set "$set" "$G" >/dev/null
work=$repo/target/bench/sync
rm -rf "$work"
mkdir -p "$work"
export VMICACHE_CONFIG=/nonexistent VMICACHE_ALLOW_BACKING=$G:$images/systemd:$work
out=${out:-$work/registrations.json}

# A registry of our own on a free port, its storage in the work directory.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $work/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port, secret: bench}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg=$!
trap 'kill $reg 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
repo_ref=127.0.0.1:$port/bench/hoard

h() { local node=$1; shift; VMICACHE_HOARD=$work/$node "$V" hoard "$@"; }
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
mib() { python3 -c "import sys; print(f'{int(sys.argv[1])/1048576:.2f} MiB')" "$1"; }

for n in storage node1 late; do "$V" hoard init "$work/$n" >/dev/null; done
names=(ssh web python db devel server)
echo "registrations of the $set set (storage node: hoard add + push; node1: pull each time):"
printf '%-8s %10s %12s %12s %12s %12s %8s\n' cache "cache data" "new in hoard" stream pushed pulled "pull s"
rows=()
gen=0
for n in "${names[@]}"; do
  c=$G/$set/$n/cache.qcow2
  a=$(h storage add "$c" --name "$n" --json)
  gen=$((gen + 1))
  if [ $gen = 1 ]; then
    h storage send -o "$work/s.stream" -q
  else
    h storage send --from $((gen - 1)) -o "$work/s.stream" -q
  fi
  stream=$(stat -c %s "$work/s.stream")
  p=$(h storage push "$repo_ref" --json)
  t0=$(date +%s.%N)
  l=$(h node1 pull "$repo_ref" --json)
  t1=$(date +%s.%N)
  [ $gen = 1 ] && h late pull "$repo_ref" -q
  data=$(echo "$a" | j "d['data_bytes']")
  new=$(echo "$a" | j "d['new_pack_bytes']")
  pushed=$(echo "$p" | j "d['uploaded_bytes']")
  pulled=$(echo "$l" | j "d['bytes']")
  idx=$(h storage stats --json | j "d['index_bytes']")
  secs=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  printf '%-8s %10s %12s %12s %12s %12s %8s\n' "$n" "$(mib "$data")" "$(mib "$new")" \
    "$(mib "$stream")" "$(mib "$pushed")" "$(mib "$pulled")" "$secs"
  rows+=("{\"name\": \"$n\", \"data_bytes\": $data, \"new_pack_bytes\": $new, \"stream_bytes\": $stream, \"pushed_bytes\": $pushed, \"pulled_bytes\": $pulled, \"index_bytes_total\": $idx, \"pull_seconds\": $secs}")
done

echo
echo "catch-up: a node at generation 6-k syncs to generation 6 (k registrations missed):"
printf '%-4s %12s %8s\n' k pulled seconds
catch=()
for k in 1 2 3 4 5; do
  rm -rf "$work/n$k"
  "$V" hoard init "$work/n$k" >/dev/null
  h "n$k" pull "$repo_ref:gen-$((6 - k))" -q
  t0=$(date +%s.%N)
  s=$(h "n$k" sync "$repo_ref" --json)
  t1=$(date +%s.%N)
  b=$(echo "$s" | j "d['bytes']")
  secs=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  printf '%-4s %12s %8s\n' "$k" "$(mib "$b")" "$secs"
  catch+=("{\"missed\": $k, \"pulled_bytes\": $b, \"seconds\": $secs}")
done
t0=$(date +%s.%N)
s=$(h late sync "$repo_ref" --json)
t1=$(date +%s.%N)
echo "(the node that pulled only registration 1, syncing over 5 missed: $(mib "$(echo "$s" | j "d['bytes']")") in $(python3 -c "print(f'{$t1-$t0:.2f}')") s)"

st=$(h storage stats --json)
{
  echo "{\"set\": \"$set\", \"registrations\": ["
  (IFS=,; echo "${rows[*]}")
  echo "], \"catch_up\": ["
  (IFS=,; echo "${catch[*]}")
  echo "], \"stats\": $st}"
} > "$out"
echo
echo "hoard of the storage node: $(mib "$(echo "$st" | j "d['pack_bytes'] + d['index_bytes']")") for $(mib "$(echo "$st" | j "d['logical_bytes']")") of cache data; per-registration figures in $out (tools/hoard-sim.py reads them)"
