//! Host facts and small host effects around the NAT data plane: `route_localnet` of an
//! interface, the ports the host's own processes already listen on, and deleting stale
//! UDP conntrack entries after a switch.
//!
//! Only reads `/proc` and writes one sysctl file per interface; conntrack entries are
//! read and deleted over netlink (`conntrack`: one dump serves every port). No
//! nftables, no Docker. Plain blocking calls: they are short (no process is spawned),
//! call them from `spawn_blocking` in async code where they may repeat.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::conntrack::{self, ConntrackError, Entry};
use crate::manifest::Protocol;

/// Errors of host facts and effects; each names the file or command and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot watch process {pid}: {source}")]
    Pidfd {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("`{0}` is not a valid interface name (1 to 15 bytes, no `/`, not `.` or `..`)")]
    InvalidInterface(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path} (are you root?): {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected content in {path}, line {line}: {reason}")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("conntrack: {0}")]
    Conntrack(#[from] ConntrackError),
    #[error("cannot list the host's addresses (getifaddrs): {0}")]
    Addresses(#[source] nix::Error),
}

/// The addresses configured on the host's interfaces (of the calling thread's network
/// namespace: call it from a thread that never `setns`-es).
pub fn local_addresses() -> Result<BTreeSet<IpAddr>, HostError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(HostError::Addresses)?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// Why a manifest's `host_ip`s cannot work on this host: each must be one of `local`
/// (a DNAT matches only packets addressed to a local address). `None`: all fine.
pub fn host_ip_problem(manifest: &crate::manifest::Manifest, local: &BTreeSet<IpAddr>) -> Option<String> {
    manifest.ports.iter().enumerate().find_map(|(i, p)| {
        let ip = p.host_ip?;
        (!local.contains(&ip)).then(|| {
            format!(
                "ports[{i}].host_ip: {ip} is not an address of this host, so no client could ever reach {}/{} on it; \
                 use one of the addresses `ip addr` shows, or leave host_ip out for all of them",
                p.host, p.protocol
            )
        })
    })
}

/// Where the kernel shows each interface's IPv4 settings.
pub const CONF_DIR: &str = "/proc/sys/net/ipv4/conf";

/// Refuse an interface name that could not be one (it becomes a path component).
pub fn check_ifname(ifname: &str) -> Result<(), HostError> {
    if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') || ifname.contains('\0') || ifname == "." || ifname == ".." {
        return Err(HostError::InvalidInterface(ifname.to_string()));
    }
    Ok(())
}

/// The `route_localnet` file of `ifname` under `conf` (a copy of [`CONF_DIR`] in tests).
pub fn route_localnet_path_in(conf: &Path, ifname: &str) -> Result<PathBuf, HostError> {
    check_ifname(ifname)?;
    Ok(conf.join(ifname).join("route_localnet"))
}

fn sysctl_path(ifname: &str) -> Result<PathBuf, HostError> {
    route_localnet_path_in(Path::new(CONF_DIR), ifname)
}

/// Read a 0/1 sysctl file.
pub fn read_flag(path: &Path) -> Result<bool, HostError> {
    let text = fs::read_to_string(path).map_err(|source| HostError::Read { path: path.to_path_buf(), source })?;
    match text.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(HostError::Parse { path: path.to_path_buf(), line: 1, reason: format!("expected 0 or 1, found `{other}`") }),
    }
}

