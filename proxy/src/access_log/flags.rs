//! Envoy response flags: a compact bitset with Envoy's short codes (`%RESPONSE_FLAGS%`),
//! rendered in Envoy's order, comma separated, `-` when empty.

use std::sync::atomic::{AtomicU32, Ordering};

/// One response flag (bit index into [`ResponseFlags`]). The order is Envoy's
/// `ResponseFlagUtils` order, which is also the rendering order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Flag {
    /// `LH`: failed local health check.
    FailedLocalHealthCheck,
    /// `UH`: no healthy upstream.
    NoHealthyUpstream,
    /// `UT`: upstream request timeout.
    UpstreamRequestTimeout,
    /// `LR`: local reset.
    LocalReset,
    /// `UR`: upstream remote reset.
    UpstreamRemoteReset,
    /// `UF`: upstream connection failure.
    UpstreamConnectionFailure,
    /// `UC`: upstream connection termination.
    UpstreamConnectionTermination,
    /// `UO`: upstream overflow (circuit breaker).
    UpstreamOverflow,
    /// `NR`: no route.
    NoRouteFound,
    /// `DI`: fault delay injected.
    DelayInjected,
    /// `FI`: fault abort injected.
    FaultInjected,
    /// `RL`: rate limited (local or global).
    RateLimited,
    /// `UAEX`: unauthorized by an external service (also weir's refused upgrades).
    UnauthorizedExternalService,
    /// `RLSE`: rate limit service error.
    RateLimitServiceError,
    /// `DC`: downstream connection termination.
    DownstreamConnectionTermination,
    /// `URX`: upstream retry limit exceeded.
    UpstreamRetryLimitExceeded,
    /// `SI`: stream idle timeout.
    StreamIdleTimeout,
    /// `IH`: invalid `x-envoy-*` request headers.
    InvalidEnvoyRequestHeaders,
    /// `DPE`: downstream protocol error.
    DownstreamProtocolError,
    /// `UMSDR`: upstream max stream duration reached.
    UpstreamMaxStreamDurationReached,
    /// `RFCF`: response from cache filter.
    ResponseFromCacheFilter,
    /// `NFCF`: no filter config found.
    NoFilterConfigFound,
    /// `DT`: duration timeout (request timeout, max stream duration).
    DurationTimeout,
    /// `UPE`: upstream protocol error.
    UpstreamProtocolError,
    /// `NC`: no cluster found.
    NoClusterFound,
    /// `OM`: overload manager.
    OverloadManager,
    /// `DF`: DNS resolution failure.
    DnsResolutionFailure,
    /// `DO`: drop overload.
    DropOverload,
    /// `DR`: downstream remote reset.
    DownstreamRemoteReset,
    /// `UDO`: unconditional drop overload.
    UnconditionalDropOverload,
}

/// Every flag with its code, in rendering order.
pub const ALL: [(Flag, &str); 30] = [
    (Flag::FailedLocalHealthCheck, "LH"),
    (Flag::NoHealthyUpstream, "UH"),
    (Flag::UpstreamRequestTimeout, "UT"),
    (Flag::LocalReset, "LR"),
    (Flag::UpstreamRemoteReset, "UR"),
    (Flag::UpstreamConnectionFailure, "UF"),
    (Flag::UpstreamConnectionTermination, "UC"),
    (Flag::UpstreamOverflow, "UO"),
    (Flag::NoRouteFound, "NR"),
    (Flag::DelayInjected, "DI"),
    (Flag::FaultInjected, "FI"),
    (Flag::RateLimited, "RL"),
    (Flag::UnauthorizedExternalService, "UAEX"),
    (Flag::RateLimitServiceError, "RLSE"),
    (Flag::DownstreamConnectionTermination, "DC"),
    (Flag::UpstreamRetryLimitExceeded, "URX"),
    (Flag::StreamIdleTimeout, "SI"),
    (Flag::InvalidEnvoyRequestHeaders, "IH"),
    (Flag::DownstreamProtocolError, "DPE"),
    (Flag::UpstreamMaxStreamDurationReached, "UMSDR"),
    (Flag::ResponseFromCacheFilter, "RFCF"),
    (Flag::NoFilterConfigFound, "NFCF"),
    (Flag::DurationTimeout, "DT"),
    (Flag::UpstreamProtocolError, "UPE"),
    (Flag::NoClusterFound, "NC"),
    (Flag::OverloadManager, "OM"),
    (Flag::DnsResolutionFailure, "DF"),
    (Flag::DropOverload, "DO"),
    (Flag::DownstreamRemoteReset, "DR"),
    (Flag::UnconditionalDropOverload, "UDO"),
];

impl Flag {
    /// Envoy's short code.
    pub fn code(self) -> &'static str {
        ALL[self as usize].1
    }

    /// The flag for a short code (`"UH"`); `None` for codes Envoy has no flag for (e.g. the
    /// `RBAC` detail of an RBAC denial, which Envoy reports only in response code details).
    pub fn from_code(code: &str) -> Option<Flag> {
        ALL.iter().find(|(_, c)| *c == code).map(|(f, _)| *f)
    }
}

