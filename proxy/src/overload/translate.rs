//! Bootstrap `overload_manager` and `layered_runtime` -> [`LimitsConfig`].

use std::collections::HashMap;
use std::path::PathBuf;

use weir_xds_api::pb::envoy::config::bootstrap::v3::runtime_layer::LayerSpecifier;
use weir_xds_api::pb::envoy::config::bootstrap::v3::{LayeredRuntime, RuntimeLayer};
use weir_xds_api::pb::envoy::config::overload::v3 as pb;
use weir_xds_api::pb::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig;
use weir_xds_api::pb::envoy::extensions::resource_monitors::fixed_heap::v3::FixedHeapConfig;
use weir_xds_api::pb::envoy::extensions::resource_monitors::injected_resource::v3::InjectedResourceConfig;
use weir_xds_api::pb::google::protobuf::{Struct, Value, value::Kind};

use super::{
    Action, ActionConfig, DEFAULT_REFRESH, LimitsConfig, MonitorConfig, MonitorKind,
    OverloadConfig, Trigger,
};
use crate::config::{Errors, duration_or, join};
use weir_filters::matcher::unpack_or_error;

const FIXED_HEAP_URL: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig";
const INJECTED_URL: &str = "type.googleapis.com/envoy.extensions.resource_monitors.injected_resource.v3.InjectedResourceConfig";
const DOWNSTREAM_CX_URL: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

const KNOWN_MONITORS: &str = "envoy.resource_monitors.fixed_heap, \
     envoy.resource_monitors.injected_resource and \
     envoy.resource_monitors.global_downstream_max_connections";

/// Runtime key prefix / suffix of a listener's connection limit.
const LISTENER_LIMIT_PREFIX: &str = "envoy.resource_limits.listener.";
const LISTENER_LIMIT_SUFFIX: &str = ".connection_limit";
/// Envoy's older runtime global connection limit.
const RUNTIME_GLOBAL_LIMIT: &str = "overload.global_downstream_max_connections";

/// Translate the bootstrap's `overload_manager` (at `path`) and `layered_runtime`.
pub fn limits(
    om: Option<&pb::OverloadManager>,
    runtime: Option<&LayeredRuntime>,
    errs: &mut Errors,
) -> LimitsConfig {
    let overload = om.and_then(|o| overload_manager(o, "overload_manager", errs));
    let mut cfg = LimitsConfig {
        overload,
        ..Default::default()
    };
    if let Some(r) = runtime {
        layered_runtime(r, "layered_runtime", &mut cfg, errs);
    }
    let has_monitor = cfg.overload.as_ref().is_some_and(|o| {
        o.monitors
            .iter()
            .any(|m| matches!(m.kind, MonitorKind::DownstreamConnections { .. }))
    });
    if has_monitor && cfg.runtime_global_max_connections.is_some() {
        errs.add(
            "layered_runtime",
            format!(
                "{RUNTIME_GLOBAL_LIMIT} and the envoy.resource_monitors.global_downstream_max_connections \
                 monitor both set a global connection limit; keep the monitor"
            ),
        );
    }
    cfg
}

