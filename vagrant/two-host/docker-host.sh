#!/usr/bin/env bash
# Docker-host VM of the two-VM lab, after vagrant/provision.sh installed cutover: build
# the two demo releases and register service `web` (manifests/web.yaml, port 8080).
# Idempotent: `apply` of an unchanged manifest changes nothing.
set -euo pipefail
log() { printf '[docker-host] %s\n' "$*" >&2; }

for release in v1 v2; do
  log "building image cutover-demo:$release"
  cutover demo-image --tag "cutover-demo:$release" --release "$release" >/dev/null
done
systemctl is-active --quiet cutover || systemctl start cutover
log "registering service web on port 8080"
cutover apply /cutover/manifests/web.yaml
cutover status
