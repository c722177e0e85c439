#!/usr/bin/python3
"""Bring an ext4 image up to date with a directory tree, without mounting it.

images/derive.sh dumps a base image's files (`debugfs -R "rdump / DIR"`), snapshots them,
installs packages into DIR (chroot), and then has this script write the difference into a
copy of the image with `debugfs -w -f COMMANDS`. Files that did not change are not touched, so
they keep their inodes and blocks; new and rewritten files get blocks from the free space.

    ext4-sync.py snapshot ROOT SNAPSHOT.json
        record every entry under ROOT: kind, mode, owner, mtime, SHA-256 or link target
    ext4-sync.py modes IMAGE ROOT
        after `debugfs -R "rdump / ROOT" IMAGE`: put back the set-user-ID and set-group-ID
        bits that rdump loses (it chmods before it chowns, and chown clears them)
    ext4-sync.py commands ROOT SNAPSHOT.json [--stats FILE]
        print the debugfs commands that turn the snapshotted tree into ROOT (nothing when
        they are equal: `derive.sh` uses that to verify the written image)

Entries under dev/ proc/ sys/ run/ and tmp/ are ignored (their directories are not): rdump
skips device nodes, and a chroot leaves sockets and the like there. Extended attributes are
not copied (rdump does not dump them either); a new file that has any is reported on stderr.
Names containing a double quote, a newline or a backslash are refused (debugfs's parser
quotes with double quotes only).
"""
import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile

SKIP_BELOW = ("dev", "proc", "sys", "run", "tmp")


