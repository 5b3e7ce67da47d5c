//! `weir-init`: the iptables rules that make weir a transparent sidecar (Istio's conventions).
//!
//! Pure rule generation lives here ([`Config`] -> [`rules`] -> [`restore_input`]); running
//! `iptables`/`ip6tables` is in [`apply`] behind the [`apply::Exec`] trait so the command
//! sequences are unit-tested without touching the kernel. The binary is
//! `proxy/src/bin/weir-init.rs`.
//!
//! ## The rules (nat table, per address family)
//! ```text
//! PREROUTING  -p tcp -j WEIR_INBOUND            (only when inbound capture is on)
//! OUTPUT      -p tcp -j WEIR_OUTPUT
//! WEIR_INBOUND:    RETURN for excluded inbound ports, then
//!                  "*": -p tcp -j WEIR_IN_REDIRECT   or   per included port: --dport P -j WEIR_IN_REDIRECT
//! WEIR_IN_REDIRECT: -p tcp -j REDIRECT --to-ports 15006
//! WEIR_OUTPUT:     RETURN for excluded outbound ports
//!                  proxy uid/gid talking to a non-loopback address over lo -> WEIR_IN_REDIRECT
//!                  (the app calling its own pod IP through the sidecar: treat as inbound)
//!                  lo from anyone but the proxy -> RETURN; the proxy's uid/gid -> RETURN
//!                  -d 127.0.0.1/32 (::1/128) -> RETURN; excluded CIDRs -> RETURN
//!                  included CIDRs (or everything for "*") -> WEIR_REDIRECT
//! WEIR_REDIRECT:   -p tcp -j REDIRECT --to-ports 15001
//! ```
//! The proxy's own uid/gid exclusion is what keeps weir's upstream connections from being
//! captured again (a loop). Only TCP is redirected.
//!
//! ## Idempotence
//! Apply feeds [`restore_input`] to `iptables-restore --noflush`: declaring the `WEIR_*`
//! chains flushes and refills them atomically, and the jump rules from `PREROUTING`/`OUTPUT`
//! are only added when `iptables -C` says they are missing, so running apply twice leaves one
//! set of rules. Cleanup deletes the jump rules (as many times as they occur), then flushes
//! and deletes the chains; missing rules/chains are not errors, so cleanup is idempotent too.

pub mod apply;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// weir's outbound capture port (Istio's 15001).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// weir's inbound capture port (Istio's 15006).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The default proxy uid/gid (Istio's 1337).
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// Inbound ports left alone by default: admin (15000), the agent (15020), health (15021),
/// Prometheus (15090).
pub const DEFAULT_EXCLUDE_INBOUND_PORTS: &[u16] = &[15000, 15020, 15021, 15090];

/// Chain names (nat table).
pub const CHAIN_OUTPUT: &str = "WEIR_OUTPUT";
/// Outbound redirect chain.
pub const CHAIN_REDIRECT: &str = "WEIR_REDIRECT";
/// Inbound classification chain.
pub const CHAIN_INBOUND: &str = "WEIR_INBOUND";
/// Inbound redirect chain.
pub const CHAIN_IN_REDIRECT: &str = "WEIR_IN_REDIRECT";
/// Every chain weir-init owns, in creation order.
pub const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];

/// Invalid flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A CIDR that does not parse.
    #[error("invalid CIDR {value:?}: {reason}")]
    Cidr {
        /// The flag value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A port list entry that does not parse or is 0.
    #[error("invalid port {value:?} in {flag}: expected 1-65535")]
    Port {
        /// The flag.
        flag: &'static str,
        /// The entry.
        value: String,
    },
    /// The two capture ports must differ.
    #[error("the outbound and inbound capture ports must differ (both {0})")]
    SamePorts(u16),
}

/// An address family: `iptables` (IPv4) or `ip6tables` (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4, `iptables`.
    V4,
    /// IPv6, `ip6tables`.
    V6,
}

