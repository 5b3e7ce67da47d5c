//! Envoy's `StringMatcher` and `RegexMatcher`, compiled once and shared by every user
//! (route, header and query matchers, RBAC, JWT, TLS SAN matchers).
//!
//! Regexes compile with a program size limit ([`REGEX_SIZE_LIMIT`]) and a lazy-DFA cache
//! limit, so a hostile pattern (`(a{1000}){1000}`) fails translation instead of eating
//! memory. Matching regexes are anchored (RE2's `FullMatch`, as Envoy's `safe_regex`).
//!
//! Translation reports into any [`ErrorSink`] (the filters' [`ConfigErrors`] or the proxy's
//! own error list), so every caller keeps its error type.

use regex::{Regex, RegexBuilder};
use weir_xds_api::pb::envoy::r#type::matcher::v3 as mpb;

use crate::config::{ConfigErrors, join};

/// Compiled program size limit for every configured regex. RE2 in Envoy caps programs at
/// 100 instructions by default; the regex crate counts bytes, and 1 MiB leaves room for
/// ordinary regexes.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy DFA cache limit per regex (per thread that uses it).
const REGEX_DFA_LIMIT: usize = 2 << 20;

/// Where translation errors go, each at a field path.
pub trait ErrorSink {
    /// Record an error at `path`.
    fn error(&mut self, path: String, message: String);
    /// Record an error for every set field of `msg` not in `supported`: for messages where
    /// an ignored field would change what traffic does.
    fn unsupported<T: prost::Message + prost::Name>(
        &mut self,
        msg: &T,
        supported: &[&str],
        path: &str,
    ) {
        for f in weir_xds_api::set_fields(msg) {
            if !supported.contains(&f.as_str()) {
                self.error(
                    crate::config::join(path, &f),
                    format!("field is not supported by weir ({})", T::full_name()),
                );
            }
        }
    }
}

/// Unpack a typed `Any` config as `T`; a wrong type or bad bytes is an error at `path`.
pub fn unpack_or_error<T: prost::Message + prost::Name + Default>(
    any: &weir_xds_api::Any,
    path: &str,
    errs: &mut impl ErrorSink,
) -> Option<T> {
    match weir_xds_api::unpack::<T>(any) {
        Ok(c) => Some(c),
        Err(e) => {
            errs.error(path.to_string(), e.to_string());
            None
        }
    }
}

impl ErrorSink for ConfigErrors {
    fn error(&mut self, path: String, message: String) {
        self.add(path, message);
    }
}

fn build_regex(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_LIMIT)
        .build()
        .map_err(|e| e.to_string())
}

/// Compile a configured `RegexMatcher` for RE2 `FullMatch` semantics (the whole input must
/// match), as Envoy uses for `safe_regex` matching.
pub fn full_regex<E: ErrorSink>(rm: &mpb::RegexMatcher, path: &str, errs: &mut E) -> Option<Regex> {
    errs.unsupported(rm, &["regex", "google_re2"], path);
    if rm.regex.is_empty() {
        errs.error(join(path, "regex"), "regex must not be empty".into());
        return None;
    }
    // Compile alone first: wrapping an unbalanced pattern like `a)|(b` could otherwise turn
    // it into a valid regex with another meaning.
    if let Err(e) = build_regex(&rm.regex) {
        errs.error(join(path, "regex"), format!("invalid regex: {e}"));
        return None;
    }
    match build_regex(&format!(r"\A(?:{})\z", rm.regex)) {
        Ok(r) => Some(r),
        Err(e) => {
            errs.error(join(path, "regex"), format!("invalid regex: {e}"));
            None
        }
    }
}

/// Compile a configured `RegexMatcher` for searching (rewrites replace every match).
pub fn search_regex<E: ErrorSink>(
    rm: &mpb::RegexMatcher,
    path: &str,
    errs: &mut E,
) -> Option<Regex> {
    errs.unsupported(rm, &["regex", "google_re2"], path);
    if rm.regex.is_empty() {
        errs.error(join(path, "regex"), "regex must not be empty".into());
        return None;
    }
    match build_regex(&rm.regex) {
        Ok(r) => Some(r),
        Err(e) => {
            errs.error(join(path, "regex"), format!("invalid regex: {e}"));
            None
        }
    }
}

