//! Who is connected and what they accepted: one entry per open xDS stream (node, protocol,
//! per-type sent and ACKed versions, last NACK), and the last NACK per node and type, kept
//! after the stream closes so an operator can still see why a proxy refused a config.
//!
//! Updates happen on ACK/NACK/push, never per data-plane request; a plain mutex is enough.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::metrics::Protocol;
use crate::resource::short_name;

/// At most this many nodes' NACK records are kept (the oldest record goes first).
const MAX_NACK_NODES: usize = 10_000;

/// A NACK as received.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NackRecord {
    /// The version the client rejected (what the server sent with that nonce).
    pub version: String,
    /// The nonce of the rejected response.
    pub nonce: String,
    /// `error_detail.code` (a gRPC status code).
    pub code: i32,
    /// `error_detail.message`: the client's reason, naming the bad resources.
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeStatus {
    /// Version last sent.
    pub sent_version: Option<String>,
    /// Version last ACKed.
    pub acked_version: Option<String>,
    /// Last NACK on this stream.
    pub last_nack: Option<NackRecord>,
}

/// One connected xDS client.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyStatus {
    /// Server-side stream id.
    pub stream_id: u64,
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`.
    pub node_cluster: String,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// Peer address, when known.
    pub peer: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    /// Per short type name (`lds`, `rds`, `cds`, `eds`, `sds`).
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Debug, Default)]
struct Inner {
    streams: BTreeMap<u64, ProxyStatus>,
    nacks: HashMap<String, BTreeMap<String, NackRecord>>,
}

/// The registry of connected clients; see the module docs.
#[derive(Debug, Default)]
pub struct StatusRegistry {
    inner: Mutex<Inner>,
}

/// The registry's view for `weir-cp status`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    /// Connected clients, by stream id.
    pub proxies: Vec<ProxyStatus>,
    /// Last NACK per node id and short type, including nodes no longer connected.
    pub nacks: BTreeMap<String, BTreeMap<String, NackRecord>>,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StatusRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a stream; it is removed when the returned handle drops.
    pub fn register(
        self: &Arc<Self>,
        stream_id: u64,
        node_id: &str,
        node_cluster: &str,
        protocol: Protocol,
        peer: Option<String>,
    ) -> StreamStatus {
        self.lock().streams.insert(
            stream_id,
            ProxyStatus {
                stream_id,
                node_id: node_id.into(),
                node_cluster: node_cluster.into(),
                protocol: protocol.as_str().into(),
                peer,
                connected_at_ms: now_ms(),
                types: BTreeMap::new(),
            },
        );
        StreamStatus {
            id: stream_id,
            node_id: node_id.into(),
            registry: self.clone(),
        }
    }

    /// A snapshot of everything.
    pub fn report(&self) -> StatusReport {
        let inner = self.lock();
        StatusReport {
            proxies: inner.streams.values().cloned().collect(),
            nacks: inner
                .nacks
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// A stream's handle on the registry.
#[derive(Debug)]
pub struct StreamStatus {
    id: u64,
    node_id: String,
    registry: Arc<StatusRegistry>,
}

impl StreamStatus {
    fn with_type(&self, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        let mut inner = self.registry.lock();
        if let Some(s) = inner.streams.get_mut(&self.id) {
            f(s.types.entry(short_name(type_url).into()).or_default());
        }
    }

    /// A response of `version` was sent.
    pub fn sent(&self, type_url: &str, version: &str) {
        self.with_type(type_url, |t| t.sent_version = Some(version.into()));
    }

    /// `version` was ACKed.
    pub fn acked(&self, type_url: &str, version: &str) {
        self.with_type(type_url, |t| t.acked_version = Some(version.into()));
    }

    /// A NACK arrived.
    pub fn nacked(&self, type_url: &str, rec: NackRecord) {
        self.with_type(type_url, |t| t.last_nack = Some(rec.clone()));
        let mut inner = self.registry.lock();
        if !inner.nacks.contains_key(&self.node_id) && inner.nacks.len() >= MAX_NACK_NODES {
            // Drop the node whose latest NACK is oldest.
            let oldest = inner
                .nacks
                .iter()
                .min_by_key(|(_, m)| m.values().map(|r| r.at_ms).max().unwrap_or(0))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                inner.nacks.remove(&k);
            }
        }
        inner
            .nacks
            .entry(self.node_id.clone())
            .or_default()
            .insert(short_name(type_url).into(), rec);
    }
}

impl Drop for StreamStatus {
    fn drop(&mut self) {
        self.registry.lock().streams.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_xds_api::type_urls;

    #[test]
    fn streams_come_and_go_nacks_stay() {
        let reg = Arc::new(StatusRegistry::default());
        let s = reg.register(1, "n1", "c1", Protocol::Sotw, None);
        s.sent(type_urls::CLUSTER, "v1");
        s.acked(type_urls::CLUSTER, "v1");
        s.nacked(
            type_urls::LISTENER,
            NackRecord {
                version: "v2".into(),
                nonce: "3".into(),
                code: 3,
                message: "bad".into(),
                at_ms: 1,
            },
        );
        let r = reg.report();
        assert_eq!(r.proxies.len(), 1);
        let p = &r.proxies[0];
        assert_eq!(p.types["cds"].acked_version.as_deref(), Some("v1"));
        assert_eq!(
            p.types["lds"]
                .last_nack
                .as_ref()
                .map(|n| n.message.as_str()),
            Some("bad")
        );
        drop(s);
        let r = reg.report();
        assert!(r.proxies.is_empty());
        assert_eq!(r.nacks["n1"]["lds"].version, "v2");
    }
}
