//! Route matching against a fixed, realistic route table: virtual host selection (exact,
//! wildcard and port-qualified domains), every route match kind, rewrites, redirects and
//! header mutations. Never panics, whatever the request looks like.
//!
//! Input format (lines separated by `\n`, missing lines are empty):
//! - line 0: `:authority`
//! - line 1: path and query
//! - line 2: a header value, sent as `x-canary`, `x-cluster` and `content-type`
//!   (skipped when it is not a valid header value)
//! - line 3: `<method> <scheme>` (default `GET http`; an invalid method becomes GET)
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use weir_proxy::config::{Errors, TranslateCtx};
use weir_proxy::route::{HeaderContext, RouteRequest, RouteTable};
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;

/// Clusters the route config may name.
const CLUSTERS: &[&str] = &["a", "b", "c", "canary"];

const ROUTES: &str = r#"
name: fuzz
request_headers_to_add:
- header: {key: x-table, value: "%PROTOCOL%"}
request_headers_to_remove: [x-strip-me]
response_headers_to_add:
- header: {key: x-table-resp, value: t}
virtual_hosts:
- name: api
  domains: ["api.example.com", "api.example.com:*", "api.example.com:8443"]
  request_headers_to_add:
  - header: {key: x-vhost, value: api}
  routes:
  - match: {path: /exact}
    route: {cluster: a}
  - match: {safe_regex: {regex: "/re/[0-9]+(/[a-z]*)?"}}
    route: {cluster: b}
  - match:
      prefix: /hdr
      headers:
      - name: x-canary
        string_match: {exact: "true"}
    route: {cluster: canary}
  - match:
      prefix: /hdr-re
      headers:
      - name: x-canary
        string_match: {safe_regex: {regex: "^(yes|[0-9]{1,3})$"}}
    route: {cluster: canary}
  - match:
      prefix: /q
      query_parameters:
      - name: v
        string_match: {exact: "2"}
    route: {cluster: c}
  - match:
      prefix: /qp
      query_parameters:
      - name: debug
        string_match: {prefix: "on"}
    route: {cluster: c}
  - match: {prefix: /grpc, grpc: {}}
    route: {cluster: c}
  - match: {prefix: /CaSe, case_sensitive: false}
    route: {cluster: c}
  - match: {path_separated_prefix: /sep}
    route: {cluster: b}
  - match: {prefix: /old/}
    route: {cluster: a, prefix_rewrite: /new/}
  - match: {prefix: /strip/}
    route: {cluster: a, prefix_rewrite: /}
  - match: {prefix: /rx/}
    route:
      cluster: a
      regex_rewrite: {pattern: {regex: "^/rx/(\\w+)/(\\w+)$"}, substitution: "/\\2/\\1"}
  - match: {prefix: /rxall/}
    route:
      cluster: a
      regex_rewrite: {pattern: {regex: "[aeiou]"}, substitution: ""}
  - match: {prefix: /hostlit}
    route: {cluster: a, host_rewrite_literal: rewritten.internal}
  - match: {prefix: /redirect}
    redirect: {https_redirect: true, host_redirect: secure.example.com, path_redirect: /landing, response_code: FOUND}
  - match: {prefix: /moved}
    redirect: {host_redirect: "new.example.com"}
  - match: {prefix: /direct}
    direct_response: {status: 418, body: {inline_string: "short and stout"}}
  - match: {prefix: /split}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 80}
        - {name: b, weight: 20}
  - match: {prefix: /by-header}
    route: {cluster_header: x-cluster}
  - match: {prefix: /hdrs}
    route: {cluster: a}
    request_headers_to_add:
    - header: {key: x-route, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    - header: {key: x-route-local, value: "%DOWNSTREAM_LOCAL_ADDRESS%"}
    - header: {key: x-canary, value: "from-route"}
    request_headers_to_remove: [x-secret, x-canary]
    response_headers_to_add:
    - header: {key: x-resp, value: added}
    response_headers_to_remove: [x-backend]
  - match: {prefix: /}
    route: {cluster: a}
- name: wild-suffix
  domains: ["*.wild.example.com"]
  routes:
  - match: {prefix: /}
    route: {cluster: b}
- name: wild-prefix
  domains: ["www.example.*", "[::1]:8080", "10.0.0.1"]
  routes:
  - match: {prefix: /http}
    redirect: {https_redirect: true}
  - match: {prefix: /}
    route: {cluster: c}
- name: fallback
  domains: ["*"]
  routes:
  - match: {prefix: /only}
    route: {cluster: c}
  - match: {path: /teapot}
    direct_response: {status: 418}
"#;

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let rc = weir_xds_api::from_yaml::<RouteConfiguration>(ROUTES)
            .unwrap_or_else(|e| panic!("fuzz route config does not parse: {e}"));
        let set: HashSet<&str> = CLUSTERS.iter().copied().collect();
        let store = weir_proxy::stats::Store::new();
        let ctx = TranslateCtx {
            clusters: &set,
            stats: &store,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let table = RouteTable::translate(&rc, "", &ctx, &mut errs);
        // A table that silently lost routes would fuzz far less than intended: fail loudly so
        // the config above gets updated when route translation changes what it accepts.
        assert!(
            errs.is_empty(),
            "fuzz route config no longer translates cleanly; update fuzz/fuzz_targets/route_match.rs: {:?}",
            errs.0
        );
        table
    })
}

fuzz_target!(|data: &[u8]| {
    let table = table();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let authority = lines.next().unwrap_or_default();
    let path = lines.next().unwrap_or_default();
    let value = lines.next().unwrap_or_default();
    let (method, scheme) = match lines.next() {
        Some(l) => {
            let (m, s) = l.split_once(' ').unwrap_or((l, "http"));
            (Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET), s)
        }
        None => (Method::GET, "http"),
    };

    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(value) {
        for name in ["x-canary", "x-cluster", "content-type"] {
            headers.append(HeaderName::from_static(name), v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(authority) {
        headers.insert(http::header::HOST, v);
    }

    let req = RouteRequest {
        authority,
        path,
        method: &method,
        headers: &headers,
        scheme,
    };
    let Some(m) = table.route(&req) else {
        return;
    };
    std::hint::black_box(m.action());
    std::hint::black_box(m.rewrite_path(path));
    std::hint::black_box(m.redirect(&req));
    let ctx = HeaderContext {
        downstream_remote: ([203, 0, 113, 7], 54321).into(),
        downstream_local: ([10, 0, 0, 1], 8080).into(),
        protocol: "HTTP/1.1",
    };
    let mut upstream_headers = headers.clone();
    upstream_headers.insert("x-secret", HeaderValue::from_static("s"));
    upstream_headers.insert("x-strip-me", HeaderValue::from_static("s"));
    m.apply_request_headers(&mut upstream_headers, &ctx);
});
