#!/usr/bin/env python3
"""What the machine allows a forwarding design (issue 24 §2, §3): one iperf3
stream, in rounds alternating so load from elsewhere hits every path alike,
through

- `raw`: loopback, no forwarder;
- `direct`: one tunneld direct mapping (one process splicing one hop);
- `chained`: two tunneld servers, a direct mapping on each, the first's target
  the second's port: two processes splicing, as the server and the client of a
  plain tunnel do, with no framing, no pool and no tunnel protocol at all — the
  ceiling of any design that has two user-space forwarders splice;
- `plain`: the plain tunnel (server and client, splicing framed chunks);
- `copy`: the same plain tunnel forced to copy (`TUNNELD_FORCE_COPY=1`): the
  ceiling of a tunnel that moves each byte through user space, as TLS must
  where the kernel has no kTLS;
- `tls`: the TLS tunnel (the default).

Each path's ratio to raw is taken within its round; medians are reported, with
each path's CPU per GB (its tunneld processes' and the whole chain's, iperf3's
two ends included), so a ratio can be read against what the path costs:
on a machine whose cores the chain fills, x raw follows raw's chain CPU per GB
over the path's.

    python3 bench/floors.py [--rounds 5] [--seconds 4] [--binary PATH] [--reverse] [--no-build]

With `--udp MBIT` it measures issue 22's direct UDP instead: `iperf3 -u -w 4M`
with 1,200-byte datagrams at one fixed offered rate (below both paths' highest
clean rate, so both carry the same datagrams), raw and through one direct UDP
mapping and through `examples/udp_relay.rs` (the least a user-space
forwarder can do: two blocking threads, `recvmmsg`/`sendmmsg`, no runtime, no
counting), alternating; per datagram: the whole machine's CPU (iperf3's two ends
as iperf3 reports them, and every other thread's schedstat, the kernel's own
softirq threads included) and tunneld's alone.
Where the rate is bounded by the machine's CPU, direct's highest rate can be
at most raw's times raw's machine CPU per datagram over direct's. Then each
path's highest clean rate on a ladder of `--rates`: what arrived at the
highest offered rate carried with < 0.1 % loss.

    cargo build --release --example udp_relay
    python3 bench/floors.py --udp 800 [--rates 800,1000,...] [--rounds 3] [--seconds 4] [--binary PATH] [--no-build]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, port and iperf3 helpers)
from splice import Server, endpoint_cpu_per_gb  # noqa: E402
import udp  # noqa: E402  (bench/udp.py: its iperf3 -u runner and mapping helpers)

PATHS = ["raw", "direct", "chained", "plain", "copy", "tls"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4, help="duration of each iperf3 run")
    ap.add_argument("--binary", type=Path, help="tunneld under test (default target/release/tunneld)")
    ap.add_argument("--reverse", action="store_true", help="iperf3 -R: bytes flow target -> visitor")
    ap.add_argument("--udp", type=int, metavar="MBIT", help="measure direct UDP's CPU per datagram at this rate")
    ap.add_argument("--rates", type=lambda v: [int(r) for r in v.split(",")], default=[800, 1000, 1200, 1400, 1600, 1800],
                    help="with --udp: the offered rates (Mbit/s) of the highest-clean-rate ladder")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        bench.build(False)
    binary = args.binary or bench.TARGET_DIR / "release" / "tunneld"
    if args.udp:
        return udp_floor(binary, args)
    rundir = bench.REPO / "bench" / "results" / time.strftime("floors-%Y%m%d-%H%M%S")
    rundir.mkdir(parents=True)
    results: dict = {"rounds": args.rounds, "seconds": args.seconds, "reverse": args.reverse,
                     "load_before": os.getloadavg()}
    extra = ["-R"] if args.reverse else []
    fd_env = dict(os.environ)

    with tempfile.TemporaryDirectory(prefix="tunneld-floors-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(rundir)
        try:
            iperf_port = bench.start_iperf3(procs)

            direct = Server(binary, procs, tmp, "direct", {})
            second = Server(binary, procs, tmp, "chained-second", {})
            first = Server(binary, procs, tmp, "chained-first", {})
            plain = bench.Tunneld(binary, procs, tmp, fd_env, tls=False)
            copy = bench.Tunneld(binary, procs, tmp, {**fd_env, "TUNNELD_FORCE_COPY": "1"}, tls=False, name="copy")
            tls = bench.Tunneld(binary, procs, tmp, fd_env, tls=True)
            ports = {"raw": iperf_port, "direct": direct.map(iperf_port),
                     "chained": first.map(second.map(iperf_port)),
                     "plain": plain.map(iperf_port, True), "copy": copy.map(iperf_port, True),
                     "tls": tls.map(iperf_port, True)}
            pids = {"raw": [], "direct": [direct.proc.pid], "chained": [first.proc.pid, second.proc.pid],
                    "plain": [plain.server.pid, plain.client.pid], "copy": [copy.server.pid, copy.client.pid],
                    "tls": [tls.server.pid, tls.client.pid]}

            gbps: dict[str, list[float]] = {p: [] for p in PATHS}
            forwarders: dict[str, list[float]] = {p: [] for p in PATHS}
            ends: dict[str, list[float]] = {p: [] for p in PATHS}
            for round_no, path in bench.alternating(PATHS, args.rounds):
                cpu_before = sum(bench.cpu_ns(pid) for pid in pids[path])
                saved = rundir / f"iperf-{path}-{round_no}.json"
                res = bench.run_iperf(ports[path], args.seconds, extra, saved)
                used = sum(bench.cpu_ns(pid) for pid in pids[path]) - cpu_before
                gbps[path].append(res["gbps"])
                forwarders[path].append(used / 1e9 / (res["received_bytes"] / 1e9))
                ends[path].append(endpoint_cpu_per_gb(saved))
                if path == PATHS[-1 if round_no % 2 == 0 else 0]:
                    bench.log(f"round {round_no + 1}: " + ", ".join(f"{p} {gbps[p][-1]:.2f}" for p in PATHS)
                              + " Gbit/s")

            summary = []
            for path in PATHS:
                per_round = [g / r for g, r in zip(gbps[path], gbps["raw"])]
                forwarder = statistics.median(forwarders[path])
                chain = statistics.median(ends[path]) + forwarder
                results[path] = {"gbps": gbps[path], "ratio_to_raw_per_round": per_round,
                                 "median_ratio_to_raw": statistics.median(per_round),
                                 "forwarder_cpu_s_per_gb": forwarder, "chain_cpu_s_per_gb": chain}
                summary.append(f"{path:<8} median {statistics.median(gbps[path]):6.2f} Gbit/s  "
                               f"x raw {statistics.median(per_round):.2f} "
                               f"(rounds {min(per_round):.2f}-{max(per_round):.2f})  "
                               f"tunneld CPU {forwarder:.3f} s/GB  chain CPU {chain:.3f} s/GB")
            for path, base in (("plain", "chained"), ("tls", "copy"), ("tls", "plain"), ("copy", "plain")):
                per_round = [a / b for a, b in zip(gbps[path], gbps[base])]
                results[f"{path}/{base}"] = per_round
                summary.append(f"{path} / {base}: median {statistics.median(per_round):.2f} "
                               f"(rounds {min(per_round):.2f}-{max(per_round):.2f})")
            results["load_after"] = os.getloadavg()
            summary.append(f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}"
                           + ("; iperf3 -R" if args.reverse else ""))
        finally:
            procs.stop_all()

    bench.log("\n".join(["", f"== {rundir.name}", *summary]))
    (rundir / "summary.txt").write_text("\n".join(summary) + "\n")
    (rundir / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def other_tasks_ns() -> dict[str, int]:
    """Every thread's CPU time (schedstat), but iperf3's, by /proc path: the
    kernel's own threads (ksoftirqd, kworkers) with the daemons. (This VM's
    /proc/stat misses most ticks, and it has no /proc/schedstat.)"""
    times = {}
    for stat in Path("/proc").glob("[0-9]*/task/*/schedstat"):
        try:
            if (stat.parent / "comm").read_text().strip() == "iperf3":
                continue
            times[str(stat)] = int(stat.read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return times


def udp_floor(binary: Path, args) -> int:
    rundir = bench.REPO / "bench" / "results" / time.strftime("floors-udp-%Y%m%d-%H%M%S")
    rundir.mkdir(parents=True)
    relay_binary = bench.TARGET_DIR / "release" / "examples" / "udp_relay"
    if not relay_binary.exists():
        raise bench.BenchError(f"{relay_binary} is missing: cargo build --release --example udp_relay")
    results: dict = {"mbit": args.udp, "rates": args.rates, "rounds": args.rounds, "load_before": os.getloadavg()}
    names = ["raw", "direct", "relay"]
    parts = ("machine", "iperf3 ends", "forwarder")
    per_datagram: dict[str, dict[str, list[float]]] = {p: {part: [] for part in parts} for p in names}
    losses: dict[str, dict[int, list[float]]] = {p: {rate: [] for rate in args.rates} for p in names}
    received: dict[str, dict[int, list[float]]] = {p: {rate: [] for rate in args.rates} for p in names}
    with tempfile.TemporaryDirectory(prefix="tunneld-floors-") as tmpdir:
        procs = bench.Children(rundir)
        try:
            paths = udp.iperf3_behind_each({"direct": binary}, procs, Path(tmpdir))
            relay_port = bench.free_port()
            relay = procs.spawn("udp-relay", [str(relay_binary), f"127.0.0.1:{relay_port}",
                                              f"127.0.0.1:{paths['raw'][0]}"])
            ports = {"raw": paths["raw"][0], "direct": paths["direct"][0], "relay": relay_port}
            pids = {"raw": None, "direct": paths["direct"][1].server.pid, "relay": relay.pid}

            def run_one(path: str, mbit: int, save: Path) -> dict:
                res = udp.iperf_udp(ports[path], mbit, args.seconds, 1200, "4M", save)
                time.sleep(1.0)  # iperf3's next handshake after a UDP run (bench/udp.py)
                return res

            for round_no, path in bench.alternating(names, args.rounds):
                pid = pids[path]
                saved = rundir / f"iperf-{path}-{args.udp}-{round_no}.json"
                others, own = other_tasks_ns(), bench.cpu_ns(pid) if pid else 0
                res = udp.iperf_udp(ports[path], args.udp, args.seconds, 1200, "4M", saved)
                after, own = other_tasks_ns(), (bench.cpu_ns(pid) - own) if pid else 0
                others = sum(ns - others.get(task, 0) for task, ns in after.items())
                if "error" in res:
                    raise bench.BenchError(f"iperf3 -u through {path} failed: {res['error']}")
                end = json.loads(saved.read_text())["end"]
                used = end["cpu_utilization_percent"]
                ends = (used["host_total"] + used["remote_total"]) / 100 * end["sum"]["seconds"] * 1e9
                for part, ns in zip(parts, (ends + others, ends, own)):
                    per_datagram[path][part].append(ns / 1e3 / res["packets"])
                time.sleep(1.0)
                for rate in args.rates:
                    res = run_one(path, rate, rundir / f"iperf-{path}-{rate}-{round_no}.json")
                    losses[path][rate].append(res["loss"])
                    received[path][rate].append(res["mbit"])
                bench.log(f"round {round_no + 1} {path}: loss % " + ", ".join(
                    f"{rate} {losses[path][rate][-1]:.2f}" for rate in args.rates))
        finally:
            procs.stop_all()
    summary = []
    highest: dict[str, list[int]] = {}
    for path in names:
        medians = {part: statistics.median(v) for part, v in per_datagram[path].items()}
        # Per round: what arrived at the highest offered rate carried with
        # < 0.1 % loss (an iperf3 sender short of CPU offers less than asked).
        highest[path] = [max([round(received[path][rate][r]) for rate in args.rates if losses[path][rate][r] < 0.1],
                             default=0) for r in range(args.rounds)]
        results[path] = {"us_per_datagram": per_datagram[path], "median_us_per_datagram": medians,
                         "loss_percent_by_rate": losses[path],
                         "received_mbit_by_rate": received[path], "highest_clean_mbit_per_round": highest[path]}
        summary.append(f"{path:<7} CPU per datagram at {args.udp} Mbit/s: " + ", ".join(
            f"{part} {us:.2f} us" for part, us in medians.items())
            + f"; highest clean rate per round {highest[path]} Mbit/s")
    for path in ("direct", "relay"):
        per_round = [h / r if r else 0.0 for h, r in zip(highest[path], highest["raw"])]
        results[f"{path}/raw"] = per_round
        summary.append(f"{path} / raw, highest clean rate: median {statistics.median(per_round):.2f} "
                       f"(rounds {', '.join(f'{x:.2f}' for x in per_round)})")
    bound = (results["raw"]["median_us_per_datagram"]["machine"]
             / results["direct"]["median_us_per_datagram"]["machine"])
    results["cpu_bound_ratio_to_raw"] = bound
    summary.append(f"direct's highest rate, where the machine's CPU bounds it: at most {bound:.2f}x raw's")
    results["load_after"] = os.getloadavg()
    summary.append(f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}")
    bench.log("\n".join(["", f"== {rundir.name}", *summary]))
    (rundir / "summary.txt").write_text("\n".join(summary) + "\n")
    (rundir / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    bench.entry(main)
