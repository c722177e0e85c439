//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF distribution
//! registry) on 127.0.0.1, its storage in a tempdir.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// A real OCI registry (Debian's `docker-registry`, the CNCF distribution registry) on
/// 127.0.0.1, its storage in a tempdir; stopped when dropped.
pub struct Registry {
    pub addr: String,
    child: Option<std::process::Child>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with(None)
    }

    /// With basic authentication (htpasswd, bcrypt) for `user` and `password`.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Self::start_with(Some((user, password)))
    }

    fn start_with(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut auth_conf = String::new();
        if let Some((user, password)) = auth {
            let o = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (tools/deps.sh installs apache2-utils)");
            assert!(o.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &o.stdout).unwrap();
            auth_conf = format!(
                "auth:\n  htpasswd: {{realm: vmicache-test, path: {}}}\n",
                file.display()
            );
        }
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: {addr}, secret: vmicache-test}}\n{auth_conf}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            addr,
            child: None,
            config,
            _dir: dir,
        };
        r.resume();
        r
    }

    /// Start it (again, on the same port and storage).
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.config.with_file_name("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (tools/deps.sh installs it)");
        self.child = Some(child);
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&self.addr) {
                use std::io::{Read, Write};
                let _ = write!(s, "GET /v2/ HTTP/1.0\r\n\r\n");
                let mut b = String::new();
                let _ = s.read_to_string(&mut b);
                if b.starts_with("HTTP/1.") && (b.contains(" 200 ") || b.contains(" 401 ")) {
                    return;
                }
            }
            assert!(t0.elapsed().as_secs() < 30, "docker-registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Stop it (a registry that went away).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The tags of repository `repo` (its name in the registry), sorted.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(s, "GET /v2/{repo}/tags/list HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        let body = &b[b.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut t: Vec<String> = v["tags"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        t.sort();
        t
    }

    /// A repository reference in it.
    pub fn repo(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
