#!/usr/bin/env bash
# Benchmarks of the copy-on-read hot paths against their QEMU peers, same data, same run.
# Prints times/throughputs and ratios (above 1 = vmicache faster). Not a test.
#
#   tools/bench-serve.sh [--runs N]
#
# Data: a 4 GiB virtual raw base with ~1 GiB of data in 400 extents (half random bytes, half
# text), 64 KiB clusters; a trace of 10k 64 KiB reads over its allocated clusters.
#  1. warm --trace      vs  qemu-io -C replaying the same reads into a qcow2 overlay
#  2. serve (cold, CoR) vs  qemu-nbd --image-opts driver=copy-on-read over the same cache,
#                           client: nbdcopy 'nbd+unix:///?socket=S' null:
#  3. serve (warm)      vs  qemu-nbd -r, client nbdcopy -C 1; and qemu-img bench 64 KiB
#                           random reads at queue depth 16
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
[ "${1:-}" = "--runs" ] && runs=$2
tools/deps.sh
cargo build --release --quiet
V=$PWD/target/release/vmicache
dir=$PWD/target/bench/serve
mkdir -p "$dir"
cd "$dir"

if [ ! -f base.raw ]; then
  echo "creating the 4 GiB base with ~1 GiB of data ..."
  python3 - <<'PY'
