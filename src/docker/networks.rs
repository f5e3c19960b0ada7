//! A release container's place on its network, as the watch of the active release needs
//! it: the engine's `network connect` / `disconnect` events (any container: network
//! events carry no container labels, so the caller picks its own by id), whether a
//! container is on a network, and connecting it back.
//!
//! Never disconnects anything, and connects only the container it is asked about.

use std::collections::HashMap;

use bollard::models::{EndpointSettings, NetworkConnectRequest};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::{DockerEngine, DockerError};

/// A container joined or left a network (engine event type `network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkEvent {
    /// The container's id.
    pub container: String,
    /// The network's name and id.
    pub network: String,
    pub network_id: String,
    /// `connect` (true) or `disconnect` (false).
    pub connected: bool,
}

impl NetworkEvent {
    /// Does this event concern network `name_or_id`?
    pub fn is_on(&self, name_or_id: &str) -> bool {
        self.network == name_or_id || (!self.network_id.is_empty() && self.network_id.starts_with(name_or_id))
    }
}

/// The event of `action` with `attributes` (`container`, `name`), if it is a connect or a
/// disconnect of a container.
pub(super) fn network_event(network_id: String, action: &str, attributes: &HashMap<String, String>) -> Option<NetworkEvent> {
    let connected = match action {
        "connect" => true,
        "disconnect" => false,
        _ => return None,
    };
    let container = attributes.get("container").filter(|c| !c.is_empty())?.clone();
    let network = attributes.get("name").cloned().unwrap_or_default();
    Some(NetworkEvent { container, network, network_id, connected })
}

impl DockerEngine {
    pub(super) fn network_events_inner(&self) -> BoxStream<'_, Result<NetworkEvent, DockerError>> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["network".to_string()]),
            ("event".to_string(), vec!["connect".to_string(), "disconnect".to_string()]),
        ]);
        let opts = EventsOptions { filters: Some(filters), ..Default::default() };
        let events = self.docker.events(Some(opts)).filter_map(|e| async move {
            match e {
                Err(source) => Some(Err(DockerError::Api { action: "watch the events of", target: "networks".into(), source })),
                Ok(e) => {
                    let actor = e.actor.unwrap_or_default();
                    let attributes = actor.attributes.unwrap_or_default();
                    network_event(actor.id.unwrap_or_default(), e.action.as_deref().unwrap_or_default(), &attributes).map(Ok)
                }
            }
        });
        Box::pin(events)
    }

    pub(super) async fn connected_inner(&self, id: &str, network: &str) -> Result<Option<bool>, DockerError> {
        let resp = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(r) => r,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
            Err(source) => return Err(DockerError::Api { action: "inspect", target: id.to_string(), source }),
        };
        let networks = resp.network_settings.and_then(|n| n.networks).unwrap_or_default();
        Ok(Some(networks.iter().any(|(name, endpoint)| {
            name == network || endpoint.network_id.as_deref().is_some_and(|nid| !network.is_empty() && nid.starts_with(network))
        })))
    }

    pub(super) async fn connect_network_inner(&self, id: &str, network: &str, aliases: Vec<String>) -> Result<(), DockerError> {
        let request = NetworkConnectRequest {
            container: id.to_string(),
            endpoint_config: (!aliases.is_empty()).then(|| EndpointSettings { aliases: Some(aliases), ..Default::default() }),
        };
        self.docker
            .connect_network(network, request)
            .await
            .map_err(|source| DockerError::Api { action: "connect a container to network", target: network.to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn connect_and_disconnect_of_a_container_are_read_from_the_attributes() {
        let attrs = HashMap::from([("container".to_string(), "abc".to_string()), ("name".to_string(), "web-net".to_string())]);
        let e = network_event("0123456789".into(), "disconnect", &attrs).unwrap();
        assert_eq!((e.container.as_str(), e.network.as_str(), e.connected), ("abc", "web-net", false));
        assert!(e.is_on("web-net") && e.is_on("0123") && !e.is_on("other"));
        assert!(network_event("n".into(), "connect", &attrs).unwrap().connected);
        assert_eq!(network_event("n".into(), "create", &attrs), None);
        assert_eq!(network_event("n".into(), "disconnect", &HashMap::new()), None);
    }
}
