//! Compiled request matchers: path, headers, query parameters, string matchers and regexes,
//! with their translation from Envoy's `RouteMatch`, `HeaderMatcher`,
//! `QueryParameterMatcher`, `StringMatcher` and `RegexMatcher`.

use std::borrow::Cow;

use http::HeaderName;
use regex::Regex;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;

use super::RouteRequest;
use crate::config::{Errors, join};

pub use weir_filters::matcher::REGEX_SIZE_LIMIT;
pub(super) use weir_filters::matcher::{
    StringMatch, full_regex, search_regex, starts_with_ignore_case,
};

/// Where a header matcher reads its value. Pseudo-headers come from the request line.
#[derive(Debug)]
pub(super) enum HeaderKey {
    Authority,
    Path,
    Method,
    Scheme,
    Header(HeaderName),
}

impl HeaderKey {
    /// Parse a configured header name (`:authority`, `:path`, `:method`, `:scheme` or a
    /// regular header name; lowercased as Envoy does).
    pub(super) fn parse(name: &str, path: &str, errs: &mut Errors) -> Option<HeaderKey> {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            ":authority" => Some(HeaderKey::Authority),
            ":path" => Some(HeaderKey::Path),
            ":method" => Some(HeaderKey::Method),
            ":scheme" => Some(HeaderKey::Scheme),
            _ => match HeaderName::from_bytes(lower.as_bytes()) {
                Ok(h) => Some(HeaderKey::Header(h)),
                Err(_) => {
                    errs.add(path, format!("{name:?} is not a valid header name"));
                    None
                }
            },
        }
    }

    /// The value Envoy would see: several values of one header are joined with `,`.
    pub(super) fn value<'r>(&self, req: &RouteRequest<'r>) -> Option<Cow<'r, str>> {
        match self {
            HeaderKey::Authority => Some(Cow::Borrowed(req.authority)),
            HeaderKey::Path => Some(Cow::Borrowed(req.path)),
            HeaderKey::Method => Some(Cow::Borrowed(req.method.as_str())),
            HeaderKey::Scheme => Some(Cow::Borrowed(req.scheme)),
            HeaderKey::Header(h) => {
                let mut all = req.headers.get_all(h).iter();
                let first = all.next()?;
                let mut out = String::from_utf8_lossy(first.as_bytes());
                for v in all {
                    let o = out.to_mut();
                    o.push(',');
                    o.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Some(out)
            }
        }
    }
}

#[derive(Debug)]
enum HeaderMatchKind {
    /// `present_match` (and a matcher with no specifier, which Envoy treats as present).
    Present(bool),
    /// Deprecated `exact_match`: an empty value matches any value.
    ExactOrAny(Box<str>),
    /// `string_match` and the deprecated prefix/suffix/contains/safe_regex matches.
    String(StringMatch),
}

/// Envoy's `HeaderMatcher`.
#[derive(Debug)]
pub(super) struct HeaderMatch {
    key: HeaderKey,
    kind: HeaderMatchKind,
    invert: bool,
    missing_as_empty: bool,
}

impl HeaderMatch {
    /// Envoy's header matching, including its handling of missing headers: a missing header
    /// never matches a value matcher, inverted or not, unless `treat_missing_header_as_empty`
    /// is set (then it is matched as `""`); presence is `(present == present_match) != invert`.
    pub(super) fn matches(&self, req: &RouteRequest<'_>) -> bool {
        if let HeaderMatchKind::Present(p) = self.kind {
            // Presence ignores `treat_missing_header_as_empty` (Envoy's HeaderDataPresentMatch).
            let present = match &self.key {
                HeaderKey::Header(h) => req.headers.contains_key(h),
                _ => true,
            };
            return (present == p) != self.invert;
        }
        let value = match self.key.value(req) {
            Some(v) => v,
            None if self.missing_as_empty => Cow::Borrowed(""),
            None => return false,
        };
        let m = match &self.kind {
            HeaderMatchKind::Present(p) => *p,
            HeaderMatchKind::ExactOrAny(e) => e.is_empty() || *value == **e,
            HeaderMatchKind::String(s) => s.matches(&value),
        };
        m != self.invert
    }

