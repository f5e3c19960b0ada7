#!/usr/bin/env python3
"""Reads the raw data of one bench/run (its --out directory) and writes results.json,
table.md (also printed) and chart.svg there. Standard library only.

    python3 bench/report.py target/bench/<run>

Raw inputs (written by bench/run): events.txt, switch/<way>.csv (bench_load timeline),
switch/<way>.wrk.txt, switch/<way>.loadgen.json, switch/cutover.deploy.json,
wrk/<path>.<origin>.<mode>.r<round>.txt, bench_switch.txt, iptables.txt, nft_shapes.txt,
handoff.txt, params.json. A missing or broken input gives an "n/a" cell, never a crash,
unless nothing at all could be read (exit 1: the harness is broken).
"""

import json
import os
import re
import statistics
import sys
from collections import Counter, defaultdict

OUT = sys.argv[1]
WAYS = ["naive", "nginx", "haproxy", "cutover"]
WAY_LABEL = {
    "naive": "naive (docker stop + docker run -p)",
    "nginx": "nginx upstream edit + nginx -s reload",
    "haproxy": "HAProxy runtime API (set server)",
    "cutover": "cutover deploy",
}
PATH_LABEL = {
    "direct": "container addressed directly",
    "cutover": "cutover DNAT",
    "docker-dnat": "Docker published port (DNAT)",
    "docker-proxy": "Docker published port (docker-proxy)",
    "docker-direct": "published container, directly",
    "nginx": "nginx reverse proxy",
    "haproxy": "HAProxy",
}


def path(*p):
    return os.path.join(OUT, *p)


def read(*p):
    try:
        with open(path(*p)) as f:
            return f.read()
    except OSError:
        return None


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(round((len(sorted_vals) - 1) * p)))]


def fmt_ms(us, digits=1):
    return "n/a" if us is None else f"{us / 1000:.{digits}f}"


