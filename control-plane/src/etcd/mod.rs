//! weir-cp's etcd backends (`weir-cp serve --store etcd://host:port[,host:port…][/prefix]`):
//! the KV store, the service registry and the operator's xDS config kept in etcd, so several
//! weir-cp replicas share one state and each serves xDS from it.
//!
//! ## Layout
//! - this file: [`EtcdUrl`] (parsing `--store`), [`Etcd`] (a connected client plus the key
//!   prefix, and a small runtime that lets the synchronous storage traits call etcd), errors.
//! - [`kv`]: [`kv::EtcdKv`], a [`crate::kv::KvBackend`] mapping each call 1:1 to etcd
//!   under `<prefix>/kv/`.
//! - [`registry`]: [`registry::EtcdRegistryBackend`], the registry's storage
//!   [`Backend`](crate::registry::Backend) under `<prefix>/registry/`, and the watch that
//!   brings other replicas' changes into the local registry.
//! - [`config`]: the operator config's storage under `<prefix>/config/` (version counter,
//!   history, payloads, heads) and its watch.
//! - [`testing`]: an etcd process for tests (`etcd` binary, temp dir, free ports).
//!
//! See `docs/design/etcd.md` for the key layout, the consistency model and failure behaviour.

pub mod config;
pub mod kv;
pub mod registry;
pub mod testing;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long connecting (and each later request's connection attempt) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline of one etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The default key prefix when `--store` names none.
pub const DEFAULT_PREFIX: &str = "/weir";

/// etcd errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// `--store` is malformed.
    #[error("--store {url}: {msg}")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong.
        msg: String,
    },
    /// etcd could not be reached or answered with an error.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// An etcd request did not finish within [`REQUEST_TIMEOUT`].
    #[error("etcd: request timed out after {0:?}")]
    Timeout(Duration),
    /// Stored data does not decode.
    #[error("etcd: corrupt entry {key}: {msg}")]
    Corrupt {
        /// The key (lossy UTF-8).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A compare-and-swap lost a race too many times, or the runtime is gone.
    #[error("etcd: {0}")]
    Conflict(String),
}

/// A parsed `etcd://host:port[,host:port…][/prefix][?options]`.
///
/// Options (query parameters):
/// - `user=NAME`: etcd authentication; the password comes from `password_file=PATH` (the
///   file's first line) or the `WEIR_ETCD_PASSWORD` environment variable.
/// - `tls=true`, `ca_file=PATH` (PEM CA bundle; default: the system roots are not loaded, so
///   give one), `cert_file=PATH` + `key_file=PATH` (a client certificate for etcd's
///   `--client-cert-auth`), `domain=NAME` (the name to verify instead of the host). Any of
///   the file options implies `tls=true`; endpoints are then `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `http://host:port` (or `https://` with TLS) for each endpoint.
    pub endpoints: Vec<String>,
    /// The key prefix (no trailing `/`), [`DEFAULT_PREFIX`] when absent.
    pub prefix: String,
    /// `user` and its password.
    pub auth: Option<(String, Password)>,
    /// TLS towards etcd.
    pub tls: Option<EtcdTls>,
}

/// A password (redacted in `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// TLS options of `--store etcd://…?tls=true&…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA certificates that sign etcd's server certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate (with `key_file`).
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<std::path::PathBuf>,
    /// The server name to verify (default: the endpoint's host).
    pub domain: Option<String>,
}

impl std::str::FromStr for EtcdUrl {
    type Err = EtcdError;

    fn from_str(url: &str) -> Result<Self, EtcdError> {
        let bad = |msg: &str| EtcdError::BadUrl {
            url: url.into(),
            msg: msg.into(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("expected etcd://host:port[,host:port...][/prefix][?options]"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut user = None;
        let mut password_file = None;
        let mut tls_on = false;
        let mut tls = EtcdTls::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| bad("a query value is not UTF-8"))?
                .into_owned();
            if v.is_empty() {
                return Err(bad(&format!("{k} needs a value")));
            }
            match k {
                "user" => user = Some(v),
                "password_file" => password_file = Some(std::path::PathBuf::from(v)),
                "tls" => {
                    tls_on = match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("tls is true or false")),
                    }
                }
                "ca_file" => tls.ca_file = Some(v.into()),
                "cert_file" => tls.cert_file = Some(v.into()),
                "key_file" => tls.key_file = Some(v.into()),
                "domain" => tls.domain = Some(v),
                other => return Err(bad(&format!("unknown option {other:?}"))),
            }
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(bad("cert_file and key_file go together"));
        }
        tls_on |= tls != EtcdTls::default();
        let auth = match (user, password_file) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad("password_file without user")),
            (Some(u), Some(f)) => {
                let raw = std::fs::read_to_string(&f)
                    .map_err(|e| bad(&format!("reading password_file {}: {e}", f.display())))?;
                let pw = raw.lines().next().unwrap_or("").to_string();
                Some((u, Password(pw)))
            }
            (Some(u), None) => {
                let pw = std::env::var("WEIR_ETCD_PASSWORD").map_err(|_| {
                    bad("user needs password_file=PATH or WEIR_ETCD_PASSWORD in the environment")
                })?;
                Some((u, Password(pw)))
            }
        };
        let scheme = if tls_on { "https" } else { "http" };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, DEFAULT_PREFIX),
        };
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            prefix
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let h = h.trim();
            let (host, port) = h
                .rsplit_once(':')
                .ok_or_else(|| bad("endpoint needs :port"))?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("bad endpoint {h:?}")));
            }
            endpoints.push(format!("{scheme}://{h}"));
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: prefix.into(),
            auth,
            tls: tls_on.then_some(tls),
        })
    }
}

