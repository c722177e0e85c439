#!/usr/bin/env python3
"""A bounded kill -9 campaign against vmicache's write paths (issue #9): crash a process at a
random moment, over and over, and count what a crash may never leave behind.

  warm   `warm --full --jobs 4` killed at random; then `check` (only leaks allowed),
         `check --repair leaks` (must end clean), `warm --full` again to completion (the
         continuation must leave an image qemu-img check calls clean) and the cache must read
         as its base (`qemu-img compare`).
  serve  `vmicache serve` of an instance while qemu-io writes over NBD to distinct regions,
         each write followed by a flush, killed at random; then the instance must check with
         at most leaks, every write whose flush completed must read back, the one write in
         flight reads as old or new data (nothing else), untouched bytes read as the base.

Usage: tools/crash-campaign.py [--binary target/release/vmicache] [--seconds 120]
                               [--only warm|serve] [--keep]
Prints one line per scenario with its counts and exits 1 if any corruption, mismatch or leak
after continuation was seen. Bounded in time; everything in a scratch directory.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def qemu_check(img):
    """(corruptions, leaks, check_errors) as qemu-img counts them."""
    r = sh("qemu-img", "check", "--output=json", img, check=False)
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        return (1, 0, 1)
    return (j.get("corruptions", 0), j.get("leaks", 0), j.get("check-errors", 0))


def make_base(path, size, seed):
    """A raw base with scattered data and holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(48):
            ln = rnd.randrange(4096, 1 * MIB)
            off = rnd.randrange(0, size - ln)
            f.seek(off)
            f.write(rnd.randbytes(ln))


class Counts:
    def __init__(self, name):
        self.name = name
        self.iterations = 0
        self.corruptions = 0
        self.mismatches = 0
        self.leaks_after_continuation = 0
        self.leaky_crashes = 0
        self.mid_work = 0

    def line(self):
        return (f"{self.name}: {self.iterations} iterations ({self.mid_work} killed mid-work), "
                f"{self.corruptions} corruptions, "
                f"{self.mismatches} mismatches, {self.leaks_after_continuation} leaks after "
                f"continuation ({self.leaky_crashes} crashes left leaks, all reclaimed)")

    def bad(self):
        return self.corruptions + self.mismatches + self.leaks_after_continuation


def kill_at_random(proc, lo, hi):
    """SIGKILL `proc` after a random delay; True if it was still at work."""
    time.sleep(random.uniform(lo, hi))
    alive = proc.poll() is None
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


# How long an uninterrupted run takes, by (scenario, cluster size): kills fall inside it.
WINDOW = {}


def timed_or_killed(key, proc, lo, done_check=None):
    """The first run of `key` runs to the end and is timed; later ones are killed at a
    random moment inside that time. Returns True if the process was killed at work."""
    if key not in WINDOW:
        t0 = time.time()
        while proc.poll() is None and (done_check is None or not done_check()):
            time.sleep(0.005)
        WINDOW[key] = max(time.time() - t0, lo)
    return kill_at_random(proc, lo, WINDOW[key])