/// A set of response flags (one `u32`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(pub u32);

impl ResponseFlags {
    /// Add a flag.
    pub fn set(&mut self, f: Flag) {
        self.0 |= 1 << (f as u32);
    }

    /// Add the flag named by a local reply's code (unknown codes add nothing).
    pub fn set_code(&mut self, code: &str) {
        if let Some(f) = Flag::from_code(code) {
            self.set(f);
        }
    }

    /// Whether `f` is set.
    pub fn has(self, f: Flag) -> bool {
        self.0 & (1 << (f as u32)) != 0
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Append Envoy's rendering (`UF,URX`; `-` when empty).
    pub fn render(self, out: &mut String) {
        if self.is_empty() {
            out.push('-');
            return;
        }
        let mut first = true;
        for (f, c) in ALL {
            if self.has(f) {
                if !first {
                    out.push(',');
                }
                out.push_str(c);
                first = false;
            }
        }
    }

    /// The rendering, allocated only when two or more flags are set (`-` and a single
    /// code are static strings).
    pub fn rendered(self) -> std::borrow::Cow<'static, str> {
        if self.is_empty() {
            return std::borrow::Cow::Borrowed("-");
        }
        if self.0.is_power_of_two() {
            let bit = self.0.trailing_zeros() as usize;
            if let Some((_, c)) = ALL.get(bit) {
                return std::borrow::Cow::Borrowed(c);
            }
        }
        std::borrow::Cow::Owned(self.to_string_envoy())
    }

    /// The rendering as a string.
    pub fn to_string_envoy(self) -> String {
        let mut s = String::new();
        self.render(&mut s);
        s
    }
}

/// Flags shared between a request's pieces (router, body wrappers) without locks.
#[derive(Debug, Default)]
pub struct SharedFlags(AtomicU32);

impl SharedFlags {
    /// Add a flag.
    pub fn set(&self, f: Flag) {
        self.0.fetch_or(1 << (f as u32), Ordering::Relaxed);
    }

    /// Add flags.
    pub fn merge(&self, f: ResponseFlags) {
        self.0.fetch_or(f.0, Ordering::Relaxed);
    }

    /// The current set.
    pub fn get(&self) -> ResponseFlags {
        ResponseFlags(self.0.load(Ordering::Relaxed))
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for a local reply flagged `code` (as weir's local
/// replies carry their flag; unknown codes are reported as given).
pub fn local_reply_details(code: &str) -> &str {
    match code {
        "NR" => "route_not_found",
        "NC" => "cluster_not_found",
        "UH" => "no_healthy_upstream",
        "UF" => "upstream_reset_before_response_started{connection_failure}",
        "UC" => "upstream_reset_before_response_started{connection_termination}",
        "UR" => "upstream_reset_before_response_started{remote_refused_stream_reset}",
        "UO" => "upstream_reset_before_response_started{overflow}",
        "UT" => "upstream_response_timeout",
        "DT" => "request_overall_timeout",
        "RL" => "local_rate_limited",
        "OM" => "overload",
        "FI" => "fault_filter_abort",
        "LH" => "health_check_failed",
        "DPE" => "downstream_protocol_error",
        "UAEX" => "upgrade_failed",
        "RBAC" => "rbac_access_denied_matched_policy[none]",
        "" => "-",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_envoy_order() {
        let mut f = ResponseFlags::default();
        assert_eq!(f.to_string_envoy(), "-");
        f.set(Flag::UpstreamRetryLimitExceeded);
        f.set(Flag::UpstreamConnectionFailure);
        assert_eq!(f.to_string_envoy(), "UF,URX");
        f.set_code("NR");
        f.set_code("RBAC");
        assert_eq!(f.to_string_envoy(), "UF,NR,URX");
        assert_eq!(f.rendered(), "UF,NR,URX");
        assert_eq!(ResponseFlags::default().rendered(), "-");
        let mut one = ResponseFlags::default();
        one.set(Flag::UpstreamRetryLimitExceeded);
        assert!(matches!(one.rendered(), std::borrow::Cow::Borrowed("URX")));
        assert!(f.has(Flag::NoRouteFound));
        assert!(!f.has(Flag::NoHealthyUpstream));
    }

    #[test]
    fn codes_round_trip() {
        for (i, (f, c)) in ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
            assert_eq!(Flag::from_code(c), Some(*f));
            assert_eq!(f.code(), *c);
        }
        assert_eq!(Flag::from_code("RBAC"), None);
        let s = SharedFlags::default();
        s.set(Flag::DownstreamConnectionTermination);
        s.merge(ResponseFlags(1 << Flag::NoHealthyUpstream as u32));
        assert_eq!(s.get().to_string_envoy(), "UH,DC");
        assert_eq!(local_reply_details("UH"), "no_healthy_upstream");
        assert_eq!(local_reply_details("OM"), "overload");
        assert_eq!(local_reply_details("XYZ"), "XYZ");
    }
}
