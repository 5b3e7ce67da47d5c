//! `envoy.filters.network.rbac`: Envoy's RBAC engine ([`weir_filters::rbac`]) applied to
//! connections.
//!
//! A filter chain's network RBAC filters (before its terminal filter) are evaluated once per
//! connection, after the TLS handshake (so [`ConnInfo`] carries the peer identity and SNI) and
//! before the terminal filter runs. A denied connection is closed (after `delay_deny`, if
//! set). Principals see `source_ip` / `direct_remote_ip` / `remote_ip` = the peer, and the
//! peer certificate (`authenticated`); permissions see the local address
//! (`destination_ip` / `_port`) and the SNI. Header and `url_path` rules never match on a
//! connection (Envoy evaluates them against an empty header map).
//!
//! `enforcement_type`: both values are accepted and behave the same. Envoy evaluates on the
//! first byte; weir evaluates when the connection is set up (a denied client that never
//! writes is closed at once instead of when it writes). `CONTINUOUS` re-evaluates in Envoy
//! only when dynamic metadata changes, which weir has none of, so one evaluation is all.
//!
//! Stats (Envoy names): `<stat_prefix>.rbac.{allowed,denied}` and
//! `<stat_prefix>.rbac.<shadow_rules_stat_prefix>{shadow_allowed,shadow_denied}`.

use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use weir_filters::rbac::{RbacEngine, RbacInput};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::extensions::filters::network::rbac::v3 as pb;

use super::ConnInfo;
use crate::config::{Errors, TranslateCtx, join};
use crate::route::filters::{ProxyFactoryContext, merge_errors};

/// Envoy's `statPrefixJoin`.
fn stat_prefix_join(prefix: &str, token: &str) -> String {
    if prefix.is_empty() {
        token.to_string()
    } else if prefix.ends_with('.') {
        format!("{prefix}{token}")
    } else {
        format!("{prefix}.{token}")
    }
}

/// `<stat_prefix>.rbac.*`.
#[derive(Debug, Clone)]
pub struct NetworkRbacStats {
    /// `allowed`.
    pub allowed: Counter,
    /// `denied`.
    pub denied: Counter,
    /// `<shadow prefix>shadow_allowed`.
    pub shadow_allowed: Counter,
    /// `<shadow prefix>shadow_denied`.
    pub shadow_denied: Counter,
}

/// A translated `envoy.filters.network.rbac`.
#[derive(Debug)]
pub struct NetworkRbac {
    rules: Option<RbacEngine>,
    shadow: Option<RbacEngine>,
    delay_deny: Option<Duration>,
    stats: NetworkRbacStats,
}

impl NetworkRbac {
    /// Translate the filter's `typed_config` at `path`.
    pub fn translate(
        any: &Any,
        path: &str,
        ctx: &TranslateCtx<'_>,
        errs: &mut Errors,
    ) -> Option<NetworkRbac> {
        let c: pb::Rbac = match weir_xds_api::unpack(any) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        errs.reject_unsupported(
            &c,
            &[
                "rules",
                "shadow_rules",
                "shadow_rules_stat_prefix",
                "stat_prefix",
                "enforcement_type",
                "delay_deny",
            ],
            path,
        );
        let before = errs.0.len();
        if c.stat_prefix.is_empty() {
            errs.add(join(path, "stat_prefix"), "stat_prefix is required");
        }
        if pb::rbac::EnforcementType::try_from(c.enforcement_type).is_err() {
            errs.add(join(path, "enforcement_type"), "unknown enforcement type");
        }
        let delay_deny = c.delay_deny.as_ref().and_then(|d| {
            if d.seconds < 0 || d.nanos < 0 {
                errs.add(join(path, "delay_deny"), "must be non-negative");
                None
            } else {
                Some(Duration::new(d.seconds as u64, d.nanos as u32)).filter(|d| !d.is_zero())
            }
        });
        let fctx = ProxyFactoryContext {
            ctx,
            hcm_prefix: "",
        };
        let mut ferrs = weir_filters::ConfigErrors::default();
        let rules = c
            .rules
            .as_ref()
            .and_then(|r| RbacEngine::translate(r, &join(path, "rules"), &fctx, &mut ferrs));
        let shadow = c
            .shadow_rules
            .as_ref()
            .and_then(|r| RbacEngine::translate(r, &join(path, "shadow_rules"), &fctx, &mut ferrs));
        merge_errors(errs, ferrs);
        if errs.0.len() != before {
            return None;
        }
        let dotted = stat_prefix_join(&c.stat_prefix, "rbac.");
        let scope = ctx
            .stats
            .tagged(&dotted, "envoy_rbac_", "envoy_rbac_prefix", &c.stat_prefix);
        let shadow_prefix = &c.shadow_rules_stat_prefix;
        Some(NetworkRbac {
            rules,
            shadow,
            delay_deny,
            stats: NetworkRbacStats {
                allowed: scope.counter("allowed"),
                denied: scope.counter("denied"),
                shadow_allowed: scope.counter(&format!("{shadow_prefix}shadow_allowed")),
                shadow_denied: scope.counter(&format!("{shadow_prefix}shadow_denied")),
            },
        })
    }

