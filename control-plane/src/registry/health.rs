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