impl Family {
    /// The rule command (`iptables` / `ip6tables`).
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The restore command (`iptables-restore` / `ip6tables-restore`).
    pub fn restore_command(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
}

/// An IP prefix (`10.0.0.0/8`, `fd00::/8`; a bare address is a host prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// The family of the prefix.
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConfigError::Cidr {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| bad(&format!("prefix length must be 0-{max}")))?,
        };
        // Clear host bits so the rule text is canonical (iptables would do the same).
        let addr = match addr {
            IpAddr::V4(v) => {
                let bits = u32::from(v);
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v) => {
                let bits = u128::from(v);
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((bits & mask).into())
            }
        };
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A set of CIDRs or everything (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSet {
    /// Every destination.
    All,
    /// Only these (may be empty: nothing is captured).
    Only(Vec<Cidr>),
}

impl FromStr for CidrSet {
    type Err = ConfigError;

    /// `*`, or a comma-separated list (possibly empty).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "*" {
            return Ok(CidrSet::All);
        }
        split_list(s)
            .map(Cidr::from_str)
            .collect::<Result<_, _>>()
            .map(CidrSet::Only)
    }
}

/// A set of ports or every port (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSet {
    /// Every port.
    All,
    /// Only these (may be empty: nothing is captured).
    Only(Vec<u16>),
}

fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

/// Parse a comma-separated port list (`flag` names the flag in errors).
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, ConfigError> {
    split_list(s)
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| ConfigError::Port {
                    flag,
                    value: p.to_string(),
                })
        })
        .collect()
}

/// Parse `*` or a comma-separated port list.
pub fn parse_port_set(flag: &'static str, s: &str) -> Result<PortSet, ConfigError> {
    if s.trim() == "*" {
        Ok(PortSet::All)
    } else {
        parse_ports(flag, s).map(PortSet::Only)
    }
}

/// Parse a comma-separated CIDR list.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, ConfigError> {
    split_list(s).map(Cidr::from_str).collect()
}

/// What to capture and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Port weir's virtual outbound listener listens on (15001).
    pub outbound_port: u16,
    /// Port weir's inbound listener listens on (15006).
    pub inbound_port: u16,
    /// uids whose traffic is never captured (the proxy's).
    pub proxy_uids: Vec<u32>,
    /// gids whose traffic is never captured (the proxy's).
    pub proxy_gids: Vec<u32>,
    /// Outbound destinations captured.
    pub include_outbound_cidrs: CidrSet,
    /// Outbound destinations never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound destination ports captured.
    pub include_inbound_ports: PortSet,
    /// Inbound destination ports never captured.
    pub exclude_inbound_ports: Vec<u16>,
    /// Also program ip6tables.
    pub ipv6: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            outbound_port: OUTBOUND_CAPTURE_PORT,
            inbound_port: INBOUND_CAPTURE_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            include_outbound_cidrs: CidrSet::All,
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: PortSet::All,
            exclude_inbound_ports: DEFAULT_EXCLUDE_INBOUND_PORTS.to_vec(),
            ipv6: false,
        }
    }
}

impl Config {
    /// Cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.outbound_port == self.inbound_port {
            return Err(ConfigError::SamePorts(self.outbound_port));
        }
        Ok(())
    }

    /// The families to program.
    pub fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// Whether inbound capture is on at all.
    pub fn captures_inbound(&self) -> bool {
        match &self.include_inbound_ports {
            PortSet::All => true,
            PortSet::Only(p) => !p.is_empty(),
        }
    }
}