/// A connected etcd client and the key prefix, shared by the three backends.
///
/// The registry's and the operator config's storage traits are synchronous (the embedded
/// backend is redb); [`Etcd::block`] runs an etcd call on this client's own small runtime
/// and waits for it, so it works from any thread, inside or outside an async context.
pub struct Etcd {
    client: etcd_client::Client,
    prefix: String,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside an async context; don't wait.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// etcd-client's TLS options from the files of `t`.
fn tls_options(t: &EtcdTls) -> Result<etcd_client::TlsOptions, EtcdError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| EtcdError::BadUrl {
            url: p.display().to_string(),
            msg: format!("reading a TLS file: {e}"),
        })
    };
    let mut o = etcd_client::TlsOptions::new();
    if let Some(ca) = &t.ca_file {
        o = o.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let (Some(c), Some(k)) = (&t.cert_file, &t.key_file) {
        o = o.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
    }
    if let Some(d) = &t.domain {
        o = o.domain_name(d.clone());
    }
    Ok(o)
}

impl Etcd {
    /// Connect to `url` (blocking: usable from sync code and from inside a runtime).
    pub fn connect(url: &EtcdUrl) -> Result<Arc<Etcd>, EtcdError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weir-cp-etcd")
            .enable_all()
            .build()
            .map_err(|e| EtcdError::Conflict(format!("starting the etcd runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let endpoints = url.endpoints.clone();
        let tls = match &url.tls {
            Some(t) => Some(tls_options(t)?),
            None => None,
        };
        let auth = url.auth.clone();
        let connected = run_on(&handle, async move {
            let mut opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT)
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                .with_keep_alive_while_idle(true);
            if let Some(t) = tls {
                opts = opts.with_tls(t);
            }
            if let Some((user, pw)) = auth {
                opts = opts.with_user(user, pw.0);
            }
            let mut c = etcd_client::Client::connect(endpoints, Some(opts)).await?;
            // Fail now, not on the first request, when etcd is not there.
            c.status().await?;
            Ok::<_, EtcdError>(c)
        });
        let client = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) | Err(e) => {
                // Dropping a runtime blocks, which panics inside an async context.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(Arc::new(Etcd {
            client,
            prefix: url.prefix.clone(),
            runtime: Some(runtime),
            handle,
        }))
    }

    /// The key prefix (no trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key prefix of one subsystem: `<prefix>/<name>/`.
    pub fn namespace(&self, name: &str) -> Vec<u8> {
        format!("{}/{name}/", self.prefix).into_bytes()
    }

    /// A clone of the client (cheap: clients share one channel).
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    /// The runtime the client's connections live on (background tasks go here too).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Run `fut` (given a client clone) on the etcd runtime and wait for it, bounded by
    /// [`REQUEST_TIMEOUT`].
    pub fn block<T, F, Fut>(&self, f: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: FnOnce(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, EtcdError>> + Send + 'static,
    {
        let fut = f(self.client.clone());
        run_on(&self.handle, async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(EtcdError::Timeout(REQUEST_TIMEOUT)),
            }
        })?
    }
}

/// Spawn `fut` on `handle` and wait for its output on this thread (never `block_on`, which
/// would panic inside an async context).
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, EtcdError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| EtcdError::Conflict("the etcd runtime stopped".into()))
}

/// The end of the range of keys starting with `prefix` (etcd's `\0` for "to the end").
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    crate::kv::prefix_end(prefix).unwrap_or_else(|| vec![0])
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379".parse().expect("url");
        assert_eq!(u.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        let u: EtcdUrl = "etcd://a:1,b:2/mesh/prod/".parse().expect("url");
        assert_eq!(u.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(u.prefix, "/mesh/prod");
        let u: EtcdUrl = "etcd://a:1/".parse().expect("url");
        assert_eq!(u.prefix, DEFAULT_PREFIX);
        for bad in [
            "http://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:x",
            "etcd://a:0",
            "etcd://:1",
            "etcd://a:1,,b:2",
        ] {
            assert!(
                matches!(bad.parse::<EtcdUrl>(), Err(EtcdError::BadUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_auth_and_tls_options() {
        let dir = std::env::temp_dir().join(format!("weir-etcd-url-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\nignored\n").expect("write");
        let u: EtcdUrl = format!("etcd://a:1/p?user=weir&password_file={}", pw.display())
            .parse()
            .expect("url");
        assert_eq!(u.endpoints, ["http://a:1"]);
        assert_eq!(u.auth, Some(("weir".into(), Password("s3cret".into()))));
        assert!(
            !format!("{u:?}").contains("s3cret"),
            "the password is redacted"
        );
        assert_eq!(u.tls, None);
        let u: EtcdUrl =
            "etcd://a:1,b:2?ca_file=/ca.pem&cert_file=/c.pem&key_file=/k.pem&domain=etcd.local"
                .parse()
                .expect("url");
        assert_eq!(u.endpoints, ["https://a:1", "https://b:2"]);
        let t = u.tls.expect("tls");
        assert_eq!(t.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(t.domain.as_deref(), Some("etcd.local"));
        let u: EtcdUrl = "etcd://a:1?tls=true".parse().expect("url");
        assert_eq!(u.endpoints, ["https://a:1"]);
        for bad in [
            "etcd://a:1?password_file=/x".to_string(),
            "etcd://a:1?cert_file=/c.pem".into(),
            "etcd://a:1?tls=maybe".into(),
            "etcd://a:1?bogus=1".into(),
            "etcd://a:1?user=".into(),
            format!(
                "etcd://a:1?user=u&password_file={}",
                dir.join("missing").display()
            ),
        ] {
            assert!(
                matches!(bad.parse::<EtcdUrl>(), Err(EtcdError::BadUrl { .. })),
                "{bad}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/w/kv/"), b"/w/kv0".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
