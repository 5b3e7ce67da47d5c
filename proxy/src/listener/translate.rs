//! `Listener` proto -> [`ListenerConfig`]. Protobuf stops here.

use std::sync::Arc;
use std::time::Duration;

use weir_xds_api::pb::envoy::config::core::v3::CidrRange;
use weir_xds_api::pb::envoy::config::listener::v3::filter_chain_match::ConnectionSourceType;
use weir_xds_api::pb::envoy::config::listener::v3::{
    Filter, FilterChain as PbFilterChain, FilterChainMatch, Listener, ListenerFilter as PbLf,
    filter, listener_filter,
};
use weir_xds_api::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use weir_xds_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use weir_xds_api::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use weir_xds_api::type_urls;

use super::chain_match::{ChainMatch, ChainMatcher, Cidr, MatchError, SourceType};
use super::tcp_proxy::{TcpProxyConfig, TcpProxyStats};
use super::{
    DEFAULT_BACKLOG, DEFAULT_BUFFER_LIMIT, FilterChain, ListenerConfig, ListenerFilter,
    ListenerStats, NetworkFilter,
};
use crate::config::{Errors, TranslateCtx, duration_or, join, socket_address};

const LISTENER_FIELDS: &[&str] = &[
    "name",
    "address",
    "filter_chains",
    "default_filter_chain",
    "per_connection_buffer_limit_bytes",
    "listener_filters",
    "listener_filters_timeout",
    "continue_on_listener_filters_timeout",
    "tcp_backlog_size",
    "metadata",
    "traffic_direction",
    // Always on in weir; `false` is rejected below.
    "reuse_port",
    "enable_reuse_port",
    "bind_to_port",
];

const CHAIN_FIELDS: &[&str] = &["name", "filter_chain_match", "filters", "metadata"];

const MATCH_FIELDS: &[&str] = &[
    "destination_port",
    "prefix_ranges",
    "server_names",
    "transport_protocol",
    "application_protocols",
    "direct_source_prefix_ranges",
    "source_type",
    "source_prefix_ranges",
    "source_ports",
];

const TCP_PROXY_FIELDS: &[&str] = &[
    "stat_prefix",
    "cluster",
    "weighted_clusters",
    "idle_timeout",
    "max_connect_attempts",
    "max_downstream_connection_duration",
];

const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const TLS_INSPECTOR_FILTER: &str = "envoy.filters.listener.tls_inspector";

