#!/usr/bin/env bash
# Provision a Debian 12 VM for cutover: engine and tools (the repository's .ci/provision,
# the same script CI runs), a Rust toolchain, a release build of cutover, its install
# (binary, systemd unit, completions, docs), and optionally the demo.
#
# Runs as root inside the VM with the checkout at /cutover (see the Vagrantfiles). Safe
# to run again (`vagrant provision`): every step is idempotent.
#
# Environment: CUTOVER_SRC (default /cutover), CUTOVER_RUN_DEMO=yes to run `cutover demo`
# at the end, RUST_MIN (default 1.85, from Cargo.toml's rust-version).
set -euo pipefail

SRC=${CUTOVER_SRC:-/cutover}
RUST_MIN=${RUST_MIN:-$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$SRC/Cargo.toml")}
RUST_MIN=${RUST_MIN:-1.85}
log() { printf '[lab] %s\n' "$*" >&2; }

log "engine, nftables and test tools (.ci/provision)"
bash "$SRC/.ci/provision"

# A C toolchain for the linker and build.rs (static demo server); rsync for re-syncs.
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends build-essential ca-certificates curl git rsync >/dev/null

# Debian 12's rustc (1.63) is older than the crate's rust-version, so use rustup's stable
# toolchain unless a new enough one is on PATH already.
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }
export PATH="/root/.cargo/bin:$PATH"
have=$(rustc --version 2>/dev/null | awk '{print $2}' || true)
if [ -z "$have" ] || ! version_ge "$have" "$RUST_MIN"; then
  log "installing Rust (rustup, stable; found: ${have:-none}, need >= $RUST_MIN)"
  curl -fsSL https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable >/dev/null
fi
log "$(rustc --version)"

log "building cutover (release)"
cd "$SRC"
cargo build --release --locked

log "installing cutover and its systemd unit"
bash dist/install.sh

if [ "${CUTOVER_RUN_DEMO:-no}" = yes ]; then
  log "running the demo"
  cutover demo
fi
