#!/usr/bin/env bash
# Benchmarks of the serving hot paths against their QEMU peers, same data, same run. Prints
# medians of N runs and ratios (peer time / our time: above 1 = vmicache faster). Not a test.
#
#   tools/bench-serve.sh [--runs N] [--before BIN] [--no-rss]
#
# --before BIN  also time another vmicache binary (e.g. the previous release) in the same
#               run: its column and its ratio are printed next to ours.
#
# Data: a 4 GiB virtual raw base with ~1 GiB of data in 400 extents (half random bytes, half
# text), 64 KiB clusters; a trace of 10k 64 KiB reads over its allocated clusters.
#  1. warm --trace      vs  qemu-io -C replaying the same reads into a qcow2 overlay
#  2. serve (cold, CoR) vs  qemu-nbd --image-opts driver=copy-on-read over the same cache,
#                           client: nbdcopy 'nbd+unix:///?socket=S' null:
#  3. serve (warm)      vs  qemu-nbd -r, client nbdcopy -C 1; and qemu-img bench 64 KiB
#                           reads at queue depth 16 (its own "Run completed" time, which
#                           leaves out starting qemu-img and connecting)
#  4. resident memory of `vmicache serve` idle and at the end of a full sequential read
#     (nbdcopy) of a 64 GiB virtual sealed chain holding 3 GiB of data (peak: VmHWM)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
before=""
rss=1
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift 2 ;;
    --before) before=$(realpath "$2"); shift 2 ;;
    --no-rss) rss=0; shift ;;
    *) echo "usage: $0 [--runs N] [--before BIN] [--no-rss]" >&2; exit 2 ;;
  esac
done
tools/deps.sh
cargo build --release --quiet
V=$PWD/target/release/vmicache
export VMICACHE_ALLOW_BACKING=$PWD/target/bench/serve
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

