//! [`IptablesFirewall`]: the same [`Ruleset`] applied with `iptables-restore --noflush`
//! (and `ip6tables-restore` for IPv6), for hosts whose operators keep to iptables.
//!
//! Owns three chains of the `nat` table per family, named after cutover's table
//! (`<table>-pre`, `<table>-out`, `<table>-post`), and one jump to each from PREROUTING,
//! OUTPUT and POSTROUTING, inserted first and tagged `cutover:<table>`. Never flushes,
//! reads or changes another chain's rules: `--noflush` keeps everything else, and a chain
//! declared in a restore script (`:<chain> - [0:0]`) is created or emptied, so each
//! operation rewrites exactly our chains, atomically per table and family.
//!
//! iptables has no maps: a rule pair (mark, DNAT) per element, by-address elements first
//! so they win, and a cutover rewrites our chains in one restore. The cost grows with the
//! number of ports, unlike the nftables backend; that is the price of iptables.
//!
//! The mark follows the connection as in the nftables backend: each element's rules also
//! set the mark bit in the conntrack mark (`CONNMARK`), and one chain of the `mangle`
//! table, `<table>-mark`, jumped to first from PREROUTING (tagged like the others), gives
//! every later packet of such a connection in its original direction the packet mark
//! again, so a retransmitted SYN is accepted in DOCKER-USER like the first one.
//!
//! Traffic per service is counted in one more chain per family, `<table>-cnt` in the
//! `mangle` table, jumped to first from INPUT, FORWARD and OUTPUT (tagged like the
//! others): one rule per service port, `-p P -m conntrack --ctstate DNAT --ctorigdstport
//! PORT -m comment --comment <service>`, no target. Every packet of a DNAT'd connection
//! passes exactly one of those three chains (forwarded, delivered to the host, sent by
//! it), after the nat table's DNAT, so each is counted once. Only a sync rewrites it (and
//! so starts its counters at zero); a switch rewrites the nat chains only.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::docker_user;
use super::{Firewall, NatError};
use crate::plan::{ChainKind, Element, ElementOp, Family, Hook, Rule, Ruleset, Traffic, COUNT_CHAINS};

/// iptables refuses chain names longer than this (`XT_EXTENSION_MAXNAMELEN - 1`).
pub const MAX_CHAIN_NAME: usize = 28;

/// The built-in chains (of the `mangle` table) that jump to the counting chain.
const COUNT_HOOKS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];
/// The table of the counting chain: `mangle`, whose INPUT/FORWARD/OUTPUT run after the nat
/// table's DNAT and before `filter`, where Docker's FORWARD (its DOCKER-USER jump first,
/// re-inserted whenever a network is created) accepts cutover's marked packets before a
/// counting jump in `filter` would see them.
const COUNT_TABLE: &str = "mangle";

/// The binaries of one family.
#[derive(Debug, Clone)]
struct Tools {
    restore: PathBuf,
    list: PathBuf,
}

/// iptables through `iptables-restore` / `ip6tables-restore`.
#[derive(Debug)]
pub struct IptablesFirewall {
    v4: Tools,
    v6: Tools,
    /// DOCKER-USER is handled with the same binary as in the nftables backend.
    docker_iptables: PathBuf,
    /// What each table was last made into: a switch rewrites the chains from it.
    applied: Mutex<BTreeMap<String, Ruleset>>,
}

impl Default for IptablesFirewall {
    fn default() -> Self {
        Self::new()
    }
}

impl IptablesFirewall {
    pub fn new() -> Self {
        IptablesFirewall {
            v4: Tools { restore: "/usr/sbin/iptables-restore".into(), list: "/usr/sbin/iptables".into() },
            v6: Tools { restore: "/usr/sbin/ip6tables-restore".into(), list: "/usr/sbin/ip6tables".into() },
            docker_iptables: PathBuf::from(docker_user::DEFAULT_IPTABLES),
            applied: Mutex::new(BTreeMap::new()),
        }
    }

    fn tools(&self, family: Family) -> &Tools {
        match family {
            Family::Ipv4 => &self.v4,
            Family::Ipv6 => &self.v6,
        }
    }

