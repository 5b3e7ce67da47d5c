//! Active health checks run by weir-cp: HTTP (GET `path`, any 2xx passes), TCP (connect) and
//! gRPC (`grpc.health.v1.Health/Check`, `SERVING` passes), each bounded by its timeout.
//! Scheduling and thresholds live in [`super::Registry`]; this module runs one check.

use std::net::SocketAddr;
use std::time::Duration;

use super::{DEFAULT_INTERVAL, DEFAULT_TIMEOUT, RegistryError, check_period, invalid, pb};
use pb::check_spec::Kind;

/// Default consecutive passes to turn healthy.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
/// Default consecutive failures to turn unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;
/// Largest threshold.
pub const MAX_THRESHOLD: u32 = 100;

/// The kind of a check (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// HTTP GET.
    Http = 0,
    /// TCP connect.
    Tcp = 1,
    /// gRPC health.
    Grpc = 2,
}

impl CheckKind {
    /// Every kind.
    pub const ALL: [CheckKind; 3] = [CheckKind::Http, CheckKind::Tcp, CheckKind::Grpc];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::Grpc => "grpc",
        }
    }
}

/// A validated check with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    /// What to check.
    pub kind: Kind,
    /// Between checks.
    pub interval: Duration,
    /// One check's bound.
    pub timeout: Duration,
    /// Passes to turn healthy.
    pub healthy_threshold: u32,
    /// Failures to turn unhealthy.
    pub unhealthy_threshold: u32,
}

impl CheckConfig {
    /// From a normalized spec ([`normalize_check`]); `None` without a kind.
    pub fn from_spec(c: &pb::CheckSpec) -> Option<CheckConfig> {
        Some(CheckConfig {
            kind: c.kind.clone()?,
            interval: Duration::from_millis(c.interval_ms),
            timeout: Duration::from_millis(c.timeout_ms),
            healthy_threshold: c.healthy_threshold.max(1),
            unhealthy_threshold: c.unhealthy_threshold.max(1),
        })
    }

    /// The metric label kind.
    pub fn kind(&self) -> CheckKind {
        match self.kind {
            Kind::Http(_) => CheckKind::Http,
            Kind::Tcp(_) => CheckKind::Tcp,
            Kind::Grpc(_) => CheckKind::Grpc,
        }
    }
}

/// Validate a check spec and fill in defaults.
pub fn normalize_check(c: &pb::CheckSpec, path: &str) -> Result<pb::CheckSpec, RegistryError> {
    let kind = match &c.kind {
        None => return Err(invalid(path, "needs one of http, tcp, grpc")),
        Some(Kind::Http(h)) => {
            if !h.path.starts_with('/')
                || h.path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    &format!("{path}.http.path"),
                    format!("{:?} must start with '/' and contain no whitespace", h.path),
                ));
            }
            if h.host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(&format!("{path}.http.host"), "contains whitespace"));
            }
            Kind::Http(h.clone())
        }
        Some(k) => k.clone(),
    };
    let interval_ms = if c.interval_ms == 0 {
        DEFAULT_INTERVAL.as_millis() as u64
    } else {
        c.interval_ms
    };
    check_period(&format!("{path}.interval_ms"), interval_ms)?;
    let timeout_ms = if c.timeout_ms == 0 {
        interval_ms.min(DEFAULT_TIMEOUT.as_millis() as u64)
    } else {
        c.timeout_ms
    };
    if timeout_ms > interval_ms {
        return Err(invalid(
            &format!("{path}.timeout_ms"),
            "must not exceed interval_ms",
        ));
    }
    let threshold = |v: u32, d: u32, f: &str| -> Result<u32, RegistryError> {
        let v = if v == 0 { d } else { v };
        if v > MAX_THRESHOLD {
            return Err(invalid(
                &format!("{path}.{f}"),
                format!("must be at most {MAX_THRESHOLD}"),
            ));
        }
        Ok(v)
    };
    Ok(pb::CheckSpec {
        kind: Some(kind),
        interval_ms,
        timeout_ms,
        healthy_threshold: threshold(
            c.healthy_threshold,
            DEFAULT_HEALTHY_THRESHOLD,
            "healthy_threshold",
        )?,
        unhealthy_threshold: threshold(
            c.unhealthy_threshold,
            DEFAULT_UNHEALTHY_THRESHOLD,
            "unhealthy_threshold",
        )?,
    })
}

/// Run one check against `addr`: `Ok` when it passes, else why not.
pub async fn run_check(cfg: &CheckConfig, addr: SocketAddr) -> Result<(), String> {
    let fut = async {
        match &cfg.kind {
            Kind::Tcp(_) => tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect {addr}: {e}")),
            Kind::Http(h) => http_check(addr, h).await,
            Kind::Grpc(g) => grpc_check(addr, &g.service, cfg.timeout).await,
        }
    };
    match tokio::time::timeout(cfg.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", cfg.timeout)),
    }
}

