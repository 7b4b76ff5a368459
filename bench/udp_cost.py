#!/usr/bin/env python3
"""What a direct UDP datagram costs each tunneld binary (bench/README.md, "Direct UDP
in batches"): iperf3 -u -w 4M, 1,200-byte datagrams, at fixed offered rates through one
direct mapping per binary, in alternating order per round. Per run: iperf3's loss, the
datagrams the mapping forwarded, the daemon's CPU time (/proc/PID/schedstat, all
threads) and context switches (voluntary + involuntary, every thread's
/proc/PID/task/*/status) per datagram forwarded. CPU per datagram moves far less with
the machine's load than the loss does.

    SECS=3 ROUNDS=3 python3 bench/udp_cost.py 200,400 main=/path/a new=/path/b
"""
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
import udp


SETTLE = float(os.environ.get("SETTLE", "1"))


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:
            pass
    return total


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def main():
    rates = [int(r) for r in sys.argv[1].split(",")]
    bins = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    secs = float(os.environ.get("SECS", "3"))
    rounds = int(os.environ.get("ROUNDS", "3"))
    tmp = Path(tempfile.mkdtemp(prefix="h22cost-"))
    logdir = tmp / "logs"; logdir.mkdir()
    procs = bench.Children(logdir)
    rows = []
    try:
        ports = udp.iperf3_behind_each(bins, procs, tmp)
        for r in range(rounds):
            for rate in rates:
                order = list(ports)
                if r % 2: order.reverse()
                for name in order:
                    p, t = ports[name]
                    # The previous run's tail (datagrams a forwarder still had
                    # queued) must not reach iperf3's next test: it would take
                    # one of them for its client's UDP handshake and answer the
                    # wrong address ("unable to read from stream socket").
                    time.sleep(SETTLE)
                    if t:
                        pid = t.server.pid
                        c0, s0 = cpu_ns(pid), switches(pid)
                        f0 = udp.traffic_entry(t.api, p)["udp"]["datagrams_sent"]
                    res = udp.iperf_udp(p, rate, secs, 1200, "4M", tmp / f"{name}-{rate}-{r}.json")
                    line = f"r{r} {rate:5}M {name:6} loss {res['loss']:7.3f}% got {res['mbit']:7.1f} Mbit/s"
                    if t:
                        c1, s1 = cpu_ns(pid), switches(pid)
                        f1 = udp.traffic_entry(t.api, p)["udp"]["datagrams_sent"]
                        n = max(f1 - f0, 1)
                        cpu_us = (c1 - c0) / 1e3 / n
                        sw = (s1 - s0) / n
                        line += f" forwarded {n:8} cpu {cpu_us:6.2f} us/datagram switches {sw:5.3f}/datagram"
                        rows.append((name, rate, res["loss"], cpu_us, sw))
                    print(line, flush=True)
        print("\nmedians per binary and rate: loss %, CPU us/datagram, context switches/datagram")
        for name in bins:
            for rate in rates:
                mine = [x for x in rows if x[0] == name and x[1] == rate]
                med = lambda i: sorted(x[i] for x in mine)[len(mine) // 2]
                print(f"{name:8} {rate:5}M loss {med(2):7.3f} cpu {med(3):6.2f} switches {med(4):5.3f}")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
