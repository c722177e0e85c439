//! Options, errors and old clients through the hand-written client (main.rs).

use super::*;

#[test]
fn protocol_options_and_errors() {
    let data = pattern(2 * MIB, 4);
    let flaky: Arc<dyn Export> = Arc::new(flaky(data.clone()));
    let s = Served::start(vec![("flaky", flaky)]);
    let mut c = Client::connect(&s.sock, 3);

    // Unknown options, including extended headers, are refused and negotiation goes on.
    for opt in [proto::OPT_EXTENDED_HEADERS, 4242] {
        c.option(opt, &[]);
        assert_eq!(c.option_reply(opt).0, proto::REP_ERR_UNSUP);
    }
    // Meta contexts need structured replies first.
    let mut q = string("flaky");
    q.extend_from_slice(&0u32.to_be_bytes());
    c.option(proto::OPT_LIST_META_CONTEXT, &q);
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ERR_INVALID
    );
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.option_reply(proto::OPT_STRUCTURED_REPLY).0,
        proto::REP_ACK
    );
    // An empty LIST query lists everything.
    c.option(proto::OPT_LIST_META_CONTEXT, &q);
    let (t, d) = c.option_reply(proto::OPT_LIST_META_CONTEXT);
    assert_eq!(t, proto::REP_META_CONTEXT);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ACK
    );
    // A query of another namespace finds nothing.
    let mut q2 = string("flaky");
    q2.extend_from_slice(&1u32.to_be_bytes());
    q2.extend_from_slice(&string("qemu:dirty-bitmap:x"));
    c.option(proto::OPT_LIST_META_CONTEXT, &q2);
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ACK
    );
    // Select base:allocation.
    let mut q3 = string("");
    q3.extend_from_slice(&1u32.to_be_bytes());
    q3.extend_from_slice(&string("base:allocation"));
    c.option(proto::OPT_SET_META_CONTEXT, &q3);
    let (t, d) = c.option_reply(proto::OPT_SET_META_CONTEXT);
    assert_eq!(t, proto::REP_META_CONTEXT);
    let ctx = u32::from_be_bytes(d[0..4].try_into().unwrap());
    assert_ne!(ctx, 0);
    assert_eq!(
        c.option_reply(proto::OPT_SET_META_CONTEXT).0,
        proto::REP_ACK
    );
    // Unknown export names are refused.
    let mut info = string("nope");
    info.extend_from_slice(&0u16.to_be_bytes());
    c.option(proto::OPT_INFO, &info);
    assert_eq!(c.option_reply(proto::OPT_INFO).0, proto::REP_ERR_UNKNOWN);
    // GO on the default export, asking for the name, the description and something unknown.
    let mut go = string("");
    go.extend_from_slice(&3u16.to_be_bytes());
    for i in [proto::INFO_NAME, proto::INFO_DESCRIPTION, 77] {
        go.extend_from_slice(&i.to_be_bytes());
    }
    c.option(proto::OPT_GO, &go);
    let mut flags = 0;
    let mut seen = Vec::new();
    loop {
        let (t, d) = c.option_reply(proto::OPT_GO);
        if t == proto::REP_ACK {
            break;
        }
        assert_eq!(t, proto::REP_INFO);
        let it = u16::from_be_bytes([d[0], d[1]]);
        seen.push(it);
        match it {
            proto::INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 2 * MIB);
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            proto::INFO_NAME => assert_eq!(&d[2..], b"flaky"),
            proto::INFO_BLOCK_SIZE => {
                assert_eq!(u32::from_be_bytes(d[2..6].try_into().unwrap()), 1);
                assert_eq!(u32::from_be_bytes(d[10..14].try_into().unwrap()), 32 << 20);
            }
            _ => {}
        }
    }
    assert!(seen.contains(&proto::INFO_EXPORT) && seen.contains(&proto::INFO_BLOCK_SIZE));
    assert!(seen.contains(&proto::INFO_NAME), "{seen:?}");
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(flags & proto::FLAG_SEND_DF, 0);

    // A good read: one final OFFSET_DATA chunk.
    c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 1, 4096, 8192);
    let (f, t, cookie, p) = c.chunk();
    assert_eq!(
        (f, t, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), 4096);
    assert!(p[8..] == data[4096..4096 + 8192]);
    // A failing read is an EIO error chunk; the connection stays up.
    c.request(proto::CMD_READ, 0, 2, BAD - 512, 1024);
    assert_eq!(structured_error(&c.chunk()), proto::EIO);
    // Out of range, bad flags, unknown command, writes to a read-only export.
    c.request(proto::CMD_READ, 0, 3, 2 * MIB - 512, 1024);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 4, 0, 512);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(99, 0, 5, 0, 512);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(proto::CMD_WRITE, 0, 6, 0, 3);
    c.s.write_all(b"abc").unwrap();
    assert_eq!(structured_error(&c.chunk()), proto::EPERM);
    c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 7, 0, 33 << 20);
    assert_eq!(structured_error(&c.chunk()), proto::EOVERFLOW);
    // Block status, whole and REQ_ONE.
    c.request(proto::CMD_BLOCK_STATUS, 0, 8, 0, 4 * MEM_BLOCK as u32);
    let (f, t, cookie, p) = c.chunk();
    assert_eq!(
        (f, t, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, 8)
    );
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), ctx);
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[0..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let b = MEM_BLOCK as u32;
    assert_eq!(ext, vec![(b, 0), (b, 3), (2 * b, 0)]);
    c.request(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        9,
        100,
        4 * b,
    );
    let (_, _, _, p) = c.chunk();
    assert_eq!(p.len(), 12, "one descriptor");
    assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), b - 100);
    // Without DF, what the export knows to be zero goes as hole chunks, in offset order,
    // the last chunk flagged done.
    c.request(proto::CMD_READ, 0, 11, 0, 4 * b);
    let want = [
        (proto::REPLY_TYPE_OFFSET_DATA, 0u64, b as usize),
        (proto::REPLY_TYPE_OFFSET_HOLE, u64::from(b), b as usize),
        (
            proto::REPLY_TYPE_OFFSET_DATA,
            2 * u64::from(b),
            2 * b as usize,
        ),
    ];
    for (i, (typ, off, len)) in want.into_iter().enumerate() {
        let (f, t, cookie, p) = c.chunk();
        let done = if i == 2 { proto::REPLY_FLAG_DONE } else { 0 };
        assert_eq!((f, t, cookie), (done, typ, 11), "chunk {i}");
        assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), off);
        if typ == proto::REPLY_TYPE_OFFSET_HOLE {
            assert_eq!(p.len(), 12);
            assert_eq!(
                u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize,
                len
            );
        } else {
            assert!(p[8..] == data[off as usize..off as usize + len]);
        }
    }
    // A read inside a hole is one final hole chunk; with DF it is data (zeroes).
    c.request(proto::CMD_READ, 0, 12, u64::from(b) + 512, 4096);
    let (f, t, _, p) = c.chunk();
    assert_eq!(
        (f, t),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(
        u64::from_be_bytes(p[0..8].try_into().unwrap()),
        u64::from(b) + 512
    );
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 4096);
    c.request(
        proto::CMD_READ,
        proto::CMD_FLAG_DF,
        13,
        u64::from(b) + 512,
        4096,
    );
    let (f, t, _, p) = c.chunk();
    assert_eq!(
        (f, t),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
    );
    assert!(p[8..].iter().all(|&x| x == 0) && p.len() == 8 + 4096);
    // Still alive after all those errors.
    c.request(proto::CMD_READ, 0, 10, 0, 512);
    let (_, t, cookie, p) = c.chunk();
    assert_eq!((t, cookie), (proto::REPLY_TYPE_OFFSET_DATA, 10));
    assert!(p[8..] == data[..512]);
    // A bad magic is a protocol violation: the server hangs up.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
}