/// One rule: the chain it goes to and its arguments after `-A CHAIN` (nat table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Chain name.
    pub chain: &'static str,
    /// Match and target arguments.
    pub args: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, args: &[&str]) -> Rule {
        Rule {
            chain,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `-A CHAIN args...` as one line.
    pub fn append_line(&self) -> String {
        format!("-A {} {}", self.chain, self.args.join(" "))
    }
}

/// The jump rules from the built-in chains into weir's chains, for `cfg`.
pub fn jumps(cfg: &Config) -> Vec<Rule> {
    let mut v = Vec::new();
    if cfg.captures_inbound() {
        v.push(Rule::new("PREROUTING", &["-p", "tcp", "-j", CHAIN_INBOUND]));
    }
    v.push(Rule::new("OUTPUT", &["-p", "tcp", "-j", CHAIN_OUTPUT]));
    v
}

/// Every jump rule weir-init may have installed (cleanup removes all of them whatever the
/// flags were at apply time).
pub fn all_jumps() -> Vec<Rule> {
    vec![
        Rule::new("PREROUTING", &["-p", "tcp", "-j", CHAIN_INBOUND]),
        Rule::new("OUTPUT", &["-p", "tcp", "-j", CHAIN_OUTPUT]),
    ]
}

/// The rules of weir's own chains for one family, in order.
pub fn rules(cfg: &Config, family: Family) -> Vec<Rule> {
    let mut v = Vec::new();
    let port = |p: u16| p.to_string();

    // Inbound.
    if cfg.captures_inbound() {
        for p in &cfg.exclude_inbound_ports {
            v.push(Rule::new(
                CHAIN_INBOUND,
                &[
                    "-p",
                    "tcp",
                    "-m",
                    "tcp",
                    "--dport",
                    &port(*p),
                    "-j",
                    "RETURN",
                ],
            ));
        }
        match &cfg.include_inbound_ports {
            PortSet::All => v.push(Rule::new(
                CHAIN_INBOUND,
                &["-p", "tcp", "-j", CHAIN_IN_REDIRECT],
            )),
            PortSet::Only(ports) => {
                for p in ports {
                    v.push(Rule::new(
                        CHAIN_INBOUND,
                        &[
                            "-p",
                            "tcp",
                            "-m",
                            "tcp",
                            "--dport",
                            &port(*p),
                            "-j",
                            CHAIN_IN_REDIRECT,
                        ],
                    ));
                }
            }
        }
    }
    v.push(Rule::new(
        CHAIN_IN_REDIRECT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port(cfg.inbound_port),
        ],
    ));

    // Outbound.
    for p in &cfg.exclude_outbound_ports {
        v.push(Rule::new(
            CHAIN_OUTPUT,
            &[
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                &port(*p),
                "-j",
                "RETURN",
            ],
        ));
    }
    let lo = family.loopback();
    let owners: Vec<(&str, String)> = cfg
        .proxy_uids
        .iter()
        .map(|u| ("--uid-owner", u.to_string()))
        .chain(
            cfg.proxy_gids
                .iter()
                .map(|g| ("--gid-owner", g.to_string())),
        )
        .collect();
    for (flag, id) in &owners {
        // The proxy connecting to the pod's own (non-loopback) address: that is the app
        // calling itself through its service, so it goes through inbound handling.
        if cfg.captures_inbound() {
            v.push(Rule::new(
                CHAIN_OUTPUT,
                &[
                    "!",
                    "-d",
                    lo,
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    flag,
                    id,
                    "-j",
                    CHAIN_IN_REDIRECT,
                ],
            ));
        }
        // Loopback traffic of anyone else is the app talking to itself: leave it.
        v.push(Rule::new(
            CHAIN_OUTPUT,
            &["-o", "lo", "-m", "owner", "!", flag, id, "-j", "RETURN"],
        ));
        // The proxy's own upstream traffic is never captured (no loop).
        v.push(Rule::new(
            CHAIN_OUTPUT,
            &["-m", "owner", flag, id, "-j", "RETURN"],
        ));
    }
    if owners.is_empty() {
        v.push(Rule::new(CHAIN_OUTPUT, &["-o", "lo", "-j", "RETURN"]));
    }
    v.push(Rule::new(CHAIN_OUTPUT, &["-d", lo, "-j", "RETURN"]));
    for c in cfg
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        v.push(Rule::new(
            CHAIN_OUTPUT,
            &["-d", &c.to_string(), "-j", "RETURN"],
        ));
    }
    match &cfg.include_outbound_cidrs {
        CidrSet::All => v.push(Rule::new(CHAIN_OUTPUT, &["-j", CHAIN_REDIRECT])),
        CidrSet::Only(cidrs) => {
            for c in cidrs.iter().filter(|c| c.family() == family) {
                v.push(Rule::new(
                    CHAIN_OUTPUT,
                    &["-d", &c.to_string(), "-j", CHAIN_REDIRECT],
                ));
            }
            v.push(Rule::new(CHAIN_OUTPUT, &["-j", "RETURN"]));
        }
    }
    v.push(Rule::new(
        CHAIN_REDIRECT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port(cfg.outbound_port),
        ],
    ));
    v
}

