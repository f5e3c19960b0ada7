//! Names and numbers a test owns alone, so tests run in parallel (threads of one test
//! binary, or several binaries) without touching each other's services, tables, marks,
//! namespaces, subnets or ports.
//!
//! Every name embeds one tag: `c` + 4 base-36 chars of a hash of the test name (the
//! "stem", the same in every run of that test) + 5 base-36 chars of the pid + 2 of a
//! per-process counter. The stem lets [`crate::common::cleanup::sweep_stale`] find what
//! an earlier, crashed run of the same test left behind; the pid tells whether that
//! run is still alive.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Private range used only on veth pairs between the root namespace and namespaces the
/// tests create. Carved into /28 blocks (one per `Ids`), each holding four /30s.
pub const SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 0);
const BLOCKS: u32 = 1 << 12; // /16 split into /28s
const CLIENTS_PER_IDS: u8 = 4;

/// Mark bits handed to daemons under test. 0x20000000 (bit 29, cutover's default) is
/// left out so a test never shares a mark with a real daemon on the machine.
const MARK_BITS: std::ops::RangeInclusive<u32> = 16..=28;

/// Host ports handed out: below the kernel's ephemeral range (32768 by default), so a
/// port a test publishes is never also the source port of some client's connection.
const PORT_LOW: u16 = 20000;

/// Prefixes of every kind of name, shared with the sweeper.
pub const TABLE_PREFIX: &str = "cutover_";
pub const NETNS_PREFIX: &str = "cutover-";
pub const NETWORK_PREFIX: &str = "cutover-";
pub const IMAGE_PREFIX: &str = "cutover-test/";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What live `Ids` of this process hold, so two of them never get the same mark bit,
/// subnet block or port.
#[derive(Default)]
struct Claims {
    marks: BTreeSet<u32>,
    blocks: BTreeSet<u32>,
    ports: BTreeSet<u16>,
}

static CLAIMS: Mutex<Claims> = Mutex::new(Claims { marks: BTreeSet::new(), blocks: BTreeSet::new(), ports: BTreeSet::new() });

fn claims() -> MutexGuard<'static, Claims> {
    // A test that panicked while holding the lock leaves the data consistent (each
    // critical section is a few inserts), so a poisoned lock is still usable.
    CLAIMS.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a: stable across runs and toolchains, unlike `DefaultHasher`.
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn base36(mut v: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The stem of every tag of test `test`: `c` + 4 base-36 chars of its name's hash.
pub fn stem_of(test: &str) -> String {
    format!("c{}", base36(fnv1a(test) % 36u64.pow(4), 4))
}

/// The tag of run `pid`, Ids number `n` of test stem `stem` (what `Ids::new` builds).
pub fn tag_for(stem: &str, pid: u32, n: u32) -> String {
    format!("{stem}{}{}", base36(u64::from(pid), 5), base36(u64::from(n) % 1296, 2))
}

/// Length of a tag: stem (5) + pid (5) + counter (2).
pub const TAG_LEN: usize = 12;

/// The pid encoded in a tag, if `tag` looks like one.
pub fn pid_of_tag(tag: &str) -> Option<u32> {
    if tag.len() != TAG_LEN || !tag.starts_with('c') {
        return None;
    }
    u32::from_str_radix(tag.get(5..10)?, 36).ok()
}

/// One /30 between the root namespace (`.1`, the address clients use to reach "the
/// host") and a client namespace (`.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    pub network: Ipv4Addr,
}

impl Subnet {
    pub fn host_side(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    pub fn client_side(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 2)
    }
    pub const PREFIX: u8 = 30;
}

/// The unique identity of one test run. Create it first in a test (so it is dropped
/// last); everything else takes `&Ids`. Dropping it gives its mark, subnets and ports
/// back to the process and removes Docker objects and tables tagged with it (see
/// [`crate::common::cleanup`]) if any were made.
#[derive(Debug)]
pub struct Ids {
    /// The test's name as given.
    pub test: String,
    /// Short unique tag; also the daemon's `--instance` (container label value).
    pub tag: String,
    /// Same for every run of this test; what `sweep_stale` matches.
    pub stem: String,
    /// Service name for manifests: `[a-z0-9-]{1,32}`, readable test name + tag.
    pub service: String,
    /// nftables table (family inet) for the daemon's `--table`.
    pub table: String,
    /// A single mark bit for the daemon's `--mark`.
    pub mark: u32,
    block: u32,
    ports: Mutex<Vec<u16>>,
    pub(crate) touched_docker: std::sync::atomic::AtomicBool,
}

