//! The registry as an xDS [`Source`] (name `registry`, one group for every node).
//!
//! Each service with at least one instance becomes:
//! - a `Cluster` named by the service: `type: EDS`,
//!   `eds_cluster_config: {eds_config: {ads: {}, resource_api_version: V3}}`,
//!   `connect_timeout` [`CONNECT_TIMEOUT`], `lb_policy: ROUND_ROBIN`;
//! - a `ClusterLoadAssignment` with `cluster_name` = the service: one `LocalityLbEndpoints`
//!   per distinct (region, zone, sub_zone) in sorted order (priority 0), each holding its
//!   instances sorted by id as `LbEndpoint`s with the socket address, `load_balancing_weight`
//!   = the weight, `health_status` (HEALTHY → `HEALTHY`, UNHEALTHY → `UNHEALTHY`, UNKNOWN →
//!   `UNKNOWN`, which Envoy routes to like a host without health checking), the instance id
//!   as `endpoint.hostname`, and `metadata.filter_metadata["weir.registry"]` with
//!   `instance_id`, `tags` and `metadata`.
//!
//! The operator's config comes after this source, so an operator resource of the same type
//! and name replaces the generated one.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use weir_xds_api::pb::envoy::config::cluster::v3::{Cluster, cluster};
use weir_xds_api::pb::envoy::config::core::v3::{
    self as core, AggregatedConfigSource, ApiVersion, ConfigSource, Locality, Metadata,
    SocketAddress, config_source, socket_address,
};
use weir_xds_api::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use weir_xds_api::pb::google::protobuf::{
    self as gpb, ListValue, Struct, UInt32Value, Value, value,
};

use super::{Registry, pb};
use crate::cache::{NodeMeta, Source};
use crate::resource::Resource;

/// `connect_timeout` of generated clusters.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The filter metadata namespace carrying registry data on each endpoint.
pub const METADATA_NAMESPACE: &str = "weir.registry";

/// The generated cluster of `service`.
pub fn cluster_for(service: &str) -> Cluster {
    Cluster {
        name: service.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(gpb::Duration {
            seconds: CONNECT_TIMEOUT.as_secs() as i64,
            nanos: 0,
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.into())),
    }
}

fn endpoint_of(i: &pb::Instance) -> LbEndpoint {
    let health = match i.status() {
        pb::HealthStatus::Healthy => core::HealthStatus::Healthy,
        pb::HealthStatus::Unhealthy => core::HealthStatus::Unhealthy,
        pb::HealthStatus::Unknown => core::HealthStatus::Unknown,
    };
    let mut md = BTreeMap::new();
    md.insert("instance_id".to_string(), string(&i.instance_id));
    if !i.tags.is_empty() {
        md.insert(
            "tags".into(),
            Value {
                kind: Some(value::Kind::ListValue(ListValue {
                    values: i.tags.iter().map(|t| string(t)).collect(),
                })),
            },
        );
    }
    if !i.metadata.is_empty() {
        md.insert(
            "metadata".into(),
            Value {
                kind: Some(value::Kind::StructValue(Struct {
                    fields: i
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), string(v)))
                        .collect(),
                })),
            },
        );
    }
    LbEndpoint {
        health_status: health as i32,
        load_balancing_weight: Some(UInt32Value { value: i.weight }),
        metadata: Some(Metadata {
            filter_metadata: [(
                METADATA_NAMESPACE.to_string(),
                Struct {
                    fields: md.into_iter().collect(),
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(SocketAddress {
                    address: i.address.clone(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(i.port)),
                    ..Default::default()
                })),
            }),
            hostname: i.instance_id.clone(),
            ..Default::default()
        })),
    }
}

/// The load assignment of `service` from its instances (any order).
pub fn cla_for<'a>(
    service: &str,
    instances: impl IntoIterator<Item = &'a pb::Instance>,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(String, String, String), Vec<&pb::Instance>> = BTreeMap::new();
    for i in instances {
        let l = i.locality.clone().unwrap_or_default();
        by_locality
            .entry((l.region, l.zone, l.sub_zone))
            .or_default()
            .push(i);
    }
    let endpoints = by_locality
        .into_iter()
        .map(|((region, zone, sub_zone), mut insts)| {
            insts.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
            let locality = (!(region.is_empty() && zone.is_empty() && sub_zone.is_empty()))
                .then_some(Locality {
                    region,
                    zone,
                    sub_zone,
                });
            LocalityLbEndpoints {
                locality,
                lb_endpoints: insts.into_iter().map(endpoint_of).collect(),
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: service.into(),
        endpoints,
        ..Default::default()
    }
}

/// Every generated resource (clusters and load assignments) for `instances` sorted by service.
pub fn resources_for(instances: &mut dyn Iterator<Item = &pb::Instance>) -> Vec<Arc<Resource>> {
    let mut by_service: BTreeMap<&str, Vec<&pb::Instance>> = BTreeMap::new();
    for i in instances {
        by_service.entry(i.service.as_str()).or_default().push(i);
    }
    let mut out = Vec::with_capacity(by_service.len() * 2);
    for (service, insts) in by_service {
        out.push(Arc::new(Resource::new(
            service,
            weir_xds_api::pack(&cluster_for(service)),
        )));
        out.push(Arc::new(Resource::new(
            service,
            weir_xds_api::pack(&cla_for(service, insts)),
        )));
    }
    out
}

impl Source for Registry {
    fn name(&self) -> &str {
        "registry"
    }

    fn group(&self, _node: &NodeMeta) -> String {
        String::new()
    }

    fn resources(&self, _node: &NodeMeta) -> Vec<Arc<Resource>> {
        self.with_instances(resources_for)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        Registry::subscribe(self)
    }
}
