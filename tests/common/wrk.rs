//! Load with a real third-party client: `wrk` (Debian package) with the kit's Lua script
//! (`tally.lua`) that counts response bodies and statuses, so a test can say "0 failed
//! requests, and after the switch only v2 answered".

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::cmd::describe;
use super::netns::At;

const SCRIPT: &str = include_str!("tally.lua");

/// Socket errors as wrk counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// What one wrk run saw.
#[derive(Debug, Clone, Default)]
pub struct WrkReport {
    /// Completed responses.
    pub requests: u64,
    /// Responses whose status is not 2xx (from the script's tally; wrk's own line,
    /// "Non-2xx or 3xx responses", only counts >= 400 and is the fallback).
    pub non_2xx: u64,
    pub errors: SocketErrors,
    /// Responses per status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Responses per body, trailing whitespace trimmed (`v1\n` is counted as `v1`).
    pub bodies: BTreeMap<String, u64>,
    pub latency: Option<Latency>,
    pub duration: Duration,
    /// wrk's stdout, for messages.
    pub output: String,
}

impl WrkReport {
    /// Requests that did not succeed: non-2xx responses plus every socket error.
    pub fn failed(&self) -> u64 {
        self.non_2xx + self.errors.total()
    }

    /// How many responses had body `body` (compared without trailing whitespace).
    pub fn count(&self, body: &str) -> u64 {
        self.bodies.get(body.trim_end()).copied().unwrap_or(0)
    }

    /// Panics with the whole report unless nothing failed and at least one request completed.
    #[track_caller]
    pub fn assert_no_failures(&self) {
        assert!(
            self.requests > 0 && self.failed() == 0,
            "wrk: {} requests, {} failed (non-2xx {}, socket errors {:?}); bodies {:?}\n{}",
            self.requests,
            self.failed(),
            self.non_2xx,
            self.errors,
            self.bodies,
            self.output
        );
    }

    /// Parses wrk's stdout (with or without the kit's script lines). The script's exact
    /// counters win; the text is the fallback. wrk leaves out the "Socket errors" and
    /// "Non-2xx" lines when they are zero.
    pub fn parse(out: &str) -> Result<WrkReport, String> {
        let mut r = WrkReport { output: out.to_string(), ..WrkReport::default() };
        let mut text_non_2xx = 0;
        let mut have_requests = false;
        let mut have_script = false;
        let mut text_latency = (None, None, None);
        let mut in_distribution = false;
        for line in out.lines() {
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("cutover-wrk ") {
                have_script |= parse_script_line(rest, &mut r).map_err(|e| format!("{e} in `{t}`"))?;
                continue;
            }
            if let Some((n, _)) = t.split_once(" requests in ") {
                if !have_script {
                    r.requests = n.trim().parse().map_err(|e| format!("requests in `{t}`: {e}"))?;
                }
                have_requests = true;
            } else if let Some(rest) = t.strip_prefix("Socket errors:") {
                if !have_script {
                    for part in rest.split(',') {
                        let (k, v) = part.trim().split_once(' ').ok_or_else(|| format!("bad socket errors `{t}`"))?;
                        let v: u64 = v.trim().parse().map_err(|e| format!("socket errors `{t}`: {e}"))?;
                        match k {
                            "connect" => r.errors.connect = v,
                            "read" => r.errors.read = v,
                            "write" => r.errors.write = v,
                            "timeout" => r.errors.timeout = v,
                            _ => return Err(format!("unknown socket error kind `{k}` in `{t}`")),
                        }
                    }
                }
            } else if let Some(n) = t.strip_prefix("Non-2xx or 3xx responses:") {
                text_non_2xx = n.trim().parse().map_err(|e| format!("`{t}`: {e}"))?;
            } else if t.starts_with("Latency Distribution") {
                in_distribution = true;
            } else if in_distribution && t.ends_with(|c: char| c.is_ascii_alphabetic()) && t.contains('%') {
                let (pct, v) = t.split_once('%').ok_or_else(|| format!("bad distribution line `{t}`"))?;
                match pct.trim() {
                    "50" => text_latency.0 = Some(parse_time(v.trim())?),
                    "99" => text_latency.1 = Some(parse_time(v.trim())?),
                    _ => {}
                }
            } else if let Some(rest) = t.strip_prefix("Latency") {
                // "Latency   635.91us    0.89ms  12.92ms   93.69%": avg, stdev, max, +/-.
                let cols: Vec<&str> = rest.split_whitespace().collect();
                if cols.len() >= 3 {
                    text_latency.2 = Some(parse_time(cols[2])?);
                }
            } else {
                in_distribution = false;
            }
        }
        if !have_requests && !have_script {
            return Err(format!("no request count in wrk's output:\n{out}"));
        }
        if have_script {
            r.non_2xx = r.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(_, n)| n).sum();
        } else {
            r.non_2xx = text_non_2xx;
            if let (Some(p50), Some(p99), Some(max)) = text_latency {
                r.latency = Some(Latency { p50, p99, max });
            }
        }
        Ok(r)
    }
}

