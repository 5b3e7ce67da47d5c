//! Route table tests: configs are Envoy YAML, requests are built by hand.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;

use super::*;
use crate::config::{Errors, TranslateCtx};
use crate::stats::Store;

const CLUSTERS: &[&str] = &["a", "b", "c", "d", "web", "api"];

fn translate_with(yaml: &str, clusters: &[&str]) -> (RouteTable, Vec<(String, String)>) {
    let rc: RouteConfiguration = weir_xds_api::from_yaml(yaml).expect("test yaml parses");
    let set: HashSet<&str> = clusters.iter().copied().collect();
    let stats = Store::new();
    let ctx = TranslateCtx {
        clusters: &set,
        stats: &stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let t = RouteTable::translate(&rc, "rc", &ctx, &mut errs);
    let e = errs.0.into_iter().map(|e| (e.path, e.message)).collect();
    (t, e)
}

fn table(yaml: &str) -> RouteTable {
    let (t, e) = translate_with(yaml, CLUSTERS);
    assert!(e.is_empty(), "unexpected errors: {e:#?}");
    t
}

/// Paths of the translation errors.
fn error_paths(yaml: &str) -> Vec<String> {
    let (_, e) = translate_with(yaml, CLUSTERS);
    e.into_iter().map(|(p, _)| p).collect()
}

fn assert_error(yaml: &str, path: &str) {
    let (_, e) = translate_with(yaml, CLUSTERS);
    assert!(
        e.iter().any(|(p, _)| p == path),
        "expected an error at {path}, got {e:#?}"
    );
}

struct Req {
    authority: String,
    path: String,
    method: Method,
    headers: HeaderMap,
    scheme: String,
}

fn req(authority: &str, path: &str) -> Req {
    Req {
        authority: authority.into(),
        path: path.into(),
        method: Method::GET,
        headers: HeaderMap::new(),
        scheme: "http".into(),
    }
}

impl Req {
    fn header(mut self, k: &'static str, v: &str) -> Req {
        self.headers
            .append(k, HeaderValue::from_str(v).expect("test header value"));
        self
    }
    fn method(mut self, m: Method) -> Req {
        self.method = m;
        self
    }
    fn scheme(mut self, s: &str) -> Req {
        self.scheme = s.into();
        self
    }
    fn rr(&self) -> RouteRequest<'_> {
        RouteRequest {
            authority: &self.authority,
            path: &self.path,
            method: &self.method,
            headers: &self.headers,
            scheme: &self.scheme,
        }
    }
}

/// `vhost/route` names of the match, or `None`.
fn hit(t: &RouteTable, r: &Req) -> Option<String> {
    t.route(&r.rr())
        .map(|m| format!("{}/{}", m.vhost_name(), m.route_name()))
}

fn vhost(t: &RouteTable, authority: &str) -> Option<String> {
    let r = req(authority, "/");
    t.route(&r.rr()).map(|m| m.vhost_name().to_string())
}

fn forward<'a>(m: &RouteMatch<'a>) -> &'a ForwardAction {
    match m.action() {
        RouteAction::Forward(f) => f,
        other => panic!("not a forward action: {other:?}"),
    }
}

fn hctx() -> HeaderContext {
    HeaderContext {
        downstream_remote: "10.0.0.1:1234".parse().expect("addr"),
        downstream_local: "192.168.1.2:8080".parse().expect("addr"),
        protocol: "HTTP/1.1",
    }
}

fn values(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect()
}

/// One virtual host `vh` (domain `*`) with the given routes (YAML list items, indented 4).
fn one_vhost(routes: &str) -> String {
    format!("virtual_hosts:\n- name: vh\n  domains: ['*']\n  routes:\n{routes}")
}

// ---------------------------------------------------------------------------------------
// Virtual host selection

