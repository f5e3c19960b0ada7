//! The real [`Checks`]: health probes, sock_diag connection counts, host ports,
//! conntrack and IPv6 duplicate address detection, each delegated to its effect module.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::dad::Ipv6Readiness;
use crate::deploy::Checks;
use crate::manifest::{HealthKind, HealthSpec, Protocol};

pub struct RealChecks;

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
        crate::host::delete_conntrack(protocol, port, addr).map(|_| ()).map_err(|e| e.to_string())
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
        let idle_times = crate::host::udp_flow_idle_times(port, addr).map_err(|e| e.to_string())?;
        Ok(idle_times.into_iter().filter(|t| *t < idle).count())
    }
}
