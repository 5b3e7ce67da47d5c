//! Running the rules: `iptables-restore --noflush` for apply, `iptables` commands for the
//! jump-rule checks and for cleanup. Every command goes through [`Exec`], so the sequences
//! are unit-tested with a scripted fake; [`System`] runs real processes.

use super::{CHAINS, Config, Family, Rule, all_jumps, jumps, restore_input};

/// The result of one command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard error (trimmed).
    pub stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs a program; `stdin` is written to its standard input when given.
pub trait Exec {
    /// Run `program args...`.
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> std::io::Result<Output>;
}

/// Real processes (`std::process::Command`, found on `PATH`).
#[derive(Debug, Default)]
pub struct System;

impl Exec for System {
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> std::io::Result<Output> {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok(Output {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Invalid flags.
    #[error(transparent)]
    Config(#[from] super::ConfigError),
    /// The program is not installed.
    #[error(
        "{program} not found on PATH: install iptables (Debian/Ubuntu: apt-get install iptables; \
         Alpine: apk add iptables ip6tables) or run weir-init in an image that has it"
    )]
    Missing {
        /// The program.
        program: String,
    },
    /// The program could not be run.
    #[error("running {program}: {source}")]
    Io {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The program failed.
    #[error("`{command}` failed (exit {code}): {stderr}{hint}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit code or `signal`.
        code: String,
        /// Its standard error.
        stderr: String,
        /// A hint for common causes.
        hint: &'static str,
    },
}

fn run(
    exec: &mut dyn Exec,
    program: &str,
    args: &[String],
    stdin: Option<&str>,
) -> Result<Output, InitError> {
    exec.run(program, args, stdin).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            InitError::Missing {
                program: program.to_string(),
            }
        } else {
            InitError::Io {
                program: program.to_string(),
                source: e,
            }
        }
    })
}

fn failed(program: &str, args: &[String], out: &Output) -> InitError {
    let hint = if out.code == Some(4) || out.stderr.contains("ermission denied") {
        " (weir-init needs CAP_NET_ADMIN: run it as root or with that capability)"
    } else {
        ""
    };
    InitError::Failed {
        command: command_line(program, args),
        code: out
            .code
            .map_or_else(|| "signal".to_string(), |c| c.to_string()),
        stderr: out.stderr.clone(),
        hint,
    }
}

/// `program args...` as a shell-like line.
pub fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn rule_args(op: &str, rule: &Rule) -> Vec<String> {
    let mut v = vec!["-t".into(), "nat".into(), op.into(), rule.chain.into()];
    v.extend(rule.args.iter().cloned());
    v
}

/// Whether `rule` is installed (`iptables -C`). Exit 1 (no such rule) and 2 (the target
/// chain does not exist) mean no.
pub fn rule_exists(exec: &mut dyn Exec, family: Family, rule: &Rule) -> Result<bool, InitError> {
    let args = rule_args("-C", rule);
    let out = run(exec, family.command(), &args, None)?;
    match out.code {
        Some(0) => Ok(true),
        Some(1) | Some(2) => Ok(false),
        _ => Err(failed(family.command(), &args, &out)),
    }
}

fn chain_exists(exec: &mut dyn Exec, family: Family, chain: &str) -> Result<bool, InitError> {
    let args: Vec<String> = vec!["-t".into(), "nat".into(), "-S".into(), chain.into()];
    let out = run(exec, family.command(), &args, None)?;
    match out.code {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(family.command(), &args, &out)),
    }
}

