//! The snapshot cache: what each xDS client should currently have.
//!
//! Resources come from [`Source`]s (the operator's applied config today; the service registry
//! later). Each source sorts nodes into groups ([`Source::group`]); nodes whose groups agree
//! across every source share one [`Snapshot`], built once and cached until any source
//! changes. A snapshot holds, per type URL, the resources by name and the type's version
//! (a content hash, see [`crate::resource`]).
//!
//! Change notification is a generation counter ([`SnapshotCache::subscribe`]): a source bumps
//! its own counter, the cache drops its built snapshots and bumps its generation, and every
//! xDS stream wakes, fetches its node's snapshot and pushes only the types (SotW) or
//! resources (delta) whose versions differ from what it last sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::resource::{Resource, TypeResources};

/// The identity of an xDS client, from the `node` of its first request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodeMeta {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// The workload identity (SPIFFE ID) the stream may obtain a certificate for: claimed in
    /// the node's metadata and allowed for the stream's credential (see [`crate::ca`]).
    pub workload: Option<String>,
}

/// A provider of xDS resources.
///
/// Implementations must be cheap to call: [`Source::group`] runs once per stream and per
/// change, [`Source::resources`] once per group and change.
pub trait Source: Send + Sync + 'static {
    /// A short name for logs (`operator`, `registry`).
    fn name(&self) -> &str;
    /// Which of this source's groups `node` belongs to. Two nodes with the same group in every
    /// source receive identical resources. Return a constant when the source serves every
    /// node the same.
    fn group(&self, node: &NodeMeta) -> String;
    /// The resources for the group of `node` (any node of that group gives the same answer).
    fn resources(&self, node: &NodeMeta) -> Vec<Arc<Resource>>;
    /// A counter that changes whenever [`Source::resources`] or [`Source::group`] may answer
    /// differently.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// Everything one node group should have.
#[derive(Debug)]
pub struct Snapshot {
    /// The group key (the sources' groups joined).
    pub group: String,
    /// The cache generation it was built at.
    pub generation: u64,
    /// When the change that led to this generation happened (push latency is measured from
    /// here).
    pub changed_at: Instant,
    /// Resources per served type URL (every type in [`crate::resource::PUSH_ORDER`] is present,
    /// possibly empty).
    pub types: HashMap<&'static str, TypeResources>,
}

impl Snapshot {
    /// The resources of `type_url` (empty for a type that is not served).
    pub fn of(&self, type_url: &str) -> &TypeResources {
        static EMPTY: std::sync::OnceLock<TypeResources> = std::sync::OnceLock::new();
        self.types
            .get(type_url)
            .unwrap_or_else(|| EMPTY.get_or_init(TypeResources::default))
    }
}

#[derive(Debug)]
struct State {
    generation: u64,
    changed_at: Instant,
    snapshots: HashMap<String, Arc<Snapshot>>,
}

/// Builds and caches snapshots from sources; see the module docs.
pub struct SnapshotCache {
    sources: Vec<Arc<dyn Source>>,
    state: Mutex<State>,
    tx: watch::Sender<u64>,
}

