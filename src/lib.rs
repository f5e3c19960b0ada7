//! cutover: zero-downtime releases of containers and processes on one Linux host.
//!
//! Layers, each pointing only downwards:
//! - `cli`, `commands`: argument types and one file per subcommand (orchestration only);
//! - `daemon`, `client`, `api`: the control plane between CLI and daemon;
//! - `deploy`, `handoff`: the domain (the release state machine, fd handoff);
//! - `nat`, `docker`, `health`, `drain`, `dad`, `netns`, `host`: effects on the OS, each behind a trait;
//! - `manifest`, `plan`, `state`: the model, pure data and pure functions.

pub mod api;
pub mod cli;
pub mod client;
pub mod commands;
pub mod compose;
pub mod dad;
pub mod daemon;
pub mod deploy;
pub mod docker;
pub mod drain;
pub mod embedded;
pub mod handoff;
pub mod health;
pub mod host;
pub mod loadgen;
pub mod manifest;
pub mod metrics;
pub mod nat;
pub mod netns;
pub mod plan;
pub mod state;
