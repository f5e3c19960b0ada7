//! [`NftFirewall`]: the real [`Firewall`], one netlink transaction per operation.

use std::ffi::CString;
use std::path::PathBuf;

use nftnl::{ChainType, MsgType, Policy, ProtoFamily};

use super::docker_user;
use super::expr::rule_exprs;
use super::map::{ElementsMsg, MapMsg, ELEMENTS_PER_MESSAGE};
use super::netlink::{self, Socket, Transaction};
use super::{Firewall, NatError};
use crate::plan::{ElementOp, Hook, Ruleset};

/// Id of the map inside a sync batch, so rules can name it before it is committed.
const MAP_ID: u32 = 1;

/// nftables through netlink (nftnl + mnl); DOCKER-USER through the iptables binary.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    iptables: PathBuf,
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
        NftFirewall { iptables: PathBuf::from(docker_user::DEFAULT_IPTABLES) }
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

/// The sync transaction for `rs` (built without touching the kernel).
fn sync_transaction(rs: &Ruleset) -> Result<Transaction, NatError> {
    let t = &rs.table;
    let table_name = name("table", t)?;
    let map_name = name("map", &rs.map)?;
    let table = nftnl::Table::new(&table_name, ProtoFamily::Inet);
    let mut tx = Transaction::new();
    // Adding first makes the delete valid whether or not the table exists; the delete
    // then drops everything in it, so the result is exactly `rs`, atomically.
    tx.add(&table, MsgType::Add, format!("make sure table inet {t} exists"));
    tx.add(&table, MsgType::Del, format!("delete the old table inet {t}"));
    tx.add(&table, MsgType::Add, format!("create table inet {t}"));
    tx.add(&MapMsg::new(&table_name, &map_name, MAP_ID), MsgType::Add, format!("create map {}", rs.map));
    for chunk in rs.elements.chunks(ELEMENTS_PER_MESSAGE) {
        let mut msg = ElementsMsg::new(&table_name, &map_name);
        chunk.iter().for_each(|e| msg.add(e));
        let label = match chunk {
            [one] => format!("add element {one} to map {}", rs.map),
            [first, ..] => format!("add {} elements ({first}, ...) to map {}", chunk.len(), rs.map),
            [] => continue,
        };
        tx.add(&msg, MsgType::Add, label);
    }
    for c in &rs.chains {
        let chain_name = name("chain", &c.name)?;
        let mut chain = nftnl::Chain::new(&chain_name, &table);
        chain.set_type(ChainType::Nat);
        chain.set_hook(hook(c.hook), c.priority);
        chain.set_policy(Policy::Accept);
        tx.add(
            &chain,
            MsgType::Add,
            format!("create chain {} (nat hook {} priority {})", c.name, c.hook.name(), c.priority),
        );
        for r in &c.rules {
            let mut rule = nftnl::Rule::new(&chain);
            for e in rule_exprs(r, MAP_ID)? {
                rule.add_expr(&e);
            }
            tx.add(&rule, MsgType::Add, format!("add rule to chain {}: {r}", c.name));
        }
    }
    Ok(tx)
}

impl Firewall for NftFirewall {
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError> {
        let tx = sync_transaction(ruleset)?;
        commit(tx, "sync", &ruleset.table)
    }

    fn apply_ops(&self, table: &str, map: &str, ops: &[ElementOp]) -> Result<(), NatError> {
        if ops.is_empty() {
            return Ok(());
        }
        let table_name = name("table", table)?;
        let map_name = name("map", map)?;
        let mut tx = Transaction::new();
        // One message per op, in order (delete before add of the same key), so an error
        // names the exact element.
        for op in ops {
            let mut msg = ElementsMsg::new(&table_name, &map_name);
            match op {
                ElementOp::Delete(k) => {
                    msg.delete(k);
                    tx.add(&msg, MsgType::Del, format!("delete element {} . {} from map {map}", k.protocol, k.port));
                }
                ElementOp::Add(e) => {
                    msg.add(e);
                    tx.add(&msg, MsgType::Add, format!("add element {e} to map {map}"));
                }
            }
        }
        commit(tx, "map update", table)
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
            .map(|i| Target {
                service: format!("s{i}"),
                release: 1,
                protocol: Protocol::Tcp,
                host_port: 10000 + i,
                addr: [10, 0, 0, 2].into(),
                port: 80,
            })
            .collect();
        let rs = plan::ruleset(&Desired { table: "t".into(), mark: 1, targets, bridges: vec![] });
        let tx = sync_transaction(&rs).unwrap();
        // 3 table messages, map, 3 element chunks, 3 chains, 3 rules.
        assert_eq!(tx.len(), 3 + 1 + 3 + 3 + 3);
    }

    #[test]
    fn names_with_nul_are_refused_before_the_kernel() {
        let rs = plan::ruleset(&Desired { table: "a\0b".into(), mark: 1, targets: vec![], bridges: vec![] });
        assert!(matches!(sync_transaction(&rs), Err(NatError::InvalidRule(_))));
    }
}