    fn applied(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Ruleset>>, NatError> {
        self.applied.lock().map_err(|_| NatError::InvalidRule("the iptables backend's state lock was poisoned".into()))
    }

    /// Our jumps in the built-in chains of `family`, one entry per copy (a crash between
    /// two steps elsewhere could have left two; a delete removes them all).
    fn jumps_present(&self, family: Family, table: &str) -> Result<Vec<Hook>, NatError> {
        let mut present = Vec::new();
        for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting] {
            let out = run(&self.tools(family).list, &["-w", "-t", "nat", "-S", builtin(hook)], None)?;
            present.extend(out.lines().filter(|l| is_our_jump(l, hook, table)).map(|_| hook));
        }
        Ok(present)
    }

    fn restore(&self, family: Family, script: &str) -> Result<(), NatError> {
        run(&self.tools(family).restore, &["-w", "--noflush"], Some(script)).map(drop)
    }

    fn write_chains(&self, rs: &Ruleset, families: &[Family]) -> Result<(), NatError> {
        for &family in families {
            let present = self.jumps_present(family, &rs.table)?;
            let script = restore_script(rs, family, &present)?;
            self.restore(family, &script)?;
        }
        Ok(())
    }

    /// How many copies of our jump to the mark chain mangle PREROUTING of `family` has.
    fn mark_jumps_present(&self, family: Family, table: &str) -> Result<usize, NatError> {
        let chain = mark_chain_name(table)?;
        let out = run(&self.tools(family).list, &["-w", "-t", "mangle", "-S", "PREROUTING"], None)?;
        Ok(out.lines().filter(|l| is_jump_to(l, "PREROUTING", &chain, table)).count())
    }

    /// Our jumps to the counting chain in the built-in `mangle` chains of `family`.
    fn count_jumps_present(&self, family: Family, table: &str) -> Result<Vec<&'static str>, NatError> {
        let chain = count_chain_name(table)?;
        let mut present = Vec::new();
        for builtin in COUNT_HOOKS {
            let out = run(&self.tools(family).list, &["-w", "-t", COUNT_TABLE, "-S", builtin], None)?;
            present.extend(out.lines().filter(|l| is_jump_to(l, builtin, &chain, table)).map(|_| builtin));
        }
        Ok(present)
    }
}

/// The built-in chain a hook's jump sits in.
fn builtin(hook: Hook) -> &'static str {
    match hook {
        Hook::Prerouting => "PREROUTING",
        Hook::Output => "OUTPUT",
        Hook::Postrouting => "POSTROUTING",
    }
}

/// Our chain for a hook.
pub fn chain_name(table: &str, hook: Hook) -> Result<String, NatError> {
    let suffix = match hook {
        Hook::Prerouting => "pre",
        Hook::Output => "out",
        Hook::Postrouting => "post",
    };
    let name = format!("{table}-{suffix}");
    if name.len() > MAX_CHAIN_NAME || table.is_empty() || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(NatError::InvalidRule(format!(
            "with the iptables backend the table name `{table}` must be letters, digits, '_' or '-' and at most {} characters (chain `{name}`)",
            MAX_CHAIN_NAME - 5
        )));
    }
    Ok(name)
}

/// The jump rule (after `-A/-I/-D <BUILTIN>`).
fn jump_spec(table: &str, hook: Hook) -> Result<String, NatError> {
    let chain = chain_name(table, hook)?;
    let local = match hook {
        // Same match as the nftables rules' `fib daddr type local`.
        Hook::Prerouting | Hook::Output => "-m addrtype --dst-type LOCAL ",
        Hook::Postrouting => "",
    };
    Ok(format!("{local}-m comment --comment cutover:{table} -j {chain}"))
}

/// Is `line` (from `iptables -S <BUILTIN>`) our jump for `hook`?
fn is_our_jump(line: &str, hook: Hook, table: &str) -> bool {
    let Ok(chain) = chain_name(table, hook) else { return false };
    is_jump_to(line, builtin(hook), &chain, table)
}

/// Is `line` (from `iptables -S <builtin>`) a jump of `table`'s to `chain`? iptables
/// quotes the comment (`--comment "cutover:t"`), so quotes are ignored.
fn is_jump_to(line: &str, builtin: &str, chain: &str, table: &str) -> bool {
    let line = line.replace('"', "");
    line.starts_with(&format!("-A {builtin} "))
        && line.ends_with(&format!(" -j {chain}"))
        && line.contains(&format!("--comment cutover:{table} "))
}

