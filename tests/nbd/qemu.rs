//! QEMU as the client: qemu-img and qemu-io.

use super::*;

#[test]
fn qemu_img_info_and_qemu_io_write_read() {
    let m = Arc::new(MemExport::new(16 * MIB));
    let s = Served::start(vec![("disk", mem(&m))]);
    let uri = s.uri("disk");

    let info = run("qemu-img", &["info", "--output=json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 16 * MIB, "{info:#}");

    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0x5a 12345 7777",
            "write -P 0xc3 15M 1M",
            "read -P 0xab 0 12345",
            "read -P 0x5a 12345 7777",
            "read -P 0xab 20122 45414",
            "read -P 0xc3 15M 1M",
            "read -P 0 64k 14M",
        ],
    );
    assert!(out.contains("read 7777/7777 bytes"), "{out}");

    let data = m.contents();
    assert!(data[..12345].iter().all(|&b| b == 0xab));
    assert!(data[12345..12345 + 7777].iter().all(|&b| b == 0x5a));
    assert!(data[12345 + 7777..64 * 1024].iter().all(|&b| b == 0xab));
    assert!(data[15 * MIB as usize..].iter().all(|&b| b == 0xc3));
}

#[test]
fn qemu_img_compare_and_convert() {
    let data = pattern(8 * MIB + 5 * KIB, 1);
    let m = Arc::new(MemExport::from_vec(data.clone()));
    let s = Served::start(vec![("img", mem(&m))]);
    let uri = s.uri("img");

    let raw = s.path("same.raw");
    std::fs::write(&raw, &data).unwrap();
    let raw_s = raw.to_str().unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", raw_s, &uri],
    );

    let mut other = data.clone();
    other[3 * MIB as usize + 17] ^= 0xff;
    let diff = s.path("differs.raw");
    std::fs::write(&diff, &other).unwrap();
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        diff.to_str().unwrap(),
        &uri,
    ]);
    let out = output(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&cmd, &out));

    // QEMU sees the allocation through base:allocation block status.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let map: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map JSON");
    let seen: Vec<(u64, u64, bool)> = map
        .as_array()
        .expect("map is a list")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    let want: Vec<(u64, u64, bool)> = expected_map(&data)
        .into_iter()
        .map(|(o, l, t)| (o, l, t == 0))
        .collect();
    assert_eq!(seen, want);

    let conv = s.path("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            conv.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&conv).unwrap() == data, "convert differs");
}

#[test]
fn qemu_io_write_zeroes_discard_flush_fua() {
    let m = Arc::new(MemExport::from_vec(vec![0x11; 4 * MIB as usize]));
    let s = Served::start(vec![("", mem(&m))]);
    let uri = s.uri("");

    qemu_io(
        &uri,
        &[
            "write -z 64k 128k",
            "write -z -u 512k 256k",
            "discard 1M 256k",
            "write -f -P 0x22 2M 4k",
            "flush",
            "read -P 0 64k 128k",
            "read -P 0 512k 256k",
            "read -P 0x22 2M 4k",
            "read -P 0x11 3M 4k",
        ],
    );
    let data = m.contents();
    let zero = |a: u64, l: u64| data[a as usize..(a + l) as usize].iter().all(|&b| b == 0);
    assert!(zero(64 * KIB, 128 * KIB));
    assert!(zero(512 * KIB, 256 * KIB));
    assert!(zero(MIB, 256 * KIB), "whole blocks discarded");
    assert!(data[2 * MIB as usize..][..4096].iter().all(|&b| b == 0x22));
    assert!(m.flushes() >= 2, "flush and FUA reach the export");

    // write -z without -u keeps allocated zeroes; -u and discard leave holes.
    let map = nbd_map(&uri);
    let at = |off: u64| {
        map.iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("offset {off} not in map {map:?}"))
    };
    assert_eq!(at(0), 0);
    assert_eq!(at(64 * KIB), STATE_ZERO);
    assert_eq!(at(512 * KIB), STATE_HOLE | STATE_ZERO);
    assert_eq!(at(MIB), STATE_HOLE | STATE_ZERO);
    assert_eq!(at(2 * MIB), 0);
}

#[test]
fn unknown_export_is_refused() {
    let m = Arc::new(MemExport::new(MIB));
    let s = Served::start(vec![("disk", mem(&m))]);
    run_failing("qemu-img", &["info", &s.uri("nope")]);
    // The server is still fine afterwards.
    run("qemu-img", &["info", &s.uri("disk")]);
}

#[test]
fn read_only_export_refuses_writes() {
    let m = Arc::new(MemExport::from_vec(vec![7; MIB as usize]).with_read_only(true));
    let s = Served::start(vec![("ro", mem(&m))]);
    let uri = s.uri("ro");
    run_failing("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 7 0 1M"],
    );
    assert!(m.contents().iter().all(|&b| b == 7));
}

#[test]
fn qemu_img_bench_queue_depth_16() {
    let m = Arc::new(MemExport::new(32 * MIB));
    let s = Served::start(vec![("bench", mem(&m))]);
    let uri = s.uri("bench");
    run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-d",
            "16",
            "-c",
            "2000",
            "-s",
            "4096",
            "-S",
            "8192",
            "--pattern=51",
            &uri,
        ],
    );
    run(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-d", "16", "-c", "2000", "-s", "4096", &uri,
        ],
    );
    let data = m.contents();
    for i in 0..2000usize {
        let off = i * 8192;
        assert!(data[off..off + 4096].iter().all(|&b| b == 51), "block {i}");
        assert!(
            data[off + 4096..off + 8192].iter().all(|&b| b == 0),
            "gap {i}"
        );
    }
}

#[test]
fn requests_of_one_connection_run_in_parallel() {
    // Data everywhere, so that every read reaches the export (holes are answered from
    // block status alone).
    let export = Arc::new(Gathering::new(
        MemExport::from_vec(vec![1; MIB as usize]),
        WORKERS_PER_CONNECTION,
    ));
    let s = Served::start(vec![("slow", export.clone() as Arc<dyn Export>)]);
    let mut c = Client::connect(&s.sock, 3);
    // A server that serves one read at a time holds the first until the export gives up.
    c.s.set_read_timeout(Some(2 * GATHER_TIMEOUT)).unwrap();
    assert_eq!(go(&mut c, "slow"), proto::REP_ACK);
    // 16 reads sent at once over one connection: its workers serve them together, counted
    // by the export (not timed).
    let mut batch = Vec::new();
    for i in 0..16u64 {
        let r = Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&r.encode());
    }
    c.s.write_all(&batch).unwrap();
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let (error, cookie) = c.simple();
        assert_eq!(error, 0, "read {cookie}");
        assert!(c.bytes(4096).iter().all(|&b| b == 1), "read {cookie}");
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<u64>>());
    assert_eq!(
        export.most_in_flight(),
        WORKERS_PER_CONNECTION,
        "reads of one connection in flight at once"
    );
}
