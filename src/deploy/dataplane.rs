//! The data plane of NAT-mode releases: the desired state (every service's active
//! release, its addresses and bridges), programming it into the [`Firewall`] as one
//! transaction (and the `::1` relay's routes right after it), the traffic counters, the
//! host settings around it (route_localnet, DOCKER-USER accept) and the host-port
//! conflict check. Must not decide when a release
//! switches: that is `cut_over` and `switch_back`.

use super::*;

/// The data plane as last applied: lets a switch be a map-element change.
#[derive(Debug, Default)]
pub(super) struct Dataplane {
    pub(super) applied: Option<Ruleset>,
    pub(super) bridges: BTreeMap<String, Option<Bridge>>,
    /// IPv6 address per container, with the IPv4 address it was read alongside: state
    /// records only IPv4, and a changed IPv4 address (engine restart) means re-read.
    pub(super) addr6: BTreeMap<String, (std::net::Ipv4Addr, Option<std::net::Ipv6Addr>)>,
    /// Per service, what the counting rules had counted when a whole-table sync started
    /// them at zero again: added to the kernel's counts, so exported counters only grow.
    pub(super) carried: BTreeMap<String, Traffic>,
}

impl Releaser {
    /// Forget the bridges read so far: a network can be removed and created again (with
    /// another bridge) between two operations, so each operation reads them afresh.
    pub(super) async fn forget_bridges(&self) {
        self.dataplane.lock().await.bridges.clear();
    }

    pub(super) async fn bridge_of(&self, network: &str) -> Result<Option<Bridge>, ReleaseError> {
        {
            let dp = self.dataplane.lock().await;
            if let Some(b) = dp.bridges.get(network) {
                return Ok(b.clone());
            }
        }
        let b = self.engine.bridge(network.to_string()).await?;
        self.dataplane.lock().await.bridges.insert(network.to_string(), b.clone());
        Ok(b)
    }

    /// The IPv6 address of `release`'s container (cached per container and IPv4 address).
    pub(super) async fn addr6_of(&self, release: &Release, addr: std::net::Ipv4Addr) -> Result<Option<std::net::Ipv6Addr>, ReleaseError> {
        if release.container_id.is_empty() {
            return Ok(None);
        }
        if let Some((v4, v6)) = self.dataplane.lock().await.addr6.get(&release.container_id) {
            if *v4 == addr {
                return Ok(*v6);
            }
        }
        let info = self.engine.inspect(release.container_id.clone(), release.manifest.network.clone()).await?;
        let v6 = info.and_then(|i| i.addr6);
        self.dataplane.lock().await.addr6.insert(release.container_id.clone(), (addr, v6));
        Ok(v6)
    }

    /// The addresses `release`'s flows were NAT'd to: its IPv4 address and, on a
    /// dual-stack network, its IPv6 address (conntrack keys each family apart).
    pub(super) async fn flow_addrs(&self, release: &Release) -> Result<Vec<IpAddr>, ReleaseError> {
        let Some(addr) = release.addr else { return Ok(Vec::new()) };
        let addr6 = self.addr6_of(release, addr).await?;
        Ok(std::iter::once(IpAddr::V4(addr)).chain(addr6.map(IpAddr::V6)).collect())
    }

    /// Desired data plane for `state`, with `service` pointed at `release` if given.
    pub(super) async fn desired(&self, state: &State, overriding: Option<(&str, u32)>) -> Result<Desired, ReleaseError> {
        let mut targets = Vec::new();
        let mut bridges = Vec::new();
        for (name, svc) in &state.services {
            if Mode::of(&svc.manifest) == Mode::Handoff {
                continue;
            }
            let active = match overriding {
                Some((s, r)) if s == name => Some(r),
                _ => svc.active,
            };
            let Some(release) = active.and_then(|n| svc.release(n)) else { continue };
            let Some(addr) = release.addr else { continue };
            if let Some(b) = self.bridge_of(&release.manifest.network).await? {
                bridges.push(b);
            }
            let addr6 = self.addr6_of(release, addr).await?;
            targets.extend(targets_of(name, release.number, &svc.manifest, addr, addr6));
        }
        Ok(Desired { table: self.settings.table.clone(), mark: self.settings.mark, targets, bridges })
    }

    /// Make the kernel match `desired`: a map-element transaction when only elements
    /// change, a whole-table transaction otherwise. Returns the time the kernel took.
    pub(super) async fn program(&self, desired: &Desired) -> Result<Duration, ReleaseError> {
        let next = plan::ruleset(desired);
        let mut dp = self.dataplane.lock().await;
        let structural_change = match &dp.applied {
            Some(cur) => cur.chains != next.chains || cur.table != next.table,
            None => true,
        };
        // A table someone deleted is rebuilt whole. The check is a netlink round trip of
        // its own, so it stays out of the reported switch time, which is the transaction.
        let exists = self.firewall.table_exists(&next.table)?;
        let rebuild = structural_change || !exists;
        // A sync starts the counting rules at zero: read what they hold first (outside the
        // timed part), to carry it. Packets counted between this read and the commit are lost.
        let counted = if rebuild && exists { self.counts_before_sync(&next.table) } else { BTreeMap::new() };
        let started = Instant::now();
        if rebuild {
            self.firewall.sync(&next)?;
            for (service, traffic) in counted {
                *dp.carried.entry(service).or_default() += traffic;
            }
            let services = next.counted_services();
            dp.carried.retain(|service, _| services.contains(service.as_str()));
        } else if let Some(cur) = &dp.applied {
            let ops = plan::element_ops(&cur.elements, &next.elements);
            if !ops.is_empty() {
                self.firewall.apply_ops(&next.table, &next.map, &ops)?;
            }
        }
        let took = started.elapsed();
        dp.applied = Some(next);
        // `::1` clients move in the same switch: new relayed connections go where the
        // rules now point, open ones keep their release (as conntrack keeps NAT bindings).
        self.effects.relay.route(crate::relay::routes(&desired.targets));
        Ok(took)
    }

