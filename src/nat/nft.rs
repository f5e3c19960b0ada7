//! [`NftFirewall`]: the real [`Firewall`], one netlink transaction per operation.

use std::ffi::CString;
use std::path::PathBuf;

use nftnl::{ChainType, MsgType, Policy, ProtoFamily};

use super::docker_user;
use super::expr::rule_exprs;
use super::map::{ElementsMsg, MapMsg, ELEMENTS_PER_MESSAGE};
use super::netlink::{self, Socket, Transaction};
use super::{Firewall, NatError};
use std::collections::BTreeMap;

use crate::plan::{ChainKind, Element, ElementOp, Hook, Rule, Ruleset, Traffic, COUNT_CHAINS};

/// Id of the first map inside a sync batch (the others follow), so rules can name a map
/// before it is committed.
const MAP_ID: u32 = 1;

/// nftables through netlink (nftnl + mnl); DOCKER-USER through the iptables binary.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    iptables: PathBuf,
    /// The socket transactions are sent on, kept open: closing a netfilter socket waits
    /// for nf_tables' deferred release of what the last commit deleted (an RCU grace
    /// period, ~15 ms here), which would otherwise sit in every switch.
    commits: std::sync::Arc<std::sync::Mutex<Option<Socket>>>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("netfilter netlink socket")
    }
}

impl Default for NftFirewall {
    fn default() -> Self {
        Self::new()
    }
}

impl NftFirewall {
    /// Holds no kernel resource: every operation opens its own netlink socket, so this
    /// never fails; permission problems show up as [`NatError::Socket`] on first use.
    pub fn new() -> Self {
        NftFirewall { iptables: PathBuf::from(docker_user::DEFAULT_IPTABLES), commits: Default::default() }
    }

    /// Use another iptables binary for the DOCKER-USER rule (e.g. `iptables-legacy` on a
    /// host whose Docker uses the legacy backend).
    pub fn with_iptables(mut self, path: impl Into<PathBuf>) -> Self {
        self.iptables = path.into();
        self
    }
}

fn name(kind: &str, value: &str) -> Result<CString, NatError> {
    CString::new(value).map_err(|_| NatError::InvalidRule(format!("{kind} name {value:?} contains a NUL byte")))
}

fn hook(h: Hook) -> nftnl::Hook {
    match h {
        Hook::Prerouting => nftnl::Hook::PreRouting,
        Hook::Output => nftnl::Hook::Out,
        Hook::Postrouting => nftnl::Hook::PostRouting,
    }
}

fn open() -> Result<Socket, NatError> {
    Socket::open().map_err(NatError::Socket)
}

fn commit(tx: Transaction, what: &'static str, table: &str) -> Result<(), NatError> {
    let socket = open()?;
    tx.commit(&socket).map_err(|source| NatError::Batch { what, table: table.to_string(), source })
}

impl NftFirewall {
    /// Commit on the kept-open socket. After any error the socket is dropped (it may
    /// hold unread answers) and the next transaction opens a fresh one.
    fn commit_kept(&self, tx: Transaction, what: &'static str, table: &str) -> Result<(), NatError> {
        let mut slot = self.commits.lock().map_err(|_| NatError::Socket(std::io::Error::other("socket lock poisoned")))?;
        let socket = match slot.take() {
            Some(s) => s,
            None => open()?,
        };
        let result = tx.commit(&socket).map_err(|source| NatError::Batch { what, table: table.to_string(), source });
        if result.is_ok() {
            *slot = Some(socket);
        }
        result
    }
}

