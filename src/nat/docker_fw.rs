//! How the Docker engine filters forwarded traffic, and what cutover must do about it.
//!
//! Docker drops forwarded traffic to unpublished container ports, so cutover's DNAT'd
//! packets from other hosts need an explicit accept, and where it goes depends on the
//! engine's firewall:
//! - iptables (every engine up to 28, and 29 by default): an ACCEPT of cutover's mark in
//!   DOCKER-USER, which Docker reserves for users ([`super::docker_user`]);
//! - nftables (Docker 29, `"firewall-backend": "nftables"`): there is no DOCKER-USER; the
//!   only supported way is the daemon option `bridge-accept-fwmark`, which accepts
//!   packets carrying a mark. cutover's DNAT rules already set its mark, so the option
//!   must match it; without it cutover cannot be correct, and it refuses to start with
//!   the exact daemon.json line to add.
//!
//! [`detect`] and [`forward_accept`] are pure (unit-tested per mode); [`Facts::of_host`]
//! gathers what they need. Nothing here changes the engine's configuration.

use std::path::Path;

use super::NatError;

/// Where the engine reads its configuration.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// The table Docker 29's nftables firewall backend creates (one per family).
pub const DOCKER_NFT_TABLE: &str = "docker-bridges";

/// The table netavark (Podman's network stack) uses with its nftables driver.
pub const NETAVARK_NFT_TABLE: &str = "netavark";

/// What was found on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// iptables has Docker's DOCKER-USER chain.
    pub docker_user: bool,
    /// ip6tables has Docker's DOCKER-USER chain (Docker 27 and later filter IPv6 by
    /// default; earlier ones with `"ip6tables": true`).
    pub docker_user6: bool,
    /// nftables has `table ip docker-bridges` (Docker's nftables backend is running).
    pub docker_nft_table: bool,
    /// nftables has `table inet netavark` (rootful Podman with netavark's nftables driver).
    pub netavark_table: bool,
    /// ip6tables' FORWARD policy is DROP (an engine filters IPv6).
    pub ip6_forward_drop: bool,
    /// The text of daemon.json, when it exists.
    pub daemon_json: Option<String>,
    /// Where daemon.json was read from (messages name it); [`DAEMON_JSON`] when empty.
    pub daemon_json_path: String,
}

/// The engine's way of filtering forwarded traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerFirewall {
    /// Nothing of Docker's filtering found (no engine, or `"iptables": false`).
    Unfiltered,
    /// iptables with DOCKER-USER; `ipv6`: ip6tables has one too.
    Iptables { ipv6: bool },
    /// Docker 29's nftables backend, with its `bridge-accept-fwmark` value if set and
    /// the daemon.json it was read from.
    Nftables { accept_fwmark: Option<String>, config: String },
    /// Podman's netavark (nftables, `table inet netavark`): its forward chain accepts
    /// traffic to its networks' subnets and the FORWARD policy stays accept, so
    /// cutover's DNAT'd packets pass without a rule of cutover's.
    Netavark,
}

impl DockerFirewall {
    /// A short name for logs: `iptables`, `iptables+ip6tables`, `nftables`, `netavark`, `none`.
    pub fn name(&self) -> &'static str {
        match self {
            DockerFirewall::Unfiltered => "none",
            DockerFirewall::Iptables { ipv6: false } => "iptables",
            DockerFirewall::Iptables { ipv6: true } => "iptables+ip6tables",
            DockerFirewall::Nftables { .. } => "nftables",
            DockerFirewall::Netavark => "netavark",
        }
    }
}

/// What cutover installs so its DNAT'd traffic passes the engine's filtering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardAccept {
    /// Nothing to install.
    Nothing,
    /// This rule at the top of DOCKER-USER (`iptables` arguments after the chain), in
    /// ip6tables' DOCKER-USER too when `ipv6`.
    DockerUser { spec: Vec<String>, ipv6: bool },
    /// Nothing to install: the engine accepts packets with cutover's mark, which the DNAT
    /// rules set on every first packet of a connection.
    EngineAcceptsMark,
}

