//! What factories need from the proxy while translating ([`FactoryContext`]), an error sink
//! with field paths ([`ConfigErrors`]), and shared proto helpers (percentages, durations,
//! header additions).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use metrics::{Counter, Gauge};
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::route::v3::HeaderMatcher;
use weir_xds_api::pb::envoy::r#type::v3 as tpb;

/// Problems found while translating, each at a full field path.
#[derive(Debug, Default)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl ConfigErrors {
    /// Record an error at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }

    /// Record an error for every set field of `msg` not in `supported`.
    pub fn reject_unsupported<T: prost::Message + prost::Name>(
        &mut self,
        msg: &T,
        supported: &[&str],
        path: &str,
    ) {
        crate::matcher::ErrorSink::unsupported(self, msg, supported, path);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of errors so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// `join("a.b", "c")` = `a.b.c`.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// The request attributes matchers and rate limit actions read (the proxy's routing view:
/// pseudo-headers come from the request line).
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// `:authority`.
    pub authority: &'a str,
    /// `:path` (normalized, with query).
    pub path: &'a str,
    /// `:method`.
    pub method: &'a Method,
    /// `:scheme`.
    pub scheme: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
}

/// A compiled list of Envoy `HeaderMatcher`s (all must match), provided by the proxy so
/// filters and routes match headers the same way.
pub trait RequestMatcher: Send + Sync + std::fmt::Debug {
    /// Whether every matcher matches.
    fn matches(&self, req: &RequestHead<'_>) -> bool;
}

/// Where a filter's stats live.
#[derive(Debug, Clone, Copy)]
pub enum StatScope<'a> {
    /// Under the connection manager: `http.<hcm stat_prefix>.<infix>.` (fault:
    /// `http.<prefix>.fault.`).
    Hcm {
        /// Infix after the HCM prefix.
        infix: &'a str,
    },
    /// A filter's own prefix, extracted as a Prometheus tag:
    /// `<dotted>` with `{label="<value>"}` on `<prom>` names.
    Tagged {
        /// Envoy's dotted prefix, ending in `.`.
        dotted: &'a str,
        /// The Prometheus name prefix (`envoy_http_local_rate_limit_`).
        prom: &'a str,
        /// The tag name.
        label: &'static str,
        /// The tag value.
        value: &'a str,
    },
}

/// What translation needs from the proxy.
pub trait FactoryContext {
    /// A counter `<scope><stat>`.
    fn counter(&self, scope: StatScope<'_>, stat: &str) -> Counter;
    /// A gauge `<scope><stat>`.
    fn gauge(&self, scope: StatScope<'_>, stat: &str) -> Gauge;
    /// Compile `HeaderMatcher`s (all must match); errors at `path[i]`.
    fn header_matchers(
        &self,
        matchers: &[HeaderMatcher],
        path: &str,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn RequestMatcher>>;
    /// Whether a cluster of this name exists (statically known).
    fn has_cluster(&self, name: &str) -> bool;
}

/// An Envoy `FractionalPercent`, normalized to parts per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u64,
    /// Denominator: 100, 10 000 or 1 000 000.
    pub denominator: u64,
}

impl Fraction {
    /// 100%.
    pub const ALL: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };
    /// 0%.
    pub const NONE: Fraction = Fraction {
        numerator: 0,
        denominator: 100,
    };

    /// Envoy's `evaluateFractionalPercent`: `roll % denominator < numerator`.
    pub fn hit(&self, roll: u64) -> bool {
        self.numerator >= self.denominator || roll % self.denominator < self.numerator
    }

    /// A percentage out of 100 (header-controlled faults), capped at 100%.
    pub fn percent(p: u64) -> Fraction {
        Fraction {
            numerator: p.min(100),
            denominator: 100,
        }
    }

    /// The smaller of two fractions (header percentages may only lower the configured one).
    pub fn min(self, other: Fraction) -> Fraction {
        // Compare as parts per million.
        let ppm = |f: &Fraction| f.numerator.min(f.denominator) * (1_000_000 / f.denominator);
        if ppm(&other) < ppm(&self) {
            other
        } else {
            self
        }
    }

    /// Translate a `FractionalPercent`; `None` = `default`.
    pub fn translate(
        p: Option<&tpb::FractionalPercent>,
        default: Fraction,
        path: &str,
        errs: &mut ConfigErrors,
    ) -> Fraction {
        let Some(p) = p else { return default };
        let denominator = match tpb::fractional_percent::DenominatorType::try_from(p.denominator) {
            Ok(tpb::fractional_percent::DenominatorType::Hundred) => 100,
            Ok(tpb::fractional_percent::DenominatorType::TenThousand) => 10_000,
            Ok(tpb::fractional_percent::DenominatorType::Million) => 1_000_000,
            Err(_) => {
                errs.add(join(path, "denominator"), "unknown denominator");
                100
            }
        };
        // Envoy caps numerators above the denominator at 100%.
        Fraction {
            numerator: u64::from(p.numerator).min(denominator),
            denominator,
        }
    }

    /// A `RuntimeFractionalPercent`: weir has no runtime, so `default_value` applies.
    pub fn translate_runtime(
        p: Option<&core::RuntimeFractionalPercent>,
        default: Fraction,
        path: &str,
        errs: &mut ConfigErrors,
    ) -> Fraction {
        let Some(p) = p else { return default };
        errs.reject_unsupported(p, &["default_value", "runtime_key"], path);
        Fraction::translate(
            p.default_value.as_ref(),
            Fraction::NONE,
            &join(path, "default_value"),
            errs,
        )
    }
}

/// Proto duration -> std duration (negative is an error).
pub fn duration(
    d: &weir_xds_api::pb::google::protobuf::Duration,
    path: &str,
    errs: &mut ConfigErrors,
) -> Duration {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        errs.add(path, "duration must be non-negative");
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos as u32)
}

