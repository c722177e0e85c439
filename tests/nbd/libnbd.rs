//! libnbd tools as the client: nbdinfo and nbdcopy.

use super::*;

#[test]
fn nbdinfo_list_size_and_map() {
    let data = pattern(2 * MIB + 512, 2);
    let a = Arc::new(MemExport::from_vec(data.clone()));
    let b = Arc::new(MemExport::new(MIB));
    let s = Served::start(vec![("alpha", mem(&a)), ("beta", mem(&b))]);

    let list = run("nbdinfo", &["--list", &s.uri("")]);
    assert!(list.contains("export=\"alpha\""), "{list}");
    assert!(list.contains("export=\"beta\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");

    assert_eq!(
        run("nbdinfo", &["--size", &s.uri("alpha")]).trim(),
        (2 * MIB + 512).to_string()
    );
    // The empty name selects the first export.
    assert_eq!(
        run("nbdinfo", &["--size", &s.uri("")]).trim(),
        (2 * MIB + 512).to_string()
    );

    assert_eq!(nbd_map(&s.uri("alpha")), expected_map(&data));
    assert_eq!(
        nbd_map(&s.uri("beta")),
        vec![(0, MIB, STATE_HOLE | STATE_ZERO)]
    );

    let info = run("nbdinfo", &[&s.uri("beta")]);
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
}

#[test]
fn nbdcopy_one_and_several_connections() {
    let data = pattern(12 * MIB + 4 * KIB, 3);
    let m = Arc::new(MemExport::from_vec(data.clone()));
    let target = Arc::new(MemExport::new(data.len() as u64));
    let s = Served::start(vec![("src", mem(&m)), ("dst", mem(&target))]);

    for (i, extra) in [
        vec![],
        vec!["--connections=1"],
        vec!["--connections=4", "--requests=16"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = s.path(&format!("out{i}.raw"));
        let uri = s.uri("src");
        let mut args: Vec<&str> = extra;
        args.extend([uri.as_str(), out.to_str().unwrap()]);
        run("nbdcopy", &args);
        assert!(
            std::fs::read(&out).unwrap() == data,
            "nbdcopy {args:?} differs"
        );
    }

    // Writing through NBD with several connections in parallel.
    let input = s.path("in.raw");
    std::fs::write(&input, &data).unwrap();
    let dst = s.uri("dst");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            input.to_str().unwrap(),
            &dst,
        ],
    );
    assert!(target.contents() == data, "nbdcopy to NBD differs");
}