/// `envoy.config.overload.v3.OverloadManager`.
pub fn overload_manager(
    om: &pb::OverloadManager,
    path: &str,
    errs: &mut Errors,
) -> Option<OverloadConfig> {
    let before = errs.0.len();
    errs.reject_unsupported(
        om,
        &["refresh_interval", "resource_monitors", "actions"],
        path,
    );
    let refresh_path = join(path, "refresh_interval");
    let refresh_interval = duration_or(
        om.refresh_interval.as_ref(),
        DEFAULT_REFRESH,
        &refresh_path,
        errs,
    );
    if om.refresh_interval.is_some() && refresh_interval.is_zero() {
        errs.add(refresh_path, "must be greater than 0");
    }
    let mut monitors: Vec<MonitorConfig> = Vec::new();
    for (i, m) in om.resource_monitors.iter().enumerate() {
        let p = format!("{path}.resource_monitors[{i}]");
        let Some(kind) = monitor(m, &p, errs) else {
            continue;
        };
        if monitors.iter().any(|o| o.name == m.name) {
            errs.add(
                join(&p, "name"),
                format!("duplicate resource monitor {:?}", m.name),
            );
            continue;
        }
        if matches!(kind, MonitorKind::DownstreamConnections { .. })
            && monitors
                .iter()
                .any(|o| matches!(o.kind, MonitorKind::DownstreamConnections { .. }))
        {
            errs.add(
                join(&p, "typed_config"),
                "only one global_downstream_max_connections monitor is allowed",
            );
            continue;
        }
        monitors.push(MonitorConfig {
            name: m.name.clone(),
            kind,
        });
    }
    let mut actions: Vec<ActionConfig> = Vec::new();
    for (i, a) in om.actions.iter().enumerate() {
        let p = format!("{path}.actions[{i}]");
        errs.reject_unsupported(a, &["name", "triggers"], &p);
        let Some(action) = Action::from_name(&a.name) else {
            errs.add(
                join(&p, "name"),
                format!(
                    "overload action {:?} is not supported (weir has {})",
                    a.name,
                    Action::ALL.map(Action::name).join(", ")
                ),
            );
            continue;
        };
        if actions.iter().any(|c| c.action == action) {
            errs.add(
                join(&p, "name"),
                format!("duplicate overload action {:?}", a.name),
            );
            continue;
        }
        if a.triggers.is_empty() {
            errs.add(join(&p, "triggers"), "an action needs at least one trigger");
        }
        let mut triggers = Vec::new();
        for (j, t) in a.triggers.iter().enumerate() {
            let tp = format!("{p}.triggers[{j}]");
            let Some(idx) = monitors.iter().position(|m| m.name == t.name) else {
                errs.add(
                    join(&tp, "name"),
                    format!("unknown trigger resource {:?}", t.name),
                );
                continue;
            };
            if triggers.iter().any(|(k, _)| *k == idx) {
                errs.add(
                    join(&tp, "name"),
                    format!("duplicate trigger resource {:?} for this action", t.name),
                );
                continue;
            }
            if let Some(tr) = trigger(t, &tp, errs) {
                triggers.push((idx, tr));
            }
        }
        actions.push(ActionConfig { action, triggers });
    }
    (errs.0.len() == before).then_some(OverloadConfig {
        refresh_interval,
        monitors,
        actions,
    })
}

fn monitor(m: &pb::ResourceMonitor, path: &str, errs: &mut Errors) -> Option<MonitorKind> {
    errs.reject_unsupported(m, &["name", "typed_config"], path);
    if m.name.is_empty() {
        errs.add(join(path, "name"), "name is required");
    }
    let tp = join(path, "typed_config");
    let Some(pb::resource_monitor::ConfigType::TypedConfig(any)) = &m.config_type else {
        errs.add(
            tp,
            format!("a typed_config is required (weir has {KNOWN_MONITORS})"),
        );
        return None;
    };
    match any.type_url.as_str() {
        FIXED_HEAP_URL => {
            let c: FixedHeapConfig = unpack_or_error(any, &tp, errs)?;
            errs.reject_unsupported(&c, &["max_heap_size_bytes"], &tp);
            if c.max_heap_size_bytes == 0 {
                errs.add(join(&tp, "max_heap_size_bytes"), "must be greater than 0");
                return None;
            }
            Some(MonitorKind::FixedHeap {
                max_heap_size_bytes: c.max_heap_size_bytes,
            })
        }
        INJECTED_URL => {
            let c: InjectedResourceConfig = unpack_or_error(any, &tp, errs)?;
            if c.filename.is_empty() {
                errs.add(join(&tp, "filename"), "filename is required");
                return None;
            }
            Some(MonitorKind::Injected {
                filename: PathBuf::from(c.filename),
            })
        }
        DOWNSTREAM_CX_URL => {
            let c: DownstreamConnectionsConfig = unpack_or_error(any, &tp, errs)?;
            if c.max_active_downstream_connections <= 0 {
                errs.add(
                    join(&tp, "max_active_downstream_connections"),
                    "must be greater than 0",
                );
                return None;
            }
            Some(MonitorKind::DownstreamConnections {
                max: c.max_active_downstream_connections as u64,
            })
        }
        other => {
            errs.add(
                tp,
                format!(
                    "resource monitor {} is not supported (weir has {KNOWN_MONITORS})",
                    weir_xds_api::type_name(other)
                ),
            );
            None
        }
    }
}