const DOMAINS: &str = r#"
name: rc
virtual_hosts:
- name: exact
  domains: [foo.example.com]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: suffix-long
  domains: ["*.bar.example.com"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: suffix
  domains: ["*.example.com"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: prefix
  domains: ["foo.*"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: prefix-long
  domains: ["foo.bar.*"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: withport
  domains: ["api.com:8080", "*.svc:8080"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: noport
  domains: [api.com, "*.svc", "[::1]"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
- name: default
  domains: ["*"]
  routes: [{match: {prefix: /}, route: {cluster: a}}]
"#;

#[test]
fn domain_selection_order() {
    let t = table(DOMAINS);
    assert_eq!(t.name, "rc");
    assert_eq!(t.virtual_host_count(), 8);
    let v = |a: &str| vhost(&t, a);
    assert_eq!(v("foo.example.com").as_deref(), Some("exact"));
    // Exact beats the suffix wildcard that also matches.
    assert_eq!(v("x.bar.example.com").as_deref(), Some("suffix-long"));
    assert_eq!(v("foo.bar.example.com").as_deref(), Some("suffix-long"));
    assert_eq!(v("x.example.com").as_deref(), Some("suffix"));
    // Suffix beats prefix.
    assert_eq!(v("foo.y.example.com").as_deref(), Some("suffix"));
    assert_eq!(v("foo.org").as_deref(), Some("prefix"));
    assert_eq!(v("foo.bar.org").as_deref(), Some("prefix-long"));
    // A wildcard matches at least one character.
    assert_eq!(v("example.com").as_deref(), Some("default"));
    assert_eq!(v(".example.com").as_deref(), Some("default"));
    assert_eq!(v("foo.").as_deref(), Some("default"));
    assert_eq!(v("other.net").as_deref(), Some("default"));
    assert_eq!(v("").as_deref(), Some("default"));
}

#[test]
fn domain_matching_is_case_insensitive() {
    let t = table(DOMAINS);
    assert_eq!(vhost(&t, "FOO.Example.COM").as_deref(), Some("exact"));
    assert_eq!(
        vhost(&t, "X.BAR.example.com").as_deref(),
        Some("suffix-long")
    );
    assert_eq!(vhost(&t, "Foo.Org").as_deref(), Some("prefix"));
    let long = format!("{}.EXAMPLE.COM", "X".repeat(300));
    assert_eq!(vhost(&t, &long).as_deref(), Some("suffix"));
    // Configured domains are lowercased too.
    let t = table(
        "virtual_hosts:\n- name: v\n  domains: [WWW.Example.COM]\n  routes: [{match: {prefix: /}, route: {cluster: a}}]\n",
    );
    assert_eq!(vhost(&t, "www.example.com").as_deref(), Some("v"));
}

#[test]
fn domain_ports() {
    let t = table(DOMAINS);
    assert_eq!(vhost(&t, "api.com:8080").as_deref(), Some("withport"));
    // No domain with this port: retried without the port.
    assert_eq!(vhost(&t, "api.com:9090").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "api.com").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "x.svc:8080").as_deref(), Some("withport"));
    assert_eq!(vhost(&t, "x.svc:1").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "[::1]:80").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "[::1]").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "nothing.net:80").as_deref(), Some("default"));
    // Not a port: left alone.
    assert_eq!(vhost(&t, "api.com:").as_deref(), Some("default"));
    assert_eq!(vhost(&t, "api.com:x").as_deref(), Some("default"));
}

#[test]
fn ignore_port_in_host_matching() {
    let t = table(&format!("ignore_port_in_host_matching: true\n{DOMAINS}"));
    assert_eq!(vhost(&t, "api.com:8080").as_deref(), Some("noport"));
    assert_eq!(vhost(&t, "API.com:1").as_deref(), Some("noport"));
}

#[test]
fn no_default_vhost_means_no_route() {
    let t = table(
        "virtual_hosts:\n- name: v\n  domains: [a.com]\n  routes: [{match: {prefix: /}, route: {cluster: a}}]\n",
    );
    assert!(t.route(&req("b.com", "/").rr()).is_none());
    assert!(t.route(&req("a.com", "/").rr()).is_some());
    let empty = table("name: empty\n");
    assert!(empty.route(&req("a.com", "/").rr()).is_none());
}

#[test]
fn duplicate_domains_are_errors() {
    let y = r#"
virtual_hosts:
- name: one
  domains: [a.com, "*.b.com", "c.*", "*"]
  routes: []
- name: two
  domains: [A.com, "*.B.com", "c.*", "*", d.com]
  routes: []
"#;
    let p = error_paths(y);
    assert_eq!(
        p,
        vec![
            "rc.virtual_hosts[1].domains[0]",
            "rc.virtual_hosts[1].domains[1]",
            "rc.virtual_hosts[1].domains[2]",
            "rc.virtual_hosts[1].domains[3]",
        ]
    );
}

#[test]
fn vhost_validation() {
    assert_error(
        "virtual_hosts:\n- name: v\n  domains: []\n",
        "rc.virtual_hosts[0].domains",
    );
    assert_error(
        "virtual_hosts:\n- domains: [a]\n",
        "rc.virtual_hosts[0].name",
    );
    assert_error(
        "virtual_hosts:\n- {name: v, domains: [a]}\n- {name: v, domains: [b]}\n",
        "rc.virtual_hosts[1].name",
    );
    assert_error(
        "virtual_hosts:\n- {name: v, domains: [a, '']}\n",
        "rc.virtual_hosts[0].domains[1]",
    );
    assert_error(
        "virtual_hosts:\n- {name: v, domains: [a], require_tls: ALL}\n",
        "rc.virtual_hosts[0].require_tls",
    );
    assert_error(
        "virtual_hosts:\n- {name: v, domains: [a], virtual_clusters: [{name: x, headers: [{name: a}]}]}\n",
        "rc.virtual_hosts[0].virtual_clusters",
    );
    assert_error(
        "internal_only_headers: [x-internal]\n",
        "rc.internal_only_headers",
    );
    // require_tls: NONE is the default and fine.
    assert!(
        error_paths("virtual_hosts:\n- {name: v, domains: [a], require_tls: NONE}\n").is_empty()
    );
}

// ---------------------------------------------------------------------------------------
// Path matching

#[test]
fn path_specifiers() {
    let t = table(&one_vhost(
        r#"
  - {name: exact, match: {path: /exact}, route: {cluster: a}}
  - {name: regex, match: {safe_regex: {regex: "/v[0-9]+"}}, route: {cluster: a}}
  - {name: sep, match: {path_separated_prefix: /api}, route: {cluster: a}}
  - {name: prefix, match: {prefix: /p}, route: {cluster: a}}
  - {name: all, match: {prefix: ""}, route: {cluster: a}}
"#,
    ));
    let h = |p: &str| hit(&t, &req("x", p));
    assert_eq!(h("/exact").as_deref(), Some("vh/exact"));
    assert_eq!(h("/exact?x=1").as_deref(), Some("vh/exact"));
    assert_eq!(h("/exact#frag").as_deref(), Some("vh/exact"));
    assert_eq!(h("/exact/").as_deref(), Some("vh/all"));
    assert_eq!(h("/EXACT").as_deref(), Some("vh/all"));
    // Regex: full-string match on the path only.
    assert_eq!(h("/v12").as_deref(), Some("vh/regex"));
    assert_eq!(h("/v12?q=/v1").as_deref(), Some("vh/regex"));
    assert_eq!(h("/v1/x").as_deref(), Some("vh/all"));
    assert_eq!(h("/xv1").as_deref(), Some("vh/all"));
    // path_separated_prefix: the prefix, then end or '/'.
    assert_eq!(h("/api").as_deref(), Some("vh/sep"));
    assert_eq!(h("/api/").as_deref(), Some("vh/sep"));
    assert_eq!(h("/api/x/y").as_deref(), Some("vh/sep"));
    assert_eq!(h("/api?x").as_deref(), Some("vh/sep"));
    assert_eq!(h("/apix").as_deref(), Some("vh/all"));
    assert_eq!(h("/p").as_deref(), Some("vh/prefix"));
    assert_eq!(h("/pq/r").as_deref(), Some("vh/prefix"));
    assert_eq!(h("/P").as_deref(), Some("vh/all"));
    assert_eq!(h("").as_deref(), Some("vh/all"));
    // The query is not part of the path.
    assert_eq!(h("/?/p").as_deref(), Some("vh/all"));
}

#[test]
fn case_insensitive_paths() {
    let t = table(&one_vhost(
        r#"
  - {name: exact, match: {path: /Exact, case_sensitive: false}, route: {cluster: a}}
  - {name: sep, match: {path_separated_prefix: /Api, case_sensitive: false}, route: {cluster: a}}
  - {name: prefix, match: {prefix: /Pre, case_sensitive: false}, route: {cluster: a}}
  - {name: regex, match: {safe_regex: {regex: /r}, case_sensitive: false}, route: {cluster: a}}
  - {name: cs, match: {prefix: /CS, case_sensitive: true}, route: {cluster: a}}
"#,
    ));
    let h = |p: &str| hit(&t, &req("x", p));
    assert_eq!(h("/exact").as_deref(), Some("vh/exact"));
    assert_eq!(h("/EXACT?a").as_deref(), Some("vh/exact"));
    assert_eq!(h("/aPi/x").as_deref(), Some("vh/sep"));
    assert_eq!(h("/preFIX").as_deref(), Some("vh/prefix"));
    // case_sensitive does not apply to safe_regex.
    assert_eq!(h("/r").as_deref(), Some("vh/regex"));
    assert_eq!(h("/R"), None);
    assert_eq!(h("/CS").as_deref(), Some("vh/cs"));
    assert_eq!(h("/cs"), None);
}

#[test]
fn first_matching_route_wins() {
    let t = table(&one_vhost(
        r#"
  - {name: first, match: {prefix: /a}, route: {cluster: a}}
  - {name: second, match: {prefix: /ab}, route: {cluster: b}}
"#,
    ));
    assert_eq!(hit(&t, &req("x", "/abc")).as_deref(), Some("vh/first"));
    assert_eq!(hit(&t, &req("x", "/b")), None);
}

// ---------------------------------------------------------------------------------------
// Header, query and gRPC matching

#[test]
fn header_string_matchers() {
    let t = table(&one_vhost(
        r#"
  - name: exact
    match: {prefix: /, headers: [{name: x-exact, string_match: {exact: Yes}}]}
    route: {cluster: a}
  - name: exact-ic
    match: {prefix: /, headers: [{name: X-Exact-IC, string_match: {exact: yes, ignore_case: true}}]}
    route: {cluster: a}
  - name: prefix
    match: {prefix: /, headers: [{name: x-prefix, string_match: {prefix: ab}}]}
    route: {cluster: a}
  - name: suffix
    match: {prefix: /, headers: [{name: x-suffix, string_match: {suffix: yz, ignore_case: true}}]}
    route: {cluster: a}
  - name: contains
    match: {prefix: /, headers: [{name: x-contains, string_match: {contains: mid}}]}
    route: {cluster: a}
  - name: contains-ic
    match: {prefix: /, headers: [{name: x-contains-ic, string_match: {contains: MiD, ignore_case: true}}]}
    route: {cluster: a}
  - name: regex
    match: {prefix: /, headers: [{name: x-regex, string_match: {safe_regex: {regex: "v[0-9]"}}}]}
    route: {cluster: a}
"#,
    ));
    let h = |k: &'static str, v: &str| hit(&t, &req("x", "/").header(k, v));
    assert_eq!(h("x-exact", "Yes").as_deref(), Some("vh/exact"));
    assert_eq!(h("x-exact", "yes"), None);
    assert_eq!(h("x-exact-ic", "YES").as_deref(), Some("vh/exact-ic"));
    assert_eq!(h("x-exact-ic", "yess"), None);
    assert_eq!(h("x-prefix", "abc").as_deref(), Some("vh/prefix"));
    assert_eq!(h("x-prefix", "ABc"), None);
    assert_eq!(h("x-suffix", "xYZ").as_deref(), Some("vh/suffix"));
    assert_eq!(h("x-suffix", "yzx"), None);
    assert_eq!(h("x-contains", "amidb").as_deref(), Some("vh/contains"));
    assert_eq!(h("x-contains", "aMIDb"), None);
    assert_eq!(
        h("x-contains-ic", "aMIDb").as_deref(),
        Some("vh/contains-ic")
    );
    assert_eq!(h("x-contains-ic", "md"), None);
    assert_eq!(h("x-regex", "v1").as_deref(), Some("vh/regex"));
    assert_eq!(h("x-regex", "v12"), None, "full match");
    assert_eq!(h("x-other", "v1"), None);
}

#[test]
fn header_presence_invert_and_missing() {
    let t = table(&one_vhost(
        r#"
  - name: present
    match: {path: /present, headers: [{name: x-h, present_match: true}]}
    route: {cluster: a}
  - name: absent
    match: {path: /absent, headers: [{name: x-h, present_match: false}]}
    route: {cluster: a}
  - name: not-present
    match: {path: /not-present, headers: [{name: x-h, present_match: true, invert_match: true}]}
    route: {cluster: a}
  - name: bare
    match: {path: /bare, headers: [{name: x-h}]}
    route: {cluster: a}
  - name: inverted-exact
    match: {path: /inv, headers: [{name: x-h, string_match: {exact: no}, invert_match: true}]}
    route: {cluster: a}
  - name: missing-empty
    match: {path: /me, headers: [{name: x-h, string_match: {exact: ""}, treat_missing_header_as_empty: true}]}
    route: {cluster: a}
  - name: missing-empty-present
    match: {path: /mep, headers: [{name: x-h, present_match: true, treat_missing_header_as_empty: true}]}
    route: {cluster: a}
"#,
    ));
    let with = |p: &str| hit(&t, &req("x", p).header("x-h", "v"));
    let without = |p: &str| hit(&t, &req("x", p));
    assert_eq!(with("/present").as_deref(), Some("vh/present"));
    assert_eq!(without("/present"), None);
    assert_eq!(with("/absent"), None);
    assert_eq!(without("/absent").as_deref(), Some("vh/absent"));
    assert_eq!(with("/not-present"), None);
    assert_eq!(without("/not-present").as_deref(), Some("vh/not-present"));
    assert_eq!(with("/bare").as_deref(), Some("vh/bare"));
    assert_eq!(without("/bare"), None);
    // Inverted value matchers do not match a missing header (Envoy).
    assert_eq!(with("/inv").as_deref(), Some("vh/inverted-exact"));
    assert_eq!(hit(&t, &req("x", "/inv").header("x-h", "no")), None);
    assert_eq!(without("/inv"), None);
    assert_eq!(without("/me").as_deref(), Some("vh/missing-empty"));
    assert_eq!(with("/me"), None);
    // Presence is about the header itself, even with treat_missing_header_as_empty.
    assert_eq!(without("/mep"), None);
    assert_eq!(with("/mep").as_deref(), Some("vh/missing-empty-present"));
}

#[test]
fn deprecated_header_matchers() {
    let t = table(&one_vhost(
        r#"
  - {name: exact, match: {path: /e, headers: [{name: x-h, exact_match: v}]}, route: {cluster: a}}
  - {name: any, match: {path: /any, headers: [{name: x-h, exact_match: ""}]}, route: {cluster: a}}
  - {name: prefix, match: {path: /p, headers: [{name: x-h, prefix_match: ab}]}, route: {cluster: a}}
  - {name: suffix, match: {path: /s, headers: [{name: x-h, suffix_match: yz}]}, route: {cluster: a}}
  - {name: contains, match: {path: /c, headers: [{name: x-h, contains_match: mid}]}, route: {cluster: a}}
  - {name: regex, match: {path: /r, headers: [{name: x-h, safe_regex_match: {regex: "a+"}}]}, route: {cluster: a}}
"#,
    ));
    let h = |p: &str, v: &str| hit(&t, &req("x", p).header("x-h", v));
    assert_eq!(h("/e", "v").as_deref(), Some("vh/exact"));
    assert_eq!(h("/e", "w"), None);
    assert_eq!(h("/any", "whatever").as_deref(), Some("vh/any"));
    assert_eq!(hit(&t, &req("x", "/any")), None);
    assert_eq!(h("/p", "abc").as_deref(), Some("vh/prefix"));
    assert_eq!(h("/s", "xyz").as_deref(), Some("vh/suffix"));
    assert_eq!(h("/c", "amidb").as_deref(), Some("vh/contains"));
    assert_eq!(h("/r", "aaa").as_deref(), Some("vh/regex"));
    assert_eq!(h("/r", "aab"), None);
}

#[test]
fn header_multiple_values_and_pseudo_headers() {
    let t = table(&one_vhost(
        r#"
  - name: joined
    match: {prefix: /, headers: [{name: x-m, string_match: {exact: "a,b"}}]}
    route: {cluster: a}
  - name: post
    match: {prefix: /, headers: [{name: ":method", string_match: {exact: POST}}]}
    route: {cluster: a}
  - name: authority
    match: {prefix: /, headers: [{name: ":authority", string_match: {suffix: ".internal"}}]}
    route: {cluster: a}
  - name: path-with-query
    match: {prefix: /, headers: [{name: ":path", string_match: {contains: "debug=1"}}]}
    route: {cluster: a}
  - name: https
    match: {prefix: /, headers: [{name: ":scheme", string_match: {exact: https}}]}
    route: {cluster: a}
"#,
    ));
    let r = req("x", "/").header("x-m", "a").header("x-m", "b");
    assert_eq!(hit(&t, &r).as_deref(), Some("vh/joined"));
    let r = req("x", "/").method(Method::POST);
    assert_eq!(hit(&t, &r).as_deref(), Some("vh/post"));
    assert_eq!(
        hit(&t, &req("db.internal", "/")).as_deref(),
        Some("vh/authority")
    );
    assert_eq!(
        hit(&t, &req("x", "/p?debug=1")).as_deref(),
        Some("vh/path-with-query")
    );
    assert_eq!(
        hit(&t, &req("x", "/").scheme("https")).as_deref(),
        Some("vh/https")
    );
    assert_eq!(hit(&t, &req("x", "/")), None);
}

#[test]
fn query_parameter_matching() {
    let t = table(&one_vhost(
        r#"
  - name: exact
    match: {prefix: /e, query_parameters: [{name: debug, string_match: {exact: "on now"}}]}
    route: {cluster: a}
  - name: present
    match: {prefix: /p, query_parameters: [{name: "a b", present_match: true}]}
    route: {cluster: a}
  - name: bare
    match: {prefix: /b, query_parameters: [{name: flag}]}
    route: {cluster: a}
  - name: two
    match: {prefix: /t, query_parameters: [{name: x, string_match: {prefix: "1"}}, {name: y, string_match: {exact: "2"}}]}
    route: {cluster: a}
"#,
    ));
    let h = |p: &str| hit(&t, &req("x", p));
    assert_eq!(h("/e?debug=on%20now").as_deref(), Some("vh/exact"));
    assert_eq!(h("/e?x=1&debug=on+now").as_deref(), Some("vh/exact"));
    assert_eq!(h("/e?debug=on"), None);
    // The first value counts.
    assert_eq!(h("/e?debug=off&debug=on%20now"), None);
    assert_eq!(h("/e?debug=on%20now#frag").as_deref(), Some("vh/exact"));
    assert_eq!(h("/e"), None);
    assert_eq!(h("/p?a%20b").as_deref(), Some("vh/present"));
    assert_eq!(h("/p?a+b=").as_deref(), Some("vh/present"));
    assert_eq!(h("/p?ab"), None);
    assert_eq!(h("/b?flag").as_deref(), Some("vh/bare"));
    assert_eq!(h("/b?flags"), None);
    assert_eq!(h("/t?y=2&x=12").as_deref(), Some("vh/two"));
    assert_eq!(h("/t?x=12"), None);
    assert_eq!(h("/t?x=2&y=2"), None);
}

#[test]
fn grpc_matching() {
    let t = table(&one_vhost(
        r#"
  - {name: grpc, match: {prefix: /, grpc: {}}, route: {cluster: a}}
  - {name: other, match: {prefix: /}, route: {cluster: b}}
"#,
    ));
    let ct = |v: &str| hit(&t, &req("x", "/svc/M").header("content-type", v));
    assert_eq!(ct("application/grpc").as_deref(), Some("vh/grpc"));
    assert_eq!(ct("application/grpc+proto").as_deref(), Some("vh/grpc"));
    assert_eq!(
        ct("application/grpc;charset=utf-8").as_deref(),
        Some("vh/grpc")
    );
    assert_eq!(ct("application/grpc-web").as_deref(), Some("vh/other"));
    assert_eq!(ct("application/json").as_deref(), Some("vh/other"));
    assert_eq!(hit(&t, &req("x", "/")).as_deref(), Some("vh/other"));
}

#[test]
fn all_conditions_must_match() {
    let t = table(&one_vhost(
        r#"
  - name: combo
    match:
      prefix: /api
      grpc: {}
      headers: [{name: x-a, string_match: {exact: "1"}}, {name: x-b, present_match: true}]
      query_parameters: [{name: q, string_match: {exact: v}}]
    route: {cluster: a}
"#,
    ));
    let full = || {
        req("x", "/api/x?q=v")
            .header("content-type", "application/grpc")
            .header("x-a", "1")
            .header("x-b", "")
    };
    assert_eq!(hit(&t, &full()).as_deref(), Some("vh/combo"));
    let mut r = full();
    r.path = "/other?q=v".into();
    assert_eq!(hit(&t, &r), None);
    let mut r = full();
    r.path = "/api/x?q=w".into();
    assert_eq!(hit(&t, &r), None);
    let mut r = full();
    r.headers.remove("x-b");
    assert_eq!(hit(&t, &r), None);
    let mut r = full();
    r.headers.insert("x-a", HeaderValue::from_static("2"));
    assert_eq!(hit(&t, &r), None);
    let mut r = full();
    r.headers.remove("content-type");
    assert_eq!(hit(&t, &r), None);
}

// ---------------------------------------------------------------------------------------
// Forward actions

#[test]
fn cluster_selection() {
    let t = table(&one_vhost(
        r#"
  - {name: fixed, match: {path: /fixed}, route: {cluster: web}}
  - {name: header, match: {path: /header}, route: {cluster_header: X-Cluster}}
"#,
    ));
    let r = req("x", "/fixed");
    let m = t.route(&r.rr()).expect("route");
    assert_eq!(
        forward(&m).select_cluster(&r.headers, 7).as_deref(),
        Some("web")
    );
    let r = req("x", "/header").header("x-cluster", "api");
    let m = t.route(&r.rr()).expect("route");
    assert_eq!(
        forward(&m).select_cluster(&r.headers, 0).as_deref(),
        Some("api")
    );
    let r = req("x", "/header");
    let m = t.route(&r.rr()).expect("route");
    assert_eq!(forward(&m).select_cluster(&r.headers, 0), None);
    let r = req("x", "/header").header("x-cluster", "");
    assert_eq!(forward(&m).select_cluster(&r.headers, 0), None);
}

#[test]
fn weighted_cluster_math() {
    let t = table(&one_vhost(
        r#"
  - match: {prefix: /}
    route:
      weighted_clusters:
        clusters:
        - {name: a, weight: 10}
        - {name: b, weight: 20}
        - {name: c, weight: 0}
        - {name: d, weight: 70}
        - {cluster_header: x-pick, weight: 0}
"#,
    ));
    let r = req("x", "/");
    let m = t.route(&r.rr()).expect("route");
    let f = forward(&m);
    let pick = |n: u64| f.select_cluster(&r.headers, n).map(|c| c.into_owned());
    let mut counts = std::collections::HashMap::new();
    for n in 0..100 {
        *counts.entry(pick(n).expect("cluster")).or_insert(0) += 1;
    }
    assert_eq!(counts.get("a"), Some(&10));
    assert_eq!(counts.get("b"), Some(&20));
    assert_eq!(counts.get("c"), None);
    assert_eq!(counts.get("d"), Some(&70));
    assert_eq!(pick(9).as_deref(), Some("a"));
    assert_eq!(pick(10).as_deref(), Some("b"));
    assert_eq!(pick(29).as_deref(), Some("b"));
    assert_eq!(pick(30).as_deref(), Some("d"));
    assert_eq!(pick(99).as_deref(), Some("d"));
    assert_eq!(pick(100).as_deref(), Some("a"));
    assert_eq!(pick(u64::MAX).as_deref(), Some("b")); // u64::MAX % 100 == 15
}

#[test]
fn weighted_cluster_header_target() {
    let t = table(&one_vhost(
        r#"
  - match: {prefix: /}
    route:
      weighted_clusters:
        clusters: [{name: a, weight: 1}, {cluster_header: x-pick, weight: 1}]
"#,
    ));
    let r = req("x", "/").header("x-pick", "b");
    let m = t.route(&r.rr()).expect("route");
    assert_eq!(
        forward(&m).select_cluster(&r.headers, 0).as_deref(),
        Some("a")
    );
    assert_eq!(
        forward(&m).select_cluster(&r.headers, 1).as_deref(),
        Some("b")
    );
    let r = req("x", "/");
    assert_eq!(forward(&m).select_cluster(&r.headers, 1), None);
}

#[test]
fn cluster_validation() {
    let y = one_vhost(
        r#"
  - {match: {prefix: /a}, route: {cluster: nope}}
  - match: {prefix: /b}
    route: {weighted_clusters: {clusters: [{name: a, weight: 1}, {name: missing, weight: 1}]}}
  - {match: {prefix: /c}, route: {cluster_header: x-anything}}
"#,
    );
    assert_eq!(
        error_paths(&y),
        vec![
            "rc.virtual_hosts[0].routes[0].route.cluster",
            "rc.virtual_hosts[0].routes[1].route.weighted_clusters.clusters[1].name",
        ]
    );
    assert!(error_paths(&format!("validate_clusters: false\n{y}")).is_empty());
    let (_, e) = translate_with(&format!("validate_clusters: true\n{y}"), &[]);
    assert_eq!(e.len(), 3);
}

#[test]
fn weighted_cluster_validation() {
    let base = |clusters: &str| {
        one_vhost(&format!(
            "  - match: {{prefix: /}}\n    route: {{weighted_clusters: {clusters}}}\n"
        ))
    };
    assert_error(
        &base("{clusters: [{name: a, weight: 0}]}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters",
    );
    assert_error(
        &base("{clusters: []}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters",
    );
    assert_error(
        &base("{clusters: [{name: a, cluster_header: x, weight: 1}]}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0]",
    );
    assert_error(
        &base("{clusters: [{name: a, weight: 1}], total_weight: 2}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.total_weight",
    );
    assert!(error_paths(&base("{clusters: [{name: a, weight: 2}], total_weight: 2}")).is_empty());
    assert_error(
        &base("{clusters: [{name: a, weight: 1}], runtime_key_prefix: rk}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.runtime_key_prefix",
    );
    assert_error(
        &base("{clusters: [{name: a, weight: 1, host_rewrite_literal: h}]}"),
        "rc.virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].host_rewrite_literal",
    );
}

#[test]
fn timeouts_and_host_rewrite() {
    let t = table(&one_vhost(
        r#"
  - {name: default, match: {path: /d}, route: {cluster: a}}
  - {name: off, match: {path: /off}, route: {cluster: a, timeout: 0s, idle_timeout: 0s}}
  - {name: set, match: {path: /set}, route: {cluster: a, timeout: 2.5s, idle_timeout: 60s, host_rewrite_literal: up.example}}
  - {name: auto, match: {path: /auto}, route: {cluster: a, auto_host_rewrite: true}}
  - {name: noauto, match: {path: /noauto}, route: {cluster: a, auto_host_rewrite: false}}
"#,
    ));
    let get = |p: &str| {
        let r = req("x", p);
        let m = t.route(&r.rr()).expect("route");
        let f = forward(&m);
        (
            f.timeout,
            f.idle_timeout,
            f.host_rewrite_literal().map(str::to_string),
            f.auto_host_rewrite(),
        )
    };
    assert_eq!(get("/d"), (Some(DEFAULT_TIMEOUT), None, None, false));
    assert_eq!(DEFAULT_TIMEOUT, Duration::from_secs(15));
    assert_eq!(get("/off"), (None, Some(Duration::ZERO), None, false));
    assert_eq!(
        get("/set"),
        (
            Some(Duration::from_millis(2500)),
            Some(Duration::from_secs(60)),
            Some("up.example".to_string()),
            false
        )
    );
    assert_eq!(get("/auto"), (Some(DEFAULT_TIMEOUT), None, None, true));
    assert!(!get("/noauto").3);
}

#[test]
fn prefix_rewrites() {
    let t = table(&one_vhost(
        r#"
  - {match: {prefix: /slash/}, route: {cluster: a, prefix_rewrite: /}}
  - {match: {prefix: /noslash}, route: {cluster: a, prefix_rewrite: /}}
  - {match: {prefix: /Ci, case_sensitive: false}, route: {cluster: a, prefix_rewrite: /v2}}
  - {match: {path: /exact}, route: {cluster: a, prefix_rewrite: /other}}
  - {match: {path_separated_prefix: /sep}, route: {cluster: a, prefix_rewrite: /new}}
  - {match: {safe_regex: {regex: "/re/.*"}}, route: {cluster: a, prefix_rewrite: /whole}}
  - {match: {prefix: /plain}, route: {cluster: a}}
"#,
    ));
    let rw = |p: &str| {
        let r = req("x", p);
        t.route(&r.rr()).expect("route").rewrite_path(p)
    };
    assert_eq!(rw("/slash/bar?x=1").as_deref(), Some("/bar?x=1"));
    assert_eq!(rw("/slash/").as_deref(), Some("/"));
    // Envoy's documented pitfall: prefix /noslash rewritten to / leaves a double slash.
    assert_eq!(rw("/noslash/bar").as_deref(), Some("//bar"));
    assert_eq!(rw("/noslash").as_deref(), Some("/"));
    assert_eq!(rw("/noslashes").as_deref(), Some("/es"));
    assert_eq!(rw("/ci/x").as_deref(), Some("/v2/x"));
    assert_eq!(rw("/CI/x").as_deref(), Some("/v2/x"));
    assert_eq!(rw("/exact?q").as_deref(), Some("/other?q"));
    assert_eq!(rw("/sep/a").as_deref(), Some("/new/a"));
    assert_eq!(rw("/sep").as_deref(), Some("/new"));
    assert_eq!(rw("/re/a/b?k=v").as_deref(), Some("/whole?k=v"));
    assert_eq!(rw("/plain/x"), None);
    // A path the route did not match is left alone.
    let r = req("x", "/slash/a");
    let m = t.route(&r.rr()).expect("route");
    assert_eq!(m.rewrite_path("/elsewhere"), None);
}

#[test]
fn regex_rewrites() {
    let t = table(&one_vhost(
        r#"
  - match: {prefix: /service/}
    route:
      cluster: a
      regex_rewrite: {pattern: {regex: "^/service/([^/]+)(/.*)$"}, substitution: '\2/instance/\1'}
  - match: {prefix: /}
    route:
      cluster: a
      regex_rewrite: {pattern: {google_re2: {}, regex: "one"}, substitution: "two"}
"#,
    ));
    let rw = |p: &str| {
        let r = req("x", p);
        t.route(&r.rr()).expect("route").rewrite_path(p)
    };
    assert_eq!(
        rw("/service/foo/v1/api?x=one").as_deref(),
        Some("/v1/api/instance/foo?x=one")
    );
    assert_eq!(
        rw("/xxx/one/yyy/one/zzz?one").as_deref(),
        Some("/xxx/two/yyy/two/zzz?one")
    );
    assert_eq!(rw("/nothing").as_deref(), Some("/nothing"));
}

#[test]
fn rewrite_errors() {
    let r = |route: &str| one_vhost(&format!("  - match: {{prefix: /}}\n    route: {route}\n"));
    assert_error(
        &r(
            "{cluster: a, prefix_rewrite: /x, regex_rewrite: {pattern: {regex: a}, substitution: b}}",
        ),
        "rc.virtual_hosts[0].routes[0].route.prefix_rewrite",
    );
    assert_error(
        &r(r"{cluster: a, regex_rewrite: {pattern: {regex: a}, substitution: '\1'}}"),
        "rc.virtual_hosts[0].routes[0].route.regex_rewrite.substitution",
    );
    assert_error(
        &r("{cluster: a, regex_rewrite: {pattern: {regex: '('}, substitution: b}}"),
        "rc.virtual_hosts[0].routes[0].route.regex_rewrite.pattern.regex",
    );
    assert_error(
        &r("{cluster: a, regex_rewrite: {substitution: b}}"),
        "rc.virtual_hosts[0].routes[0].route.regex_rewrite.pattern",
    );
}

// ---------------------------------------------------------------------------------------
// Redirects and direct responses

const REDIRECTS: &str = r#"
virtual_hosts:
- name: vh
  domains: ["*"]
  routes:
  - {match: {prefix: /https}, redirect: {https_redirect: true}}
  - {match: {prefix: /scheme}, redirect: {scheme_redirect: FTP}}
  - {match: {prefix: /host}, redirect: {host_redirect: new.example.com}}
  - {match: {prefix: /port}, redirect: {port_redirect: 8443, https_redirect: true}}
  - {match: {prefix: /hp}, redirect: {host_redirect: h.example, port_redirect: 81}}
  - {match: {prefix: /path}, redirect: {path_redirect: /new}}
  - {match: {prefix: /qpath}, redirect: {path_redirect: "/new?a=1", strip_query: true}}
  - {match: {prefix: /relpath}, redirect: {path_redirect: "rel"}}
  - {match: {prefix: /strip}, redirect: {strip_query: true}}
  - {match: {prefix: /old/}, redirect: {prefix_rewrite: /new/, strip_query: true}}
  - {match: {prefix: /re/}, redirect: {regex_rewrite: {pattern: {regex: "^/re/(.*)$"}, substitution: '/v2/\1'}}}
  - {match: {prefix: /found}, redirect: {response_code: FOUND}}
  - {match: {prefix: /see}, redirect: {response_code: SEE_OTHER}}
  - {match: {prefix: /temp}, redirect: {response_code: TEMPORARY_REDIRECT}}
  - {match: {prefix: /perm}, redirect: {response_code: PERMANENT_REDIRECT}}
  - {match: {prefix: /fwd}, route: {cluster: a}}
"#;

fn redirect(t: &RouteTable, r: &Req) -> (u16, String) {
    let m = t.route(&r.rr()).expect("route");
    let (s, l) = m.redirect(&r.rr()).expect("redirect");
    (s.as_u16(), l)
}

#[test]
fn redirect_fields() {
    let t = table(REDIRECTS);
    let rd = |a: &str, p: &str| redirect(&t, &req(a, p));
    assert_eq!(
        rd("a.com", "/https/x?q=1"),
        (301, "https://a.com/https/x?q=1".into())
    );
    // Default port of the old scheme is dropped, other ports kept.
    assert_eq!(
        rd("a.com:80", "/https"),
        (301, "https://a.com/https".into())
    );
    assert_eq!(
        rd("a.com:8080", "/https"),
        (301, "https://a.com:8080/https".into())
    );
    assert_eq!(rd("a.com", "/scheme"), (301, "ftp://a.com/scheme".into()));
    assert_eq!(
        rd("a.com:9", "/host/p?q"),
        (301, "http://new.example.com/host/p?q".into())
    );
    assert_eq!(
        rd("a.com:8080", "/port/x"),
        (301, "https://a.com:8443/port/x".into())
    );
    assert_eq!(
        rd("[::1]:8080", "/port"),
        (301, "https://[::1]:8443/port".into())
    );
    assert_eq!(rd("a.com", "/hp"), (301, "http://h.example:81/hp".into()));
    // path_redirect keeps the request's query unless it has its own.
    assert_eq!(
        rd("a.com", "/path/x?q=1"),
        (301, "http://a.com/new?q=1".into())
    );
    assert_eq!(rd("a.com", "/path"), (301, "http://a.com/new".into()));
    assert_eq!(
        rd("a.com", "/qpath?q=1"),
        (301, "http://a.com/new?a=1".into())
    );
    assert_eq!(rd("a.com", "/relpath"), (301, "http://a.com/rel".into()));
    assert_eq!(
        rd("a.com", "/strip/x?q=1&r"),
        (301, "http://a.com/strip/x".into())
    );
    assert_eq!(
        rd("a.com", "/old/a/b?q"),
        (301, "http://a.com/new/a/b".into())
    );
    assert_eq!(
        rd("a.com", "/re/a/b?q"),
        (301, "http://a.com/v2/a/b?q".into())
    );
    assert_eq!(rd("a.com", "/found").0, 302);
    assert_eq!(rd("a.com", "/see").0, 303);
    assert_eq!(rd("a.com", "/temp").0, 307);
    assert_eq!(rd("a.com", "/perm").0, 308);
    // https requests: :443 is dropped when going to http, kept otherwise.
    let r = req("a.com:443", "/https").scheme("https");
    assert_eq!(redirect(&t, &r), (301, "https://a.com:443/https".into()));
    let r = req("a.com:443", "/scheme").scheme("https");
    assert_eq!(redirect(&t, &r), (301, "ftp://a.com/scheme".into()));
    // Not a redirect route.
    let r = req("a.com", "/fwd");
    assert!(t.route(&r.rr()).expect("route").redirect(&r.rr()).is_none());
    let m = t.route(&req("a.com", "/https").rr()).expect("route");
    assert!(
        matches!(m.action(), RouteAction::Redirect(r) if r.status() == StatusCode::MOVED_PERMANENTLY)
    );
    assert_eq!(m.rewrite_path("/https"), None);
}

#[test]
fn redirect_errors() {
    let r = |redirect: &str| {
        one_vhost(&format!(
            "  - match: {{prefix: /}}\n    redirect: {redirect}\n"
        ))
    };
    let p = "rc.virtual_hosts[0].routes[0].redirect";
    assert_error(&r("{port_redirect: 70000}"), &format!("{p}.port_redirect"));
    assert_error(
        &r("{scheme_redirect: 'ht tp'}"),
        &format!("{p}.scheme_redirect"),
    );
    assert_error(&r("{host_redirect: 'a b'}"), &format!("{p}.host_redirect"));
    assert_error(
        &r("{host_redirect: 'a:1', port_redirect: 2}"),
        &format!("{p}.host_redirect"),
    );
    assert_error(&r("{path_redirect: '/a b'}"), &format!("{p}.path_redirect"));
    assert_error(&r("{path_rewrite: /x}"), &format!("{p}.path_rewrite"));
}

#[test]
fn direct_responses() {
    let dir = std::env::temp_dir().join(format!("weir-route-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let small = dir.join("small.txt");
    std::fs::write(&small, b"from file").expect("write");
    let big = dir.join("big.txt");
    std::fs::write(&big, vec![b'x'; 4097]).expect("write");
    let y = one_vhost(&format!(
        r#"
  - {{name: s, match: {{path: /s}}, direct_response: {{status: 200, body: {{inline_string: hello}}}}}}
  - {{name: b, match: {{path: /b}}, direct_response: {{status: 503, body: {{inline_bytes: aGVsbG8=}}}}}}
  - {{name: f, match: {{path: /f}}, direct_response: {{status: 404, body: {{filename: "{}"}}}}}}
  - {{name: n, match: {{path: /n}}, direct_response: {{status: 204}}}}
"#,
        small.display()
    ));
    let t = table(&y);
    let dr = |p: &str| {
        let r = req("x", p);
        match t.route(&r.rr()).expect("route").action() {
            RouteAction::Direct(d) => (d.status.as_u16(), d.body.clone()),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(dr("/s"), (200, Some(bytes::Bytes::from_static(b"hello"))));
    assert_eq!(dr("/b"), (503, Some(bytes::Bytes::from_static(b"hello"))));
    assert_eq!(
        dr("/f"),
        (404, Some(bytes::Bytes::from_static(b"from file")))
    );
    assert_eq!(dr("/n"), (204, None));

    let d = |body: &str| {
        one_vhost(&format!(
            "  - match: {{prefix: /}}\n    direct_response: {body}\n"
        ))
    };
    let p = "rc.virtual_hosts[0].routes[0].direct_response";
    assert_error(&d("{status: 600}"), &format!("{p}.status"));
    assert_error(&d("{status: 99}"), &format!("{p}.status"));
    assert!(error_paths(&d("{status: 100}")).is_empty());
    assert!(error_paths(&d("{status: 599}")).is_empty());
    let long = "y".repeat(4097);
    assert_error(
        &d(&format!("{{status: 200, body: {{inline_string: {long}}}}}")),
        &format!("{p}.body.inline_string"),
    );
    assert!(
        error_paths(&d(&format!(
            "{{status: 200, body: {{inline_string: {}}}}}",
            &long[1..]
        )))
        .is_empty()
    );
    assert_error(
        &d(&format!(
            "{{status: 200, body: {{filename: \"{}\"}}}}",
            big.display()
        )),
        &format!("{p}.body.filename"),
    );
    assert_error(
        &d("{status: 200, body: {filename: /nonexistent/weir/body}}"),
        &format!("{p}.body.filename"),
    );
    assert_error(
        &d("{status: 200, body: {environment_variable: HOME}}"),
        &format!("{p}.body.environment_variable"),
    );
    // The limit is configurable as in Envoy.
    let raised = format!(
        "max_direct_response_body_size_bytes: 5000\n{}",
        d(&format!(
            "{{status: 200, body: {{filename: \"{}\"}}}}",
            big.display()
        ))
    );
    assert!(error_paths(&raised).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Header mutations

const HEADERS: &str = r#"
request_headers_to_add:
- header: {key: x-level, value: table}
- header: {key: x-ow, value: table}
  append_action: OVERWRITE_IF_EXISTS_OR_ADD
request_headers_to_remove: [x-remove-table]
response_headers_to_add:
- header: {key: x-resp, value: table}
response_headers_to_remove: [server]
virtual_hosts:
- name: vh
  domains: ["*"]
  request_headers_to_add:
  - header: {key: x-level, value: vhost}
  - header: {key: x-ow, value: vhost}
    append: false
  request_headers_to_remove: [x-route-added]
  response_headers_to_add:
  - header: {key: x-resp, value: vhost}
  routes:
  - name: r
    match: {prefix: /}
    route: {cluster: a}
    request_headers_to_add:
    - header: {key: x-level, value: route}
    - header: {key: x-ow, value: route}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-route-added, value: gone}
    - header: {key: X-Remove-Table, value: kept-then-removed}
    response_headers_to_add:
    - header: {key: x-resp, value: route}
"#;

#[test]
fn header_mutation_order() {
    let t = table(HEADERS);
    let r = req("x", "/");
    let m = t.route(&r.rr()).expect("route");
    let mut h = HeaderMap::new();
    h.insert("x-ow", HeaderValue::from_static("client"));
    h.insert("x-remove-table", HeaderValue::from_static("client"));
    m.apply_request_headers(&mut h, &hctx());
    assert_eq!(values(&h, "x-level"), ["route", "vhost", "table"]);
    // Least specific overwrite wins by default.
    assert_eq!(values(&h, "x-ow"), ["table"]);
    // A less specific level's removal sees what a more specific level added.
    assert!(h.get("x-route-added").is_none());
    assert!(h.get("x-remove-table").is_none());

    let mut h = HeaderMap::new();
    h.insert("server", HeaderValue::from_static("upstream"));
    m.apply_response_headers(&mut h, &hctx());
    assert_eq!(values(&h, "x-resp"), ["route", "vhost", "table"]);
    assert!(h.get("server").is_none());
}

#[test]
fn most_specific_header_mutations_wins() {
    let t = table(&format!(
        "most_specific_header_mutations_wins: true\n{HEADERS}"
    ));
    let r = req("x", "/");
    let m = t.route(&r.rr()).expect("route");
    let mut h = HeaderMap::new();
    m.apply_request_headers(&mut h, &hctx());
    assert_eq!(values(&h, "x-level"), ["table", "vhost", "route"]);
    assert_eq!(values(&h, "x-ow"), ["route"]);
    // The vhost removal now runs before the route adds.
    assert_eq!(values(&h, "x-route-added"), ["gone"]);
}

fn apply_route_headers(adds: &str, start: &[(&'static str, &'static str)]) -> HeaderMap {
    let t = table(&one_vhost(&format!(
        "  - match: {{prefix: /}}\n    route: {{cluster: a}}\n    request_headers_to_add:\n{adds}"
    )));
    let r = req("x", "/");
    let m = t.route(&r.rr()).expect("route");
    let mut h = HeaderMap::new();
    for (k, v) in start {
        h.append(*k, HeaderValue::from_static(v));
    }
    m.apply_request_headers(&mut h, &hctx());
    h
}

#[test]
fn append_actions() {
    let adds = r#"
    - header: {key: x-append, value: new}
    - header: {key: x-absent, value: new}
      append_action: ADD_IF_ABSENT
    - header: {key: x-absent-missing, value: new}
      append_action: ADD_IF_ABSENT
    - header: {key: x-ow, value: new}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-ow-missing, value: new}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-owie, value: new}
      append_action: OVERWRITE_IF_EXISTS
    - header: {key: x-owie-missing, value: new}
      append_action: OVERWRITE_IF_EXISTS
    - header: {key: x-legacy-true, value: new}
      append: true
    - header: {key: x-legacy-false, value: new}
      append: false
"#;
    let h = apply_route_headers(
        adds,
        &[
            ("x-append", "old"),
            ("x-absent", "old"),
            ("x-ow", "old1"),
            ("x-ow", "old2"),
            ("x-owie", "old"),
            ("x-legacy-true", "old"),
            ("x-legacy-false", "old"),
        ],
    );
    assert_eq!(values(&h, "x-append"), ["old", "new"]);
    assert_eq!(values(&h, "x-absent"), ["old"]);
    assert_eq!(values(&h, "x-absent-missing"), ["new"]);
    assert_eq!(values(&h, "x-ow"), ["new"]);
    assert_eq!(values(&h, "x-ow-missing"), ["new"]);
    assert_eq!(values(&h, "x-owie"), ["new"]);
    assert!(values(&h, "x-owie-missing").is_empty());
    assert_eq!(values(&h, "x-legacy-true"), ["old", "new"]);
    assert_eq!(values(&h, "x-legacy-false"), ["new"]);
}

#[test]
fn one_level_is_decided_against_its_starting_headers() {
    // Envoy: overwrites are set first, then appends added, and conditions see the headers
    // as they were before the level.
    let adds = r#"
    - header: {key: x-h, value: appended}
    - header: {key: x-h, value: overwritten}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-i, value: one}
      append_action: ADD_IF_ABSENT
    - header: {key: x-i, value: two}
      append_action: ADD_IF_ABSENT
    - header: {key: x-j, value: set}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    - header: {key: x-j, value: only-if-existed}
      append_action: OVERWRITE_IF_EXISTS
"#;
    let h = apply_route_headers(adds, &[]);
    assert_eq!(values(&h, "x-h"), ["overwritten", "appended"]);
    assert_eq!(values(&h, "x-i"), ["one", "two"]);
    assert_eq!(values(&h, "x-j"), ["set"]);
}

#[test]
fn empty_values() {
    let adds = r#"
    - header: {key: x-empty, value: ""}
    - header: {key: x-keep, value: ""}
      keep_empty_value: true
    - header: {key: x-empty-ow, value: ""}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
"#;
    let h = apply_route_headers(adds, &[("x-empty-ow", "old")]);
    assert!(h.get("x-empty").is_none());
    assert_eq!(values(&h, "x-keep"), [""]);
    // An empty value that is not kept does nothing at all.
    assert_eq!(values(&h, "x-empty-ow"), ["old"]);
}

#[test]
fn command_operators() {
    let adds = r#"
    - header: {key: x-remote, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}
    - header: {key: x-remote-ip, value: "ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    - header: {key: x-local, value: "%DOWNSTREAM_LOCAL_ADDRESS%"}
    - header: {key: x-local-ip, value: "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"}
    - header: {key: x-proto, value: "%PROTOCOL%"}
    - header: {key: x-percent, value: "100%% sure"}
"#;
    let h = apply_route_headers(adds, &[]);
    assert_eq!(values(&h, "x-remote"), ["10.0.0.1:1234"]);
    assert_eq!(values(&h, "x-remote-ip"), ["ip=10.0.0.1"]);
    assert_eq!(values(&h, "x-local"), ["192.168.1.2:8080"]);
    assert_eq!(values(&h, "x-local-ip"), ["192.168.1.2"]);
    assert_eq!(values(&h, "x-proto"), ["HTTP/1.1"]);
    assert_eq!(values(&h, "x-percent"), ["100% sure"]);

    let t = table(&one_vhost(
        "  - match: {prefix: /}\n    route: {cluster: a}\n    request_headers_to_add:\n    - header: {key: x-r, value: '%DOWNSTREAM_REMOTE_ADDRESS%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|%PROTOCOL%'}\n",
    ));
    let r = req("x", "/");
    let m = t.route(&r.rr()).expect("route");
    let mut h = HeaderMap::new();
    let ctx = HeaderContext {
        downstream_remote: "[2001:db8::1]:443".parse::<SocketAddr>().expect("addr"),
        downstream_local: "[::1]:80".parse().expect("addr"),
        protocol: "HTTP/2",
    };
    m.apply_request_headers(&mut h, &ctx);
    assert_eq!(values(&h, "x-r"), ["[2001:db8::1]:443|2001:db8::1|HTTP/2"]);
}

#[test]
fn header_mutation_errors() {
    let v = |adds: &str| {
        one_vhost(&format!(
            "  - match: {{prefix: /}}\n    route: {{cluster: a}}\n    request_headers_to_add:\n{adds}"
        ))
    };
    let p = "rc.virtual_hosts[0].routes[0].request_headers_to_add[0]";
    assert_error(
        &v("    - header: {key: 'bad name', value: v}\n"),
        &format!("{p}.header.key"),
    );
    assert_error(
        &v("    - header: {key: ':path', value: v}\n"),
        &format!("{p}.header.key"),
    );
    assert_error(
        &v("    - header: {key: Host, value: v}\n"),
        &format!("{p}.header.key"),
    );
    assert_error(
        &v("    - header: {key: x, value: \"a\\nb\"}\n"),
        &format!("{p}.header.value"),
    );
    assert_error(
        &v("    - header: {key: x, value: '%UPSTREAM_CLUSTER%'}\n"),
        &format!("{p}.header.value"),
    );
    assert_error(
        &v("    - header: {key: x, value: '50%'}\n"),
        &format!("{p}.header.value"),
    );
    assert_error(
        &v("    - header: {key: x, raw_value: YQ==}\n"),
        &format!("{p}.header.raw_value"),
    );
    assert_error(
        &v("    - {append_action: ADD_IF_ABSENT}\n"),
        &format!("{p}.header"),
    );
    assert_error(
        &v(
            "    - header: {key: x, value: v}\n      append: true\n      append_action: OVERWRITE_IF_EXISTS\n",
        ),
        &format!("{p}.append"),
    );
    assert_error(
        "request_headers_to_remove: [ok, host]\n",
        "rc.request_headers_to_remove[1]",
    );
    assert_error(
        "virtual_hosts:\n- {name: v, domains: [a], response_headers_to_remove: [':status']}\n",
        "rc.virtual_hosts[0].response_headers_to_remove[0]",
    );
    assert_error(
        "response_headers_to_add: [{header: {key: 'x y', value: v}}]\n",
        "rc.response_headers_to_add[0].header.key",
    );
}

// ---------------------------------------------------------------------------------------
// Translation errors with field paths

#[test]
fn unsupported_route_fields_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            "{match: {prefix: /, tls_context: {presented: true}}, route: {cluster: a}}",
            "rc.virtual_hosts[0].routes[0].match.tls_context",
        ),
        (
            "{match: {prefix: /, runtime_fraction: {default_value: {numerator: 1}, runtime_key: k}}, route: {cluster: a}}",
            "rc.virtual_hosts[0].routes[0].match.runtime_fraction",
        ),
        (
            "{match: {prefix: /, cookies: [{name: c, string_match: {exact: v}}]}, route: {cluster: a}}",
            "rc.virtual_hosts[0].routes[0].match.cookies",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, retry_policy: {retry_on: 5xx, retry_priority: {name: p}}}}",
            "rc.virtual_hosts[0].routes[0].route.retry_policy.retry_priority",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, hash_policy: [{filter_state: {key: x}}]}}",
            "rc.virtual_hosts[0].routes[0].route.hash_policy[0].filter_state",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, cluster_not_found_response_code: NOT_FOUND}}",
            "rc.virtual_hosts[0].routes[0].route.cluster_not_found_response_code",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, host_rewrite_header: x-host}}",
            "rc.virtual_hosts[0].routes[0].route.host_rewrite_header",
        ),
        (
            "{match: {prefix: /}, route: {cluster_specifier_plugin: p}}",
            "rc.virtual_hosts[0].routes[0].route.cluster_specifier_plugin",
        ),
        (
            "{match: {prefix: /}, non_forwarding_action: {}}",
            "rc.virtual_hosts[0].routes[0].non_forwarding_action",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a}, tracing: {random_sampling: {numerator: 1}}}",
            "rc.virtual_hosts[0].routes[0].tracing",
        ),
        (
            "{match: {prefix: /}, route: {cluster: a}, typed_per_filter_config: {envoy.filters.http.router: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}",
            "rc.virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.router]",
        ),
        (
            "{match: {prefix: /, headers: [{name: x, range_match: {start: 1, end: 5}}]}, route: {cluster: a}}",
            "rc.virtual_hosts[0].routes[0].match.headers[0].range_match",
        ),
        (
            "{match: {prefix: /}, direct_response: {status: 200, body_format: {text_format: x}}}",
            "rc.virtual_hosts[0].routes[0].direct_response.body_format",
        ),
    ];
    for (route, path) in cases {
        assert_error(&one_vhost(&format!("  - {route}\n")), path);
    }
    // An empty typed_per_filter_config is fine.
    assert!(
        error_paths(&one_vhost(
            "  - {match: {prefix: /}, route: {cluster: a}, typed_per_filter_config: {}}\n"
        ))
        .is_empty()
    );
}