/// The counting chain of `table` (in the `mangle` table).
pub fn count_chain_name(table: &str) -> Result<String, NatError> {
    // Validates the table name; `-cnt` is no longer than the longest other suffix.
    chain_name(table, Hook::Postrouting)?;
    Ok(format!("{table}-cnt"))
}

/// The jump to the counting chain (after `-I/-D <BUILTIN>`).
fn count_jump_spec(table: &str) -> Result<String, NatError> {
    Ok(format!("-m comment --comment cutover:{table} -j {}", count_chain_name(table)?))
}

/// The chain of `table` (in the `mangle` table) that restores the mark from the
/// connection's mark.
pub fn mark_chain_name(table: &str) -> Result<String, NatError> {
    // Validates the table name; `-mark` is as long as the longest other suffix.
    chain_name(table, Hook::Postrouting)?;
    Ok(format!("{table}-mark"))
}

/// The jump to the mark chain (after `-I/-D PREROUTING`).
fn mark_jump_spec(table: &str) -> Result<String, NatError> {
    Ok(format!("-m comment --comment cutover:{table} -j {}", mark_chain_name(table)?))
}

/// The `iptables-restore --noflush` script that makes the mark chain exactly `rs`'s
/// `RestoreMark` rules and adds the jump from mangle PREROUTING unless `present`.
pub fn mark_script(rs: &Ruleset, present: bool) -> Result<String, NatError> {
    let chain = mark_chain_name(&rs.table)?;
    let mut s = format!("*mangle\n:{chain} - [0:0]\n");
    for rule in rs.chains.iter().flat_map(|c| &c.rules) {
        let Rule::RestoreMark { mark } = rule else { continue };
        if *mark == 0 {
            return Err(NatError::InvalidRule("the packet mark must not be 0".into()));
        }
        s.push_str(&format!(
            "-A {chain} -m conntrack --ctdir ORIGINAL -m connmark --mark {mark:#x}/{mark:#x} -j MARK --set-xmark {mark:#x}/{mark:#x}\n"
        ));
    }
    if !present {
        s.push_str(&format!("-I PREROUTING 1 {}\n", mark_jump_spec(&rs.table)?));
    }
    s.push_str("COMMIT\n");
    Ok(s)
}

/// The script that removes `jumps` copies of our jump to the mark chain, and the chain.
pub fn mark_delete_script(table: &str, jumps: usize) -> Result<String, NatError> {
    let chain = mark_chain_name(table)?;
    let mut s = String::from("*mangle\n");
    for _ in 0..jumps {
        s.push_str(&format!("-D PREROUTING {}\n", mark_jump_spec(table)?));
    }
    s.push_str(&format!(":{chain} - [0:0]\n-X {chain}\nCOMMIT\n"));
    Ok(s)
}

/// The `iptables-restore --noflush` script that makes the counting chain of `family`
/// exactly `rs`'s counting rules and adds the jumps not in `present`.
pub fn count_script(rs: &Ruleset, family: Family, present: &[&str]) -> Result<String, NatError> {
    let t = &rs.table;
    let chain = count_chain_name(t)?;
    let mut s = format!("*{COUNT_TABLE}\n:{chain} - [0:0]\n");
    // The plan has the same rules in both counting chains; iptables needs them once.
    let rules = rs.chains.iter().filter(|c| c.name == COUNT_CHAINS[0]).flat_map(|c| &c.rules);
    for rule in rules {
        let Rule::CountService { service, protocol, port, daddr } = rule else { continue };
        if service.is_empty() || !service.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(NatError::InvalidRule(format!("service name `{service}` cannot be an iptables comment")));
        }
        let orig = match daddr {
            Some(d) if Family::of(d) != family => continue,
            Some(d) => format!(" --ctorigdst {d}"),
            None => String::new(),
        };
        s.push_str(&format!(
            "-A {chain} -p {protocol} -m conntrack --ctstate DNAT{orig} --ctorigdstport {port} -m comment --comment {service}\n"
        ));
    }
    for builtin in COUNT_HOOKS {
        if !present.contains(&builtin) {
            // First, so no ACCEPT (Docker's in FORWARD) ends the packet's way before it.
            s.push_str(&format!("-I {builtin} 1 {}\n", count_jump_spec(t)?));
        }
    }
    s.push_str("COMMIT\n");
    Ok(s)
}

