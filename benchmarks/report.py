"""Renders the suite's results (a dict from run.py) as benchmarks/RESULTS.md."""

from __future__ import annotations

import statistics

KIB = 1024
MIB = 1024 * 1024

LABELS = {
    "direct": "direct to the nginx backend",
    "dynapm": "DynaPM",
    "nginx": "nginx reverse proxy",
    "haproxy": "HAProxy",
    "splice": "plain uvloop byte splice",
}


def num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(value, base) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(results: dict) -> str:
    meta = results.get("meta", {})
    items = results.get("items", {})
    out: list[str] = []
    out.append("# DynaPM benchmark results")
    out.append("")
    out.append(
        "Written by `benchmarks/run.py`; do not edit by hand. Absolute numbers "
        "drift between runs and machines: compare the ratios, which were all "
        "measured in this one run."
    )
    out.append("")
    out += render_meta(meta, results.get("load", []))
    out += render_targets(items)
    out += render_http(items.get("1"), "1. Keep-alive GET, 50 connections")
    out += render_http(items.get("2"), "2. New connection per request, 50 connections")
    out += render_stream(items.get("3"))
    out += render_cold(items.get("4"))
    out += render_memory(items.get("5"))
    out += render_spread(items.get("6"))
    out += render_ws(items.get("7"))
    out += render_breakdown(items.get("1"), items.get("9"))
    out += render_issues(results.get("issues", []))
    out += render_rounds(items)
    return "\n".join(out) + "\n"


def render_meta(meta: dict, load: list[dict]) -> list[str]:
    mode = meta.get("mode", {})
    out = ["## Run", ""]
    rows = [
        ["command", f"`{meta.get('command', '?')}`"],
        ["date", meta.get("date", "?")],
        ["mode", f"{mode.get('name', '?')} (items {', '.join(meta.get('items', []))})"],
        ["wall time", f"{meta.get('elapsed_s', '?')} s"],
        ["CPU", f"{meta.get('cpu', '?')}, {meta.get('cpus', '?')} CPUs"],
        ["kernel", meta.get("kernel", "?")],
        ["hot path build", meta.get("build", "?")],
        [
            "software",
            f"DynaPM {meta.get('dynapm_version', '?')}, Python "
            f"{meta.get('python', '?')}, uvloop {meta.get('uvloop', '?')}, "
            f"httptools {meta.get('httptools', '?')}",
        ],
        [
            "peers",
            f"{meta.get('nginx', '?')}; {meta.get('haproxy', '?')}; "
            f"{meta.get('wrk', '?')}",
        ],
        [
            "CPU placement",
            f"every proxy (DynaPM, nginx, HAProxy, splice) and every cold-started "
            f"service on CPU {meta.get('proxy_cpu', '?')}; wrk, the other clients, "
            f"the nginx backend, the upload sink and the WebSocket echo server on "
            f"CPU {meta.get('client_cpu', '?')}",
        ],
        [
            "rounds",
            f"{mode.get('rounds', '?')} interleaved rounds of "
            f"{mode.get('seconds', '?')} s per wrk figure (median reported); "
            f"streaming {mode.get('stream_rounds', '?')} rounds; "
            f"{mode.get('cold_samples', '?')} cold starts",
        ],
        ["RLIMIT_NOFILE", str(meta.get("nofile", "?"))],
    ]
    out += table(["", ""], rows)
    out.append("")
    out.append(
        "Load average (1, 5, 15 min) during the run. The machine is shared: "
        "other work running at the same time lowers every figure of a round "
        "alike, which interleaving spreads over all paths, but it widens the ranges."
    )
    out.append("")
    out += table(["at", "load average"], [[e["at"], e["loadavg"]] for e in load])
    out.append("")
    peak = max((float(e["loadavg"].split()[0]) for e in load), default=0.0)
    cpus = meta.get("cpus") or 1
    if peak > cpus / 2:
        out.append(
            f"**The machine was busy:** the 1-minute load average reached "
            f"{peak:.2f} on {cpus} CPUs, so other work competed with the "
            "processes measured here (see the *waiting* columns). Treat small "
            "differences as noise and prefer the CPU-time-per-request ratios."
        )
        out.append("")
    return out


