//! Network-namespace harness for the sidecar tests.
//!
//! [`Net::new`] creates a hub namespace (IP forwarding on) and one namespace per member, each
//! joined to the hub by a veth pair on its own /24 (`10.77.<i>.2`, gateway `10.77.<i>.1`)
//! and its own IPv6 /64 (`fd77:<i>::2`, gateway `fd77:<i>::1`; added with `nodad` so the
//! addresses are usable at once).
//! Namespace names are unique per process and test (`w<pid>-<n>-<role>`); dropping the
//! [`Net`] deletes every namespace (and with it the veths and iptables rules), also when
//! the test panics.
//!
//! In-test sockets live in a namespace by being created on a short-lived thread that has
//! `setns`-ed into it ([`in_ns`]); the socket keeps its namespace afterwards, so it is handed
//! to tokio as usual. Processes (weir, weir-init) run under `ip netns exec`; weir runs as a
//! separate uid/gid (`setpriv`) so interception rules can exclude its own traffic.
//!
//! [`skip`] decides what happens when the machine cannot do this (not root, no `ip`, no
//! iptables): the test prints why and returns, unless `WEIR_REQUIRE_NETNS=1`, which turns the
//! reason into a failure.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any single wait in a netns test may take.
pub const NS_WAIT: Duration = Duration::from_secs(15);

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why netns tests cannot run here, if they cannot: `ip` missing, not allowed to create a
/// namespace, or `iptables` missing.
pub fn unavailable() -> Option<String> {
    let probe = format!(
        "w{}-probe-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    if let Err(e) = sh(&["ip", "netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace ({e})"));
    }
    let r = sh(&["ip", "netns", "exec", &probe, "iptables", "-t", "nat", "-S"])
        .err()
        .map(|e| format!("iptables unusable in a namespace ({e})"));
    let _ = sh(&["ip", "netns", "del", &probe]);
    r.or_else(|| {
        sh(&["setpriv", "--version"])
            .err()
            .map(|e| format!("setpriv missing ({e})"))
    })
}

/// `true` if the test must stop here: netns cannot be used. Prints the reason; panics
/// instead when `WEIR_REQUIRE_NETNS=1`.
pub fn skip(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return false;
    };
    if std::env::var("WEIR_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: WEIR_REQUIRE_NETNS=1 but {why}");
    }
    eprintln!("SKIPPED {test}: {why} (set WEIR_REQUIRE_NETNS=1 to make this a failure)");
    true
}

/// A member namespace.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Ns {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }

    /// The member's IPv6 address with `port`.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6.into(), port)
    }
}

/// Namespaces joined through a hub; deleted on drop.
pub struct Net {
    hub: String,
    pub members: HashMap<String, Ns>,
    created: Vec<String>,
    children: Vec<Child>,
}

