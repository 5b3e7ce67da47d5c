//! EDS: a `ClusterLoadAssignment` replaces an EDS cluster's host set in place.
//!
//! Hosts are matched by address. A host whose weight, priority and locality are unchanged is
//! the same `Arc<Host>` (its stats, health-check streaks, outlier state and pooled connections
//! carry on) and only its EDS health bit follows the new `health_status`. A host whose weight,
//! priority or locality changed is a new `Host` (the load balancers read these as plain
//! fields) that inherits the old one's active-health and outlier bits and its slow-start
//! clock, so a weight change never takes a healthy host out of rotation. New addresses are new
//! hosts (failed until their first health check when checks are configured, as in Envoy).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::lb::HostSet;
use super::{Cluster, EndpointAddress, EndpointConfig, Host, health_flags};

impl Cluster {
    /// Replace the endpoints of an EDS cluster (or any cluster whose endpoints are IPs) and
    /// mark it warm. Returns whether the host set changed. Safe to call while requests pick
    /// hosts: the set is swapped atomically; pickers holding the old set finish with it.
    pub fn set_endpoints(&self, endpoints: &[EndpointConfig]) -> bool {
        let old = self.host_set.load_full();
        let by_address: std::collections::HashMap<std::net::SocketAddr, &Arc<Host>> =
            old.hosts.iter().map(|h| (h.address, h)).collect();
        let hc = !self.config.health_checks.is_empty();
        let mut changed = false;
        let by_endpoint: Vec<Vec<Arc<Host>>> = endpoints
            .iter()
            .map(|e| {
                let EndpointAddress::Ip(addr) = e.address else {
                    // EDS endpoints are translated as IPs; a DNS name has no host here.
                    return Vec::new();
                };
                let prev = by_address.get(&addr).copied();
                let host = match prev {
                    Some(h)
                        if h.weight == e.weight
                            && h.priority == e.priority
                            && h.locality == e.locality =>
                    {
                        let eds = e.health & health_flags::FAILED_EDS_HEALTH;
                        let before = if eds != 0 {
                            h.health
                                .fetch_or(health_flags::FAILED_EDS_HEALTH, Ordering::AcqRel)
                        } else {
                            h.health
                                .fetch_and(!health_flags::FAILED_EDS_HEALTH, Ordering::AcqRel)
                        };
                        if before & health_flags::FAILED_EDS_HEALTH != eds {
                            changed = true;
                            if before & !health_flags::FAILED_EDS_HEALTH == 0 && eds == 0 {
                                h.mark_healthy_since(std::time::Instant::now());
                            }
                        }
                        h.clone()
                    }
                    Some(h) => {
                        let inherited =
                            h.health.load(Ordering::Acquire) & !health_flags::FAILED_EDS_HEALTH;
                        let n = Host::new(addr, e.hostname.clone(), e.weight, e.priority, 0)
                            .with_locality(e.locality.clone());
                        n.health.store(inherited | e.health, Ordering::Release);
                        n.set_healthy_since_nanos(h.healthy_since_nanos());
                        Arc::new(n)
                    }
                    None => {
                        let flags = if hc {
                            health_flags::FAILED_ACTIVE_HC
                        } else {
                            0
                        };
                        Arc::new(
                            Host::new(
                                addr,
                                e.hostname.clone(),
                                e.weight,
                                e.priority,
                                e.health | flags,
                            )
                            .with_locality(e.locality.clone()),
                        )
                    }
                };
                vec![host]
            })
            .collect();
        if changed || !old.same_hosts(&by_endpoint) {
            self.host_set.store(Arc::new(HostSet::new(by_endpoint)));
            // The health checker starts sessions for new hosts and stops those of gone ones.
            self.hosts_changed.send_replace(());
            changed = true;
        }
        self.warmed.cancel();
        changed
    }

    /// Whether the cluster had its first endpoints (EDS), DNS resolution (STRICT_DNS) and
    /// initial health checks.
    pub fn is_warm(&self) -> bool {
        self.warmed.is_cancelled() && self.hc_warmed.is_cancelled()
    }

    /// Whether the SDS secrets of the cluster's TLS transport socket arrived (or warming
    /// stopped waiting for them). Clusters added over CDS warm on this too; static ones are
    /// covered by the server's bounded wait for secrets at start.
    pub fn secrets_warm(&self) -> bool {
        if self.tls_warmed.is_cancelled() {
            return true;
        }
        if self.tls.as_ref().is_none_or(|t| t.secrets_ready()) {
            self.tls_warmed.cancel();
            return true;
        }
        false
    }

    /// Resolves once the cluster is warm (see [`Cluster::is_warm`]).
    pub async fn warm(&self) {
        self.warmed.cancelled().await;
        self.hc_warmed.cancelled().await;
    }