#[test]
fn invalid_matchers_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            "{safe_regex: {regex: '(unclosed'}}",
            "match.safe_regex.regex",
        ),
        ("{safe_regex: {regex: ''}}", "match.safe_regex.regex"),
        // Too big a program: rejected instead of compiled.
        (
            "{safe_regex: {regex: '(((a{100}){100}){100})'}}",
            "match.safe_regex.regex",
        ),
        (
            "{path_separated_prefix: /a/}",
            "match.path_separated_prefix",
        ),
        (
            "{path_separated_prefix: '/a?b'}",
            "match.path_separated_prefix",
        ),
        ("{case_sensitive: true}", "match"),
        (
            "{prefix: /, headers: [{name: 'bad name', present_match: true}]}",
            "match.headers[0].name",
        ),
        (
            "{prefix: /, headers: [{present_match: true}]}",
            "match.headers[0].name",
        ),
        (
            "{prefix: /, headers: [{name: x, string_match: {contains: ''}}]}",
            "match.headers[0].string_match.contains",
        ),
        (
            "{prefix: /, headers: [{name: x, string_match: {}}]}",
            "match.headers[0].string_match",
        ),
        (
            "{prefix: /, headers: [{name: x, string_match: {safe_regex: {regex: a}, ignore_case: true}}]}",
            "match.headers[0].string_match.ignore_case",
        ),
        (
            "{prefix: /, headers: [{name: x, prefix_match: ''}]}",
            "match.headers[0].prefix_match",
        ),
        (
            "{prefix: /, query_parameters: [{name: q, string_match: {safe_regex: {regex: '['}}}]}",
            "match.query_parameters[0].string_match.safe_regex.regex",
        ),
        (
            "{prefix: /, query_parameters: [{present_match: true}]}",
            "match.query_parameters[0].name",
        ),
    ];
    for (m, path) in cases {
        let y = one_vhost(&format!("  - {{match: {m}, route: {{cluster: a}}}}\n"));
        assert_error(&y, &format!("rc.virtual_hosts[0].routes[0].{path}"));
    }
}

