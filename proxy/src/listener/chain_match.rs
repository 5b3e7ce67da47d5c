//! Filter-chain selection with Envoy's semantics, compiled once per listener.
//!
//! Envoy builds a tree with one level per criterion, in this order: destination port,
//! destination IP, server name, transport protocol, application protocols, direct source IP,
//! source type, source IP, source port. At each level the most specific key that matches the
//! connection is taken (exact port, longest CIDR prefix, exact server name > longest wildcard
//! suffix, ...), and a chain that sets no criterion at that level is the fallback for it. Once a
//! level picked a branch there is **no backtracking**: if that branch fails deeper down, the
//! connection gets the default filter chain (or none), exactly as in Envoy's
//! `FilterChainManagerImpl::findFilterChain`.
//!
//! Multi-valued criteria (several ports of `source_ports`, several `server_names`, ...) expand to
//! one path per value; two paths that end in the same leaf are an error, as in Envoy
//! ("multiple filter chains with overlapping matching rules").

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// What the matcher looks at for one connection.
#[derive(Debug, Clone, Copy)]
pub struct ChainInput<'a> {
    /// Local (destination) address of the connection.
    pub dst: SocketAddr,
    /// Peer (source) address.
    pub src: SocketAddr,
    /// SNI, when a listener filter found one.
    pub server_name: Option<&'a str>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: &'a str,
    /// ALPN offered by the client, in its order.
    pub alpn: &'a [&'a str],
}

/// An IP prefix (`address_prefix` masked to `prefix_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// A prefix; host bits are cleared. `None` if `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u32) -> Option<Self> {
        let addr = canonical(addr);
        match addr {
            IpAddr::V4(a) if len <= 32 => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                Some(Self {
                    addr: IpAddr::V4((u32::from(a) & mask).into()),
                    len: len as u8,
                })
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                Some(Self {
                    addr: IpAddr::V6((u128::from(a) & mask).into()),
                    len: len as u8,
                })
            }
            _ => None,
        }
    }

    /// Whether `ip` lies in this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(a) & mask == u32::from(n)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(a) & mask == u128::from(n)
            }
            _ => false,
        }
    }

    /// Prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `source_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SourceType {
    /// Any source.
    #[default]
    Any,
    /// Peer IP is loopback or equal to the local IP.
    SameIpOrLoopback,
    /// Anything else.
    External,
}

/// A chain's `filter_chain_match`, validated. Empty lists mean "no criterion".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainMatch {
    /// `destination_port`.
    pub destination_port: Option<u16>,
    /// `prefix_ranges` (destination IP).
    pub prefix_ranges: Vec<Cidr>,
    /// `server_names`, lower-cased; `*.example.com` for wildcards.
    pub server_names: Vec<String>,
    /// `transport_protocol` (empty: any).
    pub transport_protocol: String,
    /// `application_protocols`.
    pub application_protocols: Vec<String>,
    /// `direct_source_prefix_ranges`.
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// `source_type`.
    pub source_type: SourceType,
    /// `source_prefix_ranges`.
    pub source_prefix_ranges: Vec<Cidr>,
    /// `source_ports`.
    pub source_ports: Vec<u16>,
}

/// Why a set of chains cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchError {
    /// Chain `second` has the same `filter_chain_match` as chain `first`.
    Same {
        /// Earlier chain index.
        first: usize,
        /// Later chain index.
        second: usize,
    },
    /// Chain `second` overlaps `first` for at least one combination of values.
    Overlap {
        /// Earlier chain index (may equal `second` for a repeated value within one chain).
        first: usize,
        /// Later chain index.
        second: usize,
    },
}

/// One level keyed by exact values, with a fallback for "no criterion".
#[derive(Debug)]
struct Exact<K, V> {
    exact: HashMap<K, V>,
    any: Option<V>,
}

impl<K: std::hash::Hash + Eq, V: Default> Exact<K, V> {
    fn slot(&mut self, k: Option<K>) -> &mut V {
        match k {
            Some(k) => self.exact.entry(k).or_default(),
            None => self.any.get_or_insert_with(V::default),
        }
    }
}

