//! Command-line types. No side effects here: parsing only; `commands` acts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_SOCKET: &str = "/run/cutover/cutover.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cutover";

#[derive(Debug, Parser)]
#[command(
    name = "cutover",
    version,
    about = "Zero-downtime releases of containers and processes on a Linux host",
    long_about = "Zero-downtime releases on a Linux host.\n\n\
NAT mode (Docker): the new release starts without a published port, is health-checked, and one \
atomic nftables transaction points the host port at it. Existing connections stay on the old \
release, which is drained, stopped and kept for an instant rollback.\n\n\
Handoff mode (processes sharing a network namespace): listening sockets are passed to the next \
generation over a unix socket, so the kernel never refuses a connection.",
    after_help = "Examples:\n  \
cutover daemon &                       # start the daemon (or use the systemd unit)\n  \
cutover apply manifests/web.yaml       # register a service and deploy its image\n  \
cutover deploy web --image web:2.0     # release a new image with zero downtime\n  \
cutover rollback web                   # back to the previous release\n  \
cutover status --json                  # state for scripts\n  \
cutover plan manifests/web.yaml        # print the nftables rules, change nothing"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "CUTOVER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Log filter (tracing syntax), e.g. `info` or `cutover=debug`.
    #[arg(long, global = true, env = "CUTOVER_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: owns state and the kernel rules, serves the control socket.
    Daemon(DaemonArgs),
    /// Register or update services from manifests; deploys each manifest's image if it is
    /// not the one running.
    Apply(ApplyArgs),
    /// Release a new image of a service.
    Deploy(DeployArgs),
    /// Go back to the previous (or a given) release.
    Rollback(RollbackArgs),
    /// Show services and their active releases.
    Status(StatusArgs),
    /// Show the releases of a service.
    History(HistoryArgs),
    /// Remove a service: its rules and all its containers.
    Remove(RemoveArgs),
    /// Print the nftables rules that `apply` would install; changes nothing.
    Plan(PlanArgs),
    /// Supervise a server that takes its listening sockets by socket activation, and
    /// replace it on `cutover reload` or SIGHUP without refusing a connection.
    #[command(after_help = "Listeners: --listen [NAME=]tcp://ADDR:PORT, repeatable, e.g. \
--listen tcp://0.0.0.0:8080 or --listen http=tcp://[::]:80. The server gets them as fds 3, 4, ... \
in the order given, with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES (the names, `:`-separated). \
Without NAME= a single listener is named after --name (`web`), several are `web-0`, `web-1`, ... \
A name is 1-64 letters, digits, `.`, `-` and `_`.\n\n\
Examples:\n  \
cutover run --name web --listen tcp://127.0.0.1:8080 -- gunicorn -w 2 app:app\n  \
cutover reload web      # new generation; exit 0 switched, 1 refused (the old one serves), 2 unknown name")]
    Run(RunArgs),
    /// Ask a `cutover run` supervisor to start a new generation; waits for the outcome.
    Reload(ReloadArgs),
    /// Show a zero-downtime release on this Docker host: builds two demo releases, runs a
    /// private daemon, deploys and rolls back under load, prints what the clients saw,
    /// and removes everything it made.
    #[command(after_help = "Examples:\n  \
