#!/usr/bin/env python3
"""What seeing every connection costs (issue 21): connection rate with the
connection log on against the same binary with it off (A/B, rounds alternating
so drift on a shared machine hits both alike, medians reported), direct and
through the tunnel; `/api/connections` latency and server RSS per connection
with 10,000 connections open; and whether the log keeps up with a burst of
connections finishing thousands a second (every one logged, none dropped).

    python3 bench/connections.py [--rounds 5] [--conns 3000] [--open 10000] [--burst 20000] [--no-build]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=3000, help="sequential connections per connrate round")
    ap.add_argument("--open", type=int, default=10000, help="connections held open for the list and memory figures")
    ap.add_argument("--burst", type=int, default=20000, help="simultaneous connections finishing for the log figure")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build()
    binary = bench.TARGET_DIR / "release" / "tunneld"
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    bench.raise_fd_limit(4 * max(args.open, args.burst) + 1000)
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
            ports = {(label, path): s.map(echo_port, use_tunnel=(path == "tunnel"))
                     for label, s in servers.items() for path in ("direct", "tunnel")}

            bench.log(f"== connection rate: {args.rounds} rounds x {args.conns} sequential connect -> 1-byte echo -> close")
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
            for round_no in range(args.rounds):
                # Alternate which goes first, so neither always runs on a warmer machine.
                order = list(ports) if round_no % 2 == 0 else list(reversed(list(ports)))
                for key in order:
                    res = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[key]}",
                                                      "--count", str(args.conns)], timeout=600)
                    if res["failures"]:
                        raise bench.BenchError(f"{key}: {res['failures']} connections failed: {res['errors']}")
                    rates[key].append(res["conns_per_s"])
                bench.log(f"round {round_no + 1}: " + ", ".join(f"{k[1]}/{k[0]} {v[-1]:.0f}" for k, v in rates.items()) + " conn/s")
            med = {key: statistics.median(v) for key, v in rates.items()}
            for path in ("direct", "tunnel"):
                on, off = med[("log on", path)], med[("log off", path)]
                bench.log(f"  {path:<7} log on {on:7.0f} conn/s, log off {off:7.0f} conn/s: on/off = {on / off:.3f}")

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
            before = logged_rows(on.api)
            res = bench.run_loadgen(loadgen, ["concurrent", "--target", f"127.0.0.1:{direct}",
                                              "--conns", str(args.burst), "--bytes", "64"], timeout=600)
            on.wait_drained([direct])
            bench.wait_until("the log to catch up", lambda: logged_rows(on.api) - before >= args.burst - res["failures"],
                             procs, on.server, timeout=60)
            rows = logged_rows(on.api) - before
            bench.log(f"  {args.burst} connections finished in {res['elapsed_s']:.2f} s "
                      f"({args.burst / res['elapsed_s']:.0f}/s), {res['failures']} failed; "
                      f"{rows} logged, {dropped(on.api):.0f} dropped")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    bench.entry(main)
