#!/usr/bin/env python3
"""Where a direct UDP mapping loses datagrams (bench/README.md, "UDP"): iperf3 -u -w 4M
at the given rates through raw loopback and one direct mapping per tunneld binary,
in alternating order per round; per run: iperf3's loss, the kernel's drops on the
mapping's socket (/proc/net/udp), UdpRcvbufErrors (nstat, system-wide) and tunneld's
dropped-datagram counters; `--perf NAME` records that daemon (perf -e cpu-clock -g)
into perf-NAME-RATE.data in the current directory.

    SECS=2 ROUNDS=2 python3 bench/udp_where.py 300,400,600 main=/path/a new=/path/b [--perf new]
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
import udp

def nstat():
    out = subprocess.run(["nstat", "-az", "UdpRcvbufErrors", "UdpSndbufErrors", "UdpInErrors"], capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 2: d[f[0]] = int(f[1])
    return d

def main():
    rates = [int(r) for r in sys.argv[1].split(",")]
    bins = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    perf = sys.argv[sys.argv.index("--perf") + 1] if "--perf" in sys.argv else None
    secs = float(os.environ.get("SECS", "2"))
    rounds = int(os.environ.get("ROUNDS", "1"))
    tmp = Path(tempfile.mkdtemp(prefix="h22probe-"))
    logdir = tmp / "logs"; logdir.mkdir()
    procs = bench.Children(logdir)
    try:
        ports = udp.iperf3_behind_each(bins, procs, tmp)
        for r in range(rounds):
          for rate in rates:
            order = list(ports)
            if r % 2: order.reverse()
            for name in order:
                p, t = ports[name]
                k0 = udp.udp_socket_row(p)["drops"] if t else 0
                n0 = nstat()
                d0 = udp.traffic_entry(t.api, p)["udp"]["dropped"] if t else {}
                perfp = None
                if perf == name and t:
                    perfp = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-p", str(t.server.pid), "-o", f"perf-{name}-{rate}.data", "--", "sleep", str(secs)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                res = udp.iperf_udp(p, rate, secs, 1200, "4M", tmp / f"{name}-{rate}.json")
                if perfp: perfp.wait()
                k1 = udp.udp_socket_row(p)["drops"] if t else 0
                n1 = nstat()
                d1 = udp.traffic_entry(t.api, p)["udp"]["dropped"] if t else {}
                dd = {k: v - d0.get(k, 0) for k, v in d1.items()} if t else {}
                print(f"r{r} {rate:5}M {name:6} loss {res['loss']:6.3f}% got {res['mbit']:7.1f} pkts {res.get('packets')} kernel-drops {k1-k0} nstat { {k: n1.get(k,0)-n0.get(k,0) for k in n1} } tunneld-drops {dd}", flush=True)
    finally:
        procs.stop_all()
if __name__ == "__main__":
    main()