fn trigger(t: &pb::Trigger, path: &str, errs: &mut Errors) -> Option<Trigger> {
    errs.reject_unsupported(t, &["name", "threshold", "scaled"], path);
    let unit = |v: f64, p: String, errs: &mut Errors| {
        let ok = (0.0..=1.0).contains(&v);
        if !ok {
            errs.add(p, "must be between 0 and 1");
        }
        ok
    };
    match &t.trigger_oneof {
        Some(pb::trigger::TriggerOneof::Threshold(th)) => {
            unit(th.value, join(path, "threshold.value"), errs)
                .then_some(Trigger::Threshold(th.value))
        }
        Some(pb::trigger::TriggerOneof::Scaled(s)) => {
            let a = unit(
                s.scaling_threshold,
                join(path, "scaled.scaling_threshold"),
                errs,
            );
            let b = unit(
                s.saturation_threshold,
                join(path, "scaled.saturation_threshold"),
                errs,
            );
            if !(a && b) {
                return None;
            }
            if s.scaling_threshold >= s.saturation_threshold {
                errs.add(
                    join(path, "scaled"),
                    "scaling_threshold must be less than saturation_threshold",
                );
                return None;
            }
            Some(Trigger::Scaled {
                scaling: s.scaling_threshold,
                saturation: s.saturation_threshold,
            })
        }
        None => {
            errs.add(path, "a trigger needs `threshold` or `scaled`");
            None
        }
    }
}

/// `layered_runtime`: static layers (later layers override earlier ones) with the limit keys
/// weir knows; an `admin_layer` is accepted (weir has no runtime admin endpoint, so it stays
/// empty); disk and RTDS layers are refused.
fn layered_runtime(r: &LayeredRuntime, path: &str, cfg: &mut LimitsConfig, errs: &mut Errors) {
    errs.reject_unsupported(r, &["layers"], path);
    let mut values: HashMap<String, (f64, String)> = HashMap::new();
    for (i, l) in r.layers.iter().enumerate() {
        let p = format!("{path}.layers[{i}]");
        layer(l, &p, &mut values, errs);
    }
    let mut keys: Vec<_> = values.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, (v, p)) in keys {
        let as_count = |errs: &mut Errors| {
            if v < 0.0 || v.fract() != 0.0 || v > u64::MAX as f64 {
                errs.add(&p, "must be a non-negative integer");
                None
            } else {
                Some(v as u64)
            }
        };
        if key == RUNTIME_GLOBAL_LIMIT {
            cfg.runtime_global_max_connections = as_count(errs);
        } else if let Some(name) = key
            .strip_prefix(LISTENER_LIMIT_PREFIX)
            .and_then(|k| k.strip_suffix(LISTENER_LIMIT_SUFFIX))
            .filter(|n| !n.is_empty())
        {
            if let Some(n) = as_count(errs) {
                cfg.listener_connection_limits.insert(name.to_string(), n);
            }
        } else {
            errs.add(
                p,
                format!(
                    "runtime key {key:?} is not supported (weir knows \
                     {LISTENER_LIMIT_PREFIX}<listener name>{LISTENER_LIMIT_SUFFIX} and \
                     {RUNTIME_GLOBAL_LIMIT})"
                ),
            );
        }
    }
}

fn layer(
    l: &RuntimeLayer,
    path: &str,
    values: &mut HashMap<String, (f64, String)>,
    errs: &mut Errors,
) {
    errs.reject_unsupported(l, &["name", "static_layer", "admin_layer"], path);
    if let Some(LayerSpecifier::StaticLayer(s)) = &l.layer_specifier {
        flatten(s, "", &join(path, "static_layer"), values, errs);
    }
}

/// Runtime keys of a static layer: nested structs join their keys with `.` (Envoy's rule).
fn flatten(
    s: &Struct,
    prefix: &str,
    path: &str,
    out: &mut HashMap<String, (f64, String)>,
    errs: &mut Errors,
) {
    let mut fields: Vec<_> = s.fields.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in fields {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let p = join(path, k);
        match v {
            Value {
                kind: Some(Kind::StructValue(inner)),
            } => flatten(inner, &key, &p, out, errs),
            Value {
                kind: Some(Kind::NumberValue(n)),
            } => {
                out.insert(key, (*n, p));
            }
            _ => errs.add(
                p,
                "weir's runtime keys are numbers (connection limits); this value is not",
            ),
        }
    }
}