def render_targets(items: dict) -> list[str]:
    rows = []

    def add(name: str, measured: str, goal: str, holds) -> None:
        verdict = "-" if holds is None else ("yes" if holds else "**no**")
        rows.append([name, measured, goal, verdict])

    keepalive = items.get("1", {})
    one = keepalive.get("summary", {})
    dyn, ngx = one.get("dynapm"), one.get("nginx")
    if dyn and ngx:
        # The verdict follows the paired ratios (see item 1); the ratio of
        # the medians is shown beside them.
        rps = paired(keepalive, "dynapm", "rps")
        p99 = paired(keepalive, "dynapm", "p99_ms")
        add(
            "keep-alive throughput vs nginx",
            f"{rps:.2f}x paired by round (ratio of medians "
            f"{ratio(dyn['rps'], ngx['rps'])})",
            ">= 1.0x",
            rps >= 1.0,
        )
        add(
            "keep-alive p99 vs nginx",
            f"{p99:.2f}x paired by round (medians {num(dyn['p99_ms'], 2)} ms "
            f"vs {num(ngx['p99_ms'], 2)} ms)",
            "no worse",
            p99 <= 1.0,
        )
    cold = items.get("4", {}).get("summary", {})
    for key, name in (
        ("gateway", "cold-start overhead (median, boot-corrected), default probe"),
        ("gateway1", "the same, service probed every 1 ms (`interval: 1ms`)"),
    ):
        entry = cold.get(key)
        if entry and entry.get("corrected_overhead_ms") is not None:
            direct = cold.get("direct", {})
            phases = [
                f"{label} {entry[field] - direct[field]:+.2f} ms"
                for label, field in (("launch", "launch_ms"), ("answer", "answer_ms"))
                if entry.get(field) is not None and direct.get(field) is not None
            ]
            add(
                name,
                f"{num(entry['corrected_overhead_ms'], 2)} ms (difference of "
                f"medians: {num(entry['overhead_ms'], 2)} ms)"
                + (
                    f"; against the direct boot: {', '.join(phases)} (item 4)"
                    if phases
                    else ""
                ),
                "<= 5 ms",
                entry["corrected_overhead_ms"] <= 5,
            )
    streams = items.get("3", {})
    stream = streams.get("summary", {})
    for direction in ("download", "upload"):
        by_kind = stream.get(direction, {})
        dyn, ngx = by_kind.get("dynapm"), by_kind.get("nginx")
        if dyn and ngx:
            # Paired by round as item 1 (decided before the run that first
            # used it; see benchmarks/README.md).
            both = paired(
                {"rounds": streams.get("rounds", {}).get(direction, {})},
                "dynapm",
                "mib_s",
            )
            add(
                f"{direction} throughput vs nginx",
                f"{both:.2f}x paired by round (ratio of medians "
                f"{ratio(dyn['mib_s'], ngx['mib_s'])})",
                ">= 0.8x",
                both >= 0.8,
            )
        if dyn and "growth_hwm_kib" in dyn:
            add(
                f"{direction}: DynaPM RSS growth (peak - before)",
                f"{num(dyn['growth_hwm_kib'] / KIB, 1)} MiB",
                "< 16 MiB",
                dyn["growth_hwm_kib"] < 16 * KIB,
            )
    memory = items.get("5", {}).get("summary", {})
    idle = memory.get("idle_1000")
    if idle:
        add(
            "idle RSS, 1,000 services",
            f"{num(idle['rss_kib'] / KIB, 1)} MiB",
            "<= 40 MiB",
            idle["rss_kib"] <= 40 * KIB,
        )
    conn = memory.get("connections", {}).get("dynapm")
    if conn and conn.get("bytes_per_connection") is not None:
        add(
            "RSS per idle keep-alive connection",
            f"{num(conn['bytes_per_connection'] / KIB, 2)} KiB",
            "<= 4 KiB",
            conn["bytes_per_connection"] <= 4 * KIB,
        )
    spread = items.get("6")
    if spread:
        summary = spread.get("summary", {})
        many, one_service = summary.get(str(spread["services"])), summary.get("1")
        if many and one_service:
            both = paired(spread, str(spread["services"]), "rps", base="1")
            add(
                f"{spread['services']} services spread vs one",
                f"{both:.2f}x paired by round (ratio of medians "
                f"{ratio(many['rps'], one_service['rps'])})",
                ">= 0.9x",
                both >= 0.9,
            )
    out = ["## Targets of issue 4", ""]
    if not rows:
        return out + ["No target was measured in this run.", ""]
    out += table(["target", "measured", "goal", "holds"], rows)
    out.append("")
    return out


