#!/usr/bin/env python3
"""What seeing every connection costs (issue 21): connection rate with the
connection log on against the same binary with it off (A/B, rounds alternating
so drift on a shared machine hits both alike, medians reported), direct and
through the tunnel; `/api/connections` latency and server RSS per connection
with 10,000 connections open; and whether the log keeps up with a burst of
connections finishing thousands a second (every one logged, none dropped).

    python3 bench/connections.py [--rounds 5] [--conns 2000] [--open 7000] [--burst 7000]
                                 [--no-build] [--binary PATH] [--baseline PATH]

With `--baseline` (a tunneld built from before connections were tracked, e.g.
`git worktree add /tmp/base <commit> && cargo build --release` there), that
binary joins the rounds as "today" and its RSS per open connection is measured
the same way, so the figures read as "over today".

The live table of open connections is always on (it is what /api/connections
reads); what can be switched off is the log, so that is the A/B. The table's
own cost is one hash-map insert and remove per connection under a lock, and
its byte counts are the relay's existing meter calls (no second tally).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process and port helpers)


def build() -> None:
    for argv in (["cargo", "build", "--release"], ["cargo", "build", "--release", "--example", "loadgen"]):
        bench.log(f"$ {' '.join(argv)}")
        if subprocess.run(argv, cwd=bench.REPO).returncode != 0:
            raise bench.BenchError(f"{' '.join(argv)} failed")


def timed_get(url: str) -> float:
    """Milliseconds for one GET, body read."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
    return (time.perf_counter() - start) * 1000


def logged_rows(api: str) -> int:
    with urllib.request.urlopen(api + "/api/connections/log?format=csv&limit=1000000", timeout=60) as resp:
        return len(resp.read().splitlines()) - 1


