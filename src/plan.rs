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
//! - map `dnat4_addr`: the same keyed also by the host address (`host_ip:` of a port), so
//!   a port can be bound on one address only; looked up first, so it wins over `dnat4`;
//! - maps `dnat6` and `dnat6_addr`: the same for IPv6 clients and the releases' IPv6
//!   addresses (dual stack). All four maps and their rules always exist, so a release
//!   that gains or loses an IPv6 address or a `host_ip` is still only element changes;
//! - chains `prerouting` and `output` (nat, priority dstnat - 5, just before Docker's):
//!   traffic to a local address whose protocol and port are in a map gets our mark and
//!   is DNAT'd to the active release;
//! - in `output` first, IPv6 to `::1` leaves the chain un-NAT'd: the kernel never routes
//!   `::1` off the host, so a DNAT to a release could not arrive; the daemon's relay
//!   listening on `[::1]:PORT` serves it (`crate::relay`);
//! - chain `mark_prerouting` (filter, mangle priority -150): the mark follows the
//!   connection. The DNAT rule also sets the mark bit in the connection's conntrack mark;
//!   here every later packet of the connection in its original direction gets the packet
//!   mark back. The nat chains see only a connection's first packet, so without this a
//!   retransmitted SYN, or a UDP datagram sent before the release's first reply, arrives
//!   unmarked and Docker's FORWARD chain drops it (unpublished port);
//! - chain `postrouting` (nat, srcnat - 5): marked traffic from 127.0.0.0/8 (clients on
//!   the host via loopback) and marked traffic that leaves through the bridge it came
//!   from (hairpin) is masqueraded so the replies come back through the NAT;
//! - chains `count_prerouting` and `count_output` (filter, dstnat + 10, so after the NAT
//!   of a connection's first packet): one rule per service host port, `ct status dnat
//!   meta l4proto P ct original proto-dst PORT counter comment "<service>"`. Every packet
//!   of a forwarded connection, both directions, passes exactly one of the two hooks
//!   (remote and container clients: prerouting both ways; host clients over loopback:
//!   output out, prerouting back), and its original tuple names the host port both ways,
//!   so each packet is counted once. Keyed by service, not release: a switch changes no
//!   rule and keeps the counts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::manifest::Protocol;

/// The default table name.
pub const DEFAULT_TABLE: &str = "cutover";
/// The default packet mark bit set on traffic cutover DNATs (matched in DOCKER-USER).
pub const DEFAULT_MARK: u32 = 0x2000_0000;
/// The name of the IPv4 DNAT map inside the table (keyed by protocol and port).
pub const DNAT_MAP: &str = "dnat4";
/// IPv4, keyed also by the host address (`host_ip`).
pub const DNAT_MAP_ADDR: &str = "dnat4_addr";
/// IPv6, keyed by protocol and port.
pub const DNAT6_MAP: &str = "dnat6";
/// IPv6, keyed also by the host address.
pub const DNAT6_MAP_ADDR: &str = "dnat6_addr";
/// Priority of the DNAT chains: `dstnat - 5`, so they run before Docker's (`dstnat`).
pub const DNAT_PRIORITY: i32 = -105;
/// Priority of the chain that restores the packet mark from the conntrack mark: `mangle`,
/// long before forwarding decides.
pub const MARK_PRIORITY: i32 = -150;
/// The chain that gives every packet of a DNAT'd connection its mark.
pub const MARK_CHAIN: &str = "mark_prerouting";
/// Priority of the masquerade chain: `srcnat - 5`.
pub const SNAT_PRIORITY: i32 = 95;
/// Priority of the counting chains: `dstnat + 10`, after every DNAT of the hook, so the
/// first packet of a connection already has `ct status dnat`.
pub const COUNT_PRIORITY: i32 = -90;
/// The counting chains (names of the table's chains whose rules carry a service comment).
pub const COUNT_CHAINS: [&str; 2] = ["count_prerouting", "count_output"];

