//! The service registry: instances of services, their health, a change log for watches, and
//! an xDS [`Source`](crate::cache::Source) turning every service into an EDS cluster.
//!
//! ## Model
//! An instance is `(service, instance_id)` with an IP address, port, weight, locality,
//! metadata, tags and a health spec ([`pb::HealthSpec`]): a TTL the instance heartbeats
//! within, an active check weir-cp runs ([`health`]), or neither (a static instance, always
//! healthy). Every change (register, update, deregister, health change) is committed durably
//! through a [`Backend`] with a new registry revision *before* it is acknowledged or becomes
//! visible; the in-memory view ([`Registry`]) then changes, the change is appended to a
//! bounded in-memory log (the last [`HISTORY`] events, for [`Registry::events_since`] and
//! the Watch RPC), and the revision is published on a `watch` channel ([`Registry::subscribe`],
//! which is also the xDS source's change counter, so pushes follow within a scheduler tick).
//!
//! ## Health state machine
//! - static: `HEALTHY` forever.
//! - TTL: `HEALTHY` on registration (registering is a sign of life), on each heartbeat and
//!   on an identical re-registration;
//!   `UNHEALTHY` when a TTL passes without one, or when a heartbeat says so.
//! - check: `UNKNOWN` until the first result (the first check runs at once), which decides
//!   directly; then `healthy_threshold` consecutive passes / `unhealthy_threshold` consecutive
//!   failures flip it.
//! - any kind: `UNHEALTHY` continuously for `deregister_critical_after` → deregistered
//!   (reason `reaped`).
//!
//! Deadlines use tokio time (a single driver task, [`Registry::start`]), so tests can pause
//! time. Heartbeats that do not change the status are not written to storage (no fsync per
//! heartbeat); after a restart every TTL lease starts afresh and unhealthy instances' reap
//! timers restart.
//!
//! Submodules: [`store`] (storage trait, embedded backend), [`health`] (active checks),
//! [`eds`] (the xDS source), [`grpc`] (the `weir.registry.v1.Registry` service), [`cli`]
//! (`weir-cp registry …`).

pub mod cli;
pub mod eds;
pub mod grpc;
pub mod health;
pub mod store;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::proto::registry as pb;
pub use store::{Backend, BackendError, Change, EmbeddedBackend};

use pb::HealthStatus;
use pb::health_spec::Kind as HealthKind;

/// The gRPC service name (reported `SERVING` in `grpc.health.v1.Health`).
pub const SERVICE: &str = "weir.registry.v1.Registry";
/// Events kept for resuming watches.
pub const HISTORY: usize = 10_000;
/// Shortest TTL and check interval accepted.
pub const MIN_PERIOD: Duration = Duration::from_millis(50);
/// Longest TTL, interval, timeout and reap delay accepted (one day).
pub const MAX_PERIOD: Duration = Duration::from_secs(86_400);
/// Default check interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default check timeout cap.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest weight.
pub const MAX_WEIGHT: u32 = 65_535;
/// Longest service name / instance id.
pub const MAX_NAME: usize = 200;
/// Most metadata entries / tags per instance.
pub const MAX_ENTRIES: usize = 64;
/// Longest metadata key or tag / metadata value.
pub const MAX_KEY: usize = 128;
/// Longest metadata value.
pub const MAX_VALUE: usize = 1024;

/// Registry errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A request field is invalid.
    #[error("invalid {field}: {msg}")]
    Invalid {
        /// Field path, e.g. `instance.port`.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// The instance is not registered.
    #[error("instance {service}/{instance_id} is not registered")]
    NotFound {
        /// Service name.
        service: String,
        /// Instance id.
        instance_id: String,
    },
    /// Heartbeat for an instance that does not use a TTL.
    #[error("instance {service}/{instance_id} has no TTL: its health is not heartbeat-driven")]
    NotTtl {
        /// Service name.
        service: String,
        /// Instance id.
        instance_id: String,
    },
    /// A watch asked for a revision older than the kept history.
    #[error(
        "revision {requested} is no longer in the kept history; the oldest resumable revision is {oldest}"
    )]
    Compacted {
        /// The requested start revision.
        requested: u64,
        /// The oldest start revision that can still be served.
        oldest: u64,
    },
    /// Storage failed; nothing was changed.
    #[error("registry storage: {0}")]
    Backend(#[from] BackendError),
}

fn invalid(field: &str, msg: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.into(),
        msg: msg.into(),
    }
}

/// Milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How an instance's health is determined (validated, defaults filled in).
#[derive(Debug, Clone, PartialEq)]
pub enum HealthMode {
    /// Always healthy.
    Static,
    /// Heartbeats within this period.
    Ttl(Duration),
    /// An active check.
    Check(health::CheckConfig),
}