/// Write a 0/1 sysctl file, only when it differs.
pub fn write_flag(path: &Path, on: bool) -> Result<(), HostError> {
    if read_flag(path)? != on {
        fs::write(path, if on { "1\n" } else { "0\n" }).map_err(|source| HostError::Write { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// Is `route_localnet` on for `ifname`? It lets packets from 127.0.0.0/8 be routed out of
/// the interface, which host clients connecting to `127.0.0.1:<port>` need once their
/// packets are DNAT'd to a release behind that interface.
pub fn route_localnet(ifname: &str) -> Result<bool, HostError> {
    read_flag(&sysctl_path(ifname)?)
}

/// Set `route_localnet` of `ifname`; returns the previous value so a caller can restore
/// it. Writes only when the value changes. An interface that no longer exists (its
/// network was deleted before the last service was removed) is not an error: there is
/// nothing left to set or restore; it is logged, and `on` returned as the previous value.
/// Shared bridges: see [`crate::localnet`], which counts who needs the flag.
pub fn set_route_localnet(ifname: &str, on: bool) -> Result<bool, HostError> {
    let path = sysctl_path(ifname)?;
    let previous = match read_flag(&path) {
        Ok(p) => p,
        Err(HostError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            tracing::info!(interface = ifname, on, "no such interface (its network is gone); route_localnet left alone");
            return Ok(on);
        }
        Err(e) => return Err(e),
    };
    write_flag(&path, on)?;
    Ok(previous)
}

/// TCP socket state LISTEN in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Local ports of the sockets in one `/proc/net/{tcp,udp}[6]` table, each with the address
/// it is bound to (`None`: every address, `0.0.0.0` or `::`). For TCP only LISTEN sockets
/// count; for UDP every socket does (a connected UDP socket also receives on its port, and
/// a DNAT of that port would steal its replies).
pub fn parse_proc_net(text: &str, tcp: bool, path: &Path) -> Result<Vec<(u16, Option<IpAddr>)>, HostError> {
    let mut ports = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| HostError::Parse { path: path.to_path_buf(), line: i + 1, reason: reason.to_string() };
        // "  0: 0100007F:1F90 00000000:0000 0A ..."
        let mut fields = line.split_whitespace();
        let (_slot, local, _remote, state) = match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
            _ => return Err(bad("fewer than 4 fields")),
        };
        if tcp && state != TCP_LISTEN {
            continue;
        }
        let (addr, port) = local.rsplit_once(':').ok_or_else(|| bad("local address without `:port`"))?;
        let port = u16::from_str_radix(port, 16).map_err(|_| bad("local port is not hexadecimal"))?;
        let addr = proc_net_addr(addr).ok_or_else(|| bad("local address is not 8 or 32 hexadecimal digits"))?;
        ports.push((port, Some(addr).filter(|a| !a.is_unspecified())));
    }
    Ok(ports)
}

/// An address as `/proc/net` prints it: the 32-bit words of the address, each in the
/// host's byte order. IPv4-mapped IPv6 addresses come back as IPv4.
fn proc_net_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            let v6 = std::net::Ipv6Addr::from(octets);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// Ports processes of the host's network namespace listen on (TCP) or are bound to (UDP),
/// IPv4 and IPv6. cutover refuses such a host port: its DNAT would take the traffic away
/// from that process.
///
/// `/proc/net` follows the network namespace of the process's main thread; call this from
/// a daemon whose main thread never `setns`-es. Each with the address it is bound to
/// (`None`: every address).
pub fn listening_sockets() -> Result<BTreeSet<(Protocol, u16, Option<IpAddr>)>, HostError> {
    let tables = [
        ("/proc/net/tcp", Protocol::Tcp, false),
        ("/proc/net/tcp6", Protocol::Tcp, true),
        ("/proc/net/udp", Protocol::Udp, false),
        ("/proc/net/udp6", Protocol::Udp, true),
    ];
    let mut out = BTreeSet::new();
    for (path, proto, ipv6) in tables {
        let path = Path::new(path);
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            // No IPv6 in this kernel: nothing listens there.
            Err(e) if e.kind() == io::ErrorKind::NotFound && ipv6 => continue,
            Err(source) => return Err(HostError::Read { path: path.to_path_buf(), source }),
        };
        for (port, addr) in parse_proc_net(&text, proto == Protocol::Tcp, path)? {
            out.insert((proto, port, addr));
        }
    }
    Ok(out)
}

/// The entries of `proto` flows to host port `orig_dst_port` that were answered by
/// `reply_src_addr` (the old release): what `conntrack -p P --orig-port-dst PORT
/// --reply-src ADDR` selects. An IPv4-mapped address matches its IPv4 entries.
pub fn flows_of<'a>(entries: &'a [Entry], proto: Protocol, orig_dst_port: u16, reply_src_addr: IpAddr) -> impl Iterator<Item = &'a Entry> + 'a {
    let want = match reply_src_addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(reply_src_addr, IpAddr::V4),
        v4 => v4,
    };
    entries.iter().filter(move |e| e.orig.proto == proto.number() && e.orig.dst_port == orig_dst_port && e.reply.src == want)
}

