//! nftables effects: applies a [`plan::Ruleset`](crate::plan::Ruleset) and map element
//! changes to the kernel over netlink (nftnl + mnl), one batch per operation.
//!
//! Owns cutover's own table and its DOCKER-USER accept rule; it must never touch any
//! other table's rules. What the rules are is decided in `plan`; this module only
//! translates and sends.
//!
//! ```no_run
//! use cutover::nat::{Firewall, NftFirewall};
//! use cutover::plan;
//! # fn main() -> Result<(), cutover::nat::NatError> {
//! # let desired = plan::Desired::default();
//! # let (old, new) = (Vec::new(), Vec::new());
//! let fw = NftFirewall::new();
//! let rs = plan::ruleset(&desired);
//! fw.sync(&rs)?;                                    // whole table, one transaction
//! fw.ensure_forward_accept(&rs.table, rs.mark)?;    // past Docker's FORWARD DROP
//! let ops = plan::element_ops(&old, &new);
//! fw.apply_ops(&rs.table, &rs.map, &ops)?;          // the cutover, one transaction
//! # Ok(()) }
//! ```
//!
//! Layout: [`nft`] implements [`Firewall`]; [`netlink`] sends a batch and reads every
//! ack; [`expr`] builds the rule expressions nftnl lacks; [`map`] writes the DNAT map and
//! its elements; [`docker_user`] owns the DOCKER-USER accept.
//!
//! Per-service traffic is counted by the table's own counting chains (see `plan`) and
//! read back with one rule dump ([`Firewall::counters`]); nothing here keeps counts.
//!
//! The mark is set in a nat chain, so only the first packet of a connection carries it:
//! the DOCKER-USER accept lets that packet through, and Docker's own per-bridge
//! `RELATED,ESTABLISHED` accept the rest. A release behind an interface Docker does not
//! manage needs its own ESTABLISHED accept in FORWARD.

use crate::plan::{ElementOp, Ruleset, Traffic};

pub mod docker_fw;
pub mod docker_user;
pub mod expr;
pub mod iptables;
pub mod map;
pub mod netlink;
pub mod nft;

use std::sync::Arc;

pub use iptables::IptablesFirewall;
pub use netlink::MessageRejected;
pub use nft::NftFirewall;

/// Which data plane the daemon programs (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One nftables table with DNAT maps: every switch is one netlink transaction.
    #[default]
    Nftables,
    /// Chains of the iptables `nat` table, rewritten with iptables-restore.
    Iptables,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nftables" | "nft" => Ok(Backend::Nftables),
            "iptables" => Ok(Backend::Iptables),
            other => Err(format!("unknown backend `{other}`: use nftables or iptables")),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        })
    }
}

/// The one place a backend is chosen.
pub fn firewall(backend: Backend) -> Arc<dyn Firewall> {
    match backend {
        Backend::Nftables => Arc::new(NftFirewall::new()),
        Backend::Iptables => Arc::new(IptablesFirewall::new()),
    }
}

/// Errors of the nftables and iptables effects.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("cannot open a netfilter netlink socket (are you root with CAP_NET_ADMIN?): {0}")]
    Socket(#[source] std::io::Error),
    #[error("nftables refused the {what} transaction for table `{table}`: {source}")]
    Batch {
        what: &'static str,
        table: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read table `{table}` from nftables: {source}")]
    Read {
        table: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Iptables { command: String, stderr: String },
    #[error("cannot run iptables (install the iptables package): {0}")]
    IptablesMissing(#[source] std::io::Error),
    #[error("cutover cannot express this rule (fix the manifest or the configuration): {0}")]
    InvalidRule(String),
    #[error("cutover cannot work with how this Docker engine filters traffic: {0}")]
    DockerFirewall(String),
    #[error("cannot set {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The data plane cutover programs: [`NftFirewall`] or [`IptablesFirewall`], chosen by
/// [`firewall`]; the release state machine's tests use a fake.
pub trait Firewall: Send + Sync + 'static {
    /// Make the table exactly `ruleset`, in one transaction (creating it if it is
    /// missing, replacing whatever it held). Established connections keep their NAT
    /// bindings through conntrack, so this never interrupts traffic.
    fn sync(&self, ruleset: &Ruleset) -> Result<(), NatError>;
    /// Apply `ops` to the DNAT map of `table` in one transaction: the cutover itself.
    fn apply_ops(&self, table: &str, map: &str, ops: &[ElementOp]) -> Result<(), NatError>;
    /// Delete the table; not an error if it does not exist.
    fn delete_table(&self, table: &str) -> Result<(), NatError>;
    /// Does the table exist?
    fn table_exists(&self, table: &str) -> Result<bool, NatError>;
    /// Packets and bytes of each service's forwarded connections, both directions, as
    /// the counting rules saw them since [`Firewall::sync`] last wrote them (a sync starts
    /// them at zero; map changes keep them). Empty when the table does not exist.
    fn counters(&self, table: &str) -> Result<std::collections::BTreeMap<String, Traffic>, NatError>;
    /// Let forwarded traffic that carries `mark` past Docker's FORWARD DROP: an ACCEPT in
    /// DOCKER-USER tagged with a comment naming `table`. Idempotent; a no-op (Ok) when
    /// the host has no DOCKER-USER chain.
    fn ensure_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError>;
    /// Remove what [`Firewall::ensure_forward_accept`] added; idempotent.
    fn remove_forward_accept(&self, table: &str, mark: u32) -> Result<(), NatError>;
}
