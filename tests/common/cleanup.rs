//! Removal of everything a test (or a crashed earlier run of it) may have left on the
//! machine: Docker containers, networks and images carrying its tag, its nftables table,
//! its DOCKER-USER rules, its namespaces and veths. Every step tolerates the thing being
//! gone already and the steps carry on after a failure (collected in `Problems`).
//!
//! Only names carrying a test tag are ever touched: other tables, other rules and other
//! containers on the host are left alone.

use std::path::Path;

use super::cmd::{cmd, output, try_run, Problems, DOCKER};
use super::ids::{pid_of_tag, IMAGE_PREFIX, NETNS_PREFIX, NETWORK_PREFIX, TABLE_PREFIX, TAG_LEN};

/// Label the daemon (`--instance`) and the kit put on containers and networks.
pub const INSTANCE_LABEL: &str = "cutover.instance";

/// Comment cutover puts on its DOCKER-USER rule(s): `cutover:<table>`.
pub fn docker_user_comment(table: &str) -> String {
    format!("cutover:{table}")
}

/// Removes what tag `tag` (with nftables table `table`) may have made. Returns the steps
/// that failed for another reason than the object being absent.
pub fn remove_tagged(tag: &str, table: &str) -> Problems {
    let mut p = Problems::default();
    if super::docker::docker_available() {
        p.note("remove containers", remove_containers(&format!("{INSTANCE_LABEL}={tag}")));
        p.note("remove docker networks", remove_networks(tag));
        p.note("remove images", remove_images(&format!("{IMAGE_PREFIX}{tag}:")));
    }
    p.note("delete nft table", delete_table(table));
    p.note("delete iptables chains", delete_iptables_chains(table));
    p.note("delete DOCKER-USER rules", delete_docker_user_rules(&|c| c == docker_user_comment(table)));
    // The daemon's claim on the table (it leaves the file: unlinking a lock file races).
    let lock = cutover::daemon::table_lock::lock_path(std::path::Path::new(cutover::daemon::table_lock::LOCK_DIR), table);
    p.note("remove the table lock", remove_file_if_any(&lock.display().to_string()));
    p.note("delete route_localnet markers", delete_localnet_markers(table));
    p
}

fn remove_file_if_any(path: &str) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{path}: {e}")),
        _ => Ok(()),
    }
}

/// The table's markers under /run/cutover/localnet (`cutover::localnet`); a bridge
/// directory left without markers is removed too.
pub fn delete_localnet_markers(table: &str) -> Result<(), String> {
    let dir = std::path::Path::new(cutover::localnet::DEFAULT_DIR);
    let Ok(bridges) = std::fs::read_dir(dir) else { return Ok(()) };
    for b in bridges.flatten() {
        let marker = b.path().join(table);
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
            let left = std::fs::read_dir(b.path()).map(|d| d.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.')));
            if let Ok(false) = left {
                let _ = std::fs::remove_dir_all(b.path());
            }
        }
    }
    Ok(())
}

fn is_absent(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("no such") || s.contains("not found") || s.contains("does not exist") || s.contains("cannot find")
}

