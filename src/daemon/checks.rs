//! The real [`Checks`]: health probes, sock_diag connection counts, host ports,
//! conntrack and IPv6 duplicate address detection, each delegated to its effect module.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::dad::Ipv6Readiness;
use crate::deploy::Checks;
use crate::manifest::{HealthKind, HealthSpec, Protocol};

/// How long one conntrack dump answers for: a drain poll asks about every UDP port of
/// the old release within a few milliseconds, and all of them read the same dump.
const DUMP_REUSE: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct RealChecks {
    /// The last conntrack dump and when it was taken.
    flows: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<crate::conntrack::Entry>>)>>,
}

impl RealChecks {
    pub fn new() -> RealChecks {
        RealChecks::default()
    }

    /// One dump per drain poll, not one per port: a fresh dump unless the last one is
    /// younger than [`DUMP_REUSE`].
    fn recent_flows(&self) -> Result<std::sync::Arc<Vec<crate::conntrack::Entry>>, crate::conntrack::ConntrackError> {
        let mut cached = self.flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, flows)) = cached.as_ref() {
            if at.elapsed() < DUMP_REUSE {
                return Ok(flows.clone());
            }
        }
        let flows = std::sync::Arc::new(crate::conntrack::dump()?);
        *cached = Some((std::time::Instant::now(), flows.clone()));
        Ok(flows)
    }
}

impl Checks for RealChecks {
    fn probe(&self, health: HealthSpec, addr: SocketAddr) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let r = match health.kind {
                HealthKind::Http => crate::health::probe_http(addr, &health.path, health.timeout).await,
                _ => crate::health::probe_tcp(addr, health.timeout).await,
            };
            r.map_err(|e| e.to_string())
        })
    }

    fn open_connections(&self, pid: u32, ports: Vec<u16>) -> BoxFuture<'_, Result<usize, String>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || crate::drain::open_connections_on_ports(pid, &ports))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<std::net::IpAddr>)>, String> {
        crate::host::listening_sockets().map_err(|e| e.to_string())
    }

    fn forget_flows(&self, protocol: Protocol, port: u16, addr: IpAddr) -> Result<(), String> {
        // The drain's last dump serves here too: after the switch no new flow can be
        // answered by the old release, so no entry to delete is younger than it.
        let flows = self.recent_flows().map_err(|e| e.to_string())?;
        for e in crate::host::flows_of(&flows, protocol, port, addr) {
            crate::conntrack::delete(&e.orig).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn ipv6_readiness(&self, pid: u32, addr: Ipv6Addr) -> BoxFuture<'_, Result<Ipv6Readiness, String>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || crate::dad::release_readiness(pid, addr))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        })
    }

    fn busy_udp_flows(&self, port: u16, addr: IpAddr, idle: Duration) -> Result<usize, String> {
        let timeouts = crate::host::UdpTimeouts::of_host().map_err(|e| e.to_string())?;
        let flows = self.recent_flows().map_err(|e| e.to_string())?;
        let idle_times = crate::host::udp_idle_times(&flows, port, addr, timeouts);
        Ok(idle_times.into_iter().filter(|t| *t < idle).count())
    }
}