impl Facts {
    /// Read the host (the caller's network namespace): the DOCKER-USER chains through
    /// `iptables` and its ip6tables sibling, Docker's and netavark's nftables tables
    /// through `nft`, and `daemon_json`.
    pub fn of_host(iptables: &Path, daemon_json: &Path) -> Result<Facts, NatError> {
        let daemon_json_path = daemon_json;
        let docker_user = super::docker_user::chain_exists(iptables)?;
        let six = super::docker_user::ip6_sibling(iptables).filter(|p| p.exists());
        let docker_user6 = match &six {
            Some(six) => super::docker_user::chain_exists(six)?,
            None => false,
        };
        // `-P FORWARD DROP` is the first line of `ip6tables -S FORWARD` when it drops.
        let ip6_forward_drop = six.as_ref().is_some_and(|six| {
            std::process::Command::new(six)
                .args(["-w", "-S", "FORWARD"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == "-P FORWARD DROP"))
        });
        // `nft` exits non-zero when the table does not exist; a host without nft has no
        // Docker nftables backend either.
        let nft_table = |family: &str, name: &str| {
            std::process::Command::new("nft")
                .args(["list", "table", family, name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let docker_nft_table = nft_table("ip", DOCKER_NFT_TABLE);
        let netavark_table = nft_table("inet", NETAVARK_NFT_TABLE);
        let daemon_json = match std::fs::read_to_string(daemon_json) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(NatError::DockerFirewall(format!("cannot read {}: {e}", daemon_json.display())));
            }
        };
        Ok(Facts {
            docker_user,
            docker_user6,
            docker_nft_table,
            netavark_table,
            ip6_forward_drop,
            daemon_json,
            daemon_json_path: daemon_json_path.display().to_string(),
        })
    }
}

/// The engine's firewall from `facts`. What runs wins over what daemon.json says (the
/// engine may not have been restarted since the file changed), except for the mark
/// option, which only daemon.json shows.
pub fn detect(facts: &Facts) -> Result<DockerFirewall, NatError> {
    let config = if facts.daemon_json_path.is_empty() { DAEMON_JSON.to_string() } else { facts.daemon_json_path.clone() };
    let json: Option<serde_json::Value> = match &facts.daemon_json {
        Some(text) if !text.trim().is_empty() => Some(serde_json::from_str(text).map_err(|e| {
            NatError::DockerFirewall(format!("{config} is not valid JSON ({e}); the engine would not start with it either"))
        })?),
        _ => None,
    };
    let get = |key: &str| json.as_ref().and_then(|j| j.get(key)).and_then(|v| v.as_str()).map(str::to_string);
    let backend_nft = get("firewall-backend").as_deref() == Some("nftables");
    if facts.docker_nft_table || (backend_nft && !facts.docker_user) {
        return Ok(DockerFirewall::Nftables { accept_fwmark: get("bridge-accept-fwmark"), config });
    }
    if facts.docker_user {
        return Ok(DockerFirewall::Iptables { ipv6: facts.docker_user6 });
    }
    if facts.netavark_table {
        return Ok(DockerFirewall::Netavark);
    }
    Ok(DockerFirewall::Unfiltered)
}

/// Why IPv6 clients on other hosts cannot reach releases here, if they cannot: an engine
/// drops forwarded IPv6 (policy DROP) but offers no ip6tables DOCKER-USER chain for
/// cutover's accept (Docker before 27 with experimental `ip6tables`).
pub fn ipv6_warning(facts: &Facts) -> Option<String> {
    (facts.ip6_forward_drop && !facts.docker_user6).then(|| {
        "forwarded IPv6 is dropped (ip6tables FORWARD policy DROP) and there is no ip6tables DOCKER-USER chain \
         for cutover's accept, so IPv6 clients on other hosts cannot reach releases: on Docker before 27 remove \
         \"ip6tables\": true from daemon.json, or upgrade to Docker 27 or later (which has the chain)"
            .to_string()
    })
}

/// Parse a `bridge-accept-fwmark` value: `MARK` or `MARK/MASK`, decimal or `0x` hex.
pub fn parse_fwmark(value: &str) -> Option<(u32, u32)> {
    let num = |s: &str| {
        let s = s.trim();
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    match value.split_once('/') {
        Some((m, mask)) => Some((num(m)?, num(mask)?)),
        None => Some((num(value)?, u32::MAX)),
    }
}

/// The daemon.json line that makes the engine accept cutover's `mark`. The mask is the
/// mark itself, so other mark bits (set by other tools) do not matter.
pub fn fwmark_line(mark: u32) -> String {
    format!("\"bridge-accept-fwmark\": \"{mark:#x}/{mark:#x}\"")
}

/// What cutover must install for `mode`, or why it cannot work there.
pub fn forward_accept(mode: &DockerFirewall, table: &str, mark: u32) -> Result<ForwardAccept, NatError> {
    match mode {
        DockerFirewall::Unfiltered | DockerFirewall::Netavark => Ok(ForwardAccept::Nothing),
        DockerFirewall::Iptables { ipv6 } => {
            Ok(ForwardAccept::DockerUser { spec: super::docker_user::rule_spec(table, mark), ipv6: *ipv6 })
        }
        DockerFirewall::Nftables { accept_fwmark, config } => {
            let advice = format!(
                "add {} to {config} and restart the engine (or start cutover with --mark set to the mark already configured)",
                fwmark_line(mark)
            );
            match accept_fwmark.as_deref().map(|v| (v, parse_fwmark(v))) {
                None => Err(NatError::DockerFirewall(format!(
                    "Docker uses its nftables firewall backend, which has no DOCKER-USER chain and drops forwarded traffic \
                     to unpublished ports unless it carries the mark of `bridge-accept-fwmark`, which is not set: {advice}"
                ))),
                Some((v, None)) => Err(NatError::DockerFirewall(format!(
                    "`bridge-accept-fwmark` in {config} is `{v}`, which is not MARK or MARK/MASK: {advice}"
                ))),
                // cutover ORs its mark into the packet's: the engine's test
                // `mark & mask == value` holds when the value is exactly our bit(s).
                Some((_, Some((value, mask)))) if value != 0 && mark & mask == value => Ok(ForwardAccept::EngineAcceptsMark),
                Some((v, Some(_))) => Err(NatError::DockerFirewall(format!(
                    "`bridge-accept-fwmark` in {config} is `{v}`, which packets with cutover's mark {mark:#x} do not match: {advice}"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{self, Desired, Rule};

    const MARK: u32 = 0x2000_0000;

    fn facts(docker_user: bool, docker_nft_table: bool, json: Option<&str>) -> Facts {
        Facts { docker_user, docker_nft_table, daemon_json: json.map(str::to_string), ..Facts::default() }
    }

    /// Every DNAT rule of the plan sets the mark the engine must accept.
    fn plan_marks_dnat(mark: u32) -> bool {
        let rs = plan::ruleset(&Desired { table: "t".into(), mark, targets: vec![], bridges: vec![] });
        rs.chains
            .iter()
            .flat_map(|c| &c.rules)
            .filter(|r| matches!(r, Rule::DnatLocal { .. }))
            .all(|r| r.to_string().contains(&format!("meta mark set meta mark | {mark:#010x}")))
    }

    #[test]
    fn iptables_engine_gets_the_docker_user_accept() {
        let mode = detect(&facts(true, false, Some(r#"{"log-level": "info"}"#))).unwrap();
        assert_eq!(mode, DockerFirewall::Iptables { ipv6: false });
        let ForwardAccept::DockerUser { spec, ipv6: false } = forward_accept(&mode, "cutover", MARK).unwrap() else {
            panic!("DOCKER-USER rule")
        };
        assert_eq!(spec.join(" "), "-m mark --mark 0x20000000/0x20000000 -m comment --comment cutover:cutover -j ACCEPT");
        assert!(plan_marks_dnat(MARK));
    }

    #[test]
    fn an_engine_filtering_ipv6_gets_the_accept_in_ip6tables_too() {
        // Docker 27 and later: ip6tables on by default, with its own DOCKER-USER.
        let f = Facts { docker_user: true, docker_user6: true, ..Facts::default() };
        let mode = detect(&f).unwrap();
        assert_eq!(mode, DockerFirewall::Iptables { ipv6: true });
        assert_eq!(mode.name(), "iptables+ip6tables");
        assert!(matches!(forward_accept(&mode, "t", MARK).unwrap(), ForwardAccept::DockerUser { ipv6: true, .. }));
    }

    #[test]
    fn ipv6_dropped_without_a_chain_for_the_accept_is_named() {
        // Docker 20.10 with experimental ip6tables: FORWARD DROP, no ip6 DOCKER-USER.
        let f = Facts { docker_user: true, ip6_forward_drop: true, ..Facts::default() };
        assert!(ipv6_warning(&f).unwrap().contains(r#"remove "ip6tables": true from daemon.json"#));
        // Docker 27 and later: the chain is there, cutover's accept goes into it.
        let f = Facts { docker_user: true, docker_user6: true, ip6_forward_drop: true, ..Facts::default() };
        assert_eq!(ipv6_warning(&f), None);
        assert_eq!(ipv6_warning(&Facts::default()), None);
    }

    #[test]
    fn podman_with_netavark_needs_no_rule_and_is_not_refused() {
        // Rootful Podman: no DOCKER-USER, `table inet netavark`, no daemon.json.
        let f = Facts { netavark_table: true, ..Facts::default() };
        let mode = detect(&f).unwrap();
        assert_eq!(mode, DockerFirewall::Netavark);
        assert_eq!(forward_accept(&mode, "t", MARK).unwrap(), ForwardAccept::Nothing);
        // Docker with `"iptables": false`: nothing filters, nothing refused.
        let off = detect(&facts(false, false, Some(r#"{"iptables": false}"#))).unwrap();
        assert_eq!(off, DockerFirewall::Unfiltered);
        assert_eq!(forward_accept(&off, "t", MARK).unwrap(), ForwardAccept::Nothing);
    }

    #[test]
    fn nftables_engine_with_the_mark_option_needs_no_rule() {
        let json = r#"{"firewall-backend": "nftables", "bridge-accept-fwmark": "0x20000000/0x20000000"}"#;
        let mode = detect(&facts(false, true, Some(json))).unwrap();
        assert_eq!(
            mode,
            DockerFirewall::Nftables { accept_fwmark: Some("0x20000000/0x20000000".into()), config: DAEMON_JSON.into() }
        );
        assert_eq!(forward_accept(&mode, "cutover", MARK).unwrap(), ForwardAccept::EngineAcceptsMark);
        assert!(plan_marks_dnat(MARK), "the engine accepts what cutover's DNAT rules mark");
        // Without a mask the engine compares the whole mark: still our exact bit.
        let exact = DockerFirewall::Nftables { accept_fwmark: Some("536870912".into()), config: DAEMON_JSON.into() };
        assert_eq!(forward_accept(&exact, "cutover", MARK).unwrap(), ForwardAccept::EngineAcceptsMark);
    }

    #[test]
    fn nftables_engine_without_the_mark_option_is_refused_with_the_line_to_add() {
        let mode = detect(&facts(false, true, Some(r#"{"firewall-backend": "nftables"}"#))).unwrap();
        let err = forward_accept(&mode, "cutover", MARK).unwrap_err().to_string();
        assert!(
            err.contains(r#"add "bridge-accept-fwmark": "0x20000000/0x20000000" to /etc/docker/daemon.json and restart the engine"#),
            "{err}"
        );
        // Configured in the file but the engine not restarted yet: same verdict.
        let pending = detect(&facts(false, false, Some(r#"{"firewall-backend": "nftables"}"#))).unwrap();
        assert!(forward_accept(&pending, "cutover", MARK).is_err());
    }

    #[test]
    fn a_mark_option_that_does_not_match_is_refused() {
        let mode = DockerFirewall::Nftables { accept_fwmark: Some("0x1".into()), config: DAEMON_JSON.into() };
        let err = forward_accept(&mode, "cutover", MARK).unwrap_err().to_string();
        assert!(err.contains("is `0x1`, which packets with cutover's mark 0x20000000 do not match"), "{err}");
        assert!(err.contains(r#""bridge-accept-fwmark": "0x20000000/0x20000000""#), "{err}");
        let garbage = DockerFirewall::Nftables { accept_fwmark: Some("mark".into()), config: DAEMON_JSON.into() };
        assert!(forward_accept(&garbage, "cutover", MARK).unwrap_err().to_string().contains("not MARK or MARK/MASK"));
    }

    #[test]
    fn no_docker_filtering_needs_nothing_and_bad_json_is_named() {
        assert_eq!(detect(&facts(false, false, None)).unwrap(), DockerFirewall::Unfiltered);
        assert_eq!(forward_accept(&DockerFirewall::Unfiltered, "t", MARK).unwrap(), ForwardAccept::Nothing);
        let err = detect(&facts(true, false, Some("{"))).unwrap_err().to_string();
        assert!(err.contains("/etc/docker/daemon.json is not valid JSON"), "{err}");
        assert_eq!(parse_fwmark("0x10/0xf0"), Some((0x10, 0xf0)));
    }
}
