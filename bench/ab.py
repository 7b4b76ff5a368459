#!/usr/bin/env python3
"""tunneld builds side by side (issue 24 §3, §4): each binary gets a TLS and a
plain server/client pair, then in alternating rounds (the binaries' order and
the paths' order reversed every other round, so load from elsewhere on a shared
machine hits them alike) the 1-stream iperf3 throughput and the sequential
connection rate (`loadgen connrate`) through its direct, TLS-tunneled and plain
tunneled mappings; medians are reported. Once per binary, on fresh daemons: the
RSS added per open TLS-tunneled connection (as bench/run.py measures it), and
with --strace the system calls per visitor (`strace -c -f` attached to the
server and the client while `--strace-conns` connections go through each path).
Each round also reports the times tunneld's threads were switched in per
visitor (schedstat), the measure of its wake-ups and cross-thread hand-offs.

    python3 bench/ab.py --binary ring=/tmp/tunneld-ring --binary awslc=target/release/tunneld \\
        [--rounds 4] [--seconds 5] [--conns 2000] [--strace]

Build each binary first (e.g. `cargo build --release` on each commit, copying
`target/release/tunneld` aside), and the load generator
(`cargo build --release --example loadgen`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, tunneld and loadgen helpers)

PATHS = ("direct", "tunnel", "plain")


def strace_counts(pids: dict[str, int], load, per: float, rundir: Path, label: str) -> dict:
    """System calls in each process, counted by `strace -c -f` while `load()`
    runs, divided by `per` (visitors, or MB moved). The daemons' own timers
    add a few calls a second: noise below one call per visitor at these rates."""
    out = {}
    tracers = {}
    for role, pid in pids.items():
        path = rundir / f"strace-{label}-{role}.txt"
        tracers[role] = (subprocess.Popen(["strace", "-c", "-f", "-o", str(path), "-p", str(pid)],
                                          stderr=subprocess.DEVNULL), path)
    time.sleep(1.0)  # strace attaches to every thread before the load starts
    out["load"] = load()
    for role, (tracer, path) in tracers.items():
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        text = path.read_text()
        calls, total = bench.strace_calls(text)
        out[role] = {"per": total / per,
                     "by_call": {k: round(v / per, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}
    return out


def log_counts(what: str, pids: dict, sc: dict) -> None:
    bench.log(f"syscalls {what}: " + " + ".join(f"{role} {sc[role]['per']:.1f}" for role in pids))
    for role in pids:
        top = ", ".join(f"{k} {v}" for k, v in list(sc[role]["by_call"].items())[:10])
        bench.log(f"    {role}: {top}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True,
                    help="NAME=PATH[@VAR=VALUE,...]: a binary, and environment variables to run it with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--hold", type=int, default=1000, help="TLS-tunneled connections held for the memory figure")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--strace", action="store_true", help="also count system calls per visitor")
    ap.add_argument("--strace-conns", type=int, default=1000)
    ap.add_argument("--reverse", action="store_true",
                    help="also run iperf3 -R (target -> visitor: the client encrypts, the server decrypts)")
    ap.add_argument("--strace-mb", type=int, default=0,
                    help="also count system calls per MB while iperf3 moves this many MB through each path")
    args = ap.parse_args()
    binaries, envs = {}, {}
    for spec in args.binary:
        name, _, rest = spec.partition("=")
        path, _, env = rest.partition("@")
        binaries[name] = path
        envs[name] = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    paths = args.paths.split(",")
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    bench.raise_fd_limit(4 * args.hold + 256)
    rundir = bench.RESULTS_DIR / ("ab-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    rundir.mkdir(parents=True)
    bench.log(f"logs in {rundir.relative_to(bench.REPO)}; binaries {binaries}")
    results: dict = {"binaries": binaries, "envs": envs, "rounds": args.rounds, "seconds": args.seconds, "conns": args.conns,
                     "tput_1": {}, "cpu_s_per_gb": {}, "conn_rate": {}, "cpu_us_per_conn": {}, "switches_per_conn": {}, "memory": {}, "syscalls": {}}
    fd_env = dict(bench.os.environ)
    with tempfile.TemporaryDirectory(prefix="tunneld-ab-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(rundir)
        try:
            iperf_port = bench.start_iperf3(procs)
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target to listen", lambda: bench.listening(echo_port), procs, echo)
            ports: dict = {}
            daemons: dict = {}
            for name, binary in binaries.items():
                home = tmp / name
                home.mkdir()
                env = {**fd_env, **envs[name]}
                tls = bench.Tunneld(Path(binary), procs, home, env, name=f"{name}-tls")
                plain = bench.Tunneld(Path(binary), procs, home, env, tls=False, name=f"{name}-plain")
                daemons[name] = {"direct": tls, "tunnel": tls, "plain": plain}
                ports[name] = {path: {target: daemons[name][path].map(tport, path != "direct")
                                      for target, tport in (("iperf", iperf_port), ("echo", echo_port))}
                               for path in PATHS}
            for name in binaries:
                mem = bench.hold_and_measure(loadgen, procs, daemons[name]["tunnel"], ports[name]["tunnel"]["echo"],
                                             args.hold)
                results["memory"][name] = mem
                bench.log(f"memory {name:10} per TLS conn: server {mem['server']['per_conn_kib']:.1f} KiB, "
                          f"client {mem['client']['per_conn_kib']:.1f} KiB (idle server "
                          f"{mem['server']['idle_rss_kib'] / 1024:.1f} MiB, {mem['hold']['open']} open)")
            if args.strace:
                for name in binaries:
                    for path in paths:
                        d = daemons[name][path]
                        pids = {"server": d.server.pid} if path == "direct" else {"server": d.server.pid,
                                                                                   "client": d.client.pid}
                        port = ports[name][path]["echo"]
                        sc = strace_counts(pids, lambda port=port: bench.run_loadgen(
                            loadgen, ["connrate", "--target", f"127.0.0.1:{port}", "--count", str(args.strace_conns)],
                            timeout=600), args.strace_conns, rundir, f"{name}-{path}")
                        results["syscalls"].setdefault(name, {})[path] = sc
                        log_counts(f"{name} {path} per visitor", pids, sc)
                        if args.strace_mb:
                            port = ports[name][path]["iperf"]
                            mb = args.strace_mb
                            sc = strace_counts(pids, lambda port=port: bench.run_iperf(
                                port, 0, ["-n", f"{mb}M"], rundir / f"iperf3-strace-{name}-{path}.json"),
                                mb, rundir, f"{name}-{path}-bulk")
                            results["syscalls"][name][f"{path}_per_mb"] = sc
                            log_counts(f"{name} {path} per MB", pids, sc)
            for round_no in range(args.rounds):
                order = list(binaries) if round_no % 2 == 0 else list(reversed(binaries))
                path_order = paths if round_no % 2 == 0 else list(reversed(paths))
                for name in order:
                    for path in path_order:
                        d = daemons[name][path]
                        pids = [d.server.pid] if path == "direct" else [d.server.pid, d.client.pid]
                        directions = [("", [])] + ([("_R", ["-R"])] if args.reverse else [])
                        for suffix, iperf_args in ([] if args.no_throughput else directions):
                            cpu_before = [bench.cpu_ns(pid) for pid in pids]
                            res = bench.run_iperf(ports[name][path]["iperf"], args.seconds, iperf_args,
                                                  rundir / f"iperf3-{name}-{path}{suffix}-{round_no}.json")
                            cpus = [bench.cpu_ns(pid) - before for pid, before in zip(pids, cpu_before)]
                            gb = res["received_bytes"] / 1e9
                            results.setdefault("tput_1" + suffix, {}).setdefault(name, {}).setdefault(path, []).append(
                                res["gbps"])
                            # CPU seconds tunneld spent per GB moved: what load elsewhere moves least;
                            # in all, and in the server and the client apart.
                            results.setdefault("cpu_s_per_gb" + suffix, {}).setdefault(name, {}).setdefault(
                                path, []).append(sum(cpus) / 1e9 / gb)
                            for role, cpu in zip(("server", "client"), cpus):
                                results.setdefault(f"cpu_s_per_gb_{role}{suffix}", {}).setdefault(name, {}).setdefault(
                                    path, []).append(cpu / 1e9 / gb)
                        cpu_before = sum(bench.cpu_ns(pid) for pid in pids)
                        switches_before = sum(bench.switch_ins(pid) for pid in pids)
                        rate = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[name][path]['echo']}",
                                                           "--count", str(args.conns)], timeout=600)
                        # CPU microseconds tunneld spent per visitor (server and client).
                        results["cpu_us_per_conn"].setdefault(name, {}).setdefault(path, []).append(
                            (sum(bench.cpu_ns(pid) for pid in pids) - cpu_before) / 1e3 / args.conns)
                        # Threads of tunneld switched in per visitor: the wake-ups and hand-offs.
                        results["switches_per_conn"].setdefault(name, {}).setdefault(path, []).append(
                            (sum(bench.switch_ins(pid) for pid in pids) - switches_before) / args.conns)
                        if rate["failures"]:
                            raise bench.BenchError(f"{name} {path}: {rate['failures']} failures: {rate['errors']}")
                        results["conn_rate"].setdefault(name, {}).setdefault(path, []).append(rate["conns_per_s"])
                        def cpu_per_gb(suffix: str) -> str:
                            # The server's, and the client's where the path has one (not direct).
                            parts = [results[f"cpu_s_per_gb_{role}{suffix}"][name][path][-1]
                                     for role in ("server", "client")[:len(pids)]]
                            return "+".join(f"{part:5.2f}" for part in parts)

                        tput = "".join(
                            f"{suffix or '  '} {results['tput_1' + suffix][name][path][-1]:6.2f} Gbit/s "
                            f"{cpu_per_gb(suffix)} CPU s/GB  "
                            for suffix, _ in ([] if args.no_throughput else directions))
                        bench.log(f"round {round_no + 1} {name:10} {path:6} {tput}{rate['conns_per_s']:7.0f} conn/s "
                                  f"{results['cpu_us_per_conn'][name][path][-1]:6.1f} CPU us/conn "
                                  f"{results['switches_per_conn'][name][path][-1]:5.2f} switches/conn")
        finally:
            procs.stop_all()
    bench.log("\nmedians over rounds (ratios within one binary: tunnel/plain; across binaries: to the first):")
    first = next(iter(binaries))
    keys = [("tput_1", "Gbit/s"), ("cpu_s_per_gb", "CPU s/GB"), ("cpu_s_per_gb_server", "CPU s/GB"),
            ("cpu_s_per_gb_client", "CPU s/GB")]
    if args.reverse:
        keys += [(key + "_R", unit) for key, unit in keys]
    for key, unit in keys + [("conn_rate", "conn/s"), ("cpu_us_per_conn", "CPU us/conn"), ("switches_per_conn", "switches/conn")]:
        for path in paths:
            line = f"  {key:22} {path:6}"
            for name in binaries:
                runs = results.get(key, {}).get(name, {}).get(path)
                if not runs:
                    continue
                med = statistics.median(runs)
                base = statistics.median(results[key][first][path])
                line += f"  {name} {med:8.2f} {unit} ({med / base:.3f}x)"
            bench.log(line)
    for name in binaries:
        t = results["tput_1"].get(name, {})
        if "tunnel" in t and "plain" in t:
            c = results["cpu_s_per_gb"][name]
            bench.log(f"  {name}: TLS tunnel / plain tunnel, 1 stream: "
                      f"{statistics.median(t['tunnel']) / statistics.median(t['plain']):.3f}x; CPU per GB "
                      f"{statistics.median(c['tunnel']) / statistics.median(c['plain']):.3f}x")
    (rundir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    bench.log(f"results: {(rundir / 'results.json').relative_to(bench.REPO)}")
    return 0


if __name__ == "__main__":
    bench.entry(main)