impl Ids {
    /// Identity for test `test` (use the test function's name). Also sweeps what crashed
    /// earlier runs of the same test left behind.
    pub fn new(test: &str) -> Ids {
        let stem = stem_of(test);
        crate::common::cleanup::sweep_stale(&stem);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = tag_for(&stem, pid, n);
        debug_assert_eq!(tag.len(), TAG_LEN);

        let mut readable: String = test
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
            .collect();
        readable.truncate(32 - TAG_LEN - 1);
        let readable = readable.trim_matches('-');
        let service = if readable.is_empty() { tag.clone() } else { format!("{readable}-{tag}") };

        let seed = fnv1a(&tag);
        let (mark, block) = {
            let mut c = claims();
            let bits: Vec<u32> = MARK_BITS.collect();
            let start = (seed as usize) % bits.len();
            let bit = (0..bits.len())
                .map(|i| bits[(start + i) % bits.len()])
                .find(|b| !c.marks.contains(b))
                .unwrap_or_else(|| {
                    panic!("more than {} Ids alive at once in this process: no free mark bit left", bits.len())
                });
            c.marks.insert(bit);
            let used = addresses_in_use();
            let start = (seed >> 16) as u32 % BLOCKS;
            let block = (0..BLOCKS)
                .map(|i| (start + i) % BLOCKS)
                .find(|b| !c.blocks.contains(b) && !block_in_use(*b, &used))
                .unwrap_or_else(|| panic!("no free /28 left in {SUBNET_BASE}/16"));
            c.blocks.insert(block);
            (1u32 << bit, block)
        };

        Ids {
            test: test.to_string(),
            table: format!("{TABLE_PREFIX}{tag}"),
            tag,
            stem,
            service,
            mark,
            block,
            ports: Mutex::new(Vec::new()),
            touched_docker: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The daemon's `--instance` (label `cutover.instance=<tag>` on its containers).
    pub fn instance(&self) -> &str {
        &self.tag
    }

    /// `--mark` as the CLI takes it.
    pub fn mark_arg(&self) -> String {
        format!("{:#x}", self.mark)
    }

    /// Name of client namespace `n` (0..4).
    pub fn netns(&self, n: u8) -> String {
        format!("{NETNS_PREFIX}{}-{n}", self.tag)
    }

    /// Host-side veth of client namespace `n` (15 chars at most, IFNAMSIZ).
    pub fn veth(&self, n: u8) -> String {
        format!("{}h{n}", self.tag)
    }

    /// The /30 of client namespace `n` (0..4).
    #[track_caller]
    pub fn subnet(&self, n: u8) -> Subnet {
        assert!(n < CLIENTS_PER_IDS, "an Ids has {CLIENTS_PER_IDS} client subnets; asked for #{n}");
        let base = u32::from(SUBNET_BASE) + self.block * 16 + u32::from(n) * 4;
        Subnet { network: Ipv4Addr::from(base) }
    }

    /// Name of a Docker network of this test (see `DockerNetwork`).
    pub fn network(&self) -> String {
        format!("{NETWORK_PREFIX}{}", self.tag)
    }

    /// Linux bridge name of that network (15 chars at most).
    pub fn bridge(&self) -> String {
        format!("b{}", self.tag)
    }

    /// Image reference for release `release` of this test's demo service.
    pub fn image(&self, release: &str) -> String {
        format!("{IMAGE_PREFIX}{}:{release}", self.tag)
    }

    /// A host port that no process listens on (TCP and UDP, IPv4 and IPv6) and that no
    /// other live `Ids` of this process was given. Each call gives a new one.
    pub fn port(&self) -> u16 {
        let high = ephemeral_low().saturating_sub(1).max(PORT_LOW + 1000);
        let span = u32::from(high - PORT_LOW);
        let start = (fnv1a(&format!("{}:{}", self.tag, self.ports_len())) % u64::from(span)) as u32;
        let mut c = claims();
        for i in 0..span {
            let p = PORT_LOW + ((start + i) % span) as u16;
            if c.ports.contains(&p) || !port_is_free(p) {
                continue;
            }
            c.ports.insert(p);
            self.ports.lock().unwrap_or_else(|e| e.into_inner()).push(p);
            return p;
        }
        panic!("no free port in {PORT_LOW}..{high}");
    }

    fn ports_len(&self) -> usize {
        self.ports.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub(crate) fn mark_docker_used(&self) {
        self.touched_docker.store(true, Ordering::Relaxed);
    }
}

impl Drop for Ids {
    fn drop(&mut self) {
        if self.touched_docker.load(Ordering::Relaxed) {
            crate::common::cleanup::remove_tagged(&self.tag, &self.table).report(&self.tag);
        }
        // A daemon of the test (kit-started or not) leaves its table lock on purpose.
        let lock_dir = std::path::Path::new(cutover::daemon::table_lock::LOCK_DIR);
        let _ = std::fs::remove_file(cutover::daemon::table_lock::lock_path(lock_dir, &self.table));
        let ports = std::mem::take(&mut *self.ports.lock().unwrap_or_else(|e| e.into_inner()));
        let mut c = claims();
        c.marks.remove(&self.mark.trailing_zeros());
        c.blocks.remove(&self.block);
        for p in ports {
            c.ports.remove(&p);
        }
    }
}

fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768)
}

/// True if nothing is bound to `port` for TCP or UDP on IPv4 or IPv6. The probe sockets
/// are closed on return (no SO_REUSEADDR, so a listener in TIME_WAIT-free state is seen).
pub fn port_is_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
    let v6_ok = |r: std::io::Result<()>| match r {
        Ok(()) => true,
        // No IPv6 on this machine: nothing can listen there either.
        Err(e) => e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL),
    };
    let v6 = v6_ok(TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).map(drop))
        && v6_ok(UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).map(drop));
    v4 && v6
}

/// IPv4 addresses configured on any interface of the root namespace.
fn addresses_in_use() -> Vec<Ipv4Addr> {
    let out = crate::common::cmd::output(&mut crate::common::cmd::cmd("ip", ["-o", "-4", "addr", "show"]));
    let Ok(out) = out else { return Vec::new() };
    out.stdout
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.find(|w| *w == "inet")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

fn block_in_use(block: u32, used: &[Ipv4Addr]) -> bool {
    let lo = u32::from(SUBNET_BASE) + block * 16;
    used.iter().any(|a| (lo..lo + 16).contains(&u32::from(*a)))
}
