//! The one iptables rule cutover owns: an ACCEPT at the top of Docker's DOCKER-USER chain
//! for packets carrying cutover's mark.
//!
//! Why: Docker sets the FORWARD policy to DROP and accepts only published ports, and a
//! drop in any base chain is final, so an accept in cutover's own nftables table cannot
//! let DNAT'd traffic from other hosts reach an unpublished container port. DOCKER-USER
//! runs first from FORWARD and is the place Docker reserves for users.
//!
//! The rule is found again by its exact text (mark and a `cutover:<table>` comment);
//! no other rule of DOCKER-USER is ever read or changed. Goes through the `iptables`
//! binary (iptables-nft on Debian) because that is what Docker itself uses, so both agree
//! on the chain's format.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use super::NatError;

/// Docker's chain for user rules, evaluated first from FORWARD.
pub const DOCKER_USER: &str = "DOCKER-USER";
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

/// Does DOCKER-USER exist? (No Docker, or Docker without iptables: it does not.)
pub fn chain_exists(iptables: &Path) -> Result<bool, NatError> {
    let (command, out) = run(iptables, ["-n", "-L", DOCKER_USER])?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No chain/target/match by that name") || stderr.contains("does not exist") {
        return Ok(false);
    }
    Err(failed(command, &out))
}

/// Is our rule in DOCKER-USER? (`-C`: exit 1 means absent.)
fn rule_present(iptables: &Path, spec: &[String]) -> Result<bool, NatError> {
    let mut args = vec!["-C".to_string(), DOCKER_USER.to_string()];
    args.extend_from_slice(spec);
    let (command, out) = run(iptables, &args)?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(failed(command, &out)),
    }
}

/// Insert the ACCEPT at the top of DOCKER-USER unless it is there; Ok when there is no
/// DOCKER-USER chain (nothing drops forwarded traffic on Docker's behalf then).
pub fn ensure_forward_accept(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    check_mark(mark)?;
    if !chain_exists(iptables)? {
        return Ok(());
    }
    let spec = rule_spec(table, mark);
    if rule_present(iptables, &spec)? {
        return Ok(());
    }
    let mut args = vec!["-I".to_string(), DOCKER_USER.to_string(), "1".to_string()];
    args.extend(spec);
    let (command, out) = run(iptables, &args)?;
    if !out.status.success() {
        return Err(failed(command, &out));
    }
    Ok(())
}

/// Delete every copy of the ACCEPT (a crash between check and insert elsewhere could have
/// left two); Ok when absent or when there is no DOCKER-USER chain.
pub fn remove_forward_accept(iptables: &Path, table: &str, mark: u32) -> Result<(), NatError> {
    check_mark(mark)?;
    if !chain_exists(iptables)? {
        return Ok(());
    }
    let spec = rule_spec(table, mark);
    // Bounded: if -D kept succeeding without the rule going away, stop rather than spin.
    for _ in 0..64 {
        if !rule_present(iptables, &spec)? {
            return Ok(());
        }
        let mut args = vec!["-D".to_string(), DOCKER_USER.to_string()];
        args.extend_from_slice(&spec);
        let (command, out) = run(iptables, &args)?;
        if !out.status.success() {
            return Err(failed(command, &out));
        }
    }
    Err(NatError::Iptables {
        command: format!("iptables -D {DOCKER_USER} {}", spec.join(" ")),
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
}