/// The script that removes our jumps to the counting chain (those in `present`) and it.
pub fn count_delete_script(table: &str, present: &[&str]) -> Result<String, NatError> {
    let chain = count_chain_name(table)?;
    let mut s = format!("*{COUNT_TABLE}\n");
    for builtin in present {
        s.push_str(&format!("-D {builtin} {}\n", count_jump_spec(table)?));
    }
    s.push_str(&format!(":{chain} - [0:0]\n-X {chain}\nCOMMIT\n"));
    Ok(s)
}

/// Per service (the rule's comment), the counters of `iptables -S <chain> -v` lines
/// (`-A <chain> ... --comment web -c PACKETS BYTES`).
pub fn parse_counts(text: &str, chain: &str) -> BTreeMap<String, Traffic> {
    let mut out: BTreeMap<String, Traffic> = BTreeMap::new();
    let prefix = format!("-A {chain} ");
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |flag: &str| words.iter().position(|w| *w == flag).map(|i| &words[i + 1..]);
        let service = after("--comment").and_then(|w| w.first()).map(|w| w.trim_matches('"').to_string());
        let counts = after("-c").and_then(|w| Some((w.first()?.parse::<u64>().ok()?, w.get(1)?.parse::<u64>().ok()?)));
        if let (Some(service), Some((packets, bytes))) = (service, counts) {
            *out.entry(service).or_default() += Traffic { packets, bytes };
        }
    }
    out
}

fn proto(e: &Element) -> String {
    let p = e.key.protocol.to_string();
    format!("-p {p} -m {p} --dport {}", e.key.port)
}

fn destination(e: &Element) -> String {
    match e.addr {
        IpAddr::V4(a) => format!("{a}:{}", e.port),
        IpAddr::V6(a) => format!("[{a}]:{}", e.port),
    }
}

/// The `iptables-restore --noflush` script that makes our chains of `family` exactly
/// `rs` and adds the jumps not in `present`. Pure, so unit tests pin the rules.
pub fn restore_script(rs: &Ruleset, family: Family, present: &[Hook]) -> Result<String, NatError> {
    let t = &rs.table;
    let mark = rs.mark;
    if mark == 0 {
        return Err(NatError::InvalidRule("the packet mark must not be 0".into()));
    }
    let mut s = String::from("*nat\n");
    for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting] {
        // Declaring a chain creates it, or empties it when it exists.
        s.push_str(&format!(":{} - [0:0]\n", chain_name(t, hook)?));
    }
    // Elements of this family, the ones bound to an address first (they must win).
    let mut elements: Vec<&Element> = rs.elements.iter().filter(|e| e.key.family == family).collect();
    elements.sort_by_key(|e| (e.key.daddr.is_none(), e.key));
    for hook in [Hook::Prerouting, Hook::Output] {
        let chain = chain_name(t, hook)?;
        let leave_loopback6 = family == Family::Ipv6
            && rs.chains.iter().any(|c| c.hook == hook && c.kind == ChainKind::Nat && c.rules.contains(&Rule::LeaveLoopback6));
        if leave_loopback6 {
            s.push_str(&format!("-A {chain} -d ::1/128 -j RETURN\n"));
        }
        for e in &elements {
            let daddr = e.key.daddr.map(|d| format!("-d {d} ")).unwrap_or_default();
            s.push_str(&format!("-A {chain} {daddr}{} -j MARK --set-xmark {mark:#x}/{mark:#x}\n", proto(e)));
            s.push_str(&format!("-A {chain} {daddr}{} -j CONNMARK --set-xmark {mark:#x}/{mark:#x}\n", proto(e)));
            s.push_str(&format!("-A {chain} {daddr}{} -j DNAT --to-destination {}\n", proto(e), destination(e)));
        }
    }
    let post = chain_name(t, Hook::Postrouting)?;
    if family == Family::Ipv4 {
        for chain in rs.chains.iter().filter(|c| c.hook == Hook::Postrouting) {
            for rule in &chain.rules {
                match rule {
                    Rule::MasqueradeLoopback { mark } => s.push_str(&format!(
                        "-A {post} -s 127.0.0.0/8 -m mark --mark {mark:#x}/{mark:#x} -j MASQUERADE\n"
                    )),
                    Rule::MasqueradeHairpin { mark, ifname, subnet, prefix } => s.push_str(&format!(
                        "-A {post} -s {subnet}/{prefix} -o {ifname} -m mark --mark {mark:#x}/{mark:#x} -j MASQUERADE\n"
                    )),
                    Rule::MasqueradeHairpin6 { .. }
                    | Rule::DnatLocal { .. }
                    | Rule::CountService { .. }
                    | Rule::RestoreMark { .. }
                    | Rule::LeaveLoopback6 => {}
                }
            }
        }
    } else {
        for chain in rs.chains.iter().filter(|c| c.hook == Hook::Postrouting) {
            for rule in &chain.rules {
                if let Rule::MasqueradeHairpin6 { mark, ifname } = rule {
                    s.push_str(&format!(
                        "-A {post} -i {ifname} -o {ifname} -m mark --mark {mark:#x}/{mark:#x} -j MASQUERADE\n"
                    ));
                }
            }
        }
    }
    for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting] {
        if !present.contains(&hook) {
            // First, so Docker's own DNAT (jump to DOCKER) never sees our ports.
            s.push_str(&format!("-I {} 1 {}\n", builtin(hook), jump_spec(t, hook)?));
        }
    }
    s.push_str("COMMIT\n");
    Ok(s)
}

