//! handoff-exec: fetch a service's listeners from the cutover broker and exec a
//! socket-activation server with them.
//!
//!     handoff-exec [--socket @cutover/NAME | --service NAME] [--listener NAME]...
//!                  [--retry-ms MS] -- CMD ARGS...
//!
//! Connects to the broker's SOCK_SEQPACKET socket (abstract names start with `@`; the
//! default is `@cutover/$CUTOVER_SERVICE`), asks for the listeners (all of them unless
//! `--listener` names some), and execs CMD with them as fds 3, 4, ... and LISTEN_FDS,
//! LISTEN_FDNAMES and LISTEN_PID (exec keeps the pid, so it is this process's pid).
//! Speaks version 1 of docs/handoff-protocol.md.
//!
//! With `--retry-ms MS` (default 0: ask once), a broker that cannot be reached, or that
//! refuses with `NotPermitted`, is asked again every 50 ms for that long: the daemon
//! starts a release container and only then learns its pid and allows it, so the first
//! request may come too early. The daemon passes it; other errors are final.
//!
//! Built fully static (std only, libc declared by hand below) so it runs in any
//! container, `FROM scratch` included. Exit codes: 2 usage, 3 broker unreachable,
//! 4 refused by the broker, 5 protocol error, 127 CMD could not be executed.

use std::ffi::c_void;
use std::os::unix::process::CommandExt;
use std::process::{exit, Command};

#[allow(non_camel_case_types)]
type c_int = i32;

const AF_UNIX: c_int = 1;
const SOCK_SEQPACKET: c_int = 5;
const SOCK_CLOEXEC: c_int = 0o2000000;
const SOL_SOCKET: c_int = 1;
const SCM_RIGHTS: c_int = 1;
const MSG_CMSG_CLOEXEC: c_int = 0x40000000;
const MSG_NOSIGNAL: c_int = 0x4000;
const MSG_TRUNC: c_int = 0x20;
const MSG_CTRUNC: c_int = 0x8;
const F_DUPFD_CLOEXEC: c_int = 1030;

const MAX_FDS: usize = 253;
const MAX_FRAME: usize = 65536;
const KIND_REQUEST_LISTENERS: u16 = 1;
const KIND_LISTENERS: u16 = 2;
const KIND_ERROR: u16 = 3;
const CODE_NOT_PERMITTED: u16 = 3;
const DEFAULT_RETRY_MS: u64 = 0;

/// Why a fetch failed: worth asking again (the daemon may not have allowed us yet), or not.
enum Failure {
    Retry(i32, String),
    Fatal(i32, String),
}

#[repr(C)]
struct SockaddrUn {
    sun_family: u16,
    sun_path: [u8; 108],
}

#[repr(C)]
struct Iovec {
    iov_base: *mut c_void,
    iov_len: usize,
}

/// Linux `struct msghdr` (glibc/musl, 64-bit and 32-bit: the padding follows the
/// pointer size because of `#[repr(C)]`).
#[repr(C)]
struct Msghdr {
    msg_name: *mut c_void,
    msg_namelen: u32,
    msg_iov: *mut Iovec,
    msg_iovlen: usize,
    msg_control: *mut c_void,
    msg_controllen: usize,
    msg_flags: c_int,
}

/// Linux `struct cmsghdr`.
#[repr(C)]
struct Cmsghdr {
    cmsg_len: usize,
    cmsg_level: c_int,
    cmsg_type: c_int,
}

extern "C" {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const SockaddrUn, len: u32) -> c_int;
    fn sendmsg(fd: c_int, msg: *const Msghdr, flags: c_int) -> isize;
    fn recvmsg(fd: c_int, msg: *mut Msghdr, flags: c_int) -> isize;
    fn close(fd: c_int) -> c_int;
    fn dup2(old: c_int, new: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_int) -> c_int;
}

fn die(code: i32, msg: &str) -> ! {
    eprintln!("handoff-exec: {msg}");
    exit(code)
}