impl<K, V> Default for Exact<K, V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            any: None,
        }
    }
}

/// One level keyed by IP prefix: longest matching prefix wins, then the fallback.
#[derive(Debug)]
struct Prefix<V> {
    /// Sorted by prefix length, longest first, once compiled.
    ranges: Vec<(Cidr, V)>,
    any: Option<V>,
}

impl<V> Default for Prefix<V> {
    fn default() -> Self {
        Self {
            ranges: Vec::new(),
            any: None,
        }
    }
}

impl<V: Default> Prefix<V> {
    fn slot(&mut self, k: Option<Cidr>) -> &mut V {
        match k {
            None => self.any.get_or_insert_with(V::default),
            Some(c) => {
                let i = match self.ranges.iter().position(|(r, _)| *r == c) {
                    Some(i) => i,
                    None => {
                        // Keep longest-first order so lookup can stop at the first hit.
                        let i = self.ranges.partition_point(|(r, _)| r.len >= c.len);
                        self.ranges.insert(i, (c, V::default()));
                        i
                    }
                };
                &mut self.ranges[i].1
            }
        }
    }
}

impl<V> Prefix<V> {
    fn get(&self, ip: IpAddr) -> Option<&V> {
        self.ranges
            .iter()
            .find(|(r, _)| r.contains(ip))
            .map(|(_, v)| v)
            .or(self.any.as_ref())
    }
}

#[derive(Debug, Default)]
struct SrcPorts(Exact<u16, Option<usize>>);
type SrcIps = Prefix<SrcPorts>;
#[derive(Debug, Default)]
struct SrcTypes {
    local: Option<SrcIps>,
    external: Option<SrcIps>,
    any: Option<SrcIps>,
}
type DirectSrcIps = Prefix<SrcTypes>;
type Alpns = Exact<String, DirectSrcIps>;
type Transports = Exact<String, Alpns>;
#[derive(Debug, Default)]
struct ServerNames {
    exact: HashMap<String, Transports>,
    /// Keyed by the suffix including its dot: `*.example.com` -> `.example.com`.
    wildcard: HashMap<String, Transports>,
    any: Option<Transports>,
}
type DstIps = Prefix<ServerNames>;
type DstPorts = Exact<u16, DstIps>;

/// The compiled matcher: a tree of per-criterion maps with chain indices at the leaves.
#[derive(Debug, Default)]
pub struct ChainMatcher {
    root: DstPorts,
}

/// `[]` -> `[None]`, `[a, b]` -> `[Some(a), Some(b)]`.
fn opts<T: Clone>(v: &[T]) -> Vec<Option<T>> {
    if v.is_empty() {
        vec![None]
    } else {
        v.iter().cloned().map(Some).collect()
    }
}

impl ChainMatcher {
    /// Compile the matches of a listener's chains (index = position in `filter_chains`).
    pub fn build(matches: &[&ChainMatch]) -> Result<Self, MatchError> {
        for (i, a) in matches.iter().enumerate() {
            if let Some(j) = matches[..i].iter().position(|b| same_rules(a, b)) {
                return Err(MatchError::Same {
                    first: j,
                    second: i,
                });
            }
        }
        let mut m = ChainMatcher::default();
        for (idx, cm) in matches.iter().enumerate() {
            m.insert(idx, cm)?;
        }
        Ok(m)
    }