/// One "cutover-wrk ..." line; Ok(true) when it was the summary.
fn parse_script_line(rest: &str, r: &mut WrkReport) -> Result<bool, String> {
    let mut words = rest.split(' ');
    match words.next() {
        Some("body") => {
            let n: u64 = words.next().ok_or("no count")?.parse().map_err(|e| format!("count: {e}"))?;
            let hex = words.next().ok_or("no body")?.strip_prefix('x').ok_or("body without x prefix")?;
            let bytes = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| format!("body hex: {e}"))?;
            let body = String::from_utf8_lossy(&bytes).trim_end().to_string();
            *r.bodies.entry(body).or_insert(0) += n;
            Ok(false)
        }
        Some("status") => {
            let n: u64 = words.next().ok_or("no count")?.parse().map_err(|e| format!("count: {e}"))?;
            let s: u16 = words.next().ok_or("no status")?.parse().map_err(|e| format!("status: {e}"))?;
            *r.statuses.entry(s).or_insert(0) += n;
            Ok(false)
        }
        Some("summary") => {
            for kv in words {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("`{kv}` is not key=value"))?;
                let v: u64 = v.parse().map_err(|e| format!("{k}: {e}"))?;
                match k {
                    "requests" => r.requests = v,
                    "connect" => r.errors.connect = v,
                    "read" => r.errors.read = v,
                    "write" => r.errors.write = v,
                    "timeout" => r.errors.timeout = v,
                    "duration_us" => r.duration = Duration::from_micros(v),
                    _ => {}
                }
            }
            Ok(true)
        }
        Some("latency_us") => {
            let mut l = Latency { p50: Duration::ZERO, p99: Duration::ZERO, max: Duration::ZERO };
            for kv in words {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("`{kv}` is not key=value"))?;
                let v = Duration::from_micros(v.parse().map_err(|e| format!("{k}: {e}"))?);
                match k {
                    "p50" => l.p50 = v,
                    "p99" => l.p99 = v,
                    "max" => l.max = v,
                    _ => {}
                }
            }
            r.latency = Some(l);
            Ok(false)
        }
        other => Err(format!("unknown line kind {other:?}")),
    }
}