    #[allow(deprecated)] // the deprecated `*_match` fields are still accepted, as Envoy does
    pub(super) fn translate(
        hm: &rpb::HeaderMatcher,
        path: &str,
        errs: &mut Errors,
    ) -> Option<HeaderMatch> {
        use rpb::header_matcher::HeaderMatchSpecifier as S;
        errs.reject_unsupported(
            hm,
            &[
                "name",
                "invert_match",
                "treat_missing_header_as_empty",
                "exact_match",
                "safe_regex_match",
                "present_match",
                "prefix_match",
                "suffix_match",
                "contains_match",
                "string_match",
            ],
            path,
        );
        if hm.name.is_empty() {
            errs.add(join(path, "name"), "header name is required");
            return None;
        }
        let key = HeaderKey::parse(&hm.name, &join(path, "name"), errs);
        let non_empty = |s: &str, field: &str, errs: &mut Errors| {
            if s.is_empty() {
                errs.add(join(path, field), "must not be empty");
                None
            } else {
                Some(s.into())
            }
        };
        let kind = match &hm.header_match_specifier {
            None => Some(HeaderMatchKind::Present(true)),
            Some(S::PresentMatch(p)) => Some(HeaderMatchKind::Present(*p)),
            Some(S::ExactMatch(e)) => Some(HeaderMatchKind::ExactOrAny(e.as_str().into())),
            Some(S::PrefixMatch(p)) => non_empty(p, "prefix_match", errs)
                .map(|p| HeaderMatchKind::String(StringMatch::Prefix(p, false))),
            Some(S::SuffixMatch(p)) => non_empty(p, "suffix_match", errs)
                .map(|p| HeaderMatchKind::String(StringMatch::Suffix(p, false))),
            Some(S::ContainsMatch(p)) => non_empty(p, "contains_match", errs)
                .map(|p| HeaderMatchKind::String(StringMatch::Contains(p, false))),
            Some(S::SafeRegexMatch(r)) => full_regex(r, &join(path, "safe_regex_match"), errs)
                .map(|r| HeaderMatchKind::String(StringMatch::Regex(r))),
            Some(S::StringMatch(sm)) => {
                StringMatch::translate(sm, &join(path, "string_match"), errs)
                    .map(HeaderMatchKind::String)
            }
            // `range_match` is reported by reject_unsupported above.
            Some(S::RangeMatch(_)) => None,
        };
        Some(HeaderMatch {
            key: key?,
            kind: kind?,
            invert: hm.invert_match,
            missing_as_empty: hm.treat_missing_header_as_empty,
        })
    }
}

/// Envoy's `QueryParameterMatcher`: the first value of the named parameter must exist and,
/// with `string_match`, match. As in Envoy, `present_match` (true or false) and no specifier
/// both mean "present".
#[derive(Debug)]
pub(super) struct QueryMatch {
    name: Box<str>,
    matcher: Option<StringMatch>,
}

impl QueryMatch {
    pub(super) fn matches(&self, query: &str) -> bool {
        match first_query_value(query, &self.name) {
            None => false,
            Some(v) => self.matcher.as_ref().is_none_or(|m| m.matches(&v)),
        }
    }

    pub(super) fn translate(
        qm: &rpb::QueryParameterMatcher,
        path: &str,
        errs: &mut Errors,
    ) -> Option<QueryMatch> {
        use rpb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
        errs.reject_unsupported(qm, &["name", "string_match", "present_match"], path);
        if qm.name.is_empty() {
            errs.add(join(path, "name"), "query parameter name is required");
            return None;
        }
        let matcher = match &qm.query_parameter_match_specifier {
            Some(S::StringMatch(sm)) => Some(StringMatch::translate(
                sm,
                &join(path, "string_match"),
                errs,
            )?),
            Some(S::PresentMatch(_)) | None => None,
        };
        Some(QueryMatch {
            name: qm.name.as_str().into(),
            matcher,
        })
    }
}

/// Percent-decode a query component (`+` is a space, as in form encoding).
fn decode_query(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let plus = s.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The first value of `name` in a raw query string (without the `?`), decoded.
pub(super) fn first_query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    for pair in query.split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_query(k) == name {
            return Some(decode_query(v));
        }
    }
    None
}

/// Split a request target into path and query, dropping any fragment (Envoy's
/// `removeQueryAndFragment`).
pub(super) fn split_path(path_and_query: &str) -> (&str, &str) {
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    let path = &path_and_query[..end];
    let rest = &path_and_query[end..];
    let query = match rest.strip_prefix('?') {
        Some(q) => q.split('#').next().unwrap_or(""),
        None => "",
    };
    (path, query)
}

/// The path specifier of a route.
#[derive(Debug)]
pub(super) enum PathMatch {
    Prefix(Box<str>),
    Exact(Box<str>),
    Regex(Regex),
    SeparatedPrefix(Box<str>),
    /// `connect_matcher`: any CONNECT request (and nothing else).
    Connect,
}

/// A compiled `RouteMatch`.
#[derive(Debug)]
pub(super) struct RouteMatcher {
    pub(super) path: PathMatch,
    pub(super) case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    grpc: bool,
}

