#!/usr/bin/python3
"""vmicache test guest: the work a boot does.

1. imports every module named in MODULES (one per line),
2. reads every file named in MANIFEST (`sha256sum` output made at build time, paths relative
   to /) and checks its SHA-256,
3. writes the result to /var/tmp/vmicache-boot.txt (with a boot counter) and syncs,
4. prints `VMICACHE-BOOT-OK <hash>` on stdout, where <hash> is the SHA-256 of the manifest as
   recomputed from the data read here (so it equals the build's value only if every byte read
   matched), or `VMICACHE-BOOT-FAIL <reason>`,
5. with --poweroff (when run as init): remounts / read-only and powers the machine off.

Only modules of python3.11-minimal are used here, so the same script runs in both guests.
"""
import hashlib
import os
import sys
import time

SHARE = "/usr/local/share/vmicache"
MANIFEST = SHARE + "/manifest.sha256"
MODULES = SHARE + "/modules"
RESULT = "/var/tmp/vmicache-boot.txt"


def uptime():
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except OSError:
        return -1.0


def import_all(path):
    import importlib

    names = []
    with open(path) as f:
        for line in f:
            name = line.strip()
            if name and not name.startswith("#"):
                importlib.import_module(name)
                names.append(name)
    return names


def check_manifest(path, root="/"):
    """Returns (files, bytes, bad paths, sha256 of the manifest as recomputed)."""
    whole = hashlib.sha256()
    files = nbytes = 0
    bad = []
    with open(path, "rb") as f:
        for line in f:
            digest, name = line.rstrip(b"\n").split(b"  ", 1)
            h = hashlib.sha256()
            with open(os.path.join(root.encode(), name), "rb") as data:
                while True:
                    chunk = data.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    nbytes += len(chunk)
            got = h.hexdigest().encode()
            if got != digest:
                bad.append(name.decode(errors="replace"))
            whole.update(got + b"  " + name + b"\n")
            files += 1
    return files, nbytes, bad, whole.hexdigest()


def record(result, digest, t):
    boots = 0
    try:
        with open(RESULT) as f:
            for line in f:
                if line.startswith("boots="):
                    boots = int(line.split("=", 1)[1])
    except (OSError, ValueError):
        pass
    text = "boots=%d\nresult=%s\nhash=%s\nuptime=%.2f\ncheck_seconds=%.2f\n" % (
        boots + 1, result, digest, uptime(), t)
    tmp = RESULT + ".new"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, RESULT)
    os.sync()
    return boots + 1


def poweroff():
    os.sync()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        MS_RDONLY, MS_REMOUNT = 1, 32
        if libc.mount(b"none", b"/", None, MS_REMOUNT | MS_RDONLY, None) != 0:
            print("vmicache-check: remount ro: errno %d" % ctypes.get_errno(), flush=True)
        libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    except Exception as e:  # no ctypes (python3.11-minimal): let the kernel do it
        print("vmicache-check: poweroff via sysrq (%s)" % e, flush=True)
    with open("/proc/sysrq-trigger", "w") as f:
        for c in "suo":
            f.write(c)
            f.flush()
            time.sleep(0.5)


def main(argv):
    t0 = time.monotonic()
    ok = False
    try:
        mods = import_all(MODULES)
        t_imports = time.monotonic() - t0
        files, nbytes, bad, digest = check_manifest(MANIFEST)
        with open(MANIFEST, "rb") as f:
            want = hashlib.sha256(f.read()).hexdigest()
        t = time.monotonic() - t0
        print("vmicache-check: %d modules, %d files, %d bytes, %.2f s (imports %.2f s),"
              " uptime %.2f s" % (len(mods), files, nbytes, t, t_imports, uptime()), flush=True)
        if bad:
            reason = "%d files differ (first %s)" % (len(bad), bad[0])
        elif digest != want:
            reason = "manifest hash %s != %s" % (digest, want)
        else:
            ok = True
        if "--no-write" not in argv:
            boots = record("ok" if ok else "fail", digest, t)
            print("vmicache-check: boot %d recorded in %s" % (boots, RESULT), flush=True)
        print(("VMICACHE-BOOT-OK %s" % digest) if ok else ("VMICACHE-BOOT-FAIL %s" % reason),
              flush=True)
    except Exception as e:
        print("VMICACHE-BOOT-FAIL %s: %s" % (type(e).__name__, e), flush=True)
    if "--poweroff" in argv:
        poweroff()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