/// Translate one listener. Every problem is recorded in `errs` with its field path; `None`
/// when there was any.
pub fn translate_listener(
    l: &Listener,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<ListenerConfig> {
    let before = errs.0.len();
    errs.reject_unsupported(l, LISTENER_FIELDS, path);
    if l.name.is_empty() {
        errs.add(join(path, "name"), "name is required");
    }
    for (field, v) in [
        ("enable_reuse_port", l.enable_reuse_port.as_ref()),
        ("bind_to_port", l.bind_to_port.as_ref()),
    ] {
        if v.is_some_and(|v| !v.value) {
            errs.add(join(path, field), "only `true` is supported");
        }
    }
    let address = socket_address(l.address.as_ref(), &join(path, "address"), errs);
    let per_connection_buffer_limit_bytes = l
        .per_connection_buffer_limit_bytes
        .map(|v| v.value)
        .unwrap_or(DEFAULT_BUFFER_LIMIT);
    let backlog = match l.tcp_backlog_size.map(|v| v.value) {
        None => DEFAULT_BACKLOG,
        Some(0) => {
            errs.add(join(path, "tcp_backlog_size"), "must be greater than 0");
            DEFAULT_BACKLOG
        }
        Some(v) => v.min(i32::MAX as u32),
    };
    let listener_filters = l
        .listener_filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| listener_filter(f, &format!("{path}.listener_filters[{i}]"), errs))
        .collect();
    let listener_filters_timeout = duration_or(
        l.listener_filters_timeout.as_ref(),
        Duration::from_secs(15),
        &join(path, "listener_filters_timeout"),
        errs,
    );

    let mut filter_chains = Vec::with_capacity(l.filter_chains.len());
    let mut chain_paths = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let p = format!("{path}.filter_chains[{i}]");
        if let Some(c) = filter_chain(fc, &p, true, ctx, errs) {
            filter_chains.push(c);
            chain_paths.push(p);
        }
    }
    let default_filter_chain = l
        .default_filter_chain
        .as_ref()
        .and_then(|fc| filter_chain(fc, &join(path, "default_filter_chain"), false, ctx, errs));
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() {
        errs.add(
            join(path, "filter_chains"),
            "a listener needs at least one filter chain or a default_filter_chain",
        );
    }
    let matches: Vec<&ChainMatch> = filter_chains
        .iter()
        .map(|c| &c.filter_chain_match)
        .collect();
    let matcher = match ChainMatcher::build(&matches) {
        Ok(m) => m,
        Err(e) => {
            let (first, second, what) = match e {
                MatchError::Same { first, second } => (first, second, "the same"),
                MatchError::Overlap { first, second } => (first, second, "overlapping"),
            };
            let msg = if first == second {
                "a value is repeated in filter_chain_match".to_string()
            } else {
                format!(
                    "multiple filter chains with {what} matching rules are defined \
                     (this one and {})",
                    chain_paths[first]
                )
            };
            errs.add(join(&chain_paths[second], "filter_chain_match"), msg);
            ChainMatcher::default()
        }
    };

    if errs.0.len() != before {
        return None;
    }
    let address = address?;
    Some(ListenerConfig {
        name: l.name.clone(),
        address,
        filter_chains,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        backlog,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
        matcher,
        stats: ListenerStats::new(&ctx.stats.listener(address)),
    })
}

fn listener_filter(f: &PbLf, path: &str, errs: &mut Errors) -> Option<ListenerFilter> {
    errs.reject_unsupported(f, &["name", "typed_config"], path);
    let is_tls_inspector = match &f.config_type {
        Some(listener_filter::ConfigType::TypedConfig(any)) => {
            if any.type_url == type_urls::TLS_INSPECTOR {
                let p = join(path, "typed_config");
                match weir_xds_api::unpack::<TlsInspector>(any) {
                    Ok(t) => errs.reject_unsupported(&t, &["initial_read_buffer_size"], &p),
                    Err(e) => errs.add(p, e.to_string()),
                }
                true
            } else {
                errs.add(
                    join(path, "typed_config"),
                    format!(
                        "listener filter {} is not supported (only {TLS_INSPECTOR_FILTER})",
                        weir_xds_api::type_name(&any.type_url)
                    ),
                );
                return None;
            }
        }
        _ => f.name == TLS_INSPECTOR_FILTER,
    };
    if is_tls_inspector {
        Some(ListenerFilter::TlsInspector)
    } else {
        errs.add(
            join(path, "name"),
            format!(
                "listener filter {:?} is not supported (only {TLS_INSPECTOR_FILTER})",
                f.name
            ),
        );
        None
    }
}

