#!/usr/bin/env python3
"""Write a large, fragmented qcow2 image quickly, for benchmarks.

  mkbench-image.py OUT.qcow2 --size 16G --clusters 120000 [--backing base.raw] [--seed 1]

Allocates CLUSTERS data clusters at random guest positions, in random order (so neighbouring
guest clusters are not neighbours in the file), 64 KiB clusters, 16-bit refcounts. Data
clusters are holes in a sparse file except for a 512-byte stamp at the start of each, so the
image costs little disk while its metadata is as large as a real one's. `qemu-img check`
must call the result clean (the bench script verifies).
"""
import argparse
import random
import struct

CS = 65536


def size_arg(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--size", type=size_arg, default=16 << 30)
    ap.add_argument("--clusters", type=int, default=120000)
    ap.add_argument("--backing")
    ap.add_argument("--backing-format", default="raw")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    rnd = random.Random(a.seed)
    guest_clusters = a.size // CS
    l2_entries = CS // 8
    l1_size = -(-guest_clusters // l2_entries)
    chosen = rnd.sample(range(guest_clusters), a.clusters)

    per_block = CS * 8 // 16
    # Upper bound of clusters: header, reftable, refblocks, L1, L2s, data.
    n_rb = -(-(a.clusters + l1_size + 64) // per_block) + 1
    rt_clusters = max(1, -(-(n_rb * 8) // CS))
    l1_clusters = -(-(l1_size * 8) // CS)
    next_free = 1 + rt_clusters + n_rb + l1_clusters
    rt_off = CS
    rb_off = rt_off + rt_clusters * CS
    l1_off = rb_off + n_rb * CS

    l1 = [0] * l1_size
    l2 = {}
    data_offsets = []
    for g in chosen:
        i1, i2 = divmod(g, l2_entries)
        if l1[i1] == 0:
            l1[i1] = next_free * CS
            l2[i1] = [0] * l2_entries
            next_free += 1
        l2[i1][i2] = (next_free * CS) | (1 << 63)
        data_offsets.append((next_free * CS, g))
        next_free += 1
    total = next_free
    assert total <= n_rb * per_block

    with open(a.out, "wb") as f:
        f.truncate(total * CS)
        hdr = bytearray(112)
        struct.pack_into(">IIQIIQIIQQIIQQQQII", hdr, 0,
                         0x514649FB, 3, 0, 0, 16, a.size, 0, l1_size, l1_off,
                         rt_off, rt_clusters, 0, 0, 0, 0, 0, 4, 112)
        ext = b""
        if a.backing:
            fmt = a.backing_format.encode()
            ext += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
        ext += b"\0" * 8
        if a.backing:
            name = a.backing.encode()
            struct.pack_into(">QI", hdr, 8, 112 + len(ext), len(name))
            ext += name
        f.seek(0)
        f.write(hdr + ext)
        f.seek(rt_off)
        f.write(b"".join(struct.pack(">Q", rb_off + i * CS) for i in range(n_rb)))
        refs = bytearray(n_rb * CS)
        for c in range(total):
            struct.pack_into(">H", refs, 2 * c, 1)
        f.seek(rb_off)
        f.write(refs)
        f.seek(l1_off)
        f.write(b"".join(struct.pack(">Q", (o | (1 << 63)) if o else 0) for o in l1))
        for i1, t in l2.items():
            f.seek(l1[i1])
            f.write(b"".join(struct.pack(">Q", e) for e in t))
        for off, g in data_offsets:
            f.seek(off)
            f.write(struct.pack(">Q", g) * 64)


if __name__ == "__main__":
    main()
