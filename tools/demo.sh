#!/usr/bin/env bash
# The README's first command: install vmicache and run the main job on an embedded default.
# Builds a sample base image, a cache over it and a VM instance over the cache, and shows
# what each layer holds.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/deps.sh
cargo install --quiet --path . --root target/install
export PATH="$PWD/target/install/bin:$PATH"

dir=${VMICACHE_DEMO_DIR:-target/demo}
rm -rf "$dir" && mkdir -p "$dir"
cd "$dir"

echo "== a 2 GiB sparse base image with 64 MiB of data in 16 extents"
truncate -s 2G base.raw
for i in $(seq 0 15); do
  head -c 4M /dev/urandom | dd of=base.raw bs=1M seek=$((i * 128)) conv=notrunc status=none
done

echo "== vmicache build: an empty cache layer bound to the base"
vmicache build base.raw -o cache.qcow2 --quota 1G
echo "== vmicache chain: a per-VM copy-on-write instance over the cache"
vmicache chain cache.qcow2 -o vm1.qcow2
echo "== vmicache inspect vm1.qcow2"
vmicache inspect vm1.qcow2
echo "== vmicache check (and qemu-img's opinion)"
vmicache check cache.qcow2
qemu-img check cache.qcow2
echo "== the chain as QEMU sees it"
qemu-img info --backing-chain vm1.qcow2 | grep -E '^(image|backing file|virtual size)'
qemu-img compare vm1.qcow2 base.raw
