//! STRICT_DNS: resolve every endpoint hostname every `dns_refresh_rate` on the main runtime
//! and swap the cluster's host set when the addresses change.
//!
//! A host whose (endpoint, address) pair survives a refresh is the same `Arc<Host>`, so its
//! stats, health bits, health-check streaks, outlier state and pooled connections survive
//! too; a new address gets a new host (pending its first health check when one is configured). A failed resolution keeps that
//! endpoint's previous hosts (logged at warn); a successful empty one removes them.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::lb::HostSet;
use super::{
    Cluster, ClusterConfig, DnsLookupFamily, EndpointAddress, EndpointConfig, Host, health_flags,
};

/// Upper bound on one lookup (Envoy's default `dns_query_timeout`).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The host set before any resolution: IP endpoints only; DNS endpoints are empty.
pub(crate) fn initial_set(cfg: &ClusterConfig) -> HostSet {
    HostSet::new(
        cfg.endpoints
            .iter()
            .map(|e| match &e.address {
                EndpointAddress::Ip(a) => vec![new_host(cfg, e, *a)],
                EndpointAddress::Dns { .. } => Vec::new(),
            })
            .collect(),
    )
}

/// A new host; with health checks configured it starts failed until its first check passes
/// (Envoy's initial state for health-checked hosts).
fn new_host(cfg: &ClusterConfig, e: &EndpointConfig, address: SocketAddr) -> Arc<Host> {
    let hc = if cfg.health_checks.is_empty() {
        0
    } else {
        health_flags::FAILED_ACTIVE_HC
    };
    Arc::new(
        Host::new(
            address,
            e.hostname.clone(),
            e.weight,
            e.priority,
            e.health | hc,
        )
        .with_locality(e.locality.clone()),
    )
}

/// Keep the addresses of the family Envoy's `dns_lookup_family` asks for, without duplicates.
pub(crate) fn filter_family(addrs: Vec<SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let (v4, v6): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv4());
    let mut out = match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto if !v6.is_empty() => v6,
        DnsLookupFamily::Auto => v4,
        DnsLookupFamily::V4Preferred if !v4.is_empty() => v4,
        DnsLookupFamily::V4Preferred => v6,
        DnsLookupFamily::All => v4.into_iter().chain(v6).collect(),
    };
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(*a));
    out
}

/// Resolve one name.
pub(crate) async fn resolve(
    host: &str,
    port: u16,
    family: DnsLookupFamily,
) -> std::io::Result<Vec<SocketAddr>> {
    let addrs = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "DNS lookup timed out"))??;
    Ok(filter_family(addrs.collect(), family))
}

/// The next host set from per-endpoint results (`None` = failed or not a DNS endpoint: keep),
/// or `None` when nothing changed.
pub(crate) fn merge(
    cfg: &ClusterConfig,
    old: &HostSet,
    results: Vec<Option<Vec<SocketAddr>>>,
) -> Option<HostSet> {
    let by_endpoint: Vec<Vec<Arc<Host>>> = cfg
        .endpoints
        .iter()
        .zip(results)
        .enumerate()
        .map(|(i, (e, r))| {
            let prev = old.by_endpoint.get(i).map(Vec::as_slice).unwrap_or(&[]);
            match r {
                None => prev.to_vec(),
                Some(addrs) => addrs
                    .into_iter()
                    .map(|a| {
                        prev.iter()
                            .find(|h| h.address == a)
                            .cloned()
                            .unwrap_or_else(|| new_host(cfg, e, a))
                    })
                    .collect(),
            }
        })
        .collect();
    (!old.same_hosts(&by_endpoint)).then(|| HostSet::new(by_endpoint))
}

/// Resolve every DNS endpoint once.
async fn resolve_all(cfg: &ClusterConfig) -> Vec<Option<Vec<SocketAddr>>> {
    let lookups = cfg.endpoints.iter().map(|e| async move {
        let EndpointAddress::Dns { host, port } = &e.address else {
            return None;
        };
        match resolve(host, *port, cfg.dns_lookup_family).await {
            Ok(a) => Some(a),
            Err(error) => {
                tracing::warn!(cluster = %cfg.name, %host, %error,
                    "DNS resolution failed; keeping the previous hosts");
                None
            }
        }
    });
    futures::future::join_all(lookups).await
}

/// Resolve once and swap the host set if it changed. Returns whether it changed.
pub(crate) async fn refresh(cluster: &Cluster) -> bool {
    let results = resolve_all(&cluster.config).await;
    let old = cluster.host_set.load_full();
    match merge(&cluster.config, &old, results) {
        Some(new) => {
            tracing::debug!(cluster = %cluster.name(), hosts = new.hosts.len(), "hosts updated");
            // Only this loop writes a STRICT_DNS cluster's set, so load-then-store is safe.
            cluster.host_set.store(Arc::new(new));
            // The health checker starts sessions for new hosts and stops those of gone ones.
            cluster.hosts_changed.send_replace(());
            true
        }
        None => false,
    }
}