def render_http(item: dict | None, title: str) -> list[str]:
    out = [f"## {title}", ""]
    if not item:
        return out + ["Not run.", ""]
    summary = item["summary"]
    out.append(
        "wrk -t1 -c50 --latency with headers "
        + ", ".join(f"`{h}`" for h in item["headers"])
        + "; the backend answers `GET /` with a 19-byte body. Requests/s and "
        "latencies are medians over the rounds; range is min-max of requests/s."
    )
    if any("close" in header.lower() for header in item["headers"]):
        out.append("")
        out.append(
            "The splice opens a backend connection for every client connection, "
            "so here it pays two connection setups per request; DynaPM, nginx "
            "and HAProxy reuse pooled upstream connections."
        )
    out.append("")
    base = summary.get("nginx", {})
    splice = summary.get("splice", {})
    rows = []
    for kind in ("direct", "dynapm", "nginx", "haproxy", "splice"):
        entry = summary.get(kind)
        if not entry:
            continue
        rows.append(
            [
                LABELS[kind],
                num(entry["rps"]),
                f"{num(entry['rps_min'])}-{num(entry['rps_max'])}",
                num(entry["p50_ms"], 2),
                num(entry["p99_ms"], 2),
                ratio(entry["rps"], base.get("rps")),
                ratio(entry["p99_ms"], base.get("p99_ms")),
                ratio(entry["rps"], splice.get("rps")),
                f"{num(entry['errors'])} / {num(entry['requests'])}",
            ]
        )
    out += table(
        [
            "path",
            "req/s",
            "range",
            "p50 ms",
            "p99 ms",
            "req/s vs nginx",
            "p99 vs nginx",
            "req/s vs splice",
            "errors / requests",
        ],
        rows,
    )
    out.append("")
    out += render_cpu(summary)
    out += render_paired(item)
    return out


def paired(item: dict, kind: str, field: str, base: str = "nginx") -> float | None:
    """Median over rounds of kind's figure divided by base's in the same round.

    Each round measures every path back to back, so a change in the machine's
    load between rounds (which moves every path of a round alike) cancels out
    of these ratios; a ratio of medians keeps it.
    """
    ours = item.get("rounds", {}).get(kind, [])
    theirs = item.get("rounds", {}).get(base, [])
    ratios = [
        a[field] / b[field]
        for a, b in zip(ours, theirs, strict=False)
        if a.get(field) is not None and b.get(field)
    ]
    return statistics.median(ratios) if ratios else None


def render_paired(item: dict) -> list[str]:
    rows = []
    for kind in ("dynapm", "haproxy", "splice"):
        figures = [paired(item, kind, field) for field in ("rps", "p99_ms", "cpu_us")]
        if all(value is None for value in figures):
            continue
        rows.append(
            [LABELS[kind]]
            + [f"{value:.2f}x" if value is not None else "-" for value in figures]
        )
    if not rows:
        return []
    out = [
        "Paired by round: every round measures all paths back to back, so "
        "the median over rounds of each round's ratio to nginx cancels the "
        "drift of the machine's load between rounds, which the ratios of "
        "medians above keep.",
        "",
    ]
    out += table(
        ["proxy", "req/s vs nginx", "p99 vs nginx", "CPU us / request vs nginx"],
        rows,
    )
    out.append("")
    return out


