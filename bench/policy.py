#!/usr/bin/env python3
"""Mapping-policy benchmark (issue 13), all on 127.0.0.1, not part of `cargo test`.

Two figures, each taken in one run so it can be read as a ratio:

1. Unlimited throughput: an unlimited direct mapping on the binary under test
   (with no policy, and with a policy that sets no cap) against the same mapping
   on a baseline binary built from the code before the policy work. Rounds
   alternate between the binaries so machine noise hits both alike; medians are
   compared.
2. Cap accuracy: a direct mapping capped at 1, 10 and 100 MB/s (10^6 B/s), the
   throughput iperf3's receiver measured, and its error against the cap.

Run it under the shared lock (other benchmarks use the machine too):

    flock /tmp/tunneld-bench.lock python3 bench/policy.py --baseline /tmp/tunneld-main

Python 3 standard library and iperf3 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on {port} after {timeout} s")


def api(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        reply = json.load(r)
    if not reply.get("success"):
        sys.exit(f"{path}: {reply}")
    return reply["data"]


class Daemon:
    def __init__(self, binary: Path, tmp: Path, name: str):
        self.api_port = free_port()
        state = tmp / name
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [str(binary), "server", "--api-listen", f"127.0.0.1:{self.api_port}",
             "--tunnel-listen", f"127.0.0.1:{free_port()}", "--state-dir", str(state),
             "--secret", "bench-secret-0123456789"],
            stdout=self.log, stderr=self.log, env={**os.environ, "RUST_LOG": "warn"})
        self.base = f"http://127.0.0.1:{self.api_port}"
        wait_listening(self.api_port)

    def map(self, target: int, **policy) -> int:
        port = free_port()
        api(self.base, "/api/mapping/create",
            {"source_port": port, "target_host": "127.0.0.1", "target_port": target, **policy})
        wait_listening(port)
        return port

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def iperf(port: int, seconds: int, streams: int = 1) -> float:
    """Receiver-side throughput in bytes per second."""
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        sys.exit(f"iperf3 through {port} failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    report = json.loads(out.stdout)
    if "error" in report:
        sys.exit(f"iperf3 through {port}: {report['error']}")
    return report["end"]["sum_received"]["bits_per_second"] / 8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="tunneld built from the code before the policy work")
    ap.add_argument("--tunneld", type=Path, default=REPO / "target" / "release" / "tunneld", help="the binary under test")
    ap.add_argument("--seconds", type=int, default=10, help="duration of each iperf3 run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds for the unlimited comparison")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not shutil.which("iperf3"):
        print("iperf3 is missing (apt-get install iperf3)", file=sys.stderr)
        return 2

    results: dict = {"seconds": args.seconds, "unlimited": {}, "caps": []}
    with tempfile.TemporaryDirectory(prefix="tunneld-policy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        iperf_port = free_port()
        servers = [subprocess.Popen(["iperf3", "-s", "-p", str(iperf_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        daemons: list[Daemon] = []
        try:
            wait_listening(iperf_port)
            baseline = Daemon(args.baseline, tmp, "baseline")
            current = Daemon(args.tunneld, tmp, "current")
            daemons = [baseline, current]
            paths = {
                "baseline": baseline.map(iperf_port),
                "current, no policy": current.map(iperf_port),
                "current, policy without cap": current.map(iperf_port, description="bench", allow=["127.0.0.0/8"]),
            }
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for rnd in range(args.rounds):
                for name, port in paths.items():
                    bps = iperf(port, args.seconds)
                    samples[name].append(bps)
                    print(f"round {rnd + 1}: {name:30s} {bps * 8 / 1e9:7.2f} Gbit/s", flush=True)
            base = statistics.median(samples["baseline"])
            for name, values in samples.items():
                median = statistics.median(values)
                results["unlimited"][name] = {"samples_Bps": values, "median_Bps": median, "ratio_to_baseline": median / base}

            for cap in (1_000_000, 10_000_000, 100_000_000):
                # A fresh iperf3 server per cap: bytes the cap still holds back
                # when one run's client stops keep its server busy for a while.
                own_port = free_port()
                servers.append(subprocess.Popen(["iperf3", "-s", "-p", str(own_port)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                wait_listening(own_port)
                port = current.map(own_port, bandwidth_limit=cap)
                got = iperf(port, args.seconds)
                results["caps"].append({"cap_Bps": cap, "measured_Bps": got, "error": (got - cap) / cap})
                print(f"cap {cap / 1e6:5.0f} MB/s: measured {got / 1e6:8.3f} MB/s ({(got - cap) / cap * 100:+.2f} %)", flush=True)
        finally:
            for d in daemons:
                d.stop()
            for server in servers:
                server.terminate()

    print("\nunlimited direct mapping, median of", args.rounds, "alternating rounds of", args.seconds, "s:")
    for name, r in results["unlimited"].items():
        print(f"  {name:30s} {r['median_Bps'] * 8 / 1e9:7.2f} Gbit/s  x{r['ratio_to_baseline']:.3f} of baseline")
    print("cap accuracy (iperf3 receiver, 1 stream):")
    for c in results["caps"]:
        print(f"  {c['cap_Bps'] / 1e6:5.0f} MB/s cap -> {c['measured_Bps'] / 1e6:8.3f} MB/s ({c['error'] * 100:+.2f} %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