fn filter_chain(
    fc: &PbFilterChain,
    path: &str,
    use_match: bool,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<FilterChain> {
    let before = errs.0.len();
    errs.reject_unsupported(fc, CHAIN_FIELDS, path);
    // Envoy ignores the match of the default chain.
    let filter_chain_match = match (&fc.filter_chain_match, use_match) {
        (Some(m), true) => chain_match(m, &join(path, "filter_chain_match"), errs),
        _ => ChainMatch::default(),
    };
    let mut terminal = None;
    if fc.filters.is_empty() {
        errs.add(
            join(path, "filters"),
            "a filter chain needs exactly one terminal network filter \
             (envoy.filters.network.tcp_proxy or envoy.filters.network.http_connection_manager)",
        );
    }
    for (j, f) in fc.filters.iter().enumerate() {
        let fp = format!("{path}.filters[{j}]");
        let Some(nf) = network_filter(f, &fp, ctx, errs) else {
            continue;
        };
        if j + 1 != fc.filters.len() {
            errs.add(
                fp,
                "a terminal network filter must be the last filter of its chain",
            );
        } else {
            terminal = Some(nf);
        }
    }
    if errs.0.len() != before {
        return None;
    }
    Some(FilterChain {
        name: fc.name.clone(),
        filter_chain_match,
        filter: terminal?,
    })
}

/// Which network filter a `Filter` is: by `typed_config` type URL (Envoy's rule), by name
/// only when there is no typed config.
fn network_filter(
    f: &Filter,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<NetworkFilter> {
    errs.reject_unsupported(f, &["name", "typed_config"], path);
    let tpath = join(path, "typed_config");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        if f.name == TCP_PROXY_FILTER || f.name == HCM_FILTER {
            errs.add(tpath, format!("{} needs a typed_config", f.name));
        } else if f.config_type.is_none() {
            errs.add(
                join(path, "name"),
                format!("network filter {:?} is not supported", f.name),
            );
        }
        return None;
    };
    match any.type_url.as_str() {
        type_urls::TCP_PROXY => match weir_xds_api::unpack::<TcpProxy>(any) {
            Ok(t) => tcp_proxy(&t, &tpath, ctx, errs).map(|c| NetworkFilter::TcpProxy(Arc::new(c))),
            Err(e) => {
                errs.add(tpath, e.to_string());
                None
            }
        },
        type_urls::HTTP_CONNECTION_MANAGER => {
            match weir_xds_api::unpack::<HttpConnectionManager>(any) {
                Ok(h) => crate::config::hcm::translate_hcm(&h, &tpath, ctx, errs)
                    .map(|h| NetworkFilter::Http(Arc::new(h))),
                Err(e) => {
                    errs.add(tpath, e.to_string());
                    None
                }
            }
        }
        other => {
            errs.add(
                tpath,
                format!(
                    "network filter {} is not supported (weir has {TCP_PROXY_FILTER} and \
                     {HCM_FILTER})",
                    weir_xds_api::type_name(other)
                ),
            );
            None
        }
    }
}

fn tcp_proxy(
    t: &TcpProxy,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<TcpProxyConfig> {
    let before = errs.0.len();
    errs.reject_unsupported(t, TCP_PROXY_FIELDS, path);
    if t.stat_prefix.is_empty() {
        errs.add(join(path, "stat_prefix"), "stat_prefix is required");
    }
    let check = |name: &str, p: String, errs: &mut Errors| {
        if name.is_empty() {
            errs.add(p, "cluster name is required");
        } else if !ctx.clusters.contains(name) {
            errs.add(p, format!("unknown cluster {name:?}"));
        }
    };
    let clusters: Vec<(String, u32)> = match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => {
            check(c, join(path, "cluster"), errs);
            vec![(c.clone(), 1)]
        }
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let wp = join(path, "weighted_clusters");
            if w.clusters.is_empty() {
                errs.add(join(&wp, "clusters"), "at least one cluster is required");
            }
            for (k, cw) in w.clusters.iter().enumerate() {
                let cp = format!("{wp}.clusters[{k}]");
                errs.reject_unsupported(cw, &["name", "weight"], &cp);
                check(&cw.name, join(&cp, "name"), errs);
                if cw.weight == 0 {
                    errs.add(join(&cp, "weight"), "weight must be at least 1");
                }
            }
            w.clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight))
                .collect()
        }
        None => {
            errs.add(
                join(path, "cluster"),
                "cluster or weighted_clusters is required",
            );
            Vec::new()
        }
    };
    let idle = duration_or(
        t.idle_timeout.as_ref(),
        Duration::from_secs(3600),
        &join(path, "idle_timeout"),
        errs,
    );
    let max_duration = t.max_downstream_connection_duration.as_ref().map(|d| {
        crate::config::duration(d, &join(path, "max_downstream_connection_duration"), errs)
    });
    let max_connect_attempts = match t.max_connect_attempts.map(|v| v.value) {
        None => 1,
        Some(0) => {
            errs.add(join(path, "max_connect_attempts"), "must be at least 1");
            1
        }
        Some(n) => n,
    };
    if errs.0.len() != before {
        return None;
    }
    Some(TcpProxyConfig::new(
        t.stat_prefix.clone(),
        clusters,
        (!idle.is_zero()).then_some(idle),
        max_duration.filter(|d| !d.is_zero()),
        max_connect_attempts,
        TcpProxyStats::new(&ctx.stats.tcp(&t.stat_prefix)),
    ))
}

