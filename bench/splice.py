#!/usr/bin/env python3
"""Direct mappings with splice(2) (issue 24 §1): iperf3 through a direct mapping
whose relay splices in the kernel, through the same binary forced to copy
through user space (`TUNNELD_FORCE_COPY=1`), optionally through a baseline
binary (e.g. the main branch's release build), and raw loopback — 1 stream and
8 streams, rounds alternating so load from elsewhere hits every path alike;
medians, and each path's ratio to raw measured in the same round. Then server
RSS per open direct connection (each moved a byte both ways and went idle)
for the splice and copy servers, and how many pipes the splice server holds
meanwhile (pipes are taken only while bytes move).

    python3 bench/splice.py [--rounds 5] [--seconds 5] [--hold 1000] [--baseline PATH] [--no-build]

Counters are checked as in run.py: each mapping's `/api/stats/traffic` delta
over the iperf3 runs lies between what iperf3's receivers got and what its
senders wrote (plus control connections); `/metrics` must show the splice
server's connections under path="splice" and the forced server's under "copy".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, port and iperf3 helpers)


class Server:
    """A tunneld server (no client: direct mappings only) on its own config and
    state, with `env` added (no other TUNNELD_* variables)."""

    def __init__(self, binary: Path, procs: bench.Children, tmp: Path, name: str, env: dict):
        self.name = name
        self.api = f"http://127.0.0.1:{bench.free_port()}"
        d = tmp / name
        d.mkdir()
        config = d / "tunneld.toml"
        config.write_text('[server]\nbind_addr = "127.0.0.1"\n')
        base = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
        notify = bench.Notify(d / "notify")
        self.proc = procs.spawn(f"tunneld-{name}", [
            str(binary), "server", "--config", str(config), "--api-listen", self.api.removeprefix("http://"),
            "--tunnel-listen", f"127.0.0.1:{bench.free_port()}", "--state-dir", str(d / "state"),
            "--secret", "bench-" + os.urandom(8).hex(),
        ], env={**base, "RUST_LOG": "warn", **env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("READY=1", procs, self.proc)

    def map(self, target_port: int) -> int:
        port = bench.free_port()
        reply = bench.http_json(self.api + "/api/mapping/create", {
            "source_port": port, "target_host": "127.0.0.1", "target_port": target_port, "use_tunnel": False})
        if not reply.get("success"):
            raise bench.BenchError(f"{self.name}: creating mapping {port} -> {target_port} failed: {reply}")
        return port

    def traffic(self, port: int) -> dict:
        return next(m for m in bench.http_json(self.api + "/api/stats/traffic")["data"]["mappings"] if m["port"] == port)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.api + "/metrics", timeout=10) as r:
            return r.read().decode()

    def pipe_fds(self) -> int:
        fds = Path(f"/proc/{self.proc.pid}/fd")
        return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:")) if fds.exists() else 0


def relayed(text: str, port: int) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("tunneld_mapping_relayed_connections_total{") and f'port="{port}"' in line:
            path = line.split('path="')[1].split('"')[0]
            out[path] = float(line.rsplit(" ", 1)[1])
    return out


def hold(procs, loadgen: Path, server: Server, port: int, conns: int) -> dict:
    """Server RSS added per open direct connection (bytes), and the pipes held
    while they are open and idle."""
    time.sleep(1.0)
    idle_rss = bench.rss_kib(server.proc.pid)["VmRSS"]
    idle_pipes = server.pipe_fds()
    h = procs.spawn(f"loadgen-hold-{server.name}", [str(loadgen), "hold", "--target", f"127.0.0.1:{port}",
                                                      "--conns", str(conns)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = json.loads(h.stdout.readline())
        time.sleep(1.0)
        held_rss = bench.rss_kib(server.proc.pid)["VmRSS"]
        held_pipes = server.pipe_fds()
    finally:
        h.stdin.close()
        procs.stop(h)
    opened = max(ready["open"], 1)
    return {"open": ready["open"], "rss_per_conn_bytes": (held_rss - idle_rss) * 1024 / opened,
            "pipe_fds_idle": idle_pipes, "pipe_fds_held": held_pipes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5, help="duration of each iperf3 run")
    ap.add_argument("--hold", type=int, default=1000, help="connections held open for the memory figure")
    ap.add_argument("--binary", type=Path, help="tunneld under test (default target/release/tunneld)")
    ap.add_argument("--baseline", type=Path, help="another tunneld (e.g. main's release build) as a fourth path")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()
    if not args.no_build:
        bench.build(False)
    binary = args.binary or bench.TARGET_DIR / "release" / "tunneld"
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    bench.raise_fd_limit(4 * args.hold + 1000)
    rundir = bench.REPO / "bench" / "results" / time.strftime("splice-%Y%m%d-%H%M%S")
    rundir.mkdir(parents=True)
    results: dict = {"rounds": args.rounds, "seconds": args.seconds, "load_before": os.getloadavg()}

    with tempfile.TemporaryDirectory(prefix="tunneld-splice-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(rundir)
        try:
            iperf_port = bench.free_port()
            iperf = procs.spawn("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)])
            bench.wait_until("iperf3 -s", lambda: bench.listening(iperf_port), procs, iperf)
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target", lambda: bench.listening(echo_port), procs, echo)
            servers = {"splice": Server(binary, procs, tmp, "splice", {}),
                       "copy": Server(binary, procs, tmp, "copy", {"TUNNELD_FORCE_COPY": "1"})}
            if args.baseline:
                servers["baseline"] = Server(args.baseline, procs, tmp, "baseline", {})
            ports = {"raw": iperf_port, **{name: s.map(iperf_port) for name, s in servers.items()}}
            before = {name: s.traffic(ports[name]) for name, s in servers.items()}
            sent = {name: 0 for name in servers}
            received = {name: 0 for name in servers}
            figures: dict[str, dict[str, list[float]]] = {"1 stream": {}, "8 streams": {}}
            cpu: dict[str, dict[str, list[float]]] = {}
            for round_no in range(args.rounds):
                order = list(ports) if round_no % 2 == 0 else list(reversed(list(ports)))
                for figure, extra in (("1 stream", []), ("8 streams", ["-P", "8"])):
                    for path in order:
                        cpu_before = bench.cpu_ns(servers[path].proc.pid) if path in servers else 0
                        res = bench.run_iperf(ports[path], args.seconds, extra,
                                              rundir / f"iperf-{path}-{figure.replace(' ', '')}-{round_no}.json")
                        figures[figure].setdefault(path, []).append(res["gbps"])
                        if path in servers:
                            sent[path] += res["sent_bytes"]
                            received[path] += res["received_bytes"]
                            # tunneld's own CPU per GB forwarded: what the path
                            # costs, whatever else the machine is doing.
                            used = bench.cpu_ns(servers[path].proc.pid) - cpu_before
                            cpu.setdefault(figure, {}).setdefault(path, []).append(used / 1e9 / (res["received_bytes"] / 1e9))
                    bench.log(f"round {round_no + 1} {figure}: " + ", ".join(
                        f"{p} {figures[figure][p][-1]:.2f}" for p in ports) + " Gbit/s")

            summary = []
            for figure, values in figures.items():
                raw = values["raw"]
                for path, gbps in values.items():
                    per_round = [g / r for g, r in zip(gbps, raw)]
                    results.setdefault(figure, {})[path] = {"gbps": gbps, "median_gbps": statistics.median(gbps),
                                                            "ratio_to_raw_per_round": per_round,
                                                            "median_ratio_to_raw": statistics.median(per_round)}
                    line = (f"{figure:<10} {path:<9} median {statistics.median(gbps):6.2f} Gbit/s  "
                            f"x raw {statistics.median(per_round):.2f} (rounds {min(per_round):.2f}-{max(per_round):.2f})")
                    if path in cpu.get(figure, {}):
                        per_gb = cpu[figure][path]
                        results[figure][path]["cpu_s_per_gb"] = per_gb
                        line += f"  tunneld CPU {statistics.median(per_gb):.3f} s/GB"
                    summary.append(line)

            # The counters: between what arrived and what was sent (plus iperf3's
            # control connection, 1 MiB of slack per run as in run.py).
            ok = True
            runs = 2 * args.rounds
            for name, s in servers.items():
                after = s.traffic(ports[name])
                delta = after["bytes_sent"] - before[name]["bytes_sent"]
                good = received[name] <= delta <= sent[name] + runs * 8 * (1 << 20)
                ok &= good
                summary.append(f"counters  {name:<9} sent delta {delta:,} B, iperf3 received {received[name]:,} B: "
                               f"{'OK' if good else 'MISMATCH'}")
                paths = relayed(s.metrics(), ports[name])
                results.setdefault("relayed", {})[name] = paths
                summary.append(f"/metrics  {name:<9} tunneld_mapping_relayed_connections_total {paths}")
            ok &= relayed(servers["splice"].metrics(), ports["splice"]).get("splice", 0) > 0
            ok &= relayed(servers["copy"].metrics(), ports["copy"]).get("copy", 0) > 0

            for name in ("splice", "copy"):
                mem = hold(procs, loadgen, servers[name], servers[name].map(echo_port), args.hold)
                results.setdefault("memory", {})[name] = mem
                summary.append(f"memory    {name:<9} {mem['open']} open direct connections: "
                               f"{mem['rss_per_conn_bytes']:,.0f} B RSS each; pipe descriptors idle "
                               f"{mem['pipe_fds_idle']}, with them open {mem['pipe_fds_held']}")
            results["load_after"] = os.getloadavg()
            summary.append(f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}")
        finally:
            procs.stop_all()

    bench.log("\n".join(["", f"== {rundir.name}", *summary]))
    (rundir / "summary.txt").write_text("\n".join(summary) + "\n")
    (rundir / "results.json").write_text(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    bench.entry(main)
