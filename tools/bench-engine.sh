#!/usr/bin/env bash
# Benchmark: `vmicache inspect --map` and `vmicache check` against `qemu-img map` and
# `qemu-img check`, same images, same run. Prints times and ratios (qemu time / our time:
# above 1 means we are faster). Not a test: it asserts only that the outputs agree.
#
#   tools/bench-engine.sh [--runs N] [--clusters N]
#
# Image: 16 GiB virtual qcow2, 64 KiB clusters, N (default 120000) data clusters at random
# guest positions in random host order, over a 16 GiB sparse raw base with 1000 data extents.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=5
clusters=120000
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --clusters) clusters=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--clusters N]" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet
V=$PWD/target/release/vmicache
dir=target/bench/engine-$clusters
mkdir -p "$dir"
cd "$dir"
if [ ! -f top.qcow2 ]; then
  echo "creating bench images in $dir ..."
  rm -f base.raw
  truncate -s 16G base.raw
  python3 - <<'PY'
import random
r = random.Random(7)
with open("base.raw", "r+b") as f:
    for c in r.sample(range(16 * 1024 * 16), 1000):  # 64 KiB units
        f.seek(c * 65536)
        f.write(r.randbytes(65536))
PY
  python3 ../../../tools/mkbench-image.py top.qcow2 --size 16G --clusters "$clusters" --backing base.raw
fi
qemu-img check -q top.qcow2

# best-of-N wall time of a command, in seconds
best() {
  python3 - "$runs" "$@" <<'PY'
import subprocess, sys, time
runs, cmd = int(sys.argv[1]), sys.argv[2:]
best = None
for _ in range(runs):
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.perf_counter() - t
    best = t if best is None else min(best, t)
print(f"{best:.4f}")
PY
}

# Outputs must agree before times mean anything.
qemu-img map --output=json top.qcow2 > qemu-map.json
"$V" inspect top.qcow2 --map --json > our-map.json
if ! cmp -s qemu-map.json our-map.json; then
  echo "MAP OUTPUTS DIFFER (see $dir/qemu-map.json our-map.json)" >&2
  exit 1
fi
q=$(qemu-img check --output=json top.qcow2 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("corruptions",0), d.get("leaks",0), d.get("allocated-clusters",0))')
o=$("$V" check --json top.qcow2 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("corruptions",0), d.get("leaks",0), d.get("allocated-clusters",0))')
[ "$q" = "$o" ] || { echo "CHECK RESULTS DIFFER: qemu [$q] ours [$o]" >&2; exit 1; }

extents=$(grep -c '"start"' qemu-map.json)
echo "image: 16 GiB virtual, $clusters data clusters, $extents map extents; best of $runs runs"
printf '%-22s %10s %10s %8s\n' "operation" "qemu (s)" "ours (s)" "ratio"
row() {
  local name=$1 tq=$2 to=$3
  printf '%-22s %10.3f %10.3f %7.2fx\n' "$name" "$tq" "$to" "$(python3 -c "print($tq / $to)")"
}
row "map --output=json" "$(best qemu-img map --output=json top.qcow2)" "$(best "$V" inspect top.qcow2 --map --json)"
row "check" "$(best qemu-img check top.qcow2)" "$(best "$V" check top.qcow2)"
