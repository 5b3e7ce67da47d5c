//! Edge limits shared by every worker: Envoy's overload manager (resource monitors, overload
//! actions), the global downstream connection limit and the per-listener connection limit
//! from the bootstrap's static runtime layer.
//!
//! # Data flow
//! - Translation ([`translate`]): the bootstrap's `overload_manager` and `layered_runtime`
//!   become a [`LimitsConfig`] in the [`Snapshot`](crate::config::Snapshot). Both are bootstrap
//!   only (as in Envoy), so the runtime state lives as long as the server.
//! - Runtime ([`Overload`], one per server, in `ServerState::overload`): one task on the main
//!   runtime ([`Overload::spawn`]) samples every resource monitor each `refresh_interval`
//!   (default 1 s), sets `overload.<monitor>.pressure`, evaluates each action's triggers and
//!   publishes the action's state (0..=1, fixed point) in an atomic. Workers read those atomics
//!   with no lock: the HTTP connection manager per request
//!   ([`Overload::shed_request`], [`Overload::disable_keepalive`]), the accept loops per
//!   accepted socket ([`Overload::admit`]) and, for `stop_accepting_connections`, a watch
//!   channel the accept loops wait on ([`Overload::accept_paused`]).
//! - Connections: [`Overload::admit`] takes a slot from the global downstream connection
//!   count (`envoy.resource_monitors.global_downstream_max_connections`) and from the
//!   listener's runtime limit; the returned [`Admitted`] gives them back when dropped (once).
//!
//! Stats (Envoy names): `overload.<action>.active` (1 when saturated),
//! `overload.<action>.scale_percent`, `overload.<monitor>.pressure` (0..100),
//! `overload.<monitor>.failed_updates`; listener counters `downstream_global_cx_overflow`,
//! `downstream_cx_overload_reject`, `downstream_cx_overflow`; HCM counters
//! `downstream_rq_overload_close`, `downstream_cx_overload_disable_keepalive`.
//!
//! See docs/design/limits.md for semantics and deviations from Envoy.

pub mod translate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio_util::sync::CancellationToken;

use crate::stats::Store;

/// Fixed-point scale of an action's state: `STATE_ONE` is saturated (Envoy's 1.0).
pub const STATE_ONE: u32 = 1_000_000;

/// Default `refresh_interval` (Envoy's 1 s).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(1);

/// The overload actions weir implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `envoy.overload_actions.stop_accepting_requests`: new requests get a local 503.
    StopAcceptingRequests,
    /// `envoy.overload_actions.disable_http_keepalive`: responses close their connection.
    DisableHttpKeepalive,
    /// `envoy.overload_actions.stop_accepting_connections`: accept loops pause.
    StopAcceptingConnections,
    /// `envoy.overload_actions.reject_incoming_connections`: accepted sockets are closed.
    RejectIncomingConnections,
}

impl Action {
    /// Every action, in index order.
    pub const ALL: [Action; 4] = [
        Action::StopAcceptingRequests,
        Action::DisableHttpKeepalive,
        Action::StopAcceptingConnections,
        Action::RejectIncomingConnections,
    ];

    /// Envoy's action name.
    pub fn name(self) -> &'static str {
        match self {
            Action::StopAcceptingRequests => "envoy.overload_actions.stop_accepting_requests",
            Action::DisableHttpKeepalive => "envoy.overload_actions.disable_http_keepalive",
            Action::StopAcceptingConnections => "envoy.overload_actions.stop_accepting_connections",
            Action::RejectIncomingConnections => {
                "envoy.overload_actions.reject_incoming_connections"
            }
        }
    }

    /// The action named `name`.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// An action trigger on one resource's pressure (0..=1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// `threshold`: saturated at or above `value`, inactive below.
    Threshold(f64),
    /// `scaled`: 0 below `scaling`, saturated at or above `saturation`, linear in between.
    Scaled {
        /// `scaling_threshold`.
        scaling: f64,
        /// `saturation_threshold`.
        saturation: f64,
    },
}

impl Trigger {
    /// The action state (0..=1) this trigger asks for at `pressure` (Envoy's trigger math).
    pub fn state(&self, pressure: f64) -> f64 {
        match *self {
            Trigger::Threshold(v) => {
                if pressure >= v {
                    1.0
                } else {
                    0.0
                }
            }
            Trigger::Scaled {
                scaling,
                saturation,
            } => {
                if pressure <= scaling {
                    0.0
                } else if pressure >= saturation {
                    1.0
                } else {
                    (pressure - scaling) / (saturation - scaling)
                }
            }
        }
    }
}