/// The sync transaction for `rs` (built without touching the kernel).
fn sync_transaction(rs: &Ruleset) -> Result<Transaction, NatError> {
    let t = &rs.table;
    let table_name = name("table", t)?;
    let table = nftnl::Table::new(&table_name, ProtoFamily::Inet);
    let mut tx = Transaction::new();
    // Adding first makes the delete valid whether or not the table exists; the delete
    // then drops everything in it, so the result is exactly `rs`, atomically.
    tx.add(&table, MsgType::Add, format!("make sure table inet {t} exists"));
    tx.add(&table, MsgType::Del, format!("delete the old table inet {t}"));
    tx.add(&table, MsgType::Add, format!("create table inet {t}"));
    let mut map_ids = Vec::new();
    for (i, spec) in rs.maps.iter().enumerate() {
        let map_name = name("map", &spec.name)?;
        let id = MAP_ID + i as u32;
        map_ids.push((spec.name.clone(), id));
        tx.add(
            &MapMsg::new(&table_name, &map_name, id, spec.family, spec.by_daddr),
            MsgType::Add,
            format!("create map {} ({})", spec.name, spec.type_text()),
        );
        let of_map: Vec<&Element> = rs.elements.iter().filter(|e| e.key.map() == spec.name).collect();
        for chunk in of_map.chunks(ELEMENTS_PER_MESSAGE) {
            let mut msg = ElementsMsg::new(&table_name, &map_name);
            chunk.iter().for_each(|e| msg.add(e));
            let label = match chunk {
                [one] => format!("add element {one} to map {}", spec.name),
                [first, ..] => format!("add {} elements ({first}, ...) to map {}", chunk.len(), spec.name),
                [] => continue,
            };
            tx.add(&msg, MsgType::Add, label);
        }
    }
    if let Some(stray) = rs.elements.iter().find(|e| !rs.maps.iter().any(|m| m.name == e.key.map())) {
        return Err(NatError::InvalidRule(format!("element {stray} belongs to map {}, which the table lacks", stray.key.map())));
    }
    let id_of = |map: &str| map_ids.iter().find(|(n, _)| n == map).map(|(_, id)| *id);
    for c in &rs.chains {
        let chain_name = name("chain", &c.name)?;
        let mut chain = nftnl::Chain::new(&chain_name, &table);
        chain.set_type(match c.kind {
            ChainKind::Nat => ChainType::Nat,
            ChainKind::Filter => ChainType::Filter,
        });
        chain.set_hook(hook(c.hook), c.priority);
        chain.set_policy(Policy::Accept);
        tx.add(
            &chain,
            MsgType::Add,
            format!("create chain {} ({} hook {} priority {})", c.name, c.kind.name(), c.hook.name(), c.priority),
        );
        for r in &c.rules {
            let mut rule = nftnl::Rule::new(&chain);
            let map_id = match r {
                Rule::DnatLocal { map, .. } => id_of(map)
                    .ok_or_else(|| NatError::InvalidRule(format!("rule `{r}` names map {map}, which the table lacks")))?,
                _ => 0,
            };
            for e in rule_exprs(r, map_id)? {
                rule.add_expr(&e);
            }
            // The service a counter belongs to, for `counters` (and `nft list`) to read.
            if let Rule::CountService { service, .. } = r {
                rule.set_comment(name("comment", service)?)
                    .map_err(|e| NatError::InvalidRule(format!("comment {service:?}: {e}")))?;
            }
            tx.add(&rule, MsgType::Add, format!("add rule to chain {}: {r}", c.name));
        }
    }
    Ok(tx)
}

/// The counts of the counting chains' rules, summed per service (their comment).
fn per_service(rules: Vec<netlink::RuleCounter>) -> BTreeMap<String, Traffic> {
    let mut out: BTreeMap<String, Traffic> = BTreeMap::new();
    for r in rules {
        if let (true, Some(service)) = (COUNT_CHAINS.contains(&r.chain.as_str()), r.comment) {
            *out.entry(service).or_default() += Traffic { packets: r.packets, bytes: r.bytes };
        }
    }
    out
}

impl Firewall for NftFirewall {
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError> {
        let tx = sync_transaction(ruleset)?;
        self.commit_kept(tx, "sync", &ruleset.table)
    }