/// Envoy's `Grpc::Common::hasGrpcContentType`: `application/grpc`, optionally followed by
/// `+suffix` or `;params` (so `application/grpc-web` is not gRPC).
fn is_grpc(req: &RouteRequest<'_>) -> bool {
    let Some(ct) = req.headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    const G: &[u8] = b"application/grpc";
    ct.starts_with(G) && matches!(ct.get(G.len()), None | Some(b'+') | Some(b';'))
}

impl RouteMatcher {
    fn path_matches(&self, path: &str) -> bool {
        let cs = self.case_sensitive;
        match &self.path {
            PathMatch::Prefix(p) if cs => path.starts_with(&**p),
            PathMatch::Prefix(p) => starts_with_ignore_case(path, p),
            PathMatch::Exact(p) if cs => path == &**p,
            PathMatch::Exact(p) => path.eq_ignore_ascii_case(p),
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                let head = if cs {
                    path.starts_with(&**p)
                } else {
                    starts_with_ignore_case(path, p)
                };
                head && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            // CONNECT has no path; `matches` decides by method.
            PathMatch::Connect => false,
        }
    }

    /// Whether this is a `connect_matcher` route.
    pub(super) fn is_connect(&self) -> bool {
        matches!(self.path, PathMatch::Connect)
    }

    pub(super) fn matches(&self, req: &RouteRequest<'_>) -> bool {
        // CONNECT requests match only `connect_matcher` routes, and those match nothing else.
        let connect = req.method == http::Method::CONNECT;
        if connect != self.is_connect() {
            return false;
        }
        let (path, query) = split_path(req.path);
        (connect || self.path_matches(path))
            && (!self.grpc || is_grpc(req))
            && self.headers.iter().all(|h| h.matches(req))
            && self.query.iter().all(|q| q.matches(query))
    }

    /// How many bytes at the start of `path_and_query` the path specifier matched (what
    /// `prefix_rewrite` replaces): the configured prefix or path, or the whole path for a
    /// regex. `None` when the path does not match at all.
    pub(super) fn matched_len(&self, path_and_query: &str) -> Option<usize> {
        let (path, _) = split_path(path_and_query);
        if !self.path_matches(path) {
            return None;
        }
        Some(match &self.path {
            PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::SeparatedPrefix(p) => p.len(),
            PathMatch::Regex(_) => path.len(),
            PathMatch::Connect => return None,
        })
    }

    pub(super) fn translate(
        m: &rpb::RouteMatch,
        path: &str,
        errs: &mut Errors,
    ) -> Option<RouteMatcher> {
        use rpb::route_match::PathSpecifier as P;
        errs.reject_unsupported(
            m,
            &[
                "prefix",
                "path",
                "safe_regex",
                "path_separated_prefix",
                "case_sensitive",
                "headers",
                "query_parameters",
                "grpc",
                "connect_matcher",
            ],
            path,
        );
        let pm = match &m.path_specifier {
            Some(P::Prefix(p)) => Some(PathMatch::Prefix(p.as_str().into())),
            Some(P::Path(p)) => Some(PathMatch::Exact(p.as_str().into())),
            Some(P::SafeRegex(r)) => {
                full_regex(r, &join(path, "safe_regex"), errs).map(PathMatch::Regex)
            }
            Some(P::PathSeparatedPrefix(p)) => {
                if p.is_empty() || p.ends_with('/') || p.contains(['?', '#']) {
                    errs.add(
                        join(path, "path_separated_prefix"),
                        "must be non-empty, must not end with '/' and must not contain '?' or '#'",
                    );
                    None
                } else {
                    Some(PathMatch::SeparatedPrefix(p.as_str().into()))
                }
            }
            Some(P::ConnectMatcher(cm)) => {
                errs.reject_unsupported(cm, &[], &join(path, "connect_matcher"));
                Some(PathMatch::Connect)
            }
            // path_match_policy is reported by reject_unsupported.
            Some(_) => None,
            None => {
                errs.add(
                    path,
                    "one of prefix, path, safe_regex, path_separated_prefix or connect_matcher is \
                     required",
                );
                None
            }
        };
        let headers: Vec<_> = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatch::translate(h, &join(path, &format!("headers[{i}]")), errs))
            .collect();
        let query: Vec<_> = m
            .query_parameters
            .iter()
            .enumerate()
            .map(|(i, q)| {
                QueryMatch::translate(q, &join(path, &format!("query_parameters[{i}]")), errs)
            })
            .collect();
        Some(RouteMatcher {
            path: pm?,
            case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
            headers: headers.into_iter().collect::<Option<_>>()?,
            query: query.into_iter().collect::<Option<_>>()?,
            grpc: m.grpc.is_some(),
        })
    }
}
