//! A small HTTP server in Python that takes its listener by systemd socket activation
//! and reports readiness with python3-systemd (`systemd.daemon`), as a server written
//! against libsystemd would. Its behaviour is set per generation (`CUTOVER_GENERATION`)
//! through the environment, so one command line serves every generation of a test:
//!
//! - `NEVER_READY_GEN=N`: generation N serves but never sends READY=1;
//! - `SLOW_GEN=N`, `SLOW_MS=M`: generation N takes M ms per answer.
//!
//! Answers `gen=<N>\n` (HTTP/1.1 with `Connection: close`). On SIGTERM it stops accepting, answers
//! every connection it accepted, and exits 0.

pub const SCRIPT: &str = r#"
import http.server, os, signal, socket, sys, threading, time
from systemd import daemon

gen = os.environ.get("CUTOVER_GENERATION", "?")
slow = float(os.environ.get("SLOW_MS", "0")) / 1000.0 if os.environ.get("SLOW_GEN") == gen else 0.0

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if slow:
            time.sleep(slow)
        body = ("gen=%s\n" % gen).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

fds = daemon.listen_fds()
if len(fds) != 1:
    print("expected one listener by socket activation, got %r" % fds, file=sys.stderr)
    sys.exit(2)
server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=fds[0])

def on_term(signum, frame):
    print("generation %s: stopping" % gen, file=sys.stderr, flush=True)
    threading.Thread(target=server.shutdown).start()
signal.signal(signal.SIGTERM, on_term)

print("generation %s: serving" % gen, file=sys.stderr, flush=True)
if os.environ.get("NEVER_READY_GEN") != gen:
    daemon.notify("READY=1")
server.serve_forever(poll_interval=0.05)
server.server_close()
print("generation %s: every accepted connection answered" % gen, file=sys.stderr, flush=True)
"#;

/// Writes the script to `dir/sd_server.py` and returns the command that runs it.
#[track_caller]
pub fn sd_server_command(dir: &std::path::Path) -> Vec<String> {
    let path = dir.join("sd_server.py");
    std::fs::write(&path, SCRIPT).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    vec!["/usr/bin/python3".into(), "-u".into(), path.display().to_string()]
}
