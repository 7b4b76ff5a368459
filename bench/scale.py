#!/usr/bin/env python3
"""What a mapping costs when there are many (issue 24, part 5): memory per idle
direct mapping, and how long `/metrics` and `/api/stats/traffic` take with N of them.

Per round and binary: a fresh server (no client, state on /dev/shm), READY=1,
RSS settled; N direct mappings created through the API (to one target that is
never dialed); RSS settled again, and glibc's heap in use (through gdb, when it is
installed) at both moments; then `/metrics` and `/api/stats/traffic` are each
fetched `--scrapes` times (alternating), timed from the request to the last byte.

    python3 bench/scale.py [--mappings 500,2000] [--rounds 2] [--scrapes 20]
                           [--binary NAME=PATH ...] [--no-build] [--heap] [--hold CONNS]

`--hold CONNS` (the scale run) then opens CONNS connections at once, round-robin
over the mappings, each echoing 100 bytes through an asyncio echo target in a
process of its own, and holds them: RSS and the two timings again meanwhile;
then closes them all and checks that the traffic totals grew by exactly
CONNS x 100 bytes each way.

With several `--binary`, the rounds alternate between them in one run, so their
ratios are taken on the same machine load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clients as clients_bench  # noqa: E402  (gdb's heap reading, settle)
import run as bench  # noqa: E402  (the harness's process and port helpers)


class Api:
    """One keep-alive HTTP connection to the server's API."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[bytes, float]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            start = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed the idle keep-alive connection: once more on a new one.
                self.conn.close()
                if attempt == 2:
                    raise
        elapsed = (time.perf_counter() - start) * 1000
        if resp.status != 200:
            raise bench.BenchError(f"{method} {path}: {resp.status} {payload[:300]!r}")
        return payload, elapsed


ECHO = """
import asyncio, sys
async def serve(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def echo_target(procs: bench.Children):
    """An asyncio echo server in a process of its own (its descriptors are not the bench's)."""
    port = bench.free_port()
    proc = procs.spawn(f"echo-{port}", [sys.executable, "-c", ECHO, str(port)])
    bench.wait_until("the echo target", lambda: bench.listening(port), procs, proc)
    return port, proc


async def hold(ports: list[int], conns: int, payload: int) -> tuple[list, int]:
    """Opens `conns` connections round-robin over `ports` (in waves, so the
    accept queues do not overflow), echoes `payload` bytes on each, and
    returns them open with the number that failed."""
    import asyncio
    opened, failed = [], 0
    sem = asyncio.Semaphore(256)

    async def one(port: int):
        nonlocal failed
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                writer.write(b"x" * payload)
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(payload), 30)
                if got != b"x" * payload:
                    raise ValueError("echo differs")
                opened.append((reader, writer))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                failed += 1

    await asyncio.gather(*(one(ports[i % len(ports)]) for i in range(conns)))
    return opened, failed


def held_run(client: "Api", proc, procs: bench.Children, ports: list[int], conns: int, scrapes: int) -> dict:
    """`conns` connections open at once over the mappings: RSS, scrape and
    report times meanwhile, then every one closed and the counters checked."""
    import asyncio
    payload = 100
    loop = asyncio.new_event_loop()
    before_totals = json.loads(client.request("GET", "/api/stats/traffic")[0])["data"]
    start = time.perf_counter()
    opened, failed = loop.run_until_complete(hold(ports, conns, payload))
    open_s = time.perf_counter() - start
    rss = clients_bench.settle(proc.pid)
    times: dict[str, list[float]] = {"/metrics": [], "/api/stats/traffic": []}
    for _ in range(scrapes):
        for path in times:
            times[path].append(client.request("GET", path)[1])
    active = json.loads(client.request("GET", "/api/stats/traffic")[0])["data"]["active_connections"]
    for _, writer in opened:
        writer.close()
    loop.run_until_complete(asyncio.sleep(0.1))
    loop.close()
    bench.wait_until("every connection closed",
                     lambda: json.loads(client.request("GET", "/api/stats/traffic")[0])["data"]["active_connections"] == 0,
                     procs, proc, timeout=60)
    after_totals = json.loads(client.request("GET", "/api/stats/traffic")[0])["data"]
    moved = {k: after_totals[k] - before_totals[k] for k in ("total_sent", "total_received")}
    want = (conns - failed) * payload
    return {
        "held": len(opened), "failed": failed, "open_s": open_s, "active_seen": active,
        "rss_held_kib": rss["VmRSS"], "hwm_kib": clients_bench.status_kib(proc.pid).get("VmRSS"),
        "metrics_held_median_ms": statistics.median(times["/metrics"]), "metrics_held_max_ms": max(times["/metrics"]),
        "traffic_held_median_ms": statistics.median(times["/api/stats/traffic"]),
        "traffic_held_max_ms": max(times["/api/stats/traffic"]),
        "bytes_moved": moved, "bytes_expected": want, "counts_exact": moved["total_sent"] == want == moved["total_received"],
    }