def render_cpu(summary: dict) -> list[str]:
    """CPU time of the proxy process per request, from its schedstat."""
    base = summary.get("nginx", {})
    splice = summary.get("splice", {})
    rows = []
    for kind in ("dynapm", "nginx", "haproxy", "splice"):
        entry = summary.get(kind)
        if not entry or entry.get("cpu_us") is None:
            continue
        rows.append(
            [
                LABELS[kind],
                num(entry["cpu_us"], 1),
                ratio(entry["cpu_us"], base.get("cpu_us")),
                ratio(entry["cpu_us"], splice.get("cpu_us")),
                num(entry.get("user_us"), 1),
                num(entry.get("system_us"), 1),
                f"{entry['cpu_share'] * 100:.0f}%",
                f"{entry['wait_share'] * 100:.0f}%",
            ]
        )
    if not rows:
        return []
    out = [
        "CPU time of the proxy process per request (from "
        "`/proc/PID/task/*/schedstat`, so it includes the kernel work of its "
        "system calls): less sensitive to other load on the machine than "
        "requests/s. *User* and *kernel* split it as `/proc/PID/stat` counts "
        "it (utime and stime, 10 ms ticks, so they need not add up exactly). "
        "*Busy* is its CPU time over the wall time of the run; "
        "*waiting* is the time it was runnable but another task held its CPU.",
        "",
    ]
    out += table(
        [
            "proxy",
            "CPU us / request",
            "vs nginx",
            "vs splice",
            "user us",
            "kernel us",
            "busy",
            "waiting",
        ],
        rows,
    )
    out.append("")
    return out


def render_stream(item: dict | None) -> list[str]:
    out = ["## 3. Streaming", ""]
    if not item:
        return out + ["Not run.", ""]
    size = item["bytes"] // MIB
    out.append(
        f"One {size} MiB body per measurement, through a proxy process started "
        "for that measurement alone, so its VmHWM (peak RSS) belongs to it. "
        "Download: GET of a file the nginx backend serves with sendfile. "
        "Upload: POST with Content-Length to a sink that answers after the "
        "last byte. The client is one blocking Python socket reading or "
        "writing 1 MiB at a time. *Before* is VmRSS after one small warm-up "
        "request; *growth* is the largest over the rounds of (VmRSS sampled "
        "every 20 ms, or VmHWM) minus *before*."
    )
    out.append("")
    for direction in ("download", "upload"):
        summary = item["summary"].get(direction, {})
        base = summary.get("nginx", {})
        by_round = {"rounds": item.get("rounds", {}).get(direction, {})}
        rows = []
        for kind in ("direct", "dynapm", "nginx", "haproxy", "splice"):
            entry = summary.get(kind)
            if not entry:
                continue
            has_rss = "rss_before_kib" in entry
            both = paired(by_round, kind, "mib_s")
            rows.append(
                [
                    LABELS[kind],
                    num(entry["mib_s"]),
                    ratio(entry["mib_s"], base.get("mib_s")),
                    f"{both:.2f}x" if both is not None else "-",
                    num(entry["rss_before_kib"] / KIB, 1) if has_rss else "-",
                    num(entry["growth_sampled_kib"] / KIB, 1) if has_rss else "-",
                    num(entry["growth_hwm_kib"] / KIB, 1) if has_rss else "-",
                    num(entry["hwm_kib"] / KIB, 1) if has_rss else "-",
                ]
            )
        out.append(f"**{direction}**")
        out.append("")
        out += table(
            [
                "path",
                "MiB/s",
                "vs nginx",
                "paired by round",
                "RSS before MiB",
                "growth (sampled) MiB",
                "growth (VmHWM) MiB",
                "VmHWM MiB",
            ],
            rows,
        )
        out.append("")
    return out


