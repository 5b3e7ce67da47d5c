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
    // Transparent interception (docs/arch-intercept.md).
    "use_original_dst",
    // Edge limits (docs/design/limits.md).
    "ignore_global_conn_limit",
];

const CHAIN_FIELDS: &[&str] = &[
    "name",
    "filter_chain_match",
    "filters",
    "metadata",
    "transport_socket",
    "transport_socket_connect_timeout",
];

/// Handshake timeout when `transport_socket_connect_timeout` is unset. Envoy has none by
/// default; weir bounds a silent client's handshake (see docs/arch-tls.md).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    "hash_policy",
    // Observability (tcp_proxy access logs).
    "access_log",
];

const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const TLS_INSPECTOR_FILTER: &str = "envoy.filters.listener.tls_inspector";
const HTTP_INSPECTOR_FILTER: &str = "envoy.filters.listener.http_inspector";
const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
const PROXY_PROTOCOL_FILTER: &str = "envoy.filters.listener.proxy_protocol";
const HTTP_INSPECTOR_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
const ORIGINAL_DST_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const PROXY_PROTOCOL_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";
const KNOWN_LISTENER_FILTERS: &str = "envoy.filters.listener.tls_inspector, \
     envoy.filters.listener.http_inspector, envoy.filters.listener.original_dst and \
     envoy.filters.listener.proxy_protocol";

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
    if l.enable_reuse_port.as_ref().is_some_and(|v| !v.value) {
        errs.add(join(path, "enable_reuse_port"), "only `true` is supported");
    }
    let intercept = super::Intercept {
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|v| v.value),
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|v| v.value),
    };
    let address = socket_address(l.address.as_ref(), &join(path, "address"), errs);
    let ipv4_compat = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(weir_xds_api::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
            sa.ipv4_compat
        }
        _ => false,
    };
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
    let listener_filters: Vec<ListenerFilter> = l
        .listener_filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            listener_filter(f, &format!("{path}.listener_filters[{i}]"), ctx, errs)
        })
        .collect();
    let listener_filters_timeout = duration_or(
        l.listener_filters_timeout.as_ref(),
        Duration::from_secs(15),
        &join(path, "listener_filters_timeout"),
        errs,
    );

    // `listener.<address>.ssl.*`, shared by the listener's TLS chains.
    let ssl_stats = address.map(|a| Arc::new(crate::tls::SslStats::new(&ctx.stats.listener(a))));
    let mut filter_chains = Vec::with_capacity(l.filter_chains.len());
    let mut chain_paths = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let p = format!("{path}.filter_chains[{i}]");
        if let Some(c) = filter_chain(fc, &p, true, ctx, &ssl_stats, errs) {
            filter_chains.push(c);
            chain_paths.push(p);
        }
    }
    let default_filter_chain = l.default_filter_chain.as_ref().and_then(|fc| {
        filter_chain(
            fc,
            &join(path, "default_filter_chain"),
            false,
            ctx,
            &ssl_stats,
            errs,
        )
    });
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
    let mut filter_chains = filter_chains;
    let mut default_filter_chain = default_filter_chain;
    set_tracing_operation(
        filter_chains
            .iter_mut()
            .chain(default_filter_chain.as_mut()),
        crate::trace::Operation::from_traffic_direction(l.traffic_direction),
    );
    // Envoy adds the TLS inspector when a chain matches on what only it can see.
    let needs_inspector = filter_chains.iter().any(|c| {
        let m = &c.filter_chain_match;
        !m.server_names.is_empty()
            || m.transport_protocol == "tls"
            || !m.application_protocols.is_empty()
    });
    let tls_inspector = (needs_inspector
        || listener_filters
            .iter()
            .any(|f| matches!(f, ListenerFilter::TlsInspector)))
    .then(|| Arc::new(crate::tls::inspector::InspectorStats::new(ctx.stats)));
    Some(ListenerConfig {
        name: l.name.clone(),
        address,
        filter_chains,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        ipv4_compat,
        backlog,
        listener_filters,
        tls_inspector,
        listener_filters_timeout,
        continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
        matcher,
        stats: ListenerStats::new(&ctx.stats.listener(address)),
        intercept,
        ignore_global_conn_limit: l.ignore_global_conn_limit,
    })
}