/// The `iptables-restore --noflush` input for one family: weir's chains declared (which
/// flushes them if they exist), their rules, and the jump rules in `missing_jumps` (the ones
/// not installed yet), in one `*nat` transaction.
pub fn restore_input(cfg: &Config, family: Family, missing_jumps: &[Rule]) -> String {
    let mut out = String::from("*nat\n");
    for c in CHAINS {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in rules(cfg, family) {
        out.push_str(&r.append_line());
        out.push('\n');
    }
    for j in missing_jumps {
        out.push_str(&j.append_line());
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(cfg: &Config, f: Family) -> Vec<String> {
        rules(cfg, f).iter().map(Rule::append_line).collect()
    }

    #[test]
    fn cidr_parsing() {
        let c: Cidr = "10.1.2.3/8".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(c.family(), Family::V4);
        assert_eq!(
            "192.168.1.7".parse::<Cidr>().expect("host").to_string(),
            "192.168.1.7/32"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().expect("all").to_string(),
            "0.0.0.0/0"
        );
        let c: Cidr = "fd00:1::5/16".parse().expect("v6");
        assert_eq!(c.to_string(), "fd00::/16");
        assert_eq!(c.family(), Family::V6);
        assert_eq!("::/0".parse::<Cidr>().expect("v6 all").to_string(), "::/0");
        assert_eq!("2001:db8::1".parse::<Cidr>().expect("v6 host").len, 128);
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "nope/8",
            "10.0.0.0/x",
            "",
            "10.0.0/8",
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(matches!(e, ConfigError::Cidr { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("invalid CIDR"), "{e}");
        }
    }

    #[test]
    fn sets_and_ports() {
        assert_eq!("*".parse::<CidrSet>(), Ok(CidrSet::All));
        assert_eq!("".parse::<CidrSet>(), Ok(CidrSet::Only(vec![])));
        assert_eq!(
            "10.0.0.0/8, fd00::/8".parse::<CidrSet>().expect("set"),
            CidrSet::Only(vec![
                "10.0.0.0/8".parse().expect("c"),
                "fd00::/8".parse().expect("c")
            ])
        );
        assert!("10.0.0.0/8,bad".parse::<CidrSet>().is_err());
        assert_eq!(parse_ports("--x", "22, 8080,"), Ok(vec![22, 8080]));
        assert_eq!(parse_ports("--x", ""), Ok(vec![]));
        assert_eq!(
            parse_ports("--exclude-outbound-ports", "22,0"),
            Err(ConfigError::Port {
                flag: "--exclude-outbound-ports",
                value: "0".into()
            })
        );
        assert!(parse_ports("--x", "70000").is_err());
        assert!(parse_ports("--x", "http").is_err());
        assert_eq!(parse_port_set("--x", " * "), Ok(PortSet::All));
        assert_eq!(parse_port_set("--x", "80"), Ok(PortSet::Only(vec![80])));
        assert_eq!(parse_cidrs("1.2.3.4").expect("c").len(), 1);
    }

    #[test]
    fn validate_rejects_same_ports() {
        let c = Config {
            inbound_port: 15001,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::SamePorts(15001)));
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn default_rules_ipv4() {
        let c = Config::default();
        assert_eq!(
            lines(&c, Family::V4),
            vec![
                "-A WEIR_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
                "-A WEIR_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A WEIR_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
                "-A WEIR_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A WEIR_INBOUND -p tcp -j WEIR_IN_REDIRECT",
                "-A WEIR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A WEIR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j WEIR_IN_REDIRECT",
                "-A WEIR_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A WEIR_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A WEIR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j WEIR_IN_REDIRECT",
                "-A WEIR_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-A WEIR_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A WEIR_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A WEIR_OUTPUT -j WEIR_REDIRECT",
                "-A WEIR_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        assert_eq!(
            jumps(&c).iter().map(Rule::append_line).collect::<Vec<_>>(),
            vec![
                "-A PREROUTING -p tcp -j WEIR_INBOUND",
                "-A OUTPUT -p tcp -j WEIR_OUTPUT"
            ]
        );
    }

    #[test]
    fn exclusions_and_includes() {
        let c = Config {
            outbound_port: 16001,
            inbound_port: 16006,
            proxy_uids: vec![101],
            proxy_gids: vec![],
            include_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse().expect("set"),
            exclude_outbound_cidrs: parse_cidrs("10.9.0.0/16,fd00:9::/32").expect("c"),
            exclude_outbound_ports: vec![22, 3306],
            include_inbound_ports: PortSet::Only(vec![8080, 9090]),
            exclude_inbound_ports: vec![15090],
            ipv6: true,
        };
        assert_eq!(
            lines(&c, Family::V4),
            vec![
                "-A WEIR_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
                "-A WEIR_INBOUND -p tcp -m tcp --dport 8080 -j WEIR_IN_REDIRECT",
                "-A WEIR_INBOUND -p tcp -m tcp --dport 9090 -j WEIR_IN_REDIRECT",
                "-A WEIR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
                "-A WEIR_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A WEIR_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN",
                "-A WEIR_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 101 -j WEIR_IN_REDIRECT",
                "-A WEIR_OUTPUT -o lo -m owner ! --uid-owner 101 -j RETURN",
                "-A WEIR_OUTPUT -m owner --uid-owner 101 -j RETURN",
                "-A WEIR_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A WEIR_OUTPUT -d 10.9.0.0/16 -j RETURN",
                "-A WEIR_OUTPUT -d 10.0.0.0/8 -j WEIR_REDIRECT",
                "-A WEIR_OUTPUT -j RETURN",
                "-A WEIR_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            ]
        );
        // IPv6 gets the IPv6 prefixes and ::1.
        assert_eq!(
            lines(&c, Family::V6)[6..],
            [
                "-A WEIR_OUTPUT ! -d ::1/128 -o lo -m owner --uid-owner 101 -j WEIR_IN_REDIRECT",
                "-A WEIR_OUTPUT -o lo -m owner ! --uid-owner 101 -j RETURN",
                "-A WEIR_OUTPUT -m owner --uid-owner 101 -j RETURN",
                "-A WEIR_OUTPUT -d ::1/128 -j RETURN",
                "-A WEIR_OUTPUT -d fd00:9::/32 -j RETURN",
                "-A WEIR_OUTPUT -d fd00::/8 -j WEIR_REDIRECT",
                "-A WEIR_OUTPUT -j RETURN",
                "-A WEIR_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            ]
        );
        assert_eq!(c.families(), vec![Family::V4, Family::V6]);
    }

    #[test]
    fn no_inbound_capture_and_no_outbound_cidrs() {
        let c = Config {
            include_inbound_ports: PortSet::Only(vec![]),
            include_outbound_cidrs: CidrSet::Only(vec![]),
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..Config::default()
        };
        assert!(!c.captures_inbound());
        assert_eq!(
            lines(&c, Family::V4),
            vec![
                "-A WEIR_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A WEIR_OUTPUT -o lo -j RETURN",
                "-A WEIR_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A WEIR_OUTPUT -j RETURN",
                "-A WEIR_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        // No PREROUTING jump without inbound capture.
        assert_eq!(
            jumps(&c).iter().map(Rule::append_line).collect::<Vec<_>>(),
            vec!["-A OUTPUT -p tcp -j WEIR_OUTPUT"]
        );
        assert_eq!(all_jumps().len(), 2);
    }

    #[test]
    fn restore_input_declares_chains_and_adds_missing_jumps() {
        let c = Config::default();
        let all = restore_input(&c, Family::V4, &jumps(&c));
        assert!(all.starts_with(
            "*nat\n:WEIR_INBOUND - [0:0]\n:WEIR_IN_REDIRECT - [0:0]\n:WEIR_OUTPUT - [0:0]\n:WEIR_REDIRECT - [0:0]\n-A WEIR_INBOUND"
        ));
        assert!(all.ends_with(
            "-A PREROUTING -p tcp -j WEIR_INBOUND\n-A OUTPUT -p tcp -j WEIR_OUTPUT\nCOMMIT\n"
        ));
        assert_eq!(
            all.lines().count(),
            1 + 4 + rules(&c, Family::V4).len() + 2 + 1
        );
        let none = restore_input(&c, Family::V4, &[]);
        assert!(!none.contains("PREROUTING"));
        assert!(!none.contains("-A OUTPUT"));
        assert!(none.ends_with("REDIRECT --to-ports 15001\nCOMMIT\n"));
    }
}
