//! Arbitrary domain XML through the hook's parser and planner (the hook runs as root on XML
//! whoever may define domains controls): refusals are fine; a panic, a hang or unbounded
//! memory is not. Planning only computes and checks paths; it creates nothing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use vmicache::config::Config;

static CONFIG: OnceLock<Config> = OnceLock::new();

fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("vmicache-fuzz-hook-{}", std::process::id()));
        for d in ["bases", "caches", "instances", "traces", "sockets", "state"] {
            let _ = std::fs::create_dir_all(root.join(d));
        }
        let _ = std::fs::write(root.join("bases/debian.raw"), vec![0u8; 1 << 20]);
        let r = root.display();
        let text = format!(
            "dirs:\n  bases: [{r}/bases]\n  caches: {r}/caches\n  instances: {r}/instances\n  \
             traces: {r}/traces\n  sockets: {r}/sockets\n  state: {r}/state\n\
             images:\n  debian:\n    base: {r}/bases/debian.raw\n"
        );
        Config::parse(&text, Path::new("fuzz.yaml")).expect("config")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(dom) = vmicache::hook::parse_domain(xml) else {
        return;
    };
    let guest = dom.name.clone();
    let _ = vmicache::hook::plan(config(), &guest, &dom);
});
