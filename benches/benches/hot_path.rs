//! Micro-benchmarks of the per-request decisions: route matching over 1,000 routes,
//! filter-chain selection, and load-balancer picks; plus the cost of applying a
//! 10,000-endpoint EDS update; and the per-request observability work (access log line
//! formatting, what is kept of the request headers for it, trace header
//! extraction/injection, span encoding). Run: `cargo bench -p weir-benches`.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use weir_proxy::config::{Errors, TranslateCtx};
use weir_proxy::listener::chain_match::ChainInput;
use weir_proxy::route::{RouteRequest, RouteTable};
use weir_proxy::stats::Store;
use weir_xds_api::pb::envoy::config::listener::v3::Listener;
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;

fn route_table(n: usize) -> RouteTable {
    let mut y = String::from("name: bench\nvirtual_hosts:\n");
    for v in 0..10 {
        y.push_str(&format!("- name: vh{v}\n  domains: [\"svc{v}.example.com\", \"*.svc{v}.example.com\"]\n  routes:\n"));
        for r in 0..n / 10 {
            match r % 4 {
                0 => y.push_str(&format!("  - match: {{prefix: /api/v{r}/}}\n    route: {{cluster: c}}\n")),
                1 => y.push_str(&format!("  - match: {{path: /exact/{r}}}\n    route: {{cluster: c}}\n")),
                2 => y.push_str(&format!(
                    "  - match: {{prefix: /h{r}, headers: [{{name: x-user, string_match: {{exact: u{r}}}}}]}}\n    route: {{cluster: c}}\n"
                )),
                _ => y.push_str(&format!("  - match: {{safe_regex: {{regex: \"/re/{r}/[0-9]+\"}}}}\n    route: {{cluster: c}}\n")),
            }
        }
        y.push_str("  - match: {prefix: /}\n    route: {cluster: c}\n");
    }
    let rc: RouteConfiguration = weir_xds_api::from_yaml(&y).expect("route yaml");
    let clusters: HashSet<&str> = ["c"].into_iter().collect();
    let stats = Store::new();
    let ctx = TranslateCtx {
        clusters: &clusters,
        stats: &stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let t = RouteTable::translate(&rc, "", &ctx, &mut errs);
    assert!(errs.is_empty(), "{:?}", errs.0);
    t
}

fn bench_routes(c: &mut Criterion) {
    let table = route_table(1000);
    let mut headers = HeaderMap::new();
    headers.insert("x-user", "u98".parse().expect("v"));
    let method = Method::GET;
    let mut g = c.benchmark_group("route_match_1k");
    for (name, auth, path) in [
        ("first_route", "svc0.example.com", "/api/v0/items"),
        ("late_vhost_late_route", "svc9.example.com", "/exact/97"),
        (
            "wildcard_domain_fallthrough",
            "a.svc5.example.com",
            "/nothing/matches/here",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let req = RouteRequest {
                    authority: auth,
                    path,
                    method: &method,
                    headers: &headers,
                    scheme: "http",
                };
                black_box(table.route(black_box(&req)).is_some())
            })
        });
    }
    g.finish();
}