fresh_cache() { rm -f "$2"; "$1" build base.raw -o "$2" -q; }
fresh_cache "$V" probe.qcow2
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
# qemu-img bench's own time for its requests.
qb() { sync; qemu-img bench "$@" | sed -n 's/^Run completed in \(.*\) seconds\./\1/p'; }
t() { sync; python3 -c 'import subprocess,sys,time; t=time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(f"{time.perf_counter()-t:.3f}")' "$@"; }
median() { local xs=(); for _ in $(seq "$runs"); do xs+=("$("$@")"); done; med "${xs[@]}"; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# Interleaved: run k of every contender before run k+1 of any (no contender gets the page
# cache or a quiet spell the others did not). Contenders: our binaries, then the peer; each
# contender's times land in T_<index>. Usage: interleave FN_OURS FN_PEER (FN_OURS gets the
# binary as its argument).
interleave() {
  local fo=$1 fq=$2 k i
  for i in $(seq 0 ${#bins[@]}); do eval "T_$i=()"; done
  for k in $(seq "$runs"); do
    for i in "${!bins[@]}"; do eval "T_$i+=(\"\$($fo \"\${bins[$i]}\")\")"; done
    eval "T_${#bins[@]}+=(\"\$($fq)\")"
  done
}
ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }
mibs() { python3 -c "print(f'{$1/$2:.0f}')"; }
# The binaries timed: ours, and the one given with --before.
bins=("$V"); names=("vmicache")
[ -n "$before" ] && { bins+=("$before"); names+=("before"); }
sock=$dir/s.sock
serve_up() { "$@" & pid=$!; while [ ! -S "$sock" ]; do sleep 0.02; done; }
serve_down() { kill "$pid"; wait "$pid" 2>/dev/null || true; rm -f "$sock"; }
report() { # label peer-name peer-time ours... (one per binary)
  local label=$1 pname=$2 tp=$3; shift 3
  local line="   $label: $pname ${tp}s"
  local i=0
  for to in "$@"; do line+="   ${names[$i]} ${to}s (ratio $(ratio "$tp" "$to"))"; i=$((i+1)); done
  echo "$line"
}

echo "== 1. warm --trace (10k x 64 KiB reads) vs qemu-io -C  [median of $runs]"
w_ours() { fresh_cache "$1" c1.qcow2; t "$1" warm c1.qcow2 --trace boot.trace -q; }
w_qemu() { rm -f q1.qcow2; qemu-img create -q -f qcow2 -b base.raw -F raw q1.qcow2; sync; python3 -c 'import subprocess,time,sys; f=open("qemu-io.cmds"); t=time.perf_counter(); subprocess.run(["qemu-io","-C","-f","qcow2","q1.qcow2"], stdin=f, check=True, stdout=subprocess.DEVNULL); print(f"{time.perf_counter()-t:.3f}")'; }
interleave w_ours w_qemu
ts=(); for i in "${!bins[@]}"; do eval "ts+=(\$(med \"\${T_$i[@]}\"))"; done
eval "tq=\$(med \"\${T_${#bins[@]}[@]}\")"
report "warm" "qemu-io -C" "$tq" "${ts[@]}"
qemu-img check -q c1.qcow2

echo "== 2. serve copy-on-read (cold cache) vs qemu-nbd copy-on-read filter, nbdcopy to null:"
s_ours() {
  fresh_cache "$1" c2.qcow2; rm -f i2.qcow2; "$1" chain c2.qcow2 -o i2.qcow2 -q
  serve_up "$1" serve i2.qcow2 --socket "$sock" -q
  t nbdcopy "nbd+unix:///i2?socket=$sock" null:
  serve_down
}
s_qemu() {
  rm -f q2.qcow2; qemu-img create -q -f qcow2 -b base.raw -F raw q2.qcow2
  serve_up qemu-nbd -k "$sock" --image-opts driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=q2.qcow2
  t nbdcopy "nbd+unix:///?socket=$sock" null:
  serve_down
}
cat base.raw > /dev/null
interleave s_ours s_qemu
ts=(); for i in "${!bins[@]}"; do eval "ts+=(\$(med \"\${T_$i[@]}\"))"; done
eval "tq=\$(med \"\${T_${#bins[@]}[@]}\")"
report "4 GiB, CoR" "qemu-nbd CoR" "$tq" "${ts[@]}"
echo "   (MiB/s: qemu-nbd $(mibs 4096 "$tq"), vmicache $(mibs 4096 "${ts[0]}"))"

echo "== 3. serve on a warm chain vs qemu-nbd -r"
rm -f c3.qcow2 i3.qcow2; fresh_cache "$V" c3.qcow2; "$V" warm c3.qcow2 --full -q; "$V" seal c3.qcow2 -q; "$V" chain c3.qcow2 -o i3.qcow2 -q
# One server per contender and round: a sequential read, then the queue-depth run.
w3_ours() { serve_up "$1" serve i3.qcow2 --socket "$sock" -q; echo "$(t nbdcopy -C 1 "nbd+unix:///i3?socket=$sock" null:):$(qb -f raw -c 20000 -d 16 -s 65536 -S 196608 "nbd+unix:///i3?socket=$sock")"; serve_down; }
w3_qemu() { serve_up qemu-nbd -t -r -k "$sock" -f qcow2 i3.qcow2; echo "$(t nbdcopy -C 1 "nbd+unix:///?socket=$sock" null:):$(qb -f raw -c 20000 -d 16 -s 65536 -S 196608 "nbd+unix:///?socket=$sock")"; serve_down; }
cat c3.qcow2 > /dev/null
interleave w3_ours w3_qemu
col() { local i=$1 f=$2; eval "printf '%s\\n' \"\${T_$i[@]}\"" | cut -d: -f"$f"; }
seq_ours=(); qd_ours=()
for i in "${!bins[@]}"; do
  seq_ours+=("$(med $(col "$i" 1))"); qd_ours+=("$(med $(col "$i" 2))")
done
tq=$(med $(col "${#bins[@]}" 1)); bq=$(med $(col "${#bins[@]}" 2))
report "nbdcopy -C 1 (4 GiB)" "qemu-nbd -r" "$tq" "${seq_ours[@]}"
report "qemu-img bench 64 KiB QD16 x20000" "qemu-nbd" "$bq" "${qd_ours[@]}"
echo "   (req/s: qemu-nbd $(mibs 20000 "$bq"), vmicache $(mibs 20000 "${qd_ours[0]}"))"

[ "$rss" = 1 ] || exit 0
echo "== 4. resident memory of serve: 64 GiB virtual sealed chain with 3 GiB of data"
if [ ! -f big.raw ]; then
  echo "   creating the 64 GiB base with 3 GiB of data ..."
  python3 - <<'PY'
import random
r = random.Random(3)
with open("big.raw", "wb") as f:
    f.truncate(64 << 30)
    chunk = r.randbytes(8 << 20)
    for i in range(384):                       # 384 x 8 MiB spread over the disk
        f.seek(i * (64 << 30) // 384 // 65536 * 65536)
        f.write(chunk[: (8 << 20) - (i % 7) * 65536] if i % 2 else chunk)
PY
fi
if [ ! -f big-i.qcow2 ]; then
  rm -f big-c.qcow2; "$V" build big.raw -o big-c.qcow2 -q; "$V" warm big-c.qcow2 --full -q
  "$V" seal big-c.qcow2 -q; "$V" chain big-c.qcow2 -o big-i.qcow2 -q
fi
# The chain's files in the page cache before any binary is timed (the first would pay for it).
cat big-c.qcow2 big-i.qcow2 > /dev/null
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$pid/status"; }
for i in "${!bins[@]}"; do
  serve_up "${bins[$i]}" serve big-i.qcow2 --socket "$sock" -q
  sleep 0.5
  idle=$(kib VmRSS)
  tr=$(t nbdcopy -C 1 "nbd+unix:///big-i?socket=$sock" null:)
  peak=$(kib VmHWM); after=$(kib VmRSS)
  serve_down
  echo "   ${names[$i]}: idle $((idle / 1024)) MiB, peak during the read $((peak / 1024)) MiB, after $((after / 1024)) MiB (read ${tr}s)"
done
