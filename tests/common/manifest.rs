//! Service manifests for the acceptance tests: one HTTP service on container port 80
//! with an http health check and short timeouts, any top-level field of which a test can
//! replace or add. Rendered in block style, as operators write them.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ServiceYaml {
    /// Top-level fields in order; a value starting with a newline is a block.
    fields: Vec<(String, String)>,
}

impl ServiceYaml {
    /// `service` on `host_port` -> container port 80 of `image`, on Docker network
    /// `network`; health: http /healthz every 200ms, 1s timeout, 15s deadline;
    /// drain_timeout 10s, stop_timeout 2s, keep 2.
    pub fn http(service: &str, image: &str, host_port: u16, network: &str) -> ServiceYaml {
        ServiceYaml {
            fields: vec![
                ("name".into(), service.into()),
                ("image".into(), image.into()),
                ("ports".into(), format!("\n  - host: {host_port}\n    container: 80")),
                ("network".into(), network.into()),
                ("health".into(), health("15s")),
                ("drain_timeout".into(), "10s".into()),
                ("stop_timeout".into(), "2s".into()),
                ("keep".into(), "2".into()),
            ],
        }
    }

    /// Replace field `key` (in place) or add it at the end.
    pub fn set(mut self, key: &str, value: &str) -> ServiceYaml {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(field) => field.1 = value.to_string(),
            None => self.fields.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Add a UDP port `host` -> `container` to the ports.
    pub fn udp_port(mut self, host: u16, container: u16) -> ServiceYaml {
        let udp = format!("\n  - host: {host}\n    container: {container}\n    protocol: udp");
        match self.fields.iter_mut().find(|(k, _)| k == "ports") {
            Some(field) => field.1.push_str(&udp),
            None => self.fields.push(("ports".into(), udp)),
        }
        self
    }

    /// The http health check with another deadline.
    pub fn deadline(self, deadline: &str) -> ServiceYaml {
        self.set("health", &health(deadline))
    }

    pub fn text(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| if v.starts_with('\n') { format!("{k}:{v}\n") } else { format!("{k}: {v}\n") })
            .collect()
    }

    /// Write it to `<dir>/<name>.yaml` and return the path.
    #[track_caller]
    pub fn write(&self, dir: &Path) -> PathBuf {
        let name = self.fields.iter().find(|(k, _)| k == "name").map(|(_, v)| v.as_str()).unwrap_or("service");
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, self.text()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

fn health(deadline: &str) -> String {
    format!("\n  type: http\n  path: /healthz\n  interval: 200ms\n  timeout: 1s\n  deadline: {deadline}")
}