/// How a header addition applies (`HeaderValueOption.append_action` / deprecated `append`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddAction {
    /// Append (or add).
    Append,
    /// Add only when absent.
    AddIfAbsent,
    /// Replace (or add).
    Overwrite,
    /// Replace only when present.
    OverwriteIfExists,
}

/// A static header addition (`HeaderValueOption` without command operators).
#[derive(Debug, Clone)]
pub struct HeaderAdd {
    /// Name.
    pub name: HeaderName,
    /// Value.
    pub value: HeaderValue,
    /// How it applies.
    pub action: AddAction,
}

impl HeaderAdd {
    /// Apply to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        match self.action {
            AddAction::Append => {
                headers.append(self.name.clone(), self.value.clone());
            }
            AddAction::AddIfAbsent => {
                if !headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), self.value.clone());
                }
            }
            AddAction::Overwrite => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            AddAction::OverwriteIfExists => {
                if headers.contains_key(&self.name) {
                    headers.insert(self.name.clone(), self.value.clone());
                }
            }
        }
    }

    /// Translate `HeaderValueOption`s at `path[i]`. Values are literal (a `%` command
    /// operator is rejected, `%%` is a literal `%`).
    #[allow(deprecated)] // `append` is still accepted, as Envoy does
    pub fn translate_all(
        opts: &[core::HeaderValueOption],
        path: &str,
        errs: &mut ConfigErrors,
    ) -> Vec<HeaderAdd> {
        let mut out = Vec::new();
        for (i, o) in opts.iter().enumerate() {
            let p = format!("{path}[{i}]");
            errs.reject_unsupported(
                o,
                &["header", "append", "append_action", "keep_empty_value"],
                &p,
            );
            let Some(h) = &o.header else {
                errs.add(join(&p, "header"), "header is required");
                continue;
            };
            let hp = join(&p, "header");
            errs.reject_unsupported(h, &["key", "value", "raw_value"], &hp);
            let name = match HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()) {
                Ok(n) if !h.key.starts_with(':') && !h.key.eq_ignore_ascii_case("host") => n,
                _ => {
                    errs.add(
                        join(&hp, "key"),
                        format!("{:?} is not a modifiable header name", h.key),
                    );
                    continue;
                }
            };
            let raw = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            if raw.replace("%%", "").contains('%') {
                errs.add(
                    join(&hp, "value"),
                    "command operators are not supported in filter headers (write %% for %)",
                );
                continue;
            }
            let Ok(value) = HeaderValue::from_str(&raw.replace("%%", "%")) else {
                errs.add(join(&hp, "value"), "not a valid header value");
                continue;
            };
            let action = if o.append.is_some() {
                if o.append.is_some_and(|b| b.value) {
                    AddAction::Append
                } else {
                    AddAction::Overwrite
                }
            } else {
                use core::header_value_option::HeaderAppendAction as A;
                match A::try_from(o.append_action) {
                    Ok(A::AppendIfExistsOrAdd) => AddAction::Append,
                    Ok(A::AddIfAbsent) => AddAction::AddIfAbsent,
                    Ok(A::OverwriteIfExistsOrAdd) => AddAction::Overwrite,
                    Ok(A::OverwriteIfExists) => AddAction::OverwriteIfExists,
                    Err(_) => {
                        errs.add(join(&p, "append_action"), "unknown value");
                        AddAction::Append
                    }
                }
            };
            out.push(HeaderAdd {
                name,
                value,
                action,
            });
        }
        out
    }
}

/// The first `name=value` in the `Cookie` headers (Envoy's `parseCookieValue`); an empty value
/// counts as absent.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for h in headers.get_all(http::header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for pair in s.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k.trim() == name {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .unwrap_or(v);
                if !v.is_empty() {
                    return Some(v);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions() {
        let f = Fraction {
            numerator: 25,
            denominator: 100,
        };
        assert!(f.hit(0) && f.hit(24) && !f.hit(25) && f.hit(124) && !f.hit(199));
        assert!(Fraction::ALL.hit(u64::MAX));
        assert!(!Fraction::NONE.hit(0));
        let m = Fraction {
            numerator: 1,
            denominator: 1_000_000,
        };
        assert_eq!(f.min(m), m);
        assert_eq!(m.min(f), m);
        assert_eq!(Fraction::percent(500), Fraction::ALL);
        let mut errs = ConfigErrors::default();
        let p = tpb::FractionalPercent {
            numerator: 20_000,
            denominator: tpb::fractional_percent::DenominatorType::TenThousand as i32,
        };
        assert_eq!(
            Fraction::translate(Some(&p), Fraction::NONE, "x", &mut errs),
            Fraction {
                numerator: 10_000,
                denominator: 10_000
            }
        );
        assert!(errs.is_empty());
    }
}
