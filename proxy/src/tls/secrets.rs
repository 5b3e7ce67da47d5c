//! SDS secrets: one [`SecretRegistry`] per proxy (keyed by its stats [`Store`]) holding the
//! current value of every secret TLS contexts reference, from ADS (by name) or from files
//! (`path_config_source`, Envoy's file SDS: a `DiscoveryResponse`-shaped YAML/JSON with
//! `resources: [{"@type": ...Secret, name, ...}]`).
//!
//! Rotation: every change bumps the registry's generation; a TLS context compares the
//! generation it was built at on each new handshake and rebuilds its rustls config when it
//! moved (see [`super::server::ServerTls`]). Established connections keep the config they
//! shook hands with.
//!
//! File sources are polled (like [`crate::xds::fs`]) every [`POLL_INTERVAL`] by one thread
//! per registry, which notices atomic swaps in a `watched_directory` and in-place writes
//! alike. A file that cannot be read or parsed keeps the last good secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3 as pb;

use super::config::{SdsRef, SecretValue};
use crate::config::Errors;
use crate::stats::Store;

/// How often file secrets are re-read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Current secrets of one proxy.
#[derive(Debug, Default)]
pub struct SecretRegistry {
    generation: AtomicU64,
    values: RwLock<HashMap<String, Arc<SecretValue>>>,
    /// Watched files -> hash of the content last applied.
    files: Mutex<HashMap<PathBuf, u64>>,
    watcher_started: std::sync::atomic::AtomicBool,
    /// ADS secret names TLS contexts use, alive while their context is.
    wanted: Mutex<Vec<(String, Weak<()>)>>,
}

/// Registries by the stats store of their proxy.
type Registries = Mutex<Vec<(Weak<Store>, Arc<SecretRegistry>)>>;

fn registries() -> &'static Registries {
    static R: std::sync::OnceLock<Registries> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

/// The registry of the proxy whose stats live in `store`.
pub fn registry(store: &Arc<Store>) -> Arc<SecretRegistry> {
    let mut r = registries().lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|(s, _)| s.strong_count() > 0);
    if let Some((_, reg)) = r
        .iter()
        .find(|(s, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(store)))
    {
        return reg.clone();
    }
    let reg = Arc::new(SecretRegistry::default());
    r.push((Arc::downgrade(store), reg.clone()));
    reg
}

impl SecretRegistry {
    /// Changes with every secret update.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current value of `key` (see [`SdsRef::key`]).
    pub fn get(&self, key: &str) -> Option<Arc<SecretValue>> {
        self.values
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Set (or replace) a secret; a value equal to the current one changes nothing.
    pub fn set(&self, key: String, v: SecretValue) {
        let mut m = self.values.write().unwrap_or_else(|e| e.into_inner());
        if m.get(&key).is_some_and(|old| **old == v) {
            return;
        }
        m.insert(key, Arc::new(v));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Register interest in an SDS secret: ADS names are subscribed while the returned
    /// token lives; file sources start being watched.
    pub fn want(self: &Arc<Self>, r: &SdsRef) -> Arc<()> {
        let token = Arc::new(());
        match &r.source {
            crate::config::source::SourceKind::Ads => {
                let mut w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
                w.retain(|(_, t)| t.strong_count() > 0);
                w.push((r.name.clone(), Arc::downgrade(&token)));
            }
            crate::config::source::SourceKind::Path { .. } => self.watch(r),
        }
        token
    }

    /// ADS secret names some live TLS context uses (the SDS subscription).
    pub fn wanted_ads(&self) -> std::collections::BTreeSet<String> {
        let w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        w.iter()
            .filter(|(_, t)| t.strong_count() > 0)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Remove an ADS secret (removed by the server).
    pub fn remove(&self, key: &str) {
        let mut m = self.values.write().unwrap_or_else(|e| e.into_inner());
        if m.remove(key).is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// All secrets (admin `/certs`, `/config_dump`).
    pub fn all(&self) -> Vec<(String, Arc<SecretValue>)> {
        let m = self.values.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Make sure a file-sourced secret is loaded and watched. Loads synchronously the first
    /// time (so a listener built now can serve at once).
    pub fn watch(self: &Arc<Self>, r: &SdsRef) {
        let Some(path) = super::config::file_path(r) else {
            return;
        };
        let first = {
            let mut f = self.files.lock().unwrap_or_else(|e| e.into_inner());
            if f.contains_key(path) {
                false
            } else {
                f.insert(path.clone(), 0);
                true
            }
        };
        if first {
            self.reload(path);
        }
        let weak = Arc::downgrade(self);
        if !self.watcher_started.swap(true, Ordering::AcqRel) {
            let spawned = std::thread::Builder::new()
                .name("weir-sds-files".into())
                .spawn(move || {
                    while let Some(reg) = weak.upgrade() {
                        let paths: Vec<PathBuf> = reg
                            .files
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .keys()
                            .cloned()
                            .collect();
                        for p in paths {
                            reg.reload(&p);
                        }
                        drop(reg);
                        std::thread::sleep(POLL_INTERVAL);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the SDS file watcher");
            }
        }
    }

    /// Re-read `path` and apply its secrets when the content changed.
    fn reload(&self, path: &Path) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "SDS file unreadable; keeping the last good secrets");
                return;
            }
        };
        let h = crate::upstream::lb::xxhash::xxhash64(text.as_bytes()) | 1;
        {
            let f = self.files.lock().unwrap_or_else(|e| e.into_inner());
            if f.get(path) == Some(&h) {
                return;
            }
        }
        match parse_file(&text, path) {
            Ok(secrets) => {
                for (name, v) in secrets {
                    self.set(format!("file:{}#{}", path.display(), name), v);
                }
                self.files
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path.to_path_buf(), h);
                tracing::info!(path = %path.display(), "SDS file applied");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "SDS file rejected; keeping the last good secrets")
            }
        }
    }
}

/// A file SDS source's secrets.
pub fn parse_file(text: &str, path: &Path) -> Result<Vec<(String, SecretValue)>, String> {
    let (_, resources) = crate::xds::fs::parse(text, weir_xds_api::type_urls::SECRET, path)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut errs = Errors::default();
    for (i, r) in resources.iter().enumerate() {
        let s: pb::Secret = weir_xds_api::unpack(&r.body).map_err(|e| e.to_string())?;
        if let Some(v) = super::config::secret(&s, &format!("resources[{i}]"), &mut errs) {
            out.push(v);
        }
    }
    if !errs.is_empty() {
        return Err(errs
            .0
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect::<Vec<_>>()
            .join("; "));
    }
    Ok(out)
}