/// ASCII case-insensitive `starts_with`.
pub fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// ASCII case-insensitive `ends_with`.
pub fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// ASCII case-insensitive `contains`.
pub fn contains_ignore_case(s: &str, needle: &str) -> bool {
    needle.is_empty()
        || s.as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Envoy's `StringMatcher`, compiled. The `bool` is `ignore_case` (ASCII).
#[derive(Debug, Clone)]
pub enum StringMatch {
    /// `exact`.
    Exact(Box<str>, bool),
    /// `prefix`.
    Prefix(Box<str>, bool),
    /// `suffix`.
    Suffix(Box<str>, bool),
    /// `contains`.
    Contains(Box<str>, bool),
    /// `safe_regex`, anchored.
    Regex(Regex),
}

impl PartialEq for StringMatch {
    fn eq(&self, o: &Self) -> bool {
        use StringMatch::*;
        match (self, o) {
            (Exact(a, x), Exact(b, y))
            | (Prefix(a, x), Prefix(b, y))
            | (Suffix(a, x), Suffix(b, y))
            | (Contains(a, x), Contains(b, y)) => a == b && x == y,
            (Regex(a), Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatch {
    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(p, false) => v == &**p,
            StringMatch::Exact(p, true) => v.eq_ignore_ascii_case(p),
            StringMatch::Prefix(p, false) => v.starts_with(&**p),
            StringMatch::Prefix(p, true) => starts_with_ignore_case(v, p),
            StringMatch::Suffix(p, false) => v.ends_with(&**p),
            StringMatch::Suffix(p, true) => ends_with_ignore_case(v, p),
            StringMatch::Contains(p, false) => v.contains(&**p),
            StringMatch::Contains(p, true) => contains_ignore_case(v, p),
            StringMatch::Regex(r) => r.is_match(v),
        }
    }

    /// Compile a `StringMatcher` at `path`.
    pub fn translate<E: ErrorSink>(
        sm: &mpb::StringMatcher,
        path: &str,
        errs: &mut E,
    ) -> Option<StringMatch> {
        use mpb::string_matcher::MatchPattern as P;
        errs.unsupported(
            sm,
            &[
                "exact",
                "prefix",
                "suffix",
                "contains",
                "safe_regex",
                "ignore_case",
            ],
            path,
        );
        let ic = sm.ignore_case;
        let non_empty = |s: &str, field: &str, errs: &mut E| {
            if s.is_empty() {
                errs.error(join(path, field), "must not be empty".into());
                false
            } else {
                true
            }
        };
        match &sm.match_pattern {
            Some(P::Exact(s)) => Some(StringMatch::Exact(s.as_str().into(), ic)),
            Some(P::Prefix(s)) => {
                non_empty(s, "prefix", errs).then(|| StringMatch::Prefix(s.as_str().into(), ic))
            }
            Some(P::Suffix(s)) => {
                non_empty(s, "suffix", errs).then(|| StringMatch::Suffix(s.as_str().into(), ic))
            }
            Some(P::Contains(s)) => {
                non_empty(s, "contains", errs).then(|| StringMatch::Contains(s.as_str().into(), ic))
            }
            Some(P::SafeRegex(r)) => {
                if ic {
                    errs.error(
                        join(path, "ignore_case"),
                        "ignore_case has no effect for safe_regex; use (?i) in the regex".into(),
                    );
                }
                full_regex(r, &join(path, "safe_regex"), errs).map(StringMatch::Regex)
            }
            // `custom` is reported by `unsupported` above.
            Some(P::Custom(_)) => None,
            None => {
                errs.error(
                    path.to_string(),
                    "one of exact, prefix, suffix, contains or safe_regex is required".into(),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(yaml: &str) -> Result<StringMatch, Vec<(String, String)>> {
        let m: mpb::StringMatcher = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        match StringMatch::translate(&m, "m", &mut errs) {
            Some(s) if errs.is_empty() => Ok(s),
            _ => Err(errs.0),
        }
    }

    #[test]
    fn every_kind_matches_with_and_without_case() {
        let cases: &[(&str, &str, bool)] = &[
            ("exact: Abc", "Abc", true),
            ("exact: Abc", "abc", false),
            ("{exact: Abc, ignore_case: true}", "aBC", true),
            ("prefix: /api", "/api/x", true),
            ("prefix: /api", "/API/x", false),
            ("{prefix: /api, ignore_case: true}", "/API/x", true),
            ("suffix: .com", "a.com", true),
            ("{suffix: .COM, ignore_case: true}", "a.com", true),
            ("suffix: .com", "a.co", false),
            ("contains: mid", "amidst", true),
            ("{contains: MID, ignore_case: true}", "amidst", true),
            ("contains: mid", "amist", false),
            ("safe_regex: {regex: 'a+b'}", "aab", true),
            // Full match: a substring match is not enough.
            ("safe_regex: {regex: 'a+b'}", "xaab", false),
            ("safe_regex: {regex: 'a+b'}", "aabx", false),
        ];
        for (yaml, v, want) in cases {
            assert_eq!(sm(yaml).expect(yaml).matches(v), *want, "{yaml} on {v}");
        }
    }

    #[test]
    fn bad_matchers_have_paths() {
        let paths =
            |y: &str| -> Vec<String> { sm(y).expect_err(y).into_iter().map(|(p, _)| p).collect() };
        assert_eq!(paths("prefix: ''"), vec!["m.prefix"]);
        assert_eq!(paths("suffix: ''"), vec!["m.suffix"]);
        assert_eq!(paths("contains: ''"), vec!["m.contains"]);
        assert_eq!(paths("{}"), vec!["m"]);
        assert_eq!(
            paths("safe_regex: {regex: 'a)|(b'}"),
            vec!["m.safe_regex.regex"]
        );
        assert_eq!(paths("safe_regex: {regex: ''}"), vec!["m.safe_regex.regex"]);
        assert_eq!(
            paths("{safe_regex: {regex: a}, ignore_case: true}"),
            vec!["m.ignore_case"]
        );
        // A hostile program is refused instead of compiled.
        assert_eq!(
            paths("safe_regex: {regex: '(a{1000}){1000}'}"),
            vec!["m.safe_regex.regex"]
        );
    }

    #[test]
    fn equality_compares_patterns() {
        assert_eq!(sm("exact: a").expect("a"), sm("exact: a").expect("a"));
        assert_ne!(sm("exact: a").expect("a"), sm("prefix: a").expect("a"));
        assert_eq!(
            sm("safe_regex: {regex: x}").expect("x"),
            sm("safe_regex: {regex: x}").expect("x")
        );
    }

    #[test]
    fn case_helpers() {
        assert!(starts_with_ignore_case("HeLLo", "hel"));
        assert!(!starts_with_ignore_case("he", "hel"));
        assert!(ends_with_ignore_case("HeLLo", "LLO"));
        assert!(contains_ignore_case("HeLLo", "ell"));
        assert!(contains_ignore_case("x", ""));
        assert!(!contains_ignore_case("x", "xy"));
    }
}