    fn insert(&mut self, idx: usize, cm: &ChainMatch) -> Result<(), MatchError> {
        let dst_ips = self.root.slot(cm.destination_port);
        for dip in opts(&cm.prefix_ranges) {
            let names = dst_ips.slot(dip);
            for sn in opts(&cm.server_names) {
                let transports = match sn {
                    None => names.any.get_or_insert_with(Default::default),
                    Some(s) => match s.strip_prefix('*') {
                        Some(suffix) => names.wildcard.entry(suffix.to_string()).or_default(),
                        None => names.exact.entry(s).or_default(),
                    },
                };
                let tp = (!cm.transport_protocol.is_empty()).then(|| cm.transport_protocol.clone());
                let alpns = transports.slot(tp);
                for ap in opts(&cm.application_protocols) {
                    let direct = alpns.slot(ap);
                    for dsrc in opts(&cm.direct_source_prefix_ranges) {
                        let types = direct.slot(dsrc);
                        let src_ips = match cm.source_type {
                            SourceType::Any => &mut types.any,
                            SourceType::SameIpOrLoopback => &mut types.local,
                            SourceType::External => &mut types.external,
                        }
                        .get_or_insert_with(Default::default);
                        for sip in opts(&cm.source_prefix_ranges) {
                            let ports = src_ips.slot(sip);
                            for sp in opts(&cm.source_ports) {
                                let leaf = ports.0.slot(sp);
                                if let Some(first) = *leaf {
                                    return Err(MatchError::Overlap { first, second: idx });
                                }
                                *leaf = Some(idx);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The index of the chain for a connection, if any (no default chain here).
    pub fn select(&self, input: &ChainInput<'_>) -> Option<usize> {
        let dst_ips = self
            .root
            .exact
            .get(&input.dst.port())
            .or(self.root.any.as_ref())?;
        let names = dst_ips.get(input.dst.ip())?;
        let transports = select_server_name(names, input.server_name)?;
        let alpns = transports
            .exact
            .get(input.transport_protocol)
            .or(transports.any.as_ref())?;
        let direct = input
            .alpn
            .iter()
            .find_map(|p| alpns.exact.get(*p))
            .or(alpns.any.as_ref())?;
        // No listener filter rewrites the source yet: the direct source is the peer.
        let types = direct.get(input.src.ip())?;
        let local = {
            let s = canonical(input.src.ip());
            s.is_loopback() || s == canonical(input.dst.ip())
        };
        let specific = if local { &types.local } else { &types.external };
        let src_ips = specific.as_ref().or(types.any.as_ref())?;
        let ports = src_ips.get(input.src.ip())?;
        ports
            .0
            .exact
            .get(&input.src.port())
            .or(ports.0.any.as_ref())
            .copied()
            .flatten()
    }
}

fn select_server_name<'a>(names: &'a ServerNames, sni: Option<&str>) -> Option<&'a Transports> {
    if let Some(sni) = sni.filter(|s| !s.is_empty()) {
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            lower.as_str()
        } else {
            sni
        };
        if let Some(t) = names.exact.get(sni) {
            return Some(t);
        }
        if !names.wildcard.is_empty() {
            // Longest suffix first: `a.b.example.com` tries `.b.example.com`, then `.example.com`.
            // Like Envoy, the search for a dot starts at index 1 and a trailing dot is no suffix.
            // `.` is ASCII, so every position found is a char boundary.
            let dots = sni
                .bytes()
                .enumerate()
                .skip(1)
                .filter(|&(pos, b)| b == b'.' && pos + 1 < sni.len());
            for (pos, _) in dots {
                if let Some(t) = names.wildcard.get(&sni[pos..]) {
                    return Some(t);
                }
            }
        }
    }
    names.any.as_ref()
}

/// Envoy compares the match messages; compare them as sets where order does not matter.
fn same_rules(a: &ChainMatch, b: &ChainMatch) -> bool {
    fn set<T: Ord + Clone>(v: &[T]) -> Vec<T> {
        let mut v = v.to_vec();
        v.sort();
        v.dedup();
        v
    }
    fn cidrs(v: &[Cidr]) -> Vec<String> {
        set(&v.iter().map(|c| c.to_string()).collect::<Vec<_>>())
    }
    a.destination_port == b.destination_port
        && cidrs(&a.prefix_ranges) == cidrs(&b.prefix_ranges)
        && set(&a.server_names) == set(&b.server_names)
        && a.transport_protocol == b.transport_protocol
        && set(&a.application_protocols) == set(&b.application_protocols)
        && cidrs(&a.direct_source_prefix_ranges) == cidrs(&b.direct_source_prefix_ranges)
        && a.source_type == b.source_type
        && cidrs(&a.source_prefix_ranges) == cidrs(&b.source_prefix_ranges)
        && set(&a.source_ports) == set(&b.source_ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').expect("cidr");
        Cidr::new(a.parse().expect("ip"), l.parse().expect("len")).expect("valid")
    }

    fn input<'a>(dst: &str, src: &str) -> ChainInput<'a> {
        ChainInput {
            dst: dst.parse().expect("dst"),
            src: src.parse().expect("src"),
            server_name: None,
            transport_protocol: "raw_buffer",
            alpn: &[],
        }
    }

    fn build(ms: &[ChainMatch]) -> ChainMatcher {
        ChainMatcher::build(&ms.iter().collect::<Vec<_>>()).expect("compiles")
    }

    const DST: &str = "10.0.0.1:443";
    const SRC: &str = "192.168.1.5:40000";

    #[test]
    fn empty_match_is_catch_all() {
        let m = build(&[ChainMatch::default()]);
        assert_eq!(m.select(&input(DST, SRC)), Some(0));
        assert_eq!(m.select(&input("[::1]:1", "[::1]:2")), Some(0));
        let none = ChainMatcher::build(&[]).expect("empty");
        assert_eq!(none.select(&input(DST, SRC)), None);
    }

    #[test]
    fn destination_port_exact_beats_any_without_backtracking() {
        let m = build(&[
            ChainMatch::default(),
            ChainMatch {
                destination_port: Some(443),
                source_ports: vec![1],
                ..Default::default()
            },
        ]);
        assert_eq!(m.select(&input("10.0.0.1:80", SRC)), Some(0));
        assert_eq!(m.select(&input(DST, "192.168.1.5:1")), Some(1));
        // Port 443 has a branch; its source port does not match: no fallback to chain 0.
        assert_eq!(m.select(&input(DST, SRC)), None);
    }

    #[test]
    fn destination_ip_longest_prefix() {
        let m = build(&[
            ChainMatch {
                prefix_ranges: vec![cidr("10.0.0.0/8")],
                ..Default::default()
            },
            ChainMatch {
                prefix_ranges: vec![cidr("10.0.0.0/24")],
                ..Default::default()
            },
            ChainMatch::default(),
            ChainMatch {
                prefix_ranges: vec![cidr("2001:db8::/32")],
                ..Default::default()
            },
        ]);
        assert_eq!(m.select(&input("10.0.0.9:1", SRC)), Some(1));
        assert_eq!(m.select(&input("10.1.0.9:1", SRC)), Some(0));
        assert_eq!(m.select(&input("11.0.0.1:1", SRC)), Some(2));
        assert_eq!(m.select(&input("[2001:db8::1]:1", SRC)), Some(3));
        assert_eq!(m.select(&input("[2001:db9::1]:1", SRC)), Some(2));
        // IPv4-mapped IPv6 is compared as IPv4.
        assert_eq!(m.select(&input("[::ffff:10.0.0.9]:1", SRC)), Some(1));
    }

    #[test]
    fn destination_ip_without_fallback_is_no_match() {
        let m = build(&[ChainMatch {
            prefix_ranges: vec![cidr("10.0.0.0/8")],
            ..Default::default()
        }]);
        assert_eq!(m.select(&input("127.0.0.1:1", SRC)), None);
    }

    fn sni_matcher() -> ChainMatcher {
        build(&[
            ChainMatch {
                server_names: vec!["www.example.com".into()],
                ..Default::default()
            },
            ChainMatch {
                server_names: vec!["*.example.com".into()],
                ..Default::default()
            },
            ChainMatch {
                server_names: vec!["*.b.example.com".into()],
                ..Default::default()
            },
            ChainMatch::default(),
        ])
    }

    #[test]
    fn server_name_exact_then_longest_wildcard_then_none() {
        let m = sni_matcher();
        let sel = |sni: Option<&str>| {
            m.select(&ChainInput {
                server_name: sni,
                ..input(DST, SRC)
            })
        };
        assert_eq!(sel(Some("www.example.com")), Some(0));
        assert_eq!(sel(Some("WWW.Example.com")), Some(0));
        assert_eq!(sel(Some("api.example.com")), Some(1));
        assert_eq!(sel(Some("a.b.example.com")), Some(2));
        assert_eq!(sel(Some("x.a.b.example.com")), Some(2));
        // `*.example.com` does not match the bare domain.
        assert_eq!(sel(Some("example.com")), Some(3));
        assert_eq!(sel(Some("other.org")), Some(3));
        assert_eq!(sel(Some("example.com.")), Some(3));
        assert_eq!(sel(Some("")), Some(3));
        assert_eq!(sel(Some("é.example.com")), Some(1));
        assert_eq!(sel(Some(".example.com")), Some(3));
        assert_eq!(sel(None), Some(3));
    }

    #[test]
    fn server_name_without_fallback() {
        let m = build(&[ChainMatch {
            server_names: vec!["*.example.com".into()],
            ..Default::default()
        }]);
        assert_eq!(m.select(&input(DST, SRC)), None);
    }

    #[test]
    fn transport_protocol() {
        let m = build(&[
            ChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            },
            ChainMatch::default(),
        ]);
        let tls = ChainInput {
            transport_protocol: "tls",
            ..input(DST, SRC)
        };
        assert_eq!(m.select(&tls), Some(0));
        assert_eq!(m.select(&input(DST, SRC)), Some(1));
        let only_raw = build(&[ChainMatch {
            transport_protocol: "raw_buffer".into(),
            ..Default::default()
        }]);
        assert_eq!(only_raw.select(&tls), None);
        assert_eq!(only_raw.select(&input(DST, SRC)), Some(0));
    }

    #[test]
    fn application_protocols_in_client_order() {
        let m = build(&[
            ChainMatch {
                application_protocols: vec!["http/1.1".into()],
                ..Default::default()
            },
            ChainMatch {
                application_protocols: vec!["h2".into()],
                ..Default::default()
            },
            ChainMatch::default(),
        ]);
        let sel = |alpn: &[&str]| {
            m.select(&ChainInput {
                alpn,
                ..input(DST, SRC)
            })
        };
        assert_eq!(sel(&["h2", "http/1.1"]), Some(1));
        assert_eq!(sel(&["http/1.1", "h2"]), Some(0));
        assert_eq!(sel(&["h3", "h2"]), Some(1));
        assert_eq!(sel(&["h3"]), Some(2));
        assert_eq!(sel(&[]), Some(2));
    }

    #[test]
    fn direct_source_ip() {
        let m = build(&[
            ChainMatch {
                direct_source_prefix_ranges: vec![cidr("192.168.0.0/16")],
                ..Default::default()
            },
            ChainMatch::default(),
        ]);
        assert_eq!(m.select(&input(DST, SRC)), Some(0));
        assert_eq!(m.select(&input(DST, "8.8.8.8:1")), Some(1));
    }

    #[test]
    fn source_type() {
        let m = build(&[
            ChainMatch {
                source_type: SourceType::SameIpOrLoopback,
                ..Default::default()
            },
            ChainMatch {
                source_type: SourceType::External,
                source_ports: vec![7],
                ..Default::default()
            },
            ChainMatch::default(),
        ]);
        assert_eq!(m.select(&input(DST, "127.0.0.1:5")), Some(0));
        assert_eq!(m.select(&input(DST, "10.0.0.1:5")), Some(0));
        assert_eq!(m.select(&input("[::1]:1", "[::1]:5")), Some(0));
        assert_eq!(m.select(&input(DST, "8.8.8.8:7")), Some(1));
        // External branch exists but its port does not match: no backtracking to ANY.
        assert_eq!(m.select(&input(DST, "8.8.8.8:8")), None);
        let only_any = build(&[
            ChainMatch {
                source_type: SourceType::SameIpOrLoopback,
                ..Default::default()
            },
            ChainMatch::default(),
        ]);
        assert_eq!(only_any.select(&input(DST, "8.8.8.8:8")), Some(1));
    }

    #[test]
    fn source_ip_and_port() {
        let m = build(&[
            ChainMatch {
                source_prefix_ranges: vec![cidr("192.168.0.0/16")],
                ..Default::default()
            },
            ChainMatch {
                source_prefix_ranges: vec![cidr("192.168.1.0/24")],
                source_ports: vec![40000, 40001],
                ..Default::default()
            },
            ChainMatch {
                source_prefix_ranges: vec![cidr("192.168.1.0/24")],
                ..Default::default()
            },
            ChainMatch {
                source_ports: vec![53],
                ..Default::default()
            },
        ]);
        assert_eq!(m.select(&input(DST, "192.168.1.5:40000")), Some(1));
        assert_eq!(m.select(&input(DST, "192.168.1.5:40001")), Some(1));
        assert_eq!(m.select(&input(DST, "192.168.1.5:40002")), Some(2));
        assert_eq!(m.select(&input(DST, "192.168.2.5:40000")), Some(0));
        assert_eq!(m.select(&input(DST, "8.8.8.8:53")), Some(3));
        assert_eq!(m.select(&input(DST, "8.8.8.8:54")), None);
    }

    #[test]
    fn earlier_level_decides_before_later_ones() {
        // Destination IP is evaluated before server name: a matching /32 decides even though
        // the other chain names the exact server.
        let m = build(&[
            ChainMatch {
                server_names: vec!["a.com".into()],
                ..Default::default()
            },
            ChainMatch {
                prefix_ranges: vec![cidr("10.0.0.1/32")],
                ..Default::default()
            },
        ]);
        let sel = ChainInput {
            server_name: Some("a.com"),
            ..input(DST, SRC)
        };
        assert_eq!(m.select(&sel), Some(1));
        let other = ChainInput {
            server_name: Some("a.com"),
            ..input("10.0.0.2:443", SRC)
        };
        assert_eq!(m.select(&other), Some(0));
    }

    #[test]
    fn identical_matches_are_rejected() {
        let a = ChainMatch {
            server_names: vec!["a.com".into(), "b.com".into()],
            ..Default::default()
        };
        let b = ChainMatch {
            server_names: vec!["b.com".into(), "a.com".into()],
            ..Default::default()
        };
        assert_eq!(
            ChainMatcher::build(&[&ChainMatch::default(), &a, &b]).expect_err("dup"),
            MatchError::Same {
                first: 1,
                second: 2
            }
        );
        assert_eq!(
            ChainMatcher::build(&[&ChainMatch::default(), &ChainMatch::default()])
                .expect_err("dup"),
            MatchError::Same {
                first: 0,
                second: 1
            }
        );
    }

    #[test]
    fn overlapping_matches_are_rejected() {
        let a = ChainMatch {
            server_names: vec!["a.com".into(), "b.com".into()],
            ..Default::default()
        };
        let b = ChainMatch {
            server_names: vec!["b.com".into()],
            ..Default::default()
        };
        assert_eq!(
            ChainMatcher::build(&[&a, &b]).expect_err("overlap"),
            MatchError::Overlap {
                first: 0,
                second: 1
            }
        );
        let rep = ChainMatch {
            source_ports: vec![5, 5],
            ..Default::default()
        };
        assert_eq!(
            ChainMatcher::build(&[&rep]).expect_err("repeat"),
            MatchError::Overlap {
                first: 0,
                second: 0
            }
        );
    }

    #[test]
    fn cidr_masks_and_bounds() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(Cidr::new("10.0.0.0".parse().expect("ip"), 33).is_none());
        assert!(Cidr::new("::".parse().expect("ip"), 129).is_none());
        assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().expect("ip")));
        assert!(!cidr("0.0.0.0/0").contains("::1".parse().expect("ip")));
        assert!(cidr("::/0").contains("::1".parse().expect("ip")));
    }
}
