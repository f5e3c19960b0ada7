//! The iptables rules cutover owns: an ACCEPT at the top of Docker's DOCKER-USER chain
//! for packets carrying cutover's mark, in IPv4 and, where the engine filters IPv6 too
//! (Docker 27 and later by default), in ip6tables' DOCKER-USER; and the same ACCEPT at
//! the end of FORWARD, for the moments DOCKER-USER is not reached.
//!
//! Why: Docker sets the FORWARD policy to DROP and accepts only published ports, and a
//! drop in any base chain is final, so an accept in cutover's own nftables table cannot
//! let DNAT'd traffic from other hosts reach an unpublished container port. DOCKER-USER
//! runs first from FORWARD and is the place Docker reserves for users.
//!
//! Why FORWARD too: Docker 20.10 moves its jump to DOCKER-USER back to the top of FORWARD
//! whenever a network is created (and on a firewalld reload) by deleting it and
//! inserting it again, two iptables commands. A connection's first packet that arrives
//! between them never sees DOCKER-USER: a SYN would be retransmitted a second later, a
//! UDP datagram lost. Nothing in that FORWARD layout drops traffic from outside Docker's
//! bridges to one of them before the chain's end, so an ACCEPT appended there catches
//! exactly those packets; at any other moment the one in DOCKER-USER accepts them first.
//! Docker 26 does the same; Docker 28 leaves its jump in place when networks are created
//! (tests/engines.rs measures new flows while networks come and go on each engine), and
//! its layout sends packets through its DOCKER-FORWARD chain, which drops unpublished
//! ports, before the end of FORWARD: there the appended rule is never reached.
//!
//! The rules are found again by their exact text (mark and a `cutover:<table>` comment);
//! no other rule is ever read or changed. Goes through the `iptables` binary (iptables-nft
//! on Debian) because that is what Docker itself uses, so both agree on the chains' format.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use super::NatError;

/// Docker's chain for user rules, evaluated first from FORWARD.
pub const DOCKER_USER: &str = "DOCKER-USER";
/// The filter table's forward chain, where the fallback ACCEPT goes last.
pub const FORWARD: &str = "FORWARD";

/// Where each copy of the rule goes: first in DOCKER-USER, last in FORWARD.
const PLACES: [(&str, Place); 2] = [(DOCKER_USER, Place::First), (FORWARD, Place::Last)];

#[derive(Debug, Clone, Copy)]
enum Place {
    First,
    Last,
}
/// Where Debian's iptables package puts the binary.
pub const DEFAULT_IPTABLES: &str = "/usr/sbin/iptables";

/// The rule's match and target, after the chain name.
pub fn rule_spec(table: &str, mark: u32) -> Vec<String> {
    [
        "-m".to_string(),
        "mark".into(),
        "--mark".into(),
        format!("{mark:#x}/{mark:#x}"),
        "-m".into(),
        "comment".into(),
        "--comment".into(),
        format!("cutover:{table}"),
        "-j".into(),
        "ACCEPT".into(),
    ]
    .into()
}

fn check_mark(mark: u32) -> Result<(), NatError> {
    // `--mark 0/0` would match every packet and open FORWARD to everything.
    if mark == 0 {
        return Err(NatError::InvalidRule(
            "the packet mark must not be 0: a zero mark matches every packet".into(),
        ));
    }
    Ok(())
}

fn run<I, S>(iptables: &Path, args: I) -> Result<(String, Output), NatError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(iptables);
    // -w: wait for the xtables lock instead of failing when Docker holds it.
    cmd.arg("-w").args(args);
    let text = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(NatError::IptablesMissing)?;
    Ok((text, out))
}

fn failed(command: String, out: &Output) -> NatError {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stderr = if stderr.is_empty() { format!("exit status {}", out.status) } else { stderr };
    NatError::Iptables { command, stderr }
}

