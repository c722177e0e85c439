//! Reads of a sealed chain go out as pieces (file ranges by sendfile, holes, bytes): checked
//! against the base in every reply mode a client may ask for, with libnbd as the client.

use super::*;

/// libnbd's Python binding reads 300 random ranges in each mode (compared with the chain
/// as `qemu-img convert` reads it): structured replies (holes
/// as hole chunks), structured with `DF` (one data chunk per read), and simple replies. The
/// base's pages are dropped from the page cache before each mode.
const CLIENT: &str = r#"
import nbd, os, sys, random
raw = open(sys.argv[2], 'rb')
r = random.Random(5)
for structured, df in ((True, False), (True, True), (False, False)):
    # The base out of the page cache: its first reads are not sent from the page cache.
    fd = os.open(sys.argv[3], os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.set_export_name('vm1')
    h.connect_unix(sys.argv[1])
    size = h.get_size()
    chunks = 0
    for i in range(300):
        n = r.choice([512, 4096, 65536, 131072, 262144, 1 << 20, 3 << 20])
        off = r.randrange(0, size - n)
        if df:
            buf = bytearray(n)
            def cb(sub, o, status, err):
                global chunks
                chunks += 1
                buf[o - off:o - off + len(sub)] = sub
                return 0
            h.pread_structured(n, off, cb, flags=nbd.CMD_FLAG_DF)
            got = bytes(buf)
        else:
            got = h.pread(n, off)
        raw.seek(off)
        if got != raw.read(n):
            sys.exit("mismatch: structured=%s df=%s at %d+%d" % (structured, df, off, n))
    h.shutdown()
    if df and chunks != 300:
        sys.exit("DF reads came in %d chunks, not 300" % chunks)
    print("ok structured=%s df=%s" % (structured, df))
"#;

#[test]
fn sealed_chain_reads_match_the_base_in_every_reply_mode() {
    sealed_chain_reads(true, false);
}

/// The same with a cache that holds only part of the base: what it lacks is sent from the
/// base's file, which the server opens on first need.
#[test]
fn partly_cached_sealed_chain_reads_match_the_base_in_every_reply_mode() {
    sealed_chain_reads(false, false);
}

/// The same over a qcow2 base, whose data lies elsewhere in its file than in the guest.
#[test]
fn partly_cached_sealed_chain_over_a_qcow2_base_reads_match_in_every_reply_mode() {
    sealed_chain_reads(false, true);
}

fn sealed_chain_reads(full: bool, qcow2_base: bool) {
    let mut s = setup_with("0", true);
    if qcow2_base {
        // Its holes left out and its metadata first: no data at its guest offset.
        let q = s.dir.join("base.qcow2");
        qemu_img(&["convert", "-O", "qcow2", ps(&s.base), ps(&q)]);
        s.base = q;
        std::fs::remove_file(&s.cache).unwrap();
        std::fs::remove_file(&s.inst).unwrap();
        run(bin().args(["build", ps(&s.base), "-o", ps(&s.cache), "-q"]));
        run(bin().args(["chain", ps(&s.cache), "-o", ps(&s.inst), "-q"]));
    }
    if full {
        run(bin().args(["warm", ps(&s.cache), "--full", "-q"]));
    } else {
        qemu_io(&s.cache, &["-f", "qcow2", "-C"], &["read -q 1M 2M"]);
    }
    run(bin().args(["seal", ps(&s.cache), "-q"]));
    // The instance's own data too: replies then mix bytes read into memory, file ranges of
    // the sealed cache and holes.
    qemu_io_qcow2(
        &s.inst,
        &[
            "write -q -P 0x61 100k 30k",
            "write -q -P 0x62 5M 1M",
            "write -q -z 2M 64k",
            "write -q -P 0x63 12M 4k",
        ],
    );
    let want = s.dir.join("want.raw");
    qemu_img(&["convert", "-O", "raw", ps(&s.inst), ps(&want)]);
    let c = serve(&s, &[]);
    let out = run(std::process::Command::new("/usr/bin/python3").args([
        "-c",
        CLIENT,
        ps(&s.sock),
        ps(&want),
        ps(&s.base),
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("ok ").count(), 3, "{text}");
    stop(c);
}