    fn apply_ops(&self, table: &str, map: &str, ops: &[ElementOp]) -> Result<(), NatError> {
        if ops.is_empty() {
            return Ok(());
        }
        let table_name = name("table", table)?;
        let mut tx = Transaction::new();
        // `map` names the IPv4 map; every key knows its own map (IPv6, by address).
        let map_of = |key: &crate::plan::ElementKey| -> Result<(String, CString), NatError> {
            let m = if key.map() == crate::plan::DNAT_MAP { map.to_string() } else { key.map().to_string() };
            let c = name("map", &m)?;
            Ok((m, c))
        };
        // One message per op, in order (delete before add of the same key), so an error
        // names the exact element.
        for op in ops {
            match op {
                ElementOp::Delete(k) => {
                    let (m, map_name) = map_of(k)?;
                    let mut msg = ElementsMsg::new(&table_name, &map_name);
                    msg.delete(k);
                    tx.add(&msg, MsgType::Del, format!("delete element {k} from map {m}"));
                }
                ElementOp::Add(e) => {
                    let (m, map_name) = map_of(&e.key)?;
                    let mut msg = ElementsMsg::new(&table_name, &map_name);
                    msg.add(e);
                    tx.add(&msg, MsgType::Add, format!("add element {e} to map {m}"));
                }
            }
        }
        self.commit_kept(tx, "map update", table)
    }

    fn delete_table(&self, table: &str) -> Result<(), NatError> {
        let table_name = name("table", table)?;
        let t = nftnl::Table::new(&table_name, ProtoFamily::Inet);
        let mut tx = Transaction::new();
        // Add first so a missing table is not an error.
        tx.add(&t, MsgType::Add, format!("make sure table inet {table} exists"));
        tx.add(&t, MsgType::Del, format!("delete table inet {table}"));
        commit(tx, "delete", table)
    }

    fn table_exists(&self, table: &str) -> Result<bool, NatError> {
        let table_name = name("table", table)?;
        let socket = open()?;
        netlink::table_exists(&socket, &table_name)
            .map_err(|source| NatError::Read { table: table.to_string(), source })
    }

    fn counters(&self, table: &str) -> Result<BTreeMap<String, Traffic>, NatError> {
        let table_name = name("table", table)?;
        let socket = open()?;
        let rules = netlink::rule_counters(&socket, &table_name)
            .map_err(|source| NatError::Read { table: table.to_string(), source })?;
        Ok(per_service(rules))
    }

    fn ensure_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError> {
        docker_user::ensure_forward_accept(&self.iptables, table, mark)
    }

    fn remove_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError> {
        docker_user::remove_forward_accept(&self.iptables, table, mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Protocol;
    use crate::plan::{self, Desired, Target};

    #[test]
    fn sync_batch_has_one_message_per_object() {
        let targets: Vec<Target> = (0..3000)
            .map(|i| Target::new(&format!("s{i}"), 1, Protocol::Tcp, 10000 + i, [10, 0, 0, 2].into(), 80))
            .collect();
        let rs = plan::ruleset(&Desired { table: "t".into(), mark: 1, targets, bridges: vec![] });
        let tx = sync_transaction(&rs).unwrap();
        // 3 table messages, 4 maps, 6 element chunks of 512, 6 chains, 4 + (1 + 4) + 1 + 1
        // rules (output leaves ::1 to the relay first), and a counting rule per service port
        // in each of the two counting chains.
        assert_eq!(tx.len(), 3 + 4 + 6 + 6 + 11 + 2 * 3000);
    }

    #[test]
    fn counts_of_both_counting_chains_add_up_per_service() {
        let rule = |chain: &str, comment: Option<&str>, packets, bytes| netlink::RuleCounter {
            chain: chain.into(),
            comment: comment.map(Into::into),
            packets,
            bytes,
        };
        let got = per_service(vec![
            rule("count_prerouting", Some("web"), 3, 300),
            rule("count_output", Some("web"), 2, 100),
            rule("count_prerouting", Some("api"), 1, 60),
            rule("prerouting", Some("web"), 50, 5000),
            rule("count_output", None, 7, 700),
        ]);
        assert_eq!(
            got,
            BTreeMap::from([
                ("api".to_string(), Traffic { packets: 1, bytes: 60 }),
                ("web".to_string(), Traffic { packets: 5, bytes: 400 }),
            ])
        );
    }

    #[test]
    fn names_with_nul_are_refused_before_the_kernel() {
        let rs = plan::ruleset(&Desired { table: "a\0b".into(), mark: 1, targets: vec![], bridges: vec![] });
        assert!(matches!(sync_transaction(&rs), Err(NatError::InvalidRule(_))));
    }
}