def render_cold(item: dict | None) -> list[str]:
    out = ["## 4. Cold-start overhead", ""]
    if not item:
        return out + ["Not run.", ""]
    summary = item["summary"]
    count = len(item["samples"]["direct"])
    out.append(
        "The service is `peers/tinyapp.py` (a small HTTP server on `socket` and "
        "`selectors`, started with `python3 -I -S`), configured as a `run:` "
        "service with the default tcp readiness probe and stopped by "
        "`idle_timeout: 200ms` between samples. *Without the gateway*: the "
        "harness spawns the same command with `bash -c` on the proxy CPU and "
        "polls it every 0.5 ms until it answers a GET; the figure is spawn to "
        "first byte. *Through DynaPM*: a GET for the offline service, send to "
        f"first byte. {count} interleaved samples of each. The 1 ms rows are "
        "the same service probed with `health: {type: tcp, interval: 1ms}`. "
        "Medians over the samples, column by column (so the phases need not "
        "add up to the total exactly)."
    )
    out.append("")
    out.append(
        "The service stamps the wall-clock time at which the launching bash "
        "ran its command (`$EPOCHREALTIME`) and the time it was listening, and "
        "sends both back in its answer. That splits each sample into *launch* "
        "(request sent, or harness spawn, to bash running the command), the "
        "service's *own boot* (to listening) and *answer* (listening to the "
        "first byte at the client: readiness probe, connect, forwarding). "
        "*Residual* is the time to first byte minus the own boot. The "
        "boot-corrected overhead is the gateway's median residual minus the "
        "direct median residual: it cancels the noise of the boot itself, "
        "which on a busy machine can be larger than the overhead. The service "
        "inherits the gateway's CPU, so the gateway's probing competes with it "
        "while it boots: the own-boot column shows that cost, which the "
        "difference of medians includes and the boot-corrected figure does not."
    )
    out.append("")
    rows = []
    for key, label in (
        ("direct", "without the gateway"),
        ("gateway", "through DynaPM (default probe, 10 ms)"),
        ("gateway1", "through DynaPM (probe interval 1 ms)"),
    ):
        entry = summary.get(key, {})
        rows.append(
            [
                label,
                num(entry.get("median_ms"), 2),
                num(entry.get("p90_ms"), 2),
                num(entry.get("launch_ms"), 2),
                num(entry.get("own_boot_ms"), 2),
                num(entry.get("answer_ms"), 2),
                num(entry.get("residual_ms"), 2),
                num(entry.get("overhead_ms"), 2),
                num(entry.get("corrected_overhead_ms"), 2),
            ]
        )
    out += table(
        [
            "path",
            "to first byte, median ms",
            "p90 ms",
            "launch ms",
            "own boot ms",
            "answer ms",
            "residual ms",
            "overhead: difference of medians ms",
            "overhead: boot-corrected ms",
        ],
        rows,
    )
    out.append("")
    direct, ten, one = (
        summary.get(key, {}) for key in ("direct", "gateway", "gateway1")
    )
    if all(
        entry.get(field) is not None
        for entry in (direct, ten, one)
        for field in ("answer_ms", "launch_ms")
    ):
        out.append(
            "Where the default probe's overhead comes from: once the service "
            "listens, the answer waits for the next probe, up to one interval "
            "(10 ms by default, as the contract sets it; 5 ms on average when "
            "the service gets ready at a random moment between two probes, "
            "more or less when its boot time is as steady as this one's and "
            "so falls at about the same point of the probe schedule every "
            "time). The answer phase here: "
            f"{num(ten['answer_ms'], 2)} ms with the 10 ms probe, "
            f"{num(one['answer_ms'], 2)} ms with the 1 ms probe, "
            f"{num(direct['answer_ms'], 2)} ms without the gateway (the harness "
            "polls every 0.5 ms); beyond the wait it holds the probe's own "
            "connect, the request's connect and its forwarding. The other part "
            "of the overhead is launch: "
            f"{num(ten['launch_ms'] - direct['launch_ms'], 2)} ms more than the "
            "harness's own spawn (reading and routing the request, the start "
            "task and the gateway's spawn of bash)."
        )
        out.append("")
    return out


def render_memory(item: dict | None) -> list[str]:
    out = ["## 5. Memory", ""]
    if not item:
        return out + ["Not run.", ""]
    summary = item["summary"]
    out.append(
        "Idle: VmRSS of a gateway one second after it started listening, with "
        "1 and with 1,000 configured `run:` services (all offline, never "
        "started)."
    )
    out.append("")
    rows = []
    for count in (1, 1000):
        entry = summary.get(f"idle_{count}")
        if entry:
            rows.append(
                [
                    f"{count:,}",
                    num(entry["rss_kib"] / KIB, 1),
                    num(entry["hwm_kib"] / KIB, 1),
                ]
            )
    out += table(["services", "VmRSS MiB", "VmHWM MiB"], rows)
    out.append("")
    out.append(
        "Idle keep-alive connections: a separate client process "
        "(`peers/holdconns.py`, non-blocking sockets, at most 64 requests in "
        "flight so the upstream pools stay small) opens the connections, makes "
        "one GET on each and keeps them all open. The extra RSS is the "
        "proxy's VmRSS with them open minus its VmRSS after a 200-connection "
        "warm-up that was closed again, divided by the connections open. For "
        "nginx the worker process is measured; nginx allocates its "
        "`worker_connections` array at start, which is not in the difference."
    )
    out.append("")
    rows = []
    connections = summary.get("connections", {})
    for kind in ("dynapm", "nginx", "haproxy"):
        entry = connections.get(kind)
        if not entry:
            continue
        per = entry["bytes_per_connection"]
        rows.append(
            [
                LABELS[kind],
                f"{entry['opened']:,}",
                str(entry["failed"]),
                num(entry["rss_before_kib"] / KIB, 1),
                num(entry["rss_after_kib"] / KIB, 1),
                num(per / KIB, 2) if per is not None else "-",
            ]
        )
    out += table(
        [
            "proxy",
            "connections open",
            "failed",
            "VmRSS before MiB",
            "VmRSS with them MiB",
            "KiB per connection",
        ],
        rows,
    )
    out.append("")
    return out


