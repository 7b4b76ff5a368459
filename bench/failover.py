#!/usr/bin/env python3
"""Client groups (issue 23): failover under load, spreading, and what a group of
one costs against today's single client.

    python3 bench/failover.py [--rounds 5] [--rate 200] [--spread 1000]
                              [--ab-rounds 6] [--ab-conns 2000]
                              [--no-build] [--binary PATH] [--baseline PATH]

1. Failover under load: visitors arrive at --rate per second on a tunneled
   mapping served by a group of two clients (failover: the first serves).
   Each visitor connects, echoes 64 bytes, waits 40 ms, echoes 64 more, closes.
   After 2 s the serving client is killed with SIGKILL; the load runs 3 s more,
   then the killed client is restarted for the next round. Reported per round:
   visitors in flight at the kill (started, not finished), visitors that failed,
   and the time from the kill to the first visitor *started after it* that was
   served completely — a dead process serves nobody, so that one went through the
   other client (the server's tunneld_mapping_client_connections_total confirms
   where visitors went).
2. Spreading: 1,000 visitors (20 at a time) over a group of three clients, once
   with round_robin and once with least_connections; each client's share from
   the per-client counter, against an even third.
3. A group of one against today's single-client mapping: sequential connection
   rate through the tunnel (loadgen connrate), rounds alternating between this
   build and --baseline (default /work/notes/groups-base-tunneld, a release
   build of main before groups), medians and their ratio.

Release builds only (`cargo build --release` and the loadgen example). Python
standard library only.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process and port helpers)

DEFAULT_BASELINE = Path("/work/notes/groups-base-tunneld")


def build() -> None:
    for argv in (["cargo", "build", "--release"], ["cargo", "build", "--release", "--example", "loadgen"]):
        bench.log(f"$ {' '.join(argv)}")
        if subprocess.run(argv, cwd=bench.REPO).returncode != 0:
            raise bench.BenchError(f"{' '.join(argv)} failed")


class Group:
    """A server and named clients, each its own `tunneld client` process."""

    def __init__(self, binary: Path, procs: bench.Children, tmp: Path, names: list[str]):
        self.binary, self.procs, self.tmp = binary, procs, tmp
        self.api = f"http://127.0.0.1:{bench.free_port()}"
        self.tunnel = f"127.0.0.1:{bench.free_port()}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
        self.env["RUST_LOG"] = "warn"
        self.config = tmp / "tunneld.toml"
        self.config.write_text('[server]\nbind_addr = "127.0.0.1"\n')
        state = tmp / "state"
        notify = bench.Notify(tmp / "server.notify")
        self.server = procs.spawn("server", [
            str(binary), "server", "--config", str(self.config), "--api-listen", self.api.removeprefix("http://"),
            "--tunnel-listen", self.tunnel, "--state-dir", str(state), "--secret", "bench-" + os.urandom(8).hex(),
        ], env={**self.env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("READY=1", procs, self.server)
        out = subprocess.run([str(binary), "fingerprint", "--config", str(self.config), "--state-dir", str(state)],
                             capture_output=True, text=True, env=self.env)
        self.pin = out.stdout.strip()
        self.secrets = {name: bench.http_json(self.api + "/api/client/create", {"name": name})["data"]["secret"]
                        for name in names}
        self.clients = {name: self.start_client(name) for name in names}

    def start_client(self, name: str) -> subprocess.Popen:
        notify_path = self.tmp / f"client-{name}.notify"
        notify_path.unlink(missing_ok=True)
        notify = bench.Notify(notify_path)
        proc = self.procs.spawn(f"client-{name}", [
            str(self.binary), "client", "--config", str(self.config), "--server", self.tunnel, "--name", name,
            "--secret", self.secrets[name], "--fingerprint", self.pin,
        ], env={**self.env, "NOTIFY_SOCKET": str(notify.path)})
        notify.wait("STATUS=connected", self.procs, proc)
        bench.wait_until(f"the server to see {name}", lambda: self.connected(name), self.procs, self.server)
        return proc

    def connected(self, name: str) -> bool:
        clients = bench.http_json(self.api + "/api/client/list")["data"]["clients"]
        return any(c["name"] == name and c["connected"] for c in clients)

    def map(self, target_port: int, clients: list[str], balance: str) -> int:
        port = bench.free_port()
        reply = bench.http_json(self.api + "/api/mapping/create", {
            "source_port": port, "target_host": "127.0.0.1", "target_port": target_port, "use_tunnel": True,
            "clients": clients, "balance": balance})
        if not reply.get("success"):
            raise bench.BenchError(f"creating the group mapping failed: {reply}")
        return port

    def update(self, port: int, **fields) -> None:
        reply = bench.http_json(self.api + "/api/mapping/update", {"port": port, **fields})
        if not reply.get("success"):
            raise bench.BenchError(f"update failed: {reply}")

    def served(self, port: int) -> dict[str, float]:
        """tunneld_mapping_client_connections_total of `port`, by client."""
        with bench.urllib.request.urlopen(self.api + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        counts = {}
        for line in text.splitlines():
            if line.startswith("tunneld_mapping_client_connections_total{") and f'port="{port}"' in line:
                client = line.split('client="')[1].split('"')[0]
                counts[client] = float(line.rsplit(" ", 1)[1])
        return counts


def visitor(port: int, hold: float, records: list, lock: threading.Lock) -> None:
    """One visitor: (started, first echo back or None, ended, served completely)."""
    start = time.monotonic()
    first = None
    ok = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            for i in range(2):
                payload = os.urandom(64)
                s.sendall(payload)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        raise ConnectionError("closed early")
                    got += chunk
                if got != payload:
                    raise ValueError("echo differs")
                if i == 0:
                    first = time.monotonic()
                    time.sleep(hold)
        ok = True
    except (OSError, ValueError, ConnectionError):
        ok = False
    with lock:
        records.append((start, first, time.monotonic(), ok))


def failover_round(group: Group, port: int, rate: float, before: float, after: float) -> dict:
    records: list = []
    lock = threading.Lock()
    threads = []
    interval = 1.0 / rate
    t0 = time.monotonic()
    kill_at = t0 + before
    end = kill_at + after
    killed = None
    dead: list[float] = []
    served_before = group.served(port)
    next_at = t0
    while True:
        now = time.monotonic()
        if killed is None and now >= kill_at:
            proc = group.clients["first"]
            proc.kill()  # SIGKILL
            killed = time.monotonic()
            # Gone (reaped, every socket closed) a moment later: timed off the visitors' clock.
            threading.Thread(target=lambda: (proc.wait(), dead.append(time.monotonic())), daemon=True).start()
        if now >= end:
            break
        if now >= next_at:
            t = threading.Thread(target=visitor, args=(port, 0.04, records, lock), daemon=True)
            t.start()
            threads.append(t)
            next_at += interval
        else:
            time.sleep(min(next_at - now, 0.001))
    for t in threads:
        t.join(15)
    served_after = group.served(port)
    gone = dead[0] if dead else killed
    failed = [r for r in records if not r[3]]
    # Served after the kill: the first echo of a visitor that started after it
    # came back through the other client (the killed one serves nobody).
    firsts = sorted(f for s, f, e, ok in records if ok and s >= killed and f is not None)
    to_other = (firsts[0] - killed) * 1000 if firsts else float("nan")
    delta = {c: served_after.get(c, 0) - served_before.get(c, 0) for c in served_after}
    return {"visitors": len(records),
            "in_flight": sum(1 for s, f, e, ok in records if s < killed < e),
            "in_flight_gone": sum(1 for s, f, e, ok in records if s < gone < e),
            "failed": len(failed),
            "failed_new": sum(1 for r in failed if r[0] >= killed),
            "failed_after_gone": sum(1 for r in failed if r[0] >= gone),
            "reaped_ms": (gone - killed) * 1000,
            "first_other_ms": to_other, "served": delta, "rate": len(records) / (end - t0)}


def spread(group: Group, port: int, total: int, workers: int) -> dict[str, float]:
    before = group.served(port)
    records: list = []
    lock = threading.Lock()
    remaining = [total]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            visitor(port, 0.0, records, lock)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = sum(1 for r in records if not r[3])
    if failures:
        raise bench.BenchError(f"{failures} of {total} visitors failed while spreading")
    after = group.served(port)
    return {c: after[c] - before.get(c, 0) for c in after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="kill -9 rounds")
    ap.add_argument("--rate", type=float, default=200.0, help="visitors per second during the failover rounds")
    ap.add_argument("--spread", type=int, default=1000, help="visitors spread over three clients per balance mode")
    ap.add_argument("--ab-rounds", type=int, default=6)
    ap.add_argument("--ab-conns", type=int, default=2000)
    ap.add_argument("--parts", default="failover,spread,ab", help="which parts to run, comma-separated")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", type=Path, help="the tunneld to measure (default: target/release/tunneld)")
    ap.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="today's tunneld, before groups")
    args = ap.parse_args()
    if not args.no_build:
        build()
    binary = args.binary or bench.TARGET_DIR / "release" / "tunneld"
    loadgen = bench.TARGET_DIR / "release" / "examples" / "loadgen"
    bench.raise_fd_limit(20000)

    with tempfile.TemporaryDirectory(prefix="tunneld-failover-") as tmpdir:
        tmp = Path(tmpdir)
        procs = bench.Children(tmp)
        try:
            echo_port = bench.free_port()
            echo = procs.spawn("loadgen-echo", [str(loadgen), "echo", "--listen", f"127.0.0.1:{echo_port}"])
            bench.wait_until("the echo target", lambda: bench.listening(echo_port), procs, echo)

            parts = set(args.parts.split(","))
            if "failover" in parts:
                run_failover(args, binary, procs, tmp, echo_port)
            if "spread" in parts:
                run_spread(args, binary, procs, tmp, echo_port)
            if "ab" in parts:
                run_ab(args, binary, loadgen, procs, tmp, echo_port)
        finally:
            procs.stop_all()
    return 0


def run_failover(args, binary: Path, procs: bench.Children, tmp: Path, echo_port: int) -> None:
    (tmp / "failover").mkdir()
    group = Group(binary, procs, tmp / "failover", ["first", "second"])
    port = group.map(echo_port, ["first", "second"], "failover")
    bench.log(f"== failover: {args.rate:.0f} visitors/s (64 B echo, 40 ms, 64 B echo) through a two-client group; "
              f"kill -9 the serving client after 2 s, 3 s more")
    results = []
    for round_no in range(args.rounds):
        r = failover_round(group, port, args.rate, 2.0, 3.0)
        results.append(r)
        bench.log(f"round {round_no + 1}: {r['visitors']} visitors ({r['rate']:.0f}/s); at the kill {r['in_flight']} in flight; "
                  f"{r['failed']} failed, {r['failed_new']} of them started after the kill signal; the process was "
                  f"reaped {r['reaped_ms']:.1f} ms after it ({r['in_flight_gone']} in flight then, "
                  f"{r['failed_after_gone']} failed that started later); first new visitor's echo through the other "
                  f"client {r['first_other_ms']:.1f} ms after the kill; served by client: {r['served']}")
        group.clients["first"] = group.start_client("first")
    worst = max(r["first_other_ms"] for r in results)
    bench.log(f"  first new visitor through the other client: median {statistics.median(r['first_other_ms'] for r in results):.1f} ms, "
              f"worst {worst:.1f} ms (target <= 100 ms); failed / in flight at the kill per round: "
              + ", ".join(f"{r['failed']}/{r['in_flight']}" for r in results)
              + f"; visitors failed that started after the process was gone: {sum(r['failed_after_gone'] for r in results)}")
    procs.stop(group.server)
    for proc in group.clients.values():
        procs.stop(proc)


def run_spread(args, binary: Path, procs: bench.Children, tmp: Path, echo_port: int) -> None:
    (tmp / "spread").mkdir()
    names = ["one", "two", "three"]
    group = Group(binary, procs, tmp / "spread", names)
    port = group.map(echo_port, names, "round_robin")
    bench.log(f"\n== spreading {args.spread} visitors (20 at a time) over three clients")
    for balance in ("round_robin", "least_connections"):
        group.update(port, balance=balance)
        shares = spread(group, port, args.spread, 20)
        even = args.spread / 3
        worst = max(abs(v - even) / even * 100 for v in shares.values())
        bench.log(f"  {balance:<17} " + ", ".join(f"{c} {v:.0f}" for c, v in shares.items())
                  + f": furthest from an even third {worst:.1f} % (target within 10 %)")
    procs.stop(group.server)
    for proc in group.clients.values():
        procs.stop(proc)


def run_ab(args, binary: Path, loadgen: Path, procs: bench.Children, tmp: Path, echo_port: int) -> None:
    if args.baseline and args.baseline.exists():
        fd_env = dict(os.environ)
        servers = {"group of one": bench.Tunneld(binary, procs, tmp, fd_env, name="group-of-one"),
                   "today": bench.Tunneld(args.baseline, procs, tmp, fd_env, name="today")}
        ports = {label: s.map(echo_port, use_tunnel=True) for label, s in servers.items()}
        bench.log(f"\n== a group of one vs today's single client: {args.ab_rounds} rounds x {args.ab_conns} "
                  f"sequential connect -> 1-byte echo -> close through the tunnel, alternating")
        rates: dict[str, list[float]] = {label: [] for label in ports}
        for round_no in range(args.ab_rounds):
            order = list(ports) if round_no % 2 == 0 else list(reversed(list(ports)))
            for label in order:
                res = bench.run_loadgen(loadgen, ["connrate", "--target", f"127.0.0.1:{ports[label]}",
                                                  "--count", str(args.ab_conns)], timeout=600)
                if res["failures"]:
                    raise bench.BenchError(f"{label}: {res['failures']} connections failed: {res['errors']}")
                rates[label].append(res["conns_per_s"])
            bench.log(f"round {round_no + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) + " conn/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        bench.log(f"  medians: group of one {med['group of one']:.0f} conn/s, today {med['today']:.0f} conn/s: "
                  f"ratio {med['group of one'] / med['today']:.3f}; per-round ratios "
                  + ", ".join(f"{a / b:.3f}" for a, b in zip(rates['group of one'], rates['today'])))
    else:
        bench.log(f"\n(no baseline at {args.baseline}: the A/B against today is skipped)")


if __name__ == "__main__":
    bench.entry(main)
