#!/usr/bin/env bash
# The README's first command: install vmicache and run the main job on an embedded default.
#
# Builds a small Linux guest from Debian packages (images/build.sh minimal, cached), puts a
# cache layer over its base image, records a first boot under QEMU through `vmicache serve`
# (copy-on-read fills the cache, the cache is sealed), then boots a new VM instance from the
# sealed cache and shows, with nbdkit's log as the witness, that it read nothing from the base;
# then adds the cache to a hoard (deduplicated, compressed) and boots a third VM from there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tools/deps.sh --boot
cargo install --quiet --locked --path . --root target/install
export PATH="$repo/target/install/bin:$PATH"
echo "== building the test guest (cached under target/images)"
images/build.sh minimal
base=${VMICACHE_IMAGES:-$repo/target/images}/minimal/base.raw
# The cache (in the demo's directory) names the base in the guest's directory: allow it
# (backing files must otherwise lie beside or below the image that names them).
export VMICACHE_ALLOW_BACKING=$(dirname "$base")

dir=${VMICACHE_DEMO_DIR:-$repo/target/demo}
rm -rf "$dir" && mkdir -p "$dir"
cd "$dir"
kit=""
srv=""
cleanup() { for p in $srv $kit; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
bytes_read() { python3 -c "import re,sys; print(sum(int(m,16) for m in re.findall(r' Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)', open(sys.argv[1]).read())))" "$1"; }

echo "== the base is served by a storage node (nbdkit, logging every read)"
nbdkit -r -f -U "$dir/base.sock" --filter=log file "$base" logfile="$dir/base-reads.log" & kit=$!
while [ ! -S "$dir/base.sock" ]; do sleep 0.05; done

echo "== vmicache build: an empty cache layer bound to the base"
vmicache build "$base" -o cache.qcow2
vmicache chain cache.qcow2 -o vm1.qcow2 -q          # the VM we boot later
qemu-img rebase -u -b "nbd+unix:///?socket=$dir/base.sock" -F raw cache.qcow2
: > base-reads.log

echo "== vmicache warm --boot: the recorded first boot (QEMU, TCG)"
vmicache warm cache.qcow2 --boot -- sh -c '"$0" minimal "$1" raw > console1.log 2> boot1.log' \
  "$repo/images/boot.sh" '{nbd}'
boot1=$(sed -n 's/.*marker after \([0-9.]*\) s.*/\1/p' boot1.log)
read1=$(bytes_read base-reads.log)
: > base-reads.log

# boot_served VM N: serve VM.qcow2, boot it (console N), set bootN (seconds) and readN (base
# bytes read meanwhile)
boot_served() {
  : > base-reads.log
  vmicache serve "$1.qcow2" --socket "$dir/$1.sock" -q & srv=$!
  while [ ! -S "$dir/$1.sock" ]; do sleep 0.05; done
  "$repo/images/boot.sh" minimal "nbd+unix:///$1?socket=$dir/$1.sock" raw > "console$2.log" 2> "boot$2.log"
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=""
  local secs bytes
  secs=$(sed -n 's/.*marker after \([0-9.]*\) s.*/\1/p' "boot$2.log")
  bytes=$(bytes_read base-reads.log)
  printf -v "boot$2" '%s' "$secs"
  printf -v "read$2" '%s' "$bytes"
}

echo "== second boot: a new VM instance on the sealed cache"
boot_served vm1 2

echo "== the hoard: the sealed cache added to a deduplicated, compressed store, a VM booted from it"
export VMICACHE_HOARD=$dir/hoard VMICACHE_ALLOW_BACKING=$VMICACHE_ALLOW_BACKING:$dir
vmicache hoard init "$VMICACHE_HOARD" -q
vmicache hoard add cache.qcow2 --name minimal
vmicache chain hoard:minimal -o vm2.qcow2 -q
boot_served vm2 3
hoarded=$(vmicache hoard stats --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["pack_bytes"] + d["index_bytes"])')

echo "== vmicache inspect vm1.qcow2"
vmicache inspect vm1.qcow2
ws=$(vmicache inspect --json cache.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["allocated-bytes"])')
python3 - "$(stat -c %s "$base")" "$ws" "$read1" "$read2" "$boot1" "$boot2" "$read3" "$boot3" "$hoarded" <<'PY'
import sys
vs, ws, r1, r2 = (int(x) for x in sys.argv[1:5])
b1, b2 = sys.argv[5], sys.argv[6]
r3, b3, h = int(sys.argv[7]), sys.argv[8], int(sys.argv[9])
mib = lambda n: f"{n / 2**20:.1f} MiB"
print()
print(f"base image:         {mib(vs)} virtual")
print(f"cache (working set): {mib(ws)} = {100 * ws / vs:.1f}% of the base")
print(f"boot 1 (recorded):  read {mib(r1)} from the base, marker after {b1} s")
print(f"boot 2 (from cache): read {mib(r2)} from the base, marker after {b2} s")
print(f"boot 3 (from hoard): read {mib(r3)} from the base, marker after {b3} s; the hoard holds the cache in {mib(h)}")
PY
