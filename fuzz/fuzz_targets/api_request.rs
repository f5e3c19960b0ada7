//! The control API request decoder, as the daemon's `handle` drives it: one line of at
//! most `MAX_REQUEST` bytes (longer is refused unread), decoded with serde_json; an
//! `apply` request's manifests are then parsed one by one.
//!
//! Property: none of it panics, hangs or allocates without bound.
#![no_main]

use std::path::Path;

use cutover::api::{Request, MAX_REQUEST};
use cutover::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `read_until(b'\n')`: the line keeps its newline; what follows is never read.
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(end) => &data[..=end],
        None => data,
    };
    if line.len() > MAX_REQUEST {
        return;
    }
    let Ok(request) = serde_json::from_slice::<Request>(line) else { return };
    let _ = request.service();
    if let Request::Apply { manifests, .. } = &request {
        for m in manifests {
            let _ = Manifest::parse(Path::new(&m.file), &m.text);
        }
    }
    // The daemon logs the request with Debug and echoes parts of it back.
    let _ = format!("{request:?}");
    let _ = serde_json::to_vec(&request);
});