/// HCM tracing names its spans by the listener's `traffic_direction` (`ingress` / `egress`).
/// The connection managers were just built (one owner each), so they are set in place.
fn set_tracing_operation<'a>(
    chains: impl Iterator<Item = &'a mut FilterChain>,
    op: crate::trace::Operation,
) {
    for c in chains {
        if let NetworkFilter::Http(h) = &mut c.filter
            && let Some(h) = Arc::get_mut(h)
            && let Some(t) = &mut h.tracing
        {
            t.operation = op;
        }
    }
}

/// One listener filter, by `typed_config` type URL (Envoy's rule), by name only without one.
fn listener_filter(
    f: &PbLf,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<ListenerFilter> {
    use weir_xds_api::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
    use weir_xds_api::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
    use weir_xds_api::pb::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol;
    errs.reject_unsupported(f, &["name", "typed_config"], path);
    let p = join(path, "typed_config");
    let any = match &f.config_type {
        Some(listener_filter::ConfigType::TypedConfig(any)) => Some(any),
        _ => None,
    };
    let kind = match any {
        Some(a) => a.type_url.as_str(),
        None => match f.name.as_str() {
            TLS_INSPECTOR_FILTER => type_urls::TLS_INSPECTOR,
            HTTP_INSPECTOR_FILTER => HTTP_INSPECTOR_URL,
            ORIGINAL_DST_FILTER => ORIGINAL_DST_URL,
            // Its config has no required field: the defaults apply.
            PROXY_PROTOCOL_FILTER => PROXY_PROTOCOL_URL,
            _ => {
                errs.add(
                    join(path, "name"),
                    format!(
                        "listener filter {:?} is not supported (weir has {KNOWN_LISTENER_FILTERS})",
                        f.name
                    ),
                );
                return None;
            }
        },
    };
    match kind {
        type_urls::TLS_INSPECTOR => {
            if let Some(any) = any {
                match weir_xds_api::unpack::<TlsInspector>(any) {
                    Ok(t) => errs.reject_unsupported(&t, &["initial_read_buffer_size"], &p),
                    Err(e) => errs.add(p, e.to_string()),
                }
            }
            Some(ListenerFilter::TlsInspector)
        }
        HTTP_INSPECTOR_URL => {
            if let Some(any) = any
                && let Err(e) = weir_xds_api::unpack::<HttpInspector>(any)
            {
                errs.add(p, e.to_string());
            }
            Some(ListenerFilter::HttpInspector(Arc::new(
                super::http_inspector::HttpInspectorStats::new(ctx.stats),
            )))
        }
        ORIGINAL_DST_URL => {
            if let Some(any) = any {
                match weir_xds_api::unpack::<OriginalDst>(any) {
                    Ok(o) => errs.reject_unsupported(&o, &[], &p),
                    Err(e) => errs.add(p, e.to_string()),
                }
            }
            Some(ListenerFilter::OriginalDst)
        }
        PROXY_PROTOCOL_URL => {
            let pp = match any {
                Some(any) => match weir_xds_api::unpack::<ProxyProtocol>(any) {
                    Ok(pp) => pp,
                    Err(e) => {
                        errs.add(p, e.to_string());
                        return None;
                    }
                },
                None => ProxyProtocol::default(),
            };
            proxy_protocol(&pp, &p, ctx, errs).map(|c| ListenerFilter::ProxyProtocol(Arc::new(c)))
        }
        other => {
            errs.add(
                p,
                format!(
                    "listener filter {} is not supported (weir has {KNOWN_LISTENER_FILTERS})",
                    weir_xds_api::type_name(other)
                ),
            );
            None
        }
    }
}

/// `envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol`.
fn proxy_protocol(
    pp: &weir_xds_api::pb::envoy::extensions::filters::listener::proxy_protocol::v3::ProxyProtocol,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<super::proxy_protocol::ProxyProtocolConfig> {
    use weir_xds_api::pb::envoy::config::core::v3::proxy_protocol_config::Version;
    let before = errs.0.len();
    // `rules` / `pass_through_tlvs` (TLVs to metadata) and `tlv_location` are refused.
    errs.reject_unsupported(
        pp,
        &[
            "allow_requests_without_proxy_protocol",
            "disallowed_versions",
            "stat_prefix",
        ],
        path,
    );
    let (mut v1, mut v2) = (false, false);
    for (i, v) in pp.disallowed_versions.iter().enumerate() {
        match Version::try_from(*v) {
            Ok(Version::V1) => v1 = true,
            Ok(Version::V2) => v2 = true,
            Err(_) => errs.add(
                format!("{path}.disallowed_versions[{i}]"),
                format!("unknown PROXY protocol version {v}"),
            ),
        }
    }
    if v1 && v2 {
        errs.add(
            join(path, "disallowed_versions"),
            "disallowing both versions leaves no PROXY protocol to accept",
        );
    }
    if errs.0.len() != before {
        return None;
    }
    Some(super::proxy_protocol::ProxyProtocolConfig {
        allow_without: pp.allow_requests_without_proxy_protocol,
        disallow_v1: v1,
        disallow_v2: v2,
        stats: super::proxy_protocol::ProxyProtoStats::new(ctx.stats, &pp.stat_prefix),
    })
}

fn filter_chain(
    fc: &PbFilterChain,
    path: &str,
    use_match: bool,
    ctx: &TranslateCtx<'_>,
    listener_stats: &Option<Arc<crate::tls::SslStats>>,
    errs: &mut Errors,
) -> Option<FilterChain> {
    let before = errs.0.len();
    errs.reject_unsupported(fc, CHAIN_FIELDS, path);
    let tls_cfg = fc
        .transport_socket
        .as_ref()
        .and_then(|ts| crate::tls::config::downstream(ts, &join(path, "transport_socket"), errs));
    let handshake_timeout = match &fc.transport_socket_connect_timeout {
        Some(d) => {
            let d =
                crate::config::duration(d, &join(path, "transport_socket_connect_timeout"), errs);
            if d.is_zero() {
                DEFAULT_HANDSHAKE_TIMEOUT
            } else {
                d
            }
        }
        None => DEFAULT_HANDSHAKE_TIMEOUT,
    };
    // Envoy ignores the match of the default chain.
    let filter_chain_match = match (&fc.filter_chain_match, use_match) {
        (Some(m), true) => chain_match(m, &join(path, "filter_chain_match"), errs),
        _ => ChainMatch::default(),
    };
    let mut terminal = None;
    let mut rate_limits = Vec::new();
    let mut connection_limits = Vec::new();
    let mut rbac = Vec::new();
    if fc.filters.is_empty() {
        errs.add(
            join(path, "filters"),
            "a filter chain needs exactly one terminal network filter \
             (envoy.filters.network.tcp_proxy or envoy.filters.network.http_connection_manager)",
        );
    }
    for (j, f) in fc.filters.iter().enumerate() {
        let fp = format!("{path}.filters[{j}]");
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url == weir_filters::type_urls::NETWORK_LOCAL_RATELIMIT
        {
            non_terminal(
                f,
                "envoy.filters.network.local_ratelimit",
                j + 1 == fc.filters.len(),
                &fp,
                errs,
            );
            let fctx = crate::route::filters::ProxyFactoryContext {
                ctx,
                hcm_prefix: "",
            };
            let mut ferrs = weir_filters::ConfigErrors::default();
            let l = weir_filters::local_ratelimit::ConnectionLimiter::translate(
                any,
                &join(&fp, "typed_config"),
                &fctx,
                &mut ferrs,
            );
            crate::route::filters::merge_errors(errs, ferrs);
            if let Some(l) = l {
                rate_limits.push(Arc::new(l));
            }
            continue;
        }
        // envoy.filters.network.connection_limit: before the terminal filter.
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url == super::connection_limit::TYPE_URL
        {
            non_terminal(
                f,
                "envoy.filters.network.connection_limit",
                j + 1 == fc.filters.len(),
                &fp,
                errs,
            );
            let tp = join(&fp, "typed_config");
            if let Some(c) =
                super::connection_limit::ConnectionLimit::translate(any, &tp, ctx, errs)
            {
                connection_limits.push(Arc::new(c));
            }
            continue;
        }
        // envoy.filters.network.rbac (authz): before the terminal filter.
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url == weir_filters::type_urls::NETWORK_RBAC
        {
            non_terminal(
                f,
                "envoy.filters.network.rbac",
                j + 1 == fc.filters.len(),
                &fp,
                errs,
            );
            let tp = join(&fp, "typed_config");
            if let Some(r) = super::rbac::NetworkRbac::translate(any, &tp, ctx, errs) {
                rbac.push(Arc::new(r));
            }
            continue;
        }
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
    let filter = terminal?;
    let tls = match tls_cfg {
        Some(cfg) => {
            let stats = listener_stats.clone()?;
            let registry = crate::tls::secrets::registry(ctx.stats);
            let t = crate::tls::ServerTls::new(cfg, registry, stats, handshake_timeout);
            // Static material is checked now; SDS secrets may arrive later (warming).
            if let Err(e) = t.ready()
                && !matches!(e, crate::tls::server::BuildError::MissingSecret(_))
            {
                errs.add(join(path, "transport_socket"), e.to_string());
                return None;
            }
            Some(Arc::new(t))
        }
        None => None,
    };
    Some(FilterChain {
        name: fc.name.clone(),
        filter_chain_match,
        rate_limits,
        connection_limits,
        rbac,
        filter,
        tls,
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
                    "network filter {} is not supported (weir has envoy.filters.network.local_ratelimit, \
                     envoy.filters.network.connection_limit, envoy.filters.network.rbac, \
                     {TCP_PROXY_FILTER} and \
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
    let hash_source_ip = tcp_hash_policy(&t.hash_policy, &join(path, "hash_policy"), errs);
    let access_logs =
        crate::access_log::translate(&t.access_log, &join(path, "access_log"), ctx, errs);
    if errs.0.len() != before {
        return None;
    }
    let mut cfg = TcpProxyConfig::new(
        t.stat_prefix.clone(),
        clusters,
        (!idle.is_zero()).then_some(idle),
        max_duration.filter(|d| !d.is_zero()),
        max_connect_attempts,
        TcpProxyStats::new(&ctx.stats.tcp(&t.stat_prefix)),
    );
    cfg.hash_source_ip = hash_source_ip;
    cfg.access_logs = access_logs;
    Some(cfg)
}

/// `TcpProxy.hash_policy` (at most one, as Envoy validates): `source_ip` only. Returns whether
/// connections are hashed by their source IP.
fn tcp_hash_policy(
    list: &[weir_xds_api::pb::envoy::r#type::v3::HashPolicy],
    path: &str,
    errs: &mut Errors,
) -> bool {
    use weir_xds_api::pb::envoy::r#type::v3::hash_policy::PolicySpecifier;
    if list.len() > 1 {
        errs.add(path, "at most one hash_policy is allowed");
    }
    let mut source_ip = false;
    for (i, hp) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        errs.reject_unsupported(hp, &["source_ip"], &p);
        match &hp.policy_specifier {
            Some(PolicySpecifier::SourceIp(_)) => source_ip = true,
            // `filter_state` is reported by reject_unsupported.
            Some(_) => {}
            None => errs.add(&p, "source_ip is required"),
        }
    }
    source_ip
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

/// A network filter that must sit in front of the terminal one: only `name`/`typed_config`,
/// and never last in the chain.
fn non_terminal(f: &Filter, name: &str, last: bool, fp: &str, errs: &mut Errors) {
    errs.reject_unsupported(f, &["name", "typed_config"], fp);
    if last {
        errs.add(
            fp,
            format!(
                "{name} is not terminal: a tcp_proxy or http_connection_manager must follow it"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;
    use std::collections::HashSet;

    fn run(yaml: &str) -> (Option<ListenerConfig>, Vec<(String, String)>) {
        let l: Listener = weir_xds_api::from_yaml(yaml).expect("parses");
        let clusters: HashSet<&str> = ["backend", "b2"].into_iter().collect();
        let stats = Store::new();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: &stats,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let out = translate_listener(&l, "l", &ctx, &mut errs);
        let e = errs.0.into_iter().map(|e| (e.path, e.message)).collect();
        (out, e)
    }

    fn ok(yaml: &str) -> ListenerConfig {
        let (out, errs) = run(yaml);
        assert!(errs.is_empty(), "{errs:?}");
        out.expect("translated")
    }

    fn err_paths(yaml: &str) -> Vec<String> {
        let (out, errs) = run(yaml);
        assert!(out.is_none());
        errs.into_iter().map(|e| e.0).collect()
    }

    const TCP: &str = r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: backend
"#;

    fn listener(chains: &str) -> String {
        format!(
            "name: l1\naddress: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n{chains}"
        )
    }

    fn tcp_chain(matcher: &str) -> String {
        format!("- filter_chain_match: {matcher}\n  filters:{TCP}")
    }

    #[test]
    fn tcp_proxy_listener() {
        let l = ok(&listener(&format!("filter_chains:\n{}", tcp_chain("{}"))));
        assert_eq!(l.name, "l1");
        assert_eq!(l.address, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(l.per_connection_buffer_limit_bytes, DEFAULT_BUFFER_LIMIT);
        assert_eq!(l.backlog, DEFAULT_BACKLOG);
        assert_eq!(l.filter_chains.len(), 1);
        let NetworkFilter::TcpProxy(t) = &l.filter_chains[0].filter else {
            panic!("tcp_proxy expected");
        };
        assert_eq!(t.stat_prefix, "t");
        assert_eq!(t.clusters, vec![("backend".to_string(), 1)]);
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(t.max_connect_attempts, 1);
    }

    #[test]
    fn listener_options() {
        let l = ok(&format!(
            "{}per_connection_buffer_limit_bytes: 32768\ntcp_backlog_size: 64\n\
             listener_filters:\n- name: envoy.filters.listener.tls_inspector\n  typed_config:\n    \
             \"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector\n\
             - name: envoy.filters.listener.tls_inspector\n\
             default_filter_chain:\n  filters:{TCP}",
            listener("")
        ));
        assert_eq!(l.per_connection_buffer_limit_bytes, 32768);
        assert_eq!(l.backlog, 64);
        assert_eq!(l.listener_filters.len(), 2);
        assert!(
            l.listener_filters
                .iter()
                .all(|f| matches!(f, ListenerFilter::TlsInspector))
        );
        assert!(l.filter_chains.is_empty());
        assert!(l.default_filter_chain.is_some());
    }

    #[test]
    fn tcp_proxy_options_and_weighted_clusters() {
        let y = listener(
            r#"filter_chains:
- filters:
  - name: anything
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: w
      idle_timeout: 0s
      max_connect_attempts: 3
      max_downstream_connection_duration: 10s
      weighted_clusters:
        clusters: [{name: backend, weight: 1}, {name: b2, weight: 4}]
"#,
        );
        let l = ok(&y);
        let NetworkFilter::TcpProxy(t) = &l.filter_chains[0].filter else {
            panic!("tcp_proxy expected");
        };
        assert_eq!(t.idle_timeout, None);
        assert_eq!(t.max_connect_attempts, 3);
        assert_eq!(
            t.max_downstream_connection_duration,
            Some(Duration::from_secs(10))
        );
        assert_eq!(t.clusters.len(), 2);
        assert!(!t.hash_source_ip);
    }

    #[test]
    fn tcp_proxy_hash_policy() {
        let tp = |extra: &str| {
            listener(&format!(
                r#"filter_chains:
- filters:
  - name: t
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: w
      cluster: backend
      {extra}
"#
            ))
        };
        let l = ok(&tp("hash_policy: [{source_ip: {}}]"));
        let NetworkFilter::TcpProxy(t) = &l.filter_chains[0].filter else {
            panic!("tcp_proxy expected");
        };
        assert!(t.hash_source_ip);
        let base = "l.filter_chains[0].filters[0].typed_config.hash_policy";
        assert_eq!(
            err_paths(&tp("hash_policy: [{filter_state: {key: k}}]")),
            vec![format!("{base}[0].filter_state")]
        );
        assert_eq!(
            err_paths(&tp("hash_policy: [{source_ip: {}}, {source_ip: {}}]")),
            vec![base.to_string()]
        );
        assert_eq!(
            err_paths(&tp("hash_policy: [{}]")),
            vec![format!("{base}[0]")]
        );
    }

    #[test]
    fn tcp_proxy_errors_have_paths() {
        let y = listener(
            r#"filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      cluster: nope
      downstream_idle_timeout: 5s
- filter_chain_match: {destination_port: 1}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: x
      weighted_clusters:
        clusters: [{name: backend, weight: 0}, {name: gone, weight: 1}]
- filter_chain_match: {destination_port: 2}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: x
"#,
        );
        let p = "l.filter_chains";
        let t = "filters[0].typed_config";
        assert_eq!(
            err_paths(&y),
            vec![
                format!("{p}[0].{t}.downstream_idle_timeout"),
                format!("{p}[0].{t}.stat_prefix"),
                format!("{p}[0].{t}.cluster"),
                format!("{p}[1].{t}.weighted_clusters.clusters[0].weight"),
                format!("{p}[1].{t}.weighted_clusters.clusters[1].name"),
                format!("{p}[2].{t}.cluster"),
            ]
        );
    }

    #[test]
    fn listener_level_errors() {
        let y = format!(
            "address: {{socket_address: {{address: nope, port_value: 1}}}}\nstat_prefix: s\n\
             enable_reuse_port: false\nfilter_chains:\n{}",
            tcp_chain("{}")
        );
        assert_eq!(
            err_paths(&y),
            vec![
                "l.stat_prefix",
                "l.name",
                "l.enable_reuse_port",
                "l.address.socket_address.address"
            ]
        );
        assert_eq!(
            err_paths("name: x\naddress: {socket_address: {address: 127.0.0.1, port_value: 1}}\n"),
            vec!["l.filter_chains"]
        );
        assert_eq!(err_paths("name: x\n"), vec!["l.address", "l.filter_chains"]);
    }

    #[test]
    fn listener_filter_errors() {
        let y = format!(
            "{}listener_filters:\n- name: envoy.filters.listener.original_src\n\
             - name: x\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_src.v3.OriginalSrc\n\
             - name: pp\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol\n    \
             rules: [{{tlv_type: 1}}]\n    pass_through_tlvs: {{}}\n    disallowed_versions: [V1, V2]\n\
             filter_chains:\n{}",
            listener(""),
            tcp_chain("{}")
        );
        assert_eq!(
            err_paths(&y),
            vec![
                "l.listener_filters[0].name",
                "l.listener_filters[1].typed_config",
                "l.listener_filters[2].typed_config.rules",
                "l.listener_filters[2].typed_config.pass_through_tlvs",
                "l.listener_filters[2].typed_config.disallowed_versions",
            ]
        );
    }

    #[test]
    fn intercept_listener_filters_in_config_order() {
        let y = format!(
            "{}use_original_dst: true\ncontinue_on_listener_filters_timeout: true\n\
             listener_filters_timeout: 2s\nlistener_filters:\n\
             - name: envoy.filters.listener.original_dst\n\
             - name: pp\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol\n    \
             allow_requests_without_proxy_protocol: true\n    disallowed_versions: [V1]\n    stat_prefix: lb\n\
             - name: envoy.filters.listener.http_inspector\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector\n\
             - name: envoy.filters.listener.tls_inspector\n\
             - name: envoy.filters.listener.proxy_protocol\n\
             filter_chains:\n{}",
            listener(""),
            tcp_chain("{}")
        );
        let l = ok(&y);
        assert!(l.intercept.use_original_dst);
        assert!(l.intercept.bind_to_port);
        assert!(l.continue_on_listener_filters_timeout);
        assert_eq!(l.listener_filters_timeout, Duration::from_secs(2));
        let f = &l.listener_filters;
        assert_eq!(f.len(), 5);
        assert!(matches!(f[0], ListenerFilter::OriginalDst));
        let ListenerFilter::ProxyProtocol(pp) = &f[1] else {
            panic!("proxy_protocol expected");
        };
        assert!(pp.allow_without && pp.disallow_v1 && !pp.disallow_v2);
        assert!(matches!(f[2], ListenerFilter::HttpInspector(_)));
        assert!(matches!(f[3], ListenerFilter::TlsInspector));
        // By name only: the defaults.
        let ListenerFilter::ProxyProtocol(pp) = &f[4] else {
            panic!("proxy_protocol expected");
        };
        assert!(!pp.allow_without && !pp.disallow_v1 && !pp.disallow_v2);
        assert!(l.tls_inspector.is_some());

        let l = ok(&format!(
            "{}bind_to_port: false\nfilter_chains:\n{}",
            listener(""),
            tcp_chain("{}")
        ));
        assert!(!l.intercept.bind_to_port);
        assert!(!l.intercept.use_original_dst);
        assert!(l.listener_filters.is_empty() && l.tls_inspector.is_none());
    }

    #[test]
    fn network_filter_errors() {
        let y = listener(
            r#"filter_chains:
- filters: []
- filter_chain_match: {destination_port: 1}
  filters:
  - name: envoy.filters.network.rbac
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
      stat_prefix: r
- filter_chain_match: {destination_port: 2}
  transport_socket: {name: envoy.transport_sockets.tls}
  filters:
  - name: envoy.filters.network.tcp_proxy
- filter_chain_match: {destination_port: 3}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: x
      cluster: backend
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: x
      cluster: backend
"#,
        );
        assert_eq!(
            err_paths(&y),
            vec![
                "l.filter_chains[0].filters",
                // network rbac is supported, but not terminal
                "l.filter_chains[1].filters[0]",
                "l.filter_chains[2].transport_socket.typed_config",
                "l.filter_chains[2].filters[0].typed_config",
                "l.filter_chains[3].filters[0]",
            ]
        );
    }

    #[test]
    fn type_url_wins_over_name() {
        // Named like tcp_proxy, configured as HCM: it is an HCM.
        let y = listener(
            r#"filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: h
      route_config: {name: r}
      http_filters: [{name: envoy.filters.http.router}]
"#,
        );
        let l = ok(&y);
        assert!(matches!(l.filter_chains[0].filter, NetworkFilter::Http(_)));
    }

    #[test]
    fn filter_chain_match_translation() {
        let y = listener(&format!(
            "filter_chains:\n{}",
            tcp_chain(
                r#"
    destination_port: 443
    prefix_ranges: [{address_prefix: 10.1.2.3, prefix_len: 8}, {address_prefix: "::1", prefix_len: 128}]
    server_names: [Example.COM, "*.example.com"]
    transport_protocol: tls
    application_protocols: [h2]
    direct_source_prefix_ranges: [{address_prefix: 192.168.0.0, prefix_len: 16}]
    source_type: EXTERNAL
    source_prefix_ranges: [{address_prefix: 0.0.0.0}]
    source_ports: [1, 2]"#
            )
        ));
        let l = ok(&y);
        let m = &l.filter_chains[0].filter_chain_match;
        assert_eq!(m.destination_port, Some(443));
        assert_eq!(
            m.prefix_ranges
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            vec!["10.0.0.0/8", "::1/128"]
        );
        assert_eq!(m.server_names, vec!["example.com", "*.example.com"]);
        assert_eq!(m.transport_protocol, "tls");
        assert_eq!(m.source_type, SourceType::External);
        assert_eq!(m.source_prefix_ranges[0].to_string(), "0.0.0.0/0");
        assert_eq!(m.source_ports, vec![1, 2]);
    }

    #[test]
    fn filter_chain_match_errors() {
        let y = listener(&format!(
            "filter_chains:\n{}",
            tcp_chain(
                r#"
    destination_port: 70000
    prefix_ranges: [{address_prefix: 10.0.0.0, prefix_len: 33}, {address_prefix: bad}]
    server_names: ["www.*.com", "", "*"]
    transport_protocol: quic
    application_protocols: [""]
    source_ports: [0]
    address_suffix: x"#
            )
        ));
        let p = "l.filter_chains[0].filter_chain_match";
        assert_eq!(
            err_paths(&y),
            [
                "address_suffix",
                "destination_port",
                "server_names[0]",
                "server_names[1]",
                "server_names[2]",
                "transport_protocol",
                "application_protocols[0]",
                "source_ports[0]",
                "prefix_ranges[0].prefix_len",
                "prefix_ranges[1].address_prefix",
            ]
            .map(|f| format!("{p}.{f}"))
        );
    }

    #[test]
    fn duplicate_and_overlapping_chains() {
        let y = listener(&format!(
            "filter_chains:\n{}{}",
            tcp_chain("{server_names: [a.com, b.com]}"),
            tcp_chain("{server_names: [b.com, a.com]}")
        ));
        let (_, errs) = run(&y);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, "l.filter_chains[1].filter_chain_match");
        assert!(
            errs[0]
                .1
                .contains("multiple filter chains with the same matching rules"),
            "{}",
            errs[0].1
        );
        assert!(errs[0].1.contains("l.filter_chains[0]"), "{}", errs[0].1);

        let y = listener(&format!(
            "filter_chains:\n{}{}",
            tcp_chain("{server_names: [a.com, b.com]}"),
            tcp_chain("{server_names: [b.com]}")
        ));
        let (_, errs) = run(&y);
        assert_eq!(errs[0].0, "l.filter_chains[1].filter_chain_match");
        assert!(errs[0].1.contains("overlapping"), "{}", errs[0].1);

        // Two chains without any match are duplicates too.
        let y = listener(&format!(
            "filter_chains:\n{}{}",
            tcp_chain("{}"),
            tcp_chain("{}")
        ));
        assert_eq!(err_paths(&y), vec!["l.filter_chains[1].filter_chain_match"]);
    }

    #[test]
    fn selection_uses_default_chain() {
        let y = format!(
            "{}default_filter_chain:\n  name: dflt\n  filters:{TCP}",
            listener(&format!(
                "filter_chains:\n{}",
                tcp_chain("{destination_port: 8443}")
            ))
        );
        let l = ok(&y);
        let input = |port: u16| super::super::ChainInput {
            dst: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            src: "127.0.0.1:5555".parse().expect("src"),
            server_name: None,
            transport_protocol: "raw_buffer",
            alpn: &[],
        };
        assert_eq!(l.select(&input(8443)).map(|c| c.name.as_str()), Some(""));
        assert_eq!(l.select(&input(80)).map(|c| c.name.as_str()), Some("dflt"));
    }

    const NET_RL: &str = r#"
      - name: envoy.filters.network.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit
          stat_prefix: conns
          token_bucket: {max_tokens: 2, fill_interval: 60s}
"#;

    #[test]
    fn network_local_ratelimit_before_the_terminal_filter() {
        let l = ok(&listener(&format!(
            "filter_chains:\n- filters:{NET_RL}{TCP}"
        )));
        let c = &l.filter_chains[0];
        assert_eq!(c.rate_limits.len(), 1);
        assert_eq!(c.rate_limits[0].stat_prefix, "conns");
        assert!(c.rate_limits[0].allow() && c.rate_limits[0].allow());
        assert!(
            !c.rate_limits[0].allow(),
            "third connection within the fill interval"
        );
        // Alone (not followed by a terminal filter), or with bad fields: errors at paths.
        let p = err_paths(&listener(&format!("filter_chains:\n- filters:{NET_RL}")));
        assert!(
            p.contains(&"l.filter_chains[0].filters[0]".to_string()),
            "{p:?}"
        );
        let bad = NET_RL
            .replace("max_tokens: 2", "max_tokens: 0")
            .replace("stat_prefix: conns", "share_key: k");
        let p = err_paths(&listener(&format!("filter_chains:\n- filters:{bad}{TCP}")));
        for want in [
            "l.filter_chains[0].filters[0].typed_config.share_key",
            "l.filter_chains[0].filters[0].typed_config.stat_prefix",
            "l.filter_chains[0].filters[0].typed_config.token_bucket.max_tokens",
        ] {
            assert!(p.contains(&want.to_string()), "{want} missing: {p:?}");
        }
    }

    const CONN_LIMIT: &str = r#"
      - name: envoy.filters.network.connection_limit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit
          stat_prefix: edge
          max_connections: 2
"#;

    #[test]
    fn connection_limit_before_the_terminal_filter_and_global_limit_opt_out() {
        let l = ok(&format!(
            "{}ignore_global_conn_limit: true
",
            listener(&format!(
                "filter_chains:\n- filters:{CONN_LIMIT}{NET_RL}{TCP}"
            ))
        ));
        assert!(l.ignore_global_conn_limit);
        let c = &l.filter_chains[0];
        assert_eq!(c.connection_limits.len(), 1);
        assert_eq!(c.connection_limits[0].max_connections, 2);
        assert_eq!(c.rate_limits.len(), 1);
        assert!(
            !ok(&listener(&format!("filter_chains:\n- filters:{TCP}"))).ignore_global_conn_limit
        );
        // Alone (not followed by a terminal filter), or with bad fields: errors at paths.
        let p = err_paths(&listener(&format!(
            "filter_chains:\n- filters:{CONN_LIMIT}"
        )));
        assert!(
            p.contains(&"l.filter_chains[0].filters[0]".to_string()),
            "{p:?}"
        );
        let bad = CONN_LIMIT.replace("max_connections: 2", "max_connections: 0");
        let p = err_paths(&listener(&format!("filter_chains:\n- filters:{bad}{TCP}")));
        assert_eq!(
            p,
            ["l.filter_chains[0].filters[0].typed_config.max_connections"]
        );
    }
}