fn bench_chains(c: &mut Criterion) {
    let mut y = String::from(
        "name: l\naddress: {socket_address: {address: 0.0.0.0, port_value: 443}}\nfilter_chains:\n",
    );
    for i in 0..50 {
        y.push_str(&format!(
            "- filter_chain_match: {{server_names: [\"h{i}.example.com\"], transport_protocol: tls}}\n  filters:\n  - name: t\n    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}}\n"
        ));
    }
    y.push_str("- filter_chain_match: {source_prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]}\n  filters:\n  - name: t\n    typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c}\n");
    let l: Listener = weir_xds_api::from_yaml(&y).expect("listener yaml");
    let clusters: HashSet<&str> = ["c"].into_iter().collect();
    let stats = Store::new();
    let ctx = TranslateCtx {
        clusters: &clusters,
        stats: &stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let cfg = weir_proxy::listener::translate_listener(&l, "l", &ctx, &mut errs).expect("listener");
    assert!(errs.is_empty(), "{:?}", errs.0);
    let dst = "10.1.1.1:443".parse().expect("addr");
    let src = "10.2.3.4:5555".parse().expect("addr");
    c.bench_function("filter_chain_select_51_sni", |b| {
        b.iter(|| {
            let input = ChainInput {
                dst,
                src,
                server_name: Some("h42.example.com"),
                transport_protocol: "tls",
                alpn: &["h2"],
            };
            black_box(cfg.select(black_box(&input)).is_some())
        })
    });
}

/// A 20-host cluster (weights 1..5) with `lb` cluster fields spliced in.
fn lb_cluster(lb: &str) -> Arc<weir_proxy::upstream::Cluster> {
    let mut y = format!(
        "name: c\ntype: STATIC\nconnect_timeout: 1s\n{lb}load_assignment:\n  cluster_name: c\n  endpoints:\n  - lb_endpoints:\n"
    );
    for i in 0..20 {
        y.push_str(&format!(
            "    - endpoint: {{address: {{socket_address: {{address: 127.0.0.{}, port_value: 80}}}}}}\n      load_balancing_weight: {}\n",
            i + 1,
            1 + i % 5
        ));
    }
    let pc = weir_xds_api::from_yaml(&y).expect("cluster yaml");
    let mut errs = Errors::default();
    let cfg = weir_proxy::upstream::translate_cluster(&pc, "c", &mut errs).expect("cluster");
    assert!(errs.is_empty(), "{:?}", errs.0);
    let store = Store::new();
    let cm = weir_proxy::upstream::ClusterManager::new(&[Arc::new(cfg)], &store);
    cm.get("c").expect("cluster")
}

/// LB pick cost per policy (20 hosts, weights 1..5, all healthy; hash policies get a
/// different request hash each pick).
fn bench_lb(c: &mut Criterion) {
    let policies = [
        ("round_robin", ""),
        ("least_request", "lb_policy: LEAST_REQUEST\n"),
        ("random", "lb_policy: RANDOM\n"),
        ("ring_hash", "lb_policy: RING_HASH\n"),
        ("maglev", "lb_policy: MAGLEV\n"),
        (
            "round_robin_slow_start",
            "round_robin_lb_config: {slow_start_config: {slow_start_window: 60s}}\n",
        ),
    ];
    for (name, lb) in policies {
        let cluster = lb_cluster(lb);
        let mut k = 0u64;
        c.bench_function(&format!("lb_pick_{name}_20_weighted"), |b| {
            b.iter(|| {
                k = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let ctx = weir_proxy::upstream::LbContext {
                    hash: Some(k),
                    ..Default::default()
                };
                black_box(cluster.choose_host(black_box(&ctx)).is_some())
            })
        });
    }
}

/// A ClusterLoadAssignment for `svc` with `n` endpoints (10.x.y.z:80) of `weight`.
fn cla(n: u32, weight: u32) -> weir_xds_api::Any {
    use weir_xds_api::pb::envoy::config::core::v3 as core;
    use weir_xds_api::pb::envoy::config::endpoint::v3 as ep;
    let lb_endpoints = (0..n)
        .map(|i| ep::LbEndpoint {
            host_identifier: Some(ep::lb_endpoint::HostIdentifier::Endpoint(ep::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            load_balancing_weight: Some(weir_xds_api::pb::google::protobuf::UInt32Value {
                value: weight,
            }),
            ..Default::default()
        })
        .collect();
    weir_xds_api::pack(&ep::ClusterLoadAssignment {
        cluster_name: "svc".into(),
        endpoints: vec![ep::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// The whole EDS path for a 10,000-endpoint assignment, as the xDS client runs it: decode,
/// translate, swap the cluster's hosts in place (every weight changes each time, so every
/// host is rebuilt), then the first pick on the new set (which rebuilds the per-worker LB
/// state). Runs a real server whose static EDS cluster takes its endpoints from the xDS
/// client.
fn bench_eds(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let yaml = "static_resources:\n  clusters:\n  - name: svc\n    type: EDS\n    connect_timeout: 1s\n    eds_cluster_config: {eds_config: {path_config_source: {path: /nonexistent/eds.yaml}, initial_fetch_timeout: 0.001s}}\n";
    let opts = weir_proxy::cli::Options {
        config_yaml: Some(yaml.into()),
        concurrency: Some(1),
        ..Default::default()
    };
    let snap = weir_proxy::config::load(&opts).expect("bench config");
    let server = rt
        .block_on(weir_proxy::server::start(opts, snap))
        .expect("server");
    let dynamic = server.state.xds.get().expect("xds client").clone();
    let cluster_manager = server.state.clusters.clone();
    let updates = [cla(10_000, 1), cla(10_000, 2)];
    let mut i = 0usize;
    c.bench_function("eds_apply_10000_endpoints", |b| {
        b.iter(|| {
            i += 1;
            let r = weir_proxy::xds::Resource {
                name: "svc".into(),
                version: i.to_string(),
                body: updates[i % 2].clone(),
            };
            let _guard = rt.enter();
            dynamic
                .apply(
                    weir_proxy::xds::ENDPOINT,
                    &i.to_string(),
                    vec![r],
                    &[],
                    false,
                )
                .expect("applied");
            let c = cluster_manager.get("svc").expect("cluster");
            black_box(c.choose_host(&Default::default()).is_some())
        })
    });
    rt.block_on(server.stop());
}

/// Per-request observability: render Envoy's default access log line and a JSON line from a
/// full record, and continue a W3C trace (extract, decide, inject traceparent + B3).
fn bench_obs(c: &mut Criterion) {
    use weir_proxy::access_log::format::DEFAULT_FORMAT;
    use weir_proxy::access_log::{Format, JsonFormat, KeptHeaders, LogRecord, ResponseFlags};
    use weir_proxy::trace::{Sampling, SpanContext, context};
    let mut req = HeaderMap::new();
    req.insert("user-agent", "wrk/4.2".parse().expect("v"));
    req.insert(
        "x-request-id",
        "6a1c43f2-51e1-4a0c-9b62-0c1f0a43a1f1".parse().expect("v"),
    );
    req.insert("x-forwarded-for", "10.0.0.1".parse().expect("v"));
    let mut resp = HeaderMap::new();
    resp.insert("x-envoy-upstream-service-time", "1".parse().expect("v"));
    // As the request end keeps them for the default format: the named headers as pairs.
    let pairs =
        |h: &HeaderMap| KeptHeaders::List(h.iter().map(|(n, v)| (n.clone(), v.clone())).collect());
    let (kept_req, kept_resp) = (pairs(&req), pairs(&resp));
    let rec = LogRecord {
        start_time: std::time::SystemTime::now(),
        request_headers: Some(kept_req.view()),
        method: Some(&Method::GET),
        path: Some("/api/v1/items?page=2"),
        authority: Some("svc.example.com"),
        response_headers: Some(kept_resp.view()),
        protocol: Some("HTTP/1.1"),
        response_code: 200,
        flags: ResponseFlags::default(),
        bytes_sent: 612,
        duration: Some(std::time::Duration::from_micros(950)),
        upstream_host: Some("127.0.0.1:18080".parse().expect("addr")),
        upstream_cluster: Some("backend"),
        downstream_remote: Some("127.0.0.1:40000".parse().expect("addr")),
        ..Default::default()
    };
    let text = Format::parse(DEFAULT_FORMAT).expect("default format");
    let json = JsonFormat::parse(&serde_json_value()).expect("json format");
    let mut g = c.benchmark_group("observability");
    g.bench_function("access_log_default_format", |b| {
        b.iter(|| black_box(text.render(black_box(&rec))))
    });
    g.bench_function("access_log_json_format", |b| {
        b.iter(|| {
            let mut s = String::with_capacity(256);
            json.render_into(black_box(&rec), &mut s);
            black_box(s)
        })
    });
    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .expect("v"),
    );
    incoming.insert(
        "x-b3-traceid",
        "4bf92f3577b34da6a3ce929d0e0e4736".parse().expect("v"),
    );
    incoming.insert("x-b3-spanid", "00f067aa0ba902b7".parse().expect("v"));
    let sampling = Sampling::default();
    g.bench_function("trace_continue_and_inject", |b| {
        b.iter(|| {
            let mut h = incoming.clone();
            let (parent, seen) = context::extract(&h);
            let d = sampling.decide(false, false, (7, 9));
            let sc = SpanContext::new(parent, None, d, (11, 13));
            sc.inject(&mut h, seen);
            black_box(h)
        })
    });
    // An edge request without trace headers (the obs.sh case): what the connection manager
    // reads of it (parent context, formats seen, lone sampling decision), by static names.
    let mut edge = req.clone();
    edge.insert("accept", "*/*".parse().expect("v"));
    edge.insert("host", "svc.example.com".parse().expect("v"));
    g.bench_function("trace_read_no_trace_headers", |b| {
        b.iter(|| black_box(context::read(black_box(&edge))))
    });
    // The request's span: the owned prost `Span` (~15 attribute `String`s) encoded by prost,
    // against the direct encoding request handling uses.
    let facts = weir_proxy::trace::SpanFacts {
        ctx: SpanContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            parent_span_id: Some(0x1234),
            sampled: true,
        },
        name: "ingress",
        kind: weir_proxy::trace::otlp::SPAN_KIND_SERVER,
        tags: &[],
        tracestate: None,
        start: std::time::SystemTime::now(),
        end: std::time::SystemTime::now(),
        authority: "svc.example.com",
        path: "/api/v1/items?page=2",
        method: "GET",
        scheme: "http",
        protocol: "HTTP/1.1",
        status: 200,
        flags: ResponseFlags::default(),
        upstream_cluster: Some("backend"),
        upstream_host: Some("127.0.0.1:18080".parse().expect("addr")),
        request_id: Some("6a1c43f2-51e1-4a0c-9b62-0c1f0a43a1f1"),
        user_agent: Some("wrk/4.2"),
        peer_address: weir_proxy::trace::PeerAddress::Ip("127.0.0.1".parse().expect("ip")),
        peer_uri_san: None,
        peer_subject: None,
        node_id: "bench",
        request_size: 0,
        response_size: 19,
    };
    g.bench_function("span_build_then_prost_encode", |b| {
        b.iter(|| {
            let s = weir_proxy::trace::build_span(black_box(&facts), 256);
            black_box(weir_proxy::trace::otlp::grpc_frame(&s))
        })
    });
    g.bench_function("span_encode_direct", |b| {
        b.iter(|| {
            black_box(weir_proxy::trace::encode_span(
                black_box(&facts),
                256,
                std::iter::empty(),
            ))
        })
    });
    // What the connection manager keeps of the request headers for the default format: a
    // copy of the whole map, against the four headers the format reads.
    let logs = default_format_logs();
    let mut full = req.clone();
    for (k, v) in [
        ("accept", "*/*"),
        ("host", "svc.example.com"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ] {
        full.insert(k, v.parse().expect("v"));
    }
    g.bench_function("request_headers_full_clone", |b| {
        b.iter(|| black_box(black_box(&full).clone()))
    });
    g.bench_function("request_headers_capture_needed", |b| {
        b.iter(|| black_box(logs.request_headers().capture(black_box(&full))))
    });
    g.finish();
}

/// The access loggers of weir-bench-obs.yaml: one file log in Envoy's default format.
fn default_format_logs() -> weir_proxy::access_log::AccessLogs {
    use weir_xds_api::pb::envoy::config::accesslog::v3::AccessLog;
    let path = std::env::temp_dir().join("weir-hot-path-bench.log");
    let l: AccessLog = weir_xds_api::from_yaml(&format!(
        "name: f\ntyped_config: {{'@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}}}\n",
        path.display()
    ))
    .expect("access log yaml");
    let clusters: HashSet<&str> = HashSet::new();
    let stats = Store::new();
    let ctx = TranslateCtx {
        clusters: &clusters,
        stats: &stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let logs = weir_proxy::access_log::translate(&[l], "access_log", &ctx, &mut errs);
    assert!(errs.is_empty(), "{:?}", errs.0);
    logs
}

fn serde_json_value() -> serde_json::Value {
    serde_json::json!({
        "start": "%START_TIME%", "method": "%REQ(:METHOD)%", "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%", "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
        "rx": "%BYTES_RECEIVED%", "tx": "%BYTES_SENT%", "duration": "%DURATION%",
        "upstream": "%UPSTREAM_HOST%", "cluster": "%UPSTREAM_CLUSTER%", "rid": "%REQ(X-REQUEST-ID)%"
    })
}

criterion_group!(benches, bench_routes, bench_chains, bench_lb, bench_obs);
criterion_group! {
    name = eds;
    config = Criterion::default().sample_size(20);
    targets = bench_eds
}
criterion_main!(benches, eds);