/// What iptables says about a chain that does not exist, by version: iptables-legacy,
/// trixie's iptables-nft 1.8.11 and sid's 1.8.13 say "No chain/target/match by that
/// name"; Debian 12's
/// iptables-nft 1.8.9 says "chain `X' in table `filter' is incompatible, use 'nft' tool."
/// (it cannot tell a missing chain from one it cannot parse: [`chain_exists`] asks `nft`
/// which it is); a host without the filter table at all says "does not exist" or
/// "Table does not exist".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListError {
    /// The chain (or its table) does not exist.
    Missing,
    /// iptables-nft 1.8.9's wording: missing, or made by a newer iptables.
    MissingOrIncompatible,
    /// Anything else: a real failure.
    Other,
}

/// Classify the stderr of a failed `iptables -L CHAIN`.
pub fn classify_list_error(stderr: &str) -> ListError {
    if stderr.contains("No chain/target/match by that name")
        || stderr.contains("does not exist")
        || stderr.contains("Table does not exist")
    {
        ListError::Missing
    } else if stderr.contains("is incompatible, use 'nft' tool") {
        ListError::MissingOrIncompatible
    } else {
        ListError::Other
    }
}

/// The address family an iptables binary works on, for `nft` and messages.
fn nft_family(iptables: &Path) -> &'static str {
    let name = iptables.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.starts_with("ip6tables") {
        "ip6"
    } else {
        "ip"
    }
}

/// The ip6tables binary next to `iptables` (`/usr/sbin/iptables-nft` ->
/// `/usr/sbin/ip6tables-nft`), or `None` when the name has no `iptables` in it.
pub fn ip6_sibling(iptables: &Path) -> Option<std::path::PathBuf> {
    let name = iptables.file_name()?.to_str()?;
    let rest = name.strip_prefix("iptables")?;
    Some(iptables.with_file_name(format!("ip6tables{rest}")))
}

/// Does DOCKER-USER exist? (No Docker, Docker without iptables, Podman, Docker 29's
/// nftables backend: it does not.)
pub fn chain_exists(iptables: &Path) -> Result<bool, NatError> {
    let (command, out) = run(iptables, ["-n", "-L", DOCKER_USER])?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    match classify_list_error(&stderr) {
        ListError::Missing => Ok(false),
        ListError::MissingOrIncompatible => {
            // Ask nftables itself whether the chain is there.
            let family = nft_family(iptables);
            let listed = Command::new("nft")
                .args(["list", "chain", family, "filter", DOCKER_USER])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            match listed {
                Ok(s) if !s.success() => Ok(false),
                Ok(_) => Err(NatError::Iptables {
                    command,
                    stderr: format!(
                        "{}: the chain exists but this iptables cannot read it (a newer iptables made it); \
                         install an iptables at least as new as the engine's, or pass its path",
                        stderr.trim()
                    ),
                }),
                Err(e) => Err(NatError::Iptables {
                    command,
                    stderr: format!("{} (and `nft` could not be run to tell a missing chain from an unreadable one: {e})", stderr.trim()),
                }),
            }
        }
        ListError::Other => Err(failed(command, &out)),
    }
}

/// Is our rule in `chain`? (`-C`: exit 1 means absent.)
fn rule_present(iptables: &Path, chain: &str, spec: &[String]) -> Result<bool, NatError> {
    let mut args = vec!["-C".to_string(), chain.to_string()];
    args.extend_from_slice(spec);
    let (command, out) = run(iptables, &args)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(command, &out)),
    }
}

/// The binaries to program: `iptables`, and its ip6tables sibling when it is installed
/// (Docker 27 and later filter IPv6 by default, with their own ip6 DOCKER-USER chain).
fn families(iptables: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![iptables.to_path_buf()];
    if let Some(six) = ip6_sibling(iptables).filter(|p| p.exists()) {
        out.push(six);
    }
    out
}

/// Insert the ACCEPT at the top of DOCKER-USER and append it to FORWARD, IPv4 and IPv6,
/// each unless it is there; a family without a DOCKER-USER chain is skipped (nothing
/// drops forwarded traffic on Docker's behalf there).
pub fn ensure_forward_accept(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    check_mark(mark)?;
    for bin in families(iptables) {
        ensure_in(&bin, table, mark)?;
    }
    Ok(())
}