    /// [`Cluster::warm`], then [`Cluster::secrets_warm`]. SDS secrets arrive through the
    /// shared registry, which is polled (warming only, never per request).
    pub async fn warm_with_secrets(&self) {
        self.warm().await;
        while !self.secrets_warm() {
            tokio::select! {
                _ = self.tls_warmed.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(25)) => {}
            }
        }
    }

    /// Give up waiting for the first endpoints and secrets (`initial_fetch_timeout`): the
    /// cluster counts as warm with whatever it has (no hosts for EDS; handshakes fail until
    /// the secrets arrive).
    pub fn force_warm(&self) {
        self.warmed.cancel();
        self.hc_warmed.cancel();
        self.tls_warmed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;
    use crate::upstream::{ClusterConfig, LocalityConfig};

    fn cluster(hc: bool) -> Cluster {
        let yaml = if hc {
            "name: e\ntype: EDS\neds_cluster_config: {eds_config: {ads: {}}}\nhealth_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}]\n"
        } else {
            "name: e\ntype: EDS\neds_cluster_config: {eds_config: {ads: {}}}\n"
        };
        let pb = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = crate::config::Errors::default();
        let cfg: ClusterConfig =
            crate::upstream::translate_cluster(&pb, "c", &mut errs).expect("cluster");
        assert!(errs.is_empty(), "{:?}", errs.0);
        Cluster::new(Arc::new(cfg), &Store::new())
    }

    fn ep(port: u16, weight: u32, health: u32) -> EndpointConfig {
        EndpointConfig {
            address: EndpointAddress::Ip(([10, 0, 0, 1], port).into()),
            hostname: None,
            weight,
            priority: 0,
            locality: None,
            health,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn warming_waits_for_the_tls_sds_secret() {
        let yaml = "name: s\ntype: STATIC\nload_assignment: {cluster_name: s, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 1}}}}]}]}\ntransport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n    common_tls_context:\n      validation_context_sds_secret_config: {name: ROOTCA-warming-test, sds_config: {ads: {}}}\n";
        let pb = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = crate::config::Errors::default();
        let cfg = crate::upstream::translate_cluster(&pb, "c", &mut errs).expect("cluster");
        assert!(errs.is_empty(), "{:?}", errs.0);
        let c = Cluster::new(Arc::new(cfg), &Store::new());
        // Static hosts, no health checks: only the secret is missing.
        assert!(c.is_warm());
        assert!(!c.secrets_warm());
        let waiting =
            tokio::time::timeout(std::time::Duration::from_secs(1), c.warm_with_secrets()).await;
        assert!(waiting.is_err(), "warm_with_secrets() waits for the secret");
        // initial_fetch_timeout: warming gives up and the cluster is used as it is.
        c.force_warm();
        assert!(c.secrets_warm());
        c.warm_with_secrets().await;
        // Without TLS nothing is awaited.
        assert!(cluster_static().secrets_warm());
    }

    fn cluster_static() -> Cluster {
        let pb = weir_xds_api::from_yaml(
            "name: p\ntype: STATIC\nload_assignment: {cluster_name: p, endpoints: []}\n",
        )
        .expect("yaml");
        let mut errs = crate::config::Errors::default();
        let cfg = crate::upstream::translate_cluster(&pb, "c", &mut errs).expect("cluster");
        Cluster::new(Arc::new(cfg), &Store::new())
    }

    #[test]
    fn warms_on_first_assignment_and_keeps_hosts() {
        let c = cluster(false);
        assert!(!c.is_warm());
        assert!(c.hosts().is_empty());
        assert!(c.set_endpoints(&[ep(1, 1, 0), ep(2, 1, 0)]));
        assert!(c.is_warm());
        let before = c.hosts();
        // Same endpoints: nothing changes, same Arcs.
        assert!(!c.set_endpoints(&[ep(1, 1, 0), ep(2, 1, 0)]));
        assert!(Arc::ptr_eq(&before[0], &c.hosts()[0]));
        // One removed, one added: the survivor is the same host.
        assert!(c.set_endpoints(&[ep(2, 1, 0), ep(3, 1, 0)]));
        let after = c.hosts();
        assert!(Arc::ptr_eq(&before[1], &after[0]));
        assert_eq!(after[1].address.port(), 3);
    }

    #[test]
    fn eds_health_flips_in_place() {
        let c = cluster(false);
        c.set_endpoints(&[ep(1, 1, 0)]);
        let h = c.hosts()[0].clone();
        assert!(c.set_endpoints(&[ep(1, 1, health_flags::FAILED_EDS_HEALTH)]));
        assert!(Arc::ptr_eq(&h, &c.hosts()[0]));
        assert!(!h.is_healthy());
        assert!(c.set_endpoints(&[ep(1, 1, 0)]));
        assert!(h.is_healthy());
    }

    #[test]
    fn weight_change_keeps_health_state() {
        let c = cluster(true);
        c.set_endpoints(&[ep(1, 1, 0)]);
        let h = c.hosts()[0].clone();
        // New hosts of a health-checked cluster wait for their first check.
        assert_eq!(
            h.health.load(Ordering::Relaxed),
            health_flags::FAILED_ACTIVE_HC
        );
        h.health.store(0, Ordering::Relaxed);
        assert!(c.set_endpoints(&[ep(1, 7, 0)]));
        let n = c.hosts()[0].clone();
        assert!(!Arc::ptr_eq(&h, &n));
        assert_eq!(n.weight, 7);
        assert!(n.is_healthy(), "a weight change must not fail the host");
        let mut moved = ep(1, 7, 0);
        moved.locality = Some(LocalityConfig {
            zone: "z".into(),
            ..Default::default()
        });
        assert!(c.set_endpoints(&[moved]));
        assert_eq!(
            c.hosts()[0].locality.as_ref().map(|l| l.zone.as_str()),
            Some("z")
        );
    }
}