/// IP version of a map, a rule or an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }

    /// The `nft` keyword of the address type (`ip` / `ip6`).
    pub fn keyword(self) -> &'static str {
        match self {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        }
    }
}

/// The map that holds keys of `family`, keyed also by the host address or not.
pub fn map_name(family: Family, by_daddr: bool) -> &'static str {
    match (family, by_daddr) {
        (Family::Ipv4, false) => DNAT_MAP,
        (Family::Ipv4, true) => DNAT_MAP_ADDR,
        (Family::Ipv6, false) => DNAT6_MAP,
        (Family::Ipv6, true) => DNAT6_MAP_ADDR,
    }
}

/// One host port of one service, pointed at the active release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub service: String,
    pub release: u32,
    pub protocol: Protocol,
    pub host_port: u16,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The release's IPv6 address, when its network has IPv6: IPv6 clients reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr6: Option<Ipv6Addr>,
    /// Only traffic to this host address is forwarded (manifest `host_ip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl Target {
    /// A target on every host address, IPv4 only (what most callers and tests need).
    pub fn new(service: &str, release: u32, protocol: Protocol, host_port: u16, addr: Ipv4Addr, port: u16) -> Target {
        Target { service: service.to_string(), release, protocol, host_port, addr, port, addr6: None, host_ip: None }
    }
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

/// Packets and bytes counted for one service, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        self.packets = self.packets.saturating_add(other.packets);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// The rules cutover writes; `nat` turns each into netlink expressions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Rule {
    /// `family` traffic to a local address whose `l4proto . dport` (preceded by the
    /// destination address when `by_daddr`) is found in `map`: set `mark` on the packet and
    /// on its connection (conntrack mark), DNAT to the map's value.
    DnatLocal { map: String, mark: u32, family: Family, by_daddr: bool },
    /// IPv6 to `::1`: leave this chain un-NAT'd (`return`), so it reaches the daemon's
    /// `::1` relay. A DNAT could not help it: a packet from `::1` never leaves the host.
    LeaveLoopback6,
    /// A packet in the original direction of a connection whose conntrack mark has `mark`:
    /// set `mark` on the packet too (every packet after the first, which the DNAT marked).
    RestoreMark { mark: u32 },
    /// Marked IPv4 from 127.0.0.0/8: masquerade (host clients via loopback).
    MasqueradeLoopback { mark: u32 },
    /// Marked IPv4 from `subnet` leaving through `ifname`: masquerade (hairpin).
    MasqueradeHairpin { mark: u32, ifname: String, subnet: Ipv4Addr, prefix: u8 },
    /// Marked IPv6 that came in through `ifname` and leaves through it again: masquerade
    /// (the IPv6 hairpin: a container calling a host IPv6 address whose port cutover
    /// DNATs to a release on the same bridge; without it the release would answer the
    /// container directly and the reply would not match its connection).
    MasqueradeHairpin6 { mark: u32, ifname: String },
    /// Packets of connections DNAT'd from `protocol` host port `port` (on host address
    /// `daddr` only, when given): count them for `service`, whose name is the rule's
    /// comment. No verdict.
    CountService { service: String, protocol: Protocol, port: u16, daddr: Option<IpAddr> },
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ChainKind {
    Nat,
    Filter,
}

impl ChainKind {
    pub fn name(self) -> &'static str {
        match self {
            ChainKind::Nat => "nat",
            ChainKind::Filter => "filter",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub name: String,
    pub kind: ChainKind,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// Key of a DNAT map element. `family` and `daddr` choose the map ([`ElementKey::map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ElementKey {
    pub family: Family,
    /// The host address the port is bound on (`host_ip`); `None`: every local address.
    pub daddr: Option<IpAddr>,
    pub protocol: Protocol,
    pub port: u16,
}

impl ElementKey {
    /// An IPv4 key on every local address.
    pub fn v4(protocol: Protocol, port: u16) -> ElementKey {
        ElementKey { family: Family::Ipv4, daddr: None, protocol, port }
    }

