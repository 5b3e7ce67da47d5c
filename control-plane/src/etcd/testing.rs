//! An etcd process for tests: the `etcd` binary (Debian's `etcd-server`) on free localhost
//! ports with a temporary data directory, killed and removed on drop.
//!
//! [`EtcdProcess::start`] returns `None` (after printing a loud notice) when the binary is
//! missing, so tests skip; with `WEIR_REQUIRE_ETCD=1` (set by `scripts/test.sh`, which
//! installs etcd) a missing binary panics instead. `WEIR_ETCD_BIN` names another binary.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running etcd; killed (and its data directory removed) on drop.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Child,
    dir: PathBuf,
    /// The client port on 127.0.0.1.
    pub port: u16,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEIR_ETCD_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

impl EtcdProcess {
    /// Start etcd and wait until it answers; `None` (skip) when the binary is missing and
    /// `WEIR_REQUIRE_ETCD` is not `1`.
    ///
    /// # Panics
    /// When etcd is required but missing, or does not start within 30 s.
    pub fn start() -> Option<EtcdProcess> {
        Self::start_with(&[], false)
    }

    /// [`Self::start`] with `extra` etcd flags; `tls`: the client URL is `https://` (give
    /// `--cert-file`/`--key-file` in `extra`) and readiness is the port accepting (the
    /// plain-HTTP `/health` probe cannot be used).
    ///
    /// # Panics
    /// As [`Self::start`].
    pub fn start_with(extra: &[&str], tls: bool) -> Option<EtcdProcess> {
        let Some(bin) = etcd_binary() else {
            if std::env::var("WEIR_REQUIRE_ETCD").is_ok_and(|v| v == "1") {
                panic!(
                    "WEIR_REQUIRE_ETCD=1 but no `etcd` binary on PATH (apt-get install etcd-server)"
                );
            }
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!! SKIPPING etcd test: no `etcd` binary on PATH \
                 (apt-get install etcd-server; WEIR_REQUIRE_ETCD=1 makes this fail) !!!!!!\n"
            );
            return None;
        };
        let mut last_err = String::new();
        // Ports picked here can be taken by someone else before etcd binds them: retry.
        for attempt in 0..5 {
            let dir = std::env::temp_dir().join(format!(
                "weir-etcd-{}-{}-{attempt}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            let (Ok(port), Ok(peer)) = (free_port(), free_port()) else {
                continue;
            };
            let scheme = if tls { "https" } else { "http" };
            let client_url = format!("{scheme}://127.0.0.1:{port}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(&bin);
            // etcd 3.4 refuses to start on arm64 unless told it is fine (Go's arch name).
            if std::env::consts::ARCH == "aarch64" {
                cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
            }
            let child = cmd
                .arg("--name")
                .arg("weir-test")
                .arg("--data-dir")
                .arg(&dir)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(format!("weir-test={peer_url}"))
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => panic!("starting {}: {e}", bin.display()),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("etcd exited: {status}");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && (tls || health(port))
                {
                    return Some(EtcdProcess { child, dir, port });
                }
                if Instant::now() > deadline {
                    last_err = "etcd did not become healthy within 30 s".into();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("could not start etcd: {last_err}");
    }

    /// The process id (benchmarks pin it to a core).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `etcd://127.0.0.1:PORT/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}{prefix}", self.port)
    }
}

/// etcd's `/health` says `"health":"true"`.
fn health(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