def render_spread(item: dict | None) -> list[str]:
    out = ["## 6. Spread over many services", ""]
    if not item:
        return out + ["Not run.", ""]
    services = item["services"]
    summary = item["summary"]
    out.append(
        f"One gateway with {services} `proxy_only` services (s0 .. s{services - 1}) "
        "in front of the same nginx backend. wrk -t1 -c50 runs `conf/spread.lua`, "
        "which sends each request to the next Host of the list; the one-service "
        "figure uses the same script with a list of one."
    )
    out.append("")
    base = summary.get("1", {})
    rows = []
    for key in ("1", str(services)):
        entry = summary.get(key)
        if not entry:
            continue
        rows.append(
            [
                key,
                num(entry["rps"]),
                f"{num(entry['rps_min'])}-{num(entry['rps_max'])}",
                num(entry["p50_ms"], 2),
                num(entry["p99_ms"], 2),
                ratio(entry["rps"], base.get("rps")),
                f"{both:.2f}x"
                if (both := paired(item, key, "rps", base="1")) is not None
                else "-",
                num(entry.get("cpu_us"), 1),
                f"{num(entry['errors'])} / {num(entry['requests'])}",
            ]
        )
    out += table(
        [
            "services",
            "req/s",
            "range",
            "p50 ms",
            "p99 ms",
            "vs one service",
            "paired by round",
            "DynaPM CPU us / request",
            "errors / requests",
        ],
        rows,
    )
    out.append("")
    return out


def render_ws(item: dict | None) -> list[str]:
    out = ["## 7. WebSocket echo", ""]
    if not item:
        return out + ["Not run.", ""]
    if "skipped" in item:
        return out + [f"Skipped: {item['skipped']}", ""]
    summary = item["summary"]
    out.append(
        f"{item['connections']} connections (picows client and picows echo "
        f"server, both on the client CPU), each sending a {item['size']}-byte "
        "binary message and waiting for its echo before the next. Messages/s "
        "is round trips per second over all connections; latencies are round "
        "trips. DynaPM is reached on its dedicated port."
    )
    out.append("")
    base = summary.get("nginx", {})
    rows = []
    for kind in ("direct", "dynapm", "nginx", "haproxy", "splice"):
        entry = summary.get(kind)
        if not entry:
            continue
        rows.append(
            [
                LABELS[kind].replace("nginx backend", "echo server"),
                num(entry["msgs_s"]),
                num(entry["p50_ms"], 3),
                num(entry["p99_ms"], 3),
                ratio(entry["msgs_s"], base.get("msgs_s")),
            ]
        )
    out += table(["path", "messages/s", "p50 ms", "p99 ms", "vs nginx"], rows)
    out.append("")
    return out