impl Net {
    pub fn new(roles: &[&str]) -> Result<Net, String> {
        let base = format!(
            "w{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let hub = format!("{base}-hub");
        let mut net = Net {
            hub: hub.clone(),
            members: HashMap::new(),
            created: Vec::new(),
            children: Vec::new(),
        };
        sh(&["ip", "netns", "add", &hub])?;
        net.created.push(hub.clone());
        sh(&["ip", "-n", &hub, "link", "set", "lo", "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &hub,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
        ])?;
        for (i, role) in roles.iter().enumerate() {
            let name = format!("{base}-{role}");
            let i = i + 1;
            sh(&["ip", "netns", "add", &name])?;
            net.created.push(name.clone());
            let hv = format!("h{i}");
            sh(&[
                "ip", "-n", &hub, "link", "add", &hv, "type", "veth", "peer", "name", "eth0",
                "netns", &name,
            ])?;
            sh(&[
                "ip",
                "-n",
                &hub,
                "addr",
                "add",
                &format!("10.77.{i}.1/24"),
                "dev",
                &hv,
            ])?;
            sh(&["ip", "-n", &hub, "link", "set", &hv, "up"])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.77.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{i}.1"),
            ])?;
            let (hub6, member6) = (format!("fd77:{i}::1/64"), format!("fd77:{i}::2/64"));
            sh(&["ip", "-n", &hub, "addr", "add", &hub6, "dev", &hv, "nodad"])?;
            sh(&[
                "ip", "-n", &name, "addr", "add", &member6, "dev", "eth0", "nodad",
            ])?;
            sh(&[
                "ip",
                "-n",
                &name,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd77:{i}::1"),
            ])?;
            net.members.insert(
                role.to_string(),
                Ns {
                    name,
                    ip: Ipv4Addr::new(10, 77, i as u8, 2),
                    ip6: Ipv6Addr::new(0xfd77, i as u16, 0, 0, 0, 0, 0, 2),
                },
            );
        }
        Ok(net)
    }

    pub fn ns(&self, role: &str) -> Ns {
        self.members[role].clone()
    }

    /// Run `cmd` in `role`'s namespace to completion; its stdout, or an error with stderr.
    pub fn exec(&self, role: &str, cmd: &[&str]) -> Result<String, String> {
        let ns = &self.members[role].name;
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{}` in {role}: {}{}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Start `cmd` in `role`'s namespace as `uid`/`gid` (killed when the Net drops); stderr
    /// goes to `log`.
    pub fn spawn_as(&mut self, role: &str, uid: u32, cmd: &[&str], log: &PathBuf) -> u32 {
        let ns = self.members[role].name.clone();
        let f = std::fs::File::create(log).expect("log file");
        let uid = uid.to_string();
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns, "setpriv", "--reuid", &uid, "--regid", &uid,
            ])
            .args(["--clear-groups", "--"])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn in namespace");
        let id = child.id();
        self.children.push(child);
        id
    }

    /// Stop a child started with [`spawn_as`](Self::spawn_as).
    pub fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.created.iter().rev() {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// Run `f` on a fresh thread inside namespace `ns` (sockets it creates stay there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// A tokio listener bound to `addr` inside `ns`.
pub fn bind(ns: &Ns, addr: SocketAddr) -> tokio::net::TcpListener {
    let l = in_ns(&ns.name, move || {
        let l = std::net::TcpListener::bind(addr).expect("bind in namespace");
        l.set_nonblocking(true).expect("nonblocking");
        l
    });
    tokio::net::TcpListener::from_std(l).expect("tokio listener")
}

/// A tokio stream connected from inside `ns` to `addr` (bounded by [`NS_WAIT`]).
pub async fn connect(ns: &Ns, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let name = ns.name.clone();
    let s = tokio::task::spawn_blocking(move || {
        in_ns(&name, move || {
            let s = std::net::TcpStream::connect_timeout(&addr, NS_WAIT)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
    })
    .await
    .expect("connect task")?;
    tokio::net::TcpStream::from_std(s)
}

/// A raw HTTP/1.1 GET from `ns` (Connection: close); returns (status, body).
pub async fn http_get(ns: &Ns, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = connect(ns, addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(NS_WAIT, fut)
        .await
        .map_err(|_| std::io::Error::other("timed out"))?
}

/// weir's admin `/stats` (text) read from inside `ns` at `admin`, as a map.
pub async fn stats(ns: &Ns, admin: SocketAddr) -> HashMap<String, u64> {
    let (_, body) = http_get(ns, admin, "/stats").await.expect("admin /stats");
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse::<f64>().ok()? as u64)))
        .collect()
}

/// Wait (bounded) until weir's admin in `ns` answers `/ready` with 200; the log is shown on
/// failure.
pub async fn wait_ready(ns: &Ns, admin: SocketAddr, log: &PathBuf) {
    let deadline = Instant::now() + NS_WAIT;
    while Instant::now() < deadline {
        if let Ok((200, _)) = http_get(ns, admin, "/ready").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "weir in {} not ready; log:\n{}",
        ns.name,
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A temporary file path readable by the unprivileged proxy uid.
pub fn temp_file(tag: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "weir-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&p, text).expect("write temp file");
    p
}
