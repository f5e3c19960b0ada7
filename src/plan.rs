//! The plan: what cutover's nftables table must contain, computed from desired state.
//!
//! Pure data and pure functions only. Nothing here talks to the kernel: `nat` applies a
//! [`Ruleset`] or a list of [`ElementOp`]s, and `cutover plan` prints them with
//! [`fmt::Display`]. Because the whole data plane is described here, unit tests of this
//! module are the specification of the rules.
//!
//! Shape of the table (one per daemon, `inet` family):
//! - map `dnat4`: `l4proto . host port -> container address . container port`; a cutover
//!   replaces one element, so its cost does not depend on how many services exist;
//! - chains `prerouting` and `output` (nat, priority dstnat - 5, just before Docker's):
//!   traffic to a local address whose protocol and port are in the map gets our mark and
//!   is DNAT'd to the active release;
//! - chain `postrouting` (nat, srcnat - 5): marked traffic from 127.0.0.0/8 (clients on
//!   the host via loopback) and marked traffic that leaves through the bridge it came
//!   from (hairpin) is masqueraded so the replies come back through the NAT.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::manifest::Protocol;

/// The default table name.
pub const DEFAULT_TABLE: &str = "cutover";
/// The default packet mark bit set on traffic cutover DNATs (matched in DOCKER-USER).
pub const DEFAULT_MARK: u32 = 0x2000_0000;
/// The name of the DNAT map inside the table.
pub const DNAT_MAP: &str = "dnat4";
/// Priority of the DNAT chains: `dstnat - 5`, so they run before Docker's (`dstnat`).
pub const DNAT_PRIORITY: i32 = -105;
/// Priority of the masquerade chain: `srcnat - 5`.
pub const SNAT_PRIORITY: i32 = 95;

/// One host port of one service, pointed at the active release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub service: String,
    pub release: u32,
    pub protocol: Protocol,
    pub host_port: u16,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// A Docker bridge that active releases sit on: needs hairpin masquerade and
/// `route_localnet` so host clients on 127.0.0.1 reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bridge {
    pub ifname: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
}

/// What the daemon wants the data plane to be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub table: String,
    pub mark: u32,
    pub targets: Vec<Target>,
    pub bridges: Vec<Bridge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Hook {
    Prerouting,
    Output,
    Postrouting,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// The rules cutover writes; `nat` turns each into netlink expressions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Rule {
    /// IPv4 to a local address, `l4proto . dport` found in `map`: set `mark`, DNAT to
    /// the map's value.
    DnatLocal { map: String, mark: u32 },
    /// Marked IPv4 from 127.0.0.0/8: masquerade (host clients via loopback).
    MasqueradeLoopback { mark: u32 },
    /// Marked IPv4 from `subnet` leaving through `ifname`: masquerade (hairpin).
    MasqueradeHairpin { mark: u32, ifname: String, subnet: Ipv4Addr, prefix: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub name: String,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// Key of a DNAT map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ElementKey {
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Element {
    pub key: ElementKey,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// One change to the DNAT map; a list of them is one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ElementOp {
    Delete(ElementKey),
    Add(Element),
}

/// The complete content of cutover's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ruleset {
    pub table: String,
    pub mark: u32,
    pub map: String,
    pub chains: Vec<Chain>,
    pub elements: Vec<Element>,
}

/// The table for `desired`. Deterministic: the same input gives the same rules in the
/// same order.
pub fn ruleset(desired: &Desired) -> Ruleset {
    let mark = desired.mark;
    let dnat = Rule::DnatLocal { map: DNAT_MAP.to_string(), mark };
    let mut bridges = desired.bridges.clone();
    bridges.sort();
    bridges.dedup();
    let mut post = vec![Rule::MasqueradeLoopback { mark }];
    post.extend(bridges.into_iter().map(|b| Rule::MasqueradeHairpin {
        mark,
        ifname: b.ifname,
        subnet: b.subnet,
        prefix: b.prefix,
    }));
    Ruleset {
        table: desired.table.clone(),
        mark,
        map: DNAT_MAP.to_string(),
        chains: vec![
            Chain { name: "prerouting".into(), hook: Hook::Prerouting, priority: DNAT_PRIORITY, rules: vec![dnat.clone()] },
            Chain { name: "output".into(), hook: Hook::Output, priority: DNAT_PRIORITY, rules: vec![dnat] },
            Chain { name: "postrouting".into(), hook: Hook::Postrouting, priority: SNAT_PRIORITY, rules: post },
        ],
        elements: elements(&desired.targets),
    }
}

/// Map elements for `targets`, sorted by key.
pub fn elements(targets: &[Target]) -> Vec<Element> {
    let mut by_key: BTreeMap<ElementKey, Element> = BTreeMap::new();
    for t in targets {
        let key = ElementKey { protocol: t.protocol, port: t.host_port };
        by_key.insert(key, Element { key, addr: t.addr, port: t.port });
    }
    by_key.into_values().collect()
}

/// The element changes that turn `from` into `to`: a changed key is deleted and added
/// again in the same batch; unchanged elements are not touched.
pub fn element_ops(from: &[Element], to: &[Element]) -> Vec<ElementOp> {
    let old: BTreeMap<ElementKey, &Element> = from.iter().map(|e| (e.key, e)).collect();
    let new: BTreeMap<ElementKey, &Element> = to.iter().map(|e| (e.key, e)).collect();
    let mut ops = Vec::new();
    for (key, e) in &old {
        match new.get(key) {
            Some(n) if n == e => {}
            _ => ops.push(ElementOp::Delete(*key)),
        }
    }
    for (key, e) in &new {
        if old.get(key) != Some(e) {
            ops.push(ElementOp::Add((*e).clone()));
        }
    }
    ops
}

/// Host ports of `targets` whose key another service already uses.
pub fn conflicts<'a>(existing: &'a [Target], new: &[Target]) -> Vec<&'a Target> {
    existing
        .iter()
        .filter(|e| new.iter().any(|n| n.protocol == e.protocol && n.host_port == e.host_port && n.service != e.service))
        .collect()
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::DnatLocal { map, mark } => write!(
                f,
                "meta nfproto ipv4 fib daddr type local meta l4proto . th dport @{map} meta mark set meta mark | {mark:#010x} dnat ip to meta l4proto . th dport map @{map}"
            ),
            Rule::MasqueradeLoopback { mark } => {
                write!(f, "meta nfproto ipv4 meta mark & {mark:#010x} == {mark:#010x} ip saddr 127.0.0.0/8 masquerade")
            }
            Rule::MasqueradeHairpin { mark, ifname, subnet, prefix } => write!(
                f,
                "meta nfproto ipv4 meta mark & {mark:#010x} == {mark:#010x} oifname \"{ifname}\" ip saddr {subnet}/{prefix} masquerade"
            ),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} : {} . {}", self.key.protocol, self.key.port, self.addr, self.port)
    }
}

