//! xDS resources as the server holds them: a name, its type URL, the encoded `Any`, and a
//! content hash used as the per-resource version (delta xDS) and, combined over a type, as the
//! per-type `version_info` (state of the world).
//!
//! Versions are content hashes (64-bit FNV-1a, hex) rather than counters so that they are
//! stable across restarts: a proxy that reconnects with the version it already has is not sent
//! the same resources again, and an unchanged type never gets a new version because something
//! else changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use weir_xds_api::Any;
use weir_xds_api::type_urls;

/// The resource types weir-cp serves, in the order a change is pushed when several types
/// change at once (make-before-break: clusters before the endpoints they need, both before
/// the listeners and routes that reference them; secrets last, as go-control-plane does).
pub const PUSH_ORDER: &[&str] = &[
    type_urls::CLUSTER,
    type_urls::CLUSTER_LOAD_ASSIGNMENT,
    type_urls::LISTENER,
    type_urls::ROUTE_CONFIGURATION,
    type_urls::SECRET,
];

/// Whether `type_url` is one weir-cp serves.
pub fn is_served_type(type_url: &str) -> bool {
    PUSH_ORDER.contains(&type_url)
}

/// Types whose SotW request with no names is a wildcard ("give me everything"): LDS and CDS.
pub fn sotw_wildcard_type(type_url: &str) -> bool {
    type_url == type_urls::LISTENER || type_url == type_urls::CLUSTER
}

/// A short label for a type URL, used in metrics and logs (`lds`, `rds`, `cds`, `eds`, `sds`).
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        type_urls::LISTENER => "lds",
        type_urls::ROUTE_CONFIGURATION => "rds",
        type_urls::CLUSTER => "cds",
        type_urls::CLUSTER_LOAD_ASSIGNMENT => "eds",
        type_urls::SECRET => "sds",
        _ => "other",
    }
}

/// 64-bit FNV-1a: stable across processes and Rust versions (unlike `DefaultHasher`).
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Feed bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Feed a length-prefixed field, so that ("ab","c") and ("a","bc") differ.
    pub fn field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    /// The hash.
    pub fn finish(self) -> u64 {
        self.0
    }

    /// The hash as 16 lowercase hex digits.
    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// One named resource of one type.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The resource name (`Listener.name`, `Cluster.name`, `ClusterLoadAssignment.cluster_name`,
    /// ...).
    pub name: String,
    /// The resource, packed.
    pub any: Any,
    /// Content hash of the packed resource (type URL and bytes), hex: the delta `version`.
    pub version: String,
}

impl Resource {
    /// Wrap a packed resource, computing its version.
    pub fn new(name: impl Into<String>, any: Any) -> Self {
        let mut h = Fnv::default();
        h.field(any.type_url.as_bytes());
        h.field(&any.value);
        Resource {
            name: name.into(),
            any,
            version: h.hex(),
        }
    }

    /// The type URL.
    pub fn type_url(&self) -> &str {
        &self.any.type_url
    }
}

/// All resources of one type for one node group, by name, with the type's version.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeResources {
    /// Resources by name.
    pub items: BTreeMap<String, Arc<Resource>>,
    /// Hash over every (name, version): the SotW `version_info` of this type.
    pub version: String,
}

impl Default for TypeResources {
    fn default() -> Self {
        Self::from_iter(std::iter::empty())
    }
}

impl FromIterator<Arc<Resource>> for TypeResources {
    /// Build from resources (a later one with the same name replaces an earlier one).
    fn from_iter<I: IntoIterator<Item = Arc<Resource>>>(resources: I) -> Self {
        let items: BTreeMap<String, Arc<Resource>> =
            resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        let version = Self::version_of(&items);
        TypeResources { items, version }
    }
}

impl TypeResources {
    fn version_of(items: &BTreeMap<String, Arc<Resource>>) -> String {
        let mut h = Fnv::default();
        for (name, r) in items {
            h.field(name.as_bytes());
            h.field(r.version.as_bytes());
        }
        h.hex()
    }
}

/// The name an xDS resource is known by, from its packed form; `None` when the type is not one
/// weir-cp serves or the bytes do not decode.
pub fn resource_name(any: &Any) -> Option<String> {
    use weir_xds_api::pb::envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    };
    use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    match any.type_url.as_str() {
        type_urls::LISTENER => weir_xds_api::unpack::<Listener>(any).ok().map(|m| m.name),
        type_urls::ROUTE_CONFIGURATION => weir_xds_api::unpack::<RouteConfiguration>(any)
            .ok()
            .map(|m| m.name),
        type_urls::CLUSTER => weir_xds_api::unpack::<Cluster>(any).ok().map(|m| m.name),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => weir_xds_api::unpack::<ClusterLoadAssignment>(any)
            .ok()
            .map(|m| m.cluster_name),
        type_urls::SECRET => weir_xds_api::unpack::<Secret>(any).ok().map(|m| m.name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(url: &str, bytes: &[u8]) -> Any {
        Any {
            type_url: url.into(),
            value: bytes.to_vec(),
        }
    }

    #[test]
    fn fnv_known_vectors() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(Fnv::default().finish(), 0xcbf29ce484222325);
        let mut h = Fnv::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
        let mut h = Fnv::default();
        h.write(b"foobar");
        assert_eq!(h.finish(), 0x85944171f73967e8);
    }

    #[test]
    fn versions_follow_content_only() {
        let a = Resource::new("a", any(type_urls::CLUSTER, b"x"));
        let a2 = Resource::new("a", any(type_urls::CLUSTER, b"x"));
        let b = Resource::new("a", any(type_urls::CLUSTER, b"y"));
        assert_eq!(a.version, a2.version);
        assert_ne!(a.version, b.version);
        let t1 = TypeResources::from_iter([Arc::new(a.clone())]);
        let t2 = TypeResources::from_iter([Arc::new(a2)]);
        let t3 = TypeResources::from_iter([Arc::new(b)]);
        assert_eq!(t1.version, t2.version);
        assert_ne!(t1.version, t3.version);
        // Renaming changes the type version even with identical bytes.
        let renamed = Resource::new("z", a.any.clone());
        assert_ne!(
            TypeResources::from_iter([Arc::new(renamed)]).version,
            t1.version
        );
        // Empty is a version too, distinct from any non-empty set.
        assert_ne!(TypeResources::default().version, t1.version);
    }

    #[test]
    fn names_of_packed_resources() {
        use weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        let cla = ClusterLoadAssignment {
            cluster_name: "c1".into(),
            ..Default::default()
        };
        assert_eq!(
            resource_name(&weir_xds_api::pack(&cla)).as_deref(),
            Some("c1")
        );
        assert_eq!(resource_name(&any("type.googleapis.com/x.Y", b"")), None);
        assert_eq!(resource_name(&any(type_urls::CLUSTER, b"\xff\xff")), None);
    }
}
