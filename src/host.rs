//! (stub until the nat branch lands)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostError(String);
pub fn set_route_localnet(_ifname: &str, _on: bool) -> Result<bool, HostError> { Ok(false) }
pub fn listening_ports() -> Result<std::collections::BTreeSet<(crate::manifest::Protocol, u16)>, HostError> { Ok(Default::default()) }
pub fn delete_conntrack(_p: crate::manifest::Protocol, _port: u16, _a: std::net::IpAddr) -> Result<(), HostError> { Ok(()) }