def render_breakdown(keepalive: dict | None, item: dict | None) -> list[str]:
    """Where DynaPM's CPU time per keep-alive request goes, beside nginx."""
    out = ["## 9. Where the time per request goes", ""]
    summary = (keepalive or {}).get("summary", {})
    dyn, ngx, splice = (summary.get(k) for k in ("dynapm", "nginx", "splice"))
    if dyn and ngx and dyn.get("user_us") is not None:
        out.append(
            "From item 1 (keep-alive), CPU time per request split into user "
            "space and kernel:"
        )
        out.append("")
        rows = []
        for kind, entry in (("dynapm", dyn), ("nginx", ngx), ("splice", splice)):
            if entry and entry.get("user_us") is not None:
                rows.append(
                    [
                        LABELS[kind],
                        num(entry["user_us"], 1),
                        num(entry["system_us"], 1),
                        num(entry["cpu_us"], 1),
                    ]
                )
        out += table(["proxy", "user us", "kernel us", "total us (schedstat)"], rows)
        out.append("")
        out.append(
            f"Per request, DynaPM spends {num(dyn['user_us'], 1)} us in user "
            f"space (nginx {num(ngx['user_us'], 1)} us) and "
            f"{num(dyn['system_us'], 1)} us in the kernel (nginx "
            f"{num(ngx['system_us'], 1)} us). Every proxy here makes the same "
            "four system calls per exchange (read the request, write it "
            "upstream, read the response, write it back), so the kernel parts "
            "are alike and the difference between proxies is mostly user "
            "space: for DynaPM, the interpreter and the hot path below."
        )
        out.append("")
    if not item:
        return out + ["Instruction counts were not measured in this run.", ""]
    if "skipped" in item:
        return out + [f"Instruction counts: skipped ({item['skipped']}).", ""]
    out.append(
        f"User space by component: callgrind instructions per exchange "
        f"({num(item['total'])} in all) for the micro-benchmark exchange of "
        "`benchmarks/test_micro.py` (a small GET and its 19-byte response "
        "through a Downstream and a pooled Upstream over fake transports; "
        "their Python `write` methods stand in for uvloop's C write and "
        "account for most of the CPython bytecode row). Reproduce with "
        "`python benchmarks/instructions.py`."
    )
    out.append("")
    total = item["total"] or 1
    out += table(
        ["component", "instructions / exchange", "share"],
        [
            [name, num(value), f"{value / total * 100:.0f}%"]
            for name, value in item["groups"]
            if value >= 0.5
        ],
    )
    out.append("")
    out.append("The functions with the largest own cost:")
    out.append("")
    out += table(
        ["instructions / exchange", "function"],
        [[num(value), f"`{name[:100]}`"] for name, value in item["top"]],
    )
    out.append("")
    return out


def render_issues(issues: list[dict]) -> list[str]:
    out = ["## Problems seen during the run", ""]
    if not issues:
        return out + [
            "None: no wrk errors or non-2xx answers, no failed transfer, "
            "no error or warning in the gateway logs, every DynaPM exited 0.",
            "",
        ]
    for entry in issues:
        text = entry["text"].replace("\n", "\n    ")
        out.append(f"- item {entry['item']}: {text}")
    out.append("")
    return out


def render_rounds(items: dict) -> list[str]:
    out = ["## Appendix: per-round values", ""]
    for key in ("1", "2", "6"):
        item = items.get(key)
        if not item:
            continue
        out.append(f"Item {key}, requests/s per round:")
        out.append("")
        for kind, records in item["rounds"].items():
            values = ", ".join(num(r["rps"]) for r in records)
            name = LABELS.get(kind, f"{kind} service" + ("" if kind == "1" else "s"))
            out.append(f"- {name}: {values}")
        out.append("")
    stream = items.get("3")
    if stream:
        out.append("Item 3, MiB/s per round:")
        out.append("")
        for direction, by_kind in stream["rounds"].items():
            for kind, records in by_kind.items():
                values = ", ".join(num(r["mib_s"]) for r in records)
                out.append(f"- {direction}, {LABELS[kind]}: {values}")
        out.append("")
    cold = items.get("4")
    if cold:
        out.append("Item 4, milliseconds per sample:")
        out.append("")
        names = {
            "direct": "without the gateway",
            "gateway": "through DynaPM",
            "gateway1": "through DynaPM, 1 ms probe",
        }
        for key, values in cold["samples"].items():
            out.append(
                f"- {names.get(key, key)}, to first byte: "
                + ", ".join(num(v, 2) for v in values)
            )
            boots = [p.get("boot") for p in cold.get("phases", {}).get(key, [])]
            if any(boot is not None for boot in boots):
                out.append(
                    f"- {names.get(key, key)}, own boot: "
                    + ", ".join(num(v, 2) for v in boots)
                )
        out.append("")
    ws = items.get("7")
    if ws and "rounds" in ws:
        out.append("Item 7, messages/s per round:")
        out.append("")
        for kind, records in ws["rounds"].items():
            label = LABELS[kind].replace("nginx backend", "echo server")
            out.append(f"- {label}: " + ", ".join(num(r["msgs_s"]) for r in records))
        out.append("")
    return out
