#!/usr/bin/env bash
# Install (or upgrade) cutover on this host from a build tree:
#   cargo build --release --locked && sudo dist/install.sh
# Puts the binary in /usr/local/bin, the systemd unit in /etc/systemd/system, shell
# completions and the docs in their usual places, then starts (or restarts) the daemon.
#
# An upgrade is a restart of the daemon only: the host-port rules live in the kernel and
# the releases in dockerd, so traffic keeps flowing while the control socket is briefly
# away, and the new daemon adopts both from /var/lib/cutover.
#
# Options (environment): BIN=path/to/cutover (default target/release/cutover),
# START=no to install without starting or restarting the daemon, DESTDIR=/some/root to
# install into a staging root (for packages and tests; implies START=no).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/cutover}
START=${START:-yes}
DESTDIR=${DESTDIR:-}
PREFIX=/usr/local
[ -n "$DESTDIR" ] && START=no
root="$DESTDIR"

log() { printf '[install] %s\n' "$*" >&2; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  echo "install: run as root" >&2
  exit 2
fi
if [ ! -x "$BIN" ]; then
  echo "install: $BIN is missing; build it first: cargo build --release --locked" >&2
  exit 2
fi

# Copy then rename: the running daemon keeps its old executable (no ETXTBSY, no torn file).
install -d "$root$PREFIX/bin"
install -m 0755 "$BIN" "$root$PREFIX/bin/.cutover.new"
mv -f "$root$PREFIX/bin/.cutover.new" "$root$PREFIX/bin/cutover"
log "installed $root$PREFIX/bin/cutover ($("$root$PREFIX/bin/cutover" --version))"

install -D -m 0644 dist/cutover.service "$root/etc/systemd/system/cutover.service"
install -d "$root$PREFIX/share/doc/cutover" "$root$PREFIX/share/cutover/manifests"
install -m 0644 docs/*.md "$root$PREFIX/share/doc/cutover/"
install -m 0644 manifests/*.yaml "$root$PREFIX/share/cutover/manifests/"
install -d "$root$PREFIX/share/cutover/manifests/compose"
install -m 0644 manifests/compose/compose.yaml manifests/compose/.env manifests/compose/web.env \
  "$root$PREFIX/share/cutover/manifests/compose/"

bash_dir="$root/usr/share/bash-completion/completions"
zsh_dir="$root$PREFIX/share/zsh/site-functions"
fish_dir="$root/usr/share/fish/vendor_completions.d"
install -d "$bash_dir" "$zsh_dir" "$fish_dir"
"$root$PREFIX/bin/cutover" completions bash >"$bash_dir/cutover"
"$root$PREFIX/bin/cutover" completions zsh >"$zsh_dir/_cutover"
"$root$PREFIX/bin/cutover" completions fish >"$fish_dir/cutover.fish"
log "installed the unit, docs, example manifests and completions"

if [ "$START" != yes ]; then
  log "not starting the daemon (START=$START)"
  exit 0
fi
state=$(systemctl is-system-running 2>/dev/null || true)
case "$state" in
  running|degraded|starting) ;;
  *) log "systemd does not run this host (${state:-no systemctl}): start the daemon yourself: cutover daemon &"
     exit 0 ;;
esac
systemctl daemon-reload
if systemctl is-active --quiet cutover; then
  log "restarting the daemon (the data plane stays in the kernel)"
  systemctl restart cutover
else
  systemctl enable --now cutover
fi
systemctl --no-pager --lines=0 status cutover || true
"$PREFIX/bin/cutover" status
