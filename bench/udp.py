#!/usr/bin/env python3
"""Direct UDP mappings against raw loopback UDP (issue 22), in one run:

1. `iperf3 -u` at rising rates, straight to an iperf3 server and through a direct
   UDP mapping to it (a TCP mapping on the same port carries iperf3's control
   connection: UDP and TCP on one port number are two mappings). Reported: the
   highest rate with < 0.1 % loss for each, and their ratio (target: direct at
   least 0.9x raw's).
2. Small-datagram request/response: 64-byte payloads to a UDP echo, one at a
   time, straight and through the mapping: transactions per second, p50 and p99
   latency.

    python3 bench/udp.py [--binary target/release/tunneld] [--seconds 3] [--transactions 5000]

Run it on an otherwise idle machine with a release build (`cargo build --release`);
a debug binary works for a smoke run, its figures mean nothing. Python 3 standard
library and iperf3 only (the iperf3 part is skipped, loudly, without iperf3).
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
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOSS_LIMIT = 0.1  # percent
RATES_MBIT = [50, 100, 200, 400, 800, 1200, 1600, 2400, 3200]


def free_port() -> int:
    while True:
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def start_server(binary: str, state: str) -> tuple[subprocess.Popen, str]:
    api_port, tunnel_port = free_port(), free_port()
    proc = subprocess.Popen(
        [binary, "server", "--api-listen", f"127.0.0.1:{api_port}", "--tunnel-listen", f"127.0.0.1:{tunnel_port}",
         "--state-dir", state, "--secret", "bench-udp-secret-0123456789"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{api_port}"
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("tunneld did not come up")


def udp_echo() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve():
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


def request_response(port: int, n: int) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    payload = b"x" * 64
    for _ in range(200):  # warm up (and open the session)
        sock.sendto(payload, ("127.0.0.1", port))
        sock.recv(2048)
    times = []
    lost = 0
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendto(payload, ("127.0.0.1", port))
        try:
            sock.recv(2048)
        except socket.timeout:
            lost += 1
            continue
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    times.sort()
    return {
        "tps": len(times) / elapsed,
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
        "lost": lost,
    }


def iperf_loss(iperf3: str, port: int, mbit: int, seconds: float) -> float:
    out = subprocess.run([iperf3, "-c", "127.0.0.1", "-p", str(port), "-u", "-b", f"{mbit}M", "-l", "1200",
                          "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
    result = json.loads(out.stdout or "{}")
    if "error" in result:
        raise RuntimeError(result["error"])
    return float(result["end"]["sum"]["lost_percent"])


def highest_clean_rate(iperf3: str, port: int, seconds: float) -> tuple[int, list]:
    best, tried = 0, []
    for mbit in RATES_MBIT:
        loss = iperf_loss(iperf3, port, mbit, seconds)
        tried.append((mbit, round(loss, 3)))
        if loss >= LOSS_LIMIT:
            break
        best = mbit
    return best, tried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "tunneld"))
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--transactions", type=int, default=5000)
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        raise SystemExit(f"{args.binary} is missing: cargo build --release (or --binary)")
    state = tempfile.mkdtemp(prefix="tunneld-bench-udp-")
    server, base = start_server(args.binary, state)
    results: dict = {"binary": args.binary}
    try:
        echo = udp_echo()
        mapped = free_port()
        api(base, "/api/mapping/create", {"source_port": mapped, "protocol": "udp", "target_host": "127.0.0.1", "target_port": echo})
        raw = request_response(echo, args.transactions)
        direct = request_response(mapped, args.transactions)
        results["request_response"] = {"raw": raw, "direct": direct, "tps_ratio": direct["tps"] / raw["tps"]}
        print(f"64-byte request/response  raw: {raw['tps']:.0f}/s p50 {raw['p50_us']:.0f} us p99 {raw['p99_us']:.0f} us")
        print(f"                       direct: {direct['tps']:.0f}/s p50 {direct['p50_us']:.0f} us p99 {direct['p99_us']:.0f} us"
              f"  ({direct['tps'] / raw['tps']:.2f}x raw)")

        iperf3 = shutil.which("iperf3")
        if iperf3 is None:
            print("*** SKIPPED the iperf3 part: iperf3 is not installed ***")
        else:
            iperf_port = free_port()
            iperf = subprocess.Popen([iperf3, "-s", "-p", str(iperf_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                through = free_port()
                for protocol in ("tcp", "udp"):
                    api(base, "/api/mapping/create",
                        {"source_port": through, "protocol": protocol, "target_host": "127.0.0.1", "target_port": iperf_port})
                raw_best, raw_tried = highest_clean_rate(iperf3, iperf_port, args.seconds)
                direct_best, direct_tried = highest_clean_rate(iperf3, through, args.seconds)
                ratio = direct_best / raw_best if raw_best else 0.0
                results["iperf3"] = {"raw_mbit": raw_best, "direct_mbit": direct_best, "ratio": ratio,
                                     "raw_tried": raw_tried, "direct_tried": direct_tried, "loss_limit_percent": LOSS_LIMIT}
                print(f"iperf3 -u, highest rate with < {LOSS_LIMIT} % loss (1,200-byte datagrams):")
                print(f"  raw {raw_best} Mbit/s {raw_tried}")
                print(f"  direct {direct_best} Mbit/s {direct_tried}  ({ratio:.2f}x raw; target >= 0.9x)")
            finally:
                iperf.kill()
                iperf.wait()
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        results["dropped"] = [l for l in metrics.splitlines() if l.startswith("tunneld_mapping_dropped_datagrams_total") and not l.endswith(" 0")]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(state, ignore_errors=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "udp.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'udp.json'}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
