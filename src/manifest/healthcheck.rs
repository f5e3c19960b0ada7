//! compose's `healthcheck:` as a manifest field: the check the engine runs inside each
//! release container. Health type `docker` waits for its verdict.

use std::fmt;
use std::time::Duration;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::container::{parse_scalar, Scalar};
use super::{format_duration, parse_duration};

/// A container health check in compose's names. Unset durations and retries are the
/// engine's defaults (30s, 30s, 0s, 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Healthcheck {
    /// `["CMD", prog, args...]`, `["CMD-SHELL", line]` or `["NONE"]`; one string is a
    /// shell line (`CMD-SHELL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "test")]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub start_period: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// No health check at all, not even the image's (`test: ["NONE"]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable: bool,
}

impl Healthcheck {
    /// The test the engine is given: `["NONE"]` when disabled.
    pub fn engine_test(&self) -> Vec<String> {
        if self.disable {
            vec!["NONE".to_string()]
        } else {
            self.test.clone()
        }
    }

    /// The checks serde cannot express, as a message for the `healthcheck` field.
    pub fn check(&self) -> Result<(), String> {
        if self.disable {
            return Ok(());
        }
        match self.test.first().map(String::as_str) {
            None => Err("`test` is missing: write e.g. [\"CMD\", \"/app\", \"health\"] or set `disable: true`".into()),
            Some("CMD") | Some("CMD-SHELL") if self.test.len() < 2 => {
                Err(format!("`test: [\"{}\"]` names no command", self.test[0]))
            }
            Some("CMD") | Some("CMD-SHELL") | Some("NONE") => Ok(()),
            Some(other) => Err(format!("`test` starts with `{other}`: start with CMD, CMD-SHELL or NONE, or write one shell line")),
        }
    }
}

fn test<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list such as [\"CMD\", \"/app\", \"health\"] or one shell line")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(vec!["CMD-SHELL".to_string(), v.to_string()])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<String>, A::Error> {
            super::container::strings(seq)
        }
    }
    d.deserialize_any(V)
}

mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        parse_scalar(d, "a duration such as 10s", |s| match s {
            Scalar::Int(secs) if *secs >= 0 => Ok(Some(Duration::from_secs(*secs as u64))),
            Scalar::Text(t) => parse_duration(t).map(Some),
            other => Err(format!("`{other}` is not a duration; write e.g. 500ms, 10s, 1m30s")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_forms_read() {
        let h: Healthcheck = serde_norway::from_str(
            "test: [\"CMD\", \"/demo-server\", \"probe\", \"http://127.0.0.1:80/healthz\"]\ninterval: 1s\nstart_period: 1m30s\nretries: 5\n",
        )
        .unwrap();
        assert_eq!(h.test[0], "CMD");
        assert_eq!(h.interval, Some(Duration::from_secs(1)));
        assert_eq!(h.start_period, Some(Duration::from_secs(90)));
        assert_eq!(h.retries, Some(5));
        assert!(h.check().is_ok());
        let h: Healthcheck = serde_norway::from_str("test: curl -f http://localhost/\n").unwrap();
        assert_eq!(h.test, vec!["CMD-SHELL".to_string(), "curl -f http://localhost/".to_string()]);
        let h: Healthcheck = serde_norway::from_str("disable: true\n").unwrap();
        assert_eq!(h.engine_test(), vec!["NONE".to_string()]);
        let h: Healthcheck = serde_norway::from_str("test: [\"RUN\", \"x\"]\n").unwrap();
        assert!(h.check().unwrap_err().contains("CMD-SHELL"));
        let back: Healthcheck = serde_norway::from_str(&serde_norway::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
    }
}