    /// The map this key lives in.
    pub fn map(&self) -> &'static str {
        map_name(self.family, self.daddr.is_some())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Element {
    pub key: ElementKey,
    /// Same family as the key.
    pub addr: IpAddr,
    pub port: u16,
}

/// One DNAT map of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapSpec {
    pub name: String,
    pub family: Family,
    pub by_daddr: bool,
}

impl MapSpec {
    /// `nft` type of the map.
    pub fn type_text(&self) -> String {
        let addr = match self.family {
            Family::Ipv4 => "ipv4_addr",
            Family::Ipv6 => "ipv6_addr",
        };
        let key = if self.by_daddr { format!("{addr} . inet_proto . inet_service") } else { "inet_proto . inet_service".into() };
        format!("{key} : {addr} . inet_service")
    }
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
    /// The IPv4 map (what `apply_ops` callers name); the other maps are in `maps` and an
    /// element's map follows from its key.
    pub map: String,
    pub maps: Vec<MapSpec>,
    pub chains: Vec<Chain>,
    pub elements: Vec<Element>,
    /// What the plan cannot do, for the operator (e.g. a release without IPv6 address).
    pub notes: Vec<String>,
}

/// The four maps (the IPv4 map keyed by port first: tools that read the first map of the
/// table find the one that always existed).
fn map_specs() -> Vec<MapSpec> {
    [(Family::Ipv4, false), (Family::Ipv4, true), (Family::Ipv6, false), (Family::Ipv6, true)]
        .into_iter()
        .map(|(family, by_daddr)| MapSpec { name: map_name(family, by_daddr).to_string(), family, by_daddr })
        .collect()
}

/// The table for `desired`. Deterministic: the same input gives the same rules in the
/// same order.
pub fn ruleset(desired: &Desired) -> Ruleset {
    let mark = desired.mark;
    let maps = map_specs();
    // A DNAT is final for the packet, so the first map that knows the key decides: per
    // family the one keyed by address first, so a port bound on one address wins over the
    // same port on every address.
    let dnat: Vec<Rule> = [(Family::Ipv4, true), (Family::Ipv4, false), (Family::Ipv6, true), (Family::Ipv6, false)]
        .into_iter()
        .map(|(family, by_daddr)| Rule::DnatLocal { map: map_name(family, by_daddr).to_string(), mark, family, by_daddr })
        .collect();
    let mut bridges = desired.bridges.clone();
    bridges.sort();
    bridges.dedup();
    let count = count_rules(&desired.targets);
    let mut post = vec![Rule::MasqueradeLoopback { mark }];
    post.extend(bridges.iter().map(|b| Rule::MasqueradeHairpin {
        mark,
        ifname: b.ifname.clone(),
        subnet: b.subnet,
        prefix: b.prefix,
    }));
    post.extend(bridges.into_iter().map(|b| Rule::MasqueradeHairpin6 { mark, ifname: b.ifname }));
    Ruleset {
        table: desired.table.clone(),
        mark,
        map: DNAT_MAP.to_string(),
        maps,
        chains: vec![
            Chain { name: "prerouting".into(), kind: ChainKind::Nat, hook: Hook::Prerouting, priority: DNAT_PRIORITY, rules: dnat.clone() },
            Chain {
                name: "output".into(),
                kind: ChainKind::Nat,
                hook: Hook::Output,
                priority: DNAT_PRIORITY,
                rules: std::iter::once(Rule::LeaveLoopback6).chain(dnat).collect(),
            },
            Chain { name: "postrouting".into(), kind: ChainKind::Nat, hook: Hook::Postrouting, priority: SNAT_PRIORITY, rules: post },
            count_chain(COUNT_CHAINS[0], Hook::Prerouting, count.clone()),
            count_chain(COUNT_CHAINS[1], Hook::Output, count),
            Chain {
                name: MARK_CHAIN.into(),
                kind: ChainKind::Filter,
                hook: Hook::Prerouting,
                priority: MARK_PRIORITY,
                rules: vec![Rule::RestoreMark { mark }],
            },
        ],
        elements: elements(&desired.targets),
        notes: notes(&desired.targets),
    }
}

fn count_chain(name: &str, hook: Hook, rules: Vec<Rule>) -> Chain {
    Chain { name: name.into(), kind: ChainKind::Filter, hook, priority: COUNT_PRIORITY, rules }
}

/// One counting rule per service host port (per protocol and bound address), sorted.
/// Independent of releases and their addresses, so a switch never changes them.
pub fn count_rules(targets: &[Target]) -> Vec<Rule> {
    let keys: std::collections::BTreeSet<(&str, Protocol, u16, Option<IpAddr>)> =
        targets.iter().map(|t| (t.service.as_str(), t.protocol, t.host_port, t.host_ip)).collect();
    keys.into_iter()
        .map(|(service, protocol, port, daddr)| Rule::CountService { service: service.to_string(), protocol, port, daddr })
        .collect()
}

impl Ruleset {
    /// The services the table counts traffic for.
    pub fn counted_services(&self) -> std::collections::BTreeSet<&str> {
        self.chains
            .iter()
            .flat_map(|c| &c.rules)
            .filter_map(|r| match r {
                Rule::CountService { service, .. } => Some(service.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// The map elements one target needs: IPv4 always (unless bound to an IPv6 host
/// address), IPv6 when the release has an IPv6 address (unless bound to an IPv4 one).
fn target_elements(t: &Target) -> Vec<Element> {
    let mut out = Vec::new();
    let wants = |family: Family| t.host_ip.is_none_or(|ip| Family::of(&ip) == family);
    if wants(Family::Ipv4) {
        let key = ElementKey { family: Family::Ipv4, daddr: t.host_ip, protocol: t.protocol, port: t.host_port };
        out.push(Element { key, addr: IpAddr::V4(t.addr), port: t.port });
    }
    if let (true, Some(addr6)) = (wants(Family::Ipv6), t.addr6) {
        let key = ElementKey { family: Family::Ipv6, daddr: t.host_ip, protocol: t.protocol, port: t.host_port };
        out.push(Element { key, addr: IpAddr::V6(addr6), port: t.port });
    }
    out
}

/// Map elements for `targets`, sorted by key.
pub fn elements(targets: &[Target]) -> Vec<Element> {
    let mut by_key: BTreeMap<ElementKey, Element> = BTreeMap::new();
    for e in targets.iter().flat_map(target_elements) {
        by_key.insert(e.key, e);
    }
    by_key.into_values().collect()
}

/// What the plan leaves out and why: releases without an IPv6 address get no IPv6
/// elements, so IPv6 clients of their ports are not forwarded.
pub fn notes(targets: &[Target]) -> Vec<String> {
    let mut out = Vec::new();
    for t in targets.iter().filter(|t| t.addr6.is_none()) {
        let where_ = match t.host_ip {
            Some(IpAddr::V4(_)) => continue,
            Some(ip @ IpAddr::V6(_)) => format!("[{ip}]:{}", t.host_port),
            None => format!("port {}", t.host_port),
        };
        out.push(format!(
            "{} release {}: no IPv6 address on its network, so IPv6 clients of {}/{where_} are not forwarded",
            t.service, t.release, t.protocol
        ));
    }
    out
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

/// A host port as the NAT keys it: protocol, number, and the host address it is bound to
/// (`None`: every address).
pub type HostPort = (Protocol, u16, Option<IpAddr>);

/// The one conflict rule: two host ports clash when protocol and number match and their
/// host addresses overlap (every address overlaps each one).
pub fn host_ports_clash(a: HostPort, b: HostPort) -> bool {
    a.0 == b.0 && a.1 == b.1 && crate::manifest::host_addresses_overlap(a.2, b.2)
}

/// The map elements `targets` would get, before any release runs (what `cutover plan`
/// prints): the keys and maps of [`elements`], the release address a placeholder. An
/// IPv6 element is marked as depending on the release having an IPv6 address.
pub fn preview_elements(table: &str, targets: &[Target]) -> Vec<String> {
    let mut out = Vec::new();
    for t in targets {
        // Ask for both families: the release's IPv6 address is unknown before it runs.
        let both = Target { addr6: Some(std::net::Ipv6Addr::UNSPECIFIED), ..t.clone() };
        for e in target_elements(&both) {
            let when = if e.key.family == Family::Ipv6 && t.host_ip.is_none() {
                "  # (only if the release has an IPv6 address on its network)"
            } else {
                ""
            };
            out.push(format!(
                "add element inet {table} {} {{ {} : <address of {}'s active release> . {} }}{when}",
                e.key.map(),
                e.key,
                t.service,
                e.port
            ));
        }
    }
    out
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::DnatLocal { map, mark, family, by_daddr } => {
                let (nfproto, ip) = match family {
                    Family::Ipv4 => ("ipv4", "ip"),
                    Family::Ipv6 => ("ipv6", "ip6"),
                };
                let key = if *by_daddr { format!("{ip} daddr . meta l4proto . th dport") } else { "meta l4proto . th dport".into() };
                write!(
                    f,
                    "meta nfproto {nfproto} fib daddr type local {key} @{map} meta mark set meta mark | {mark:#010x} ct mark set ct mark | {mark:#010x} dnat {ip} to {key} map @{map}"
                )
            }
            Rule::LeaveLoopback6 => f.write_str("meta nfproto ipv6 ip6 daddr ::1 return"),
            Rule::RestoreMark { mark } => write!(
                f,
                "ct direction original ct mark & {mark:#010x} == {mark:#010x} meta mark set meta mark | {mark:#010x}"
            ),
            Rule::MasqueradeLoopback { mark } => {
                write!(f, "meta nfproto ipv4 meta mark & {mark:#010x} == {mark:#010x} ip saddr 127.0.0.0/8 masquerade")
            }
            Rule::MasqueradeHairpin { mark, ifname, subnet, prefix } => write!(
                f,
                "meta nfproto ipv4 meta mark & {mark:#010x} == {mark:#010x} oifname \"{ifname}\" ip saddr {subnet}/{prefix} masquerade"
            ),
            Rule::MasqueradeHairpin6 { mark, ifname } => write!(
                f,
                "meta nfproto ipv6 meta mark & {mark:#010x} == {mark:#010x} iifname \"{ifname}\" oifname \"{ifname}\" masquerade"
            ),
            Rule::CountService { service, protocol, port, daddr } => {
                f.write_str("ct status dnat ")?;
                match daddr {
                    Some(IpAddr::V4(a)) => write!(f, "meta nfproto ipv4 ct original ip daddr {a} ")?,
                    Some(IpAddr::V6(a)) => write!(f, "meta nfproto ipv6 ct original ip6 daddr {a} ")?,
                    None => {}
                }
                write!(f, "meta l4proto {protocol} ct original proto-dst {port} counter comment \"{service}\"")
            }
        }
    }
}

impl fmt::Display for ElementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(daddr) = self.daddr {
            write!(f, "{daddr} . ")?;
        }
        write!(f, "{} . {}", self.protocol, self.port)
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} : {} . {}", self.key, self.addr, self.port)
    }
}

impl fmt::Display for Ruleset {
    /// The table in `nft -f` syntax (what `cutover plan` prints), notes as comments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for note in &self.notes {
            writeln!(f, "# {note}")?;
        }
        writeln!(f, "table inet {} {{", self.table)?;
        for (i, map) in self.maps.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "\tmap {} {{", map.name)?;
            writeln!(f, "\t\ttype {}", map.type_text())?;
            let list: Vec<String> = self.elements.iter().filter(|e| e.key.map() == map.name).map(ToString::to_string).collect();
            if !list.is_empty() {
                writeln!(f, "\t\telements = {{ {} }}", list.join(",\n\t\t\t     "))?;
            }
            writeln!(f, "\t}}")?;
        }
        for chain in &self.chains {
            writeln!(f)?;
            writeln!(f, "\tchain {} {{", chain.name)?;
            writeln!(f, "\t\ttype {} hook {} priority {}; policy accept;", chain.kind.name(), chain.hook.name(), chain.priority)?;
            for rule in &chain.rules {
                writeln!(f, "\t\t{rule}")?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host ports of `existing` whose key another service of `new` uses: the conflict
    /// rule over targets.
    fn conflicts<'a>(existing: &'a [Target], new: &[Target]) -> Vec<&'a Target> {
        existing
            .iter()
            .filter(|e| {
                new.iter().any(|n| {
                    n.service != e.service && host_ports_clash((n.protocol, n.host_port, n.host_ip), (e.protocol, e.host_port, e.host_ip))
                })
            })
            .collect()
    }

    /// Element changes as `nft` commands, to read them in assertions. `map` is unused for
    /// keys of other maps: each element goes to the map of its key.
    fn render_ops(table: &str, map: &str, ops: &[ElementOp]) -> String {
        let map_of = |k: &ElementKey| if k.map() == DNAT_MAP { map.to_string() } else { k.map().to_string() };
        ops.iter()
            .map(|op| match op {
                ElementOp::Delete(k) => format!("delete element inet {table} {} {{ {k} }}\n", map_of(k)),
                ElementOp::Add(e) => format!("add element inet {table} {} {{ {e} }}\n", map_of(&e.key)),
            })
            .collect()
    }

    fn target(service: &str, release: u32, port: u16, addr: [u8; 4]) -> Target {
        Target::new(service, release, Protocol::Tcp, port, addr.into(), 80)
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
        let maps: Vec<_> = rs.maps.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(maps, [DNAT_MAP, DNAT_MAP_ADDR, DNAT6_MAP, DNAT6_MAP_ADDR]);
        // Per family the by-address map is looked up first: it wins.
        let order: Vec<_> = rs.chains[0].rules.iter().map(|r| match r {
            Rule::DnatLocal { map, .. } => map.as_str(),
            _ => "?",
        }).collect();
        assert_eq!(order, [DNAT_MAP_ADDR, DNAT_MAP, DNAT6_MAP_ADDR, DNAT6_MAP]);
        assert_eq!(
            hooks,
            vec![
                (Hook::Prerouting, -105),
                (Hook::Output, -105),
                (Hook::Postrouting, 95),
                (Hook::Prerouting, -90),
                (Hook::Output, -90),
                (Hook::Prerouting, -150)
            ]
        );
        let kinds: Vec<_> = rs.chains.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [ChainKind::Nat, ChainKind::Nat, ChainKind::Nat, ChainKind::Filter, ChainKind::Filter, ChainKind::Filter]);
        assert_eq!(rs.elements.len(), 1);
        let text = rs.to_string();
        assert!(text.contains("tcp . 8080 : 172.17.0.2 . 80"), "{text}");
        assert!(text.contains("ip saddr 127.0.0.0/8 masquerade"), "{text}");
        assert!(text.contains("oifname \"docker0\" ip saddr 172.17.0.0/16 masquerade"), "{text}");
        assert!(text.contains("meta nfproto ipv6 meta mark & 0x20000000 == 0x20000000 iifname \"docker0\" oifname \"docker0\" masquerade"), "{text}");
    }

    #[test]
    fn loopback6_leaves_the_output_chain_before_any_dnat() {
        // `::1` is the relay's: a DNAT of it could never leave the host.
        let rs = ruleset(&desired(vec![target("web", 1, 8080, [172, 17, 0, 2])]));
        let output = rs.chains.iter().find(|c| c.name == "output").unwrap();
        assert_eq!(output.rules.first(), Some(&Rule::LeaveLoopback6));
        assert_eq!(output.rules.len(), 5, "then the four DNAT rules");
        let prerouting = rs.chains.iter().find(|c| c.name == "prerouting").unwrap();
        assert!(!prerouting.rules.contains(&Rule::LeaveLoopback6), "::1 never arrives from outside");
        assert!(rs.to_string().contains("meta nfproto ipv6 ip6 daddr ::1 return"), "{rs}");
    }

    #[test]
    fn the_mark_follows_the_connection() {
        // The nat chains see a connection's first packet only: the DNAT rule marks the
        // connection too, and a mangle-priority chain marks every later packet of it in
        // the original direction (a retransmitted SYN, a UDP datagram before the reply),
        // so Docker's FORWARD accept on the mark lets it through as well.
        let rs = ruleset(&desired(vec![target("web", 1, 8080, [172, 17, 0, 2])]));
        let text = rs.to_string();
        assert!(
            text.contains(
                "\tchain mark_prerouting {\n\t\ttype filter hook prerouting priority -150; policy accept;\n\
                 \t\tct direction original ct mark & 0x20000000 == 0x20000000 meta mark set meta mark | 0x20000000\n\t}"
            ),
            "{text}"
        );
        let dnat = rs.chains.iter().flat_map(|c| &c.rules).filter(|r| matches!(r, Rule::DnatLocal { .. }));
        for rule in dnat {
            assert!(rule.to_string().contains("meta mark set meta mark | 0x20000000 ct mark set ct mark | 0x20000000 dnat"), "{rule}");
        }
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
        assert!(matches!(&ops[1], ElementOp::Add(e) if e.addr == IpAddr::from([172, 17, 0, 3])));
    }

    #[test]
    fn each_service_port_is_counted_on_both_hooks_and_a_switch_keeps_the_rules() {
        let mut bound = target("api", 1, 9090, [172, 17, 0, 4]);
        bound.host_ip = Some("192.0.2.10".parse().unwrap());
        let mut udp = target("web", 1, 8080, [172, 17, 0, 2]);
        udp.protocol = Protocol::Udp;
        let v1 = ruleset(&desired(vec![target("web", 1, 8080, [172, 17, 0, 2]), udp.clone(), bound.clone()]));
        let text = v1.to_string();
        assert!(
            text.contains(
                "\tchain count_prerouting {\n\t\ttype filter hook prerouting priority -90; policy accept;\n\
                 \t\tct status dnat meta nfproto ipv4 ct original ip daddr 192.0.2.10 meta l4proto tcp ct original proto-dst 9090 counter comment \"api\"\n\
                 \t\tct status dnat meta l4proto tcp ct original proto-dst 8080 counter comment \"web\"\n\
                 \t\tct status dnat meta l4proto udp ct original proto-dst 8080 counter comment \"web\"\n\t}"
            ),
            "{text}"
        );
        assert!(text.contains("\tchain count_output {\n\t\ttype filter hook output priority -90; policy accept;\n"), "{text}");
        assert_eq!(v1.counted_services().into_iter().collect::<Vec<_>>(), ["api", "web"]);
        // A switch moves the release, not the port: the rules (and so their counters) stay.
        let mut udp2 = udp;
        udp2.release = 2;
        udp2.addr = [172, 17, 0, 3].into();
        let v2 = ruleset(&desired(vec![target("web", 2, 8080, [172, 17, 0, 3]), udp2, bound]));
        assert_eq!(v1.chains, v2.chains);
        assert_eq!(element_ops(&v1.elements, &v2.elements).len(), 4);
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
        assert_eq!(ops, vec![ElementOp::Delete(ElementKey::v4(Protocol::Tcp, 8080))]);
        assert_eq!(render_ops("t", DNAT_MAP, &ops), "delete element inet t dnat4 { tcp . 8080 }\n");
    }

    #[test]
    fn conflicting_ports_are_found() {
        let existing = vec![target("web", 1, 8080, [172, 17, 0, 2])];
        assert_eq!(conflicts(&existing, &[target("api", 1, 8080, [1, 1, 1, 1])]).len(), 1);
        assert!(conflicts(&existing, &[target("web", 2, 8080, [1, 1, 1, 1])]).is_empty());
    }

    #[test]
    fn host_ip_keys_the_address_map_and_only_its_family() {
        let mut t = target("web", 1, 8080, [172, 17, 0, 2]);
        t.host_ip = Some("192.0.2.10".parse().unwrap());
        t.addr6 = Some("fd00::2".parse().unwrap());
        let e = elements(&[t]);
        assert_eq!(e.len(), 1, "an IPv4 host_ip gets no IPv6 element: {e:?}");
        assert_eq!(e[0].key.map(), DNAT_MAP_ADDR);
        assert_eq!(e[0].to_string(), "192.0.2.10 . tcp . 8080 : 172.17.0.2 . 80");
        let rs = ruleset(&desired(vec![]));
        let text = rs.to_string();
        assert!(text.contains("type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service"), "{text}");
        assert!(text.contains("ip daddr . meta l4proto . th dport @dnat4_addr"), "{text}");
        let ops = element_ops(&[], &e);
        assert_eq!(
            render_ops("t", DNAT_MAP, &ops),
            "add element inet t dnat4_addr { 192.0.2.10 . tcp . 8080 : 172.17.0.2 . 80 }\n"
        );
    }

    #[test]
    fn same_port_on_two_host_addresses_is_no_conflict() {
        let mut a = target("web", 1, 8080, [172, 17, 0, 2]);
        a.host_ip = Some("192.0.2.10".parse().unwrap());
        let mut b = target("api", 1, 8080, [172, 17, 0, 3]);
        b.host_ip = Some("192.0.2.11".parse().unwrap());
        assert!(conflicts(&[a.clone()], &[b.clone()]).is_empty());
        b.host_ip = None;
        assert_eq!(conflicts(&[a], &[b]).len(), 1, "every address includes the other one");
    }

    #[test]
    fn dual_stack_release_gets_both_families_and_one_switch_moves_both() {
        let mut v1 = target("web", 1, 8080, [172, 17, 0, 2]);
        v1.addr6 = Some("fd00::2".parse().unwrap());
        let mut v2 = target("web", 2, 8080, [172, 17, 0, 3]);
        v2.addr6 = Some("fd00::3".parse().unwrap());
        let (e1, e2) = (elements(&[v1]), elements(&[v2]));
        assert_eq!(e1.iter().map(|e| e.key.map()).collect::<Vec<_>>(), [DNAT_MAP, DNAT6_MAP]);
        assert_eq!(e1[1].to_string(), "tcp . 8080 : fd00::2 . 80");
        let ops = element_ops(&e1, &e2);
        assert_eq!(ops.len(), 4, "delete and add in both maps, one transaction: {ops:?}");
        assert!(notes(&[target("web", 1, 8080, [172, 17, 0, 2])]).len() == 1);
    }

    #[test]
    fn the_plan_says_when_a_release_has_no_ipv6_address() {
        let rs = ruleset(&desired(vec![target("web", 3, 8080, [172, 17, 0, 2])]));
        let text = rs.to_string();
        assert!(
            text.starts_with("# web release 3: no IPv6 address on its network, so IPv6 clients of tcp/port 8080 are not forwarded\n"),
            "{text}"
        );
        assert!(rs.elements.iter().all(|e| e.key.family == Family::Ipv4));
        assert!(text.contains("meta nfproto ipv6 fib daddr type local meta l4proto . th dport @dnat6"), "{text}");
        assert!(text.contains("dnat ip6 to meta l4proto . th dport map @dnat6"), "{text}");
    }
}