import random
r = random.Random(42)
words = b"the quick brown fox jumps over the lazy dog boot kernel module systemd unit cache ".split()
with open("base.raw", "wb") as f:
    f.truncate(4 << 30)
    slots = sorted(r.sample(range(1600), 400))      # 400 extents in 2.5 MiB slots
    for i, s in enumerate(slots):
        n = r.randrange(1 << 20, 4 << 20) // 65536 * 65536
        if i % 2:
            data = r.randbytes(n)
        else:
            line = b" ".join(r.choice(words) for _ in range(4000)) + b"\n"
            data = (line * (n // len(line) + 1))[:n]
        f.seek(s * (4 << 30) // 1600 // 65536 * 65536)
        f.write(data)
PY
fi

fresh_cache() { rm -f "$1"; "$V" build base.raw -o "$1" -q; }
fresh_cache probe.qcow2
fp=$("$V" inspect --json probe.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)["cache"]["base"]["fingerprint"])')
python3 - "$fp" <<'PY'
import os, random, struct, sys
fp = bytes.fromhex(sys.argv[1])
r = random.Random(7)
# allocated 64 KiB clusters of the base
fd = os.open("base.raw", os.O_RDONLY)
size = os.fstat(fd).st_size
clusters, off = [], 0
while True:
    try:
        s = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        break
    e = os.lseek(fd, s, os.SEEK_HOLE)
    clusters.extend(range(s // 65536, (e + 65535) // 65536))
    off = e
reads = [(c * 65536, 65536) for c in r.sample(clusters, 10000)]
def varint(v):
    out = bytearray()
    while True:
        b = v & 0x7f; v >>= 7
        if v: out.append(b | 0x80)
        else:
            out.append(b); return bytes(out)
out = bytearray(b"VMITRACE" + struct.pack(">II", 1, 0) + struct.pack(">Q", size) + fp + struct.pack(">Q", len(reads)))
prev = 0
for o, l in reads:
    d = o - prev
    out += varint(((d << 1) ^ (d >> 63)) & (2**64 - 1)) + varint(l)
    prev = o + l
open("boot.trace", "wb").write(out)
open("qemu-io.cmds", "w").write("".join(f"read -q {o} {l}\n" for o, l in reads))
PY

# Each timed run starts with no dirty pages left over from the previous one.
t() { sync; python3 -c 'import subprocess,sys,time; t=time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(f"{time.perf_counter()-t:.3f}")' "$@"; }
best() { local b=""; for _ in $(seq "$runs"); do local x; x=$("$@"); if [ -z "$b" ] || python3 -c "import sys; sys.exit(0 if $x < $b else 1)"; then b=$x; fi; done; echo "$b"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }

echo "== 1. warm --trace (10k x 64 KiB reads) vs qemu-io -C"
w_ours() { fresh_cache c1.qcow2; t "$V" warm c1.qcow2 --trace boot.trace -q; }
w_qemu() { rm -f q1.qcow2; qemu-img create -q -f qcow2 -b base.raw -F raw q1.qcow2; sync; python3 -c 'import subprocess,time,sys; f=open("qemu-io.cmds"); t=time.perf_counter(); subprocess.run(["qemu-io","-C","-f","qcow2","q1.qcow2"], stdin=f, check=True, stdout=subprocess.DEVNULL); print(f"{time.perf_counter()-t:.3f}")'; }
to=$(best w_ours); tq=$(best w_qemu)
echo "   vmicache warm: ${to}s   qemu-io -C: ${tq}s   ratio $(ratio "$tq" "$to")"
qemu-img check -q c1.qcow2
echo "   cache holds: $("$V" inspect --json c1.qcow2 | python3 -c 'import json,sys; l=json.load(sys.stdin)["layers"][0]; print(l["data-clusters"], "data,", l["zero-clusters"], "zero clusters")') (qemu-io -C: $(qemu-img map --output=json q1.qcow2 | grep -c '"depth": 0, "present": true') extents)"

echo "== 2. serve copy-on-read (cold cache) vs qemu-nbd copy-on-read filter, nbdcopy to null:"
sock=$dir/s.sock
s_ours() {
  fresh_cache c2.qcow2; rm -f i2.qcow2; "$V" chain c2.qcow2 -o i2.qcow2 -q
  "$V" serve i2.qcow2 --socket "$sock" -q & local pid=$!
  while [ ! -S "$sock" ]; do sleep 0.02; done
  t nbdcopy "nbd+unix:///i2?socket=$sock" null:
  kill $pid; wait $pid
}
s_qemu() {
  rm -f q2.qcow2; qemu-img create -q -f qcow2 -b base.raw -F raw q2.qcow2
  qemu-nbd -k "$sock" --image-opts driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=q2.qcow2 & local pid=$!
  while [ ! -S "$sock" ]; do sleep 0.02; done
  t nbdcopy "nbd+unix:///?socket=$sock" null:
  kill $pid; wait $pid 2>/dev/null || true
}
to=$(best s_ours); tq=$(best s_qemu)
echo "   vmicache serve: ${to}s ($(python3 -c "print(f'{4096/$to:.0f}')") MiB/s)   qemu-nbd CoR: ${tq}s ($(python3 -c "print(f'{4096/$tq:.0f}')") MiB/s)   ratio $(ratio "$tq" "$to")"

echo "== 3. serve on a warm chain vs qemu-nbd -r"
rm -f c3.qcow2 i3.qcow2; fresh_cache c3.qcow2; "$V" warm c3.qcow2 --full -q; "$V" seal c3.qcow2 -q; "$V" chain c3.qcow2 -o i3.qcow2 -q
"$V" serve i3.qcow2 --socket "$sock" -q & pid=$!
while [ ! -S "$sock" ]; do sleep 0.02; done
to=$(best t nbdcopy -C 1 "nbd+unix:///i3?socket=$sock" null:)
bo=$(best t qemu-img bench -f raw -c 20000 -d 16 -s 65536 -S 196608 "nbd+unix:///i3?socket=$sock")
kill $pid; wait $pid
qemu-nbd -t -r -k "$sock" -f qcow2 i3.qcow2 & pid=$!
while [ ! -S "$sock" ]; do sleep 0.02; done
tq=$(best t nbdcopy -C 1 "nbd+unix:///?socket=$sock" null:)
bq=$(best t qemu-img bench -f raw -c 20000 -d 16 -s 65536 -S 196608 "nbd+unix:///?socket=$sock")
kill $pid; wait $pid 2>/dev/null || true
echo "   nbdcopy -C 1: vmicache ${to}s ($(python3 -c "print(f'{4096/$to:.0f}')") MiB/s)  qemu-nbd -r ${tq}s  ratio $(ratio "$tq" "$to")"
echo "   qemu-img bench 64 KiB QD16 x20000: vmicache ${bo}s ($(python3 -c "print(f'{20000/$bo:.0f}')") req/s)  qemu-nbd ${bq}s ($(python3 -c "print(f'{20000/$bq:.0f}')") req/s)  ratio $(ratio "$bq" "$bo")"
