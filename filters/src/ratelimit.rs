//! Route `rate_limits` (Envoy `RateLimit` with its actions), compiled at route translation and
//! turned into descriptors per request by the local rate limit filter.
//!
//! Envoy's `RateLimitPolicyEntryImpl::populateDescriptors`: the actions of one entry run in
//! order, each appending one `(key, value)` entry; an action that cannot produce its entry
//! (missing header without `skip_if_absent`, `header_value_match` not matching as expected)
//! drops the whole descriptor. `request_headers` with `skip_if_absent` skips only its entry.
//!
//! Supported actions: `request_headers`, `remote_address`, `generic_key`,
//! `header_value_match`. Anything else (`destination_cluster`, `query_parameters`, metadata,
//! masked addresses, extensions), `disable_key` and `limit` are rejected.

use std::sync::Arc;

use http::HeaderName;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;

use crate::config::{ConfigErrors, FactoryContext, RequestHead, RequestMatcher, join};

/// One descriptor: ordered `(key, value)` entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Descriptor(pub Vec<(String, String)>);

/// A compiled rate limit action.
#[derive(Debug)]
enum Action {
    RequestHeaders {
        header: HeaderName,
        key: String,
        skip_if_absent: bool,
    },
    RemoteAddress,
    GenericKey {
        key: String,
        value: String,
    },
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        matcher: Arc<dyn RequestMatcher>,
    },
}

/// A compiled `RateLimit` entry.
#[derive(Debug)]
pub struct RateLimitPolicy {
    /// `stage` (default 0).
    pub stage: u32,
    actions: Vec<Action>,
}