/// The validated health of a spec, with its reap delay.
fn health_mode(spec: Option<&pb::HealthSpec>) -> (HealthMode, Option<Duration>) {
    let Some(spec) = spec else {
        return (HealthMode::Static, None);
    };
    let reap = (spec.deregister_critical_after_ms > 0)
        .then(|| Duration::from_millis(spec.deregister_critical_after_ms));
    let mode = match &spec.kind {
        None => HealthMode::Static,
        Some(HealthKind::TtlMs(ms)) => HealthMode::Ttl(Duration::from_millis(*ms)),
        Some(HealthKind::Check(c)) => match health::CheckConfig::from_spec(c) {
            Some(c) => HealthMode::Check(c),
            None => HealthMode::Static,
        },
    };
    (mode, reap)
}

fn check_period(field: &str, ms: u64) -> Result<(), RegistryError> {
    let d = Duration::from_millis(ms);
    if d < MIN_PERIOD || d > MAX_PERIOD {
        return Err(invalid(
            field,
            format!("{ms}ms is outside {MIN_PERIOD:?}..={MAX_PERIOD:?}"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, s: &str, service: bool) -> Result<(), RegistryError> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_NAME {
        return Err(invalid(field, format!("longer than {MAX_NAME} bytes")));
    }
    let ok = if service {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    } else {
        s.chars().all(|c| !c.is_control())
    };
    if !ok {
        return Err(invalid(
            field,
            if service {
                "use only letters, digits, '.', '_' and '-'"
            } else {
                "must not contain control characters"
            },
        ));
    }
    Ok(())
}

/// Validate a registration and return it normalized: output-only fields cleared, weight
/// defaulted, check defaults filled in (so equal specs compare equal).
pub fn normalize(inst: &pb::Instance) -> Result<pb::Instance, RegistryError> {
    check_name("instance.service", &inst.service, true)?;
    check_name("instance.instance_id", &inst.instance_id, false)?;
    let ip: IpAddr = inst.address.parse().map_err(|_| {
        invalid(
            "instance.address",
            format!("{:?} is not an IP address", inst.address),
        )
    })?;
    if inst.port == 0 || inst.port > 65_535 {
        return Err(invalid("instance.port", "must be 1-65535"));
    }
    let weight = if inst.weight == 0 { 1 } else { inst.weight };
    if weight > MAX_WEIGHT {
        return Err(invalid(
            "instance.weight",
            format!("must be at most {MAX_WEIGHT}"),
        ));
    }
    if inst.metadata.len() > MAX_ENTRIES {
        return Err(invalid(
            "instance.metadata",
            format!("more than {MAX_ENTRIES} entries"),
        ));
    }
    for (k, v) in &inst.metadata {
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(invalid(
                "instance.metadata",
                format!("key {k:?} must be 1-{MAX_KEY} bytes"),
            ));
        }
        if v.len() > MAX_VALUE {
            return Err(invalid(
                &format!("instance.metadata[{k}]"),
                format!("longer than {MAX_VALUE} bytes"),
            ));
        }
    }
    if inst.tags.len() > MAX_ENTRIES {
        return Err(invalid(
            "instance.tags",
            format!("more than {MAX_ENTRIES} tags"),
        ));
    }
    for (i, t) in inst.tags.iter().enumerate() {
        if t.is_empty() || t.len() > MAX_KEY {
            return Err(invalid(
                &format!("instance.tags[{i}]"),
                format!("must be 1-{MAX_KEY} bytes"),
            ));
        }
    }
    let health = match &inst.health {
        None => None,
        Some(h) => {
            if h.deregister_critical_after_ms > 0 {
                check_period(
                    "instance.health.deregister_critical_after_ms",
                    h.deregister_critical_after_ms,
                )?;
            }
            let kind = match &h.kind {
                None => None,
                Some(HealthKind::TtlMs(ms)) => {
                    check_period("instance.health.ttl_ms", *ms)?;
                    Some(HealthKind::TtlMs(*ms))
                }
                Some(HealthKind::Check(c)) => Some(HealthKind::Check(health::normalize_check(
                    c,
                    "instance.health.check",
                )?)),
            };
            if kind.is_none() && h.deregister_critical_after_ms > 0 {
                return Err(invalid(
                    "instance.health.deregister_critical_after_ms",
                    "needs a TTL or a check (a static instance is never unhealthy)",
                ));
            }
            Some(pb::HealthSpec {
                kind,
                deregister_critical_after_ms: h.deregister_critical_after_ms,
            })
        }
    };
    let mut tags = inst.tags.clone();
    tags.sort();
    tags.dedup();
    Ok(pb::Instance {
        service: inst.service.clone(),
        instance_id: inst.instance_id.clone(),
        address: ip.to_string(),
        port: inst.port,
        weight,
        locality: inst
            .locality
            .clone()
            .filter(|l| !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty())),
        metadata: inst.metadata.clone(),
        tags,
        health,
        ..Default::default()
    })
}

/// The spec part of an instance (what a registration sets), for change detection.
fn spec_of(i: &pb::Instance) -> pb::Instance {
    pb::Instance {
        service: i.service.clone(),
        instance_id: i.instance_id.clone(),
        address: i.address.clone(),
        port: i.port,
        weight: i.weight,
        locality: i.locality.clone(),
        metadata: i.metadata.clone(),
        tags: i.tags.clone(),
        health: i.health.clone(),
        ..Default::default()
    }
}

/// Whether `a` and `b` are checked the same way at the same place (so a status, a running
/// checker and its counters carry over from one to the other).
fn same_target(a: &pb::Instance, b: &pb::Instance) -> bool {
    a.health == b.health && a.address == b.address && a.port == b.port
}

type Key = (String, String);

/// Commits that lose a race with another replica (shared backend) are retried this often.
const CONFLICT_RETRIES: usize = 5;

fn retry_conflicts<T>(mut f: impl FnMut() -> Result<T, RegistryError>) -> Result<T, RegistryError> {
    let mut tries = 0;
    loop {
        match f() {
            Err(RegistryError::Backend(BackendError::Conflict(_))) if tries < CONFLICT_RETRIES => {
                tries += 1;
            }
            r => return r,
        }
    }
}

#[derive(Debug)]
struct Entry {
    inst: pb::Instance,
    mode: HealthMode,
    reap_after: Option<Duration>,
    /// TTL instances: when the lease runs out.
    ttl_deadline: Option<Instant>,
    /// When the instance last turned unhealthy (reap timer).
    unhealthy_since: Option<Instant>,
    /// The running active check, if any.
    checker: Option<CancellationToken>,
    /// Results from an older checker are ignored.
    check_gen: u64,
    passes: u32,
    fails: u32,
}

impl Entry {
    fn new(inst: pb::Instance, now: Instant) -> Entry {
        let (mode, reap_after) = health_mode(inst.health.as_ref());
        let ttl_deadline = match &mode {
            HealthMode::Ttl(ttl) => Some(now + *ttl),
            _ => None,
        };
        let unhealthy_since = (inst.status() == HealthStatus::Unhealthy).then_some(now);
        Entry {
            inst,
            mode,
            reap_after,
            ttl_deadline,
            unhealthy_since,
            checker: None,
            check_gen: 0,
            passes: 0,
            fails: 0,
        }
    }

    fn stop_checker(&mut self) {
        if let Some(t) = self.checker.take() {
            t.cancel();
        }
    }
}

#[derive(Debug)]
struct State {
    instances: BTreeMap<Key, Entry>,
    revision: u64,
    log: VecDeque<pb::Event>,
    /// Events up to and including this revision are no longer in `log`.
    compacted: u64,
    /// Set by [`Registry::start`]: active checks run on this runtime until the token ends.
    runtime: Option<(tokio::runtime::Handle, CancellationToken)>,
    next_gen: u64,
}

/// Registry counters for Prometheus (gauges are computed at render time).
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    heartbeats: AtomicU64,
    /// [kind (http, tcp, grpc)][passed, failed]
    checks: [[AtomicU64; 2]; 3],
    reaped: AtomicU64,
}