def dropped(api: str) -> float:
    with urllib.request.urlopen(api + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("tunneld_connection_log_dropped_total "):
                return float(line.split()[1])
    return float("nan")


def hold_rss(procs, loadgen: Path, server, port: int, conns: int) -> tuple[float, int]:
    """Server RSS added per open direct connection (bytes), and how many were open."""
    time.sleep(1.0)
    idle = bench.rss_kib(server.server.pid)["VmRSS"]
    hold = procs.spawn(f"loadgen-hold-{port}", [str(loadgen), "hold", "--target", f"127.0.0.1:{port}", "--conns", str(conns)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = bench.json.loads(hold.stdout.readline())
        time.sleep(1.0)
        held = bench.rss_kib(server.server.pid)["VmRSS"]
    finally:
        hold.stdin.close()
        procs.stop(hold)
    server.wait_drained([port])
    return (held - idle) * 1024 / max(ready["open"], 1), ready["open"]


def settled_rows(api: str, procs, server) -> int:
    """Rows in the log once every connection the server counted is in it."""
    def total() -> int:
        return sum(m["connections_total"] for m in bench.http_json(api + "/api/stats/traffic")["data"]["mappings"])
    bench.wait_until("the log to hold every ended connection", lambda: logged_rows(api) >= total(), procs, server, timeout=60)
    return logged_rows(api)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=2000, help="sequential connections per connrate round")
    ap.add_argument("--open", type=int, default=7000, help="connections held open for the list and memory figures")
    ap.add_argument("--burst", type=int, default=7000, help="simultaneous connections finishing for the log figure")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", type=Path, help="the tunneld to measure (default: target/release/tunneld)")
    ap.add_argument("--baseline", type=Path, help="a tunneld from before connection tracking, as \"today\"")
    args = ap.parse_args()
    if not args.no_build:
        build()
    binary = args.binary or bench.TARGET_DIR / "release" / "tunneld"
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    # tunneld holds two descriptors per direct connection, loadgen and its echo
    # target one each: the whole run stays within one process's limit.
    bench.raise_fd_limit(2 * max(args.open, args.burst) + 2000)
    fd_env = dict(bench.os.environ)

    with tempfile.TemporaryDirectory(prefix="tunneld-connections-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(tmp)
        try:
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target", lambda: bench.listening(echo_port), procs, echo)
            servers = {
                "log on": bench.Tunneld(binary, procs, tmp, fd_env, name="log-on"),
                "log off": bench.Tunneld(binary, procs, tmp, fd_env, name="log-off",
                                         extra_config="[history]\nconnection_log = false\n"),
            }
            if args.baseline:
                servers["today"] = bench.Tunneld(args.baseline, procs, tmp, fd_env, name="today")
            ports = {(label, path): s.map(echo_port, use_tunnel=(path == "tunnel"))
                     for label, s in servers.items() for path in ("direct", "tunnel")}

            bench.log(f"== connection rate: {args.rounds} rounds x {args.conns} sequential connect -> 1-byte echo -> close")
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
            # CPU time per connection of tunneld's processes (server, plus the
            # client through the tunnel), including the log writer's thread: what
            # tracking costs, read off the scheduler rather than off a rate that
            # everything else on a shared machine also moves.
            cpu: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
            off_runtime: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
            for round_no in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer machine.
                order = list(ports) if round_no % 2 == 0 else list(reversed(list(ports)))
                for key in order:
                    label, path = key
                    pids = [servers[label].server.pid] + ([servers[label].client.pid] if path == "tunnel" else [])
                    before = sum(bench.cpu_ns(pid) for pid in pids)
                    threads_before = bench.cpu_ns_by_thread(servers[label].server.pid)
                    res = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[key]}",
                                                      "--count", str(args.conns)], timeout=600)
                    if res["failures"]:
                        raise bench.BenchError(f"{key}: {res['failures']} connections failed: {res['errors']}")
                    # The log writer gathers for 200 ms before it writes: let it.
                    time.sleep(0.5)
                    cpu[key].append((sum(bench.cpu_ns(pid) for pid in pids) - before) / args.conns / 1000)
                    # The server's threads beyond its runtime workers (one per
                    # core, the busiest ones): the log writer's SQLite work runs
                    # there, so this is its cost per connection, measured on its
                    # own rather than as a difference of two noisy totals.
                    threads_after = bench.cpu_ns_by_thread(servers[label].server.pid)
                    used = sorted((ns - threads_before.get(tid, 0) for tid, ns in threads_after.items()), reverse=True)
                    off_runtime[key].append(sum(used[bench.os.cpu_count() or 1:]) / args.conns / 1000)
                    rates[key].append(res["conns_per_s"])
                bench.log(f"round {round_no + 1}: " + ", ".join(
                    f"{k[1]}/{k[0]} {v[-1]:.0f} conn/s {cpu[k][-1]:.1f} µs" for k, v in rates.items()))
            med = {key: statistics.median(v) for key, v in rates.items()}
            med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
            for path in ("direct", "tunnel"):
                on, off = med[("log on", path)], med[("log off", path)]
                line = f"  {path:<7} log on {on:7.0f} conn/s, log off {off:7.0f} conn/s: on/off = {on / off:.3f}"
                if ("today", path) in med:
                    today = med[("today", path)]
                    line += f"; today {today:7.0f} conn/s: on/today = {on / today:.3f}, off/today = {off / today:.3f}"
                bench.log(line)
                on, off = med_cpu[("log on", path)], med_cpu[("log off", path)]
                line = f"  {path:<7} CPU per connection: log on {on:.1f} µs, log off {off:.1f} µs: on/off = {on / off:.3f}"
                if ("today", path) in med_cpu:
                    today = med_cpu[("today", path)]
                    line += f"; today {today:.1f} µs: on/today = {on / today:.3f}, off/today = {off / today:.3f}"
                bench.log(line)
                writer = statistics.median(off_runtime[("log on", path)])
                bench.log(f"  {path:<7} server threads beyond the runtime's workers (the log writer), log on: "
                          f"{writer:.2f} µs per connection = {writer / med_cpu[('log on', path)] * 100:.1f} % of the CPU above")

            for label in [name for name in ("today",) if name in servers]:
                held = hold_rss(procs, loadgen, servers[label], ports[(label, "direct")], args.open)
                bench.log(f"\n== {label}: {held[1]} open direct connections: {held[0]:.0f} bytes of server RSS per connection")

            on = servers["log on"]
            direct = ports[("log on", "direct")]
            bench.log(f"\n== {args.open} open connections on one direct mapping")
            time.sleep(1.0)
            idle = bench.rss_kib(on.server.pid)["VmRSS"]
            hold = procs.spawn("loadgen-hold", [str(loadgen), "hold", "--target", f"127.0.0.1:{direct}", "--conns", str(args.open)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                ready = bench.json.loads(hold.stdout.readline())
                time.sleep(1.0)
                held = bench.rss_kib(on.server.pid)["VmRSS"]
                listed = bench.http_json(on.api + "/api/connections?limit=1")["data"]["count"]
                for limit in (100, 10000):
                    url = f"{on.api}/api/connections?port={direct}&limit={limit}"
                    timed_get(url)
                    times = sorted(timed_get(url) for _ in range(20))
                    bench.log(f"  GET /api/connections?limit={limit}: median {statistics.median(times):.1f} ms, "
                              f"max {times[-1]:.1f} ms (of 20; {listed} open)")
            finally:
                hold.stdin.close()
                procs.stop(hold)
            bench.log(f"  server RSS idle {idle} KiB, with {ready['open']} open {held} KiB: "
                      f"{(held - idle) / max(ready['open'], 1) * 1024:.0f} bytes per connection (everything: socket "
                      f"buffers' bookkeeping, task, relay state and the connection's entry)")
            on.wait_drained([direct])

            bench.log(f"\n== the log under a burst: {args.burst} simultaneous connections, 64 bytes echoed each")
            before = settled_rows(on.api, procs, on.server)
            res = bench.run_loadgen(loadgen, ["concurrent", "--target", f"127.0.0.1:{direct}",
                                              "--conns", str(args.burst), "--bytes", "64"], timeout=600)
            on.wait_drained([direct])
            rows = settled_rows(on.api, procs, on.server) - before
            bench.log(f"  {args.burst} connections finished in {res['elapsed_s']:.2f} s "
                      f"({args.burst / res['elapsed_s']:.0f}/s), {res['failures']} failed; "
                      f"{rows} logged, {dropped(on.api):.0f} dropped")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    bench.entry(main)