/// A resource monitor.
#[derive(Debug, Clone, PartialEq)]
pub enum MonitorKind {
    /// `envoy.resource_monitors.fixed_heap`: process memory over `max_heap_size_bytes`. weir
    /// uses the system allocator, so the memory is the resident set size (`VmRSS`).
    FixedHeap {
        /// `max_heap_size_bytes`.
        max_heap_size_bytes: u64,
    },
    /// `envoy.resource_monitors.injected_resource`: the pressure is read from a file (a
    /// number in 0..=1), for tests.
    Injected {
        /// `filename`.
        filename: PathBuf,
    },
    /// `envoy.resource_monitors.global_downstream_max_connections`: active downstream
    /// connections (all listeners but admin) over the maximum; also the global limit.
    DownstreamConnections {
        /// `max_active_downstream_connections`.
        max: u64,
    },
}

/// A configured resource monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// `name` (used by triggers and in stat names).
    pub name: String,
    /// What it measures.
    pub kind: MonitorKind,
}

/// A configured overload action.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionConfig {
    /// Which action.
    pub action: Action,
    /// `(monitor index, trigger)`; the action's state is the largest of its triggers'.
    pub triggers: Vec<(usize, Trigger)>,
}

/// The translated `overload_manager`.
#[derive(Debug, Clone, PartialEq)]
pub struct OverloadConfig {
    /// `refresh_interval`.
    pub refresh_interval: Duration,
    /// `resource_monitors`, in config order.
    pub monitors: Vec<MonitorConfig>,
    /// `actions`, in config order.
    pub actions: Vec<ActionConfig>,
}

/// Server-wide limits from the bootstrap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitsConfig {
    /// `overload_manager`, when configured.
    pub overload: Option<OverloadConfig>,
    /// Runtime `envoy.resource_limits.listener.<name>.connection_limit` keys of the static
    /// layers: listener name -> limit.
    pub listener_connection_limits: HashMap<String, u64>,
    /// Runtime `overload.global_downstream_max_connections` (Envoy's older global limit),
    /// used when no `global_downstream_max_connections` monitor is configured.
    pub runtime_global_max_connections: Option<u64>,
}

/// Why a monitor could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The file did not hold what was expected.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What was wrong.
        message: String,
    },
}

/// A shared connection count with a maximum. Slots are taken with [`Limit::try_acquire`]
/// (compare-and-swap, no lock) and released once by the returned guard.
#[derive(Debug)]
pub struct Limit {
    max: u64,
    active: AtomicU64,
}

impl Limit {
    /// A limit of `max` connections.
    pub fn new(max: u64) -> Self {
        Self {
            max,
            active: AtomicU64::new(0),
        }
    }

    /// The maximum.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Connections holding a slot.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Take a slot if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut cur = self.active.load(Ordering::Relaxed);
        while cur < self.max {
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => cur = now,
            }
        }
        None
    }

    /// Take a slot whatever the maximum (connections exempt from the limit still count).
    pub fn acquire_exempt(self: &Arc<Self>) -> Slot {
        self.active.fetch_add(1, Ordering::AcqRel);
        Slot(self.clone())
    }
}

/// One connection's slot in a [`Limit`]; released when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Limit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`Overload::admit`] refused a connection (each has its listener counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Global downstream connection limit: `downstream_global_cx_overflow`.
    GlobalLimit,
    /// `reject_incoming_connections`: `downstream_cx_overload_reject`.
    OverloadReject,
    /// The listener's runtime connection limit: `downstream_cx_overflow`.
    ListenerLimit,
}

/// Slots an admitted connection holds (released when dropped).
#[derive(Debug, Default)]
pub struct Admitted {
    _global: Option<Slot>,
    _listener: Option<Slot>,
}

/// `overload.<action>.*`.
#[derive(Debug)]
struct ActionState {
    configured: bool,
    /// Fixed point, [`STATE_ONE`] = saturated.
    value: AtomicU32,
    active: Gauge,
    scale_percent: Gauge,
}

/// `overload.<monitor>.*` and the last pressure.
#[derive(Debug)]
struct MonitorState {
    cfg: MonitorConfig,
    /// Last pressure (`f64` bits); a failed sample keeps the previous one.
    pressure: AtomicU64,
    pressure_gauge: Gauge,
    failed_updates: Counter,
}

