//! `cutover plan FILE...`: print the nftables table that applying these manifests
//! would install. Reads only: the manifests, and the Docker networks when the engine
//! answers. Release addresses are only known once a release runs, so they are shown as
//! placeholders.

use crate::cli::PlanArgs;
use crate::commands::{Exit, Failure};
use crate::manifest::Manifest;
use crate::plan::{self, Desired};

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let mut manifests = Vec::new();
    let inputs = super::compose::read(&args.files, &args.compose)?;
    for (file, text) in &inputs.manifests {
        let mut m = Manifest::parse(file, text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        m.resolve(file, text).map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        manifests.push(m);
    }
    let mut compose_text = String::new();
    if let Some(project) = &inputs.project {
        for line in super::compose::describe(project).lines() {
            compose_text.push_str(&format!("# {line}\n"));
        }
        manifests.extend(project.taken.iter().map(|t| t.manifest.clone()));
    }
    let desired = Desired { table: args.table.clone(), mark: args.mark, targets: Vec::new(), bridges: Vec::new() };
    let mut text = compose_text;
    text.push_str(&plan::ruleset(&desired).to_string());
    let mut notes = Vec::new();
    for m in &manifests {
        if let Some(h) = &m.handoff {
            notes.push(format!(
                "# {}: handoff mode in namespace {}: no NAT rules; listeners {}",
                m.name,
                h.namespace,
                h.listeners.iter().map(|l| format!("{}={}", l.name, l.listen)).collect::<Vec<_>>().join(", ")
            ));
            continue;
        }
        // No release runs yet: the plan's own elements, with a placeholder address.
        let targets = crate::deploy::targets_of(&m.name, 0, m, std::net::Ipv4Addr::UNSPECIFIED, None);
        notes.extend(plan::preview_elements(&args.table, &targets));
        notes.push(format!(
            "# {}: the postrouting chain also masquerades hairpin traffic on the bridge of network `{}`",
            m.name, m.network
        ));
    }
    text.push('\n');
    for n in notes {
        text.push_str(&n);
        text.push('\n');
    }
    let rule = crate::nat::docker_user::rule_spec(&args.table, args.mark).join(" ");
    text.push_str(&format!("# plus, while any service exists: iptables -I DOCKER-USER {rule}\n#                          and: iptables -A FORWARD {rule}\n"));
    print!("{text}");
    Ok(())
}
