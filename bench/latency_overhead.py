#!/usr/bin/env python3
"""What the latency histograms cost (issue 21 §4): sequential connection setup
(`loadgen connrate`: connect -> 1-byte echo -> close, one at a time) through a
direct and a tunneled mapping, a tunneld built from a base commit (before the
histograms) against the one built from this tree, in alternating rounds in one
run so drift on a shared machine hits both alike; medians are reported.

    python3 bench/latency_overhead.py --base-binary PATH [--rounds 6] [--conns 2000]

Build the base binary from the commit to compare with, and this tree's binary
and load generator, e.g.:

    git archive BASE | tar -x -C /tmp/base
    (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target cargo build --release) && cp target/release/tunneld /tmp/tunneld-base
    cargo build --release && cargo build --release --example loadgen
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, tunneld and loadgen helpers)

PATHS = ("direct", "tunnel")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-binary", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--conns", type=int, default=2000)
    args = ap.parse_args()
    binaries = {"base": args.base_binary, "histograms": bench.TARGET_DIR / "release" / "tunneld"}
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    fd_env = dict(bench.os.environ)
    rates: dict = {(name, path): [] for name in binaries for path in PATHS}
    p50s: dict = {key: [] for key in rates}
    with tempfile.TemporaryDirectory(prefix="tunneld-latency-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(tmp)
        try:
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target to listen", lambda: bench.listening(echo_port), procs, echo)
            ports = {}
            for name, binary in binaries.items():
                home = tmp / name
                home.mkdir()
                tunneld = bench.Tunneld(binary, procs, home, fd_env)
                ports[name] = {"direct": tunneld.map(echo_port, False), "tunnel": tunneld.map(echo_port, True)}
            for round_no in range(args.rounds):
                # Alternate which binary goes first, so neither always runs warm.
                order = list(binaries) if round_no % 2 == 0 else list(reversed(binaries))
                for name in order:
                    for path in PATHS:
                        res = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[name][path]}",
                                                          "--count", str(args.conns)], timeout=600)
                        if res["failures"]:
                            raise bench.BenchError(f"{name} {path}: {res['failures']} failures: {res['errors']}")
                        rates[(name, path)].append(res["conns_per_s"])
                        p50s[(name, path)].append(res["p50_us"])
                        bench.log(f"round {round_no + 1} {name:10} {path:6} {res['conns_per_s']:8.0f} conn/s"
                                  f"  p50 {res['p50_us']:6.0f} us")
        finally:
            procs.stop_all()
    bench.log("\nmedians over rounds:")
    for path in PATHS:
        base, new = (statistics.median(rates[(n, path)]) for n in binaries)
        base_p50, new_p50 = (statistics.median(p50s[(n, path)]) for n in binaries)
        bench.log(f"  {path:6}  base {base:8.0f} conn/s (p50 {base_p50:.0f} us)   histograms {new:8.0f} conn/s"
                  f" (p50 {new_p50:.0f} us)   ratio {new / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