def skipped(rel):
    top, _, rest = rel.partition("/")
    return top in SKIP_BELOW and rest != ""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def entry(root, rel, st):
    """kind, mode bits, uid, gid, mtime and what the entry holds."""
    path = os.path.join(root, rel)
    m = st.st_mode
    e = {"mode": stat.S_IMODE(m), "uid": st.st_uid, "gid": st.st_gid, "mtime": int(st.st_mtime)}
    if stat.S_ISDIR(m):
        e["kind"] = "dir"
    elif stat.S_ISREG(m):
        e["kind"], e["sha256"], e["size"] = "file", sha256(path), st.st_size
    elif stat.S_ISLNK(m):
        e["kind"], e["target"] = "symlink", os.readlink(path)
    elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
        e["kind"] = "chr" if stat.S_ISCHR(m) else "blk"
        e["dev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    elif stat.S_ISFIFO(m):
        e["kind"] = "fifo"
    else:
        e["kind"] = "other"  # sockets: never written
    return e


def walk(root):
    """{relative path: entry} for everything under root, and the hard-link groups."""
    out = {}
    inodes = {}
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = os.path.relpath(dirpath, root)
        reldir = "" if reldir == "." else reldir
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            rel = os.path.join(reldir, name)
            if skipped(rel):
                continue
            st = os.lstat(os.path.join(root, rel))
            if stat.S_ISDIR(st.st_mode):
                keep.append(name)
            out[rel] = entry(root, rel, st)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        dirnames[:] = [d for d in dirnames if d in keep]
    links = [sorted(v, key=tree_order) for v in inodes.values() if len(v) > 1]
    return out, links


def q(rel):
    if any(c in rel for c in '"\n\\'):
        sys.exit("ext4-sync.py: cannot quote %r for debugfs" % rel)
    return '"/%s"' % rel


def host_path(root, rel):
    path = os.path.join(os.path.abspath(root), rel)
    if any(c in path for c in '"\n\\'):
        sys.exit("ext4-sync.py: cannot quote %r for debugfs" % path)
    return path


def tree_order(rel):
    return rel.split("/")


TYPE_BITS = {"dir": 0o040000, "file": 0o100000, "symlink": 0o120000, "chr": 0o020000,
             "blk": 0o060000, "fifo": 0o010000}


def set_meta(cmds, rel, e, old=None):
    """sif commands for whatever of mode/uid/gid/mtime differs from old (all when new)."""
    p = q(rel)
    if e["kind"] != "symlink" and (old is None or old["mode"] != e["mode"]):
        cmds.append("sif %s mode 0%o" % (p, TYPE_BITS[e["kind"]] | e["mode"]))
    for f in ("uid", "gid"):
        if (old is None and e[f] != 0) or (old is not None and old[f] != e[f]):
            cmds.append("sif %s %s %d" % (p, f, e[f]))
    if e["kind"] != "symlink" and (old is None or old["mtime"] != e["mtime"]):
        cmds.append("sif %s mtime @%d" % (p, e["mtime"]))


def same_content(a, b):
    if a["kind"] != b["kind"]:
        return False
    k = a["kind"]
    if k == "file":
        return a["sha256"] == b["sha256"]
    if k == "symlink":
        return a["target"] == b["target"]
    if k in ("chr", "blk"):
        return a["dev"] == b["dev"]
    return True


def commands(root, snap):
    before = snap["entries"]
    after, links = walk(root)
    cmds = []
    stats = {"removed": 0, "new": 0, "rewritten": 0, "metadata": 0, "bytes_written": 0,
             "hardlinks": 0, "xattr_warnings": 0}

    # 1. Removals (deepest first): entries gone, and entries whose kind or content changed
    #    (written anew below).
    gone = [r for r in before if r not in after or not same_content(before[r], after[r])]
    for rel in sorted(gone, key=lambda r: (-r.count("/"), r)):
        if before[rel]["kind"] == "dir":
            if rel not in after or after[rel]["kind"] != "dir":
                cmds.append("rmdir %s" % q(rel))
                stats["removed"] += 1
        else:
            cmds.append("rm %s" % q(rel))
            stats["removed" if rel not in after else "rewritten"] += 1

    # 2. New and rewritten entries, parents before children.
    first_of = {}
    for group in links:
        if all(r not in before or not same_content(before[r], after[r]) for r in group):
            for r in group[1:]:
                first_of[r] = group[0]
    dirs_touched = []
    for rel in sorted(after, key=tree_order):
        e = after[rel]
        old = before.get(rel)
        if old is not None and same_content(old, e):
            if (old["mode"], old["uid"], old["gid"]) != (e["mode"], e["uid"], e["gid"]) or (
                    e["kind"] not in ("dir", "symlink") and old["mtime"] != e["mtime"]):
                if e["kind"] == "dir":
                    dirs_touched.append(rel)
                else:
                    set_meta(cmds, rel, e, old)
                    stats["metadata"] += 1
            elif e["kind"] == "dir" and old["mtime"] != e["mtime"]:
                dirs_touched.append(rel)
            continue
        if old is None:
            stats["new"] += 1
        k = e["kind"]
        parent, _, name = rel.rpartition("/")
        if k == "dir":
            cmds.append("mkdir %s" % q(rel))
            dirs_touched.append(rel)
            continue
        if k == "file":
            if rel in first_of:
                cmds.append("ln %s %s" % (q(first_of[rel]), q(rel)))
                stats["hardlinks"] += 1
                continue
            cmds.append('write "%s" %s' % (host_path(root, rel), q(rel)))
            stats["bytes_written"] += e["size"]
            try:
                if os.listxattr(os.path.join(root, rel), follow_symlinks=False):
                    stats["xattr_warnings"] += 1
                    print("ext4-sync.py: warning: extended attributes of /%s not copied" % rel,
                          file=sys.stderr)
            except OSError:
                pass
        elif k == "symlink":
            if any(c in e["target"] for c in '"\n\\'):
                sys.exit("ext4-sync.py: cannot quote link target %r" % e["target"])
            cmds.append('symlink %s "%s"' % (q(rel), e["target"]))
        elif k in ("chr", "blk", "fifo"):
            # debugfs's mknod takes a name in the current directory, not a path.
            cmds.append("cd %s" % (q(parent) if parent else "/"))
            if k == "fifo":
                cmds.append('mknod "%s" p' % name)
            else:
                cmds.append('mknod "%s" %s %d %d' % (name, k[0], e["dev"][0], e["dev"][1]))
            cmds.append("cd /")
        else:
            print("ext4-sync.py: warning: /%s (%s) not written" % (rel, k), file=sys.stderr)
            continue
        set_meta(cmds, rel, e)
    # Link counts of hard-link groups written here.
    for group in links:
        if group[0] not in first_of.values():
            continue
        cmds.append("sif %s links_count %d" % (q(group[0]), len(group)))
    # Directory metadata last: adding entries above changed their mtimes.
    for rel in dirs_touched:
        set_meta(cmds, rel, after[rel], before.get(rel) if before.get(rel, {}).get("kind") == "dir" else None)
    return cmds, stats


def fix_modes(image, root):
    """chmod entries of root whose permission bits differ from the image's (ls -p)."""
    dirs = [""]
    for dirpath, dirnames, _ in os.walk(root):
        reldir = os.path.relpath(dirpath, root)
        reldir = "" if reldir == "." else reldir
        dirnames[:] = [d for d in dirnames if not skipped(os.path.join(reldir, d))]
        dirs.extend(os.path.join(reldir, d) for d in dirnames)
    with tempfile.NamedTemporaryFile("w", suffix=".cmds") as f:
        for d in dirs:
            f.write("ls -p %s\n" % (q(d) if d else "/"))
        f.flush()
        out = subprocess.run(["debugfs", "-f", f.name, image], check=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             errors="surrogateescape").stdout
    fixed = 0
    cur = None
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p "):
            arg = line[len("debugfs: ls -p "):]
            cur = "" if arg == "/" else arg.strip('"')[1:]
            continue
        parts = line.split("/")
        if cur is None or len(parts) < 7 or parts[5] in (".", ".."):
            continue
        mode = int(parts[2], 8)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            continue
        path = os.path.join(root, cur, parts[5])
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_IFMT(st.st_mode) == stat.S_IFMT(mode) and stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode):
            os.chmod(path, stat.S_IMODE(mode))
            fixed += 1
    return fixed


def main(argv):
    if len(argv) == 3 and argv[0] == "modes":
        print("ext4-sync.py: %d modes put back" % fix_modes(argv[1], argv[2]), file=sys.stderr)
        return 0
    if len(argv) >= 3 and argv[0] == "snapshot":
        entries, _ = walk(argv[1])
        with open(argv[2], "w") as f:
            json.dump({"root": os.path.abspath(argv[1]), "entries": entries}, f)
        return 0
    if len(argv) >= 3 and argv[0] == "commands":
        with open(argv[2]) as f:
            snap = json.load(f)
        cmds, stats = commands(argv[1], snap)
        for c in cmds:
            print(c)
        if len(argv) == 5 and argv[3] == "--stats":
            with open(argv[4], "w") as f:
                json.dump(stats, f)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
