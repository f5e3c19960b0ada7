#!/usr/bin/env bash
# Client VM of the two-VM lab: curl, wrk, and `lab-load DURATION`, which loads the Docker
# host's service from here with new connections and keep-alive connections at once and
# says how many requests failed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends curl wrk >/dev/null

cat >/usr/local/bin/lab-load <<SCRIPT
#!/usr/bin/env bash
# lab-load [DURATION]: wrk with a new connection per request (Connection: close) and wrk
# with keep-alive connections, both against the Docker host; exit 1 if a request failed.
set -uo pipefail
duration=\${1:-30s}
target=\${TARGET:-$TARGET}
out=\$(mktemp -d)
wrk -t2 -c8 -d"\$duration" -H 'Connection: close' "\$target" >"\$out/fresh" 2>&1 &
wrk -t1 -c4 -d"\$duration" "\$target" >"\$out/keepalive" 2>&1 &
wait
# wrk prints "Socket errors: connect A, read B, write C, timeout D" and
# "Non-2xx or 3xx responses: N" only when there were some.
errors() { sed -n "s/.*Socket errors: connect \\([0-9]*\\), read \\([0-9]*\\), write \\([0-9]*\\), timeout \\([0-9]*\\).*/\\1 \\2 \\3 \\4/p" "\$1"; }
non2xx() { sed -n 's/.*Non-2xx or 3xx responses: \\([0-9]*\\).*/\\1/p' "\$1"; }
failed=0
for kind in fresh keepalive; do
  echo "== \$kind connections"
  cat "\$out/\$kind"
  read -r c r w t <<<"\$(errors "\$out/\$kind")"
  bad=\$(( \${c:-0} + \${w:-0} + \${t:-0} + \$(non2xx "\$out/\$kind" | grep . || echo 0) ))
  if [ "\$kind" = fresh ]; then bad=\$(( bad + \${r:-0} )); fi
  if [ "\$kind" = keepalive ] && [ "\${r:-0}" -gt 0 ]; then
    echo "note: \$r read errors on keep-alive connections: when the old release stops it closes"
    echo "      idle keep-alive connections; wrk counts a request it had just sent on one as an"
    echo "      error instead of retrying it on a new connection as HTTP clients do."
  fi
  [ "\$bad" -gt 0 ] && failed=1
done
rm -rf "\$out"
if [ "\$failed" = 1 ]; then echo "lab-load: some requests failed"; exit 1; fi
echo "lab-load: no request failed"
SCRIPT
chmod +x /usr/local/bin/lab-load
echo "[client] try: lab-load 30s   (target $TARGET)"
curl -fsS --max-time 5 "$TARGET" || echo "[client] the Docker host does not answer yet"