/// wrk's time format: `635.91us`, `1.20ms`, `2.00s`, `1.50m`, `1.00h`.
pub fn parse_time(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| format!("`{s}` has no unit"))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|e| format!("`{s}`: {e}"))?;
    let us = match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        "h" => v * 3600e6,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`")),
    };
    Ok(Duration::from_micros(us.round() as u64))
}

/// A wrk run to configure; [`Wrk::start`] runs it in the background.
#[derive(Debug, Clone)]
pub struct Wrk {
    at: At,
    url: String,
    duration: Duration,
    connections: u32,
    threads: u32,
    close: bool,
    latency: bool,
    timeout: Duration,
}

impl Wrk {
    /// Defaults: on the host, 5 s, 2 threads, 16 connections, a new connection per
    /// request (`Connection: close`), 5 s request timeout.
    pub fn new(url: impl Into<String>) -> Wrk {
        Wrk {
            at: At::Host,
            url: url.into(),
            duration: Duration::from_secs(5),
            connections: 16,
            threads: 2,
            close: true,
            latency: false,
            timeout: Duration::from_secs(5),
        }
    }

    /// Run in a namespace (`&ClientHost`, `At::container(..)`, a netns name...).
    pub fn at(mut self, at: impl Into<At>) -> Wrk {
        self.at = at.into();
        self
    }

    /// Rounded up to whole seconds (wrk's resolution).
    pub fn duration(mut self, d: Duration) -> Wrk {
        self.duration = d;
        self
    }

    pub fn connections(mut self, n: u32) -> Wrk {
        self.connections = n.max(1);
        self
    }

    pub fn threads(mut self, n: u32) -> Wrk {
        self.threads = n.max(1);
        self
    }

    /// Reuse connections instead of one new connection per request.
    pub fn keep_alive(mut self) -> Wrk {
        self.close = false;
        self
    }

    /// Also have wrk print its latency distribution (the report has p50/p99/max anyway).
    pub fn latency(mut self) -> Wrk {
        self.latency = true;
        self
    }

    /// Requests older than this count as timeout errors (whole seconds).
    pub fn timeout(mut self, d: Duration) -> Wrk {
        self.timeout = d;
        self
    }

    /// Starts wrk in the background.
    #[track_caller]
    pub fn start(self) -> WrkRun {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir for the wrk script: {e}"));
        let script = dir.path().join("tally.lua");
        std::fs::write(&script, SCRIPT).unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
        let secs = |d: Duration| format!("{}s", d.as_millis().div_ceil(1000).max(1));
        let mut c = self.at.command("wrk");
        c.args(["-t", &self.threads.min(self.connections).to_string()])
            .args(["-c", &self.connections.to_string()])
            .args(["-d", &secs(self.duration)])
            .args(["--timeout", &secs(self.timeout)])
            .arg("-s")
            .arg(&script);
        if self.close {
            c.args(["-H", "Connection: close"]);
        }
        if self.latency {
            c.arg("--latency");
        }
        c.arg(&self.url).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let command = describe(&c);
        let child = c.spawn().unwrap_or_else(|e| panic!("cannot start `{command}`: {e} (Debian package wrk)"));
        WrkRun { child: Some(child), command, started: Instant::now(), _dir: dir }
    }

    /// Runs wrk to the end.
    #[track_caller]
    pub fn run(self) -> WrkReport {
        self.start().wait()
    }
}

/// A wrk run in progress. Dropping it without `wait` kills wrk.
#[derive(Debug)]
pub struct WrkRun {
    child: Option<Child>,
    command: String,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl WrkRun {
    /// Time since wrk was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for wrk to finish; panics with its output if it failed or printed nothing usable.
    #[track_caller]
    pub fn wait(self) -> WrkReport {
        self.try_wait().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Ends the run now (SIGINT: wrk stops its threads and still prints its report, as
    /// on Ctrl-C) and returns the report.
    #[track_caller]
    pub fn stop(self) -> WrkReport {
        if let Some(c) = self.child.as_ref() {
            // `ip netns exec` and `nsenter` exec into wrk, so the pid is wrk's.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGINT);
        }
        self.wait()
    }

    pub fn try_wait(mut self) -> Result<WrkReport, String> {
        let child = self.child.take().ok_or("wrk already waited for")?;
        let out = child.wait_with_output().map_err(|e| format!("waiting for `{}`: {e}", self.command))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("`{}` failed ({}): {stderr}{stdout}", self.command, out.status));
        }
        WrkReport::parse(&stdout).map_err(|e| format!("`{}`: cannot parse its output: {e}\nstderr: {stderr}", self.command))
    }
}

impl Drop for WrkRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Killing `ip netns exec`/`nsenter` kills wrk too: both exec into it.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The acceptance tests' load: one new connection per request (`Connection: close`) at
/// full speed over 4 connections, 5 s request timeout, for `secs`, started now.
pub fn new_connection_load(url: &str, at: At, secs: u64) -> WrkRun {
    Wrk::new(url).at(at).duration(Duration::from_secs(secs)).connections(4).threads(1).timeout(Duration::from_secs(5)).start()
}
