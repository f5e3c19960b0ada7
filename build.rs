#![allow(clippy::expect_used)] // a build script reports errors by panicking
//! Builds the small std-only programs under `src/embedded/bin/` as fully static
//! executables and embeds them in the cutover binary (see `src/embedded/mod.rs`).
//!
//! They run inside containers built `FROM scratch` (the demo/test server) or are
//! mounted into a service's container (the handoff helper), so they must not depend on
//! any shared library. They are compiled with rustc directly, not as cargo targets, so
//! that static linking does not have to apply to cutover's own dependencies (libmnl has
//! no static archive on Debian).

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let dir = PathBuf::from("src/embedded/bin");
    println!("cargo:rerun-if-changed=src/embedded/bin");
    let mut sources: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("src/embedded/bin exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    sources.sort();
    let mut consts = String::new();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name").to_string();
        let exe = out.join(&stem);
        let status = Command::new(&rustc)
            .args(["--edition", "2021", "--crate-type", "bin", "-C", "opt-level=2", "-C", "strip=symbols"])
            .args(["-C", "target-feature=+crt-static", "-C", "panic=abort", "--target", &target])
            .arg("--crate-name")
            .arg(stem.replace('-', "_"))
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .status()
            .expect("run rustc for an embedded program");
        assert!(
            status.success(),
            "building the static program {} failed: install the static C library (Debian: libc6-dev) and the {target} std",
            src.display()
        );
        consts.push_str(&format!(
            "/// The static program built from `src/embedded/bin/{stem}.rs`.\npub const {}: &[u8] = include_bytes!({:?});\n",
            stem.to_uppercase().replace('-', "_"),
            exe.display().to_string()
        ));
    }
    fs::write(out.join("embedded.rs"), consts).expect("write embedded.rs");
}
