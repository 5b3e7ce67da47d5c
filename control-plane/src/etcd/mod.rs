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

/// A parsed `etcd://host:port[,host:port…][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `http://host:port` for each endpoint.
    pub endpoints: Vec<String>,
    /// The key prefix (no trailing `/`), [`DEFAULT_PREFIX`] when absent.
    pub prefix: String,
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
            .ok_or_else(|| bad("expected etcd://host:port[,host:port...][/prefix]"))?;
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
            endpoints.push(format!("http://{h}"));
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: prefix.into(),
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
        let connected = run_on(&handle, async move {
            let opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT)
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                .with_keep_alive_while_idle(true);
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
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/w/kv/"), b"/w/kv0".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
