//! Route `hash_policy` (Envoy's `HashPolicyImpl`): the request hash that RING_HASH and MAGLEV
//! clusters use to pick a host.
//!
//! Each policy yields an optional 64-bit xxHash:
//! - `header`: the named request header; several values are sorted and hashed as their
//!   concatenation (so their order does not matter).
//! - `cookie`: the named cookie's value (surrounding quotes removed). When the cookie is absent
//!   and `ttl` is set, a value is generated (16 hex digits), hashed, and returned as a
//!   `Set-Cookie` for the router to add to the response:
//!   `name="value"; Max-Age=<ttl s>; Path=<path>; <attributes>; HttpOnly` (no `Max-Age` when
//!   `ttl` is 0, a session cookie).
//! - `connection_properties.source_ip`: the downstream remote IP as text (`10.0.0.1`, `::1`).
//! - `query_parameter`: the first value of the named parameter (not percent-decoded, as Envoy).
//!
//! Policies are evaluated in order and combined as Envoy does:
//! `hash = rotate_left(hash, 1) ^ new` (a first hash is taken as is). A `terminal` policy that
//! produced a hash (alone or combined with the earlier ones) stops the evaluation.
//!
//! Rejected: `header.regex_rewrite`, pseudo-header names, `filter_state`.
//!
//! Deviation: Envoy derives a generated cookie from the connection's remote and local
//! addresses; weir hashes the remote IP with the current time and a per-process random value,
//! so each client that arrives without the cookie gets its own value.

use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use weir_filters::config::cookie_value;
use weir_xds_api::pb::envoy::config::route::v3::route_action::{
    HashPolicy as PbHashPolicy, hash_policy::PolicySpecifier as P,
};

use crate::config::{Errors, duration, join};
use crate::upstream::lb::xxhash::xxhash64;

/// What [`HashPolicy::evaluate`] (via `ForwardAction::hash`) produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashOutcome {
    /// The request hash, if any policy produced one.
    pub hash: Option<u64>,
    /// A `Set-Cookie` value to add to the response (a cookie policy generated the cookie).
    pub set_cookie: Option<HeaderValue>,
}

#[derive(Debug)]
enum Method {
    Header(HeaderName),
    Cookie {
        name: Box<str>,
        ttl: Option<Duration>,
        path: Box<str>,
        attributes: Vec<(Box<str>, Box<str>)>,
    },
    SourceIp,
    QueryParameter(Box<str>),
}

#[derive(Debug)]
struct Entry {
    method: Method,
    terminal: bool,
}

/// A route's compiled `hash_policy` list.
#[derive(Debug, Default)]
pub struct HashPolicy {
    entries: Vec<Entry>,
}

impl HashPolicy {
    /// Some cookie policy may generate a cookie (it has a `ttl`): only then does evaluation
    /// need a random nonce.
    pub fn generates_cookies(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.method, Method::Cookie { ttl: Some(_), .. }))
    }
}

