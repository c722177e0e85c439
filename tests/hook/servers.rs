//! The servers the hook starts and stops: pid files, signals, logging.

use super::*;

/// `/proc/PID/stat` field 22: the process's start time.
fn start_time(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    f[19].parse().unwrap()
}

#[test]
fn pid_files_naming_another_process_are_not_signalled() {
    let h = Host::new("");
    let sock = h.s("sockets/p.sock");
    let xml = domain("p", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "p"));
    h.ok("p", "prepare", "begin", &xml);
    let pid = h.pid("p.vda").unwrap();
    let rec = std::fs::read_to_string(h.p("state/p.vda.pid")).unwrap();
    assert!(rec.contains(&format!("start={}", start_time(pid))), "{rec}");
    h.ok("p", "release", "end", &xml);
    assert!(!alive(pid));

    // An unrelated process whose arguments look like the server's ("serve", the socket): a
    // recycled pid, or a pid file left from an older run.
    // One process (sh waiting in its `read` builtin), so killing it leaves nothing behind.
    let mut decoy = Command::new("sh")
        .args(["-c", "read x", "serve", &sock])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = decoy.id() as i32;
    let d_exe = std::fs::read_link(format!("/proc/{d}/exe")).unwrap();
    let vmicache = std::fs::canonicalize(env!("CARGO_BIN_EXE_vmicache")).unwrap();
    let records = [
        format!("{d}\n"),
        format!("{d}\nstart=1\nexe={}\n", d_exe.display()),
        format!("{d}\nstart={}\nexe={}\n", start_time(d), vmicache.display()),
    ];
    for rec in &records {
        std::fs::write(h.p("state/p.vda.pid"), rec).unwrap();
        h.ok("p", "release", "end", &xml);
        assert!(alive(d), "signalled by release through {rec:?}");
        assert!(!h.p("state/p.vda.pid").exists());
        std::fs::write(h.p("state/p.vda.pid"), rec).unwrap();
        h.ok("p", "prepare", "begin", &xml);
        assert!(alive(d), "signalled by prepare through {rec:?}");
        let server = h.pid("p.vda").unwrap();
        assert_ne!(server, d);
        h.ok("p", "release", "end", &xml);
        assert!(!alive(server));
    }
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn a_server_ignoring_sigterm_is_killed_and_waited_for() {
    let h = Host::new("");
    let sock = h.s("sockets/k.sock");
    let xml = domain("k", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "k"));
    h.ok("k", "prepare", "begin", &xml);
    let pid = h.pid("k.vda").unwrap();
    // A stopped process does not act on SIGTERM; SIGKILL ends it.
    kill(pid, "-STOP");
    let t0 = std::time::Instant::now();
    h.ok("k", "release", "end", &xml);
    assert!(!alive(pid), "release returned while its server still ran");
    assert!(t0.elapsed().as_secs() >= 9, "{:?}", t0.elapsed());
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(log.contains("ignored SIGTERM; killed"), "{log}");
    assert!(!h.p("state/k.vda.pid").exists());
}

/// Run the hook with a deadline; None if it did not finish.
fn hook_within(h: &Host, guest: &str, op: &str, xml: &str, secs: u64) -> Option<Output> {
    let mut child = h.spawn_hook(guest, op, "begin", xml);
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < secs {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn logging_never_stops_the_hook() {
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let sock = h.s("sockets/l.sock");
    let xml = domain("l", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "l"));
    // hook.log is a FIFO nobody reads: opening it for writing would wait forever.
    let fifo = h.p("state/hook.log");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for op in ["prepare", "release"] {
        let o = hook_within(&h, "l", op, &xml, 20).unwrap_or_else(|| panic!("{op} hung"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::remove_file(&fifo).unwrap();
    // A full file system (/dev/full) under the hook's log and the server's log; then the
    // server's log removed while it runs: prepare and release still work.
    let full = |p: PathBuf| {
        Command::new("mknod")
            .arg(&p)
            .args(["c", "1", "7"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(full(h.p("state/hook.log")) && full(h.p("state/l.vda.log"))) {
        eprintln!("mknod not permitted: full-disk case skipped");
        return;
    }
    h.ok("l", "prepare", "begin", &xml);
    let pid = h.pid("l.vda").unwrap();
    h.ok("l", "release", "end", &xml);
    assert!(!alive(pid));
    std::fs::remove_file(h.p("state/l.vda.log")).unwrap();
    h.ok("l", "prepare", "begin", &xml);
    let pid = h.pid("l.vda").unwrap();
    std::fs::remove_file(h.p("state/l.vda.log")).unwrap();
    std::fs::remove_file(h.p("state/hook.log")).unwrap();
    std::fs::create_dir(h.p("state/hook.log")).unwrap();
    h.ok("l", "release", "end", &xml);
    assert!(!alive(pid));
    assert!(!Path::new(&sock).exists());
}
