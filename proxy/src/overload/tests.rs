use std::time::Duration;

use super::*;
use crate::config::Errors;
use crate::stats::Store;

fn translate(yaml: &str) -> (LimitsConfig, Vec<(String, String)>) {
    let b = crate::config::parse_bootstrap(yaml).expect("yaml");
    let mut errs = Errors::default();
    let c = translate::limits(
        b.overload_manager.as_ref(),
        b.layered_runtime.as_ref(),
        &mut errs,
    );
    (c, errs.0.into_iter().map(|e| (e.path, e.message)).collect())
}

fn ok(yaml: &str) -> LimitsConfig {
    let (c, e) = translate(yaml);
    assert!(e.is_empty(), "{e:?}");
    c
}

fn err_paths(yaml: &str) -> Vec<String> {
    translate(yaml).1.into_iter().map(|(p, _)| p).collect()
}

/// A directory removed when dropped.
struct TmpDir(std::path::PathBuf);

impl TmpDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!(
            "weir-overload-{}-{name}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).expect("tmp dir");
        Self(d)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stats(store: &Store) -> HashMap<String, String> {
    store.render_text().into_iter().collect()
}

const HEAP: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig";
const INJ: &str = "type.googleapis.com/envoy.extensions.resource_monitors.injected_resource.v3.InjectedResourceConfig";
const CX: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

fn om(monitors: &str, actions: &str) -> String {
    format!(
        "overload_manager:\n  refresh_interval: 0.25s\n  resource_monitors:\n{monitors}  actions:\n{actions}"
    )
}

fn heap(name: &str, max: u64) -> String {
    format!("  - name: {name}\n    typed_config: {{'@type': {HEAP}, max_heap_size_bytes: {max}}}\n")
}

fn injected(name: &str, file: &str) -> String {
    format!("  - name: {name}\n    typed_config: {{'@type': {INJ}, filename: '{file}'}}\n")
}

fn cx(name: &str, max: i64) -> String {
    format!(
        "  - name: {name}\n    typed_config: {{'@type': {CX}, max_active_downstream_connections: {max}}}\n"
    )
}

fn action(name: &str, triggers: &str) -> String {
    format!("  - name: {name}\n    triggers:\n{triggers}")
}

fn threshold(monitor: &str, v: f64) -> String {
    format!("    - name: {monitor}\n      threshold: {{value: {v}}}\n")
}

fn scaled(monitor: &str, a: f64, b: f64) -> String {
    format!(
        "    - name: {monitor}\n      scaled: {{scaling_threshold: {a}, saturation_threshold: {b}}}\n"
    )
}

#[test]
fn trigger_math() {
    let t = Trigger::Threshold(0.95);
    assert_eq!(t.state(0.94), 0.0);
    assert_eq!(t.state(0.95), 1.0);
    assert_eq!(t.state(1.0), 1.0);
    let s = Trigger::Scaled {
        scaling: 0.5,
        saturation: 0.9,
    };
    assert_eq!(s.state(0.0), 0.0);
    assert_eq!(s.state(0.5), 0.0);
    assert!((s.state(0.7) - 0.5).abs() < 1e-9);
    assert!((s.state(0.6) - 0.25).abs() < 1e-9);
    assert_eq!(s.state(0.9), 1.0);
    assert_eq!(s.state(1.0), 1.0);
}

#[test]
fn translation_of_monitors_actions_and_triggers() {
    let c = ok(&om(
        &format!(
            "{}{}{}",
            heap("envoy.resource_monitors.fixed_heap", 1 << 30),
            injected("inj", "/tmp/p"),
            cx(
                "envoy.resource_monitors.global_downstream_max_connections",
                100
            )
        ),
        &format!(
            "{}{}",
            action(
                "envoy.overload_actions.stop_accepting_requests",
                &format!(
                    "{}{}",
                    threshold("envoy.resource_monitors.fixed_heap", 0.95),
                    threshold("inj", 0.9)
                )
            ),
            action(
                "envoy.overload_actions.disable_http_keepalive",
                &scaled("envoy.resource_monitors.fixed_heap", 0.8, 0.95)
            )
        ),
    ));
    let o = c.overload.expect("overload manager");
    assert_eq!(o.refresh_interval, Duration::from_millis(250));
    assert_eq!(
        o.monitors
            .iter()
            .map(|m| m.kind.clone())
            .collect::<Vec<_>>(),
        vec![
            MonitorKind::FixedHeap {
                max_heap_size_bytes: 1 << 30
            },
            MonitorKind::Injected {
                filename: "/tmp/p".into()
            },
            MonitorKind::DownstreamConnections { max: 100 },
        ]
    );
    assert_eq!(o.actions[0].action, Action::StopAcceptingRequests);
    assert_eq!(
        o.actions[0].triggers,
        vec![(0, Trigger::Threshold(0.95)), (1, Trigger::Threshold(0.9))]
    );
    assert_eq!(
        o.actions[1].triggers,
        vec![(
            0,
            Trigger::Scaled {
                scaling: 0.8,
                saturation: 0.95
            }
        )]
    );
    // Default refresh interval.
    let c = ok(
        "overload_manager: {resource_monitors: [{name: m, typed_config: {'@type': type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig, max_heap_size_bytes: 10}}]}\n",
    );
    assert_eq!(c.overload.expect("om").refresh_interval, DEFAULT_REFRESH);
}

#[test]
fn translation_errors_have_paths() {
    let p = err_paths(&format!(
        "{}  loadshed_points: [{{name: x}}]\n",
        om(
            &format!(
                "{}{}{}  - name: cg\n    typed_config: {{'@type': type.googleapis.com/envoy.extensions.resource_monitors.cgroup_memory.v3.CgroupMemoryConfig}}\n{}{}",
                heap("h", 0),
                injected("i", ""),
                cx("c", 0),
                heap("dup", 5),
                heap("dup", 6),
            ),
            &format!(
                "{}{}{}{}{}",
                action("envoy.overload_actions.shrink_heap", &threshold("dup", 0.5)),
                action(
                    "envoy.overload_actions.stop_accepting_requests",
                    &format!(
                        "{}{}{}",
                        threshold("nope", 0.5),
                        threshold("dup", 1.5),
                        scaled("dup", 0.9, 0.5)
                    )
                ),
                action(
                    "envoy.overload_actions.disable_http_keepalive",
                    &format!("{}{}", threshold("dup", 0.5), threshold("dup", 0.6))
                ),
                action(
                    "envoy.overload_actions.disable_http_keepalive",
                    &threshold("dup", 0.5)
                ),
                "  - name: envoy.overload_actions.reject_incoming_connections\n",
            ),
        )
    ));
    for want in [
        "overload_manager.loadshed_points",
        "overload_manager.resource_monitors[0].typed_config.max_heap_size_bytes",
        "overload_manager.resource_monitors[1].typed_config.filename",
        "overload_manager.resource_monitors[2].typed_config.max_active_downstream_connections",
        "overload_manager.resource_monitors[3].typed_config",
        "overload_manager.resource_monitors[5].name",
        "overload_manager.actions[0].name",
        "overload_manager.actions[1].triggers[0].name",
        "overload_manager.actions[1].triggers[1].threshold.value",
        "overload_manager.actions[1].triggers[2].scaled",
        "overload_manager.actions[2].triggers[1].name",
        "overload_manager.actions[3].name",
        "overload_manager.actions[4].triggers",
    ] {
        assert!(p.contains(&want.to_string()), "{want} missing: {p:?}");
    }
    // Two connection monitors; typed_config missing; reduce_timeouts' typed_config.
    let p = err_paths(&om(
        &format!("{}{}  - name: bare\n", cx("a", 1), cx("b", 2)),
        "  - name: envoy.overload_actions.stop_accepting_requests\n    triggers: [{name: a, threshold: {value: 0.5}}]\n    typed_config: {'@type': type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig}\n",
    ));
    for want in [
        "overload_manager.resource_monitors[1].typed_config",
        "overload_manager.resource_monitors[2].typed_config",
        "overload_manager.actions[0].typed_config",
    ] {
        assert!(p.contains(&want.to_string()), "{want} missing: {p:?}");
    }
}

#[test]
fn runtime_static_layers() {
    let c = ok(
        "layered_runtime:\n  layers:\n  - name: base\n    static_layer:\n      envoy.resource_limits.listener.edge.connection_limit: 10\n      envoy: {resource_limits: {listener: {other.name: {connection_limit: 3}}}}\n  - name: admin\n    admin_layer: {}\n  - name: override\n    static_layer: {envoy.resource_limits.listener.edge.connection_limit: 20, overload.global_downstream_max_connections: 50}\n",
    );
    assert_eq!(c.listener_connection_limits["edge"], 20, "later layers win");
    assert_eq!(c.listener_connection_limits["other.name"], 3);
    assert_eq!(c.runtime_global_max_connections, Some(50));

    let p = err_paths(
        "layered_runtime:\n  layers:\n  - name: a\n    static_layer: {some.flag: 1, envoy.resource_limits.listener.x.connection_limit: -1, envoy.resource_limits.listener.y.connection_limit: 'many'}\n  - name: d\n    disk_layer: {symlink_root: /srv}\n",
    );
    for want in [
        "layered_runtime.layers[0].static_layer.some.flag",
        "layered_runtime.layers[0].static_layer.envoy.resource_limits.listener.x.connection_limit",
        "layered_runtime.layers[0].static_layer.envoy.resource_limits.listener.y.connection_limit",
        "layered_runtime.layers[1].disk_layer",
    ] {
        assert!(p.contains(&want.to_string()), "{want} missing: {p:?}");
    }
    // The runtime global limit and the monitor together are ambiguous.
    let p = err_paths(&format!(
        "{}layered_runtime: {{layers: [{{name: a, static_layer: {{overload.global_downstream_max_connections: 5}}}}]}}\n",
        om(&cx("c", 1), "  []\n").replace("  actions:\n  []\n", "  actions: []\n")
    ));
    assert_eq!(p, ["layered_runtime"]);
}

#[test]
fn vm_rss_parsing() {
    assert_eq!(
        parse_vm_rss("Name:\tweir\nVmRSS:\t   1234 kB\nVmData: 1 kB\n"),
        Some(1234 * 1024)
    );
    assert_eq!(parse_vm_rss("Name: weir\n"), None);
    assert!(resident_bytes().is_ok_and(|b| b > 0) || !cfg!(target_os = "linux"));
}

fn overload_with(yaml: &str, store: &Arc<Store>) -> Overload {
    Overload::new(&ok(yaml), store)
}

#[test]
fn injected_pressure_drives_actions_and_stats() {
    let dir = TmpDir::new("inj");
    let file = dir.0.join("pressure");
    std::fs::write(&file, "0.1").expect("write");
    let f = file.display().to_string();
    let store = Store::new();
    let o = overload_with(
        &om(
            &injected("inj", &f),
            &format!(
                "{}{}",
                action(
                    "envoy.overload_actions.stop_accepting_requests",
                    &threshold("inj", 0.95)
                ),
                action(
                    "envoy.overload_actions.disable_http_keepalive",
                    &scaled("inj", 0.5, 0.9)
                )
            ),
        ),
        &store,
    );
    o.refresh_once();
    let s = stats(&store);
    assert_eq!(s["overload.inj.pressure"], "10");
    assert_eq!(
        s["overload.envoy.overload_actions.stop_accepting_requests.active"],
        "0"
    );
    assert!(!o.shed_request() && !o.disable_keepalive());

    std::fs::write(&file, "0.7").expect("write");
    o.refresh_once();
    let s = stats(&store);
    assert_eq!(s["overload.inj.pressure"], "70");
    assert_eq!(
        s["overload.envoy.overload_actions.disable_http_keepalive.scale_percent"],
        "50"
    );
    assert_eq!(
        s["overload.envoy.overload_actions.disable_http_keepalive.active"],
        "0"
    );
    assert!((o.state(Action::DisableHttpKeepalive) - 0.5).abs() < 1e-6);
    // A scaled state is a probability: over many draws both outcomes occur.
    let hits = (0..2000).filter(|_| o.disable_keepalive()).count();
    assert!((1..2000).contains(&hits), "{hits}");
    assert!(!o.shed_request());

    std::fs::write(&file, "0.99").expect("write");
    o.refresh_once();
    let s = stats(&store);
    assert_eq!(
        s["overload.envoy.overload_actions.stop_accepting_requests.active"],
        "1"
    );
    assert_eq!(
        s["overload.envoy.overload_actions.stop_accepting_requests.scale_percent"],
        "100"
    );
    assert!(o.shed_request() && o.disable_keepalive());

    // A bad sample is a failed update; the last pressure stays.
    std::fs::write(&file, "lots").expect("write");
    o.refresh_once();
    std::fs::write(&file, "1.5").expect("write");
    o.refresh_once();
    std::fs::remove_file(&file).expect("rm");
    o.refresh_once();
    let s = stats(&store);
    assert_eq!(s["overload.inj.failed_updates"], "3");
    assert_eq!(s["overload.inj.pressure"], "99");
    assert!(o.shed_request());

    std::fs::write(&file, "0").expect("write");
    o.refresh_once();
    assert!(!o.shed_request() && !o.disable_keepalive());
    assert_eq!(
        stats(&store)["overload.envoy.overload_actions.stop_accepting_requests.active"],
        "0"
    );
}

#[test]
fn global_limit_counts_exempt_listeners_and_releases_once() {
    let store = Store::new();
    let o = overload_with(
        &om(
            &cx(
                "envoy.resource_monitors.global_downstream_max_connections",
                2,
            ),
            "  []\n",
        )
        .replace("  actions:\n  []\n", "  actions: []\n"),
        &store,
    );
    let a = o.admit("l", false).expect("1st");
    let b = o.admit("l", false).expect("2nd");
    assert_eq!(o.admit("l", false).err(), Some(Refused::GlobalLimit));
    // Exempt listeners are admitted, and counted.
    let c = o.admit("admin-like", true).expect("exempt");
    assert_eq!(o.global_limit().map(|g| g.active()), Some(3));
    o.refresh_once();
    assert_eq!(
        stats(&store)["overload.envoy.resource_monitors.global_downstream_max_connections.pressure"],
        "150"
    );
    drop((a, c));
    assert_eq!(o.global_limit().map(|g| g.active()), Some(1));
    let d = o.admit("l", false).expect("a slot is free again");
    drop((b, d));
    assert_eq!(o.global_limit().map(|g| g.active()), Some(0));
}

#[test]
fn listener_runtime_limit_and_reject_incoming() {
    let dir = TmpDir::new("p");
    let file = dir.0.join("p");
    std::fs::write(&file, "0").expect("write");
    let store = Store::new();
    let o = overload_with(
        &format!(
            "{}layered_runtime: {{layers: [{{name: a, static_layer: {{envoy.resource_limits.listener.edge.connection_limit: 1}}}}]}}\n",
            om(
                &injected("inj", &file.display().to_string()),
                &action(
                    "envoy.overload_actions.reject_incoming_connections",
                    &threshold("inj", 0.9)
                ),
            )
        ),
        &store,
    );
    let a = o.admit("edge", false).expect("first");
    assert_eq!(o.admit("edge", false).err(), Some(Refused::ListenerLimit));
    assert!(
        o.admit("other", false).is_ok(),
        "other listeners have no limit"
    );
    drop(a);
    std::fs::write(&file, "0.95").expect("write");
    o.refresh_once();
    assert_eq!(o.admit("edge", false).err(), Some(Refused::OverloadReject));
    assert_eq!(
        o.listener_limit("edge").map(|l| l.active()),
        Some(0),
        "a rejected connection holds no slot"
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_task_pauses_and_resumes_accepting() {
    let dir = TmpDir::new("p");
    let file = dir.0.join("p");
    std::fs::write(&file, "0.99").expect("write");
    let store = Store::new();
    let o = Arc::new(overload_with(
        &om(
            &injected("inj", &file.display().to_string()),
            &action(
                "envoy.overload_actions.stop_accepting_connections",
                &threshold("inj", 0.9),
            ),
        ),
        &store,
    ));
    let mut rx = o.accept_paused().expect("configured");
    assert!(!*rx.borrow_and_update());
    let stop = CancellationToken::new();
    o.spawn(stop.clone());
    // The first refresh runs at once.
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|p| *p))
        .await
        .expect("paused")
        .expect("sender alive");
    std::fs::write(&file, "0.2").expect("write");
    // The next refresh is one refresh_interval (250 ms) later (paused clock).
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|p| !*p))
        .await
        .expect("resumed")
        .expect("sender alive");
    stop.cancel();
}