#[test]
fn unbalanced_regex_is_not_reinterpreted() {
    // `a)|(b` must not become `\A(?:a)|(b)\z`.
    let y = one_vhost("  - {match: {safe_regex: {regex: 'a)|(b'}}, route: {cluster: a}}\n");
    assert_eq!(
        error_paths(&y),
        vec!["rc.virtual_hosts[0].routes[0].match.safe_regex.regex"]
    );
}

#[test]
fn route_structure_errors() {
    assert_error(
        &one_vhost("  - {route: {cluster: a}}\n"),
        "rc.virtual_hosts[0].routes[0].match",
    );
    assert_error(
        &one_vhost("  - {match: {prefix: /}}\n"),
        "rc.virtual_hosts[0].routes[0]",
    );
    assert_error(
        &one_vhost("  - {match: {prefix: /}, route: {}}\n"),
        "rc.virtual_hosts[0].routes[0].route",
    );
    assert_error(
        &one_vhost("  - {match: {prefix: /}, route: {cluster: ''}}\n"),
        "rc.virtual_hosts[0].routes[0].route.cluster",
    );
    assert_error(
        &one_vhost("  - {match: {prefix: /}, route: {cluster_header: 'bad header'}}\n"),
        "rc.virtual_hosts[0].routes[0].route.cluster_header",
    );
    assert_error(
        &one_vhost("  - {match: {prefix: /}, route: {cluster: a, timeout: -1s}}\n"),
        "rc.virtual_hosts[0].routes[0].route.timeout",
    );
    assert_error(
        &one_vhost(
            "  - {match: {prefix: /}, route: {cluster: a, host_rewrite_literal: \"a\\nb\"}}\n",
        ),
        "rc.virtual_hosts[0].routes[0].route.host_rewrite_literal",
    );
    // Errors are collected across the whole table.
    let y = r#"
internal_only_headers: [x]
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - {match: {prefix: /}, route: {cluster: zz}}
  - {match: {safe_regex: {regex: "("}}, route: {cluster: a}}
"#;
    assert_eq!(
        error_paths(y),
        vec![
            "rc.internal_only_headers",
            "rc.virtual_hosts[0].routes[0].route.cluster",
            "rc.virtual_hosts[0].routes[1].match.safe_regex.regex",
        ]
    );
}