/// The script that removes our jumps (those in `present`) and chains.
pub fn delete_script(table: &str, present: &[Hook]) -> Result<String, NatError> {
    let mut s = String::from("*nat\n");
    for hook in present {
        s.push_str(&format!("-D {} {}\n", builtin(*hook), jump_spec(table, *hook)?));
    }
    for hook in [Hook::Prerouting, Hook::Output, Hook::Postrouting] {
        let chain = chain_name(table, hook)?;
        // Declare (create or empty) first, so the delete works whether or not it existed.
        s.push_str(&format!(":{chain} - [0:0]\n-X {chain}\n"));
    }
    s.push_str("COMMIT\n");
    Ok(s)
}

/// Run `program args`, feeding `stdin`; Ok(stdout) on success.
fn run(program: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Result<String, NatError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::IptablesMissing)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(NatError::IptablesMissing)?;
    }
    let out = child.wait_with_output().map_err(NatError::IptablesMissing)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let stderr = if stderr.is_empty() { format!("exit status {}", out.status) } else { stderr };
        let stderr = match stdin {
            Some(script) => format!("{stderr}\n--- the script (nothing of it was applied) ---\n{script}"),
            None => stderr,
        };
        return Err(NatError::Iptables { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `elements` after `ops`, in key order.
fn apply_to(elements: &[Element], ops: &[ElementOp]) -> Vec<Element> {
    let mut by_key: BTreeMap<_, Element> = elements.iter().map(|e| (e.key, e.clone())).collect();
    for op in ops {
        match op {
            ElementOp::Delete(k) => {
                by_key.remove(k);
            }
            ElementOp::Add(e) => {
                by_key.insert(e.key, e.clone());
            }
        }
    }
    by_key.into_values().collect()
}

impl Firewall for IptablesFirewall {
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError> {
        self.write_chains(ruleset, &[Family::Ipv4, Family::Ipv6])?;
        for family in [Family::Ipv4, Family::Ipv6] {
            let present = self.count_jumps_present(family, &ruleset.table)?;
            self.restore(family, &count_script(ruleset, family, &present)?)?;
            let present = self.mark_jumps_present(family, &ruleset.table)? > 0;
            self.restore(family, &mark_script(ruleset, present)?)?;
        }
        self.applied()?.insert(ruleset.table.clone(), ruleset.clone());
        Ok(())
    }

    fn apply_ops(&self, table: &str, _map: &str, ops: &[ElementOp]) -> Result<(), NatError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut applied = self.applied()?;
        let Some(current) = applied.get(table) else {
            return Err(NatError::InvalidRule(format!(
                "table `{table}` was not synced by this process; sync the whole ruleset first"
            )));
        };
        let mut next = current.clone();
        next.elements = apply_to(&current.elements, ops);
        let mut families: Vec<Family> = ops
            .iter()
            .map(|op| match op {
                ElementOp::Delete(k) => k.family,
                ElementOp::Add(e) => e.key.family,
            })
            .collect();
        families.sort();
        families.dedup();
        // One restore per family: IPv4 and IPv6 are separate tables in iptables, so a
        // dual-stack switch is two transactions (IPv4 first), unlike nftables' one.
        self.write_chains(&next, &families)?;
        applied.insert(table.to_string(), next);
        Ok(())
    }

    fn delete_table(&self, table: &str) -> Result<(), NatError> {
        for family in [Family::Ipv4, Family::Ipv6] {
            // The counting chain first: what is left after a failure is still found by
            // `table_exists` (the nat chains) and removed by the next delete.
            let present = self.count_jumps_present(family, table)?;
            self.restore(family, &count_delete_script(table, &present)?)?;
            let jumps = self.mark_jumps_present(family, table)?;
            self.restore(family, &mark_delete_script(table, jumps)?)?;
            let present = self.jumps_present(family, table)?;
            self.restore(family, &delete_script(table, &present)?)?;
        }
        self.applied()?.remove(table);
        Ok(())
    }

    fn table_exists(&self, table: &str) -> Result<bool, NatError> {
        let chain = chain_name(table, Hook::Prerouting)?;
        let out = Command::new(&self.v4.list)
            .args(["-w", "-t", "nat", "-S", &chain])
            .stdin(Stdio::null())
            .output()
            .map_err(NatError::IptablesMissing)?;
        Ok(out.status.success())
    }

    fn counters(&self, table: &str) -> Result<BTreeMap<String, Traffic>, NatError> {
        let chain = count_chain_name(table)?;
        let mut out: BTreeMap<String, Traffic> = BTreeMap::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let text = match run(&self.tools(family).list, &["-w", "-t", COUNT_TABLE, "-S", &chain, "-v"], None) {
                Ok(text) => text,
                Err(NatError::Iptables { stderr, .. }) if stderr.contains("No chain") => continue,
                Err(e) => return Err(e),
            };
            for (service, traffic) in parse_counts(&text, &chain) {
                *out.entry(service).or_default() += traffic;
            }
        }
        Ok(out)
    }

    fn ensure_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError> {
        docker_user::ensure_forward_accept(&self.docker_iptables, table, mark)
    }

    fn remove_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError> {
        docker_user::remove_forward_accept(&self.docker_iptables, table, mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Protocol;
    use crate::plan::{self, Bridge, Desired, Target};

    fn ruleset() -> Ruleset {
        let mut bound = Target::new("api", 1, Protocol::Tcp, 8080, [172, 17, 0, 3].into(), 80);
        bound.host_ip = Some("192.0.2.10".parse().unwrap());
        let mut dual = Target::new("web", 1, Protocol::Udp, 53, [172, 17, 0, 2].into(), 5353);
        dual.addr6 = Some("fd00::2".parse().unwrap());
        let web = Target::new("web", 1, Protocol::Tcp, 8080, [172, 17, 0, 2].into(), 80);
        plan::ruleset(&Desired {
            table: "cutover".into(),
            mark: 0x2000_0000,
            targets: vec![web, bound, dual],
            bridges: vec![Bridge { ifname: "docker0".into(), subnet: [172, 17, 0, 0].into(), prefix: 16 }],
        })
    }

    #[test]
    fn ipv4_script_rewrites_our_chains_and_jumps_first() {
        let s = restore_script(&ruleset(), Family::Ipv4, &[]).unwrap();
        let expected = "*nat
:cutover-pre - [0:0]
:cutover-out - [0:0]
:cutover-post - [0:0]
-A cutover-pre -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.3:80
-A cutover-pre -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -p tcp -m tcp --dport 8080 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A cutover-pre -p udp -m udp --dport 53 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -p udp -m udp --dport 53 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-pre -p udp -m udp --dport 53 -j DNAT --to-destination 172.17.0.2:5353
-A cutover-out -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-out -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-out -d 192.0.2.10 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.3:80
-A cutover-out -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-out -p tcp -m tcp --dport 8080 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-out -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A cutover-out -p udp -m udp --dport 53 -j MARK --set-xmark 0x20000000/0x20000000
-A cutover-out -p udp -m udp --dport 53 -j CONNMARK --set-xmark 0x20000000/0x20000000
-A cutover-out -p udp -m udp --dport 53 -j DNAT --to-destination 172.17.0.2:5353
-A cutover-post -s 127.0.0.0/8 -m mark --mark 0x20000000/0x20000000 -j MASQUERADE
-A cutover-post -s 172.17.0.0/16 -o docker0 -m mark --mark 0x20000000/0x20000000 -j MASQUERADE
-I PREROUTING 1 -m addrtype --dst-type LOCAL -m comment --comment cutover:cutover -j cutover-pre
-I OUTPUT 1 -m addrtype --dst-type LOCAL -m comment --comment cutover:cutover -j cutover-out
-I POSTROUTING 1 -m comment --comment cutover:cutover -j cutover-post
COMMIT
";
        assert_eq!(s, expected);
    }

    #[test]
    fn ipv6_script_has_only_ipv6_elements_and_no_loopback_masquerade() {
        let s = restore_script(&ruleset(), Family::Ipv6, &[Hook::Prerouting, Hook::Output, Hook::Postrouting]).unwrap();
        assert!(s.contains("-A cutover-pre -p udp -m udp --dport 53 -j DNAT --to-destination [fd00::2]:5353\n"), "{s}");
        assert!(!s.contains("172.17."), "{s}");
        assert!(!s.contains("127.0.0.0/8"), "no loopback masquerade in IPv6: {s}");
        assert!(s.contains("-A cutover-post -i docker0 -o docker0 -m mark --mark 0x20000000/0x20000000 -j MASQUERADE\n"), "the IPv6 hairpin: {s}");
        assert!(!s.contains("-I "), "jumps already present are not added again: {s}");
    }

    #[test]
    fn ipv6_output_leaves_loopback6_to_the_relay_first() {
        let s6 = restore_script(&ruleset(), Family::Ipv6, &[Hook::Prerouting, Hook::Output, Hook::Postrouting]).unwrap();
        let first_out = s6.lines().find(|l| l.starts_with("-A cutover-out ")).unwrap();
        assert_eq!(first_out, "-A cutover-out -d ::1/128 -j RETURN", "{s6}");
        assert!(!s6.contains("-A cutover-pre -d ::1"), "::1 never arrives from outside: {s6}");
        let s4 = restore_script(&ruleset(), Family::Ipv4, &[Hook::Prerouting, Hook::Output, Hook::Postrouting]).unwrap();
        assert!(!s4.contains("::1"), "{s4}");
    }

    #[test]
    fn our_jumps_are_recognised_and_others_are_not() {
        let ours = "-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment cutover:cutover -j cutover-pre";
        assert!(is_our_jump(ours, Hook::Prerouting, "cutover"));
        let quoted = "-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment \"cutover:cutover\" -j cutover-pre";
        assert!(is_our_jump(quoted, Hook::Prerouting, "cutover"), "iptables -S quotes comments");
        assert!(!is_our_jump("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER", Hook::Prerouting, "cutover"));
        assert!(!is_our_jump(ours, Hook::Prerouting, "other"));
        let d = delete_script("cutover", &[Hook::Prerouting]).unwrap();
        assert!(d.starts_with(&format!("*nat\n-D PREROUTING {}\n", ours.trim_start_matches("-A PREROUTING "))), "{d}");
        assert!(d.contains(":cutover-post - [0:0]\n-X cutover-post\n"), "{d}");
    }

    #[test]
    fn counting_chain_has_a_rule_per_service_port_of_the_family_and_jumps_first() {
        let rs = ruleset();
        let s = count_script(&rs, Family::Ipv4, &["OUTPUT"]).unwrap();
        let expected = "*mangle
:cutover-cnt - [0:0]
-A cutover-cnt -p tcp -m conntrack --ctstate DNAT --ctorigdst 192.0.2.10 --ctorigdstport 8080 -m comment --comment api
-A cutover-cnt -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8080 -m comment --comment web
-A cutover-cnt -p udp -m conntrack --ctstate DNAT --ctorigdstport 53 -m comment --comment web
-I INPUT 1 -m comment --comment cutover:cutover -j cutover-cnt
-I FORWARD 1 -m comment --comment cutover:cutover -j cutover-cnt
COMMIT
";
        assert_eq!(s, expected);
        let s6 = count_script(&rs, Family::Ipv6, &COUNT_HOOKS).unwrap();
        assert!(!s6.contains("192.0.2.10") && !s6.contains("-I "), "{s6}");
        assert!(s6.contains("--ctorigdstport 53 -m comment --comment web\n"), "{s6}");
        let jump = "-A FORWARD -m comment --comment \"cutover:cutover\" -j cutover-cnt";
        assert!(is_jump_to(jump, "FORWARD", "cutover-cnt", "cutover"));
        assert!(!is_jump_to(jump, "FORWARD", "cutover-cnt", "other"));
        assert_eq!(
            count_delete_script("cutover", &["FORWARD"]).unwrap(),
            "*mangle\n-D FORWARD -m comment --comment cutover:cutover -j cutover-cnt\n:cutover-cnt - [0:0]\n-X cutover-cnt\nCOMMIT\n"
        );
    }

    #[test]
    fn the_mark_chain_restores_the_connection_mark_and_jumps_first() {
        let s = mark_script(&ruleset(), false).unwrap();
        assert_eq!(
            s,
            "*mangle
:cutover-mark - [0:0]
-A cutover-mark -m conntrack --ctdir ORIGINAL -m connmark --mark 0x20000000/0x20000000 -j MARK --set-xmark 0x20000000/0x20000000
-I PREROUTING 1 -m comment --comment cutover:cutover -j cutover-mark
COMMIT
"
        );
        assert!(!mark_script(&ruleset(), true).unwrap().contains("-I "), "a present jump is not added again");
        let jump = "-A PREROUTING -m comment --comment \"cutover:cutover\" -j cutover-mark";
        assert!(is_jump_to(jump, "PREROUTING", "cutover-mark", "cutover"));
        assert_eq!(
            mark_delete_script("cutover", 2).unwrap(),
            "*mangle\n-D PREROUTING -m comment --comment cutover:cutover -j cutover-mark\n\
             -D PREROUTING -m comment --comment cutover:cutover -j cutover-mark\n:cutover-mark - [0:0]\n-X cutover-mark\nCOMMIT\n"
        );
    }

    #[test]
    fn counts_are_read_per_service_from_iptables_s_v() {
        let text = "-N cutover-cnt
-A cutover-cnt -p tcp -m conntrack --ctstate DNAT --ctorigdst 192.0.2.10 --ctorigdstport 8080 -m comment --comment api -c 3 180
-A cutover-cnt -p tcp -m conntrack --ctstate DNAT --ctorigdstport 8080 -m comment --comment web -c 10 1000
-A cutover-cnt -p udp -m conntrack --ctstate DNAT --ctorigdstport 53 -m comment \"web\" -c 2 100
-A other-cnt -p udp -m comment --comment web -c 99 99
";
        let got = parse_counts(text, "cutover-cnt");
        assert_eq!(got["api"], Traffic { packets: 3, bytes: 180 });
        assert_eq!(got["web"], Traffic { packets: 10, bytes: 1000 }, "the line without --comment is not counted");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn long_table_names_are_refused_before_iptables() {
        assert!(matches!(chain_name("a-table-name-much-too-long", Hook::Postrouting), Err(NatError::InvalidRule(_))));
        assert!(matches!(chain_name("bad name", Hook::Prerouting), Err(NatError::InvalidRule(_))));
    }

    #[test]
    fn ops_update_the_element_set() {
        let rs = ruleset();
        let key = plan::ElementKey::v4(Protocol::Tcp, 8080);
        let ops = [
            ElementOp::Delete(key),
            ElementOp::Add(Element { key, addr: "172.17.0.9".parse().unwrap(), port: 80 }),
        ];
        let next = apply_to(&rs.elements, &ops);
        assert_eq!(next.len(), rs.elements.len());
        assert!(next.iter().any(|e| e.key == key && e.addr == "172.17.0.9".parse::<IpAddr>().unwrap()));
    }
}