    /// The kernel's counts per service, or none (with a warning) when they cannot be read:
    /// losing them must not stop a sync.
    pub(super) fn counts_before_sync(&self, table: &str) -> BTreeMap<String, Traffic> {
        self.firewall.counters(table).unwrap_or_else(|e| {
            tracing::warn!(table, error = %e, "cannot read the traffic counters before rewriting the table; what they counted is lost");
            BTreeMap::new()
        })
    }

    /// Packets and bytes of each NAT-mode service's forwarded connections, both directions:
    /// the kernel's counts plus what earlier whole-table syncs carried. Never decreases
    /// while the daemon runs and the service exists (a restart carries what the kernel
    /// still holds, at the first sync).
    pub async fn traffic(&self) -> Result<BTreeMap<String, Traffic>, ReleaseError> {
        let dp = self.dataplane.lock().await;
        let Some(applied) = &dp.applied else { return Ok(BTreeMap::new()) };
        let services = applied.counted_services();
        let mut out: BTreeMap<String, Traffic> = services.iter().map(|s| (s.to_string(), Traffic::default())).collect();
        for (service, traffic) in self.firewall.counters(&applied.table)? {
            if let Some(total) = out.get_mut(&service) {
                *total += traffic;
            }
        }
        for (service, traffic) in &dp.carried {
            if let Some(total) = out.get_mut(service) {
                *total += *traffic;
            }
        }
        Ok(out)
    }

    /// route_localnet on the bridges in use, and the DOCKER-USER accept while any
    /// service exists.
    pub(super) async fn assert_host(&self, state: &State, desired: &Desired) -> Result<(), ReleaseError> {
        let any_nat = state.services.values().any(|s| Mode::of(&s.manifest) == Mode::Nat);
        if any_nat {
            self.firewall.ensure_forward_accept(&self.settings.table, self.settings.mark)?;
        } else {
            self.firewall.remove_forward_accept(&self.settings.table, self.settings.mark)?;
        }
        // Every call claims every bridge again: a flag switched off by hand is back after
        // the next apply or deploy, and the claim (a marker per daemon table) keeps other
        // daemons on the same bridge from restoring it under this one.
        let mut changed = BTreeMap::new();
        for b in &desired.bridges {
            let recorded = state.route_localnet_before.get(&b.ifname).copied();
            let before = self
                .effects
                .host
                .claim_route_localnet(&b.ifname, &self.settings.table, recorded)
                .map_err(|source| ReleaseError::RouteLocalnet { ifname: b.ifname.clone(), source })?;
            if recorded.is_none() {
                changed.insert(b.ifname.clone(), before);
            }
        }
        if !changed.is_empty() {
            self.commit(move |s| s.route_localnet_before.extend(changed)).await?;
        }
        Ok(())
    }

    /// Refuse host ports other services, other containers or host processes use.
    pub(super) async fn check_ports(&self, manifest: &Manifest) -> Result<(), ReleaseError> {
        let state = self.snapshot().await;
        // The plan's conflict rule: protocol and number match, host addresses overlap.
        let clash = |p: &PortSpec, protocol: Protocol, port: u16, addr: Option<std::net::IpAddr>| {
            plan::host_ports_clash((p.protocol, p.host, p.host_ip), (protocol, port, addr))
        };
        let at = |p: &PortSpec| p.host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default();
        for p in &manifest.ports {
            for (other, svc) in &state.services {
                if other != &manifest.name && svc.manifest.ports.iter().any(|q| clash(p, q.protocol, q.host, q.host_ip)) {
                    return Err(ReleaseError::Conflict(format!(
                        "host port {}/{}{} is already used by service `{other}`",
                        p.host,
                        p.protocol,
                        at(p)
                    )));
                }
            }
        }
        let published = self.engine.published().await?;
        for p in &manifest.ports {
            if let Some(c) = published.iter().find(|x| clash(p, x.protocol, x.port, x.host_ip)) {
                return Err(ReleaseError::Conflict(format!(
                    "host port {}/{}{} is published by container `{}`; pick another port or unpublish it",
                    p.host,
                    p.protocol,
                    at(p),
                    c.container
                )));
            }
        }
        let listening = self.effects.host.host_ports()?;
        // The daemon's own `::1` relay listeners serve the services above, no conflict.
        let relayed = self.effects.relay.listening();
        let ours = |protocol: Protocol, port: u16, addr: Option<IpAddr>| {
            addr == Some(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)) && relayed.contains(&(protocol, port))
        };
        for p in &manifest.ports {
            if listening.iter().any(|(protocol, port, addr)| !ours(*protocol, *port, *addr) && clash(p, *protocol, *port, *addr)) {
                return Err(ReleaseError::Conflict(format!(
                    "host port {}/{}{} is in use by a process on this host (see `ss -lntup`); pick another port",
                    p.host,
                    p.protocol,
                    at(p)
                )));
            }
        }
        Ok(())
    }
}

/// The host-port targets of one release (`addr6`: its IPv6 address, if any).
pub fn targets_of(
    service: &str,
    release: u32,
    manifest: &Manifest,
    addr: std::net::Ipv4Addr,
    addr6: Option<std::net::Ipv6Addr>,
) -> Vec<Target> {
    manifest
        .ports
        .iter()
        .map(|p| Target {
            service: service.to_string(),
            release,
            protocol: p.protocol,
            host_port: p.host,
            addr,
            port: p.container,
            addr6,
            host_ip: p.host_ip,
        })
        .collect()
}
