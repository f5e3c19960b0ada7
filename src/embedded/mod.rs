//! Static helper programs embedded in the cutover binary (built by `build.rs` from
//! `src/embedded/bin/*.rs`, std only, no shared libraries): the demo/test HTTP server
//! that container images are assembled from, and the handoff helper mounted into
//! containers. This module only exposes their bytes.

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