def events():
    ev = {}
    for line in (read("events.txt") or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            ev[parts[0]] = int(parts[1])
    return ev


def parse_tally(text):
    """The kit's tally.lua lines in a wrk output."""
    r = {"requests": None, "connect": 0, "read": 0, "write": 0, "timeout": 0, "non_2xx": 0, "bodies": {}}
    for line in (text or "").splitlines():
        if line.startswith("cutover-wrk summary"):
            for kv in line.split()[2:]:
                k, v = kv.split("=")
                if k in ("requests", "connect", "read", "write", "timeout"):
                    r[k] = int(v)
        elif line.startswith("cutover-wrk status"):
            _, _, n, code = line.split()
            if not 200 <= int(code) < 300:
                r["non_2xx"] += int(n)
        elif line.startswith("cutover-wrk body"):
            _, _, n, hexbody = line.split()
            body = bytes.fromhex(hexbody[1:]).decode(errors="replace").strip()
            r["bodies"][body] = r["bodies"].get(body, 0) + int(n)
    if r["requests"] is None:
        return None
    r["failed"] = r["connect"] + r["read"] + r["write"] + r["timeout"] + r["non_2xx"]
    return r


def find_key(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def switch_part(ev):
    res = {}
    for way in WAYS:
        text = read("switch", f"{way}.csv")
        if text is None:
            continue
        rows = []
        for line in text.splitlines():
            # kind, due (us), sent (us), latency (us), outcome, body; rows are
            # (kind, due, latency, outcome, body, sent).
            f = line.split(",", 5)
            if len(f) == 6:
                rows.append((f[0], int(f[1]), int(f[3]), f[4], f[5], int(f[2])))
        new = sorted((r for r in rows if r[0] == "new"), key=lambda r: r[1])
        ka = [r for r in rows if r[0] == "ka"]
        start, end = ev.get(f"{way}.switch_start"), ev.get(f"{way}.switch_end")
        ready = ev.get(f"{way}.v2_ready")
        fails_new = Counter(r[3] for r in new if r[3] != "ok")
        fails_ka = Counter(r[3] for r in ka if r[3] != "ok")
        lat = sorted(r[2] for r in new if r[3] == "ok" and start and end and start <= r[1] <= end)
        # All new connections on v2 from t_conv on: the request after the last one that
        # was not a v2 answer.
        # By the time each request was really sent (a saturated machine sends late; the
        # due time would credit the switch with the client's delay).
        by_sent = sorted(new, key=lambda r: r[5])
        t_conv = None
        last_bad = max((i for i, r in enumerate(by_sent) if not (r[3] == "ok" and r[4] == "v2")), default=None)
        if any(r[4] == "v2" for r in by_sent):
            if last_bad is None:
                t_conv = by_sent[0][5]
            elif last_bad + 1 < len(by_sent):
                t_conv = by_sent[last_bad + 1][5]
        bad = [r[1] for r in new if r[3] != "ok"]
        outage_ms = (bad[-1] - bad[0]) / 1000 if bad else 0
        lg = {}
        try:
            lg = json.loads(read("switch", f"{way}.loadgen.json") or "{}")
        except json.JSONDecodeError:
            pass
        cpu = {}
        try:
            cpu = json.loads(read("switch", f"{way}.cpu.json") or "{}")
        except json.JSONDecodeError:
            pass
        entry = {
            "new_requests": len(new),
            "new_failed": dict(fails_new),
            "ka_requests": len(ka),
            "ka_failed": dict(fails_ka),
            "bodies_new": dict(Counter(r[4] for r in new if r[3] == "ok")),
            "outage_ms": outage_ms,
            "window_ms": None if not (start and end) else (end - start) / 1000,
            "window_p50_us": pct(lat, 0.5),
            "window_p99_us": pct(lat, 0.99),
            "window_max_us": lat[-1] if lat else None,
            # The naive restart has no overlap: v2 comes up after v1 is gone, so the
            # question "how long after v2 was ready" does not apply.
            "v2_ready_to_all_new_on_v2_ms": None if (way == "naive" or ready is None or t_conv is None) else (t_conv - ready) / 1000,
            "wrk": parse_tally(read("switch", f"{way}.wrk.txt")),
            "loadgen": lg,
            "machine_busy_pct": cpu.get("machine_busy_pct"),
        }
        for k in ("health_ok", "switched", "v1_stopped", "v2_started"):
            if f"{way}.{k}" in ev and start:
                entry[f"t_{k}_ms"] = (ev[f"{way}.{k}"] - start) / 1000
        if ready and start:
            entry["t_v2_ready_ms"] = (ready - start) / 1000
        if way == "cutover":
            try:
                d = json.loads(read("switch", "cutover.deploy.json") or "null")
                entry["deploy"] = {k: find_key(d, k) for k in ("outcome", "health_ms", "switch_us", "drain_ms")}
            except json.JSONDecodeError:
                entry["deploy"] = None
        res[way] = entry
    return res


def parse_wrk(text):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        return None
    r["rps"] = float(m.group(1))
    unit = {"us": 1, "ms": 1000, "s": 1_000_000}
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        r[f"p{p}_us"] = float(m.group(1)) * unit[m.group(2)] if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["errors"] = sum(map(int, m.groups())) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["errors"] += int(m.group(1)) if m else 0
    m = re.search(r"client_cpu ([\d.]+) ([\d.]+) ([\d.]+)", text)
    r["client_cpu_pct"] = 100 * (float(m.group(1)) + float(m.group(2))) / float(m.group(3)) if m and float(m.group(3)) > 0 else None
    m = re.search(r"machine_busy_pct (\d+)", text)
    r["machine_busy_pct"] = int(m.group(1)) if m else None
    return r


def datapath_part():
    runs = defaultdict(list)
    by_round = {}
    d = path("wrk")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        m = re.match(r"(.+)\.(ns|host)\.(keepalive|close)\.r(\d+)\.txt$", name)
        if not m:
            continue
        w = parse_wrk(read("wrk", name) or "")
        if w:
            runs[m.groups()[:3]].append(w)
            by_round[m.groups()] = w
    res = {}
    for (label, origin, mode), ws in runs.items():
        med = lambda k: statistics.median([w[k] for w in ws if w.get(k) is not None]) if any(w.get(k) is not None for w in ws) else None
        res[f"{label}|{origin}|{mode}"] = {
            "path": label, "origin": origin, "mode": mode, "rounds": len(ws),
            "rps": med("rps"), "p50_us": med("p50_us"), "p99_us": med("p99_us"),
            "errors": sum(w["errors"] for w in ws), "client_cpu_pct": med("client_cpu_pct"),
            "machine_busy_pct": med("machine_busy_pct"),
        }
    # Paired by round: each path's requests/s over the direct path's of the same round
    # (measured seconds apart), so drift in the machine's load cancels; the median of
    # those ratios, and their range as the resolution of this run.
    for v in res.values():
        ratios = []
        for (label, origin, mode, rnd), w in by_round.items():
            if (label, origin, mode) == (v["path"], v["origin"], v["mode"]):
                base = by_round.get(("direct", origin, mode, rnd))
                if base and base["rps"]:
                    ratios.append(w["rps"] / base["rps"])
        v["ratio"] = statistics.median(ratios) if ratios else None
        v["ratio_min"] = min(ratios) if ratios else None
        v["ratio_max"] = max(ratios) if ratios else None
    return res


def parse_duration_us(s):
    m = re.match(r"([\d.]+)(ns|µs|us|ms|s)$", s)
    if not m:
        return None
    return float(m.group(1)) * {"ns": 1e-3, "µs": 1, "us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def scale_part():
    res = {"cutover": {}, "socket": {}, "iptables_full": {}, "iptables_replace1": {}, "shapes": {}, "split": {}, "stack": []}
    for line in (read("bench_switch_socket.txt") or "").splitlines():
        f = line.split()
        if len(f) == 6 and all(x.isdigit() for x in f):
            n, commit, close, total, pers, pers99 = map(int, f)
            res["socket"][n] = {"commit_us": commit, "close_us": close, "fresh_total_us": total, "persistent_us": pers, "persistent_p99_us": pers99}
    for line in (read("bench_switch.txt") or "").splitlines():
        f = line.split()
        if len(f) == 5 and f[0].isdigit():
            res["cutover"][int(f[0])] = {"sync_us": parse_duration_us(f[1]), "median_us": parse_duration_us(f[2]),
                                         "p99_us": parse_duration_us(f[3]), "max_us": parse_duration_us(f[4])}
    ipt = defaultdict(list)
    for line in (read("iptables.txt") or "").splitlines():
        f = line.split()
        if len(f) == 3:
            ipt[(int(f[0]), f[1])].append(int(f[2]))
    for (n, kind), v in ipt.items():
        v.sort()
        res[f"iptables_{kind}"][n] = {"median_us": pct(v, 0.5), "p99_us": pct(v, 0.99), "runs": len(v)}
    for line in (read("nft_shapes.txt") or "").splitlines():
        f = line.split()
        if f[:1] == ["shape"] and len(f) == 4:
            res["shapes"][f[1]] = {"median_us": int(float(f[2])), "p90_us": int(float(f[3]))}
        elif f[:1] == ["split"] and len(f) == 3:
            res["split"][f[1]] = int(f[2])
        elif f[:1] == ["stack"]:
            res["stack"].append(" ".join(f[1:]))
    return res


def handoff_part():
    res = {"connections": {}, "listener": None, "skipped": {}}
    for line in (read("handoff_skipped.txt") or "").splitlines():
        f = line.split()
        if len(f) == 3 and f[0] == "skipped":
            res["skipped"][int(f[1])] = f[2]
    for line in (read("handoff.txt") or "").splitlines():
        f = line.split()
        if len(f) == 4 and f[0].isdigit():
            res["connections"][int(f[0])] = {"sender_ms": float(f[1]), "end_to_end_ms": float(f[2]), "us_per_conn": float(f[3])}
        m = re.search(r"p50 ([\d.]+) us, p99 ([\d.]+) us, max ([\d.]+) us", line)
        if m:
            res["listener"] = {"p50_us": float(m.group(1)), "p99_us": float(m.group(2)), "max_us": float(m.group(3))}
    return res


def goals(sw, dp, sc, ho):
    g = []
    c = sw.get("cutover")
    if c:
        failed = sum(c["new_failed"].values()) + sum(c["ka_failed"].values()) + ((c["wrk"] or {}).get("failed") or 0)
        g.append(("0 failed requests in the cutover switch (new, keep-alive, wrk)", f"{failed} failed", failed == 0))
        sw_us = (c.get("deploy") or {}).get("switch_us")
        if sw_us is not None:
            g.append(("switch under 1 ms (deploy's switch_us: one sample, under the load of part 1)", f"{sw_us / 1000:.2f} ms", sw_us < 1000))
    if sc["cutover"]:
        meds = {n: v["median_us"] for n, v in sc["cutover"].items() if v["median_us"] is not None}
        if meds:
            worst = max(meds.values())
            g.append(("switch under 1 ms: the switch call as the daemon makes it (bench_switch median, every size)", f"worst median {worst / 1000:.2f} ms", worst < 1000))
    so = sc["socket"]
    if so:
        worst = max(v["commit_us"] for v in so.values())
        g.append(("switch under 1 ms: commit until ACK on a fresh socket, when new connections go to v2 (every size)", f"worst median {worst / 1000:.3f} ms", worst < 1000))
    for name, src, key in (("switch call", sc["cutover"], "median_us"), ("fresh-socket commit", so, "commit_us")):
        meds = {n: v[key] for n, v in src.items() if v.get(key)}
        if len(meds) > 1:
            lo, hi = min(meds), max(meds)
            ratio = meds[hi] / meds[lo]
            g.append((f"switch time flat from {lo} to {hi} services ({name}; median ratio <= 1.5)", f"x{ratio:.2f}", ratio <= 1.5))
    for k, v in sorted(dp.items()):
        if v["path"] == "cutover" and v["ratio"] is not None:
            measured = f"{100 * v['ratio']:.1f}%"
            met = v["ratio"] >= 0.97
            # The null control: another container addressed directly, which differs from
            # the baseline in nothing that matters. Its spread is what this host can resolve.
            null = next((n for n in dp.values() if n["path"] == "docker-direct" and n["origin"] == v["origin"]
                         and n["mode"] == v["mode"] and n["ratio"] is not None), None)
            if null is not None:
                measured += f" (null control {100 * null['ratio']:.1f}%, rounds {100 * null['ratio_min']:.0f}-{100 * null['ratio_max']:.0f}%)"
                if not met and null["ratio_min"] is not None and v["ratio"] >= null["ratio_min"]:
                    met = "within noise"
            g.append((f"data path >= 97% of direct ({v['origin']}, {v['mode']})", measured, met))
    h = ho["connections"].get(10000)
    if h:
        g.append(("10 000 connections migrated in < 100 ms", f"{h['end_to_end_ms']:.1f} ms", h["end_to_end_ms"] < 100))
    return [{"goal": a, "measured": b, "met": m} for a, b, m in g]


def table(params, sw, dp, sc, ho, gl):
    L = []
    L.append(f"Host: {params.get('cpus')} CPUs, kernel {params.get('kernel')}, Docker {params.get('docker')}, nginx {params.get('nginx')}, "
             f"HAProxy {params.get('haproxy')}, wrk {params.get('wrk')}; load average at start {params.get('loadavg_start')}; "
             f"{'QUICK run' if params.get('quick') else 'full run'} ({params.get('profile')} build).")
    L.append("")
    L.append(f"### 1. Release switch under load ({params.get('rate')} new connections/s + {params.get('keepalive')} keep-alive connections, 10 req/s each; wrk -c2 Connection: close alongside)")
    L.append("")
    L.append("| way | new-conn requests | failed (kind) | failing for (ms) | keep-alive requests | failed (kind) | wrk failed (of requests) | p50 / p99 / max in switch window (ms) | v2 ready -> all new on v2 (ms) | switch action (ms) | client CPU % / send lag p99 (ms) | machine busy % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for way in WAYS:
        s = sw.get(way)
        if not s:
            L.append(f"| {WAY_LABEL[way]} | skipped | | | | | | | | | | |")
            continue
        fk = lambda d: (f"{sum(d.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(d.items())) + ")") if d else "0"
        w = s["wrk"]
        wf = "n/a" if not w else (f"{w['failed']} of {w['requests']}" + (" (" + ", ".join(f"{k} {w[k]}" for k in ("connect", "read", "write", "timeout", "non_2xx") if w[k]) + ")" if w["failed"] else ""))
        conv = s["v2_ready_to_all_new_on_v2_ms"]
        lg = s["loadgen"] or {}
        # The switch action itself: nginx's config write + `nginx -s reload` (it returns once
        # signalled; workers start after), HAProxy's runtime-API command, cutover's
        # switch_us as the daemon reports it (the netlink call, socket close included).
        if way == "cutover":
            su = (s.get("deploy") or {}).get("switch_us")
            hs = "n/a" if su is None else f"{su / 1000:.1f}"
        elif s.get("t_health_ok_ms") is not None and s.get("t_switched_ms") is not None:
            hs = f"{s['t_switched_ms'] - s['t_health_ok_ms']:.1f}"
        else:
            hs = "n/a (no switch step)"
        L.append(f"| {WAY_LABEL[way]} | {s['new_requests']} | {fk(s['new_failed'])} | {s['outage_ms']:.0f} | {s['ka_requests']} | {fk(s['ka_failed'])} | {wf} | "
                 f"{fmt_ms(s['window_p50_us'], 2)} / {fmt_ms(s['window_p99_us'], 2)} / {fmt_ms(s['window_max_us'], 1)} | "
                 f"{('n/a (no overlap)' if way == 'naive' else 'n/a') if conv is None else (f'{conv:.0f}' if conv >= 0 else f'0 (observer {-conv:.0f} ms late)')} | {hs} | {lg.get('client_cpu_pct', 'n/a')} / {fmt_ms(lg.get('send_lag_p99_us'), 2)} | {s['machine_busy_pct']} |")
    c = (sw.get("cutover") or {}).get("deploy")
    if c:
        L.append("")
        L.append(f"cutover deploy reported: outcome {c.get('outcome')}, health {c.get('health_ms')} ms, switch {c.get('switch_us')} us, drain {c.get('drain_ms')} ms.")
    L.append("")
    L.append(f"### 2. Steady-state data path (wrk -t1 -c16, {params.get('rounds')} rounds of {params.get('wrk_secs')} s; req/s and latencies: median over rounds; ratio: median over rounds of req/s over the direct path's in the same round (min-max of those ratios))")
    L.append("")
    L.append("| path | origin | mode | req/s | ratio to direct | p50 (ms) | p99 (ms) | errors | wrk CPU % | machine busy % |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    order = ["direct", "docker-direct", "cutover", "docker-dnat", "docker-proxy", "nginx", "haproxy"]
    for origin in ("ns", "host"):
        for mode in ("keepalive", "close"):
            for p in order:
                v = dp.get(f"{p}|{origin}|{mode}")
                if not v:
                    continue
                ratio = "n/a" if v["ratio"] is None else f"{100 * v['ratio']:.1f}%" + ("" if v["rounds"] < 2 or v["path"] == "direct" else f" ({100 * v['ratio_min']:.0f}-{100 * v['ratio_max']:.0f}%)")
                on = "other namespace" if origin == "ns" else "host"
                L.append(f"| {PATH_LABEL.get(p, p)} | {on} | {'keep-alive' if mode == 'keepalive' else 'new conn/request'} | {v['rps']:.0f} | {ratio} | "
                         f"{fmt_ms(v['p50_us'], 2)} | {fmt_ms(v['p99_us'], 2)} | {v['errors']} | "
                         f"{'n/a' if v['client_cpu_pct'] is None else round(v['client_cpu_pct'])} | {v['machine_busy_pct']} |")
    L.append("")
    L.append("### 3. Switch transaction vs services registered (median / p99, microseconds)")
    L.append("")
    L.append("| services | cutover's switch call (bench_switch: `NftFirewall::apply_ops`, socket kept open) | the same commit on a fresh socket: until ACK (switch in effect) | that fresh socket's close | the commit alone over a kept-open socket (median / p99) | iptables-restore --noflush, one rule replaced (-R) | iptables-restore, chain rewritten (kube-proxy style) |")
    L.append("|---|---|---|---|---|---|---|")
    sizes = sorted(set(sc["cutover"]) | set(sc["iptables_full"]) | set(sc["socket"]))
    for n in sizes:
        cu = sc["cutover"].get(n)
        so = sc["socket"].get(n) or {}
        r1 = sc["iptables_replace1"].get(n)
        fu = sc["iptables_full"].get(n)
        cell = lambda d, a="median_us", b="p99_us": "n/a" if not d or d.get(a) is None else f"{d[a]:.0f} / {d[b]:.0f}"
        one = lambda k: "n/a" if so.get(k) is None else f"{so[k]}"
        L.append(f"| {n} | {cell(cu)} | {one('commit_us')} | {one('close_us')} | {cell(so, 'persistent_us', 'persistent_p99_us')} | {cell(r1)} | {cell(fu)} |")
    if sc["shapes"]:
        L.append("")
        L.append("Transaction shapes, one `nft -f` each on a 1000-element map (median / p90 us; `noop` is nft's own start-up and round trip):")
        L.append("")
        L.append("| shape | median | p90 |")
        L.append("|---|---|---|")
        for k, v in sc["shapes"].items():
            L.append(f"| {k} | {v['median_us']} | {v['p90_us']} |")
    if sc["split"]:
        L.append("")
        L.append("strace of the replace shape: batch sendmsg (the commit) median "
                 f"{sc['split'].get('commit_sendmsg_us')} us; close() of the netlink socket median {sc['split'].get('socket_close_us')} us.")
    for s in sc["stack"]:
        L.append(f"Kernel stack while nft closes its socket (samples, frames): `{s}`")
    L.append("")
    L.append("### 4. fd handoff (examples/handoff_bench.rs)")
    L.append("")
    L.append("| connections | sender (ms) | end to end (ms) | us per connection |")
    L.append("|---|---|---|---|")
    for n, v in sorted(ho["connections"].items()):
        L.append(f"| {n} | {v['sender_ms']:.1f} | {v['end_to_end_ms']:.1f} | {v['us_per_conn']:.2f} |")
    for n, hard in sorted(ho["skipped"].items()):
        L.append(f"| {n} | not run: needs about {n} fds, the hard RLIMIT_NOFILE here is {hard} and raising it needs CAP_SYS_RESOURCE | | |")
    if ho["listener"]:
        li = ho["listener"]
        L.append("")
        L.append(f"Listener handoff through the broker (1000 runs): p50 {li['p50_us']:.0f} us, p99 {li['p99_us']:.0f} us, max {li['max_us']:.0f} us.")
    L.append("")
    L.append("### Preconditions (checked, reported, never tuned away)")
    L.append("")
    notes = []
    for way, s in sw.items():
        lg = s.get("loadgen") or {}
        lag = lg.get("send_lag_p99_us")
        cpu = lg.get("client_cpu_pct")
        if cpu is not None and cpu > 80:
            verdict = "client SATURATED (its own CPU): latencies include its slip"
        elif lag is not None and lag > 5000:
            verdict = "client not CPU-bound, but its schedule slipped (the machine is saturated; latencies count from the due time, so they include the slip)"
        else:
            verdict = "client kept its schedule"
        notes.append(f"- switch/{way}: load client CPU {cpu}%, send lag behind schedule p99 {fmt_ms(lag, 2)} ms, max {fmt_ms(lg.get('send_lag_max_us'), 1)} ms "
                     f"-> {verdict}; machine busy {s.get('machine_busy_pct')}%; keep-alive connections seen closed while idle and replaced (not failures): {lg.get('ka_idle_closed_reconnects')}")
    busy = [v["machine_busy_pct"] for v in dp.values() if v.get("machine_busy_pct") is not None]
    wcpu = [v["client_cpu_pct"] for v in dp.values() if v.get("client_cpu_pct") is not None]
    if busy:
        notes.append(f"- data path: machine busy {min(busy):.0f}-{max(busy):.0f}% during wrk runs, wrk's own CPU {min(wcpu):.0f}-{max(wcpu):.0f}% "
                     "(wrk runs at full speed by design: with 2 CPUs client and server share the machine, so ratios compare paths under the same contention)")
    notes.append(f"- load average at start {params.get('loadavg_start')} on {params.get('cpus')} CPUs (other jobs share this host)")
    L.extend(notes)
    L.append("")
    L.append("### Goals")
    L.append("")
    L.append("| goal | measured | met |")
    L.append("|---|---|---|")
    for x in gl:
        verdict = x["met"] if isinstance(x["met"], str) else ("yes" if x["met"] else "**no**")
        L.append(f"| {x['goal']} | {x['measured']} | {verdict} |")
    return "\n".join(L) + "\n"


def svg(sw, dp, sc):
    """Three panels: failed requests per way, data-path ratio, switch time vs services."""
    import math
    W, H = 1120, 340
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"]

    def title(cx, text):
        out.append(f'<text x="{cx}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{text}</text>')

    # Panel 1: failed requests of the project's load client (new connections + keep-alive).
    title(170, "Failed requests during a release switch")
    vals = [(way, sum(s["new_failed"].values()) + sum(s["ka_failed"].values())) for way, s in ((w, sw.get(w)) for w in WAYS) if s]
    top = max([v for _, v in vals] + [1])
    bx, by, bh = 40, 40, 220
    out.append(f'<line x1="{bx}" y1="{by + bh}" x2="{bx + 270}" y2="{by + bh}" stroke="black"/>')
    for i, (way, v) in enumerate(vals):
        h = bh * (v / top) ** 0.5
        x = bx + 15 + i * 65
        out.append(f'<rect x="{x}" y="{by + bh - h:.1f}" width="44" height="{h:.1f}" fill="{colors[i]}"/>')
        out.append(f'<text x="{x + 22}" y="{by + bh - h - 4:.1f}" text-anchor="middle">{v}</text>')
        out.append(f'<text x="{x + 22}" y="{by + bh + 14}" text-anchor="middle">{way}</text>')
    out.append(f'<text x="{bx}" y="{by + bh + 34}" font-size="10">bench_load: new-connection + keep-alive requests;</text>')
    out.append(f'<text x="{bx}" y="{by + bh + 47}" font-size="10">bar height: square root of the count</text>')

    # Panel 2: throughput ratio to direct. Docker's published port is reached by DNAT from
    # the namespace and through docker-proxy from the host: one group.
    x0 = 360
    title(x0 + 190, "Throughput relative to direct (%)")
    groups = [("cutover", {"ns": "cutover", "host": "cutover"}), ("Docker -p", {"ns": "docker-dnat", "host": "docker-proxy"}),
              ("nginx", {"ns": "nginx", "host": "nginx"}), ("HAProxy", {"ns": "haproxy", "host": "haproxy"})]
    series = [("ns", "keepalive"), ("ns", "close"), ("host", "keepalive"), ("host", "close")]
    bx, by, bh, bw = x0 + 40, 40, 220, 330
    scale_top = 160
    out.append(f'<line x1="{bx}" y1="{by + bh}" x2="{bx + bw}" y2="{by + bh}" stroke="black"/>')
    for tick in (0, 50, 100, 150):
        y = by + bh - bh * tick / scale_top
        dash = ' stroke-dasharray="4,3"' if tick == 100 else ""
        out.append(f'<line x1="{bx}" y1="{y:.1f}" x2="{bx + bw}" y2="{y:.1f}" stroke="#bbb"{dash}/>')
        out.append(f'<text x="{bx - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="9">{tick}</text>')
    gw = bw / len(groups)
    for i, (name, by_origin) in enumerate(groups):
        for j, (o, m) in enumerate(series):
            v = dp.get(f"{by_origin[o]}|{o}|{m}")
            if not v or v["ratio"] is None:
                continue
            r = min(v["ratio"] * 100, scale_top)
            h = bh * r / scale_top
            x = bx + i * gw + 6 + j * (gw - 12) / 4
            out.append(f'<rect x="{x:.1f}" y="{by + bh - h:.1f}" width="{(gw - 12) / 4 - 2:.1f}" height="{h:.1f}" fill="{colors[j]}"><title>{by_origin[o]} {o} {m}: {r:.1f}%</title></rect>')
        out.append(f'<text x="{bx + i * gw + gw / 2:.1f}" y="{by + bh + 14}" text-anchor="middle">{name}</text>')
    labels = ["netns, keep-alive", "netns, new conn", "host, keep-alive", "host, new conn"]
    for j, lab in enumerate(labels):
        lx, ly = bx + (j % 2) * 150, by + bh + 26 + (j // 2) * 14
        out.append(f'<rect x="{lx}" y="{ly}" width="8" height="8" fill="{colors[j]}"/><text x="{lx + 11}" y="{ly + 8}" font-size="9">{lab}</text>')

    # Panel 3: switch time vs services, log-log.
    x0 = 770
    title(x0 + 175, "Switch time vs services")
    bx, by, bw, bh = x0 + 55, 40, 270, 220
    so = sc["socket"]
    lines = [("cutover API call", {n: v["median_us"] for n, v in sc["cutover"].items() if v.get("median_us")}, colors[0]),
             ("cutover commit (ACK)", {n: v["commit_us"] for n, v in so.items()}, colors[2]),
             ("iptables-restore -R", {n: v["median_us"] for n, v in sc["iptables_replace1"].items()}, colors[1]),
             ("iptables-restore rewrite", {n: v["median_us"] for n, v in sc["iptables_full"].items()}, colors[3])]
    allv = [v for _, d, _ in lines for v in d.values() if v]
    if allv:
        lo, hi = math.floor(math.log10(min(allv))), math.ceil(math.log10(max(allv)))
        hi = max(hi, lo + 1)
        sx = lambda n: bx + bw * math.log10(n) / 4
        sy = lambda us: by + bh - bh * (math.log10(us) - lo) / (hi - lo)
        out.append(f'<line x1="{bx}" y1="{by + bh}" x2="{bx + bw}" y2="{by + bh}" stroke="black"/><line x1="{bx}" y1="{by}" x2="{bx}" y2="{by + bh}" stroke="black"/>')
        for e in range(lo, hi + 1):
            label = f"{10 ** e / 1000:g} ms" if e >= 3 else f"{10 ** e} us"
            out.append(f'<line x1="{bx}" y1="{sy(10 ** e):.1f}" x2="{bx + bw}" y2="{sy(10 ** e):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{bx - 4}" y="{sy(10 ** e) + 4:.1f}" text-anchor="end" font-size="9">{label}</text>')
        for n in (1, 10, 100, 1000, 10000):
            out.append(f'<text x="{sx(n):.1f}" y="{by + bh + 14}" text-anchor="middle" font-size="9">{n}</text>')
        for k, (name, d, col) in enumerate(lines):
            pts = [(sx(n), sy(v)) for n, v in sorted(d.items()) if v]
            if pts:
                out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
                for x, y in pts:
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>')
            lx, ly = bx + (k % 2) * 140, by + bh + 26 + (k // 2) * 14
            out.append(f'<rect x="{lx}" y="{ly}" width="8" height="8" fill="{col}"/><text x="{lx + 11}" y="{ly + 8}" font-size="9">{name}</text>')
        out.append(f'<text x="{bx + bw / 2}" y="{by + bh + 62}" text-anchor="middle" font-size="9">services registered (log); median time (log)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    try:
        params = json.loads(read("params.json") or "{}")
    except json.JSONDecodeError:
        params = {}
    ev = events()
    sw = switch_part(ev)
    dp = datapath_part()
    sc = scale_part()
    ho = handoff_part()
    gl = goals(sw, dp, sc, ho)
    results = {"params": params, "switch": sw, "datapath": dp, "scale": sc, "handoff": ho, "goals": gl}
    with open(path("results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    t = table(params, sw, dp, sc, ho, gl)
    with open(path("table.md"), "w") as f:
        f.write(t)
    with open(path("chart.svg"), "w") as f:
        f.write(svg(sw, dp, sc))
    print(t)
    # Broken harness: not one of the four parts produced anything.
    if not (sw or dp or sc["cutover"] or ho["connections"]):
        print("report: no results at all; the harness is broken", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
