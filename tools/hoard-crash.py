#!/usr/bin/env python3
"""A bounded kill -9 campaign against the hoard's writers (issues #12, #13): `hoard add`,
`hoard gc` and `hoard receive` (on a second hoard, a "node") killed at random moments, over
and over, and what a kill may never leave behind.

After every kill: `hoard verify` must find no damage (exit 0; unreferenced packs and
leftovers are allowed: gc takes them); every cache hoarded before the kill must still read as
its source (`hoard checkout` + `qemu-img compare`, one at random each round, all at the end);
a killed add has either landed whole (compares equal) or not at all; a killed receive leaves
the node at its previous generation or the new one, never between. Then the killed command
runs again to completion and verify must be clean again. Two adds started at once must both
land (the writers' lock serializes them).

Usage: tools/hoard-crash.py [--binary target/release/vmicache] [--kills 50] [--seconds 600]
                            [--keep]
Runs until `add`, `gc` and `receive` were each killed mid-work --kills times (or --seconds pass) and
prints one line per operation; exits 1 if anything above failed.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def make_base(path, size, seed, like=None):
    """A raw base: scattered random and text-like data; `like` shares most of it."""
    rnd = random.Random(seed)
    if like:
        shutil.copyfile(like, path)
    with open(path, "r+b" if like else "wb") as f:
        if not like:
            f.truncate(size)
        for _ in range(12 if like else 40):
            ln = rnd.randrange(4096, MIB)
            off = rnd.randrange(0, size - ln) // 4096 * 4096
            f.seek(off)
            if rnd.random() < 0.5:
                f.write(rnd.randbytes(ln))
            else:
                words = [b"boot", b"kernel", b"module", b"vmicache", b"hoard", b"\n"]
                out = bytearray()
                while len(out) < ln:
                    out += rnd.choice(words) + b" "
                f.write(bytes(out[:ln]))


class Counts:
    def __init__(self, name):
        self.name = name
        self.iterations = 0
        self.mid_work = 0
        self.landed = 0
        self.problems = 0

    def line(self):
        return (f"hoard {self.name}: {self.iterations} iterations ({self.mid_work} killed "
                f"mid-work, {self.landed} had landed whole), {self.problems} problems")


class Campaign:
    def __init__(self, b, d, rnd):
        self.b, self.d, self.rnd = b, d, rnd
        self.hoard = os.path.join(d, "hoard")
        self.node = os.path.join(d, "node")
        self.env = dict(os.environ, VMICACHE_HOARD=self.hoard, VMICACHE_ALLOW_BACKING=d,
                        VMICACHE_CONFIG=os.path.join(d, "none.yaml"))
        self.sources = {}  # cache file -> base
        self.hoarded = {}  # name -> cache file
        self.window = {}
        self.failures = []

    def v(self, *args, check=True):
        r = subprocess.run([self.b, *args], capture_output=True, text=True, env=self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"vmicache {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def fail(self, c, what):
        c.problems += 1
        self.failures.append(what)
        print(f"  FAIL: {what}", file=sys.stderr)

    def head(self, hoard):
        try:
            with open(os.path.join(hoard, "HEAD")) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def verify(self, c, when, hoard=None):
        r = self.v("hoard", "--hoard", hoard or self.hoard, "verify", "--json", check=False)
        if r.returncode != 0:
            self.fail(c, f"verify after {when}: exit {r.returncode}: {r.stdout[-600:]}{r.stderr[-600:]}")

    def listed(self):
        r = self.v("hoard", "list", "--json")
        return {x["name"] for x in json.loads(r.stdout)}

    def reads_as_source(self, c, name, when):
        out = os.path.join(self.d, "out.qcow2")
        for p in (out, out + ".trace"):
            if os.path.exists(p):
                os.unlink(p)
        r = self.v("hoard", "checkout", name, "-o", out, "-q", check=False)
        if r.returncode != 0:
            return self.fail(c, f"{name} after {when}: checkout: {r.stderr.strip()}")
        r = sh("qemu-img", "compare", "-U", "-q", self.hoarded[name], out, check=False)
        if r.returncode != 0:
            self.fail(c, f"{name} after {when}: does not read as its source")

    def run_killed(self, c, key, args):
        """Run `args`; the first time to the end (timed), later killed inside that time."""
        p = subprocess.Popen([self.b, *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=self.env)
        if key not in self.window:
            t0 = time.time()
            p.wait()
            self.window[key] = max(time.time() - t0, 0.02)
            return False
        time.sleep(self.rnd.uniform(0, self.window[key]))
        alive = p.poll() is None
        try:
            p.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        c.mid_work += alive
        return alive

    def add_round(self, c):
        free = [x for x in self.sources if x not in self.hoarded.values()]
        cache = self.rnd.choice(free)
        name = os.path.basename(cache).split(".")[0]
        before = self.listed()
        killed = self.run_killed(c, ("add", cache), ["hoard", "add", cache, "--name", name, "-q"])
        c.iterations += 1
        self.verify(c, f"kill of add {name}")
        now = self.listed()
        if now - {name} != before:
            self.fail(c, f"add {name} changed other caches: {before} -> {now}")
        self.hoarded[name] = cache
        if name in now:
            c.landed += killed
            self.reads_as_source(c, name, "a killed add")
        else:
            self.v("hoard", "add", cache, "--name", name, "-q")  # continuation
        self.verify(c, f"add {name} to completion")
        if self.hoarded:
            self.reads_as_source(c, self.rnd.choice(sorted(self.hoarded)), f"add {name}")

    def receive_round(self, c):
        """The hoard's newest generation streamed to the node (incremental when the node's
        generation is still kept here, else full), the receive killed at random."""
        if (not os.path.exists(os.path.join(self.node, "hoard.yaml"))
                or self.head(self.node) == self.head(self.hoard) or self.rnd.random() < 0.3):
            shutil.rmtree(self.node, ignore_errors=True)
            self.v("hoard", "init", self.node)
        stream = os.path.join(self.d, "gen.stream")
        args = ["hoard", "send", "-o", stream, "-q"]
        at = self.head(self.node)
        log = json.loads(self.v("hoard", "log", "--json").stdout)
        kept = {g["id"]: g["generation"] for g in log}
        if at in kept:
            args += ["--from", str(kept[at])]
        self.v(*args)
        new = self.head(self.hoard)
        killed = self.run_killed(c, ("receive", at in kept), ["hoard", "--hoard", self.node,
                                                              "receive", stream, "-q"])
        c.iterations += 1
        now = self.head(self.node)
        if now not in (at, new):
            self.fail(c, f"a killed receive left the node at {now}, neither {at} nor {new}")
        self.verify(c, "a killed receive", self.node)
        if now == new:
            c.landed += killed
        else:
            self.v("hoard", "--hoard", self.node, "receive", stream, "-q")
        if self.head(self.node) != new:
            self.fail(c, "receive to completion did not reach the sent generation")
        self.verify(c, "receive to completion", self.node)
        listed = json.loads(self.v("hoard", "--hoard", self.node, "list", "--json").stdout)
        if listed:
            name = self.rnd.choice(listed)["name"]
            out = os.path.join(self.d, "node-out.qcow2")
            for p in (out, out + ".trace"):
                if os.path.exists(p):
                    os.unlink(p)
            r = self.v("hoard", "--hoard", self.node, "checkout", name, "-o", out, "-q",
                       check=False)
            if r.returncode != 0 or sh("qemu-img", "compare", "-U", "-q", self.hoarded[name],
                                       out, check=False).returncode != 0:
                self.fail(c, f"{name} on the node does not read as its source")

    def gc_round(self, c):
        # Something to collect: deregister one cache (and re-add another one later).
        name = self.rnd.choice(sorted(self.hoarded))
        self.v("hoard", "rm", name)
        del self.hoarded[name]
        # Mostly a window of 0 days (older generations go at once), sometimes one that keeps
        # them (their packs stay).
        args = ["hoard", "gc", "-q", "--keep-days", self.rnd.choice(["0", "0", "1"])]
        if self.rnd.random() < 0.3:
            args += ["--recompress", str(self.rnd.choice([3, 9]))]
        self.run_killed(c, ("gc", len(args)), args)
        c.iterations += 1
        self.verify(c, "a killed gc")
        for n in sorted(self.hoarded):
            self.reads_as_source(c, n, "a killed gc")
        self.v("hoard", "gc", "-q", "--keep-days", "0")
        self.verify(c, "gc to completion")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="target/release/vmicache")
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    b = os.path.abspath(a.binary)
    d = tempfile.mkdtemp(prefix="vmicache-hoard-crash-")
    rnd = random.Random(int(time.time()))
    cp = Campaign(b, d, rnd)
    try:
        cp.v("hoard", "init", cp.hoard)
        size = 48 * MIB
        first = os.path.join(d, "b0.raw")
        make_base(first, size, 1)
        for i in range(6):
            base = first if i == 0 else os.path.join(d, f"b{i}.raw")
            if i:
                make_base(base, size, 100 + i, like=first if i % 2 else None)
            cache = os.path.join(d, f"c{i}.qcow2")
            cp.v("build", base, "-o", cache, "-q")
            cp.v("warm", cache, "--full", "-q")
            cp.v("seal", cache, "-q")
            cp.sources[cache] = base
        add, gc, recv = Counts("add"), Counts("gc"), Counts("receive")
        # Two writers at once: both land.
        both = [subprocess.Popen([b, "hoard", "add", c, "-q"], env=cp.env)
                for c in sorted(cp.sources)[:2]]
        if any(p.wait() != 0 for p in both):
            cp.fail(add, "two concurrent adds did not both succeed")
        for c in sorted(cp.sources)[:2]:
            cp.hoarded[os.path.basename(c).split(".")[0]] = c
        t0 = time.time()
        def short():
            return min(add.mid_work, gc.mid_work, recv.mid_work) < a.kills

        while short() and time.time() - t0 < a.seconds:
            free = len(cp.sources) - len(cp.hoarded)
            if recv.mid_work < a.kills and cp.hoarded and rnd.random() < 0.34:
                cp.receive_round(recv)
            elif cp.hoarded and (gc.mid_work < a.kills or not free) and (
                    rnd.random() < 0.5 or not free or add.mid_work >= a.kills):
                cp.gc_round(gc)
            else:
                cp.add_round(add)
        for n in sorted(cp.hoarded):
            cp.reads_as_source(add, n, "the campaign")
        print(add.line())
        print(gc.line())
        print(recv.line())
        if short():
            print(f"hoard crash campaign: fewer than {a.kills} kills mid-work of each within "
                  f"{a.seconds:.0f} s", file=sys.stderr)
        ok = not cp.failures and not short()
        print("hoard crash campaign: " + ("ok" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if a.keep:
            print(f"kept {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
