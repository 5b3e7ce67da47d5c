//! `/ready`, `/server_info`, `/stats`, `/stats/prometheus`, and the mutating lifecycle
//! endpoints.
//!
//! Sidecar lifecycle (Istio's conventions): `/ready` is 200 only while LIVE, i.e. once the
//! server's listeners accept, which for an xDS-configured proxy is after the initial LDS/CDS
//! fetch was applied or timed out (`initial_fetch_timeout`); 503 with `PRE_INITIALIZING`
//! before and `DRAINING` after a drain started. `/drain_listeners` drains without exiting
//! (unless `--exit-on-zero-active-connections`); `/quitquitquit` drains and exits.

use std::sync::atomic::Ordering;

use http::{Response, StatusCode};
use serde_json::{Value, json as j};
use weir_xds_api::pb::envoy::admin::v3::command_line_options::Mode as PbMode;
use weir_xds_api::pb::envoy::admin::v3::server_info::State;
use weir_xds_api::pb::envoy::admin::v3::{CommandLineOptions, ServerInfo};
use weir_xds_api::pb::google::protobuf::Duration as PbDuration;

use super::{Body, Query, TEXT, fill, json, text};
use crate::cli::Mode;
use crate::server::ServerState;

/// The server state as Envoy reports it: DRAINING once listeners drain or health checks
/// were failed by `/healthcheck/fail` (Envoy's `serverState(init, healthCheckFailed)`),
/// PRE_INITIALIZING until listeners accept.
pub(super) fn server_state(state: &ServerState) -> State {
    if state.draining.is_cancelled() {
        State::Draining
    } else if !state.ready.load(Ordering::SeqCst) {
        State::PreInitializing
    } else if !state.healthy.load(Ordering::SeqCst) {
        State::Draining
    } else {
        State::Live
    }
}

/// `GET /ready`.
pub(super) fn ready(state: &ServerState) -> Response<Body> {
    let s = server_state(state);
    let status = if s == State::Live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, TEXT, format!("{}\n", s.as_str_name()))
}