fn ensure_in(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    if !chain_exists(iptables)? {
        return Ok(());
    }
    let spec = rule_spec(table, mark);
    for (chain, place) in PLACES {
        if rule_present(iptables, chain, &spec)? {
            continue;
        }
        let mut args = match place {
            Place::First => vec!["-I".to_string(), chain.to_string(), "1".to_string()],
            Place::Last => vec!["-A".to_string(), chain.to_string()],
        };
        args.extend_from_slice(&spec);
        let (command, out) = run(iptables, &args)?;
        if !out.status.success() {
            return Err(failed(command, &out));
        }
    }
    Ok(())
}

/// Delete every copy of the ACCEPT from DOCKER-USER and FORWARD, IPv4 and IPv6 (a crash
/// between check and insert elsewhere could have left two); Ok when absent or when there
/// is no DOCKER-USER chain.
pub fn remove_forward_accept(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    check_mark(mark)?;
    for bin in families(iptables) {
        remove_in(&bin, table, mark)?;
    }
    Ok(())
}

fn remove_in(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    if !chain_exists(iptables)? {
        return Ok(());
    }
    let spec = rule_spec(table, mark);
    for (chain, _) in PLACES {
        delete_all(iptables, chain, &spec)?;
    }
    Ok(())
}

fn delete_all(iptables: &Path, chain: &str, spec: &[String]) -> Result<(), NatError> {
    // Bounded: if -D kept succeeding without the rule going away, stop rather than spin.
    for _ in 0..64 {
        if !rule_present(iptables, chain, spec)? {
            return Ok(());
        }
        let mut args = vec!["-D".to_string(), chain.to_string()];
        args.extend_from_slice(spec);
        let (command, out) = run(iptables, &args)?;
        if !out.status.success() {
            return Err(failed(command, &out));
        }
    }
    Err(NatError::Iptables {
        command: format!("{} -D {chain} {}", iptables.display(), spec.join(" ")),
        stderr: "the rule is still present after 64 deletions".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_mark_and_table() {
        assert_eq!(
            rule_spec("cutover", 0x2000_0000).join(" "),
            "-m mark --mark 0x20000000/0x20000000 -m comment --comment cutover:cutover -j ACCEPT"
        );
    }

    #[test]
    fn zero_mark_is_refused() {
        let r = ensure_forward_accept(Path::new("/nonexistent/iptables"), "t", 0);
        assert!(matches!(r, Err(NatError::InvalidRule(_))));
    }

    /// The exact words of each iptables in Debian 12 to sid for `-n -L DOCKER-USER` where
    /// the chain does not exist.
    #[test]
    fn every_missing_chain_wording_is_recognised() {
        // Debian 12, iptables-nft 1.8.9 (seen on this host in a fresh namespace).
        assert_eq!(
            classify_list_error("iptables v1.8.9 (nf_tables): chain `DOCKER-USER' in table `filter' is incompatible, use 'nft' tool.\n"),
            ListError::MissingOrIncompatible
        );
        assert_eq!(
            classify_list_error("ip6tables v1.8.9 (nf_tables): chain `DOCKER-USER' in table `filter' is incompatible, use 'nft' tool.\n"),
            ListError::MissingOrIncompatible
        );
        // trixie's iptables-nft 1.8.11 and sid's 1.8.13 (seen in a fresh namespace), and
        // iptables-legacy: the same words for both families.
        assert_eq!(classify_list_error("iptables: No chain/target/match by that name.\n"), ListError::Missing);
        assert_eq!(classify_list_error("ip6tables: No chain/target/match by that name.\n"), ListError::Missing);
        // A real failure stays one.
        assert_eq!(
            classify_list_error("iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n"),
            ListError::Other
        );
    }

    #[test]
    fn ip6tables_is_found_next_to_iptables() {
        assert_eq!(ip6_sibling(Path::new("/usr/sbin/iptables")), Some("/usr/sbin/ip6tables".into()));
        assert_eq!(ip6_sibling(Path::new("/usr/sbin/iptables-legacy")), Some("/usr/sbin/ip6tables-legacy".into()));
        assert_eq!(ip6_sibling(Path::new("/opt/x/xtables")), None);
        assert_eq!(nft_family(Path::new("/usr/sbin/ip6tables-nft")), "ip6");
        assert_eq!(nft_family(Path::new("/usr/sbin/iptables")), "ip");
    }
}