/// The server's limits at run time (see the module docs).
#[derive(Debug)]
pub struct Overload {
    refresh: Duration,
    actions: [ActionState; 4],
    action_triggers: Vec<ActionConfig>,
    monitors: Vec<MonitorState>,
    global: Option<Arc<Limit>>,
    listener_limits: HashMap<String, Arc<Limit>>,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Overload {
    /// Runtime state for `cfg`, stats registered in `store`.
    pub fn new(cfg: &LimitsConfig, store: &Arc<Store>) -> Self {
        let om = cfg.overload.as_ref();
        let configured = |a: Action| om.is_some_and(|o| o.actions.iter().any(|c| c.action == a));
        let actions = Action::ALL.map(|a| {
            let on = configured(a);
            let (active, scale_percent) = if on {
                let s = store.plain(&format!("overload.{}", a.name()));
                (s.gauge("active"), s.gauge("scale_percent"))
            } else {
                (Gauge::noop(), Gauge::noop())
            };
            ActionState {
                configured: on,
                value: AtomicU32::new(0),
                active,
                scale_percent,
            }
        });
        let monitors: Vec<MonitorState> = om
            .map(|o| o.monitors.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|m| {
                let s = store.plain(&format!("overload.{}", m.name));
                MonitorState {
                    cfg: m.clone(),
                    pressure: AtomicU64::new(0f64.to_bits()),
                    pressure_gauge: s.gauge("pressure"),
                    failed_updates: s.counter("failed_updates"),
                }
            })
            .collect();
        let global_max = monitors
            .iter()
            .find_map(|m| match m.cfg.kind {
                MonitorKind::DownstreamConnections { max } => Some(max),
                _ => None,
            })
            .or(cfg.runtime_global_max_connections);
        let listener_limits = cfg
            .listener_connection_limits
            .iter()
            .map(|(name, max)| (name.clone(), Arc::new(Limit::new(*max))))
            .collect();
        Self {
            refresh: om.map_or(DEFAULT_REFRESH, |o| o.refresh_interval),
            actions,
            action_triggers: om.map(|o| o.actions.clone()).unwrap_or_default(),
            monitors,
            global: global_max.map(|m| Arc::new(Limit::new(m))),
            listener_limits,
            paused: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Whether an overload manager with actions is configured.
    pub fn has_actions(&self) -> bool {
        !self.action_triggers.is_empty()
    }

    /// The state of `action` (0..=1).
    pub fn state(&self, action: Action) -> f64 {
        f64::from(self.actions[action as usize].value.load(Ordering::Relaxed))
            / f64::from(STATE_ONE)
    }

    /// Whether `action` applies to this request / connection: never when inactive, always
    /// when saturated, with the state's probability when scaled (Envoy's bernoulli draw).
    fn draw(&self, action: Action) -> bool {
        let s = &self.actions[action as usize];
        if !s.configured {
            return false;
        }
        match s.value.load(Ordering::Relaxed) {
            0 => false,
            v if v >= STATE_ONE => true,
            v => rand::random_range(0..STATE_ONE) < v,
        }
    }

    /// `stop_accepting_requests`: answer this new request with a local 503.
    pub fn shed_request(&self) -> bool {
        self.draw(Action::StopAcceptingRequests)
    }

    /// `disable_http_keepalive`: close this connection after the response.
    pub fn disable_keepalive(&self) -> bool {
        self.draw(Action::DisableHttpKeepalive)
    }

    /// `stop_accepting_connections` as a watch: `true` while accept loops should pause.
    pub fn accept_paused(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.actions[Action::StopAcceptingConnections as usize]
            .configured
            .then(|| self.paused.subscribe())
    }

    /// The global downstream connection limit, when configured.
    pub fn global_limit(&self) -> Option<&Arc<Limit>> {
        self.global.as_ref()
    }

    /// The runtime connection limit of listener `name`, when configured.
    pub fn listener_limit(&self, name: &str) -> Option<&Arc<Limit>> {
        self.listener_limits.get(name)
    }

    /// Admit a connection just accepted on listener `listener` (Envoy's order: global limit,
    /// `reject_incoming_connections`, the listener's limit). `ignore_global` listeners are not
    /// refused by the global limit but their connections count in it.
    pub fn admit(&self, listener: &str, ignore_global: bool) -> Result<Admitted, Refused> {
        let global = match &self.global {
            Some(g) if ignore_global => Some(g.acquire_exempt()),
            Some(g) => Some(g.try_acquire().ok_or(Refused::GlobalLimit)?),
            None => None,
        };
        if self.draw(Action::RejectIncomingConnections) {
            return Err(Refused::OverloadReject);
        }
        let listener = match (!self.listener_limits.is_empty())
            .then(|| self.listener_limits.get(listener))
            .flatten()
        {
            Some(l) => Some(l.try_acquire().ok_or(Refused::ListenerLimit)?),
            None => None,
        };
        Ok(Admitted {
            _global: global,
            _listener: listener,
        })
    }

    /// Sample every monitor once and update the actions (the refresh task's body; public for
    /// tests).
    pub fn refresh_once(&self) {
        for m in &self.monitors {
            match self.sample(&m.cfg.kind) {
                Ok(p) => {
                    m.pressure.store(p.to_bits(), Ordering::Relaxed);
                    m.pressure_gauge.set((p * 100.0).round());
                }
                Err(e) => {
                    m.failed_updates.increment(1);
                    tracing::debug!(monitor = %m.cfg.name, error = %e, "resource monitor update failed");
                }
            }
        }
        for a in &self.action_triggers {
            let state = a
                .triggers
                .iter()
                .map(|(i, t)| {
                    let p = self
                        .monitors
                        .get(*i)
                        .map_or(0.0, |m| f64::from_bits(m.pressure.load(Ordering::Relaxed)));
                    t.state(p)
                })
                .fold(0.0f64, f64::max);
            self.set_state(a.action, state);
        }
    }

    fn set_state(&self, action: Action, state: f64) {
        let s = &self.actions[action as usize];
        let v = (state.clamp(0.0, 1.0) * f64::from(STATE_ONE)).round() as u32;
        let old = s.value.swap(v, Ordering::Relaxed);
        s.active.set(if v >= STATE_ONE { 1.0 } else { 0.0 });
        let percent = u64::from(v) * 100 / u64::from(STATE_ONE);
        s.scale_percent.set(percent as f64);
        if old == 0 && v > 0 {
            tracing::warn!(
                action = action.name(),
                scale_percent = percent,
                "overload action active"
            );
        } else if old > 0 && v == 0 {
            tracing::info!(action = action.name(), "overload action cleared");
        }
        if action == Action::StopAcceptingConnections {
            self.paused.send_if_modified(|p| {
                let now = v >= STATE_ONE;
                std::mem::replace(p, now) != now
            });
        }
    }

    fn sample(&self, kind: &MonitorKind) -> Result<f64, MonitorError> {
        match kind {
            MonitorKind::FixedHeap {
                max_heap_size_bytes,
            } => Ok(resident_bytes()? as f64 / *max_heap_size_bytes as f64),
            MonitorKind::Injected { filename } => read_injected(filename),
            MonitorKind::DownstreamConnections { max } => {
                let active = self.global.as_ref().map_or(0, |g| g.active());
                Ok(active as f64 / (*max).max(1) as f64)
            }
        }
    }

    /// Run the refresh loop on the current runtime until `stop` fires (no task without
    /// monitors).
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        if self.monitors.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.refresh);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                me.refresh_once();
            }
        });
    }
}

/// The injected resource's pressure: the file's content, a number in 0..=1.
fn read_injected(path: &std::path::Path) -> Result<f64, MonitorError> {
    let text = std::fs::read_to_string(path).map_err(|source| MonitorError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let p: f64 = text.trim().parse().map_err(|_| MonitorError::Parse {
        path: path.display().to_string(),
        message: format!("{:?} is not a number", text.trim()),
    })?;
    if !(0.0..=1.0).contains(&p) {
        return Err(MonitorError::Parse {
            path: path.display().to_string(),
            message: format!("pressure {p} is not in 0..=1"),
        });
    }
    Ok(p)
}

/// The process's resident set size (`VmRSS` of /proc/self/status).
fn resident_bytes() -> Result<u64, MonitorError> {
    const STATUS: &str = "/proc/self/status";
    let text = std::fs::read_to_string(STATUS).map_err(|source| MonitorError::Read {
        path: STATUS.into(),
        source,
    })?;
    parse_vm_rss(&text).ok_or_else(|| MonitorError::Parse {
        path: STATUS.into(),
        message: "no VmRSS line".into(),
    })
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