cutover demo                    # port 18080, images removed afterwards\n  \
cutover demo --port 9000 --keep # keep cutover-demo:v1/v2 for your own tries\n  \
cutover demo --json             # the per-step results for scripts\n\n\
Exit status: 0 if no request failed in any step, 1 otherwise.")]
    Demo(DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:\n  \
cutover completions bash > /etc/bash_completion.d/cutover\n  \
cutover completions zsh > \"${fpath[1]}/_cutover\"\n  \
cutover completions fish > ~/.config/fish/completions/cutover.fish")]
    Completions(CompletionsArgs),
    /// Build an image of the project's demo HTTP server (no registry needed): for labs,
    /// the demo and the tests.
    #[command(hide = true)]
    DemoImage(DemoImageArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Host port of the demo service (on every local address; the load goes to 127.0.0.1).
    #[arg(long, default_value_t = 18080)]
    pub port: u16,
    /// Keep the images cutover-demo:v1 and cutover-demo:v2 afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Load: clients that open a new connection for every request.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Load: long-lived keep-alive connections, each issuing requests in a loop.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// How long the load runs before the first step and after each one.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub settle: std::time::Duration,
    /// Print the results as JSON (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[arg(long, env = "DOCKER_HOST", default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    /// Names the demo's images (NAME:v1, NAME:v2), container label and nftables table, so
    /// that tests can run a demo apart from an operator's.
    #[arg(long, default_value = "cutover-demo", hide = true)]
    pub lab_name: String,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct DemoImageArgs {
    /// Tag of the image to build, e.g. cutover-demo:v1.
    #[arg(long)]
    pub tag: String,
    /// Release name the server answers with.
    #[arg(long)]
    pub release: String,
    /// Extra environment baked into the image, KEY=VALUE (e.g. HEALTH=fail).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// Add a Docker HEALTHCHECK probing /healthz.
    #[arg(long)]
    pub healthcheck: bool,
    #[arg(long, env = "DOCKER_HOST", default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Directory of the daemon's state (release history).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Name of cutover's nftables table (`inet` family).
    #[arg(long, default_value = crate::plan::DEFAULT_TABLE)]
    pub table: String,
    /// Packet mark bit set on traffic cutover redirects (accepted in DOCKER-USER).
    #[arg(long, default_value = "0x20000000", value_parser = parse_mark)]
    pub mark: u32,
    /// Label value that tells this daemon's containers apart (default: the table name).
    #[arg(long)]
    pub instance: Option<String>,
    /// Data plane: `nftables` (one table with DNAT maps) or `iptables` (chains named
    /// after --table in the nat table, written with iptables-restore).
    #[arg(long, default_value = "nftables")]
    pub backend: crate::nat::Backend,
    /// Group (gid) allowed to use the control socket besides root.
    #[arg(long)]
    pub allow_group: Option<u32>,
    /// Docker engine socket (Podman's Docker-compatible socket works too).
    #[arg(long, env = "DOCKER_HOST", default_value = "unix:///var/run/docker.sock")]
    pub docker: String,
    /// The engine's daemon.json, read for Docker 29's nftables firewall options
    /// (`firewall-backend`, `bridge-accept-fwmark`).
    #[arg(long, default_value = crate::nat::docker_fw::DAEMON_JSON)]
    pub docker_config: PathBuf,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9477.
    /// Unauthenticated: bind a loopback or private address.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Test hook: hang at this step of every release (starting, healthy, switching, switched,
    /// draining, stopped) so a test can kill the daemon there.
    #[arg(long, hide = true, value_parser = parse_phase)]
    pub pause_at: Option<crate::state::Phase>,
    /// Test hook, with --pause-at: go on after this long (e.g. 3s) instead of hanging.
    #[arg(long, hide = true, value_parser = parse_pause)]
    pub pause_for: Option<std::time::Duration>,
}

fn parse_pause(s: &str) -> Result<std::time::Duration, String> {
    crate::manifest::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_phase(s: &str) -> Result<crate::state::Phase, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("`{s}`: one of starting, healthy, switching, switched, draining, stopped"))
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest files (YAML), or compose files (a top-level `services:` key).
    #[arg(required_unless_present = "compose_files")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// When to pull images for the releases this starts: missing, always or never
    /// (default: each manifest's `pull`).
    #[arg(long, value_name = "POLICY")]
    pub pull: Option<crate::manifest::PullPolicy>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How compose files are read (see docs/compose.md).
#[derive(Debug, Clone, Args)]
pub struct ComposeArgs {
    /// A compose file merged over the ones before it, as `docker compose -f`; repeatable.
    #[arg(short = 'f', long = "file", value_name = "COMPOSE_FILE", id = "compose_files")]
    pub compose_files: Vec<PathBuf>,
    /// The compose project (default: COMPOSE_PROJECT_NAME, the file's `name:`, its folder's name).
    #[arg(long, short = 'p', value_name = "NAME")]
    pub project_name: Option<String>,
    /// Release only these compose services (default: those with `ports:` or `x-cutover:`).
    #[arg(long = "service", value_name = "NAME")]
    pub services: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    pub name: String,
    /// Image of the new release.
    #[arg(long)]
    pub image: String,
    /// When to pull the image: missing, always or never (default: the manifest's `pull`).
    #[arg(long, value_name = "POLICY")]
    pub pull: Option<crate::manifest::PullPolicy>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub name: String,
    /// Release number to go back to (default: the previous one).
    #[arg(long)]
    pub to: Option<u32>,
    /// When that release's container is gone (removed outside cutover), start its image
    /// again as a new release, pulled as POLICY says (missing, always or never). Without
    /// it such a rollback is refused. A kept container is always just restarted.
    #[arg(long, value_name = "POLICY")]
    pub pull: Option<crate::manifest::PullPolicy>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    pub name: String,
    /// Also delete the named volumes cutover created for the service (their data is lost).
    #[arg(long)]
    pub volumes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Manifest files (YAML), or compose files (a top-level `services:` key).
    #[arg(required_unless_present = "compose_files")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub compose: ComposeArgs,
    /// Table name to render (as the daemon's --table).
    #[arg(long, default_value = crate::plan::DEFAULT_TABLE)]
    pub table: String,
    #[arg(long, default_value = "0x20000000", value_parser = parse_mark)]
    pub mark: u32,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the supervised service (used by `cutover reload NAME`).
    #[arg(long)]
    pub name: String,
    /// Listening socket to bind and pass on, `[NAME=]tcp://ADDR:PORT`, e.g.
    /// tcp://0.0.0.0:8080 or http=tcp://[::]:80; repeatable (default names below).
    #[arg(long = "listen", required = true)]
    pub listen: Vec<String>,
    /// How long a new generation has to report READY=1.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ready_timeout: std::time::Duration,
    /// How long a generation may take to finish after the stop signal (the old one after
    /// a switch, a refused new one too) before what is left of it is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Signal that asks the old generation to stop.
    #[arg(long, default_value = "SIGTERM")]
    pub stop_signal: String,
    /// For servers that cannot send READY=1: consider them ready after this delay.
    #[arg(long, value_parser = parse_duration)]
    pub ready_delay: Option<std::time::Duration>,
    /// Also probe the new generation after READY=1 (and during the watch):
    /// http://IP:PORT/PATH (any 2xx) or tcp://IP:PORT. It must reach the new generation
    /// only (a private port or health endpoint), not the shared listener.
    #[arg(long, value_name = "URL")]
    pub health: Option<String>,
    /// After the new generation is ready, the old one serves on this long while the new
    /// one is watched; if the new one exits, withdraws readiness (STOPPING=1) or fails
    /// its probe meanwhile, it is stopped and the reload is refused. 0 turns it off.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub watch: std::time::Duration,
    /// A serving generation that dies on its own is restarted (connections wait in the
    /// accept queue), at most this many times within --restart-window; beyond that the
    /// supervisor exits with status 1. 0: exit at the first death.
    #[arg(long, default_value_t = 5)]
    pub restart_limit: u32,
    /// The window --restart-limit counts restarts in.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub restart_window: std::time::Duration,
    /// Directory of the supervisor's control socket, its record of the serving
    /// generation (for adoption after a restart), notify sockets and generation output.
    #[arg(long, default_value = "/run/cutover/run")]
    pub run_dir: PathBuf,
    /// The server command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    pub name: String,
    #[arg(long, default_value = "/run/cutover/run")]
    pub run_dir: PathBuf,
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::manifest::parse_duration(s)
}

pub fn parse_mark(s: &str) -> Result<u32, String> {
    let v = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}` is not a mark: {e}"))?;
    if v == 0 {
        return Err("the mark must not be 0".into());
    }
    Ok(v)
}