/// `GET /server_info`: Envoy's `envoy.admin.v3.ServerInfo`.
pub(super) fn server_info(state: &ServerState) -> Response<Body> {
    let snap = state.snapshot.load();
    let opts = &state.options;
    let uptime = PbDuration {
        seconds: state.started.elapsed().unwrap_or_default().as_secs() as i64,
        nanos: 0,
    };
    let mut node = snap.bootstrap.node.clone().unwrap_or_default();
    node.id.clone_from(&snap.node.id);
    node.cluster.clone_from(&snap.node.cluster);
    if node.user_agent_name.is_empty() {
        node.user_agent_name = "weir".into();
    }
    let s = server_state(state);
    let hot_restart = state.hot_restart_socket.get().is_some();
    let mode = match opts.mode {
        Mode::Serve => PbMode::Serve,
        Mode::Validate => PbMode::Validate,
    };
    let info = ServerInfo {
        version: format!("weir/{}", env!("CARGO_PKG_VERSION")),
        state: s as i32,
        uptime_current_epoch: Some(uptime),
        uptime_all_epochs: Some(uptime),
        hot_restart_version: if hot_restart {
            crate::hot_restart::HOT_RESTART_VERSION.into()
        } else {
            "disabled".into()
        },
        command_line_options: Some(CommandLineOptions {
            concurrency: u32::try_from(state.concurrency).unwrap_or(u32::MAX),
            log_level: opts.log_level.clone(),
            drain_time: Some(PbDuration {
                seconds: i64::try_from(opts.drain_time_s).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            service_node: opts.service_node.clone().unwrap_or_default(),
            service_cluster: opts.service_cluster.clone().unwrap_or_default(),
            config_path: opts
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            config_yaml: opts.config_yaml.clone().unwrap_or_default(),
            mode: mode as i32,
            disable_hot_restart: !hot_restart,
            restart_epoch: opts.restart_epoch,
            base_id: opts.base_id,
            parent_shutdown_time: Some(PbDuration {
                seconds: i64::try_from(opts.parent_shutdown_time_s).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            socket_path: state
                .hot_restart_socket
                .get()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        node: Some(node),
        hot_restart_initializing: false,
    };
    let mut v = weir_xds_api::to_json(&info);
    // Envoy prints server_info with default-valued fields too; keep the ones clients read.
    fill(&mut v, "state", j!(s.as_str_name()));
    fill(&mut v, "uptime_current_epoch", j!("0s"));
    fill(&mut v, "uptime_all_epochs", j!("0s"));
    if let Some(o) = v.get_mut("command_line_options") {
        fill(o, "concurrency", j!(0));
        fill(o, "log_level", j!(""));
        fill(o, "service_node", j!(""));
        fill(o, "service_cluster", j!(""));
        fill(o, "config_path", j!(""));
        fill(o, "mode", j!(mode.as_str_name()));
        fill(o, "restart_epoch", j!(0));
        fill(o, "base_id", j!("0"));
    }
    if let Some(n) = v.get_mut("node") {
        fill(n, "id", j!(""));
        fill(n, "cluster", j!(""));
    }
    json(StatusCode::OK, &v)
}

/// `GET /stats`: Envoy's text form (`name: value`, sorted) or `?format=json`.
/// `?filter=REGEX` keeps stats whose dotted name matches; `?usedonly` is accepted (every
/// stat weir registers is one it uses).
pub(super) fn stats(state: &ServerState, q: &Query) -> Response<Body> {
    let filter = match q.get("filter").filter(|f| !f.is_empty()) {
        Some(f) => match regex::Regex::new(f) {
            Ok(r) => Some(r),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    format!("Invalid regex: {e}\n"),
                );
            }
        },
        None => None,
    };
    let stats: Vec<(String, String)> = state
        .stats
        .render_text()
        .into_iter()
        .filter(|(name, _)| filter.as_ref().is_none_or(|r| r.is_match(name)))
        .collect();
    if q.wants_json() {
        // Histogram summaries are not numbers; Envoy reports them in a separate
        // `histograms` element, which weir does not produce yet.
        let list: Vec<Value> = stats
            .iter()
            .filter_map(|(name, value)| Some(j!({"name": name, "value": number(value)?})))
            .collect();
        return json(StatusCode::OK, &j!({ "stats": list }));
    }
    let mut out = String::new();
    for (name, value) in &stats {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }
    text(StatusCode::OK, TEXT, out)
}

/// A stat value as a JSON number (integers stay integers, as in Envoy's output).
fn number(v: &str) -> Option<Value> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(j!(n));
    }
    if let Ok(n) = v.parse::<i64>() {
        return Some(j!(n));
    }
    let f = v.parse::<f64>().ok().filter(|f| f.is_finite())?;
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        return Some(j!(f as i64));
    }
    serde_json::Number::from_f64(f).map(Value::Number)
}

/// `POST /healthcheck/fail` and `POST /healthcheck/ok`.
pub(super) fn healthcheck(state: &ServerState, ok: bool) -> Response<Body> {
    let was = state.healthy.swap(ok, Ordering::SeqCst);
    tracing::info!(
        healthy = ok,
        changed = was != ok,
        "admin: /healthcheck/{}",
        if ok { "ok" } else { "fail" }
    );
    // `server.state` follows the state `/ready` reports, as in Envoy.
    state
        .server_stats
        .state
        .set(f64::from(server_state(state) as i32));
    text(StatusCode::OK, TEXT, "OK\n")
}

/// `POST /drain_listeners` (`?graceful` and `?inboundonly` are accepted; weir's drain is
/// always graceful: in-flight requests finish, up to `--drain-time-s`).
pub(super) fn drain_listeners(state: &ServerState, q: &Query) -> Response<Body> {
    tracing::info!(
        graceful = q.has("graceful"),
        inboundonly = q.has("inboundonly"),
        "admin: /drain_listeners"
    );
    state.drain_listeners();
    text(StatusCode::OK, TEXT, "OK\n")
}

/// `POST /quitquitquit`: drain and exit. The admin server keeps serving until the drain is
/// over (`hard_stop`), and then lets this response finish, so the client sees `OK`.
pub(super) fn quitquitquit(state: &ServerState) -> Response<Body> {
    tracing::info!("admin: /quitquitquit: shutting down");
    state.request_shutdown();
    text(StatusCode::OK, TEXT, "OK\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_render_like_envoy() {
        assert_eq!(number("3"), Some(j!(3)));
        assert_eq!(number("-2"), Some(j!(-2)));
        assert_eq!(number("1.0"), Some(j!(1)));
        assert_eq!(number("0.5"), Some(j!(0.5)));
        assert_eq!(number("P50(1) count(1)"), None);
        assert_eq!(number("NaN"), None);
    }
}
