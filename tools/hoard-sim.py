#!/usr/bin/env python3
"""Extrapolate the hoard to many images (Squirrel's Figure 15 style) from measured figures.

Reads the per-registration figures that tools/bench-hoard-sync.sh writes (one guest set, JSON)
and prints, for N images, the hoard's size on every node, what one registration moves, what a
node that missed k registrations pulls, and a server's index memory.

The model, stated:
  - Images come in families like the measured set: one base image, F-1 images derived from it
    by installing packages (F = the set's size, 6, unless --family). The first image of a family
    costs what the set's first registration stored (its whole working set, compressed, minus
    nothing: a conservative "new family shares no chunk with the others"); each derived image
    costs the mean of what the set's later registrations stored (their new chunks only).
  - Every image adds one index (the mean index size of the set) to every node.
  - A registration moves, as a stream or pulled from the registry, what it stored plus its
    index; a node that missed k registrations pulls the sum of theirs.
  - A server keeps in memory the index runs and frame tables of the caches it serves, and
    where each cache uses each frame once it is read in guest order; the measured bytes per
    unique chunk in memory (`hoard stats`, all of these counted) times the unique chunks of
    the images served bounds it (all N images served at once is the worst case printed).
Nothing else is assumed: no cross-family sharing (real fleets share more: the independent set
of the benchmarks shares 79% of its 4 KiB blocks), no repack (gc --recompress stores ~10% less).

Usage: tools/hoard-sim.py [FILE] [--family F] [--sizes 100,607,1000,5000] [--json]
"""
import argparse
import json
import statistics
import sys

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", default="target/bench/sync/registrations.json")
    ap.add_argument("--family", type=int, default=0)
    ap.add_argument("--sizes", default="100,607,1000,5000")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    d = json.load(open(a.file))
    regs = d["registrations"]
    if len(regs) < 2:
        sys.exit("need at least two registrations")
    fam = a.family or len(regs)
    first = regs[0]["new_pack_bytes"]
    derived = statistics.mean(r["new_pack_bytes"] for r in regs[1:])
    index = regs[-1]["index_bytes_total"] / len(regs)
    data = statistics.mean(r["data_bytes"] for r in regs)
    moved_first = regs[0]["pulled_bytes"]
    moved = statistics.mean(r["pulled_bytes"] for r in regs[1:])
    st = d["stats"]
    mem_chunk = st["memory_per_chunk"]
    chunks_per_byte = st["stored_chunks"] / max(st["pack_bytes"], 1)
    out = []
    for n in [int(x) for x in a.sizes.split(",")]:
        families = -(-n // fam)
        size = families * first + (n - families) * derived + n * index
        per_reg = (moved_first + moved * (fam - 1)) / fam
        unique_chunks = size * chunks_per_byte
        out.append({
            "images": n,
            "hoard_bytes": int(size),
            "cache_data_bytes": int(n * data),
            "per_registration_bytes": int(per_reg),
            "catch_up_10_bytes": int(10 * per_reg),
            "index_memory_bytes": int(unique_chunks * mem_chunk),
        })
    if a.json:
        print(json.dumps({"model": {"family": fam, "first_bytes": first, "derived_bytes": derived,
                                    "index_bytes": index, "moved_first": moved_first,
                                    "moved_derived": moved, "memory_per_chunk": mem_chunk},
                          "sizes": out}, indent=2))
        return
    print(f"model from {a.file} ({d['set']} set): families of {fam}; a family's first image "
          f"stores {first / MIB:.1f} MiB, each derived one {derived / MIB:.2f} MiB, an index "
          f"{index / 1024:.1f} KiB; {mem_chunk:.1f} B of memory per unique chunk")
    print(f"{'images':>7} {'caches hold':>12} {'hoard per node':>15} {'per registration':>17} "
          f"{'catch-up after 10':>18} {'index memory':>13}")
    for r in out:
        print(f"{r['images']:>7} {r['cache_data_bytes'] / (1 << 30):>10.1f} G "
              f"{r['hoard_bytes'] / (1 << 30):>13.2f} G {r['per_registration_bytes'] / MIB:>15.1f} M "
              f"{r['catch_up_10_bytes'] / MIB:>16.1f} M {r['index_memory_bytes'] / MIB:>11.1f} M")


if __name__ == "__main__":
    main()
