//! Several compose files merged into one, by compose's documented rules: maps merge key
//! by key; in a service, `ports`, `expose`, `external_links`, `dns`, `dns_search` and
//! `tmpfs` are concatenated; `environment` and `labels` merge by name; `volumes` and
//! `devices` merge by their path in the container; anything else is replaced.

use serde_norway::{Mapping, Value};

/// `over` on top of `base`, top-level keys.
pub fn merge_files(mut base: Mapping, over: Mapping) -> Mapping {
    for (k, v) in over {
        let merged = match (k.as_str(), base.remove(&k), v) {
            (Some("services"), Some(Value::Mapping(b)), Value::Mapping(o)) => Value::Mapping(merge_services(b, o)),
            (_, Some(b), o) => merge_maps(b, o),
            (_, None, o) => o,
        };
        base.insert(k, merged);
    }
    base
}

fn merge_services(mut base: Mapping, over: Mapping) -> Mapping {
    for (name, svc) in over {
        let merged = match (base.remove(&name), svc) {
            (Some(Value::Mapping(b)), Value::Mapping(o)) => Value::Mapping(merge_service(b, o)),
            (_, o) => o,
        };
        base.insert(name, merged);
    }
    base
}

fn merge_service(mut base: Mapping, over: Mapping) -> Mapping {
    for (k, v) in over {
        let old = base.remove(&k);
        let merged = match (k.as_str().unwrap_or_default(), old, v) {
            ("ports" | "expose" | "external_links" | "dns" | "dns_search" | "tmpfs", Some(b), o) => {
                let mut seq = as_list(b);
                seq.extend(as_list(o));
                Value::Sequence(seq)
            }
            ("environment" | "labels", Some(b), o) => {
                let mut map = as_map(b);
                for (name, value) in as_map(o) {
                    map.insert(name, value);
                }
                Value::Mapping(map)
            }
            ("volumes" | "devices", Some(b), o) => {
                let mut seq = as_list(b);
                for entry in as_list(o) {
                    let target = container_path(&entry);
                    match seq.iter().position(|e| target.is_some() && container_path(e) == target) {
                        Some(i) => seq[i] = entry,
                        None => seq.push(entry),
                    }
                }
                Value::Sequence(seq)
            }
            ("command" | "entrypoint", _, o) => o,
            (_, Some(b), o) => merge_maps(b, o),
            (_, None, o) => o,
        };
        base.insert(k, merged);
    }
    base
}

/// Maps merge key by key (a `healthcheck.test` is replaced, being a list); anything
/// else is replaced.
fn merge_maps(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Mapping(mut b), Value::Mapping(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(old) => merge_maps(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Mapping(b)
        }
        (_, o) => o,
    }
}

fn as_list(v: Value) -> Vec<Value> {
    match v {
        Value::Sequence(s) => s,
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// `environment` / `labels` as a map, from either of compose's forms.
fn as_map(v: Value) -> Mapping {
    match v {
        Value::Mapping(m) => m,
        Value::Sequence(s) => s
            .into_iter()
            .filter_map(|e| {
                let text = e.as_str()?.to_string();
                Some(match text.split_once('=') {
                    Some((k, v)) => (Value::String(k.to_string()), Value::String(v.to_string())),
                    None => (Value::String(text), Value::Null),
                })
            })
            .collect(),
        _ => Mapping::new(),
    }
}

/// The path in the container of a volume or device entry (short or long syntax).
fn container_path(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            Some(match parts.len() {
                1 => parts[0],
                2 => parts[1],
                _ => {
                    // SOURCE:TARGET:MODE; a mode is short letters such as ro, rw, z, rwm.
                    parts[1]
                }
            }
            .to_string())
        }
        Value::Mapping(m) => m.get("target").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Mapping {
        serde_norway::from_str(s).unwrap()
    }

    #[test]
    fn compose_merge_rules() {
        let base = yaml(
            "services:\n  web:\n    image: a:1\n    ports: [\"8080:80\"]\n    environment: [A=1, B=2]\n    volumes: [\"data:/data\", \"./conf:/etc/app:ro\"]\n    command: [x, y]\n    healthcheck: {test: [CMD, a], interval: 1s}\n  cache:\n    image: c\nvolumes: {data: {}}\n",
        );
        let over = yaml(
            "services:\n  web:\n    image: a:2\n    ports: [\"9090:90\"]\n    environment: {B: \"3\", C: \"4\"}\n    volumes: [\"./other:/etc/app\"]\n    command: [z]\n    healthcheck: {retries: 5}\n",
        );
        let m = merge_files(base, over);
        let web = &m["services"]["web"];
        assert_eq!(web["image"].as_str(), Some("a:2"));
        assert_eq!(web["ports"].as_sequence().unwrap().len(), 2);
        assert_eq!(web["environment"]["A"].as_str(), Some("1"));
        assert_eq!(web["environment"]["B"].as_str(), Some("3"));
        assert_eq!(web["environment"]["C"].as_str(), Some("4"));
        let vols = web["volumes"].as_sequence().unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[1].as_str(), Some("./other:/etc/app"));
        assert_eq!(web["command"].as_sequence().unwrap().len(), 1);
        assert_eq!(web["healthcheck"]["interval"].as_str(), Some("1s"));
        assert_eq!(web["healthcheck"]["retries"].as_u64(), Some(5));
        assert_eq!(m["services"]["cache"]["image"].as_str(), Some("c"));
        assert!(m["volumes"]["data"].is_mapping());
    }
}