/// A cookie name or attribute token (RFC 6265 `token`).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl HashPolicy {
    /// Translate `RouteAction.hash_policy` at `path` (`...route.hash_policy`).
    pub fn translate(list: &[PbHashPolicy], path: &str, errs: &mut Errors) -> HashPolicy {
        let mut entries = Vec::with_capacity(list.len());
        for (i, hp) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            errs.reject_unsupported(
                hp,
                &[
                    "header",
                    "cookie",
                    "connection_properties",
                    "query_parameter",
                    "terminal",
                ],
                &p,
            );
            let method = match &hp.policy_specifier {
                Some(P::Header(h)) => {
                    let hp_ = join(&p, "header");
                    errs.reject_unsupported(h, &["header_name"], &hp_);
                    if h.header_name.starts_with(':') {
                        errs.add(
                            join(&hp_, "header_name"),
                            format!(
                                "hashing on pseudo-header {:?} is not supported",
                                h.header_name
                            ),
                        );
                        None
                    } else {
                        match HeaderName::from_bytes(h.header_name.to_ascii_lowercase().as_bytes())
                        {
                            Ok(n) => Some(Method::Header(n)),
                            Err(_) => {
                                errs.add(
                                    join(&hp_, "header_name"),
                                    format!("{:?} is not a valid header name", h.header_name),
                                );
                                None
                            }
                        }
                    }
                }
                Some(P::Cookie(c)) => {
                    let cp = join(&p, "cookie");
                    errs.reject_unsupported(c, &["name", "ttl", "path", "attributes"], &cp);
                    let mut ok = true;
                    if !is_token(&c.name) {
                        errs.add(
                            join(&cp, "name"),
                            format!("{:?} is not a valid cookie name", c.name),
                        );
                        ok = false;
                    }
                    if c.path.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                        errs.add(
                            join(&cp, "path"),
                            "cookie path must not contain ';' or controls",
                        );
                        ok = false;
                    }
                    let mut attributes = Vec::new();
                    for (j, a) in c.attributes.iter().enumerate() {
                        let ap = format!("{cp}.attributes[{j}]");
                        errs.reject_unsupported(a, &["name", "value"], &ap);
                        if !is_token(&a.name)
                            || a.value.bytes().any(|b| b == b';' || b.is_ascii_control())
                        {
                            errs.add(&ap, format!("invalid cookie attribute {:?}", a.name));
                            ok = false;
                        }
                        attributes.push((a.name.as_str().into(), a.value.as_str().into()));
                    }
                    let ttl = c.ttl.as_ref().map(|d| duration(d, &join(&cp, "ttl"), errs));
                    ok.then(|| Method::Cookie {
                        name: c.name.as_str().into(),
                        ttl,
                        path: c.path.as_str().into(),
                        attributes,
                    })
                }
                Some(P::ConnectionProperties(cp)) => {
                    let pp = join(&p, "connection_properties");
                    errs.reject_unsupported(cp, &["source_ip"], &pp);
                    // `source_ip: false` hashes nothing, as in Envoy.
                    cp.source_ip.then_some(Method::SourceIp)
                }
                Some(P::QueryParameter(q)) => {
                    let qp = join(&p, "query_parameter");
                    errs.reject_unsupported(q, &["name"], &qp);
                    if q.name.is_empty() {
                        errs.add(join(&qp, "name"), "query parameter name must not be empty");
                        None
                    } else {
                        Some(Method::QueryParameter(q.name.as_str().into()))
                    }
                }
                // `filter_state` is reported by reject_unsupported.
                Some(_) => None,
                None => {
                    errs.add(
                        &p,
                        "one of header, cookie, connection_properties or query_parameter is \
                         required",
                    );
                    None
                }
            };
            if let Some(method) = method {
                entries.push(Entry {
                    method,
                    terminal: hp.terminal,
                });
            }
        }
        HashPolicy { entries }
    }

    /// No policy configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Evaluate for a request. `nonce` seeds a generated cookie value.
    pub fn evaluate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        remote: IpAddr,
        nonce: u64,
    ) -> HashOutcome {
        let mut out = HashOutcome::default();
        for e in &self.entries {
            let new = match &e.method {
                Method::Header(name) => header_hash(headers, name),
                Method::Cookie {
                    name,
                    ttl,
                    path,
                    attributes,
                } => match cookie_value(headers, name) {
                    Some(v) => Some(xxhash64(v.as_bytes())),
                    None => match ttl {
                        Some(ttl) if out.set_cookie.is_none() => {
                            let value =
                                format!("{:016x}", xxhash64(format!("{remote}{nonce}").as_bytes()));
                            out.set_cookie = set_cookie(name, &value, path, *ttl, attributes);
                            Some(xxhash64(value.as_bytes()))
                        }
                        _ => None,
                    },
                },
                Method::SourceIp => Some(xxhash64(remote.to_string().as_bytes())),
                Method::QueryParameter(name) => {
                    query_value(query.unwrap_or(""), name).map(|v| xxhash64(v.as_bytes()))
                }
            };
            if let Some(n) = new {
                out.hash = Some(match out.hash {
                    Some(h) => h.rotate_left(1) ^ n,
                    None => n,
                });
            }
            if e.terminal && out.hash.is_some() {
                break;
            }
        }
        out
    }
}