#[test]
fn error_messages_are_useful() {
    let (_, e) = translate_with(
        &one_vhost("  - {match: {prefix: /}, route: {cluster: nope}}\n"),
        CLUSTERS,
    );
    assert!(e[0].1.contains("\"nope\""), "{e:?}");
    let (_, e) = translate_with(
        &one_vhost("  - {match: {prefix: /}, route: {cluster: a, internal_redirect_policy: {}}}\n"),
        CLUSTERS,
    );
    assert!(e[0].1.contains("not supported"), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// CONNECT: connect_matcher and route upgrade_configs

const TERMINATE: &str = "upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]";

#[test]
fn connect_matcher_matches_only_connect() {
    let t = table(&one_vhost(&format!(
        "  - {{name: tunnel, match: {{connect_matcher: {{}}}}, route: {{cluster: a, {TERMINATE}}}}}\n  \
         - {{name: web, match: {{prefix: /}}, route: {{cluster: b}}}}\n"
    )));
    let c = req("echo.internal:443", "").method(Method::CONNECT);
    assert_eq!(hit(&t, &c).as_deref(), Some("vh/tunnel"));
    let m = t.route(&c.rr()).expect("match");
    assert!(forward(&m).connect_terminate());
    assert_eq!(m.rewrite_path(""), None);
    // Other methods never match connect_matcher, whatever the path.
    for r in [req("h", "/"), req("h", "/x").method(Method::POST)] {
        assert_eq!(hit(&t, &r).as_deref(), Some("vh/web"), "{:?}", r.method);
    }
    let get = req("h", "/");
    assert!(!forward(&t.route(&get.rr()).expect("match")).connect_terminate());
    // CONNECT never matches path matchers (prefix "" or "/" included).
    let t = table(&one_vhost(
        "  - {name: p, match: {prefix: ''}, route: {cluster: b}}\n  \
         - {name: s, match: {safe_regex: {regex: '.*'}}, route: {cluster: b}}\n",
    ));
    assert_eq!(hit(&t, &c), None);
    assert_eq!(
        hit(&t, &req("echo.internal:443", "/").method(Method::CONNECT)),
        None
    );
}

#[test]
fn connect_uses_authority_for_domains_and_headers_still_apply() {
    let t = table(&format!(
        "virtual_hosts:\n\
         - name: proxy\n  domains: ['echo.internal:443']\n  routes:\n  \
         - {{name: t, match: {{connect_matcher: {{}}, headers: [{{name: x-tunnel, present_match: true}}]}}, route: {{cluster: a, {TERMINATE}}}}}\n\
         - name: other\n  domains: ['*']\n  routes:\n  \
         - {{name: deny, match: {{connect_matcher: {{}}}}, direct_response: {{status: 403}}}}\n"
    ));
    let c = req("echo.internal:443", "")
        .method(Method::CONNECT)
        .header("x-tunnel", "1");
    assert_eq!(hit(&t, &c).as_deref(), Some("proxy/t"));
    let no_header = req("echo.internal:443", "").method(Method::CONNECT);
    assert_eq!(hit(&t, &no_header), None);
    let elsewhere = req("other.internal:443", "").method(Method::CONNECT);
    assert_eq!(hit(&t, &elsewhere).as_deref(), Some("other/deny"));
}

#[test]
fn connect_upgrade_config_translation() {
    let ok = |routes: &str| {
        let e = error_paths(&one_vhost(routes));
        assert!(e.is_empty(), "{routes}: {e:?}");
    };
    // CONNECT enabled on a path route: valid (such a route never sees CONNECT).
    ok(&format!(
        "  - {{match: {{prefix: /}}, route: {{cluster: a, {TERMINATE}}}}}\n"
    ));
    ok(
        "  - {match: {prefix: /}, route: {cluster: a, upgrade_configs: [{upgrade_type: connect, enabled: false}]}}\n",
    );
    // A connect_matcher route may answer locally.
    ok("  - {match: {connect_matcher: {}}, direct_response: {status: 403}}\n");
    ok("  - {match: {connect_matcher: {}}, redirect: {host_redirect: x}}\n");

    let r = "rc.virtual_hosts[0].routes[0]";
    let cases: &[(&str, String)] = &[
        // Forwarding CONNECT to an upstream proxy is not supported.
        (
            "{match: {connect_matcher: {}}, route: {cluster: a}}",
            format!("{r}.route.upgrade_configs"),
        ),
        (
            "{match: {connect_matcher: {}}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT}]}}",
            format!("{r}.route.upgrade_configs[0].connect_config"),
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT}]}}",
            format!("{r}.route.upgrade_configs[0].connect_config"),
        ),
        // Disabled on a connect_matcher route: nothing would handle the CONNECT.
        (
            "{match: {connect_matcher: {}}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT, enabled: false, connect_config: {}}]}}",
            format!("{r}.route.upgrade_configs"),
        ),
        (
            "{match: {prefix: /}, route: {cluster: a, upgrade_configs: [{upgrade_type: websocket}]}}",
            format!("{r}.route.upgrade_configs[0].upgrade_type"),
        ),
        (
            "{match: {connect_matcher: {}}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {allow_post: true}}]}}",
            format!("{r}.route.upgrade_configs[0].connect_config.allow_post"),
        ),
        (
            "{match: {connect_matcher: {}}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {proxy_protocol_config: {version: V2}}}]}}",
            format!("{r}.route.upgrade_configs[0].connect_config.proxy_protocol_config"),
        ),
        (
            "{match: {connect_matcher: {}}, route: {cluster: a, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}, {upgrade_type: CONNECT, connect_config: {}}]}}",
            format!("{r}.route.upgrade_configs[1].upgrade_type"),
        ),
    ];
    for (route, path) in cases {
        assert_error(&one_vhost(&format!("  - {route}\n")), path);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP filter data: typed_per_filter_config and rate_limits

const LRL: &str =
    "'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

#[test]
fn per_filter_configs_and_rate_limits_reach_filters() {
    let t = table(&format!(
        "virtual_hosts:\n- name: vh\n  domains: ['*']\n  \
         typed_per_filter_config:\n    rl: {{{LRL}, stat_prefix: vh, token_bucket: {{max_tokens: 1, fill_interval: 1s}}}}\n  \
         rate_limits: [{{actions: [{{remote_address: {{}}}}]}}]\n  routes:\n  \
         - match: {{prefix: /r}}\n    route: {{cluster: a, include_vh_rate_limits: true, rate_limits: [{{actions: [{{generic_key: {{descriptor_value: x}}}}]}}, {{actions: [{{request_headers: {{header_name: x-user, descriptor_key: user}}}}]}}]}}\n    \
         typed_per_filter_config:\n      rl: {{{LRL}, stat_prefix: r, token_bucket: {{max_tokens: 2, fill_interval: 1s}}}}\n      \
         fault: {{'@type': type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true}}\n  \
         - match: {{prefix: /}}\n    direct_response: {{status: 200}}\n"
    ));
    let r = req("x", "/r");
    let m = t.route(&r.rr()).expect("route");
    let v = m.filter_view();
    assert_eq!(v.route_rate_limits.len(), 2);
    assert!(v.include_vh_rate_limits);
    assert_eq!(v.vhost.rate_limits.len(), 1);
    assert!(matches!(
        v.per_filter("rl"),
        Some(weir_filters::PerFilterConfig::Config(_))
    ));
    assert!(matches!(
        v.per_filter("fault"),
        Some(weir_filters::PerFilterConfig::Disabled)
    ));
    // The route's config is more specific than the virtual host's: they differ.
    let Some(weir_filters::PerFilterConfig::Config(route_cfg)) = v.route.per_filter.get("rl")
    else {
        panic!("route config");
    };
    let Some(weir_filters::PerFilterConfig::Config(vh_cfg)) = v.vhost.per_filter.get("rl") else {
        panic!("vhost config");
    };
    assert!(!std::sync::Arc::ptr_eq(route_cfg, vh_cfg));
    // A direct response route has no rate limits of its own; the vhost config applies.
    let r = req("x", "/other");
    let v = t.route(&r.rr()).expect("route").filter_view();
    assert!(v.route_rate_limits.is_empty());
    assert!(matches!(
        v.per_filter("rl"),
        Some(weir_filters::PerFilterConfig::Config(_))
    ));
}

#[test]
fn per_filter_config_errors_have_paths() {
    let base = "virtual_hosts:\n- name: vh\n  domains: ['*']\n";
    let route = "  routes:\n  - match: {prefix: /}\n    route: {cluster: a}\n";
    // Unknown filter type; an optional one is skipped.
    assert_error(
        &format!(
            "{base}  typed_per_filter_config:\n    x: {{'@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy}}\n{route}"
        ),
        "rc.virtual_hosts[0].typed_per_filter_config[x]",
    );
    assert!(error_paths(&format!(
        "{base}  typed_per_filter_config:\n    x: {{'@type': type.googleapis.com/envoy.config.route.v3.FilterConfig, is_optional: true, config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy}}}}\n{route}"
    ))
    .is_empty());
    // A per-route local rate limit needs a token bucket; errors point inside the config.
    assert_error(
        &format!("{base}  typed_per_filter_config:\n    rl: {{{LRL}, stat_prefix: p}}\n{route}"),
        "rc.virtual_hosts[0].typed_per_filter_config[rl].token_bucket",
    );
    // Rate limit actions.
    assert_error(
        &format!("{base}  rate_limits: [{{actions: [{{destination_cluster: {{}}}}]}}]\n{route}"),
        "rc.virtual_hosts[0].rate_limits[0].actions[0]",
    );
    assert_error(
        &one_vhost(
            "  - {match: {prefix: /}, route: {cluster: a, rate_limits: [{actions: [{header_value_match: {descriptor_value: v, headers: [{name: x, range_match: {start: 1, end: 2}}]}}], limit: {}}]}}\n",
        ),
        "rc.virtual_hosts[0].routes[0].route.rate_limits[0].actions[0].header_value_match.headers[0].range_match",
    );
    assert_error(
        &one_vhost(
            "  - {match: {prefix: /}, route: {cluster: a, rate_limits: [{actions: [{generic_key: {descriptor_value: v}}], limit: {}}]}}\n",
        ),
        "rc.virtual_hosts[0].routes[0].route.rate_limits[0].limit",
    );
}

#[test]
fn decorator_translates_and_is_checked() {
    let t = table(&one_vhost(
        "  - match: {prefix: /a}\n    route: {cluster: a}\n    decorator: {operation: checkout}\n  - match: {prefix: /}\n    route: {cluster: a}\n    decorator: {operation: quiet, propagate: false}\n",
    ));
    let r = req("x", "/a");
    let m = t.route(&r.rr()).expect("route");
    let d = m.decorator().expect("decorator");
    assert_eq!(&*d.operation, "checkout");
    assert!(d.propagate, "propagate defaults to true");
    assert_eq!(d.header, "checkout");
    let r = req("x", "/b");
    let d = t
        .route(&r.rr())
        .expect("route")
        .decorator()
        .expect("decorator");
    assert!(!d.propagate);
    assert_error(
        &one_vhost(
            "  - match: {prefix: /}\n    route: {cluster: a}\n    decorator: {operation: ''}\n",
        ),
        "rc.virtual_hosts[0].routes[0].decorator.operation",
    );
    assert_error(
        &one_vhost(
            "  - match: {prefix: /}\n    route: {cluster: a}\n    decorator: {operation: \"a\\nb\"}\n",
        ),
        "rc.virtual_hosts[0].routes[0].decorator.operation",
    );
}