impl RegistryMetrics {
    /// Heartbeats accepted.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Relaxed)
    }

    /// (passed, failed) checks of `kind`.
    pub fn checks(&self, kind: health::CheckKind) -> (u64, u64) {
        let c = &self.checks[kind as usize];
        (c[0].load(Relaxed), c[1].load(Relaxed))
    }

    /// Instances reaped.
    pub fn reaped(&self) -> u64 {
        self.reaped.load(Relaxed)
    }
}

/// The registry; see the module docs.
#[derive(Debug)]
pub struct Registry {
    me: Weak<Registry>,
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    rev_tx: watch::Sender<u64>,
    wake: Notify,
    history: usize,
    /// Counters.
    pub metrics: RegistryMetrics,
}

/// One instance change's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The instance as stored.
    pub instance: pb::Instance,
    /// The registry revision after the request.
    pub revision: u64,
    /// Whether it was new.
    pub created: bool,
}

impl Registry {
    /// Open the registry over `backend`, loading what it holds.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Arc<Registry>, RegistryError> {
        Self::with_history(backend, HISTORY)
    }

    /// [`Registry::open`] keeping `history` events for watches.
    pub fn with_history(
        backend: Arc<dyn Backend>,
        history: usize,
    ) -> Result<Arc<Registry>, RegistryError> {
        let loaded = backend.load()?;
        let now = Instant::now();
        let instances = loaded
            .instances
            .into_iter()
            .map(|i| {
                (
                    (i.service.clone(), i.instance_id.clone()),
                    Entry::new(i, now),
                )
            })
            .collect();
        let (rev_tx, _) = watch::channel(loaded.revision);
        Ok(Arc::new_cyclic(|me| Registry {
            me: me.clone(),
            backend,
            state: Mutex::new(State {
                instances,
                revision: loaded.revision,
                log: VecDeque::new(),
                compacted: loaded.revision,
                runtime: None,
                next_gen: 0,
            }),
            rev_tx,
            wake: Notify::new(),
            history: history.max(1),
            metrics: RegistryMetrics::default(),
        }))
    }

    /// Open over the embedded backend in `store`.
    pub fn embedded(store: Arc<crate::storage::Store>) -> Result<Arc<Registry>, RegistryError> {
        Self::open(Arc::new(EmbeddedBackend::new(store)))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current revision; it changes on every change (the xDS source's change counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.rev_tx.subscribe()
    }

    /// The current registry revision.
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Start the health driver (TTL expiry, reaping) and active checks on the current
    /// runtime, until `token` is cancelled. Later calls while running do nothing.
    pub fn start(&self, token: CancellationToken) {
        let Some(me) = self.me.upgrade() else { return };
        let mut st = self.lock();
        if st.runtime.as_ref().is_some_and(|(_, t)| !t.is_cancelled()) {
            return;
        }
        st.runtime = Some((tokio::runtime::Handle::current(), token.clone()));
        let keys: Vec<Key> = st.instances.keys().cloned().collect();
        for k in keys {
            self.spawn_checker(&mut st, &k);
        }
        drop(st);
        tokio::spawn(me.drive(token));
    }

    async fn drive(self: Arc<Self>, token: CancellationToken) {
        loop {
            let next = self.tick();
            let notified = self.wake.notified();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => break,
                _ = notified => {}
                _ = sleep => {}
            }
        }
        let mut st = self.lock();
        for e in st.instances.values_mut() {
            e.stop_checker();
        }
        st.runtime = None;
    }

    /// (Re)start the active check of `key` if it has one and the registry is running.
    fn spawn_checker(&self, st: &mut State, key: &Key) {
        let Some((handle, token)) = st.runtime.clone() else {
            return;
        };
        st.next_gen += 1;
        let generation = st.next_gen;
        let Some(e) = st.instances.get_mut(key) else {
            return;
        };
        e.stop_checker();
        let HealthMode::Check(cfg) = e.mode.clone() else {
            return;
        };
        let addr = match e.inst.address.parse::<IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, e.inst.port as u16),
            Err(_) => return,
        };
        let child = token.child_token();
        e.checker = Some(child.clone());
        e.check_gen = generation;
        e.passes = 0;
        e.fails = 0;
        let weak = self.me.clone();
        let key = key.clone();
        handle.spawn(async move {
            loop {
                let outcome = tokio::select! {
                    _ = child.cancelled() => return,
                    o = health::run_check(&cfg, addr) => o,
                };
                let Some(reg) = weak.upgrade() else { return };
                // A status change commits durably: keep the fsync off the async workers.
                let (k, kind) = (key.clone(), cfg.kind());
                let recorded = tokio::task::spawn_blocking(move || {
                    reg.check_result(&k, generation, kind, outcome);
                })
                .await;
                if recorded.is_err() {
                    return;
                }
                tokio::select! {
                    _ = child.cancelled() => return,
                    _ = tokio::time::sleep(cfg.interval) => {}
                }
            }
        });
    }

    /// Commit `change` with the next revision and log `ev` (its revision is filled in). On
    /// error nothing changes.
    fn commit(
        &self,
        st: &mut State,
        change: Change,
        mut ev: pb::Event,
    ) -> Result<u64, RegistryError> {
        let rev = st.revision + 1;
        if let Err(e) = self.backend.commit(rev, &[change]) {
            if matches!(e, BackendError::Conflict(_)) {
                // Another replica committed first (shared backend): catch up, so a retry
                // starts from the stored state.
                if let Ok(loaded) = self.backend.load() {
                    self.resync_locked(st, loaded);
                }
            }
            return Err(e.into());
        }
        st.revision = rev;
        ev.revision = rev;
        self.log_event(st, ev);
        self.rev_tx.send_replace(rev);
        self.wake.notify_one();
        Ok(rev)
    }

    fn log_event(&self, st: &mut State, ev: pb::Event) {
        st.log.push_back(ev);
        while st.log.len() > self.history {
            if let Some(old) = st.log.pop_front() {
                st.compacted = old.revision;
            }
        }
    }

    /// Bring the in-memory view up to `loaded`, what a shared backend (etcd) holds after
    /// other replicas' commits: instances that differ are replaced (their TTL and check timers
    /// start afresh here), absent ones removed, each logged as an event at the loaded
    /// revision, and the revision published (so EDS pushes follow). A `loaded` that is not
    /// newer than the local view changes nothing.
    pub fn resync(&self, loaded: store::Loaded) {
        let mut st = self.lock();
        self.resync_locked(&mut st, loaded);
    }

    fn resync_locked(&self, st: &mut State, loaded: store::Loaded) {
        if loaded.revision <= st.revision {
            return;
        }
        let rev = loaded.revision;
        let now = Instant::now();
        let mut present = std::collections::HashSet::new();
        let mut events = Vec::new();
        let mut restart = Vec::new();
        for inst in loaded.instances {
            let key: Key = (inst.service.clone(), inst.instance_id.clone());
            present.insert(key.clone());
            let ev = match st.instances.get(&key) {
                Some(e) if e.inst == inst => continue,
                Some(e) if spec_of(&e.inst) == spec_of(&inst) && e.inst.status != inst.status => {
                    pb::Event {
                        r#type: pb::EventType::HealthChanged as i32,
                        instance: Some(inst.clone()),
                        previous_status: e.inst.status,
                        ..Default::default()
                    }
                }
                Some(_) => pb::Event {
                    r#type: pb::EventType::Updated as i32,
                    instance: Some(inst.clone()),
                    ..Default::default()
                },
                None => pb::Event {
                    r#type: pb::EventType::Registered as i32,
                    instance: Some(inst.clone()),
                    ..Default::default()
                },
            };
            events.push(ev);
            let entry = Entry::new(inst, now);
            if let Some(mut old) = st.instances.insert(key.clone(), entry) {
                old.stop_checker();
            }
            restart.push(key);
        }
        let gone: Vec<Key> = st
            .instances
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(mut e) = st.instances.remove(&key) {
                e.stop_checker();
                events.push(pb::Event {
                    r#type: pb::EventType::Deregistered as i32,
                    instance: Some(e.inst),
                    reason: "deregistered through another replica".into(),
                    ..Default::default()
                });
            }
        }
        for key in restart {
            self.spawn_checker(st, &key);
        }
        for mut ev in events {
            ev.revision = rev;
            self.log_event(st, ev);
        }
        st.revision = rev;
        self.rev_tx.send_replace(rev);
        self.wake.notify_one();
    }

    /// Register (or update) an instance. Durable before it returns. On a shared backend a
    /// commit that lost a race with another replica is retried (a few times) on the caught-up
    /// state.
    pub fn register(&self, inst: &pb::Instance) -> Result<Registered, RegistryError> {
        retry_conflicts(|| self.register_once(inst))
    }

    fn register_once(&self, inst: &pb::Instance) -> Result<Registered, RegistryError> {
        let spec = normalize(inst)?;
        let now = Instant::now();
        let key = (spec.service.clone(), spec.instance_id.clone());
        let mut st = self.lock();
        let existing = st.instances.get(&key).map(|e| e.inst.clone());
        let (mode, _) = health_mode(spec.health.as_ref());
        let mut new = spec.clone();
        let created = existing.is_none();
        let keep_status = match &existing {
            Some(old) if spec_of(old) == spec => {
                // Nothing changed: a re-registration renews a TTL lease like a heartbeat
                // (and, like one, brings an expired instance back).
                if let Some(e) = st.instances.get_mut(&key)
                    && let HealthMode::Ttl(ttl) = e.mode
                {
                    e.ttl_deadline = Some(now + ttl);
                    self.wake.notify_one();
                    self.set_status(
                        &mut st,
                        &key,
                        HealthStatus::Healthy,
                        "registered again".into(),
                    )?;
                }
                let instance = st
                    .instances
                    .get(&key)
                    .map_or_else(|| old.clone(), |e| e.inst.clone());
                return Ok(Registered {
                    instance,
                    revision: st.revision,
                    created: false,
                });
            }
            // The health verdict carries over only while it is about the same thing: the
            // same health spec at the same address.
            Some(old) => same_target(old, &spec).then_some(old),
            None => None,
        };
        let rev = st.revision + 1;
        match (keep_status, &existing) {
            (Some(old), _) => {
                new.status = old.status;
                new.status_note = old.status_note.clone();
                new.status_changed_at_ms = old.status_changed_at_ms;
            }
            _ => {
                let (status, note) = match mode {
                    HealthMode::Static => (HealthStatus::Healthy, "static"),
                    HealthMode::Ttl(_) => (HealthStatus::Healthy, "registered"),
                    HealthMode::Check(_) => (HealthStatus::Unknown, "awaiting the first check"),
                };
                new.set_status(status);
                new.status_note = note.into();
                new.status_changed_at_ms = wall_ms();
            }
        }
        new.create_revision = existing.as_ref().map_or(rev, |o| o.create_revision);
        new.registered_at_ms = existing
            .as_ref()
            .map_or_else(wall_ms, |o| o.registered_at_ms);
        new.mod_revision = rev;
        let ev = pb::Event {
            r#type: if created {
                pb::EventType::Registered
            } else {
                pb::EventType::Updated
            } as i32,
            instance: Some(new.clone()),
            ..Default::default()
        };
        let revision = self.commit(&mut st, Change::Put(Box::new(new.clone())), ev)?;
        let restart_check = existing.as_ref().is_none_or(|o| !same_target(o, &new));
        let mut entry = Entry::new(new.clone(), now);
        if let Some(mut old) = st.instances.remove(&key) {
            if restart_check {
                old.stop_checker();
            } else {
                entry.checker = old.checker.take();
                entry.check_gen = old.check_gen;
                entry.passes = old.passes;
                entry.fails = old.fails;
                entry.unhealthy_since = old.unhealthy_since;
            }
        }
        st.instances.insert(key.clone(), entry);
        if restart_check {
            self.spawn_checker(&mut st, &key);
        }
        Ok(Registered {
            instance: new,
            revision,
            created,
        })
    }

    /// Deregister an instance; the new revision.
    pub fn deregister(&self, service: &str, instance_id: &str) -> Result<u64, RegistryError> {
        retry_conflicts(|| self.deregister_once(service, instance_id))
    }

    fn deregister_once(&self, service: &str, instance_id: &str) -> Result<u64, RegistryError> {
        let mut st = self.lock();
        self.remove(
            &mut st,
            &(service.into(), instance_id.into()),
            "deregistered",
        )
    }

    fn remove(&self, st: &mut State, key: &Key, reason: &str) -> Result<u64, RegistryError> {
        let Some(e) = st.instances.get(key) else {
            return Err(RegistryError::NotFound {
                service: key.0.clone(),
                instance_id: key.1.clone(),
            });
        };
        let ev = pb::Event {
            r#type: pb::EventType::Deregistered as i32,
            instance: Some(e.inst.clone()),
            reason: reason.into(),
            ..Default::default()
        };
        let change = Change::Delete {
            service: key.0.clone(),
            instance_id: key.1.clone(),
        };
        let rev = self.commit(st, change, ev)?;
        if let Some(mut e) = st.instances.remove(key) {
            e.stop_checker();
        }
        Ok(rev)
    }

    /// Change the status of `key` (a no-op when it is already `status`).
    fn set_status(
        &self,
        st: &mut State,
        key: &Key,
        status: HealthStatus,
        note: String,
    ) -> Result<(), RegistryError> {
        let Some(e) = st.instances.get(key) else {
            return Ok(());
        };
        let previous = e.inst.status();
        if previous == status {
            return Ok(());
        }
        let mut inst = e.inst.clone();
        inst.set_status(status);
        inst.status_note = note;
        inst.status_changed_at_ms = wall_ms();
        inst.mod_revision = st.revision + 1;
        let ev = pb::Event {
            r#type: pb::EventType::HealthChanged as i32,
            instance: Some(inst.clone()),
            previous_status: previous as i32,
            ..Default::default()
        };
        self.commit(st, Change::Put(Box::new(inst.clone())), ev)?;
        tracing::info!(
            service = %inst.service,
            instance = %inst.instance_id,
            from = previous.as_str_name(),
            to = status.as_str_name(),
            note = %inst.status_note,
            "registry instance health changed"
        );
        if let Some(e) = st.instances.get_mut(key) {
            e.unhealthy_since = (status == HealthStatus::Unhealthy).then(Instant::now);
            e.inst = inst;
        }
        Ok(())
    }

    /// A TTL instance's heartbeat: renews the lease; `status` `UNHEALTHY` marks it unhealthy
    /// (anything else healthy). Returns the instance and the revision.
    pub fn heartbeat(
        &self,
        service: &str,
        instance_id: &str,
        status: HealthStatus,
        note: &str,
    ) -> Result<(pb::Instance, u64), RegistryError> {
        let key: Key = (service.into(), instance_id.into());
        let mut st = self.lock();
        let Some(e) = st.instances.get_mut(&key) else {
            return Err(RegistryError::NotFound {
                service: key.0,
                instance_id: key.1,
            });
        };
        let HealthMode::Ttl(ttl) = e.mode else {
            return Err(RegistryError::NotTtl {
                service: key.0,
                instance_id: key.1,
            });
        };
        self.backend.heartbeat(service, instance_id)?;
        let Some(e) = st.instances.get_mut(&key) else {
            return Err(RegistryError::NotFound {
                service: key.0,
                instance_id: key.1,
            });
        };
        self.metrics.heartbeats.fetch_add(1, Relaxed);
        e.ttl_deadline = Some(Instant::now() + ttl);
        let (status, default_note) = if status == HealthStatus::Unhealthy {
            (HealthStatus::Unhealthy, "reported unhealthy by heartbeat")
        } else {
            (HealthStatus::Healthy, "heartbeat")
        };
        let note = if note.is_empty() { default_note } else { note };
        self.set_status(&mut st, &key, status, note.into())?;
        self.wake.notify_one();
        let inst = st
            .instances
            .get(&key)
            .map(|e| e.inst.clone())
            .unwrap_or_default();
        Ok((inst, st.revision))
    }

    /// Another replica received a heartbeat for this TTL instance (seen through a shared
    /// backend's watch): renew its TTL here too. Nothing is written.
    pub fn renew(&self, service: &str, instance_id: &str) {
        let mut st = self.lock();
        let key: Key = (service.into(), instance_id.into());
        if let Some(e) = st.instances.get_mut(&key)
            && let HealthMode::Ttl(ttl) = e.mode
        {
            e.ttl_deadline = Some(Instant::now() + ttl);
            self.wake.notify_one();
        }
    }

    /// A check result from the checker of generation `generation`.
    fn check_result(
        &self,
        key: &Key,
        generation: u64,
        kind: health::CheckKind,
        outcome: Result<(), String>,
    ) {
        let c = &self.metrics.checks[kind as usize];
        c[usize::from(outcome.is_err())].fetch_add(1, Relaxed);
        let mut st = self.lock();
        let Some(e) = st.instances.get_mut(key) else {
            return;
        };
        if e.check_gen != generation {
            return;
        }
        let HealthMode::Check(cfg) = &e.mode else {
            return;
        };
        let current = e.inst.status();
        let (next, note) = match outcome {
            Ok(()) => {
                e.passes = e.passes.saturating_add(1);
                e.fails = 0;
                let flip = current == HealthStatus::Unknown
                    || (current == HealthStatus::Unhealthy && e.passes >= cfg.healthy_threshold);
                (
                    if flip { HealthStatus::Healthy } else { current },
                    "check passed".to_string(),
                )
            }
            Err(msg) => {
                e.fails = e.fails.saturating_add(1);
                e.passes = 0;
                let flip = current == HealthStatus::Unknown
                    || (current == HealthStatus::Healthy && e.fails >= cfg.unhealthy_threshold);
                (
                    if flip {
                        HealthStatus::Unhealthy
                    } else {
                        current
                    },
                    msg,
                )
            }
        };
        if let Err(err) = self.set_status(&mut st, key, next, note) {
            tracing::warn!(service = %key.0, instance = %key.1, "recording a check result: {err}");
        }
    }

    /// Expire TTLs and reap instances due at the current (tokio) time; the next deadline.
    pub fn tick(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.lock();
        let mut expired = Vec::new();
        let mut reap = Vec::new();
        for (k, e) in &st.instances {
            let status = e.inst.status();
            if let (Some(d), HealthMode::Ttl(ttl)) = (e.ttl_deadline, &e.mode)
                && d <= now
                && status != HealthStatus::Unhealthy
            {
                expired.push((k.clone(), *ttl));
            }
            if let (Some(since), Some(after)) = (e.unhealthy_since, e.reap_after)
                && status == HealthStatus::Unhealthy
                && since + after <= now
            {
                reap.push(k.clone());
            }
        }
        let mut failed = false;
        for (k, ttl) in expired {
            let note = format!("TTL expired: no heartbeat for {ttl:?}");
            if let Err(e) = self.set_status(&mut st, &k, HealthStatus::Unhealthy, note) {
                tracing::warn!(service = %k.0, instance = %k.1, "marking unhealthy: {e}");
                failed = true;
            }
        }
        for k in reap {
            match self.remove(&mut st, &k, "reaped") {
                Ok(_) => {
                    self.metrics.reaped.fetch_add(1, Relaxed);
                    tracing::info!(service = %k.0, instance = %k.1, "registry instance reaped");
                }
                Err(e) => {
                    tracing::warn!(service = %k.0, instance = %k.1, "reaping: {e}");
                    failed = true;
                }
            }
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        for e in st.instances.values() {
            let status = e.inst.status();
            if let Some(d) = e.ttl_deadline
                && status != HealthStatus::Unhealthy
            {
                consider(d);
            }
            if let (Some(since), Some(after)) = (e.unhealthy_since, e.reap_after)
                && status == HealthStatus::Unhealthy
            {
                consider(since + after);
            }
        }
        if failed {
            // Storage failed: retry in a second rather than spinning on a past deadline.
            consider(now + Duration::from_secs(1));
            next = next.map(|n| n.max(now + Duration::from_secs(1)));
        }
        next
    }

    /// One instance.
    pub fn get(&self, service: &str, instance_id: &str) -> Result<pb::Instance, RegistryError> {
        self.lock()
            .instances
            .get(&(service.to_string(), instance_id.to_string()))
            .map(|e| e.inst.clone())
            .ok_or_else(|| RegistryError::NotFound {
                service: service.into(),
                instance_id: instance_id.into(),
            })
    }

    /// Instances of `service` (every service when `None`), sorted by service and id, healthy
    /// only when asked; with the revision they reflect.
    pub fn list(&self, service: Option<&str>, healthy_only: bool) -> (Vec<pb::Instance>, u64) {
        let st = self.lock();
        let v = st
            .instances
            .values()
            .filter(|e| service.is_none_or(|s| e.inst.service == s))
            .filter(|e| !healthy_only || e.inst.status() == HealthStatus::Healthy)
            .map(|e| e.inst.clone())
            .collect();
        (v, st.revision)
    }

    /// Services with (instances, healthy instances), sorted; with the revision.
    pub fn services(&self) -> (Vec<pb::ServiceSummary>, u64) {
        let st = self.lock();
        let mut out: Vec<pb::ServiceSummary> = Vec::new();
        for e in st.instances.values() {
            if out.last().is_none_or(|s| s.name != e.inst.service) {
                out.push(pb::ServiceSummary {
                    name: e.inst.service.clone(),
                    ..Default::default()
                });
            }
            if let Some(s) = out.last_mut() {
                s.instances += 1;
                if e.inst.status() == HealthStatus::Healthy {
                    s.healthy += 1;
                }
            }
        }
        (out, st.revision)
    }

    /// Events with revision >= `from` of `service` (every service when `None`), and the
    /// current revision (resume from it + 1). [`RegistryError::Compacted`] when events from
    /// `from` on are no longer all kept.
    pub fn events_since(
        &self,
        from: u64,
        service: Option<&str>,
    ) -> Result<(Vec<pb::Event>, u64), RegistryError> {
        let st = self.lock();
        if from <= st.compacted {
            return Err(RegistryError::Compacted {
                requested: from,
                oldest: st.compacted + 1,
            });
        }
        let events = st
            .log
            .iter()
            .filter(|e| e.revision >= from)
            .filter(|e| service.is_none_or(|s| e.instance.as_ref().is_some_and(|i| i.service == s)))
            .cloned()
            .collect();
        Ok((events, st.revision))
    }

    /// Call `f` with every instance, grouped by service (for the xDS source).
    fn with_instances<T>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &pb::Instance>) -> T) -> T {
        let st = self.lock();
        f(&mut st.instances.values().map(|e| &e.inst))
    }
}