fn cidrs(v: &[CidrRange], path: &str, field: &str, errs: &mut Errors) -> Vec<Cidr> {
    v.iter()
        .enumerate()
        .filter_map(|(k, r)| {
            let p = format!("{path}.{field}[{k}]");
            errs.reject_unsupported(r, &["address_prefix", "prefix_len"], &p);
            let Ok(ip) = r.address_prefix.parse() else {
                errs.add(
                    join(&p, "address_prefix"),
                    format!("{:?} is not an IP address", r.address_prefix),
                );
                return None;
            };
            let len = r.prefix_len.map(|l| l.value).unwrap_or(0);
            let c = Cidr::new(ip, len);
            if c.is_none() {
                errs.add(
                    join(&p, "prefix_len"),
                    format!("prefix length {len} is too long for {ip}"),
                );
            }
            c
        })
        .collect()
}

fn port(v: u32, path: String, errs: &mut Errors) -> Option<u16> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            errs.add(path, "port must be between 1 and 65535");
            None
        }
    }
}

fn chain_match(m: &FilterChainMatch, path: &str, errs: &mut Errors) -> ChainMatch {
    errs.reject_unsupported(m, MATCH_FIELDS, path);
    let destination_port = m
        .destination_port
        .and_then(|p| port(p.value, join(path, "destination_port"), errs));
    let mut server_names = Vec::with_capacity(m.server_names.len());
    for (k, s) in m.server_names.iter().enumerate() {
        let p = format!("{path}.server_names[{k}]");
        let s = s.to_ascii_lowercase();
        let wildcard_ok = s.strip_prefix("*.").is_some_and(|r| !r.contains('*'));
        if s.is_empty() {
            errs.add(p, "server name must not be empty");
        } else if s.contains('*') && !wildcard_ok {
            errs.add(
                p,
                "partial wildcards are not supported in server_names (use `*.example.com`)",
            );
        } else {
            server_names.push(s);
        }
    }
    match m.transport_protocol.as_str() {
        "" | "raw_buffer" | "tls" => {}
        other => errs.add(
            join(path, "transport_protocol"),
            format!("transport protocol {other:?} is not supported (raw_buffer or tls)"),
        ),
    }
    for (k, a) in m.application_protocols.iter().enumerate() {
        if a.is_empty() {
            errs.add(
                format!("{path}.application_protocols[{k}]"),
                "application protocol must not be empty",
            );
        }
    }
    let source_type = match ConnectionSourceType::try_from(m.source_type) {
        Ok(ConnectionSourceType::Any) => SourceType::Any,
        Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
        Ok(ConnectionSourceType::External) => SourceType::External,
        Err(_) => {
            errs.add(join(path, "source_type"), "unknown source type");
            SourceType::Any
        }
    };
    let source_ports = m
        .source_ports
        .iter()
        .enumerate()
        .filter_map(|(k, p)| port(*p, format!("{path}.source_ports[{k}]"), errs))
        .collect();
    ChainMatch {
        destination_port,
        prefix_ranges: cidrs(&m.prefix_ranges, path, "prefix_ranges", errs),
        server_names,
        transport_protocol: m.transport_protocol.clone(),
        application_protocols: m.application_protocols.clone(),
        direct_source_prefix_ranges: cidrs(
            &m.direct_source_prefix_ranges,
            path,
            "direct_source_prefix_ranges",
            errs,
        ),
        source_type,
        source_prefix_ranges: cidrs(&m.source_prefix_ranges, path, "source_prefix_ranges", errs),
        source_ports,
    }
}