fn align(n: usize) -> usize {
    (n + std::mem::size_of::<usize>() - 1) & !(std::mem::size_of::<usize>() - 1)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket_name: Option<String> = None;
    let mut names: Vec<String> = Vec::new();
    let mut command: Vec<String> = Vec::new();
    let mut retry_ms = DEFAULT_RETRY_MS;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket_name = args.next(),
            "--service" => socket_name = args.next().map(|s| format!("@cutover/{s}")),
            "--listener" => names.extend(args.next()),
            "--retry-ms" => {
                retry_ms = args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| die(2, "--retry-ms needs milliseconds"))
            }
            "--" => {
                command.extend(args.by_ref());
                break;
            }
            "-h" | "--help" => {
                println!("usage: handoff-exec [--socket @cutover/NAME | --service NAME] [--listener NAME]... [--retry-ms MS] -- CMD ARGS...");
                exit(0)
            }
            other => die(2, &format!("unknown argument `{other}`; see --help")),
        }
    }
    if command.is_empty() {
        die(2, "no command: write handoff-exec [options] -- CMD ARGS...");
    }
    let socket_name = socket_name
        .or_else(|| std::env::var("CUTOVER_SERVICE").ok().map(|s| format!("@cutover/{s}")))
        .unwrap_or_else(|| die(2, "say which broker: --service NAME, --socket @NAME, or CUTOVER_SERVICE"));

    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(retry_ms);
    let (got_names, fds) = loop {
        let attempt = connect_broker(&socket_name).and_then(|fd| {
            let r = request(fd, &socket_name, &names);
            // SAFETY: fd is the socket opened above and not used afterwards.
            unsafe { close(fd) };
            r
        });
        match attempt {
            Ok(got) => break got,
            Err(Failure::Fatal(code, msg)) => die(code, &msg),
            Err(Failure::Retry(code, msg)) => {
                if std::time::Instant::now() >= deadline {
                    die(code, &msg);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    };

    // Move the fds above the target range, then into place at 3, 4, ...; dup2 clears
    // close-on-exec on the targets, so exactly these survive the exec.
    let n = fds.len() as c_int;
    let mut high = Vec::with_capacity(fds.len());
    for &f in &fds {
        // SAFETY: f is an fd this process received; F_DUPFD_CLOEXEC returns a new one.
        let h = unsafe { fcntl(f, F_DUPFD_CLOEXEC, 3 + n) };
        if h < 0 {
            die(5, &format!("cannot move a received fd: {}", std::io::Error::last_os_error()));
        }
        high.push(h);
    }
    for &f in &fds {
        // SAFETY: closing received fds that were duplicated above.
        unsafe { close(f) };
    }
    for (i, &h) in high.iter().enumerate() {
        // SAFETY: h is a valid fd; target 3+i is in the range reserved for listeners.
        if unsafe { dup2(h, 3 + i as c_int) } < 0 {
            die(5, &format!("cannot place listener {i}: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the duplicate above is no longer needed (it is close-on-exec anyway).
        unsafe { close(h) };
    }
    let err = Command::new(&command[0])
        .args(&command[1..])
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", got_names.join(":"))
        .env("LISTEN_PID", std::process::id().to_string())
        .exec();
    die(127, &format!("cannot execute {}: {err}", command[0]));
}

fn connect_broker(name: &str) -> Result<c_int, Failure> {
    let mut addr = SockaddrUn { sun_family: AF_UNIX as u16, sun_path: [0; 108] };
    let (bytes, offset) = match name.strip_prefix('@') {
        Some(abs) => (abs.as_bytes(), 1), // abstract: leading NUL
        None => (name.as_bytes(), 0),
    };
    if bytes.len() + offset >= addr.sun_path.len() {
        die(2, &format!("socket name `{name}` is too long"));
    }
    addr.sun_path[offset..offset + bytes.len()].copy_from_slice(bytes);
    let len = (2 + offset + bytes.len() + usize::from(offset == 0)) as u32;
    // SAFETY: plain socket(2).
    let fd = unsafe { socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        die(3, &format!("cannot create a socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    if unsafe { connect(fd, &addr, len) } != 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: the socket created above, not used afterwards.
        unsafe { close(fd) };
        return Err(Failure::Retry(
            3,
            format!("cannot reach the broker at {name}: {err} (is the daemon serving this service, in this network namespace?)"),
        ));
    }
    Ok(fd)
}

fn request(fd: c_int, socket_name: &str, names: &[String]) -> Result<(Vec<String>, Vec<c_int>), Failure> {
    let mut body = Vec::new();
    body.extend_from_slice(&(names.len() as u16).to_le_bytes());
    for n in names {
        body.extend_from_slice(&(n.len() as u16).to_le_bytes());
        body.extend_from_slice(n.as_bytes());
    }
    let frame = header(KIND_REQUEST_LISTENERS, &body, 0);
    let mut iov = Iovec { iov_base: frame.as_ptr() as *mut c_void, iov_len: frame.len() };
    let msg = Msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: &mut iov,
        msg_iovlen: 1,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    // SAFETY: msg points to a live iovec over `frame`.
    if unsafe { sendmsg(fd, &msg, MSG_NOSIGNAL) } != frame.len() as isize {
        let err = std::io::Error::last_os_error();
        return Err(Failure::Retry(3, format!("cannot send the request to {socket_name}: {err}")));
    }

    let mut buf = vec![0u8; MAX_FRAME];
    let space = align(std::mem::size_of::<Cmsghdr>()) + align(MAX_FDS * 4);
    let mut control = vec![0usize; space / std::mem::size_of::<usize>() + 1];
    let mut iov = Iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut msg = Msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: &mut iov,
        msg_iovlen: 1,
        msg_control: control.as_mut_ptr().cast(),
        msg_controllen: control.len() * std::mem::size_of::<usize>(),
        msg_flags: 0,
    };
    // SAFETY: msg points to live, writable buffers of the sizes it states.
    let n = unsafe { recvmsg(fd, &mut msg, MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return Err(Failure::Retry(3, format!("the broker at {socket_name} closed the connection without an answer")));
    }
    let fds = collect_fds(&msg);
    if msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC) != 0 {
        die(5, "the broker's answer was cut off (MSG_TRUNC/MSG_CTRUNC)");
    }
    let frame = &buf[..n as usize];
    if frame.len() < 16 || &frame[0..4] != b"CUTO" {
        die(5, "the answer is not a cutover handoff frame");
    }
    let version = u16::from_le_bytes([frame[4], frame[5]]);
    if version != 1 {
        die(5, &format!("the broker speaks protocol version {version}; this helper speaks 1"));
    }
    let kind = u16::from_le_bytes([frame[6], frame[7]]);
    let body = &frame[16..];
    let mut r = Reader(body);
    match kind {
        KIND_LISTENERS => {
            let count = r.u16() as usize;
            let names: Vec<String> = (0..count).map(|_| r.string()).collect();
            if names.len() != fds.len() {
                die(5, &format!("the broker announced {} listeners but sent {} fds", names.len(), fds.len()));
            }
            Ok((names, fds))
        }
        KIND_ERROR => {
            let code = r.u16();
            let message = r.string();
            let msg = format!("the broker refused (code {code}): {message}");
            // Error frames carry no fds; nothing to close.
            if code == CODE_NOT_PERMITTED {
                Err(Failure::Retry(4, msg))
            } else {
                Err(Failure::Fatal(4, msg))
            }
        }
        other => Err(Failure::Fatal(5, format!("unexpected frame kind {other} from the broker"))),
    }
}

fn collect_fds(msg: &Msghdr) -> Vec<c_int> {
    let mut fds = Vec::new();
    let base = msg.msg_control as *const u8;
    let mut off = 0usize;
    let hdr = std::mem::size_of::<Cmsghdr>();
    while off + hdr <= msg.msg_controllen {
        // SAFETY: off + hdr is inside the control buffer the kernel filled in.
        let c = unsafe { std::ptr::read_unaligned(base.add(off) as *const Cmsghdr) };
        if c.cmsg_len < hdr || off + c.cmsg_len > msg.msg_controllen {
            break;
        }
        if c.cmsg_level == SOL_SOCKET && c.cmsg_type == SCM_RIGHTS {
            let data = off + align(hdr);
            for i in 0..(c.cmsg_len - align(hdr)) / 4 {
                // SAFETY: inside this header's data area (checked against cmsg_len).
                fds.push(unsafe { std::ptr::read_unaligned(base.add(data + 4 * i) as *const c_int) });
            }
        }
        off += align(c.cmsg_len);
    }
    fds
}

fn header(kind: u16, body: &[u8], fds: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + body.len());
    f.extend_from_slice(b"CUTO");
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&fds.to_le_bytes());
    f.extend_from_slice(body);
    f
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        if self.0.len() < n {
            die(5, "the broker's answer is truncated");
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        h
    }
    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_le_bytes([b[0], b[1]])
    }
    fn string(&mut self) -> String {
        let n = self.u16() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
}