impl fmt::Display for Ruleset {
    /// The table in `nft -f` syntax (what `cutover plan` prints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {} {{", self.table)?;
        writeln!(f, "\tmap {} {{", self.map)?;
        writeln!(f, "\t\ttype inet_proto . inet_service : ipv4_addr . inet_service")?;
        if !self.elements.is_empty() {
            let list: Vec<String> = self.elements.iter().map(ToString::to_string).collect();
            writeln!(f, "\t\telements = {{ {} }}", list.join(",\n\t\t\t     "))?;
        }
        writeln!(f, "\t}}")?;
        for chain in &self.chains {
            writeln!(f)?;
            writeln!(f, "\tchain {} {{", chain.name)?;
            writeln!(f, "\t\ttype nat hook {} priority {}; policy accept;", chain.hook.name(), chain.priority)?;
            for rule in &chain.rules {
                writeln!(f, "\t\t{rule}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

/// Render element changes as `nft` commands.
pub fn render_ops(table: &str, map: &str, ops: &[ElementOp]) -> String {
    ops.iter()
        .map(|op| match op {
            ElementOp::Delete(k) => format!("delete element inet {table} {map} {{ {} . {} }}\n", k.protocol, k.port),
            ElementOp::Add(e) => format!("add element inet {table} {map} {{ {e} }}\n"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(service: &str, release: u32, port: u16, addr: [u8; 4]) -> Target {
        Target { service: service.into(), release, protocol: Protocol::Tcp, host_port: port, addr: addr.into(), port: 80 }
    }

    fn desired(targets: Vec<Target>) -> Desired {
        Desired {
            table: "cutover".into(),
            mark: DEFAULT_MARK,
            targets,
            bridges: vec![Bridge { ifname: "docker0".into(), subnet: [172, 17, 0, 0].into(), prefix: 16 }],
        }
    }

    #[test]
    fn table_has_dnat_on_both_hooks_and_masquerade() {
        let rs = ruleset(&desired(vec![target("web", 1, 8080, [172, 17, 0, 2])]));
        let hooks: Vec<_> = rs.chains.iter().map(|c| (c.hook, c.priority)).collect();
        assert_eq!(hooks, vec![(Hook::Prerouting, -105), (Hook::Output, -105), (Hook::Postrouting, 95)]);
        assert_eq!(rs.elements.len(), 1);
        let text = rs.to_string();
        assert!(text.contains("tcp . 8080 : 172.17.0.2 . 80"), "{text}");
        assert!(text.contains("ip saddr 127.0.0.0/8 masquerade"), "{text}");
        assert!(text.contains("oifname \"docker0\" ip saddr 172.17.0.0/16 masquerade"), "{text}");
    }

    #[test]
    fn a_switch_is_one_delete_and_one_add() {
        let others: Vec<Target> = (0..1000).map(|i| target(&format!("s{i}"), 1, 10000 + i, [172, 17, 1, 1])).collect();
        let mut before = others.clone();
        before.push(target("web", 1, 8080, [172, 17, 0, 2]));
        let mut after = others;
        after.push(target("web", 2, 8080, [172, 17, 0, 3]));
        let ops = element_ops(&elements(&before), &elements(&after));
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(ops[0], ElementOp::Delete(ElementKey { port: 8080, .. })));
        assert!(matches!(&ops[1], ElementOp::Add(e) if e.addr == Ipv4Addr::new(172, 17, 0, 3)));
    }

    #[test]
    fn no_change_no_ops() {
        let e = elements(&[target("web", 1, 8080, [172, 17, 0, 2])]);
        assert!(element_ops(&e, &e).is_empty());
    }

    #[test]
    fn removed_service_is_deleted() {
        let e = elements(&[target("web", 1, 8080, [172, 17, 0, 2])]);
        let ops = element_ops(&e, &[]);
        assert_eq!(ops, vec![ElementOp::Delete(ElementKey { protocol: Protocol::Tcp, port: 8080 })]);
        assert_eq!(render_ops("t", DNAT_MAP, &ops), "delete element inet t dnat4 { tcp . 8080 }\n");
    }

    #[test]
    fn conflicting_ports_are_found() {
        let existing = vec![target("web", 1, 8080, [172, 17, 0, 2])];
        assert_eq!(conflicts(&existing, &[target("api", 1, 8080, [1, 1, 1, 1])]).len(), 1);
        assert!(conflicts(&existing, &[target("web", 2, 8080, [1, 1, 1, 1])]).is_empty());
    }
}
