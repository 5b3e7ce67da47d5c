//! `envoy.filters.http.health_check` (Envoy's `HealthCheck`).
//!
//! A request matching `headers` (typically `:path` exact `/healthz`; no headers = every
//! request) is a health check:
//! - `pass_through_mode: false`: weir answers it itself: 503 (flag `LH`) when the server is
//!   failing health checks (`POST /healthcheck/fail`, or draining), else 503 when a cluster in
//!   `cluster_min_healthy_percentages` is missing, empty (unless its minimum is 0) or has fewer
//!   healthy hosts than its minimum percentage, else 200. The body is empty.
//! - `pass_through_mode: true`: forwarded upstream, but answered 503 at once while failing.
//!
//! While failing, every other response through this connection manager gets
//! `x-envoy-immediate-health-check-fail: true` (Envoy's `encodeHeaders`), so Envoys in front
//! drop this host at once.
//!
//! Not supported (rejected): `cache_time`. Weir does not add
//! `x-envoy-upstream-healthchecked-cluster` (no local cluster name at this layer).

use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::extensions::filters::http::health_check::v3::HealthCheck;

use crate::chain::{FilterContext, ServerInfo};
use crate::config::{ConfigErrors, FactoryContext, RequestMatcher, join};
use crate::{FilterAction, HttpFilter, HttpFilterFactory, LocalReply, type_urls};

const IMMEDIATE_FAIL: HeaderName = HeaderName::from_static("x-envoy-immediate-health-check-fail");

/// The health check filter.
#[derive(Debug)]
pub struct HealthCheckFilter {
    pass_through: bool,
    headers: Option<Arc<dyn RequestMatcher>>,
    /// `(cluster, minimum healthy percent)`.
    min_healthy: Vec<(String, f64)>,
}

/// Marks a health check request (per-request state).
struct IsHealthCheck;

impl HealthCheckFilter {
    /// The status weir answers a health check with (non pass-through).
    fn status(&self, server: &dyn ServerInfo) -> (StatusCode, &'static str) {
        if !server.healthy() {
            return (StatusCode::SERVICE_UNAVAILABLE, "LH");
        }
        for (name, min) in &self.min_healthy {
            let ok = match server.cluster_health(name) {
                None => false,
                Some((_, 0)) => *min <= 0.0,
                Some((healthy, total)) => 100.0 * healthy as f64 >= total as f64 * min,
            };
            if !ok {
                return (StatusCode::SERVICE_UNAVAILABLE, "LH");
            }
        }
        (StatusCode::OK, "-")
    }
}

impl HttpFilter for HealthCheckFilter {
    fn name(&self) -> &str {
        "envoy.filters.http.health_check"
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        let s = ctx.stream;
        if let Some(m) = &self.headers
            && !m.matches(&s.head(req))
        {
            return FilterAction::Continue;
        }
        ctx.set_state(IsHealthCheck);
        s.mark(crate::chain::marks::HEALTH_CHECK);
        if self.pass_through {
            if !s.server.healthy() {
                return FilterAction::Respond(LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "",
                    "LH",
                ));
            }
            return FilterAction::Continue;
        }
        let (status, flag) = self.status(s.server);
        FilterAction::Respond(LocalReply::new(status, "", flag))
    }

    fn on_response(&self, resp: &mut http::response::Parts, ctx: &mut FilterContext<'_>) {
        if ctx.take_state::<IsHealthCheck>().is_some() {
            return;
        }
        if !ctx.stream.server.healthy() {
            resp.headers
                .insert(IMMEDIATE_FAIL, HeaderValue::from_static("true"));
        }
    }
}

/// Factory for `envoy.filters.http.health_check`.
#[derive(Debug)]
pub struct Factory;

