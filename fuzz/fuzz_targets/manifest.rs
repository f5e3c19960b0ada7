//! The manifest parser on hostile text: an operator's hand-edited file, or the text a
//! client sends inside an `apply` request.
//!
//! Properties: `Manifest::parse` returns (no panic, no hang, bounded memory); a manifest
//! it accepts survives the daemon's state file (JSON) unchanged, so a restart reloads
//! exactly what was applied.
#![no_main]

use std::path::Path;

use cutover::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(manifest) = Manifest::parse(Path::new("fuzz.yaml"), text) else { return };
    let stored = match serde_json::to_vec(&manifest) {
        Ok(s) => s,
        Err(e) => panic!("an accepted manifest cannot be stored: {e}: {manifest:?}"),
    };
    match serde_json::from_slice::<Manifest>(&stored) {
        Ok(reloaded) => assert_eq!(reloaded, manifest, "the stored manifest reloads differently"),
        Err(e) => panic!("a stored manifest does not reload: {e}: {}", String::from_utf8_lossy(&stored)),
    }
});