#[test]
fn old_clients_simple_replies() {
    let data = pattern(2 * MIB, 5);
    let flaky: Arc<dyn Export> = Arc::new(flaky(data.clone()));
    let s = Served::start(vec![("flaky", flaky)]);

    // Fixed newstyle without NO_ZEROES: EXPORT_NAME is answered with 124 zero bytes.
    let mut c = Client::connect(&s.sock, 1);
    c.option(proto::OPT_EXPORT_NAME, b"flaky");
    assert_eq!(c.u64(), 2 * MIB);
    let flags = c.u16();
    assert_eq!(
        flags & proto::FLAG_SEND_DF,
        0,
        "no DF without structured replies"
    );
    assert_eq!(c.bytes(124), vec![0u8; 124]);
    // A failed read: error, no payload; the next read works.
    c.request(proto::CMD_READ, 0, 1, BAD, 512);
    assert_eq!(c.simple(), (proto::EIO, 1));
    c.request(proto::CMD_READ, 0, 2, 512, 512);
    assert_eq!(c.simple(), (0, 2));
    assert!(c.bytes(512) == data[512..1024]);
    c.request(proto::CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple(), (0, 3));
    c.request(proto::CMD_DISC, 0, 4, 0, 0);
    assert!(c.closed());

    // Plain (not fixed) newstyle: an unknown export name just closes the connection.
    let mut c = Client::connect(&s.sock, 0);
    c.option(proto::OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // ABORT is acknowledged.
    let mut c = Client::connect(&s.sock, 3);
    c.option(proto::OPT_ABORT, &[]);
    assert_eq!(c.option_reply(proto::OPT_ABORT).0, proto::REP_ACK);
    assert!(c.closed());
    // Unknown client flags close the connection.
    let mut c = Client::connect(&s.sock, 0x80);
    assert!(c.closed());
}