/// The refresh loop; ends when the cluster is dropped.
pub(crate) async fn run(cluster: Weak<Cluster>) {
    loop {
        let Some(c) = cluster.upgrade() else { return };
        refresh(&c).await;
        c.warmed.cancel();
        let rate = c.config.dns_refresh_rate;
        drop(c);
        tokio::time::sleep(rate).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{DiscoveryType, LbPolicy, UpstreamProtocol};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn cfg(endpoints: Vec<EndpointAddress>) -> ClusterConfig {
        ClusterConfig {
            name: "dns".into(),
            discovery: DiscoveryType::StrictDns,
            endpoints: endpoints
                .into_iter()
                .map(|address| EndpointConfig {
                    hostname: match &address {
                        EndpointAddress::Dns { host, .. } => Some(host.clone()),
                        EndpointAddress::Ip(_) => None,
                    },
                    address,
                    weight: 2,
                    priority: 1,
                    locality: None,
                    health: 0,
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            lb_policy: LbPolicy::RoundRobin,
            lb: Default::default(),
            per_connection_buffer_limit_bytes: 1 << 20,
            dns_refresh_rate: Duration::from_millis(50),
            dns_lookup_family: DnsLookupFamily::V4Only,
            protocol: UpstreamProtocol::Http1,
            idle_timeout: None,
            circuit_breakers: Default::default(),
            health_checks: Vec::new(),
            outlier: None,
            eds: None,
            tls: None,
        }
    }

    #[test]
    fn families() {
        let all = vec![addr("1.1.1.1:1"), addr("[::1]:1"), addr("1.1.1.1:1")];
        use DnsLookupFamily::*;
        assert_eq!(filter_family(all.clone(), V4Only), [addr("1.1.1.1:1")]);
        assert_eq!(filter_family(all.clone(), V6Only), [addr("[::1]:1")]);
        assert_eq!(filter_family(all.clone(), Auto), [addr("[::1]:1")]);
        assert_eq!(filter_family(all.clone(), V4Preferred), [addr("1.1.1.1:1")]);
        assert_eq!(filter_family(all.clone(), All).len(), 2);
        assert_eq!(
            filter_family(vec![addr("1.1.1.1:1")], Auto),
            [addr("1.1.1.1:1")]
        );
        assert_eq!(
            filter_family(vec![addr("[::1]:1")], V4Preferred),
            [addr("[::1]:1")]
        );
    }

    #[test]
    fn merge_keeps_hosts_and_failures() {
        let c = cfg(vec![
            EndpointAddress::Dns {
                host: "a".into(),
                port: 80,
            },
            EndpointAddress::Ip(addr("9.9.9.9:9")),
        ]);
        let s0 = initial_set(&c);
        assert_eq!(s0.hosts.len(), 1);
        let s1 = merge(
            &c,
            &s0,
            vec![Some(vec![addr("1.0.0.1:80"), addr("1.0.0.2:80")]), None],
        )
        .expect("changed");
        assert_eq!(s1.hosts.len(), 3);
        assert_eq!(s1.hosts[0].hostname.as_deref(), Some("a"));
        assert_eq!((s1.hosts[0].weight, s1.hosts[0].priority), (2, 1));
        assert!(Arc::ptr_eq(&s1.hosts[2], &s0.hosts[0]));
        s1.hosts[1]
            .stats
            .cx_total
            .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
        // Same answer: nothing to swap.
        assert!(
            merge(
                &c,
                &s1,
                vec![Some(vec![addr("1.0.0.1:80"), addr("1.0.0.2:80")]), None]
            )
            .is_none()
        );
        // Failure keeps the previous hosts.
        assert!(merge(&c, &s1, vec![None, None]).is_none());
        // One address gone, one new: the survivor keeps its stats.
        let s2 = merge(
            &c,
            &s1,
            vec![Some(vec![addr("1.0.0.2:80"), addr("1.0.0.3:80")]), None],
        )
        .expect("changed");
        assert!(Arc::ptr_eq(&s2.hosts[0], &s1.hosts[1]));
        assert_eq!(
            s2.hosts[0]
                .stats
                .cx_total
                .load(std::sync::atomic::Ordering::Relaxed),
            7
        );
        assert_eq!(s2.hosts[1].address, addr("1.0.0.3:80"));
        assert_ne!(s2.version, s1.version);
    }

    #[tokio::test]
    async fn resolves_localhost() {
        let a = resolve("localhost", 8080, DnsLookupFamily::V4Only)
            .await
            .expect("resolves");
        assert!(a.contains(&addr("127.0.0.1:8080")), "{a:?}");
    }

    #[tokio::test]
    async fn strict_dns_cluster_resolves_and_refreshes() {
        let store = crate::stats::Store::new();
        let c = Arc::new(cfg(vec![EndpointAddress::Dns {
            host: "localhost".into(),
            port: 8081,
        }]));
        let cm = crate::upstream::ClusterManager::new(&[c], &store);
        let cluster = cm.get("dns").expect("cluster");
        assert!(cluster.hosts().is_empty());
        cm.start(&tokio::runtime::Handle::current());
        tokio::time::timeout(Duration::from_secs(10), cm.initialized())
            .await
            .expect("first resolution attempted");
        let hosts = cluster.hosts();
        assert_eq!(hosts[0].address, addr("127.0.0.1:8081"));
        assert_eq!(hosts[0].hostname.as_deref(), Some("localhost"));
        // A later refresh with the same answer keeps the same host objects.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(Arc::ptr_eq(&cluster.hosts()[0], &hosts[0]));
        assert!(cluster.choose_host(&Default::default()).is_some());
    }

    #[tokio::test]
    async fn failed_resolution_keeps_nothing_new() {
        let c = cfg(vec![EndpointAddress::Dns {
            host: "no-such-host.invalid".into(),
            port: 1,
        }]);
        let results = resolve_all(&c).await;
        assert_eq!(results, vec![None]);
    }
}