impl std::fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache")
            .field(
                "sources",
                &self.sources.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl SnapshotCache {
    /// A cache over `sources`. Where two sources provide a resource of the same type and
    /// name, the later source wins (put the operator's config last so it overrides generated
    /// resources). Call [`SnapshotCache::watch_sources`] from a runtime to follow changes.
    pub fn new(sources: Vec<Arc<dyn Source>>) -> Arc<Self> {
        let (tx, _) = watch::channel(0);
        Arc::new(SnapshotCache {
            sources,
            state: Mutex::new(State {
                generation: 0,
                changed_at: Instant::now(),
                snapshots: HashMap::new(),
            }),
            tx,
        })
    }

    /// The generation counter; it changes whenever any snapshot may have changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Drop every built snapshot and wake the streams.
    pub fn invalidate(&self) {
        let generation = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.generation += 1;
            st.changed_at = Instant::now();
            st.snapshots.clear();
            st.generation
        };
        self.tx.send_replace(generation);
    }

    /// The group key of `node`.
    pub fn group_of(&self, node: &NodeMeta) -> String {
        let mut key = String::new();
        for (i, s) in self.sources.iter().enumerate() {
            if i > 0 {
                key.push('|');
            }
            key.push_str(s.name());
            key.push('=');
            key.push_str(&s.group(node));
        }
        key
    }

    /// The current snapshot for `node` (built on first use per group and generation).
    pub fn snapshot(&self, node: &NodeMeta) -> Arc<Snapshot> {
        let group = self.group_of(node);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = st.snapshots.get(&group) {
            return s.clone();
        }
        let mut by_type: HashMap<&'static str, Vec<Arc<Resource>>> = HashMap::new();
        for source in &self.sources {
            for r in source.resources(node) {
                if let Some(t) = crate::resource::PUSH_ORDER
                    .iter()
                    .find(|t| **t == r.type_url())
                {
                    by_type.entry(t).or_default().push(r);
                }
            }
        }
        let types = crate::resource::PUSH_ORDER
            .iter()
            .map(|t| {
                (
                    *t,
                    TypeResources::from_iter(by_type.remove(t).unwrap_or_default()),
                )
            })
            .collect();
        let snap = Arc::new(Snapshot {
            group: group.clone(),
            generation: st.generation,
            changed_at: st.changed_at,
            types,
        });
        st.snapshots.insert(group, snap.clone());
        snap
    }

    /// Follow every source's change counter, invalidating on change, until the cache is
    /// dropped or the sources go away. Must be called from within a tokio runtime.
    pub fn watch_sources(self: &Arc<Self>) {
        for source in &self.sources {
            let mut rx = source.subscribe();
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    match weak.upgrade() {
                        Some(cache) => cache.invalidate(),
                        None => break,
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_xds_api::type_urls;

    struct Fixed {
        name: &'static str,
        res: Mutex<Vec<Arc<Resource>>>,
        tx: watch::Sender<u64>,
        by_cluster: bool,
    }

    impl Source for Fixed {
        fn name(&self) -> &str {
            self.name
        }
        fn group(&self, node: &NodeMeta) -> String {
            if self.by_cluster {
                node.cluster.clone()
            } else {
                String::new()
            }
        }
        fn resources(&self, node: &NodeMeta) -> Vec<Arc<Resource>> {
            let mut v = self.res.lock().expect("lock").clone();
            if self.by_cluster {
                v.retain(|r| r.name.starts_with(&node.cluster));
            }
            v
        }
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.tx.subscribe()
        }
    }

    fn cluster(name: &str, payload: &[u8]) -> Arc<Resource> {
        Arc::new(Resource::new(
            name,
            weir_xds_api::Any {
                type_url: type_urls::CLUSTER.into(),
                value: payload.to_vec(),
            },
        ))
    }

    fn node(id: &str, cluster: &str) -> NodeMeta {
        NodeMeta {
            id: id.into(),
            cluster: cluster.into(),
            workload: None,
        }
    }

    #[tokio::test]
    async fn groups_share_snapshots_and_later_sources_win() {
        let a = Arc::new(Fixed {
            name: "a",
            res: Mutex::new(vec![cluster("x-1", b"a"), cluster("y-1", b"a")]),
            tx: watch::channel(0).0,
            by_cluster: true,
        });
        let b = Arc::new(Fixed {
            name: "b",
            res: Mutex::new(vec![cluster("x-1", b"b")]),
            tx: watch::channel(0).0,
            by_cluster: false,
        });
        let cache = SnapshotCache::new(vec![a.clone(), b.clone()]);
        cache.watch_sources();
        let s1 = cache.snapshot(&node("n1", "x"));
        let s2 = cache.snapshot(&node("n2", "x"));
        assert!(Arc::ptr_eq(&s1, &s2), "same group, same snapshot");
        let s3 = cache.snapshot(&node("n3", "y"));
        assert!(!Arc::ptr_eq(&s1, &s3));
        let cds = s1.of(type_urls::CLUSTER);
        assert_eq!(cds.items.len(), 1);
        assert_eq!(cds.items["x-1"].any.value, b"b", "later source wins");
        assert_eq!(s3.of(type_urls::CLUSTER).items.len(), 2);
        assert!(s1.of(type_urls::LISTENER).items.is_empty());

        // A source change invalidates and bumps the generation.
        let mut gen_rx = cache.subscribe();
        a.res.lock().expect("lock").push(cluster("x-2", b"a"));
        a.tx.send_replace(1);
        tokio::time::timeout(std::time::Duration::from_secs(5), gen_rx.changed())
            .await
            .expect("generation bumped")
            .expect("sender alive");
        let s4 = cache.snapshot(&node("n1", "x"));
        assert!(s4.generation > s1.generation);
        assert_eq!(s4.of(type_urls::CLUSTER).items.len(), 2);
        assert_ne!(
            s4.of(type_urls::CLUSTER).version,
            s1.of(type_urls::CLUSTER).version
        );
        // Types that did not change keep their version.
        assert_eq!(
            s4.of(type_urls::LISTENER).version,
            s1.of(type_urls::LISTENER).version
        );
    }
}