    /// Evaluate for a connection (shadow rules counted only); `false` = close it.
    pub fn allows(&self, info: &ConnInfo) -> bool {
        let input = RbacInput {
            direct_remote: info.direct_peer,
            source: info.peer,
            remote: info.peer,
            local: info.local,
            tls: info.tls.as_deref(),
            request: None,
        };
        if let Some(s) = &self.shadow {
            if s.evaluate(&input).allowed {
                self.stats.shadow_allowed.increment(1);
            } else {
                self.stats.shadow_denied.increment(1);
            }
        }
        let Some(rules) = &self.rules else {
            return true;
        };
        let d = rules.evaluate(&input);
        if d.allowed {
            self.stats.allowed.increment(1);
        } else {
            self.stats.denied.increment(1);
            tracing::debug!(peer = %info.peer, policy = d.policy.unwrap_or("none"),
                "network rbac: connection denied");
        }
        d.allowed
    }
}

/// Run a chain's network RBAC filters in order; `false` when one denies (after its
/// `delay_deny`): the caller closes the connection.
pub async fn admit(filters: &[Arc<NetworkRbac>], info: &ConnInfo) -> bool {
    for f in filters {
        if !f.allows(info) {
            if let Some(d) = f.delay_deny {
                tokio::time::sleep(d).await;
            }
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;
    use weir_filters::{DownstreamTls, PeerCert};

    fn translate(yaml: &str, store: &Arc<Store>) -> Result<NetworkRbac, Vec<(String, String)>> {
        let c: pb::Rbac = weir_xds_api::from_yaml(yaml).expect("yaml");
        let clusters = std::collections::HashSet::new();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: store,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let r = NetworkRbac::translate(&weir_xds_api::pack(&c), "f", &ctx, &mut errs);
        if errs.0.is_empty() {
            Ok(r.expect("filter"))
        } else {
            Err(errs.0.into_iter().map(|e| (e.path, e.message)).collect())
        }
    }

    fn conn(peer: &str, local: &str, tls: Option<DownstreamTls>) -> ConnInfo {
        ConnInfo {
            peer: peer.parse().expect("peer"),
            local: local.parse().expect("local"),
            direct_peer: peer.parse().expect("peer"),
            local_restored: false,
            buffer_limit: 0,
            drain: Default::default(),
            hard_stop: Default::default(),
            tls: tls.map(Arc::new),
        }
    }

    fn stat(store: &Arc<Store>, name: &str) -> String {
        store
            .render_text()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn denies_by_source_and_port_with_envoy_stats() {
        let store = Store::new();
        let f = translate(
            "
stat_prefix: tcp_in
shadow_rules_stat_prefix: dry_
rules:
  action: DENY
  policies:
    blocked:
      permissions: [{destination_port: 9000}]
      principals: [{source_ip: {address_prefix: 127.0.0.2, prefix_len: 32}}]
shadow_rules:
  action: ALLOW
  policies:
    mesh:
      permissions: [{any: true}]
      principals: [{authenticated: {principal_name: {exact: 'spiffe://td/ns/a/sa/front'}}}]
enforcement_type: CONTINUOUS
",
            &store,
        )
        .expect("valid");
        assert!(f.allows(&conn("127.0.0.1:1", "127.0.0.1:9000", None)));
        assert!(!f.allows(&conn("127.0.0.2:1", "127.0.0.1:9000", None)));
        assert!(f.allows(&conn("127.0.0.2:1", "127.0.0.1:9001", None)));
        let front = DownstreamTls {
            terminated: true,
            peer: Some(PeerCert {
                uri_sans: vec!["spiffe://td/ns/a/sa/front".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            admit(
                &[Arc::new(f)],
                &conn("127.0.0.1:1", "127.0.0.1:1", Some(front))
            )
            .await
        );
        assert_eq!(stat(&store, "tcp_in.rbac.allowed"), "3");
        assert_eq!(stat(&store, "tcp_in.rbac.denied"), "1");
        assert_eq!(stat(&store, "tcp_in.rbac.dry_shadow_allowed"), "1");
        assert_eq!(stat(&store, "tcp_in.rbac.dry_shadow_denied"), "3");
    }

    #[tokio::test(start_paused = true)]
    async fn delay_deny_waits_before_closing() {
        let store = Store::new();
        let f = translate(
            "
stat_prefix: 'x.'
delay_deny: 2s
rules: {action: ALLOW}
",
            &store,
        )
        .expect("valid");
        let t0 = tokio::time::Instant::now();
        assert!(!admit(&[Arc::new(f)], &conn("127.0.0.1:1", "127.0.0.1:2", None)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        assert_eq!(stat(&store, "x.rbac.denied"), "1");
    }

    #[test]
    fn config_errors() {
        let store = Store::new();
        let e = translate("rules: {action: ALLOW}", &store).expect_err("invalid");
        assert_eq!(e[0].0, "f.stat_prefix");
        let e = translate("stat_prefix: s\nmatcher: {}", &store).expect_err("invalid");
        assert_eq!(e[0].0, "f.matcher");
        let e = translate(
            "stat_prefix: s\nrules: {policies: {p: {permissions: [{metadata: {}}], principals: [{any: true}]}}}",
            &store,
        )
        .expect_err("invalid");
        assert_eq!(e[0].0, "f.rules.policies[p].permissions[0].metadata");
        assert_eq!(stat_prefix_join("", "rbac."), "rbac.");
        assert_eq!(stat_prefix_join("a.", "rbac."), "a.rbac.");
        assert_eq!(stat_prefix_join("a", "rbac."), "a.rbac.");
    }
}
