#!/usr/bin/env bash
# On your workstation, after `vagrant up` in this directory: load the service from the
# client VM while the Docker-host VM deploys release 2 and rolls back; exit 1 if any
# request failed.
set -euo pipefail
cd "$(dirname "$0")"
duration=${1:-90s}
vagrant ssh client -c "lab-load $duration" &
load=$!
sleep 5
vagrant ssh docker -c 'sudo cutover deploy web --image cutover-demo:v2 && sleep 5 && sudo cutover rollback web'
wait "$load"