def measure(binary: Path, n: int, scrapes: int, heap: bool, tmpdir: Path, procs: bench.Children, label: str,
            conns: int = 0) -> dict:
    state = Path(tempfile.mkdtemp(prefix="tunneld-scale-", dir="/dev/shm"))
    config = tmpdir / f"{label}.toml"
    config.write_text('[server]\nbind_addr = "127.0.0.1"\n')
    api = f"http://127.0.0.1:{bench.free_port()}"
    notify = bench.Notify(tmpdir / f"{label}.notify")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TUNNELD_")}
    env.update(RUST_LOG="warn", NOTIFY_SOCKET=str(notify.path))
    proc = procs.spawn(label, [
        str(binary), "server", "--config", str(config), "--api-listen", api.removeprefix("http://"),
        "--tunnel-listen", f"127.0.0.1:{bench.free_port()}", "--state-dir", str(state), "--secret", "bench-secret",
    ], env=env)
    try:
        notify.wait("READY=1", procs, proc, timeout=60)
        client = Api(api)
        client.request("GET", "/metrics")  # the code paths touched once before the baseline
        client.request("GET", "/api/stats/traffic")
        before = clients_bench.settle(proc.pid)
        heap_before = clients_bench.heap_in_use(procs, proc) if heap else None
        target, echo = echo_target(procs)  # dialed only by the held connections (`--hold`)
        created, ports = 0, []
        while created < n:
            port = bench.free_port()
            try:
                client.request("POST", "/api/mapping/create", {
                    "source_port": port, "target_host": "127.0.0.1", "target_port": target, "use_tunnel": False})
                created += 1
                ports.append(port)
            except bench.BenchError as e:
                if "409" not in str(e):  # the free port was taken meanwhile: another one
                    raise
        time.sleep(2)  # the health sampler's first rounds over every mapping
        after = clients_bench.settle(proc.pid)
        heap_after = clients_bench.heap_in_use(procs, proc) if heap else None
        times: dict[str, list[float]] = {"/metrics": [], "/api/stats/traffic": []}
        sizes = {}
        for _ in range(scrapes):
            for path in times:
                body, ms = client.request("GET", path)
                times[path].append(ms)
                sizes[path] = len(body)
        figures = {
            "mappings": n,
            "rss_before_kib": before["VmRSS"], "rss_after_kib": after["VmRSS"],
            "per_mapping_kib": (after["VmRSS"] - before["VmRSS"]) / n,
            "anon_per_mapping_kib": (after["RssAnon"] - before["RssAnon"]) / n,
            "heap_per_mapping_kib": None if heap_before is None or heap_after is None else (heap_after - heap_before) / n / 1024,
        }
        for path, values in times.items():
            key = "metrics" if path == "/metrics" else "traffic"
            figures[f"{key}_median_ms"] = statistics.median(values)
            figures[f"{key}_max_ms"] = max(values)
            figures[f"{key}_bytes"] = sizes[path]
        if conns:
            figures.update(held_run(client, proc, procs, ports, conns, scrapes))
        return figures
    finally:
        procs.stop(proc, timeout=30)
        if "echo" in locals():
            procs.stop(echo)
        notify.sock.close()
        subprocess.run(["rm", "-rf", str(state)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mappings", default="500,2000", help="comma-separated mapping counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--binary", action="append", default=[], help="NAME=PATH (repeatable); default: this tree's release build")
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--heap", action="store_true", help="also read glibc's heap in use through gdb")
    parser.add_argument("--hold", type=int, default=0,
                        help="then open this many connections at once over the mappings (the scale run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    binaries = [tuple(b.split("=", 1)) for b in args.binary] or [("this", str(bench.REPO / "target/release/tunneld"))]
    if not args.no_build and subprocess.run(["cargo", "build", "--release"], cwd=bench.REPO).returncode != 0:
        raise bench.BenchError("cargo build --release failed")
    counts = [int(x) for x in args.mappings.split(",")]
    bench.raise_fd_limit(2 * max(counts) + 2 * args.hold + 1000)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunneld-scale-") as tmpdir:
        procs = bench.Children(Path(tmpdir))
        try:
            for round_ in range(args.rounds):
                order = binaries if round_ % 2 == 0 else binaries[::-1]
                for n in counts:
                    for name, path in order:
                        fig = measure(Path(path), n, args.scrapes, args.heap, Path(tmpdir), procs, f"{name}-{n}-{round_}",
                                      args.hold)
                        fig.update(binary=name, round=round_)
                        results.append(fig)
                        heap = "" if fig["heap_per_mapping_kib"] is None else f", heap {fig['heap_per_mapping_kib']:.2f} KiB"
                        bench.log(f"round {round_ + 1} {name:>8} N={n:<5} RSS/mapping {fig['per_mapping_kib']:6.2f} KiB "
                                  f"(anon {fig['anon_per_mapping_kib']:.2f}{heap}); /metrics {fig['metrics_median_ms']:6.1f} ms "
                                  f"(max {fig['metrics_max_ms']:.1f}, {fig['metrics_bytes'] // 1024} KiB); traffic "
                                  f"{fig['traffic_median_ms']:6.1f} ms (max {fig['traffic_max_ms']:.1f}, {fig['traffic_bytes'] // 1024} KiB)")
                        if args.hold:
                            bench.log(f"    held {fig['held']} connections ({fig['failed']} failed) in {fig['open_s']:.1f} s; "
                                      f"RSS {fig['rss_held_kib'] / 1024:.1f} MiB; /metrics {fig['metrics_held_median_ms']:.1f} ms "
                                      f"(max {fig['metrics_held_max_ms']:.1f}); traffic {fig['traffic_held_median_ms']:.1f} ms "
                                      f"(max {fig['traffic_held_max_ms']:.1f}); counts exact: {fig['counts_exact']} "
                                      f"({fig['bytes_moved']}, expected {fig['bytes_expected']} each way)")
        finally:
            procs.stop_all()
    bench.banner("medians over rounds")
    for n in counts:
        for name, _ in binaries:
            rows = [r for r in results if r["binary"] == name and r["mappings"] == n]
            med = {k: statistics.median(r[k] for r in rows) for k in ("per_mapping_kib", "anon_per_mapping_kib", "metrics_median_ms",
                                                                      "metrics_max_ms", "traffic_median_ms", "traffic_max_ms")}
            bench.log(f"  {name:>8} N={n:<5} RSS/mapping {med['per_mapping_kib']:6.2f} KiB (anon {med['anon_per_mapping_kib']:.2f}); "
                      f"/metrics median {med['metrics_median_ms']:.1f} ms (max {med['metrics_max_ms']:.1f}); "
                      f"/api/stats/traffic median {med['traffic_median_ms']:.1f} ms (max {med['traffic_max_ms']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    bench.entry(main)