/// Delete conntrack entries of `proto` flows to host port `orig_dst_port` that were
/// answered by `reply_src_addr` (the old release). UDP has no connection end, so after a
/// switch the old release keeps getting a flow's datagrams until its entry is gone.
/// Returns how many entries were deleted.
pub fn delete_conntrack(proto: Protocol, orig_dst_port: u16, reply_src_addr: impl Into<IpAddr>) -> Result<u64, HostError> {
    let entries = conntrack::dump()?;
    let mut deleted = 0;
    for e in flows_of(&entries, proto, orig_dst_port, reply_src_addr.into()) {
        // Gone meanwhile (expired, or deleted by someone else) is what we wanted.
        if conntrack::delete(&e.orig)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The kernel's UDP conntrack timeouts: a flow's entry is refreshed to `stream` on every
/// packet once it is ASSURED (seen both ways for a while), to `unreplied` before that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpTimeouts {
    pub unreplied: Duration,
    pub stream: Duration,
}

const UDP_TIMEOUT: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout";
const UDP_TIMEOUT_STREAM: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream";

fn read_secs(path: &str) -> Result<Duration, HostError> {
    let path = Path::new(path);
    let text = fs::read_to_string(path).map_err(|source| HostError::Read { path: path.to_path_buf(), source })?;
    text.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| HostError::Parse { path: path.to_path_buf(), line: 1, reason: format!("expected seconds, found `{}`", text.trim()) })
}

impl UdpTimeouts {
    /// The host's current values (they are per network namespace: read from the daemon's).
    pub fn of_host() -> Result<UdpTimeouts, HostError> {
        Ok(UdpTimeouts { unreplied: read_secs(UDP_TIMEOUT)?, stream: read_secs(UDP_TIMEOUT_STREAM)? })
    }
}