def warm_round(b, d, base, c, rnd):
    cache = os.path.join(d, "c.qcow2")
    if os.path.exists(cache):
        os.unlink(cache)
    cs = rnd.choice(["512", "4K", "64K"])
    quota = rnd.choice(["8M", "24M", "0"])
    args = [b, "build", base, "-o", cache, "-q", "--cluster-size", cs]
    if quota != "0":
        args += ["--quota", quota]
    sh(*args)
    p = subprocess.Popen([b, "warm", cache, "--full", "-q", "--jobs", "4"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c.mid_work += timed_or_killed(("warm", cs, quota), p, 0.0)
    c.iterations += 1
    corrupt, leaks, errs = qemu_check(cache)
    if corrupt or errs:
        c.corruptions += 1
        return f"warm crash left corruption ({cs}, quota {quota})"
    ours = sh(b, "check", cache, check=False)
    if ours.returncode not in (0, 3):
        c.corruptions += 1
        return f"vmicache check after crash: exit {ours.returncode}: {ours.stderr.strip()}"
    if leaks or ours.returncode == 3:
        c.leaky_crashes += 1
    sh(b, "check", "--repair", "leaks", cache, check=False)
    if qemu_check(cache) != (0, 0, 0) or sh(b, "check", cache, check=False).returncode != 0:
        c.corruptions += 1
        return "not clean after --repair leaks"
    sh(b, "warm", cache, "--full", "-q")
    if qemu_check(cache) != (0, 0, 0):
        c.leaks_after_continuation += 1
        return f"continuation left {qemu_check(cache)} ({cs}, quota {quota})"
    if sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", cache, base,
          check=False).returncode != 0:
        c.mismatches += 1
        return "cache does not read as its base"
    return None


def serve_round(b, d, base, c, rnd):
    cache = os.path.join(d, "s-cache.qcow2")
    inst = os.path.join(d, "s-inst.qcow2")
    sock = os.path.join(d, "s.sock")
    for p in (cache, inst, sock):
        if os.path.exists(p):
            os.unlink(p)
    cs = rnd.choice(["4K", "64K"])
    sh(b, "build", base, "-o", cache, "-q", "--cluster-size", cs)
    sh(b, "chain", cache, "-o", inst, "-q")
    srv = subprocess.Popen([b, "serve", inst, "--socket", sock, "-q"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not os.path.exists(sock) and time.time() - t0 < 10:
        time.sleep(0.01)
    # Distinct regions of 256 KiB; a write of random length at a random offset inside each.
    size = os.path.getsize(base)
    regions = list(range(size // (256 << 10)))
    rnd.shuffle(regions)
    plan = []
    for k, r in enumerate(regions[:200]):
        ln = rnd.randrange(1, 200 << 10)
        off = r * (256 << 10) + rnd.randrange(0, (256 << 10) - ln)
        plan.append((off, ln, k % 250 + 1))
    cmds = []
    for off, ln, pat in plan:
        cmds += ["-c", f"write -P {pat} {off} {ln}", "-c", "flush"]
    w = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///?socket={sock}"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    c.mid_work += timed_or_killed(("serve", cs), srv, 0.02, lambda: w.poll() is not None) and w.poll() is None
    out, _ = w.communicate(timeout=60)
    c.iterations += 1
    done = len(re.findall(r"^wrote ", out, re.M))
    corrupt, leaks, errs = qemu_check(inst)
    if corrupt or errs:
        c.corruptions += 1
        return f"serve crash left corruption in the instance ({cs})"
    if leaks:
        c.leaky_crashes += 1
    with open(base, "rb") as f:
        want = bytearray(f.read())
    raw = os.path.join(d, "s-inst.raw")
    sh("qemu-img", "convert", "-U", "-O", "raw", inst, raw)
    with open(raw, "rb") as f:
        got = f.read()
    os.unlink(raw)
    # Writes 0..done-2 were each followed by a completed flush (qemu-io runs in order);
    # write done-1 may or may not have been flushed; later ones were never acknowledged.
    for i, (off, ln, pat) in enumerate(plan):
        old = bytes(want[off:off + ln])
        new = bytes([pat]) * ln
        have = got[off:off + ln]
        if i < done - 1:
            ok = have == new
        elif i <= done:
            # Acknowledged but maybe not flushed, or in flight: every byte old or new.
            ok = all(h in (o, pat) for h, o in zip(have, old))
        else:
            ok = have == old
        if not ok:
            c.mismatches += 1
            return f"write {i}/{done} at {off}+{ln} reads wrong after the crash ({cs})"
        want[off:off + ln] = have
    if got != bytes(want):
        c.mismatches += 1
        return "bytes outside the written regions changed"
    sh(b, "check", "--repair", "leaks", inst, check=False)
    if qemu_check(inst) != (0, 0, 0):
        c.corruptions += 1
        return "instance not clean after --repair leaks"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="target/release/vmicache")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--only", choices=["warm", "serve"])
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()
    b = os.path.abspath(a.binary)
    rnd = random.Random(a.seed)
    random.seed(a.seed)
    d = tempfile.mkdtemp(prefix="vmicache-crash-")
    base = os.path.join(d, "base.raw")
    make_base(base, 64 * MIB, a.seed)
    scenarios = [("warm", warm_round), ("serve", serve_round)]
    if a.only:
        scenarios = [s for s in scenarios if s[0] == a.only]
    counts = {n: Counts(n) for n, _ in scenarios}
    end = time.time() + a.seconds
    failures = []
    print(f"crash campaign: seed {a.seed}, {a.seconds:.0f} s, scratch {d}", flush=True)
    while time.time() < end:
        for name, fn in scenarios:
            why = fn(b, d, base, counts[name], rnd)
            if why:
                keep = os.path.join(d, f"failure-{len(failures)}")
                os.makedirs(keep)
                for f in os.listdir(d):
                    if f.endswith(".qcow2"):
                        shutil.copy(os.path.join(d, f), keep)
                failures.append(f"{name} #{counts[name].iterations}: {why} (images in {keep})")
                print("  " + failures[-1], flush=True)
    for n in counts.values():
        print(n.line())
    bad = sum(n.bad() for n in counts.values())
    if not a.keep and not failures:
        shutil.rmtree(d, ignore_errors=True)
    print(f"crash campaign: {'FAILED' if bad else 'ok'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