impl crate::metrics::Collector for Registry {
    fn render(&self, out: &mut String) {
        let (by_service, revision) = {
            let st = self.lock();
            let mut m: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
            for e in st.instances.values() {
                let c = m.entry(e.inst.service.as_str()).or_default();
                c[e.inst.status() as usize] += 1;
            }
            let m: Vec<(String, [u64; 3])> =
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            (m, st.revision)
        };
        let _ = writeln!(
            out,
            "# HELP weir_cp_registry_instances Registered instances, by service and health."
        );
        let _ = writeln!(out, "# TYPE weir_cp_registry_instances gauge");
        for (svc, counts) in &by_service {
            for (i, h) in ["unknown", "healthy", "unhealthy"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "weir_cp_registry_instances{{service=\"{svc}\",health=\"{h}\"}} {}",
                    counts[i]
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_registry_revision The registry revision (bumped by every change)."
        );
        let _ = writeln!(out, "# TYPE weir_cp_registry_revision gauge");
        let _ = writeln!(out, "weir_cp_registry_revision {revision}");
        let _ = writeln!(
            out,
            "# HELP weir_cp_registry_heartbeats_total TTL heartbeats accepted."
        );
        let _ = writeln!(out, "# TYPE weir_cp_registry_heartbeats_total counter");
        let _ = writeln!(
            out,
            "weir_cp_registry_heartbeats_total {}",
            self.metrics.heartbeats()
        );
        let _ = writeln!(
            out,
            "# HELP weir_cp_registry_checks_total Active health checks run, by kind and result."
        );
        let _ = writeln!(out, "# TYPE weir_cp_registry_checks_total counter");
        for kind in health::CheckKind::ALL {
            let (p, f) = self.metrics.checks(kind);
            for (result, n) in [("passed", p), ("failed", f)] {
                let _ = writeln!(
                    out,
                    "weir_cp_registry_checks_total{{kind=\"{}\",result=\"{result}\"}} {n}",
                    kind.as_str()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_registry_reaped_total Instances deregistered for staying unhealthy."
        );
        let _ = writeln!(out, "# TYPE weir_cp_registry_reaped_total counter");
        let _ = writeln!(
            out,
            "weir_cp_registry_reaped_total {}",
            self.metrics.reaped()
        );
    }
}

#[cfg(test)]
mod tests;
