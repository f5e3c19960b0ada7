//! cutover: zero-downtime releases of containers and processes on one Linux host.
//!
//! Layers, each pointing only downwards (docs/architecture.md):
//! - `cli`, `commands`: argument types and one file per subcommand (orchestration only);
//! - `demo`: the `cutover demo` scenario and its load generator, apart from the product;
//! - `daemon`, `client`, `api`, `exit`: the control plane between CLI and daemon, and
//!   the one mapping of errors to exit codes;
//! - `deploy`, `handoff`: the domain (the release state machine, fd handoff);
//! - `nat`, `docker`, `health`, `drain`, `dad`, `netns`, `host`, `pidfd`, `metrics`,
//!   `conntrack`, `localnet`: effects on the OS, each behind a narrow trait;
//! - `manifest`, `plan`, `state`: the model, pure data and pure functions;
//! - `limits`: connection caps shared by every socket the daemon serves (bookkeeping only).

pub mod api;
pub mod cli;
pub mod client;
pub mod commands;
pub mod compose;
pub mod conntrack;
pub mod dad;
pub mod daemon;
pub mod demo;
pub mod deploy;
pub mod docker;
pub mod drain;
pub mod embedded;
pub mod exit;
pub mod handoff;
pub mod health;
pub mod limits;
pub mod host;
pub mod localnet;
pub mod manifest;
pub mod metrics;
pub mod nat;
pub mod netns;
pub mod pidfd;
pub mod plan;
pub mod relay;
pub mod state;
pub mod timefmt;