/// The restore input apply would feed for each family: the jump rules already installed are
/// left out. If `iptables` itself is missing (e.g. a dry run on a workstation), every jump is
/// taken as missing when `assume_fresh_if_missing`.
pub fn plan_apply(
    exec: &mut dyn Exec,
    cfg: &Config,
    assume_fresh_if_missing: bool,
) -> Result<Vec<(Family, String)>, InitError> {
    cfg.validate()?;
    let mut plan = Vec::new();
    for family in cfg.families() {
        let mut missing = Vec::new();
        for j in jumps(cfg) {
            match rule_exists(exec, family, &j) {
                Ok(true) => {}
                Ok(false) => missing.push(j),
                Err(InitError::Missing { .. }) if assume_fresh_if_missing => missing.push(j),
                Err(e) => return Err(e),
            }
        }
        plan.push((family, restore_input(cfg, family, &missing)));
    }
    Ok(plan)
}

/// Install the rules (idempotent). A stale `PREROUTING` jump from an earlier apply with
/// inbound capture is removed when inbound capture is now off.
pub fn apply(exec: &mut dyn Exec, cfg: &Config) -> Result<(), InitError> {
    let plan = plan_apply(exec, cfg, false)?;
    let args: Vec<String> = vec!["--noflush".into()];
    for (family, input) in plan {
        let program = family.restore_command();
        let out = run(exec, program, &args, Some(&input))?;
        if !out.ok() {
            return Err(failed(program, &args, &out));
        }
        let wanted = jumps(cfg);
        for j in all_jumps().into_iter().filter(|j| !wanted.contains(j)) {
            delete_all(exec, family, &j)?;
        }
    }
    Ok(())
}

/// Delete every copy of `rule` (bounded: at most 64 copies).
fn delete_all(exec: &mut dyn Exec, family: Family, rule: &Rule) -> Result<(), InitError> {
    for _ in 0..64 {
        if !rule_exists(exec, family, rule)? {
            return Ok(());
        }
        let args = rule_args("-D", rule);
        let out = run(exec, family.command(), &args, None)?;
        if !out.ok() {
            return Err(failed(family.command(), &args, &out));
        }
    }
    Ok(())
}

/// Remove everything weir-init installs (idempotent: absent rules and chains are fine).
pub fn cleanup(exec: &mut dyn Exec, families: &[Family]) -> Result<(), InitError> {
    for &family in families {
        for j in all_jumps() {
            delete_all(exec, family, &j)?;
        }
        // Flush all first: the chains jump to each other, and a referenced chain cannot be
        // deleted.
        let mut present = Vec::new();
        for c in CHAINS {
            if chain_exists(exec, family, c)? {
                present.push(c);
            }
        }
        for op in ["-F", "-X"] {
            for c in &present {
                let args: Vec<String> = vec!["-t".into(), "nat".into(), op.into(), (*c).into()];
                let out = run(exec, family.command(), &args, None)?;
                if !out.ok() {
                    return Err(failed(family.command(), &args, &out));
                }
            }
        }
    }
    Ok(())
}

/// The commands cleanup runs on a fully installed system, one per line.
pub fn cleanup_commands(families: &[Family]) -> String {
    let mut out = String::new();
    for &family in families {
        for j in all_jumps() {
            out.push_str(&command_line(family.command(), &rule_args("-D", &j)));
            out.push('\n');
        }
        for op in ["-F", "-X"] {
            for c in CHAINS {
                out.push_str(&format!("{} -t nat {op} {c}\n", family.command()));
            }
        }
    }
    out
}