/// Runs a removal; "already gone" counts as success.
fn remove(c: &mut std::process::Command) -> Result<(), String> {
    match try_run(c) {
        Ok(_) => Ok(()),
        Err(e) if is_absent(&e.stderr) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn remove_containers(label_filter: &str) -> Result<(), String> {
    let ids = try_run(&mut cmd(DOCKER, ["ps", "-aq", "--filter", &format!("label={label_filter}")]))
        .map_err(|e| e.to_string())?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok(());
    }
    remove(cmd(DOCKER, ["rm", "-f", "-v"]).args(&ids))
}

fn remove_networks(tag: &str) -> Result<(), String> {
    let mut errs = Vec::new();
    match try_run(&mut cmd(DOCKER, ["network", "ls", "-q", "--filter", &format!("label={INSTANCE_LABEL}={tag}")])) {
        Ok(ids) => {
            for id in ids.split_whitespace() {
                if let Err(e) = remove(&mut cmd(DOCKER, ["network", "rm", id])) {
                    errs.push(e);
                }
            }
        }
        Err(e) => errs.push(e.to_string()),
    }
    if let Err(e) = remove(&mut cmd(DOCKER, ["network", "rm", &format!("{NETWORK_PREFIX}{tag}")])) {
        errs.push(e);
    }
    if errs.is_empty() { Ok(()) } else { Err(errs.join("; ")) }
}

fn image_refs() -> Result<Vec<String>, String> {
    let out = try_run(&mut cmd(DOCKER, ["image", "ls", "--format", "{{.Repository}}:{{.Tag}}"])).map_err(|e| e.to_string())?;
    Ok(out.lines().map(str::to_string).collect())
}

fn remove_images(prefix: &str) -> Result<(), String> {
    let refs: Vec<String> = image_refs()?.into_iter().filter(|r| r.starts_with(prefix)).collect();
    if refs.is_empty() {
        return Ok(());
    }
    remove(cmd(DOCKER, ["rmi", "-f"]).args(&refs))
}

/// The chains and jumps the iptables backend makes for `table` (both families); absent is
/// fine. Uses the backend's own removal: it touches nothing else.
pub fn delete_iptables_chains(table: &str) -> Result<(), String> {
    use cutover::nat::{Firewall, IptablesFirewall};
    let fw = IptablesFirewall::new();
    // Table names the backend cannot use were never made into chains.
    if cutover::nat::iptables::chain_name(table, cutover::plan::Hook::Postrouting).is_err() {
        return Ok(());
    }
    let exists = fw.table_exists(table).map_err(|e| e.to_string())?;
    let jumps = ["nat", "mangle"].iter().any(|t| {
        try_run(&mut cmd("iptables", ["-w", "-t", t, "-S"]))
            .map(|o| o.contains(&format!("--comment cutover:{table} ")))
            .unwrap_or(false)
    });
    if !exists && !jumps {
        return Ok(());
    }
    fw.delete_table(table).map_err(|e| e.to_string())
}

/// `nft delete table inet <table>`; absent is fine.
pub fn delete_table(table: &str) -> Result<(), String> {
    remove(&mut cmd("nft", ["delete", "table", "inet", table]))
}

/// Splits one line of `iptables -S` the way iptables-save quotes it.
pub fn split_rule(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

/// The comment of a rule line of `iptables -S`, if it has one.
pub fn rule_comment(line: &str) -> Option<String> {
    let t = split_rule(line);
    let i = t.iter().position(|w| w == "--comment")?;
    t.get(i + 1).cloned()
}

/// Deletes the DOCKER-USER and FORWARD rules whose comment satisfies `pick` (the daemon
/// puts its ACCEPT in both), in iptables (both families) and then, for anything left
/// (rules written natively), by nft handle.
pub fn delete_docker_user_rules(pick: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let mut errs = Vec::new();
    for chain in ["DOCKER-USER", "FORWARD"] {
        for tool in ["iptables", "ip6tables"] {
            // A missing chain (no Docker, or no IPv6 rules) means nothing to delete.
            let Ok(listing) = try_run(&mut cmd(tool, ["-w", "-S", chain])) else { continue };
            for line in listing.lines() {
                if !line.starts_with(&format!("-A {chain} ")) || !rule_comment(line).is_some_and(|c| pick(&c)) {
                    continue;
                }
                let mut args = split_rule(line);
                args[0] = "-D".into();
                if let Err(e) = remove(cmd(tool, ["-w"]).args(&args)) {
                    errs.push(e);
                }
            }
        }
        for family in ["ip", "ip6"] {
            let Ok(listing) = try_run(&mut cmd("nft", ["-a", "list", "chain", family, "filter", chain])) else {
                continue;
            };
            for line in listing.lines() {
                let Some(comment) = nft_comment(line) else { continue };
                if !pick(&comment) {
                    continue;
                }
                let Some(handle) = line.rsplit("# handle ").next().filter(|h| h.trim().parse::<u64>().is_ok()) else {
                    continue;
                };
                if let Err(e) = remove(&mut cmd("nft", ["delete", "rule", family, "filter", chain, "handle", handle.trim()])) {
                    errs.push(e);
                }
            }
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs.join("; ")) }
}

fn nft_comment(line: &str) -> Option<String> {
    let rest = line.split("comment \"").nth(1)?;
    Some(rest.split('"').next()?.to_string())
}

/// True if the run that made tag `tag` is over (its pid is gone). Tags of this very
/// process are never stale.
pub fn tag_is_stale(tag: &str) -> bool {
    match pid_of_tag(tag) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Pulls a tag of stem `stem` out of a name that starts with `prefix`.
fn tag_in<'a>(name: &'a str, prefix: &str, stem: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    let tag = rest.get(..TAG_LEN)?;
    (tag.starts_with(stem) && tag_is_stale(tag)).then_some(tag)
}

/// Removes what earlier, finished runs of the test with stem `stem` (see
/// `ids::stem_of`) left behind: namespaces, veths, nft tables, DOCKER-USER rules,
/// containers, networks and images whose tag has that stem and whose pid is gone.
/// Best effort: problems are printed, never raised.
pub fn sweep_stale(stem: &str) {
    let mut p = Problems::default();
    if let Ok(out) = output(&mut cmd("ip", ["netns", "list"])) {
        for name in out.stdout.lines().filter_map(|l| l.split_whitespace().next()) {
            if tag_in(name, NETNS_PREFIX, stem).is_some() {
                p.note(&format!("delete netns {name}"), remove(&mut cmd("ip", ["netns", "delete", name])));
            }
        }
    }
    if let Ok(out) = output(&mut cmd("ip", ["-o", "link", "show"])) {
        for line in out.stdout.lines() {
            // "12: c1a2b...h0@if11: <BROADCAST,..."
            let Some(name) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else { continue };
            if tag_in(name, "", stem).is_some() {
                p.note(&format!("delete link {name}"), remove(&mut cmd("ip", ["link", "delete", name])));
            }
        }
    }
    if let Ok(out) = output(&mut cmd("nft", ["list", "tables", "inet"])) {
        for line in out.stdout.lines() {
            let Some(name) = line.strip_prefix("table inet ") else { continue };
            if tag_in(name.trim(), TABLE_PREFIX, stem).is_some() {
                p.note(&format!("delete table {name}"), delete_table(name.trim()));
            }
        }
    }
    let rule_prefix = docker_user_comment(TABLE_PREFIX);
    p.note(
        "delete stale DOCKER-USER rules",
        delete_docker_user_rules(&|c| tag_in(c, &rule_prefix, stem).is_some() && c.len() == rule_prefix.len() + TAG_LEN),
    );
    if super::docker::docker_available() {
        if let Ok(out) = output(&mut cmd(DOCKER, ["ps", "-a", "--format", &format!("{{{{.Label \"{INSTANCE_LABEL}\"}}}}")])) {
            let mut tags: Vec<&str> = out.stdout.lines().filter(|t| tag_in(t, "", stem).is_some()).collect();
            tags.sort_unstable();
            tags.dedup();
            for t in tags {
                p.note(&format!("remove containers of {t}"), remove_containers(&format!("{INSTANCE_LABEL}={t}")));
            }
        }
        if let Ok(out) = output(&mut cmd(DOCKER, ["network", "ls", "--format", "{{.Name}}"])) {
            for name in out.stdout.lines() {
                if let Some(t) = tag_in(name, NETWORK_PREFIX, stem) {
                    p.note(&format!("remove network {name}"), remove_networks(t));
                }
            }
        }
        if let Ok(refs) = image_refs() {
            let stale: Vec<&String> = refs.iter().filter(|r| tag_in(r, IMAGE_PREFIX, stem).is_some()).collect();
            if !stale.is_empty() {
                p.note("remove stale images", remove(cmd(DOCKER, ["rmi", "-f"]).args(stale)));
            }
        }
    }
    p.report(&format!("stale runs of stem {stem}"));
}
