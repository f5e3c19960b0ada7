//! Single requests with a real client, `curl`, from any namespace: a quick probe, and a
//! slow request started in the background whose answer is read later (it must complete on
//! the release it started on).

use std::fmt;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::cmd::{describe, wait_for};
use super::ids::Ids;
use super::netns::At;

const MARKER: &str = "\n@@cutover-status:";

/// curl could not get a response.
#[derive(Debug, Clone)]
pub struct CurlError {
    /// curl's exit code: 7 refused, 28 timed out, 52 empty reply, 56 reset...
    pub code: Option<i32>,
    pub command: String,
    pub stderr: String,
}

impl fmt::Display for CurlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed (curl exit {:?}): {}", self.command, self.code, self.stderr.trim())
    }
}

impl std::error::Error for CurlError {}

fn command(at: &At, url: &str, max_time: Duration, local_port: Option<u16>) -> std::process::Command {
    let mut c = at.command("curl");
    c.args(["-sS", "--noproxy", "*", "-o", "-", "-w"])
        .arg(format!("{MARKER}%{{http_code}}"))
        .args(["-m", &format!("{:.3}", max_time.as_secs_f64())]);
    if let Some(p) = local_port {
        c.args(["--local-port", &p.to_string()]);
    }
    c.arg(url).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn finish(command: String, out: std::io::Result<std::process::Output>) -> Result<(u16, String), CurlError> {
    let out = out.map_err(|e| CurlError { code: None, command: command.clone(), stderr: e.to_string() })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(CurlError { code: out.status.code(), command, stderr });
    }
    let (body, status) = stdout
        .rsplit_once(MARKER)
        .ok_or_else(|| CurlError { code: out.status.code(), command: command.clone(), stderr: format!("no status in output: {stdout}") })?;
    let status = status
        .trim()
        .parse()
        .map_err(|e| CurlError { code: out.status.code(), command: command.clone(), stderr: format!("status `{status}`: {e}") })?;
    Ok((status, body.to_string()))
}

/// GET `url` from `at` (`None` / `At::Host`, `Some("netns")`, `&ClientHost`,
/// `At::container(..)`), 10 s at most. Returns status and body.
pub fn curl(at: impl Into<At>, url: &str) -> Result<(u16, String), CurlError> {
    curl_within(at, url, Duration::from_secs(10))
}

/// `curl` with a given total time limit.
pub fn curl_within(at: impl Into<At>, url: &str, max_time: Duration) -> Result<(u16, String), CurlError> {
    let mut c = command(&at.into(), url, max_time, None);
    let described = describe(&c);
    finish(described, c.output())
}

/// Every new connection (20 in a row) from `at` is answered by `release`.
#[track_caller]
pub fn all_new_connections_answer(at: At, url: &str, release: &str) {
    for i in 0..20 {
        let body = get_ok(at.clone(), url);
        assert_eq!(body.trim(), release, "request {i} was answered by `{}`", body.trim());
    }
}

/// GET that must answer 200; returns the body with trailing whitespace trimmed
/// (`v1\n` -> `v1`). Panics with curl's error otherwise.
#[track_caller]
pub fn get_ok(at: impl Into<At>, url: &str) -> String {
    match curl(at, url) {
        Ok((200, body)) => body.trim_end().to_string(),
        Ok((s, body)) => panic!("GET {url}: status {s}, body {body:?}"),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// A request running in the background (e.g. `/slow?ms=3000` started before a switch).
#[derive(Debug)]
pub struct SlowRequest {
    child: Option<Child>,
    command: String,
    at: At,
    local_port: u16,
}

impl SlowRequest {
    /// Starts `curl url` at `at` with total time limit `max_time`, from a fixed local port
    /// (one of `ids`' ports) so [`SlowRequest::wait_established`] can see its connection.
    #[track_caller]
    pub fn start(ids: &Ids, at: impl Into<At>, url: &str, max_time: Duration) -> SlowRequest {
        let at = at.into();
        let local_port = ids.port();
        let mut c = command(&at, url, max_time, Some(local_port));
        let command = describe(&c);
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        SlowRequest { child: Some(child), command, at, local_port }
    }

    /// Waits until its TCP connection is established (as `ss` in its namespace shows it).
    /// From then on conntrack holds its NAT binding: a switch cannot move it.
    #[track_caller]
    pub fn wait_established(&self, timeout: Duration) {
        let filter = format!("sport = :{}", self.local_port);
        wait_for(&format!("`{}` to connect", self.command), timeout, || {
            let mut ss = self.at.command("ss");
            ss.args(["-Htn", "state", "established", &filter]);
            let out = super::cmd::output(&mut ss).map_err(|e| e.to_string())?;
            if out.stdout.trim().is_empty() {
                Err(format!("no established connection from local port {} yet {}", self.local_port, out.stderr.trim()))
            } else {
                Ok(())
            }
        })
    }

    /// The response: status and body.
    pub fn wait(mut self) -> Result<(u16, String), CurlError> {
        let Some(child) = self.child.take() else {
            return Err(CurlError { code: None, command: self.command.clone(), stderr: "already waited for".into() });
        };
        finish(self.command.clone(), child.wait_with_output())
    }
}

impl Drop for SlowRequest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