/// The UDP flows to host port `orig_dst_port` answered by `reply_src_addr` (those of
/// [`flows_of`]), each with how long it has been idle, from a conntrack dump.
///
/// conntrack keeps no last-seen time, only the seconds left before the entry expires;
/// every packet resets that to the full timeout, so `full - left` is the time since the
/// flow's last packet, to within the 1 s resolution of `left`. `full` is the stream
/// timeout for ASSURED entries.
pub fn udp_flows_with_idle<'a>(
    entries: &'a [Entry],
    orig_dst_port: u16,
    reply_src_addr: IpAddr,
    timeouts: UdpTimeouts,
) -> impl Iterator<Item = (&'a Entry, Duration)> + 'a {
    flows_of(entries, Protocol::Udp, orig_dst_port, reply_src_addr).map(move |e| {
        // The kernel rounds the time left down to whole seconds, so the real time left
        // is up to 1 s more: count the smaller idle time, never a busy flow as idle.
        let left = Duration::from_secs(u64::from(e.timeout_secs).saturating_add(1));
        let full = if e.assured { timeouts.stream } else { timeouts.unreplied };
        (e, full.saturating_sub(left))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_times(entries: &[Entry], port: u16, addr: IpAddr, timeouts: UdpTimeouts) -> Vec<Duration> {
        udp_flows_with_idle(entries, port, addr, timeouts).map(|(_, idle)| idle).collect()
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 1234 1 0000000000000000 100 0 0 10 0
   2: 0200A8C0:D2F0 0100A8C0:0050 01 00000000:00000000 02:000A7D4F 00000000  1000        0 99 2 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  215: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1 2 0000000000000000 0
  300: 0200A8C0:9C40 08080808:0035 01 00000000:00000000 00:00000000 00000000  1000        0 2 2 0000000000000000 0
";

    #[test]
    fn tcp_counts_only_listen_sockets() {
        let ports = |t, tcp, p| parse_proc_net(t, tcp, Path::new(p)).unwrap().into_iter().map(|(port, _)| port).collect::<Vec<_>>();
        assert_eq!(ports(TCP, true, "tcp"), vec![8080, 3306]);
        assert_eq!(ports(TCP6, true, "tcp6"), vec![22]);
    }

    #[test]
    fn udp_counts_every_bound_socket() {
        let got = parse_proc_net(UDP, false, Path::new("udp")).unwrap();
        let want: Vec<(u16, Option<IpAddr>)> =
            vec![(53, Some("127.0.0.53".parse().unwrap())), (40000, Some("192.168.0.2".parse().unwrap()))];
        assert_eq!(got, want);
    }

    #[test]
    fn bound_addresses_are_read_and_wildcards_are_none() {
        let got = parse_proc_net(TCP, true, Path::new("tcp")).unwrap();
        assert_eq!(got[0], (8080, None));
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A
   1: 000080FE00000000FF0000020100000A:1F90 00000000000000000000000000000000:0000 0A
   2: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A
";
        let got = parse_proc_net(v6, true, Path::new("tcp6")).unwrap();
        let want: Vec<(u16, Option<IpAddr>)> = vec![
            (22, None),
            (8080, Some("fe80::200:ff:a00:1".parse().unwrap())),
            (80, Some("127.0.0.1".parse().unwrap())),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn garbage_is_a_parse_error_with_line() {
        let err = parse_proc_net("header\n 0: nonsense\n", true, Path::new("x")).unwrap_err();
        assert!(matches!(err, HostError::Parse { line: 2, .. }), "{err}");
        let err = parse_proc_net("header\n 0: 00000000:ZZZZ 00000000:0000 0A\n", true, Path::new("x")).unwrap_err();
        assert!(matches!(err, HostError::Parse { line: 2, .. }), "{err}");
    }

    #[test]
    fn interface_names_cannot_escape_proc() {
        for bad in ["", "..", "a/b", "0123456789abcdef"] {
            assert!(matches!(set_route_localnet(bad, false), Err(HostError::InvalidInterface(_))), "{bad}");
        }
        assert_eq!(
            sysctl_path("docker0").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/docker0/route_localnet")
        );
    }

    fn entry(dport: u16, reply_src: &str, left: u32, assured: bool) -> Entry {
        let t = |src: &str, sport: u16, dst: &str, dport: u16| conntrack::Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 17,
            src_port: sport,
            dst_port: dport,
        };
        Entry { orig: t("10.0.0.2", 4000, "10.0.0.1", dport), reply: t(reply_src, dport, "10.0.0.2", 4000), timeout_secs: left, assured }
    }

    #[test]
    fn udp_idle_is_the_full_timeout_minus_what_is_left() {
        let t = UdpTimeouts { unreplied: Duration::from_secs(30), stream: Duration::from_secs(120) };
        let old: IpAddr = "172.17.0.2".parse().unwrap();
        let entries = [
            entry(53, "172.17.0.2", 27, false),
            entry(53, "172.17.0.2", 100, true),
            entry(53, "172.17.0.2", 31, false),
            // Another port, another release: not this flow set.
            entry(54, "172.17.0.2", 0, false),
            entry(53, "172.17.0.3", 0, false),
        ];
        assert_eq!(idle_times(&entries, 53, old, t), vec![Duration::from_secs(2), Duration::from_secs(19), Duration::ZERO]);
        // A flow refreshed a moment ago shows 119 of 120 s left: idle 0, not 1 s.
        assert_eq!(idle_times(&[entry(53, "172.17.0.2", 119, true)], 53, old, t), vec![Duration::ZERO]);
    }

    #[test]
    fn flows_are_selected_by_protocol_port_and_answering_address() {
        let entries = [entry(53, "fd00::2", 1, false), entry(53, "172.17.0.2", 1, false)];
        assert_eq!(flows_of(&entries, Protocol::Udp, 53, "fd00::2".parse().unwrap()).count(), 1);
        assert_eq!(flows_of(&entries, Protocol::Udp, 53, "::ffff:172.17.0.2".parse().unwrap()).count(), 1);
        assert_eq!(flows_of(&entries, Protocol::Tcp, 53, "172.17.0.2".parse().unwrap()).count(), 0);
    }

    #[test]
    fn host_ips_must_be_local() {
        let local = local_addresses().unwrap();
        assert!(local.contains(&IpAddr::from([127, 0, 0, 1])), "{local:?}");
        let m = |ip: &str| {
            crate::manifest::Manifest::parse(
                Path::new("m.yaml"),
                &format!("name: a\nimage: x\nports: [{{host: 80, container: 80, host_ip: \"{ip}\"}}]\n"),
            )
            .unwrap()
        };
        assert_eq!(host_ip_problem(&m("127.0.0.1"), &local), None);
        let why = host_ip_problem(&m("192.0.2.77"), &local).unwrap();
        assert!(why.contains("ports[0].host_ip: 192.0.2.77 is not an address of this host"), "{why}");
    }

    #[test]
    fn loopback_route_localnet_is_readable() {
        // Every Linux host has `lo`; reading needs no privilege.
        read_flag(&sysctl_path("lo").unwrap()).unwrap();
    }
}

/// Resolves when a process exits; stops watching when dropped.
#[derive(Debug)]
pub struct ExitWatch {
    exited: tokio::sync::oneshot::Receiver<()>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ExitWatch {
    /// Wait for the exit (forever if the watcher could not run).
    pub async fn exited(&mut self) {
        if (&mut self.exited).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Watch `pid` through a pidfd: the kernel says the instant it exits, sooner than any
/// engine event, which matters when clients are being sent to it. Polled on a small
/// dedicated thread (with a short timeout, so dropping the watch ends the thread).
pub fn watch_exit(pid: u32) -> Result<ExitWatch, HostError> {
    let raw_pid = libc::pid_t::try_from(pid)
        .map_err(|_| HostError::Pidfd { pid, source: io::Error::from(io::ErrorKind::InvalidInput) })?;
    let pidfd = crate::pidfd::open(raw_pid).map_err(|source| HostError::Pidfd { pid, source })?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_thread = stop.clone();
    std::thread::Builder::new()
        .name(format!("exit-watch-{pid}"))
        .spawn(move || {
            use std::os::fd::AsFd;
            while !stop_thread.load(std::sync::atomic::Ordering::Relaxed) {
                let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                    Ok(n) if n > 0 => {
                        let _ = tx.send(());
                        return;
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => return,
                }
            }
        })
        .map_err(|source| HostError::Pidfd { pid, source })?;
    Ok(ExitWatch { exited: rx, stop })
}

/// The host networking a release needs, as one narrow seam (the state machine's tests
/// replace it): host ports in use, conntrack flows, `route_localnet`, process exits.
pub trait HostNet: Send + Sync + 'static {
    /// Ports host processes listen on (TCP) or have bound (UDP), each with the address it
    /// is bound to (`None`: every address).
    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<IpAddr>)>, HostError>;
    /// Delete the conntrack entries of `protocol` flows to host `port` that were NAT'd
    /// to `addr` (either family), so their next packets are NAT'd afresh.
    fn forget_flows(&self, protocol: Protocol, port: u16, addr: IpAddr) -> Result<(), HostError>;
    /// One drain poll of the UDP flows to host `port` answered by `addr` (either family),
    /// from one read of conntrack: those that carried a packet within `idle` are counted
    /// (they keep an old release draining); the entries of those quiet for `idle` or
    /// longer are deleted, so their next datagram (a reused source port too) reaches the
    /// active release. Err: the flows could not be read.
    fn drain_udp_flows(&self, port: u16, addr: IpAddr, idle: Duration) -> Result<UdpDrain, HostError>;
    /// Daemon `table` needs `route_localnet` on `ifname`: turn it on (again, if someone
    /// switched it off) and record the claim; `recorded` is the value from before cutover
    /// when the caller's state has one (see [`crate::localnet`]). Returns the value the
    /// flag had just before.
    fn claim_route_localnet(&self, ifname: &str, table: &str, recorded: Option<bool>) -> Result<bool, HostError>;
    /// Daemon `table` no longer needs it: the value from before is restored once no other
    /// daemon needs it either; a bridge that no longer exists is no error.
    fn release_route_localnet(&self, ifname: &str, table: &str) -> Result<(), HostError>;
    /// Watch process `pid` until it exits.
    fn watch_exit(&self, pid: u32) -> Result<ExitWatch, HostError>;
}

/// What one drain poll found of an old release's UDP flows to one port.
#[derive(Debug)]
pub struct UdpDrain {
    /// Flows that carried a packet within `udp_idle`: they hold the drain.
    pub busy: usize,
    /// How many quiet flows were deleted, or why deleting them failed.
    pub deleted: Result<usize, HostError>,
}

/// How long one conntrack dump answers for: a drain poll asks about every UDP port of
/// the old release within a few milliseconds, and all of them read the same dump.
const DUMP_REUSE: Duration = Duration::from_millis(100);

/// The real host: `/proc`, sysctl files, conntrack and pidfds of this module.
#[derive(Default)]
pub struct RealHost {
    /// The last conntrack dump and when it was taken.
    flows: std::sync::Mutex<Option<(std::time::Instant, std::sync::Arc<Vec<Entry>>)>>,
}

impl RealHost {
    /// One dump per drain poll, not one per port: a fresh dump unless the last one is
    /// younger than [`DUMP_REUSE`].
    fn recent_flows(&self) -> Result<std::sync::Arc<Vec<Entry>>, HostError> {
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

impl HostNet for RealHost {
    fn host_ports(&self) -> Result<BTreeSet<(Protocol, u16, Option<IpAddr>)>, HostError> {
        listening_sockets()
    }
    fn forget_flows(&self, protocol: Protocol, port: u16, addr: IpAddr) -> Result<(), HostError> {
        // The drain's last dump serves here too: after the switch no new flow can be
        // answered by the old release, so no entry to delete is younger than it.
        let flows = self.recent_flows()?;
        for e in flows_of(&flows, protocol, port, addr) {
            crate::conntrack::delete(&e.orig)?;
        }
        Ok(())
    }
    fn drain_udp_flows(&self, port: u16, addr: IpAddr, idle: Duration) -> Result<UdpDrain, HostError> {
        let timeouts = UdpTimeouts::of_host()?;
        let flows = self.recent_flows()?;
        let mut busy = 0;
        let mut quiet = Vec::new();
        for (e, t) in udp_flows_with_idle(&flows, port, addr, timeouts) {
            if t < idle {
                busy += 1;
            } else {
                quiet.push(e);
            }
        }
        let deleted = quiet.into_iter().try_fold(0, |n, e| {
            // Gone meanwhile (expired, or refreshed into a new entry) is what we wanted.
            crate::conntrack::delete(&e.orig).map(|gone| n + usize::from(gone))
        });
        Ok(UdpDrain { busy, deleted: deleted.map_err(HostError::from) })
    }
    fn claim_route_localnet(&self, ifname: &str, table: &str, recorded: Option<bool>) -> Result<bool, HostError> {
        crate::localnet::Localnet::default().claim_recorded(ifname, table, recorded)
    }
    fn release_route_localnet(&self, ifname: &str, table: &str) -> Result<(), HostError> {
        crate::localnet::Localnet::default().release(ifname, table).map(drop)
    }
    fn watch_exit(&self, pid: u32) -> Result<ExitWatch, HostError> {
        watch_exit(pid)
    }
}
