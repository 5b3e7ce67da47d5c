//! Envoy's `ConfigSource`: where a dynamic resource comes from.
//!
//! weir supports the two sources Envoy users deploy: the bootstrap's ADS stream (`ads: {}`)
//! and the filesystem (`path_config_source`, or the deprecated `path`), which is re-read when
//! the file changes (see [`crate::xds::fs`]). Per-type gRPC `api_config_source`s are refused
//! with a pointer to ADS: one ordered stream is what make-before-break needs.

use std::path::PathBuf;
use std::time::Duration;

use weir_xds_api::pb::envoy::config::core::v3 as core;

use super::{Errors, duration, join};

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where resources of one kind come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// The bootstrap's `ads_config` stream.
    Ads,
    /// A file holding a `DiscoveryResponse` (YAML or JSON).
    Path {
        /// The file.
        path: PathBuf,
        /// `watched_directory.path`: changes in this directory trigger a reload (Envoy's way
        /// to pick up a symlink swap). weir also notices changes of the file itself.
        watched_directory: Option<PathBuf>,
    },
}

/// A translated `ConfigSource`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigSource {
    /// Where resources come from.
    pub kind: SourceKind,
    /// `initial_fetch_timeout` (default 15 s; `0s` = wait forever): how long a resource may
    /// keep what depends on it warming.
    pub initial_fetch_timeout: Option<Duration>,
}

impl ConfigSource {
    /// The ADS source with Envoy's default initial fetch timeout.
    pub fn ads() -> Self {
        Self {
            kind: SourceKind::Ads,
            initial_fetch_timeout: Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
        }
    }
}

/// Translate a `ConfigSource` at `path`.
pub fn translate(cs: &core::ConfigSource, path: &str, errs: &mut Errors) -> Option<ConfigSource> {
    use core::config_source::ConfigSourceSpecifier as S;
    errs.reject_unsupported(
        cs,
        &[
            "path",
            "path_config_source",
            "ads",
            "api_config_source",
            "initial_fetch_timeout",
            "resource_api_version",
        ],
        path,
    );
    #[allow(deprecated)]
    let v2 = core::ApiVersion::V2 as i32;
    if cs.resource_api_version == v2 {
        errs.add(
            join(path, "resource_api_version"),
            "only the v3 xDS API is supported (resource_api_version: V3)",
        );
    }
    let initial_fetch_timeout = match &cs.initial_fetch_timeout {
        None => Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
        Some(d) => {
            let d = duration(d, &join(path, "initial_fetch_timeout"), errs);
            (!d.is_zero()).then_some(d)
        }
    };
    let kind = match &cs.config_source_specifier {
        Some(S::Ads(_)) => SourceKind::Ads,
        #[allow(deprecated)]
        Some(S::Path(p)) => file_source(p, None, &join(path, "path"), errs)?,
        Some(S::PathConfigSource(p)) => {
            let pp = join(path, "path_config_source");
            errs.reject_unsupported(p, &["path", "watched_directory"], &pp);
            let dir = p.watched_directory.as_ref().map(|w| PathBuf::from(&w.path));
            if let Some(d) = &dir
                && d.as_os_str().is_empty()
            {
                errs.add(
                    join(&pp, "watched_directory.path"),
                    "watched_directory.path must not be empty",
                );
            }
            file_source(&p.path, dir, &join(&pp, "path"), errs)?
        }
        Some(S::ApiConfigSource(_)) => {
            errs.add(
                join(path, "api_config_source"),
                "per-type xDS streams are not supported; use `ads: {}` with the bootstrap's \
                 dynamic_resources.ads_config",
            );
            return None;
        }
        Some(_) => {
            errs.add(
                path,
                "this config source is not supported (use ads or path_config_source)",
            );
            return None;
        }
        None => {
            errs.add(
                path,
                "a config source (ads or path_config_source) is required",
            );
            return None;
        }
    };
    Some(ConfigSource {
        kind,
        initial_fetch_timeout,
    })
}

fn file_source(
    p: &str,
    watched_directory: Option<PathBuf>,
    path: &str,
    errs: &mut Errors,
) -> Option<SourceKind> {
    if p.is_empty() {
        errs.add(path, "path is required");
        return None;
    }
    Some(SourceKind::Path {
        path: PathBuf::from(p),
        watched_directory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(y: &str) -> (Option<ConfigSource>, Vec<String>) {
        let pb: core::ConfigSource = weir_xds_api::from_yaml(y).expect("yaml");
        let mut errs = Errors::default();
        let r = translate(&pb, "cs", &mut errs);
        (r, errs.0.into_iter().map(|e| e.path).collect())
    }

    #[test]
    fn ads_and_files() {
        let (r, e) = cs("ads: {}\nresource_api_version: V3\n");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(r, Some(ConfigSource::ads()));
        let (r, e) = cs(
            "path_config_source: {path: /etc/weir/lds.yaml, watched_directory: {path: /etc/weir}}\ninitial_fetch_timeout: 0s\n",
        );
        assert!(e.is_empty(), "{e:?}");
        let r = r.expect("source");
        assert_eq!(r.initial_fetch_timeout, None);
        assert_eq!(
            r.kind,
            SourceKind::Path {
                path: "/etc/weir/lds.yaml".into(),
                watched_directory: Some("/etc/weir".into())
            }
        );
        let (r, e) = cs("path: /x.yaml\ninitial_fetch_timeout: 2s\n");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            r.expect("source").initial_fetch_timeout,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn refused_sources_name_the_field() {
        assert_eq!(
            cs("api_config_source: {api_type: GRPC}\n").1,
            ["cs.api_config_source"]
        );
        assert_eq!(cs("{}").1, ["cs"]);
        assert_eq!(
            cs("path_config_source: {}\n").1,
            ["cs.path_config_source.path"]
        );
        assert_eq!(
            cs("ads: {}\nresource_api_version: V2\n").1,
            ["cs.resource_api_version"]
        );
        assert_eq!(
            cs("path_config_source: {path: /a, poll_interval: 1s}\n").1,
            ["cs.path_config_source.poll_interval"]
        );
    }
}