impl RateLimitPolicy {
    /// Translate a `RateLimit` at `path`.
    pub fn translate(
        rl: &rpb::RateLimit,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<RateLimitPolicy> {
        use rpb::rate_limit::action::ActionSpecifier as S;
        errs.reject_unsupported(rl, &["stage", "actions"], path);
        let stage = rl.stage.map(|s| s.value).unwrap_or(0);
        if stage > 10 {
            errs.add(join(path, "stage"), "must be between 0 and 10");
        }
        if rl.actions.is_empty() {
            errs.add(join(path, "actions"), "at least one action is required");
        }
        let before = errs.len();
        let mut actions = Vec::new();
        for (i, a) in rl.actions.iter().enumerate() {
            let p = format!("{path}.actions[{i}]");
            match &a.action_specifier {
                Some(S::RequestHeaders(h)) => {
                    let hp = join(&p, "request_headers");
                    errs.reject_unsupported(
                        h,
                        &["header_name", "descriptor_key", "skip_if_absent"],
                        &hp,
                    );
                    if h.descriptor_key.is_empty() {
                        errs.add(join(&hp, "descriptor_key"), "descriptor_key is required");
                    }
                    match HeaderName::from_bytes(h.header_name.to_ascii_lowercase().as_bytes()) {
                        Ok(header) => actions.push(Action::RequestHeaders {
                            header,
                            key: h.descriptor_key.clone(),
                            skip_if_absent: h.skip_if_absent,
                        }),
                        Err(_) => errs.add(
                            join(&hp, "header_name"),
                            format!("{:?} is not a valid header name", h.header_name),
                        ),
                    }
                }
                Some(S::RemoteAddress(_)) => actions.push(Action::RemoteAddress),
                Some(S::GenericKey(g)) => {
                    let gp = join(&p, "generic_key");
                    errs.reject_unsupported(g, &["descriptor_value", "descriptor_key"], &gp);
                    if g.descriptor_value.is_empty() {
                        errs.add(
                            join(&gp, "descriptor_value"),
                            "descriptor_value is required",
                        );
                    }
                    actions.push(Action::GenericKey {
                        key: if g.descriptor_key.is_empty() {
                            "generic_key".into()
                        } else {
                            g.descriptor_key.clone()
                        },
                        value: g.descriptor_value.clone(),
                    });
                }
                Some(S::HeaderValueMatch(m)) => {
                    let mp = join(&p, "header_value_match");
                    errs.reject_unsupported(
                        m,
                        &[
                            "descriptor_value",
                            "descriptor_key",
                            "expect_match",
                            "headers",
                        ],
                        &mp,
                    );
                    if m.descriptor_value.is_empty() {
                        errs.add(
                            join(&mp, "descriptor_value"),
                            "descriptor_value is required",
                        );
                    }
                    if m.headers.is_empty() {
                        errs.add(join(&mp, "headers"), "at least one header is required");
                    }
                    if let Some(matcher) =
                        ctx.header_matchers(&m.headers, &join(&mp, "headers"), errs)
                    {
                        actions.push(Action::HeaderValueMatch {
                            key: if m.descriptor_key.is_empty() {
                                "header_match".into()
                            } else {
                                m.descriptor_key.clone()
                            },
                            value: m.descriptor_value.clone(),
                            expect_match: m.expect_match.is_none_or(|b| b.value),
                            matcher,
                        });
                    }
                }
                Some(_) => errs.add(
                    &p,
                    "only request_headers, remote_address, generic_key and header_value_match \
                     rate limit actions are supported",
                ),
                None => errs.add(&p, "an action is required"),
            }
        }
        (errs.len() == before).then_some(RateLimitPolicy { stage, actions })
    }

    /// The descriptor this entry produces for a request, or `None` when an action could not
    /// produce its entry (Envoy then sends no descriptor for this entry).
    pub fn descriptor(
        &self,
        req: &RequestHead<'_>,
        remote: std::net::IpAddr,
    ) -> Option<Descriptor> {
        let mut entries = Vec::with_capacity(self.actions.len());
        for a in &self.actions {
            match a {
                Action::RequestHeaders {
                    header,
                    key,
                    skip_if_absent,
                } => match req.headers.get(header) {
                    // Envoy uses the first value.
                    Some(v) => entries.push((
                        key.clone(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )),
                    None if *skip_if_absent => {}
                    None => return None,
                },
                Action::RemoteAddress => {
                    entries.push(("remote_address".into(), remote.to_string()))
                }
                Action::GenericKey { key, value } => entries.push((key.clone(), value.clone())),
                Action::HeaderValueMatch {
                    key,
                    value,
                    expect_match,
                    matcher,
                } => {
                    if matcher.matches(req) != *expect_match {
                        return None;
                    }
                    entries.push((key.clone(), value.clone()));
                }
            }
        }
        (!entries.is_empty()).then_some(Descriptor(entries))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::StatScope;
    use http::{HeaderMap, Method};
    use metrics::{Counter, Gauge};

    /// A test context: header matchers support `exact_match`/`string_match.exact` and
    /// `present_match` on regular headers only.
    #[derive(Debug)]
    pub(crate) struct TestCtx;

    #[derive(Debug)]
    struct Exact(Vec<(HeaderName, Option<String>, bool)>);

    impl RequestMatcher for Exact {
        fn matches(&self, req: &RequestHead<'_>) -> bool {
            self.0.iter().all(|(h, v, invert)| {
                let got = req.headers.get(h).and_then(|x| x.to_str().ok());
                let m = match v {
                    Some(v) => got == Some(v.as_str()),
                    None => got.is_some(),
                };
                m != *invert
            })
        }
    }

    impl FactoryContext for TestCtx {
        fn counter(&self, _scope: StatScope<'_>, _stat: &str) -> Counter {
            Counter::noop()
        }
        fn gauge(&self, _scope: StatScope<'_>, _stat: &str) -> Gauge {
            Gauge::noop()
        }
        #[allow(deprecated)]
        fn header_matchers(
            &self,
            matchers: &[rpb::HeaderMatcher],
            path: &str,
            errs: &mut ConfigErrors,
        ) -> Option<Arc<dyn RequestMatcher>> {
            use rpb::header_matcher::HeaderMatchSpecifier as S;
            use weir_xds_api::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern as P;
            let mut out = Vec::new();
            for (i, m) in matchers.iter().enumerate() {
                let Ok(h) = HeaderName::from_bytes(m.name.as_bytes()) else {
                    errs.add(format!("{path}[{i}].name"), "bad name");
                    continue;
                };
                let v = match &m.header_match_specifier {
                    Some(S::ExactMatch(e)) => Some(e.clone()),
                    Some(S::StringMatch(sm)) => match &sm.match_pattern {
                        Some(P::Exact(e)) => Some(e.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                out.push((h, v, m.invert_match));
            }
            Some(Arc::new(Exact(out)))
        }
        fn has_cluster(&self, name: &str) -> bool {
            name == "c"
        }
    }

    pub(crate) fn policy(yaml: &str) -> Result<RateLimitPolicy, Vec<(String, String)>> {
        let rl: rpb::RateLimit = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let p = RateLimitPolicy::translate(&rl, "rl", &TestCtx, &mut errs);
        if errs.is_empty() {
            Ok(p.expect("policy"))
        } else {
            Err(errs.0)
        }
    }

    pub(crate) fn head<'a>(headers: &'a HeaderMap, method: &'a Method) -> RequestHead<'a> {
        RequestHead {
            authority: "a",
            path: "/",
            method,
            scheme: "http",
            headers,
        }
    }

    fn d(entries: &[(&str, &str)]) -> Descriptor {
        Descriptor(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn descriptors_follow_envoy() {
        let ip: std::net::IpAddr = "10.1.2.3".parse().expect("ip");
        let m = Method::GET;
        let p = policy(
            "actions:\n- generic_key: {descriptor_value: v}\n- request_headers: {header_name: X-User, descriptor_key: user}\n- remote_address: {}\n",
        )
        .expect("valid");
        let mut h = HeaderMap::new();
        assert_eq!(
            p.descriptor(&head(&h, &m), ip),
            None,
            "missing header drops it"
        );
        h.insert("x-user", "alice".parse().expect("v"));
        h.append("x-user", "bob".parse().expect("v"));
        assert_eq!(
            p.descriptor(&head(&h, &m), ip),
            Some(d(&[
                ("generic_key", "v"),
                ("user", "alice"),
                ("remote_address", "10.1.2.3")
            ]))
        );

        let p = policy(
            "actions:\n- request_headers: {header_name: x-user, descriptor_key: user, skip_if_absent: true}\n- generic_key: {descriptor_key: k, descriptor_value: v}\n",
        )
        .expect("valid");
        let none = HeaderMap::new();
        assert_eq!(p.descriptor(&head(&none, &m), ip), Some(d(&[("k", "v")])));

        let p = policy(
            "actions:\n- header_value_match: {descriptor_value: gold, headers: [{name: x-tier, exact_match: gold}]}\n",
        )
        .expect("valid");
        let mut h = HeaderMap::new();
        h.insert("x-tier", "gold".parse().expect("v"));
        assert_eq!(
            p.descriptor(&head(&h, &m), ip),
            Some(d(&[("header_match", "gold")]))
        );
        assert_eq!(p.descriptor(&head(&none, &m), ip), None);
        let p = policy(
            "actions:\n- header_value_match: {descriptor_key: t, descriptor_value: other, expect_match: false, headers: [{name: x-tier, exact_match: gold}]}\n",
        )
        .expect("valid");
        assert_eq!(p.descriptor(&head(&h, &m), ip), None);
        assert_eq!(
            p.descriptor(&head(&none, &m), ip),
            Some(d(&[("t", "other")]))
        );
    }

    #[test]
    fn translation_errors_have_paths() {
        let e = policy("actions: []\n").expect_err("invalid");
        assert_eq!(e[0].0, "rl.actions");
        let e = policy(
            "stage: 11\ndisable_key: k\nactions:\n- destination_cluster: {}\n- request_headers: {header_name: 'bad name'}\n- generic_key: {}\n",
        )
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "rl.disable_key",
            "rl.stage",
            "rl.actions[0]",
            "rl.actions[1].request_headers.descriptor_key",
            "rl.actions[1].request_headers.header_name",
            "rl.actions[2].generic_key.descriptor_value",
        ] {
            assert!(paths.contains(&want), "{want} missing in {e:?}");
        }
    }
}