/// A dry-run listing of an apply plan.
pub fn render_plan(plan: &[(Family, String)]) -> String {
    plan.iter()
        .map(|(f, input)| format!("# {} --noflush <<EOF\n{input}# EOF\n", f.restore_command()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::{CidrSet, PortSet};
    use super::*;
    use std::collections::HashSet;

    /// A fake iptables: a set of installed rules (`chain args`) and chains; records every
    /// command. `restore` applies the input's chain declarations and `-A` lines.
    #[derive(Default)]
    struct Fake {
        rules: Vec<String>,
        chains: HashSet<String>,
        log: Vec<String>,
        missing: bool,
        deny: bool,
    }

    impl Exec for Fake {
        fn run(
            &mut self,
            program: &str,
            args: &[String],
            stdin: Option<&str>,
        ) -> std::io::Result<Output> {
            self.log.push(command_line(program, args));
            if self.missing {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "nope"));
            }
            if self.deny {
                return Ok(Output {
                    code: Some(4),
                    stderr: "iptables: Permission denied (you must be root).".into(),
                });
            }
            let code = |c| {
                Ok(Output {
                    code: Some(c),
                    stderr: String::new(),
                })
            };
            if program.ends_with("-restore") {
                for line in stdin.unwrap_or("").lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        let name = c.split(' ').next().unwrap_or("").to_string();
                        self.rules.retain(|r| !r.starts_with(&format!("{name} ")));
                        self.chains.insert(name);
                    } else if let Some(r) = line.strip_prefix("-A ") {
                        self.rules.push(r.to_string());
                    }
                }
                return code(0);
            }
            let op = args[2].as_str();
            let rest = args[3..].join(" ");
            match op {
                "-C" => {
                    let target = args.last().cloned().unwrap_or_default();
                    if target.starts_with("WEIR") && !self.chains.contains(&target) {
                        return code(2);
                    }
                    code(if self.rules.contains(&rest) { 0 } else { 1 })
                }
                "-D" => {
                    let Some(i) = self.rules.iter().position(|r| *r == rest) else {
                        return code(1);
                    };
                    self.rules.remove(i);
                    code(0)
                }
                "-S" => code(if self.chains.contains(&rest) { 0 } else { 1 }),
                "-F" => {
                    self.rules.retain(|r| !r.starts_with(&format!("{rest} ")));
                    code(0)
                }
                "-X" => {
                    let referenced = self.rules.iter().any(|r| r.ends_with(&format!(" {rest}")));
                    if referenced || !self.chains.remove(&rest) {
                        return code(1);
                    }
                    code(0)
                }
                _ => code(2),
            }
        }
    }

    fn snapshot(f: &Fake) -> (Vec<String>, Vec<String>) {
        let mut chains: Vec<_> = f.chains.iter().cloned().collect();
        chains.sort();
        let mut rules = f.rules.clone();
        rules.sort();
        (rules, chains)
    }

    #[test]
    fn apply_twice_leaves_one_set_and_cleanup_removes_all() {
        let cfg = Config::default();
        let mut f = Fake::default();
        apply(&mut f, &cfg).expect("apply");
        let first = snapshot(&f);
        assert_eq!(
            first
                .0
                .iter()
                .filter(|r| r.starts_with("OUTPUT ") || r.starts_with("PREROUTING "))
                .count(),
            2
        );
        assert_eq!(first.1.len(), 4);
        apply(&mut f, &cfg).expect("apply again");
        assert_eq!(snapshot(&f), first, "second apply changes nothing");
        // The second restore input carried no jump rules.
        let restores: Vec<_> = f.log.iter().filter(|l| l.contains("restore")).collect();
        assert_eq!(restores.len(), 2);

        // Someone else's rule survives cleanup.
        f.rules.push("OUTPUT -p udp -j ACCEPT".into());
        cleanup(&mut f, &[Family::V4]).expect("cleanup");
        assert_eq!(f.rules, vec!["OUTPUT -p udp -j ACCEPT".to_string()]);
        assert!(f.chains.is_empty());
        let n = f.log.len();
        cleanup(&mut f, &[Family::V4]).expect("cleanup again");
        // Only checks the second time: 2 jump checks + 4 chain checks.
        assert_eq!(f.log.len() - n, 6);
        assert!(
            f.log[n..]
                .iter()
                .all(|l| l.contains(" -C ") || l.contains(" -S "))
        );
    }

    #[test]
    fn cleanup_removes_duplicated_jumps() {
        let mut f = Fake::default();
        for _ in 0..3 {
            f.rules.push("OUTPUT -p tcp -j WEIR_OUTPUT".into());
        }
        f.chains.insert("WEIR_OUTPUT".into());
        cleanup(&mut f, &[Family::V4]).expect("cleanup");
        assert!(f.rules.is_empty());
        assert!(f.chains.is_empty());
    }

    #[test]
    fn apply_without_inbound_removes_stale_prerouting_jump() {
        let mut f = Fake::default();
        apply(&mut f, &Config::default()).expect("apply");
        assert!(f.rules.iter().any(|r| r.starts_with("PREROUTING")));
        let cfg = Config {
            include_inbound_ports: PortSet::Only(vec![]),
            ..Config::default()
        };
        apply(&mut f, &cfg).expect("apply without inbound");
        assert!(!f.rules.iter().any(|r| r.starts_with("PREROUTING")));
        assert!(!f.rules.iter().any(|r| r.starts_with("WEIR_INBOUND")));
        assert_eq!(
            f.rules.iter().filter(|r| r.starts_with("OUTPUT ")).count(),
            1
        );
    }

    #[test]
    fn ipv6_programs_both_families() {
        let cfg = Config {
            ipv6: true,
            include_outbound_cidrs: CidrSet::All,
            ..Config::default()
        };
        let mut f = Fake::default();
        apply(&mut f, &cfg).expect("apply");
        assert!(f.log.iter().any(|l| l == "iptables-restore --noflush"));
        assert!(f.log.iter().any(|l| l == "ip6tables-restore --noflush"));
        assert!(
            f.log
                .iter()
                .any(|l| l.starts_with("ip6tables -t nat -C OUTPUT"))
        );
    }

    #[test]
    fn missing_iptables_is_a_clear_error_but_dry_run_works() {
        let mut f = Fake {
            missing: true,
            ..Fake::default()
        };
        let e = apply(&mut f, &Config::default()).expect_err("no iptables");
        assert!(matches!(e, InitError::Missing { ref program } if program == "iptables"));
        assert!(e.to_string().contains("apt-get install iptables"), "{e}");
        let e = cleanup(&mut f, &[Family::V4]).expect_err("no iptables");
        assert!(matches!(e, InitError::Missing { .. }));
        let plan = plan_apply(&mut f, &Config::default(), true).expect("dry run plan");
        let text = render_plan(&plan);
        assert!(text.starts_with("# iptables-restore --noflush <<EOF\n*nat\n"));
        assert!(text.contains("-A OUTPUT -p tcp -j WEIR_OUTPUT\nCOMMIT\n# EOF\n"));
    }

    #[test]
    fn permission_denied_is_a_typed_failure_with_a_hint() {
        let mut f = Fake {
            deny: true,
            ..Fake::default()
        };
        let e = apply(&mut f, &Config::default()).expect_err("denied");
        match &e {
            InitError::Failed { command, code, .. } => {
                assert_eq!(
                    command,
                    "iptables -t nat -C PREROUTING -p tcp -j WEIR_INBOUND"
                );
                assert_eq!(code, "4");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
    }

    #[test]
    fn invalid_config_is_rejected_before_running_anything() {
        let mut f = Fake::default();
        let cfg = Config {
            inbound_port: 15001,
            ..Config::default()
        };
        assert!(matches!(
            apply(&mut f, &cfg),
            Err(InitError::Config(super::super::ConfigError::SamePorts(
                15001
            )))
        ));
        assert!(f.log.is_empty());
    }

    #[test]
    fn cleanup_commands_listing() {
        let text = cleanup_commands(&[Family::V4, Family::V6]);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2 * (2 + 8));
        assert_eq!(
            lines[0],
            "iptables -t nat -D PREROUTING -p tcp -j WEIR_INBOUND"
        );
        assert_eq!(lines[2], "iptables -t nat -F WEIR_INBOUND");
        assert_eq!(lines[9], "iptables -t nat -X WEIR_REDIRECT");
        assert_eq!(
            lines[10],
            "ip6tables -t nat -D PREROUTING -p tcp -j WEIR_INBOUND"
        );
    }
}