/// All values of `name`, sorted, hashed as their concatenation.
fn header_hash(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let mut values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
    match values.len() {
        0 => None,
        1 => Some(xxhash64(values[0])),
        _ => {
            values.sort_unstable();
            Some(xxhash64(&values.concat()))
        }
    }
}

/// The first value of query parameter `name` (raw, not decoded); `a` alone is `""`.
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    let query = query.split('#').next().unwrap_or("");
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// Envoy's `makeSetCookieValue(name, value, path, max_age, httponly=true, attributes)`.
fn set_cookie(
    name: &str,
    value: &str,
    path: &str,
    ttl: Duration,
    attributes: &[(Box<str>, Box<str>)],
) -> Option<HeaderValue> {
    let mut s = format!("{name}=\"{value}\"");
    if ttl.as_secs() != 0 {
        s.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !path.is_empty() {
        s.push_str("; Path=");
        s.push_str(path);
    }
    for (k, v) in attributes {
        s.push_str("; ");
        s.push_str(k);
        if !v.is_empty() {
            s.push('=');
            s.push_str(v);
        }
    }
    s.push_str("; HttpOnly");
    HeaderValue::from_str(&s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> (HashPolicy, Vec<String>) {
        let list: Vec<PbHashPolicy> = serde_yaml::from_str::<Vec<serde_yaml::Value>>(yaml)
            .expect("yaml")
            .into_iter()
            .map(|v| {
                weir_xds_api::from_yaml(&serde_yaml::to_string(&v).expect("yaml"))
                    .expect("hash policy")
            })
            .collect();
        let mut errs = Errors::default();
        let p = HashPolicy::translate(&list, "r.route.hash_policy", &mut errs);
        (p, errs.0.into_iter().map(|e| e.path).collect())
    }

    fn ok(yaml: &str) -> HashPolicy {
        let (p, e) = policy(yaml);
        assert!(e.is_empty(), "{e:?}");
        p
    }

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn eval(p: &HashPolicy, h: &HeaderMap, q: Option<&str>) -> HashOutcome {
        p.evaluate(h, q, IP, 7)
    }

    #[test]
    fn header_hash_is_xxhash_of_the_value() {
        let p = ok("- header: {header_name: X-User}");
        let o = eval(&p, &hm(&[("x-user", "alice")]), None);
        assert_eq!(o.hash, Some(xxhash64(b"alice")));
        assert_eq!(o.set_cookie, None);
        assert_eq!(eval(&p, &hm(&[]), None).hash, None);
        // Several values: order does not matter.
        let a = eval(&p, &hm(&[("x-user", "b"), ("x-user", "a")]), None).hash;
        let b = eval(&p, &hm(&[("x-user", "a"), ("x-user", "b")]), None).hash;
        assert_eq!(a, b);
        assert_eq!(a, Some(xxhash64(b"ab")));
    }

    #[test]
    fn cookie_present_absent_and_generated() {
        let p = ok("- cookie: {name: sid}");
        let o = eval(&p, &hm(&[("cookie", "a=1; sid=\"xyz\"; b=2")]), None);
        assert_eq!(o.hash, Some(xxhash64(b"xyz")));
        // Absent without ttl: no hash, no cookie.
        assert_eq!(
            eval(&p, &hm(&[("cookie", "a=1")]), None),
            HashOutcome::default()
        );
        // Absent with ttl: generated.
        let p = ok(
            "- cookie: {name: sid, ttl: 3600s, path: /app, attributes: [{name: SameSite, value: Lax}, {name: Secure}]}",
        );
        let o = eval(&p, &hm(&[]), None);
        let sc = o.set_cookie.expect("set-cookie");
        let sc = sc.to_str().expect("ascii");
        let value = sc
            .strip_prefix("sid=\"")
            .and_then(|r| r.split_once('"'))
            .map(|(v, _)| v)
            .expect("value");
        assert_eq!(value.len(), 16);
        assert_eq!(
            sc,
            format!("sid=\"{value}\"; Max-Age=3600; Path=/app; SameSite=Lax; Secure; HttpOnly")
        );
        assert_eq!(o.hash, Some(xxhash64(value.as_bytes())));
        // The client sends it back: same hash, no new cookie.
        let back = eval(&p, &hm(&[("cookie", &format!("sid=\"{value}\""))]), None);
        assert_eq!(back.hash, o.hash);
        assert_eq!(back.set_cookie, None);
        // Different nonces give different cookies.
        let other = p.evaluate(&hm(&[]), None, IP, 8);
        assert_ne!(other.hash, o.hash);
        assert!(p.generates_cookies());
        assert!(!ok("- cookie: {name: sid}").generates_cookies());
        // ttl 0: session cookie without Max-Age.
        let p = ok("- cookie: {name: s, ttl: 0s}");
        let sc = eval(&p, &hm(&[]), None).set_cookie.expect("cookie");
        assert!(!sc.to_str().expect("ascii").contains("Max-Age"), "{sc:?}");
    }

    #[test]
    fn source_ip_and_query_parameter() {
        let p = ok("- connection_properties: {source_ip: true}");
        assert_eq!(eval(&p, &hm(&[]), None).hash, Some(xxhash64(b"10.0.0.1")));
        let v6 = p.evaluate(&hm(&[]), None, "::1".parse().expect("ip"), 0);
        assert_eq!(v6.hash, Some(xxhash64(b"::1")));
        let p = ok("- query_parameter: {name: user}");
        assert_eq!(
            eval(&p, &hm(&[]), Some("a=1&user=bob&user=eve")).hash,
            Some(xxhash64(b"bob"))
        );
        assert_eq!(eval(&p, &hm(&[]), Some("user")).hash, Some(xxhash64(b"")));
        assert_eq!(eval(&p, &hm(&[]), Some("users=1")).hash, None);
        assert_eq!(eval(&p, &hm(&[]), None).hash, None);
    }

    #[test]
    fn policies_combine_and_terminal_stops() {
        let p = ok("- header: {header_name: a}\n- header: {header_name: b}");
        let h = hm(&[("a", "1"), ("b", "2")]);
        let (ha, hb) = (xxhash64(b"1"), xxhash64(b"2"));
        assert_eq!(eval(&p, &h, None).hash, Some(ha.rotate_left(1) ^ hb));
        // Only b present: b's hash as is.
        assert_eq!(eval(&p, &hm(&[("b", "2")]), None).hash, Some(hb));
        // Duplicate rules do not cancel out.
        let p = ok("- header: {header_name: a}\n- header: {header_name: a}");
        assert_eq!(eval(&p, &h, None).hash, Some(ha.rotate_left(1) ^ ha));
        // Terminal: stops once a hash exists.
        let p = ok("- header: {header_name: a}\n  terminal: true\n- header: {header_name: b}");
        assert_eq!(eval(&p, &h, None).hash, Some(ha));
        // A terminal policy that produced nothing does not stop.
        assert_eq!(eval(&p, &hm(&[("b", "2")]), None).hash, Some(hb));
    }

    #[test]
    fn rejections_name_their_path() {
        let cases = [
            (
                "- filter_state: {key: k}",
                "r.route.hash_policy[0].filter_state",
            ),
            (
                "- header: {header_name: ':authority'}",
                "r.route.hash_policy[0].header.header_name",
            ),
            (
                "- header: {header_name: x, regex_rewrite: {pattern: {regex: a}, substitution: b}}",
                "r.route.hash_policy[0].header.regex_rewrite",
            ),
            (
                "- cookie: {name: 'a b'}",
                "r.route.hash_policy[0].cookie.name",
            ),
            (
                "- cookie: {name: a, attributes: [{name: 'x;y'}]}",
                "r.route.hash_policy[0].cookie.attributes[0]",
            ),
            (
                "- query_parameter: {name: ''}",
                "r.route.hash_policy[0].query_parameter.name",
            ),
            ("- terminal: true", "r.route.hash_policy[0]"),
        ];
        for (yaml, path) in cases {
            assert_eq!(policy(yaml).1, vec![path.to_string()], "{yaml}");
        }
    }
}
