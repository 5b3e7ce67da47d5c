//! `--config-dir DIR`: GitOps mode. The directory is polled; when the files of a target
//! change, their documents are combined, validated and applied as a new version (origin
//! `config-dir`).
//!
//! Layout (files ending in `.yaml`, `.yml` or `.json`; others and dot-files are ignored):
//! - `DIR/*.yaml` — the `all` target (every node);
//! - `DIR/node-cluster/NAME/*.yaml` — target `cluster:NAME`;
//! - `DIR/node/ID/*.yaml` — target `node:ID`.
//!
//! A target's files are read in name order and their `resources` concatenated. Errors are
//! reported per file (`routes.yaml: resources[1].virtual_hosts[0]...`) and logged; a refused
//! change is not retried until the files change again, and the config in force stays. A
//! target whose files this process applied and which then all disappear is applied as an
//! empty document (its resources are removed). Content equal to what is already in force
//! (e.g. after a restart) is not re-applied, so restarts do not grow the history.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_xds_api::Any;

use crate::ControlPlane;
use crate::operator::{ApplyError, Target};
use crate::resource::{Fnv, Resource};
use crate::validate::FieldError;

/// The files of one target: (file name, contents), in name order.
type Files = Vec<(String, String)>;

fn is_config_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.')
        && p.is_file()
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn read_files(dir: &Path) -> std::io::Result<Files> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_config_file(p))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, std::fs::read_to_string(&p)?));
    }
    Ok(out)
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            (!name.starts_with('.')).then_some((name, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Read every target's files under `dir`.
pub fn scan(dir: &Path) -> std::io::Result<BTreeMap<Target, Files>> {
    let mut out = BTreeMap::new();
    let top = read_files(dir)?;
    if !top.is_empty() {
        out.insert(Target::All, top);
    }
    for (kind, make) in [
        ("node-cluster", Target::NodeCluster as fn(String) -> Target),
        ("node", Target::Node as fn(String) -> Target),
    ] {
        for (name, path) in subdirs(&dir.join(kind)) {
            let files = read_files(&path)?;
            if !files.is_empty() {
                out.insert(make(name), files);
            }
        }
    }
    Ok(out)
}

fn fingerprint(files: &Files) -> u64 {
    let mut h = Fnv::default();
    for (name, text) in files {
        h.field(name.as_bytes());
        h.field(text.as_bytes());
    }
    h.finish()
}

/// Where each file's resources start in a combined document: (file name, first index).
pub type Spans = Vec<(String, usize)>;

/// Parse and concatenate a target's files; errors name the file.
pub fn combine(files: &Files) -> Result<(Vec<Any>, Spans), Vec<FieldError>> {
    let mut all = Vec::new();
    let mut spans = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in files {
        match crate::validate::parse_document(text) {
            Ok(res) => {
                spans.push((name.clone(), all.len()));
                all.extend(res);
            }
            Err(es) => errors.extend(es.into_iter().map(|e| FieldError {
                path: if e.path.is_empty() {
                    name.clone()
                } else {
                    format!("{name}: {}", e.path)
                },
                message: e.message,
            })),
        }
    }
    if errors.is_empty() {
        Ok((all, spans))
    } else {
        Err(errors)
    }
}

/// Map `resources[i]...` of the combined document back to the file it came from.
fn locate(e: FieldError, spans: &[(String, usize)]) -> FieldError {
    let Some(rest) = e.path.strip_prefix("resources[") else {
        return e;
    };
    let Some((idx, tail)) = rest.split_once(']') else {
        return e;
    };
    let Ok(i) = idx.parse::<usize>() else {
        return e;
    };
    match spans.iter().rev().find(|(_, start)| *start <= i) {
        Some((name, start)) => FieldError {
            path: format!("{name}: resources[{}]{tail}", i - start),
            message: e.message,
        },
        None => e,
    }
}

/// Digest of a document's content, comparable with [`crate::operator::OperatorConfig::head_digest`].
fn content_digest(resources: &[Any]) -> String {
    let versions: Vec<String> = resources
        .iter()
        .map(|a| Resource::new("", a.clone()).version)
        .collect();
    crate::operator::digest(versions.iter().map(String::as_str))
}

/// The state of the watcher between polls.
#[derive(Debug, Default)]
pub struct Watcher {
    seen: HashMap<Target, u64>,
}

impl Watcher {
    /// One poll: apply what changed. Returns the versions applied.
    pub fn poll(&mut self, cp: &ControlPlane, dir: &Path) -> Vec<u64> {
        let mut applied = Vec::new();
        let scanned = match scan(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read --config-dir");
                return applied;
            }
        };
        let gone: Vec<Target> = self
            .seen
            .keys()
            .filter(|t| !scanned.contains_key(*t))
            .cloned()
            .collect();
        for t in gone {
            self.seen.remove(&t);
            if cp.operator.head_version(&t).is_some() {
                match cp.apply(t.clone(), Vec::new(), "config-dir") {
                    Ok(info) => {
                        tracing::info!(target = %t, version = info.version, "config-dir: files removed, target cleared");
                        applied.push(info.version);
                    }
                    Err(e) => tracing::error!(target = %t, "config-dir: clearing failed: {e}"),
                }
            }
        }
        for (t, files) in scanned {
            let fp = fingerprint(&files);
            if self.seen.get(&t) == Some(&fp) {
                continue;
            }
            self.seen.insert(t.clone(), fp);
            let (resources, spans) = match combine(&files) {
                Ok(x) => x,
                Err(errors) => {
                    log_refusal(&t, &errors);
                    cp.metrics.config_rejected();
                    continue;
                }
            };
            if cp.operator.head_digest(&t) == Some(content_digest(&resources)) {
                continue;
            }
            match cp.apply(t.clone(), resources, "config-dir") {
                Ok(info) => {
                    tracing::info!(target = %t, version = info.version, "config-dir: applied");
                    applied.push(info.version);
                }
                Err(ApplyError::Invalid(errors)) => {
                    let errors: Vec<FieldError> =
                        errors.into_iter().map(|e| locate(e, &spans)).collect();
                    log_refusal(&t, &errors);
                }
                Err(e) => tracing::error!(target = %t, "config-dir: apply failed: {e}"),
            }
        }
        applied
    }
}

fn log_refusal(t: &Target, errors: &[FieldError]) {
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    tracing::error!(
        target = %t,
        "config-dir: refused, the config in force stays:\n  {}",
        text.join("\n  ")
    );
}

/// Poll `dir` every `interval` until `shutdown`.
pub async fn watch(
    cp: Arc<ControlPlane>,
    dir: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut watcher = Watcher::default();
    loop {
        let cp2 = cp.clone();
        let dir2 = dir.clone();
        // File reads, validation and the store commit block: keep them off the runtime.
        let result = tokio::task::spawn_blocking(move || {
            let applied = watcher.poll(&cp2, &dir2);
            (watcher, applied)
        })
        .await;
        match result {
            Ok((w, _)) => watcher = w,
            Err(e) => {
                tracing::error!("config-dir poll failed: {e}");
                watcher = Watcher::default();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_located_in_their_file() {
        let spans = vec![("a.yaml".to_string(), 0), ("b.yaml".to_string(), 2)];
        let e = locate(
            FieldError {
                path: "resources[3].name".into(),
                message: "m".into(),
            },
            &spans,
        );
        assert_eq!(e.path, "b.yaml: resources[1].name");
        let e = locate(
            FieldError {
                path: "resources[1]".into(),
                message: "m".into(),
            },
            &spans,
        );
        assert_eq!(e.path, "a.yaml: resources[1]");
        let e = locate(
            FieldError {
                path: "other".into(),
                message: "m".into(),
            },
            &spans,
        );
        assert_eq!(e.path, "other");
    }
}