impl HttpFilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        type_urls::HEALTH_CHECK
    }

    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        let c: HealthCheck = match weir_xds_api::unpack(config) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        errs.reject_unsupported(
            &c,
            &[
                "pass_through_mode",
                "headers",
                "cluster_min_healthy_percentages",
            ],
            path,
        );
        let before = errs.len();
        let Some(pass_through) = c.pass_through_mode.map(|b| b.value) else {
            errs.add(
                join(path, "pass_through_mode"),
                "pass_through_mode is required",
            );
            return None;
        };
        let headers = if c.headers.is_empty() {
            None
        } else {
            ctx.header_matchers(&c.headers, &join(path, "headers"), errs)
        };
        let mut min_healthy: Vec<(String, f64)> = c
            .cluster_min_healthy_percentages
            .iter()
            .map(|(k, v)| (k.clone(), v.value))
            .collect();
        min_healthy.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, v) in &min_healthy {
            if !(0.0..=100.0).contains(v) {
                errs.add(
                    format!("{path}.cluster_min_healthy_percentages[{name}].value"),
                    "must be between 0 and 100",
                );
            }
        }
        if pass_through && !min_healthy.is_empty() {
            errs.add(
                join(path, "cluster_min_healthy_percentages"),
                "only applies without pass_through_mode",
            );
        }
        (errs.len() == before).then(|| {
            Arc::new(HealthCheckFilter {
                pass_through,
                headers,
                min_healthy,
            }) as Arc<dyn HttpFilter>
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{ChainEntry, ChainState, ConnectionState, FilterChain, StreamInfo};
    use crate::ratelimit::tests::TestCtx;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct Server {
        failing: AtomicBool,
    }

    impl ServerInfo for Server {
        fn healthy(&self) -> bool {
            !self.failing.load(Ordering::SeqCst)
        }
        fn cluster_health(&self, name: &str) -> Option<(usize, usize)> {
            match name {
                "half" => Some((1, 2)),
                "empty" => Some((0, 0)),
                _ => None,
            }
        }
    }

    fn filter(yaml: &str) -> Result<Arc<dyn HttpFilter>, Vec<(String, String)>> {
        let c: HealthCheck = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let f = Factory.create(&weir_xds_api::pack(&c), "hc", &TestCtx, &mut errs);
        if errs.is_empty() {
            Ok(f.expect("filter"))
        } else {
            Err(errs.0)
        }
    }

    async fn run(
        f: &Arc<dyn HttpFilter>,
        server: &Server,
        header: Option<&str>,
    ) -> (Option<LocalReply>, http::HeaderMap) {
        let chain = FilterChain::new(vec![ChainEntry {
            name: "hc".into(),
            filter: f.clone(),
            disabled: false,
            type_url: String::new(),
        }]);
        let conn = ConnectionState::default();
        let info = StreamInfo::new(
            "10.0.0.1:1".parse().expect("a"),
            "127.0.0.1:80".parse().expect("a"),
            1,
            false,
            "a",
            "/",
            "http",
            None,
            server,
            &conn,
            1,
        );
        let mut req = http::Request::new(());
        if let Some(v) = header {
            req.headers_mut().insert("x-hc", v.parse().expect("v"));
        }
        let (mut parts, _) = req.into_parts();
        let mut st = ChainState::default();
        let r = chain.decode(&mut parts, &info, &mut st).await.err();
        let resp = chain.encode(http::Response::new(crate::body::empty()), &info, &mut st);
        (r, resp.headers().clone())
    }

    #[tokio::test]
    async fn answers_and_fails() {
        let f = filter("pass_through_mode: false\nheaders: [{name: x-hc, exact_match: '1'}]\n")
            .expect("valid");
        let server = Server::default();
        let (r, h) = run(&f, &server, Some("1")).await;
        assert_eq!(r.expect("answered").status, StatusCode::OK);
        assert!(h.get(&IMMEDIATE_FAIL).is_none());
        let (r, h) = run(&f, &server, None).await;
        assert!(r.is_none());
        assert!(h.get(&IMMEDIATE_FAIL).is_none());
        server.failing.store(true, Ordering::SeqCst);
        let (r, h) = run(&f, &server, Some("1")).await;
        let r = r.expect("answered");
        assert_eq!((r.status, r.flag), (StatusCode::SERVICE_UNAVAILABLE, "LH"));
        assert!(h.get(&IMMEDIATE_FAIL).is_none(), "not on the health check");
        let (r, h) = run(&f, &server, None).await;
        assert!(r.is_none());
        assert_eq!(h[&IMMEDIATE_FAIL], "true");
    }

    #[tokio::test]
    async fn pass_through_and_cluster_minimums() {
        let f = filter("pass_through_mode: true\nheaders: [{name: x-hc, exact_match: '1'}]\n")
            .expect("valid");
        let server = Server::default();
        assert!(run(&f, &server, Some("1")).await.0.is_none(), "forwarded");
        server.failing.store(true, Ordering::SeqCst);
        assert_eq!(
            run(&f, &server, Some("1")).await.0.expect("503").status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let status = |yaml: &str| {
            let f = filter(yaml).expect("valid");
            let f = f.clone();
            async move {
                run(&f, &Server::default(), Some("1"))
                    .await
                    .0
                    .expect("answered")
                    .status
            }
        };
        let base = "pass_through_mode: false\nheaders: [{name: x-hc, exact_match: '1'}]\n";
        assert_eq!(
            status(&format!(
                "{base}cluster_min_healthy_percentages: {{half: {{value: 50}}}}\n"
            ))
            .await,
            StatusCode::OK
        );
        assert_eq!(
            status(&format!(
                "{base}cluster_min_healthy_percentages: {{half: {{value: 51}}}}\n"
            ))
            .await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(&format!(
                "{base}cluster_min_healthy_percentages: {{empty: {{value: 0}}}}\n"
            ))
            .await,
            StatusCode::OK
        );
        assert_eq!(
            status(&format!(
                "{base}cluster_min_healthy_percentages: {{empty: {{value: 1}}}}\n"
            ))
            .await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(&format!(
                "{base}cluster_min_healthy_percentages: {{nope: {{value: 0}}}}\n"
            ))
            .await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn translation_errors() {
        let e = filter("cache_time: 1s\n").expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["hc.cache_time", "hc.pass_through_mode"]);
        let e = filter(
            "pass_through_mode: false\ncluster_min_healthy_percentages: {c: {value: 101}}\n",
        )
        .expect_err("invalid");
        assert_eq!(e[0].0, "hc.cluster_min_healthy_percentages[c].value");
    }
}
