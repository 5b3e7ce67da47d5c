//! A local S3-compatible server for tests and benchmarks: moto's server (PyPI `moto[server]`,
//! `python3 -m moto.server`) on a free 127.0.0.1 port, killed on drop (it keeps everything in
//! memory).
//!
//! [`MotoProcess::start`] returns `None` (after a loud notice) when moto is not installed, so
//! tests skip; with `WEIR_REQUIRE_S3=1` (set by `scripts/test.sh`, which installs moto) a
//! missing moto panics instead. `WEIR_PYTHON` names another interpreter.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server; killed on drop.
#[derive(Debug)]
pub struct MotoProcess {
    child: Child,
    /// The port on 127.0.0.1.
    pub port: u16,
}

fn python() -> String {
    std::env::var("WEIR_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn moto_installed() -> bool {
    Command::new(python())
        .args(["-c", "import moto.server, flask, werkzeug"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One HTTP/1.1 request without a body; the status code.
fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl MotoProcess {
    /// Start moto and wait until it answers; `None` (skip) when moto is missing and
    /// `WEIR_REQUIRE_S3` is not `1`.
    ///
    /// # Panics
    /// When moto is required but missing, or does not start within 30 s.
    pub fn start() -> Option<MotoProcess> {
        if !moto_installed() {
            if std::env::var("WEIR_REQUIRE_S3").is_ok_and(|v| v == "1") {
                panic!(
                    "WEIR_REQUIRE_S3=1 but moto's server is not installed \
                     (python3 -m pip install 'moto[server]')"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!! SKIPPING S3 backend test: moto is not installed \
                 (pip install 'moto[server]'; WEIR_REQUIRE_S3=1 makes this fail) !!!!!!\n"
            );
            return None;
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let Ok(port) = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
            else {
                continue;
            };
            let mut child = match Command::new(python())
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => panic!("starting moto: {e}"),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("moto exited: {status}");
                    break;
                }
                if http(port, "GET", "/").is_some() {
                    return Some(MotoProcess { child, port });
                }
                if Instant::now() > deadline {
                    last_err = "moto did not answer within 30 s".into();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start moto: {last_err}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create a bucket in the server (moto does not check signatures).
    ///
    /// # Panics
    /// When moto refuses.
    pub fn create_bucket(&self, name: &str) {
        let status = http(self.port, "PUT", &format!("/{name}"));
        assert_eq!(status, Some(200), "creating bucket {name} in moto");
    }

    /// An `--objects` URL for `bucket`/`prefix` on this server.
    pub fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1",
            self.endpoint()
        )
    }

    /// Credentials moto accepts (any).
    pub fn credentials() -> super::remote::Credentials {
        super::remote::Credentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        }
    }
}

impl Drop for MotoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
