#!/usr/bin/env python3
"""Wake-ups per visitor (issue 24 §4): how often each forwarder's threads are
switched in, and the CPU it spends, per sequential connect + 1-byte echo + close
(`loadgen connrate`), beside HAProxy and rathole, in alternating rounds.

    python3 bench/wakeups.py --binary main=/work/bin/tunneld-604f [--binary new=PATH[@VAR=VALUE,...]] \\
        [--rathole /work/tools/rathole] [--rounds 4] [--conns 1500]

Per path and round: conn/s, then from the forwarder's own processes (server and
client for a tunnel) the CPU µs (schedstat) and the thread switch-ins per visitor
(schedstat's third field, all threads), and of those the voluntary ones
(`voluntary_ctxt_switches`: a thread that went to sleep, in `epoll_wait` or on a
futex, and was woken). Involuntary switches are preemption by the rest of a
loaded machine; the voluntary count is what the forwarder's design fixes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, tunneld, HAProxy, rathole and loadgen helpers)


def per_thread(pid: int) -> tuple[int, int, int]:
    """(CPU ns, switch-ins, voluntary switches) summed over a process's live threads."""
    cpu, switches = bench.schedstat_sums(pid)
    voluntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while being read
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
    return cpu, switches, voluntary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True,
                    help="NAME=PATH[@VAR=VALUE,...]: a tunneld binary, and environment variables to run it with")
    ap.add_argument("--rathole", type=Path, help="rathole binary (plain TCP transport); without it, no rathole path")
    ap.add_argument("--skip-haproxy", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--conns", type=int, default=1500)
    args = ap.parse_args()
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    rundir = bench.RESULTS_DIR / ("wakeups-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    rundir.mkdir(parents=True)
    bench.log(f"logs in {rundir.relative_to(bench.REPO)}")
    results: dict = {"conns": args.conns, "rounds": args.rounds, "paths": {}}
    with tempfile.TemporaryDirectory(prefix="tunneld-wakeups-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(rundir)
        try:
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target to listen", lambda: bench.listening(echo_port), procs, echo)
            # path name -> (port, [pids whose threads are counted])
            paths: dict[str, tuple[int, list[int]]] = {}
            by_name = lambda name: next(p.pid for p in procs.procs if p.name == name)  # noqa: E731
            if not args.skip_haproxy:
                fronts = bench.start_haproxy(procs, tmp, {"echo": echo_port}, 100)
                paths["haproxy"] = (fronts["echo"], [by_name("haproxy")])
            if args.rathole:
                fronts = bench.start_rathole(args.rathole, procs, tmp, {"echo": echo_port}, tls=False)
                paths["rathole"] = (fronts["echo"], [by_name("rathole-server"), by_name("rathole-client")])
            for spec in args.binary:
                name, _, rest = spec.partition("=")
                binary, _, env_spec = rest.partition("@")
                env = {**bench.os.environ, **dict(kv.split("=", 1) for kv in env_spec.split(",") if kv)}
                home = tmp / name
                home.mkdir()
                tls = bench.Tunneld(Path(binary), procs, home, env, name=f"{name}-tls")
                plain = bench.Tunneld(Path(binary), procs, home, env, tls=False, name=f"{name}-plain")
                paths[f"{name}-direct"] = (tls.map(echo_port, False), [tls.server.pid])
                paths[f"{name}-tunnel"] = (tls.map(echo_port, True), [tls.server.pid, tls.client.pid])
                paths[f"{name}-plain"] = (plain.map(echo_port, True), [plain.server.pid, plain.client.pid])
            for path, (port, _) in paths.items():  # warm: pools filled, first-use allocations made
                bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{port}", "--count", "200"], timeout=600)
            runs: dict = {path: [] for path in paths}
            for round_no, path in bench.alternating(list(paths), args.rounds):
                port, pids = paths[path]
                before = [per_thread(pid) for pid in pids]
                rate = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{port}",
                                                   "--count", str(args.conns)], timeout=600)
                after = [per_thread(pid) for pid in pids]
                cpu, switches, voluntary = (sum(a[i] - b[i] for a, b in zip(after, before)) / args.conns for i in range(3))
                if rate["failures"]:
                    raise bench.BenchError(f"{path}: {rate['failures']} failures: {rate['errors']}")
                run = {"conns_per_s": rate["conns_per_s"], "cpu_us_per_conn": cpu / 1e3,
                       "switches_per_conn": switches, "voluntary_per_conn": voluntary}
                runs[path].append(run)
                bench.log(f"round {round_no + 1} {path:16} {run['conns_per_s']:7.0f} conn/s {run['cpu_us_per_conn']:6.1f} "
                          f"CPU us/conn {switches:5.2f} switches/conn ({voluntary:5.2f} voluntary)")
        finally:
            procs.stop_all()
    bench.log("\nmedians over rounds:")
    for path, rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        results["paths"][path] = {"median": med, "rounds": rs}
        bench.log(f"  {path:16} {med['conns_per_s']:7.0f} conn/s {med['cpu_us_per_conn']:6.1f} CPU us/conn "
                  f"{med['switches_per_conn']:5.2f} switches/conn ({med['voluntary_per_conn']:5.2f} voluntary)")
    (rundir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    bench.log(f"results: {(rundir / 'results.json').relative_to(bench.REPO)}")
    return 0


if __name__ == "__main__":
    bench.entry(main)
