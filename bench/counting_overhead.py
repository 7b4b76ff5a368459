#!/usr/bin/env python3
"""What live byte counting costs: iperf3 through a tunneld direct mapping, with the
copy path's counting as built against the same source built with the
`bench-uncounted` feature (counting compiled out), plus raw loopback, all in one
run. Rounds alternate between the three so drift on a shared machine hits each
alike; medians are reported.

    python3 bench/counting_overhead.py [--rounds 5] [--seconds 5] [--no-build]

The uncounted binary is built into target/uncounted; the feature is a build-time
switch for this measurement only and never reaches a user's configuration.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process and port helpers)

UNCOUNTED_DIR = bench.REPO / "target" / "uncounted"


def build() -> None:
    for argv, env in ((["cargo", "build", "--release"], None),
                      (["cargo", "build", "--release", "--features", "bench-uncounted"],
                       {**bench.os.environ, "CARGO_TARGET_DIR": str(UNCOUNTED_DIR)})):
        bench.log(f"$ {' '.join(argv)}" + (" (CARGO_TARGET_DIR=target/uncounted)" if env else ""))
        if subprocess.run(argv, cwd=bench.REPO, env=env).returncode != 0:
            raise bench.BenchError(f"{' '.join(argv)} failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1, help="iperf3 -P (parallel streams)")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build()
    binaries = {"counted": bench.TARGET_DIR / "release" / "tunneld", "uncounted": UNCOUNTED_DIR / "release" / "tunneld"}
    fd_env = dict(bench.os.environ)

    with tempfile.TemporaryDirectory(prefix="tunneld-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(tmp)
        try:
            target = bench.start_iperf3(procs)
            ports = {"raw": target}
            for name, binary in binaries.items():
                home = tmp / name
                home.mkdir()
                ports[name] = bench.Tunneld(binary, procs, home, fd_env).map(target, use_tunnel=False)
            gbps: dict[str, list[float]] = {name: [] for name in ports}
            extra = ["-P", str(args.streams)] if args.streams > 1 else []
            for round_no in range(args.rounds):
                for name, port in ports.items():
                    r = bench.run_iperf(port, args.seconds, extra, tmp / f"{name}-{round_no}.json")
                    gbps[name].append(r["gbps"])
                bench.log(f"round {round_no + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in gbps.items()) + " Gbit/s")
        finally:
            procs.stop_all()

    med = {name: statistics.median(v) for name, v in gbps.items()}
    bench.log("")
    bench.log(f"median of {args.rounds} x {args.seconds} s, {args.streams} stream(s):")
    for name, value in med.items():
        bench.log(f"  {name:<10} {value:6.2f} Gbit/s  ({value / med['raw']:.2f}x raw)")
    bench.log(f"  counted / uncounted = {med['counted'] / med['uncounted']:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except bench.BenchError as e:
        bench.log(f"error: {e}")
        sys.exit(2)
