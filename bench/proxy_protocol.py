#!/usr/bin/env python3
"""What `proxy_protocol` costs a new connection (issue 23 §4): connection rate
through a mapping that sends a PROXY header (v1, v2) against one that does not,
direct and through the tunnel, on one tunneld, rounds alternating so drift on a
shared machine hits all alike, medians reported.

    python3 bench/proxy_protocol.py [--rounds 5] [--conns 2000] [--no-build] [--binary PATH]

The target must read the header, so every mapping goes to HAProxy (TCP mode)
in front of loadgen's echo: `accept-proxy` frontends for the mappings with a
header, a plain frontend for those without — the same hop for both, so the
ratio is the header's cost to tunneld plus HAProxy's cost of parsing it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process and port helpers)


def haproxy(procs, tmp: Path, echo_port: int) -> dict[str, int]:
    """HAProxy in front of the echo: `plain` without, `proxy` with accept-proxy."""
    ports = {"plain": bench.free_port(), "proxy": bench.free_port()}
    config = tmp / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 4000\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n"
        f"frontend plain\n    bind 127.0.0.1:{ports['plain']}\n    default_backend echo\n"
        f"frontend proxy\n    bind 127.0.0.1:{ports['proxy']} accept-proxy\n    default_backend echo\n"
        f"backend echo\n    server echo 127.0.0.1:{echo_port}\n")
    proc = procs.spawn("haproxy", ["haproxy", "-db", "-f", str(config)])
    for port in ports.values():
        bench.wait_until(f"haproxy on {port}", lambda p=port: bench.listening(p), procs, proc)
    return ports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=2000, help="sequential connections per round and mapping")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", type=Path, help="the tunneld to measure (default: target/release/tunneld)")
    args = ap.parse_args()
    bench.build(args.no_build)
    binary = args.binary or bench.TARGET_DIR / "release" / "tunneld"
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    bench.raise_fd_limit(8000)
    fd_env = dict(bench.os.environ)

    with tempfile.TemporaryDirectory(prefix="tunneld-proxy-protocol-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(tmp)
        try:
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target", lambda: bench.listening(echo_port), procs, echo)
            front = haproxy(procs, tmp, echo_port)
            tunneld = bench.Tunneld(binary, procs, tmp, fd_env, name="proxy-protocol")
            ports: dict[tuple[str, str], int] = {}
            for path in ("direct", "tunnel"):
                for header in ("none", "v1", "v2"):
                    port = bench.free_port()
                    body = {"source_port": port, "target_host": "127.0.0.1",
                            "target_port": front["plain" if header == "none" else "proxy"], "use_tunnel": path == "tunnel"}
                    if header != "none":
                        body["proxy_protocol"] = header
                    reply = bench.http_json(tunneld.api + "/api/mapping/create", body)
                    if not reply.get("success"):
                        raise bench.BenchError(f"creating {path}/{header} failed: {reply}")
                    ports[(path, header)] = port

            bench.log(f"== connection rate: {args.rounds} rounds x {args.conns} sequential connect -> 1-byte echo -> close")
            rates: dict[tuple[str, str], list[float]] = {key: [] for key in ports}
            for round_no in range(args.rounds):
                order = list(ports) if round_no % 2 == 0 else list(reversed(list(ports)))
                for key in order:
                    res = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[key]}",
                                                      "--count", str(args.conns)], timeout=600)
                    if res["failures"]:
                        raise bench.BenchError(f"{key}: {res['failures']} connections failed: {res['errors']}")
                    rates[key].append(res["conns_per_s"])
                bench.log(f"round {round_no + 1}: " + ", ".join(f"{k[0]}/{k[1]} {v[-1]:.0f}" for k, v in rates.items()) + " conn/s")
            med = {key: statistics.median(v) for key, v in rates.items()}
            for path in ("direct", "tunnel"):
                none = med[(path, "none")]
                bench.log(f"  {path:<7} no header {none:7.0f} conn/s; "
                          + "; ".join(f"{h} {med[(path, h)]:7.0f} conn/s ({med[(path, h)] / none:.3f})" for h in ("v1", "v2")))
            traffic = tunneld.traffic()
            for key, port in ports.items():
                sent = traffic[port]["bytes_sent"]
                expected = args.conns * args.rounds
                if sent != expected:
                    raise bench.BenchError(f"{key}: {sent} bytes counted sent, {expected} expected (the header must not count)")
            bench.log(f"  counters: each mapping counted exactly {args.conns * args.rounds} bytes sent (1 per connection)")
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    bench.entry(main)
