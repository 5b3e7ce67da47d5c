//! Filesystem xDS: `path_config_source` (and the deprecated `path`) for users with no control
//! plane.
//!
//! Each file holds a `DiscoveryResponse` in YAML or JSON, as Envoy's filesystem subscriptions
//! read it: `version_info` and `resources`, each `@type`-tagged. One task polls every file
//! that a config source names (the LDS/CDS files of the bootstrap, the RDS files of connection
//! managers, the EDS files of clusters) once per [`POLL_INTERVAL`], and re-applies a file
//! when its content changed. Envoy watches `watched_directory` (or the file's directory) for
//! moves with inotify; polling content notices the same atomic swaps (`mv`, symlink flips)
//! and also in-place writes, with no platform dependency. A file that cannot be read or
//! parsed is logged and counted (`update_failure`); the last good config keeps serving.
//!
//! LDS and CDS files are the whole set of their type (a listener or cluster missing from the
//! file is removed); RDS and EDS files carry the route configs / assignments they carry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse;

use super::dynamic::resource_name;
use super::{CLUSTER, Dynamic, LISTENER, Resource};

/// How often files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Why a file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a DiscoveryResponse.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with its field path.
        message: String,
    },
    /// Resources were rejected.
    #[error("{path}: {message}")]
    Rejected {
        /// The file.
        path: String,
        /// The rejected resources.
        message: String,
    },
}

/// Parse a DiscoveryResponse file's text into `(version_info, resources)`. Resources whose
/// `@type` is not `type_url` are an error.
pub fn parse(
    text: &str,
    type_url: &str,
    path: &Path,
) -> Result<(String, Vec<Resource>), FileError> {
    let resp: DiscoveryResponse = weir_xds_api::from_yaml(text).map_err(|e| FileError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(resp.resources.len());
    let mut errs = Vec::new();
    for (i, any) in resp.resources.iter().enumerate() {
        match resource_name(type_url, any) {
            Ok(name) => out.push(Resource {
                name,
                version: resp.version_info.clone(),
                body: any.clone(),
            }),
            Err(e) => errs.push(format!("resources[{i}]: {e}")),
        }
    }
    if !errs.is_empty() {
        return Err(FileError::Parse {
            path: path.display().to_string(),
            message: errs.join("; "),
        });
    }
    Ok((resp.version_info, out))
}

/// Read and apply one file.
pub fn load(dynamic: &Arc<Dynamic>, type_url: &str, path: &Path) -> Result<(), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    apply_text(dynamic, type_url, path, &text)
}

fn apply_text(
    dynamic: &Arc<Dynamic>,
    type_url: &str,
    path: &Path,
    text: &str,
) -> Result<(), FileError> {
    let (mut version, resources) = parse(text, type_url, path)?;
    if version.is_empty() {
        version = format!(
            "{:016x}",
            crate::upstream::lb::xxhash::xxhash64(text.as_bytes())
        );
    }
    let full_state = matches!(type_url, LISTENER | CLUSTER);
    dynamic
        .apply(type_url, &version, resources, &[], full_state)
        .map_err(|e| FileError::Rejected {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Poll the files named by config sources until `stop`.
pub async fn run(dynamic: Arc<Dynamic>, stop: CancellationToken) {
    // (type, path) -> hash of the content last seen (applied or not).
    let mut seen: HashMap<(&'static str, PathBuf), u64> = HashMap::new();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sources = dynamic.file_sources();
        seen.retain(|(t, p), _| sources.iter().any(|(st, sp, _)| st == t && sp == p));
        for (ty, path, _dir) in sources {
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) => {
                    let key = (ty, path.clone());
                    // Report a missing/unreadable file once per change of state.
                    if seen.insert(key, 0) != Some(0) {
                        tracing::warn!(path = %path.display(), error = %e, "xDS file unreadable; keeping the last good config");
                        dynamic.update_failed(ty);
                    }
                    continue;
                }
            };
            let h = crate::upstream::lb::xxhash::xxhash64(text.as_bytes()) | 1;
            if seen.get(&(ty, path.clone())) == Some(&h) {
                continue;
            }
            seen.insert((ty, path.clone()), h);
            match apply_text(&dynamic, ty, &path, &text) {
                Ok(()) => tracing::info!(path = %path.display(), type_url = ty, "xDS file applied"),
                Err(e @ FileError::Rejected { .. }) => {
                    tracing::warn!("xDS file partly rejected: {e}")
                }
                Err(e) => {
                    dynamic.update_failed(ty);
                    tracing::warn!("xDS file not applied: {e}")
                }
            }
        }
    }
}
