//! The CLI's side of the control API: connect, send one request, show progress, return
//! the final answer or a [`Failure`] carrying the right exit code.

use std::io::{IsTerminal, Write};
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{ProgressLine, Reply, Request};
use crate::exit::{Exit, Failure};

/// Colours and progress bars only on a terminal, and never with NO_COLOR set.
pub fn colour_enabled() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Send `request` and wait for its answer, printing progress to stderr.
pub async fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, Failure> {
    call_with(socket, request, false).await
}

/// [`call`]; with `json`, each progress step is one JSON object on stderr
/// (`{"progress": {"service": ..., "release": ..., "step": "pull", "message": ...}}`), for
/// scripts that follow a release (or a pull) as events while stdout gets the result.
pub async fn call_with(socket: &Path, request: &Request, json: bool) -> Result<serde_json::Value, Failure> {
    let unreachable = |e: std::io::Error| {
        Failure::new(
            Exit::Unreachable,
            format!(
                "cannot reach the cutover daemon at {} ({e}); start it with `cutover daemon` or `systemctl start cutover`, or point --socket / CUTOVER_SOCKET at it",
                socket.display()
            ),
        )
    };
    let mut stream = UnixStream::connect(socket).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            // The daemon runs; this user may not talk to it.
            Failure::new(
                Exit::Refused,
                format!(
                    "access to the cutover daemon's socket {} is denied ({e}): run the command as root, or ask for the \
                     daemon to be started with `--allow-group GROUP` and join that group",
                    socket.display()
                ),
            )
        } else {
            unreachable(e)
        }
    })?;
    let mut line = serde_json::to_vec(request).map_err(|e| Failure::new(Exit::Invalid, format!("cannot encode the request: {e}")))?;
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line).await {
        // A daemon that refuses a peer answers and closes without reading: its answer
        // is still there to read.
        if !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) {
            return Err(unreachable(e));
        }
    }
    let mut lines = BufReader::new(stream).lines();
    let mut view = ProgressView::new();
    view.json = json;
    loop {
        let next = lines.next_line().await.map_err(unreachable)?;
        let Some(text) = next else {
            view.finish();
            return Err(Failure::new(Exit::Refused, "the daemon closed the connection without an answer; see its log (journalctl -u cutover)"));
        };
        let reply: Reply = serde_json::from_str(&text)
            .map_err(|e| Failure::new(Exit::Refused, format!("the daemon sent something this CLI does not understand ({e}); are both the same version?")))?;
        match reply {
            Reply::Progress(p) => view.show(&p),
            Reply::Done { data } => {
                view.finish();
                return Ok(data);
            }
            Reply::Error { code: c, message } => {
                view.finish();
                return Err(Failure::new(Exit::from(c), message));
            }
        }
    }
}

/// Progress on stderr: a redrawn bar on a terminal, plain lines otherwise.
struct ProgressView {
    tty: bool,
    bar_open: bool,
    last_plain: String,
    /// Events as JSON lines instead of text.
    json: bool,
}

impl ProgressView {
    fn new() -> Self {
        ProgressView { tty: std::io::stderr().is_terminal(), bar_open: false, last_plain: String::new(), json: false }
    }

    fn show(&mut self, p: &ProgressLine) {
        let mut err = std::io::stderr().lock();
        if self.json {
            let _ = writeln!(err, "{}", serde_json::json!({ "progress": p }));
            return;
        }
        let bar = match (p.elapsed_ms, p.limit_ms) {
            (Some(e), Some(l)) if l > 0 => Some((e.min(l), l)),
            _ => None,
        };
        match (self.tty, bar) {
            (true, Some((e, l))) => {
                let width = 24u64;
                let filled = usize::try_from(e * width / l).unwrap_or(0);
                let empty = usize::try_from(width).unwrap_or(24).saturating_sub(filled);
                let _ = write!(
                    err,
                    "\r\x1b[2K{:<8} [{}{}] {:>5.1}s/{:.0}s  {}",
                    p.step,
                    "#".repeat(filled),
                    "-".repeat(empty),
                    e as f64 / 1000.0,
                    l as f64 / 1000.0,
                    p.message
                );
                self.bar_open = true;
            }
            _ => {
                if self.bar_open {
                    let _ = writeln!(err);
                    self.bar_open = false;
                }
                // Off a terminal, repeated health/drain polls would flood logs: print changes only.
                if p.message != self.last_plain {
                    let _ = writeln!(err, "{}: {}", p.service, p.message);
                    self.last_plain = p.message.clone();
                }
            }
        }
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.bar_open {
            let _ = writeln!(std::io::stderr());
            self.bar_open = false;
        }
    }
}