async fn http_check(addr: SocketAddr, h: &pb::HttpCheck) -> Result<(), String> {
    use http_body_util::Empty;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http connect {addr}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let host = if h.host.is_empty() {
        addr.to_string()
    } else {
        h.host.clone()
    };
    let req = http::Request::get(h.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "weir-cp-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("http request: {e}"))?;
    let resp = send.send_request(req).await;
    conn.abort();
    let resp = resp.map_err(|e| format!("http GET {}: {e}", h.path))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("http GET {}: status {}", h.path, resp.status()))
    }
}

async fn grpc_check(addr: SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc endpoint: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("grpc connect {addr}: {e}"))?;
    let resp = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|s| format!("grpc health {service:?}: {}: {}", s.code(), s.message()))?;
    match resp.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("grpc health {service:?}: {}", other.as_str_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn cfg(kind: Kind, timeout_ms: u64) -> CheckConfig {
        CheckConfig {
            kind,
            interval: Duration::from_millis(timeout_ms),
            timeout: Duration::from_millis(timeout_ms),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }
    }

    fn http(path: &str) -> Kind {
        Kind::Http(pb::HttpCheck {
            path: path.into(),
            host: "svc.local".into(),
        })
    }

    /// A server answering each request with `status`, recording the request head.
    async fn http_server(
        status: &'static str,
    ) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(m) => n += m,
                    }
                }
                let _ = tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn http_check_passes_on_2xx_only() {
        let (ok, mut reqs) = http_server("204 No Content").await;
        run_check(&cfg(http("/healthz?deep=1"), 2_000), ok)
            .await
            .expect("204 passes");
        let head = reqs.recv().await.expect("request seen");
        assert!(
            head.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("host: svc.local"),
            "{head}"
        );
        let (bad, _reqs) = http_server("500 Internal Server Error").await;
        let err = run_check(&cfg(http("/"), 2_000), bad)
            .await
            .expect_err("500 fails");
        assert!(err.contains("500"), "{err}");
        let (redirect, _reqs) = http_server("302 Found").await;
        assert!(run_check(&cfg(http("/"), 2_000), redirect).await.is_err());
    }

    #[tokio::test]
    async fn refused_and_silent_peers_fail() {
        // A port with nothing listening.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed = l.local_addr().expect("addr");
        drop(l);
        let err = run_check(&cfg(Kind::Tcp(pb::TcpCheck {}), 2_000), closed)
            .await
            .expect_err("refused");
        assert!(err.contains("tcp connect"), "{err}");
        assert!(run_check(&cfg(http("/"), 2_000), closed).await.is_err());
        // A peer that accepts but never answers: the timeout bounds the check.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let err = run_check(&cfg(http("/"), 200), addr)
            .await
            .expect_err("timeout");
        assert!(err.contains("timed out"), "{err}");
        // TCP passes against the same peer (connect is all it needs).
        run_check(&cfg(Kind::Tcp(pb::TcpCheck {}), 2_000), addr)
            .await
            .expect("tcp connect passes");
        hold.abort();
    }

    #[tokio::test]
    async fn grpc_check_follows_the_health_service() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("db", tonic_health::ServingStatus::Serving)
            .await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
        );
        let grpc = |s: &str| Kind::Grpc(pb::GrpcCheck { service: s.into() });
        run_check(&cfg(grpc("db"), 5_000), addr)
            .await
            .expect("SERVING passes");
        run_check(&cfg(grpc(""), 5_000), addr)
            .await
            .expect("the server itself");
        reporter
            .set_service_status("db", tonic_health::ServingStatus::NotServing)
            .await;
        let err = run_check(&cfg(grpc("db"), 5_000), addr)
            .await
            .expect_err("NOT_SERVING fails");
        assert!(err.contains("NOT_SERVING"), "{err}");
        let err = run_check(&cfg(grpc("unknown"), 5_000), addr)
            .await
            .expect_err("unknown service fails");
        assert!(err.contains("grpc health"), "{err}");
        server.abort();
    }

    #[test]
    fn normalizes_defaults() {
        let c = normalize_check(
            &pb::CheckSpec {
                kind: Some(Kind::Tcp(pb::TcpCheck {})),
                interval_ms: 30_000,
                ..Default::default()
            },
            "c",
        )
        .expect("valid");
        assert_eq!((c.interval_ms, c.timeout_ms), (30_000, 5_000));
        let c = normalize_check(
            &pb::CheckSpec {
                kind: Some(Kind::Tcp(pb::TcpCheck {})),
                ..Default::default()
            },
            "c",
        )
        .expect("valid");
        assert_eq!((c.interval_ms, c.timeout_ms), (10_000, 5_000));
        assert!(
            normalize_check(
                &pb::CheckSpec {
                    kind: Some(Kind::Tcp(pb::TcpCheck {})),
                    interval_ms: 10,
                    ..Default::default()
                },
                "c",
            )
            .is_err()
        );
    }
}
